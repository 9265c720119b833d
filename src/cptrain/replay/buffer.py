"""ReplayBuffer: the one object the training loop talks to.

Per optimizer step s the trainer calls draw(s, n, current_task) before the step and
add(rows, task_id=…, step=s, refs=…) after it; commit() + state_dict() go into every checkpoint.

Visibility rule: the draw of step s sees the buffer as it was right after add() of step
t = s − 1 − visibility_lag (rows added later are not there yet; rows evicted later are still
there). With that, which rows a draw returns is a pure function of (seed, rank, s, the add()
history up to t), so prefetching ahead and resuming from a checkpoint never change it.

Crash safety: rows are only appended (see storage.py); a bounded policy's state is snapshotted
at commit() (see buffer_state.py). A resume truncates rows written after the checkpoint, and
checks what the checkpoint refers to.

This module keeps the buffer's own job, admitting and drawing rows in step order; its helpers
each hold one other: rows.py checks offered rows and reads drawn ones back, seed_rows.py the
seed rows of replay.seed, buffer_state.py the checkpoint state and policy snapshots.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.errors import ConfigError, EnvironmentProblem
from cptrain.replay.buffer_state import (
    STATE_FORMAT,
    STATE_VERSION,
    CommitLog,
    check_reclaimed,
    check_state,
    resume_settings,
    run_state,
    saved_counters,
)
from cptrain.replay.config import ReplayConfig
from cptrain.replay.policies import TAG_DRAW, Policy, make_policy
from cptrain.replay.prefetch import DrawCounters, Prefetcher
from cptrain.replay.rows import Resolver, RowReader, check_refs, check_tokens
from cptrain.replay.seed_rows import (
    MAX_SEED_ORIGIN,
    SEED_DIR,
    SEED_STEP,
    SeedRows,
    saved_seeds,
    seed_origin,
    seed_task_id,
)
from cptrain.replay.storage import META_DTYPE, ChunkStore, Layout, row_crcs, token_dtype

# Names that lived here before the split stay importable from here.
__all__ = [
    "MAX_SEED_ORIGIN",
    "SEED_DIR",
    "SEED_STEP",
    "STATE_FORMAT",
    "STATE_VERSION",
    "Drawn",
    "ReplayBuffer",
    "Resolver",
    "seed_origin",
    "seed_task_id",
]

_MAX_TASK = np.iinfo(np.int32).max
_SEED_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Drawn:
    """A computed draw: the rows and how many of them are seed rows of each origin."""

    rows: np.ndarray
    seed_counts: np.ndarray | None = None  # per origin, in add_seed() order; None: no seeds
    tasks: np.ndarray | None = None  # each row's task id (seed rows: seed_task_id(origin))
    ids: np.ndarray | None = None  # each row's id in the buffer (seed rows: 0 … n_seed − 1)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes


class ReplayBuffer:
    """Disk-backed replay buffer of one data-parallel rank (files under directory/rank_<r>/).

    On resume call load_state_dict() before anything else: the first add(), commit() or
    state_dict() of a buffer without loaded state starts a fresh, empty buffer and deletes what
    an earlier attempt left in its directory.
    """

    def __init__(
        self,
        cfg: ReplayConfig,
        directory: Path,
        *,
        row_len: int,
        vocab_size: int,
        seed: int,
        run_id: str,
        rank: int = 0,
        world_size: int = 1,
        resolver: Resolver | None = None,
    ) -> None:
        if row_len < 2 or vocab_size < 1:
            raise ValueError(f"row_len ({row_len}) must be ≥ 2 and vocab_size ({vocab_size}) ≥ 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if cfg.storage == "reference" and resolver is None:
            raise ConfigError(
                "replay.storage=reference reads replayed rows back from the task token shards, "
                "but none were given; use replay.storage: copy"
            )
        self.cfg = cfg
        self.row_len = row_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self._dtype = token_dtype(vocab_size)
        chunk_bytes = int(cfg.chunk_mb * (1 << 20))
        self._store = ChunkStore(
            Path(directory) / f"rank_{rank}",
            Layout(cfg.storage, self._dtype.name, row_len),
            run_id=run_id,
            rank=rank,
            chunk_bytes=chunk_bytes,
        )
        self._seed_rows = SeedRows(
            self._store.dir / SEED_DIR,
            token_dtype=self._dtype.name,
            row_len=row_len,
            run_id=run_id,
            rank=rank,
            chunk_bytes=chunk_bytes,
        )
        # The resolver is only consulted in reference mode; copy mode reads its own tokens.
        self._reader = RowReader(
            self._store,
            self._seed_rows,
            resolver if cfg.storage == "reference" else None,
            row_len=row_len,
            dtype=self._dtype,
        )
        self._commits = CommitLog(
            self._store.dir, keep_checkpoints=cfg.keep_checkpoints, bounded=cfg.bounded
        )
        self._policy: Policy = make_policy(cfg.policy, cfg.capacity, seed, rank)
        self._lock = threading.RLock()
        self._last_step = -1  # last add()ed step: draws up to last_step + 1 + lag are decided
        self._dirty = True
        self._failed: str | None = None
        self._closed = False
        self._prefetcher: Prefetcher | None = None
        self._fresh = True  # no checkpoint state loaded: what an earlier attempt left is void
        self._counters = DrawCounters()  # shared with the prefetcher, saved in the state
        self._last_draw: dict[str, Any] = {"step": None, "requested": 0, "returned": 0}
        self._last: Drawn | None = None

    # ---- helpers --------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        """This rank's directory."""
        return self._store.dir

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the replay buffer is closed")
        if self._failed is not None:
            raise EnvironmentProblem(
                f"the replay buffer stopped after an earlier failure ({self._failed}); resume "
                "from the last checkpoint"
            )

    def _horizon(self) -> int:
        return self._last_step - 1 - self.cfg.visibility_lag

    def _is_ready(self, step: int) -> bool:
        return step - 1 - self.cfg.visibility_lag <= self._last_step

    def _draw_rng(self, step: int) -> np.random.Generator:
        entropy = [self.seed & _SEED_MASK, self.rank, step, TAG_DRAW]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))

    # ---- adding ---------------------------------------------------------------------------
    def add(
        self, rows: np.ndarray, *, task_id: int, step: int, refs: np.ndarray | None = None
    ) -> None:
        """Offer the fresh rows of optimizer step `step` (call once per step, after it, with
        steps increasing; an empty batch is fine). Admission follows replay.policy."""
        self._check_usable()
        rows = np.asarray(rows)
        check_tokens(rows, row_len=self.row_len, vocab_size=self.vocab_size)
        refs = check_refs(rows, refs) if self.cfg.storage == "reference" else None
        if step <= self._last_step:
            raise ValueError(
                f"add() for step {step} after step {self._last_step}: steps must increase"
            )
        if not 0 <= task_id <= _MAX_TASK:
            raise ValueError(f"task_id {task_id} must be in [0, {_MAX_TASK}]")
        tokens = np.ascontiguousarray(rows, dtype=self._dtype)
        crcs = row_crcs(tokens)
        with self._lock:
            self._check_usable()
            self._seed_rows.accepting = False
            if len(rows):
                self._admit(tokens, crcs, refs, task_id, step)
            self._last_step = step
            self._dirty = True
            self._policy.compact(self._horizon())
        if self._prefetcher is not None:
            self._prefetcher.notify()

    def _admit(
        self, tokens: np.ndarray, crcs: np.ndarray, refs: np.ndarray | None, task: int, step: int
    ) -> None:
        """Admit rows and append the kept ones. refs None in reference mode: seed rows, whose
        tokens go to the seed store and whose records are their index there."""
        try:
            self._begin_writing()
            admission = self._policy.admit(np.full(len(tokens), task), step, self._store.rows)
            keep = admission.keep
            meta = np.empty(int(keep.sum()), dtype=META_DTYPE)
            meta["step"], meta["task"], meta["crc"] = step, task, crcs[keep]
            if refs is not None:
                records = refs[keep].reshape(-1, 1)
            elif self.cfg.storage == "reference":
                seed_store = self._seed_rows.open_store()
                records = (seed_store.rows + np.arange(len(meta), dtype=np.int64)).reshape(-1, 1)
                seed_store.append(tokens[keep], meta)
            else:
                records = tokens[keep]
            self._store.append(records, meta)
        except BaseException as exc:
            # The policy's index and the files may now disagree: refuse to go on.
            self._failed = str(exc) or type(exc).__name__
            raise

    def _begin_writing(self) -> None:
        """First write of a fresh start: drop rows and snapshots an earlier attempt left."""
        self._store.ensure_writable()
        if self._fresh:
            self._commits.snapshots.delete(lambda _: True)
            self._seed_rows.drop_dir()
            self._fresh = False

    def add_seed(self, rows: np.ndarray, *, origin: int, name: str | None = None) -> None:
        """Put the rows of one replay.seed source into the buffer (origin: its index in
        replay.seed; name: its label in stats(), default seed<origin>).

        Call on a fresh start only, once per source, before the first add() and before
        start_prefetch(); a resumed buffer gets its seed rows back from load_state_dict().
        The rows are admitted by the policy at SEED_STEP, so every draw from step 0 on can
        return them; they are stored as tokens whatever replay.storage says (see seed_rows)."""
        self._check_usable()
        seeds = self._seed_rows
        seeds.check_accepting()
        task = seed_task_id(origin)
        name = seeds.label(origin, name)
        rows = np.asarray(rows)
        check_tokens(rows, row_len=self.row_len, vocab_size=self.vocab_size)
        tokens = np.ascontiguousarray(rows, dtype=self._dtype)
        crcs = row_crcs(tokens)
        with self._lock:
            self._check_usable()
            first = self._store.rows
            if len(rows):
                self._admit(tokens, crcs, None, task, SEED_STEP)
            else:  # nothing to admit, but the state must say that this source was seeded
                self._begin_writing()
                if self.cfg.storage == "reference":
                    seeds.open_store()
            seeds.record(
                origin=origin, name=name, offered=len(rows), first=first, end=self._store.rows
            )
            self._dirty = True

    # ---- drawing --------------------------------------------------------------------------
    def available(self, step: int, *, current_task: int) -> int:
        """How many rows the draw of `step` can choose from."""
        exclude = current_task if self.cfg.replay_from == "previous_tasks" else None
        with self._lock:
            return self._policy.visible_count(step - 1 - self.cfg.visibility_lag, exclude)

    def draw(self, step: int, n: int, *, current_task: int) -> np.ndarray:
        """Replay rows for optimizer step `step`: int64 [m, row_len], m = min(n, available),
        distinct rows uniform over the visible buffer (see the module docstring)."""
        self._check_usable()
        if step < 0 or n < 0:
            raise ValueError(f"draw(step={step}, n={n}): both must be ≥ 0")
        drawn = None
        if self._prefetcher is not None:
            drawn = self._prefetcher.take(step, n, current_task)
        if drawn is None:
            drawn = self._compute_draw(step, n, current_task)
        assert isinstance(drawn, Drawn)
        rows = drawn.rows
        c = self._counters
        c.draws += 1
        c.rows_requested += n
        c.rows_drawn += len(rows)
        self._last_draw = {"step": step, "requested": n, "returned": len(rows)}
        self._last = drawn
        if drawn.seed_counts is not None:
            self._seed_rows.count_drawn(drawn.seed_counts)
            self._last_draw["seed"] = int(drawn.seed_counts.sum())
        return rows

    def last_drawn(self, step: int) -> Drawn | None:
        """What draw(step) returned: its rows' task ids (seed rows negative, see seed_task_id)
        and buffer ids, in order (read-only); None unless the latest draw was ``step``'s."""
        return self._last if self._last_draw["step"] == step else None

    @property
    def seed_rows(self) -> int:
        """How many seed rows the buffer holds: they have ids 0 … seed_rows − 1."""
        return int(self._seed_rows.ends[-1]) if len(self._seed_rows.ends) else 0

    def _compute_draw(self, step: int, n: int, current_task: int) -> Drawn:
        exclude = current_task if self.cfg.replay_from == "previous_tasks" else None
        rng = self._draw_rng(step)
        with self._lock:
            self._check_usable()
            ids = self._policy.sample(rng, step - 1 - self.cfg.visibility_lag, n, exclude)
        rows, tasks = self._read(ids)
        return Drawn(rows, self._seed_rows.counts(ids), tasks, ids)

    def _read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int64 tokens, task ids) of rows by id, checksummed (benches/ times this alone)."""
        return self._reader.read(ids)

    read_rows = _read  # the same, for readers outside a draw (the KL anchor's seed targets)

    # ---- prefetch -------------------------------------------------------------------------
    def start_prefetch(self, steps_and_counts: Iterable[tuple[int, int, int]]) -> None:
        """Prepare the draws of upcoming (step, n, current_task) requests in a background
        thread (replaces any earlier plan). No-op when replay.prefetch_mb is 0."""
        self._check_usable()
        self._stop_prefetch()
        self._seed_rows.accepting = False  # the thread may compute step 0's draw right away
        if self.cfg.prefetch_mb <= 0:
            return
        self._prefetcher = Prefetcher(
            steps_and_counts,
            self._compute_draw,
            self._is_ready,
            counters=self._counters,
            budget_bytes=int(self.cfg.prefetch_mb * (1 << 20)),
            bytes_per_row=self.row_len * 8,
            name=f"replay-prefetch-rank{self.rank}",
        )

    def _stop_prefetch(self) -> None:
        pf, self._prefetcher = self._prefetcher, None
        if pf is not None:
            pf.close()

    # ---- checkpoints ----------------------------------------------------------------------
    def commit(self) -> None:
        """Make everything added so far durable (call before taking a checkpoint)."""
        with self._lock:
            self._check_usable()
            if not self._dirty and self._commits.state is not None:
                return
            self._begin_writing()
            seed_state = self._seed_rows.commit()
            store_state = self._store.commit()
            self._commits.record(
                {
                    "run_id": self.run_id,
                    "rank": self.rank,
                    "world_size": self.world_size,
                    **self._settings(),
                },
                horizon=self._horizon(),
                last_step=self._last_step,
                policy=self._policy,
                store=store_state,
                seed=seed_state,
            )
            self._dirty = False
            horizon = self._commits.reclaim_horizon()
            if horizon is not None:
                self._reclaim(horizon)

    def _settings(self) -> dict[str, Any]:
        return resume_settings(self.cfg, row_len=self.row_len, token_dtype=self._dtype.name)

    def _reclaim(self, horizon: int) -> None:
        """Delete chunks and snapshots that no checkpoint among the last keep_checkpoints (nor
        the one being written) can need."""
        rpc = self._store.rows_per_chunk
        chunks = self._policy.reclaimable(horizon, rpc, self._store.rows // rpc)
        self._store.reclaim(chunks)
        self._policy.forget_below(self._store.first_kept_row())
        self._commits.drop_old_snapshots()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state as of now (commits first when rows were added since)."""
        with self._lock:
            self._check_usable()
            if self._dirty or self._commits.state is None:
                self.commit()
            assert self._commits.state is not None
            return run_state(self._commits.state, self._counters, self._seed_rows.drawn)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return to the checkpoint: rows written after it are discarded from disk."""
        if self._closed:
            raise RuntimeError("the replay buffer is closed")
        self._stop_prefetch()
        check_state(state, run_id=self.run_id, rank=self.rank, settings=self._settings())
        counters = saved_counters(state)
        seeds, seed_drawn = saved_seeds(state, storage=self.cfg.storage)
        with self._lock:
            arrays = self._commits.read_snapshot(state["snapshot"])
            try:
                self._store.restore(state["store"], verify_data=self.cfg.verify_on_resume)
                self._seed_rows.restore_store(
                    state.get("seed"), verify_data=self.cfg.verify_on_resume
                )
                # Snapshots from a future this resume abandons.
                self._commits.snapshots.delete(lambda number: number > state["commit"])
                policy = make_policy(self.cfg.policy, self.cfg.capacity, self.seed, self.rank)
                first = self._store.first_kept_row()
                meta = self._store.iter_meta(first)
                policy.load(state["policy_state"], arrays, meta, first)
                check_reclaimed(policy, self._store, keep_checkpoints=self.cfg.keep_checkpoints)
            except BaseException as exc:
                self._failed = str(exc) or type(exc).__name__
                raise
            self._policy = policy
            self._last_step = int(state["last_step"])
            self._commits.restore(state)
            self._counters = counters
            self._seed_rows.load(seeds, seed_drawn)
            self._dirty = False
            self._failed = None
            self._fresh = False

    # ---- misc -----------------------------------------------------------------------------
    def verify(self) -> None:
        """Checksum every chunk file (one full read); DataError on the first damaged one."""
        with self._lock:
            self._check_usable()
            self._store.verify()
            self._seed_rows.verify()

    def stats(self) -> dict[str, Any]:
        """Counters for metrics.jsonl; the draw counters count per run (since the start of the
        run, across resumes), the others describe the buffer now."""
        c: dict[str, Any] = self._counters.as_dict()
        seeds = self._seed_rows
        with self._lock:
            c["rows"] = len(self._policy)
            live = self._policy.live_counts(seeds.ends) if seeds.seeded else None
        c["stored_rows"] = self._store.rows
        c["bytes_on_disk"] = self._store.bytes_on_disk() + seeds.bytes_on_disk()
        c["last_draw"] = dict(self._last_draw)
        if live is not None:
            # Only for a seeded buffer, so the metrics of other runs stay as they were.
            c |= seeds.stats(live)
        return c

    def close(self) -> None:
        """Stop the prefetch thread and release files; idempotent."""
        if self._closed:
            return
        self._stop_prefetch()
        self._closed = True
        self._store.close()
        self._seed_rows.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._policy)

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
