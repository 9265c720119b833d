"""What each optimizer step trains on: task streams, the batch plan, and the samplers.

A task's windows come in a seeded random order (a pure function of seed, task name and
position), reshuffled every epoch: keyed by the name, not the task's place in the order, so
runs that train the same task at different positions of an order see the same windows. The
batch plan says how many fresh and replayed rows a step holds and which contiguous slice of
them is this rank's. Samplers own their cursors (windows consumed per task), so they checkpoint
themselves. Method joint mixes the tasks by their budgets (``joint_weights``).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from cptrain.config import RunConfig
from cptrain.data.shards import ShardSet
from cptrain.errors import CheckpointError, ConfigError
from cptrain.replay.mixer import effective_alpha, exact_alpha, mix_counts, split_for_rank

if TYPE_CHECKING:
    from cptrain.train.data import TrainingData

# Per source task, the window indices a step's fresh rows came from.
Used = list[tuple[int, np.ndarray]]
# Fewer validation windows than this (and than eval.windows) get a warning at the start.
THIN_VALIDATION = 16


def task_key(name: str) -> int:
    """A stable 63-bit integer for a task name (sha256 of its UTF-8): Python's hash() of a str
    changes between processes, and the key must not."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") >> 1


class TaskStream:
    """Windows of one task in a seeded random order, reshuffled every epoch. ``task_idx`` is
    kept for callers; the order depends on ``seed`` and ``name`` only."""

    def __init__(
        self,
        shard: ShardSet,
        task_idx: int,
        seed: int,
        window_len: int,
        name: str,
        unique_windows: int | None = None,
    ):
        self.shard = shard
        self.window_len = window_len
        self.n = shard.num_windows(window_len)  # DataError naming the split when none fits
        self._key = (seed, task_key(name))
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        # unique_tokens: the pool is the first windows of the full stream's first epoch, so a
        # limited stream starts exactly as the unlimited one does; later passes reshuffle it.
        self._pool: np.ndarray | None = None
        if unique_windows is not None and unique_windows < self.n:
            self._pool = self._permutation(0)[:unique_windows].copy()
            self.n = unique_windows
            self._epoch = -1

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self._pool is not None and epoch == 0:
                self._perm = self._pool
            else:
                rng = np.random.default_rng([self._key[0], self._key[1], epoch, 0x5EED])
                self._perm = rng.permutation(self.n)
                if self._pool is not None:
                    self._perm = self._pool[self._perm]
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        pos = start
        filled = 0
        while filled < count:
            epoch, off = divmod(pos, self.n)
            take = min(count - filled, self.n - off)
            out[filled : filled + take] = self._permutation(epoch)[off : off + take]
            filled += take
            pos += take
        return out

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.shard.windows(idx, self.window_len)


@dataclass(frozen=True)
class BatchPlan:
    """Rows per step (global and this rank's) and steps per task."""

    seq_len: int
    batch_size: int
    n_fresh: int  # fresh windows per step, whole batch
    n_replay: int  # replayed rows per step at full buffer, whole batch
    fresh_slice: tuple[int, int]  # (start, count) of this rank's fresh rows
    n_replay_local: int
    task_steps: tuple[int, ...]

    @classmethod
    def build(cls, cfg: RunConfig, world_size: int, rank: int) -> BatchPlan:
        b = cfg.train.batch_size
        n_fresh, n_replay = mix_counts(cfg.replay.alpha, b, cfg.replay.mode)
        if n_fresh == 0:
            raise ConfigError(
                f"replay.alpha={cfg.replay.alpha} leaves no fresh sequence in a batch of {b}; "
                "raise train.batch_size or lower replay.alpha"
            )
        steps = cfg.task_steps
        return cls(
            seq_len=cfg.train.seq_len,
            batch_size=b,
            n_fresh=n_fresh,
            n_replay=n_replay,
            # Contiguous slices per rank whose sizes differ by at most one.
            fresh_slice=split_for_rank(n_fresh, world_size, rank),
            n_replay_local=split_for_rank(n_replay, world_size, rank)[1],
            task_steps=steps,
        )

    def warnings(self, cfg: RunConfig, data: TrainingData, show: bool) -> list[str]:
        """What the user should know before the run trains (printed to stderr with ``show``):
        a replay share that rounds to another than asked, a task whose budget draws its
        windows more than once, and a validation split too small for ``eval.windows``."""
        out = []
        total = self.n_fresh + self.n_replay
        if cfg.replay.alpha > 0 and Fraction(self.n_replay, total) != exact_alpha(cfg.replay.alpha):
            out.append(
                f"replay.alpha={cfg.replay.alpha:g} replays {self.n_replay} of {total} rows a "
                f"step ({effective_alpha(self.n_fresh, self.n_replay):.1%}, not "
                f"{cfg.replay.alpha:.1%}): the rows are "
                "whole; pick a batch size where the share is exact to get it"
            )
        for spec, steps, stream in zip(cfg.data.tasks, self.task_steps, data.streams,
                                       strict=True):
            passes = steps * self.n_fresh / stream.n
            if passes > 1 and spec.unique_tokens is None:
                out.append(
                    f"task {spec.name}: its budget draws {steps * self.n_fresh:,} training "
                    f"windows of its {stream.n:,} ({passes:.1f} passes): windows repeat; lower "
                    "its tokens, add data, or set unique_tokens to make repetition deliberate"
                )
        for name, shard in data.val_sets.items():
            have = shard.num_windows(data.window_len)
            if have < min(cfg.eval.windows, THIN_VALIDATION):
                # A loss over a handful of windows moves with the windows, not the model.
                out.append(
                    f"task {name}: its val split holds {have} window(s) of {cfg.train.seq_len} "
                    f"tokens ({shard.num_tokens:,} tokens), fewer than eval.windows "
                    f"{cfg.eval.windows}: its validation losses rest on {have}; give it more "
                    "val text (or a larger val_fraction when preparing)"
                )
        for line in out if show else []:
            print(f"warning: {line}", file=sys.stderr)
        return out

    @property
    def total_steps(self) -> int:
        return sum(self.task_steps)

    def upcoming(self, step: int, task_idx: int, task_step: int) -> Iterator[tuple[int, int, int]]:
        """(step, this rank's replay rows, task) of every step from here to the end: the
        replay prefetcher's plan."""
        for t in range(task_idx, len(self.task_steps)):
            first = task_step if t == task_idx else 0
            for _ in range(first, self.task_steps[t]):
                yield step, self.n_replay_local, t
                step += 1


