"""Token windows for a loop that is not ``cptrain train``: the prepared tasks in the order
``cptrain train`` reads them, and the rows of one optimizer step as a pure function of
(seed, step, rank), so a resumed run or another rank reads exactly what ``cptrain train``
would (torch-free: numpy and the prepared shards only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.data.prepare import load_prepared, open_split
from cptrain.data.shards import ShardSet
from cptrain.errors import ConfigError, DataError
from cptrain.train.batches import BatchPlan, TaskStream


class ArrayWindows:
    """Rows already cut to one length ([n, T+1] token ids), read like a prepared split: what
    ``LossMatrix`` and the buffer's readers take besides ``ShardSet``."""

    def __init__(self, rows: np.ndarray):
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] == 0 or not np.issubdtype(rows.dtype, np.integer):
            raise DataError(
                f"validation rows must be a non-empty 2-D integer array [windows, seq_len + 1] "
                f"(got shape {rows.shape}, dtype {rows.dtype}); cut your tokens into windows"
            )
        self.rows = rows

    def num_windows(self, window_len: int) -> int:
        if self.rows.shape[1] != window_len:
            raise DataError(
                f"validation rows are {self.rows.shape[1]} tokens long, not seq_len + 1 = "
                f"{window_len}; cut them to seq_len + 1 tokens"
            )
        return self.rows.shape[0]

    def windows(self, idx: np.ndarray, window_len: int) -> np.ndarray:
        self.num_windows(window_len)
        return self.rows[np.asarray(idx)].astype(np.int64)


class TaskWindows:
    """The first ``count`` training windows of one prepared task in ``cptrain train``'s order
    (a pure function of seed and task name, reshuffled every epoch), as a map-style dataset:
    ``DataLoader(windows, batch_size=n_fresh)`` yields the fresh rows of ``cptrain train``'s
    steps in turn (one process). Items are int64 numpy rows of seq_len + 1 tokens."""

    def __init__(self, stream: TaskStream, count: int):
        if count < 0:
            raise ValueError(f"count must be ≥ 0 (got {count})")
        self.stream = stream
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.stream.rows(self.stream.indices(int(i), 1))[0].astype(np.int64)


class PreparedData:
    """A directory made by ``cptrain prepare``, read as ``cptrain train`` reads it.

    ``train(task, count)`` gives a task's training windows in the run's order, ``val(names)``
    the validation splits ``LossMatrix`` evaluates, ``window_len`` is seq_len + 1 (a row holds
    its next-token targets)."""

    def __init__(self, directory: str | Path, *, seq_len: int, seed: int = 0):
        self.dir = Path(directory)
        self.info: dict[str, Any] = load_prepared(self.dir)
        if seq_len < 1:
            raise ConfigError(f"seq_len must be ≥ 1 (got {seq_len})")
        self.seq_len = seq_len
        self.seed = seed
        self.window_len = seq_len + 1
        self.tokenizer_dir = self.dir / "tokenizer"

    @property
    def tasks(self) -> list[str]:
        return list(self.info.get("tasks", {}))

    @property
    def vocab_size(self) -> int:
        return int(self.info["tokenizer"]["vocab_size"])

    def stream(self, task: str) -> TaskStream:
        index = self.tasks.index(task) if task in self.tasks else 0
        return TaskStream(open_split(self.dir, task, "train"), index, self.seed,
                          self.window_len, task)

    def train(self, task: str, count: int) -> TaskWindows:
        return TaskWindows(self.stream(task), count)

    def val(self, names: Sequence[str]) -> dict[str, ShardSet]:
        return {n: open_split(self.dir, n, "val") for n in names}


@dataclass(frozen=True)
class StepRows:
    """This rank's rows of one optimizer step: fresh first, then replayed (``cptrain train``'s
    order), and where the fresh ones came from (what enters the buffer after the step)."""

    step: int
    task: int
    fresh: np.ndarray  # [n_fresh_local, T+1]
    fresh_idx: np.ndarray  # their window indices in the task's stream
    replay: np.ndarray | None  # [m, T+1], m ≤ n_replay_local while the buffer fills

    @property
    def rows(self) -> np.ndarray:
        if self.replay is None or len(self.replay) == 0:
            return self.fresh
        return np.concatenate([self.fresh, self.replay])


class StepIndex:
    """Which task a global step belongs to, and its fresh windows: ``cptrain train``'s
    ``SequentialSampler`` with the cursor computed from the step instead of kept, so any step
    can be read first (a resume, a rank that starts late)."""

    def __init__(self, streams: Sequence[TaskStream], plan: BatchPlan):
        if len(streams) != len(plan.task_steps):
            raise ValueError(f"{len(streams)} task streams for {len(plan.task_steps)} tasks")
        self.streams = list(streams)
        self.plan = plan
        self.starts = np.concatenate([[0], np.cumsum(plan.task_steps)]).astype(int).tolist()

    @property
    def total_steps(self) -> int:
        return self.starts[-1]

    def locate(self, step: int) -> tuple[int, int]:
        """(task, step inside the task) of global step ``step``."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the run's {self.total_steps} steps")
        task = int(np.searchsorted(self.starts, step, side="right")) - 1
        return task, step - self.starts[task]

    def is_task_end(self, steps_done: int) -> int | None:
        """The task that ends once ``steps_done`` steps are taken, else None."""
        ends = self.starts[1:]
        return ends.index(steps_done) if steps_done in ends else None

    def fresh(self, step: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(task, this rank's fresh rows, their window indices) of ``step``: the global
        batch's windows are the task's next n_fresh from its cursor, each rank takes its
        contiguous slice (as ``SequentialSampler.draw``)."""
        task, task_step = self.locate(step)
        n = self.plan.n_fresh
        idx = self.streams[task].indices(task_step * n, n)
        start, count = self.plan.fresh_slice
        mine = idx[start : start + count]
        return task, self.streams[task].rows(mine), mine