class SequentialSampler:
    """Every step's fresh windows come from the task being trained."""

    def __init__(self, streams: list[TaskStream], plan: BatchPlan):
        self.streams = streams
        self.plan = plan
        self.cursors = [0] * len(streams)

    def draw(self, task: int, step: int) -> tuple[np.ndarray, Used]:
        """This rank's fresh rows of ``step`` and where they came from. The global batch's
        windows are a pure function of the cursors; each rank takes its contiguous slice."""
        start, count = self.plan.fresh_slice
        idx = self.streams[task].indices(self.cursors[task], self.plan.n_fresh)
        self.cursors[task] += self.plan.n_fresh
        mine = idx[start : start + count]
        return self.streams[task].rows(mine), [(task, mine)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursors": list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cursors = state.get("cursors") if isinstance(state, dict) else None
        if not isinstance(cursors, list) or len(cursors) != len(self.streams):
            raise CheckpointError(
                f"the checkpoint's data cursors are {cursors!r}, not one per task "
                f"({len(self.streams)}); resume with the task list the run was started with"
            )
        self.cursors = [int(c) for c in cursors]


class JointSampler(SequentialSampler):
    """Method joint: each step's fresh windows are an i.i.d. mixture of all tasks."""

    def __init__(
        self, streams: list[TaskStream], plan: BatchPlan, weights: np.ndarray, seed: int
    ):
        super().__init__(streams, plan)
        self.p = weights / weights.sum()
        self.seed = seed

    def draw(self, task: int, step: int) -> tuple[np.ndarray, Used]:
        start, count = self.plan.fresh_slice
        rng = np.random.default_rng([self.seed, step, 0x701])
        picks = rng.choice(len(self.streams), size=self.plan.n_fresh, p=self.p)
        tasks, windows = [], []
        for t in range(len(self.streams)):
            k = int((picks == t).sum())
            if k:
                tasks.append(np.full(k, t))
                windows.append(self.streams[t].indices(self.cursors[t], k))
                self.cursors[t] += k
        task_of = np.concatenate(tasks)[start : start + count]
        window_of = np.concatenate(windows)[start : start + count]
        used = [(int(t), window_of[task_of == t]) for t in np.unique(task_of)]
        rows = np.concatenate([self.streams[t].rows(idx) for t, idx in used])
        return rows, used


def joint_weights(cfg: RunConfig, plan: BatchPlan, sizes: list[int]) -> list[float]:
    """Method joint's task mixture: ``data.joint_weights`` when given; else by budget (each
    task's share of all steps, so joint sees each task as often as the sequential methods
    do, whatever the shard sizes) or, with ``data.joint_weighting: size``, by training tokens."""
    if cfg.data.joint_weights is not None:
        return list(cfg.data.joint_weights)
    if cfg.data.joint_weighting == "size":
        return [float(n) for n in sizes]
    return [float(n) for n in plan.task_steps]


def make_sampler(
    cfg: RunConfig, streams: list[TaskStream], plan: BatchPlan, sizes: list[int]
) -> SequentialSampler:
    if cfg.sampler != "joint":
        return SequentialSampler(streams, plan)
    w = joint_weights(cfg, plan, sizes)
    return JointSampler(streams, plan, np.array(w, dtype=np.float64), cfg.seed)
