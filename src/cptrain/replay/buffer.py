"""ReplayBuffer: the one object the training loop talks to.

Per optimizer step s the trainer calls draw(s, n, current_task) before the step and
add(rows, task_id=…, step=s, refs=…) after it; commit() + state_dict() go into every checkpoint.

Visibility rule: the draw of step s sees the buffer as it was right after add() of step
t = s − 1 − visibility_lag (rows added later are not there yet; rows evicted later are still
there). With that, which rows a draw returns is a pure function of (seed, rank, s, the add()
history up to t), so prefetching ahead and resuming from a checkpoint never change it.

Crash safety: rows are only appended (see storage.py); a bounded policy's "slot → row" map and
recent evictions are written at commit() to policy_<commit>.npz next to the chunks. A resume
truncates rows written after the checkpoint, and checks what the checkpoint refers to.

State versions: 2 adds "counters" (the draw counters of stats(), so they count per run, not per
process); a version-1 state loads with them at zero.

Seed rows (replay.seed): add_seed() puts rows that stand in for data the run does not have into
the buffer before the first add(). They are rows like any other for the policy, admitted at step
SEED_STEP (before every draw's horizon, so the draw of step 0 already sees them), and tagged in
the per-row metadata with task id seed_task_id(origin) = −2 − origin (negative: never a trained
task, so replay_from: previous_tasks still replays them; −1 marks rows of reclaimed chunks).
In copy mode their tokens are ordinary records. In reference mode they are not windows of any
task's shards, so their tokens go to a copy-mode store of their own (rank_<r>/seed/) and the
main store records their index in it. A state with seed rows has a "seed" entry (origins, that
store's position, per-origin draw counts); a state without one has no seed rows, so states,
files and draws of a buffer that is never seeded are exactly what they were without seeding.
"""

from __future__ import annotations

import copy
import io
import re
import shutil
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.errors import CheckpointError, ConfigError, DataError, EnvironmentProblem
from cptrain.replay.config import ReplayConfig
from cptrain.replay.policies import TAG_DRAW, Policy, make_policy
from cptrain.replay.prefetch import DrawCounters, Prefetcher
from cptrain.replay.storage import (
    META_DTYPE,
    ChunkStore,
    Layout,
    atomic_write,
    row_crcs,
    token_dtype,
)

STATE_FORMAT = "cptrain-replay"
STATE_VERSION = 2
_SNAPSHOT_RE = re.compile(r"^policy_(\d{8,})\.npz$")
_MAX_TASK = np.iinfo(np.int32).max
_SEED_MASK = (1 << 64) - 1
SEED_STEP = -(1 << 62)  # admission step of seed rows: visible to every draw
SEED_DIR = "seed"  # reference mode: the seed rows' own copy-mode store, inside rank_<r>/
_FIRST_SEED_TASK = -2  # task id of seed origin 0; origin k is −2 − k
MAX_SEED_ORIGIN = _MAX_TASK - 1  # −2 − origin stays an int32

Resolver = Callable[[int, np.ndarray], np.ndarray]


def seed_task_id(origin: int) -> int:
    """The META task id of seed rows of `origin` (0, 1, …): −2 − origin."""
    if not 0 <= origin <= MAX_SEED_ORIGIN:
        raise ValueError(f"seed origin {origin} must be in [0, {MAX_SEED_ORIGIN}]")
    return _FIRST_SEED_TASK - origin


def seed_origin(task_id: int) -> int | None:
    """The seed origin of a META task id, None for a trained task's id."""
    return _FIRST_SEED_TASK - task_id if task_id <= _FIRST_SEED_TASK else None


@dataclass(frozen=True)
class Drawn:
    """A computed draw: the rows and how many of them are seed rows of each origin."""

    rows: np.ndarray
    seed_counts: np.ndarray | None = None  # per origin, in add_seed() order; None: no seeds
    tasks: np.ndarray | None = None  # each row's task id (seed rows: seed_task_id(origin))

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
        # The resolver is only consulted in reference mode; copy mode reads its own tokens.
        self._resolver = resolver if cfg.storage == "reference" else None
        self._dtype = token_dtype(vocab_size)
        layout = Layout(cfg.storage, self._dtype.name, row_len)
        self._store = ChunkStore(
            Path(directory) / f"rank_{rank}",
            layout,
            run_id=run_id,
            rank=rank,
            chunk_bytes=int(cfg.chunk_mb * (1 << 20)),
        )
        self._policy: Policy = make_policy(cfg.policy, cfg.capacity, seed, rank)
        self._lock = threading.RLock()
        self._last_step = -1  # last add()ed step: draws up to last_step + 1 + lag are decided
        self._commit_no = 0
        self._horizons: list[int] = []
        self._committed: dict[str, Any] | None = None
        self._dirty = True
        self._failed: str | None = None
        self._closed = False
        self._prefetcher: Prefetcher | None = None
        self._fresh = True  # no checkpoint state loaded: what an earlier attempt left is void
        self._counters = DrawCounters()  # shared with the prefetcher, saved in the state
        self._last_draw: dict[str, Any] = {"step": None, "requested": 0, "returned": 0}
        self._last_tasks: np.ndarray | None = None
        # Seed rows: one entry per add_seed() call, with its physical id range [first, end).
        self._seeds: list[dict[str, Any]] = []
        self._seed_ends = np.empty(0, dtype=np.int64)
        self._seed_drawn: list[int] = []  # per origin, counted per run like the counters
        self._seed_store: ChunkStore | None = None  # reference mode only
        self._seeding_open = True  # until the first add(), start_prefetch() or resume

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
    def _check_tokens(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.row_len:
            raise DataError(
                f"replay rows have shape {tuple(rows.shape)} but this run's rows are "
                f"[n, {self.row_len}] (seq_len + 1); check data.seq_len against the shards"
            )
        if not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"replay rows must hold integer token ids, not {rows.dtype}")
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.vocab_size):
            bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
            raise DataError(
                f"token id {bad} is outside the vocabulary (size {self.vocab_size}); the shards "
                "and the tokenizer do not match: re-run `cptrain prepare`"
            )

    def _validate_rows(self, rows: np.ndarray, refs: np.ndarray | None) -> np.ndarray | None:
        self._check_tokens(rows)
        if self.cfg.storage != "reference":
            return None
        if refs is None:
            raise ValueError("storage=reference needs refs (the rows' window indices)")
        refs = np.asarray(refs, dtype=np.int64).reshape(-1)
        if len(refs) != len(rows) or (len(refs) and int(refs.min()) < 0):
            raise ValueError(f"refs must be {len(rows)} non-negative window indices")
        return refs

    def add(
        self, rows: np.ndarray, *, task_id: int, step: int, refs: np.ndarray | None = None
    ) -> None:
        """Offer the fresh rows of optimizer step `step` (call once per step, after it, with
        steps increasing; an empty batch is fine). Admission follows replay.policy."""
        self._check_usable()
        rows = np.asarray(rows)
        refs = self._validate_rows(rows, refs)
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
            self._seeding_open = False
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
                seed_store = self._open_seed_store()
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
            for _, path in self._snapshots():
                path.unlink(missing_ok=True)
            self._drop_seed_dir()
            self._fresh = False

    # ---- seed rows ------------------------------------------------------------------------
    @property
    def _seed_dir(self) -> Path:
        return self._store.dir / SEED_DIR

    def _drop_seed_dir(self) -> None:
        """Delete a seed store this buffer does not use (left by an abandoned attempt)."""
        if self._seed_store is None and self._seed_dir.exists():
            shutil.rmtree(self._seed_dir)

    def _open_seed_store(self) -> ChunkStore:
        if self._seed_store is None:
            layout = Layout("copy", self._dtype.name, self.row_len)
            self._seed_store = ChunkStore(
                self._seed_dir,
                layout,
                run_id=self.run_id,
                rank=self.rank,
                chunk_bytes=int(self.cfg.chunk_mb * (1 << 20)),
            )
        return self._seed_store

    def add_seed(self, rows: np.ndarray, *, origin: int, name: str | None = None) -> None:
        """Put the rows of one replay.seed source into the buffer (origin: its index in
        replay.seed; name: its label in stats(), default seed<origin>).

        Call on a fresh start only, once per source, before the first add() and before
        start_prefetch(); a resumed buffer gets its seed rows back from load_state_dict().
        The rows are admitted by the policy at SEED_STEP, so every draw from step 0 on can
        return them; they are stored as tokens whatever replay.storage says."""
        self._check_usable()
        if not self._seeding_open:
            raise RuntimeError(
                "add_seed() must come before the first add() and start_prefetch(), on a fresh "
                "start; a resumed buffer gets its seed rows from the checkpoint"
            )
        task = seed_task_id(origin)
        if any(s["origin"] == origin for s in self._seeds):
            raise ValueError(f"seed origin {origin} was seeded already")
        name = name or f"seed{origin}"
        if any(s["name"] == name for s in self._seeds):
            name = f"{name}#{origin}"  # names key stats(): two `self` sources stay apart
        rows = np.asarray(rows)
        self._check_tokens(rows)
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
                    self._open_seed_store()
            self._seeds.append(
                {
                    "origin": origin,
                    "name": name,
                    "offered": len(rows),
                    "first": first,
                    "end": self._store.rows,
                }
            )
            self._seed_ends = np.array([s["end"] for s in self._seeds], dtype=np.int64)
            self._seed_drawn.append(0)
            self._dirty = True

    def _seed_counts(self, ids: np.ndarray) -> np.ndarray | None:
        """Drawn seed rows per origin. Seed rows precede every other row, each origin's kept
        rows in one consecutive id range, so an id says where it came from."""
        if not self._seeds:
            return None
        ends = self._seed_ends
        which = np.searchsorted(ends, ids[ids < ends[-1]], side="right")
        return np.bincount(which, minlength=len(ends)).astype(np.int64)

    def _read_seed_tokens(self, ids: np.ndarray, index: np.ndarray) -> np.ndarray:
        store = self._seed_store
        try:
            if store is None:
                raise IndexError("no seed store")
            return store.read(index)[0]
        except IndexError:
            path, row = self._store.locate(int(ids[0]))
            raise DataError(
                f"replay row {row} of {path} refers to a seed row that {self._seed_dir} does "
                "not hold; resume from an earlier checkpoint or start again with an empty "
                "replay.dir"
            ) from None

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
        self._last_tasks = drawn.tasks
        if drawn.seed_counts is not None:
            for i, k in enumerate(drawn.seed_counts.tolist()):
                self._seed_drawn[i] += k
            self._last_draw["seed"] = int(drawn.seed_counts.sum())
        return rows

    def drawn_tasks(self, step: int) -> np.ndarray | None:
        """The task id of each row that draw(step) returned, in its order (seed rows have
        negative ids, see seed_task_id); None unless the latest draw was the one of ``step``."""
        if self._last_draw["step"] != step or self._last_tasks is None:
            return None
        return self._last_tasks.copy()

    def _compute_draw(self, step: int, n: int, current_task: int) -> Drawn:
        exclude = current_task if self.cfg.replay_from == "previous_tasks" else None
        rng = self._draw_rng(step)
        with self._lock:
            self._check_usable()
            ids = self._policy.sample(rng, step - 1 - self.cfg.visibility_lag, n, exclude)
        rows, tasks = self._read(ids)
        return Drawn(rows, self._seed_counts(ids), tasks)

    def _read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records, meta = self._store.read(ids)
        tokens = records if self._resolver is None else self._resolve(ids, records[:, 0], meta)
        bad = np.flatnonzero(row_crcs(tokens) != meta["crc"])
        if len(bad):
            raise self._corrupt_row(int(ids[bad[0]]), meta[bad[0]], records[bad[0]])
        return tokens.astype(np.int64), meta["task"].astype(np.int64)

    def _resolve(self, ids: np.ndarray, windows: np.ndarray, meta: np.ndarray) -> np.ndarray:
        assert self._resolver is not None
        tokens = np.empty((len(ids), self.row_len), dtype=self._dtype)
        for task in np.unique(meta["task"]):
            sel = np.flatnonzero(meta["task"] == task)
            if seed_origin(int(task)) is not None:
                tokens[sel] = self._read_seed_tokens(ids[sel], windows[sel])
                continue
            try:
                got = np.asarray(self._resolver(int(task), windows[sel]))
            except (IndexError, ValueError) as exc:
                path, row = self._store.locate(int(ids[sel[0]]))
                raise DataError(
                    f"replay references in {path} (row {row}, task {int(task)}) do not resolve "
                    f"against the task shards ({exc}); restore the shards or use storage: copy"
                ) from None
            if got.shape != (len(sel), self.row_len):
                raise DataError(
                    f"the task {int(task)} shard reader returned rows of shape {got.shape}, "
                    f"expected {(len(sel), self.row_len)}; the shards do not match this buffer"
                )
            tokens[sel] = got  # out-of-range ids wrap here and then fail the checksum
        return tokens

    def _corrupt_row(self, row: int, meta: np.ndarray, record: np.ndarray) -> DataError:
        path, local = self._store.locate(row)
        if self._resolver is None:
            return DataError(
                f"replay chunk file {path} row {local} fails its checksum (corrupt bytes); "
                "resume from an earlier checkpoint or start again with an empty replay.dir"
            )
        return DataError(
            f"replay row {local} of {path} (task {int(meta['task'])}, window {int(record[0])}) "
            "no longer matches the tokens it stored: the task shards changed or the file is "
            "corrupt; restore the shards or use storage: copy"
        )

    # ---- prefetch -------------------------------------------------------------------------
    def start_prefetch(self, steps_and_counts: Iterable[tuple[int, int, int]]) -> None:
        """Prepare the draws of upcoming (step, n, current_task) requests in a background
        thread (replaces any earlier plan). No-op when replay.prefetch_mb is 0."""
        self._check_usable()
        self._stop_prefetch()
        self._seeding_open = False  # the thread may compute the draws of step 0 on right away
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
            if not self._dirty and self._committed is not None:
                return
            self._begin_writing()
            seed_state = self._commit_seeds()
            store_state = self._store.commit()
            horizon = self._horizon()
            snapshot = None
            if self.cfg.bounded:
                snapshot = self._write_snapshot(self._commit_no + 1, horizon)
            self._commit_no += 1
            keep = self.cfg.keep_checkpoints
            self._horizons = [*self._horizons, horizon][-(keep + 1) :]
            self._committed = {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "run_id": self.run_id,
                "rank": self.rank,
                "world_size": self.world_size,
                **self._settings(),
                "commit": self._commit_no,
                "last_step": self._last_step,
                "rows": len(self._policy),
                "store": store_state,
                "policy_state": self._policy.state(),
                "snapshot": snapshot,
                "horizons": list(self._horizons),
            }
            if seed_state is not None:
                self._committed["seed"] = seed_state
            self._dirty = False
            if len(self._horizons) > keep:
                self._reclaim(self._horizons[0])

    def _commit_seeds(self) -> dict[str, Any] | None:
        """The state's "seed" entry, after making the seed store durable; None without seeds."""
        if not self._seeds:
            return None
        store = self._seed_store.commit() if self._seed_store is not None else None
        return {"origins": copy.deepcopy(self._seeds), "store": store}

    def _settings(self) -> dict[str, Any]:
        """What the state records so that a resume cannot change it."""
        return {
            "policy": self.cfg.policy,
            "capacity": self.cfg.capacity,
            "storage": self.cfg.storage,
            "visibility_lag": self.cfg.visibility_lag,
            "row_len": self.row_len,
            "token_dtype": self._dtype.name,
        }

    def _snapshot_path(self, commit: int) -> Path:
        return self._store.dir / f"policy_{commit:08d}.npz"

    def _write_snapshot(self, commit: int, horizon: int) -> dict[str, Any]:
        buf = io.BytesIO()
        np.savez(buf, **self._policy.arrays(horizon))
        data = buf.getvalue()
        path = self._snapshot_path(commit)
        atomic_write(path, data)
        return {"file": path.name, "crc": zlib.crc32(data), "bytes": len(data)}

    def _snapshots(self) -> list[tuple[int, Path]]:
        found = []
        for p in self._store.dir.iterdir():
            match = _SNAPSHOT_RE.match(p.name)
            if match:
                found.append((int(match.group(1)), p))
        return sorted(found)

    def _reclaim(self, horizon: int) -> None:
        """Delete chunks and snapshots that no checkpoint among the last keep_checkpoints (nor
        the one being written) can need."""
        rpc = self._store.rows_per_chunk
        chunks = self._policy.reclaimable(horizon, rpc, self._store.rows // rpc)
        self._store.reclaim(chunks)
        self._policy.forget_below(self._store.first_kept_row())
        oldest_kept = self._commit_no - self.cfg.keep_checkpoints
        for number, path in self._snapshots():
            if number < oldest_kept:
                path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state as of now (commits first when rows were added since)."""
        with self._lock:
            self._check_usable()
            if self._dirty or self._committed is None:
                self.commit()
            assert self._committed is not None
            state = copy.deepcopy(self._committed)
            state["version"] = STATE_VERSION  # also when the commit came from an older state
            state["counters"] = self._counters.as_dict()
            if "seed" in state:
                state["seed"]["drawn"] = list(self._seed_drawn)
            return state

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError("the checkpoint's replay state is not a cptrain replay state")
        missing = {"run_id", "rank", "commit", "last_step", "store", "policy_state", "snapshot"}
        missing -= set(state)
        if missing:
            raise CheckpointError(
                f"the checkpoint's replay state lacks {', '.join(sorted(missing))}; it is "
                "incomplete: resume from another checkpoint"
            )
        if state["run_id"] != self.run_id or state["rank"] != self.rank:
            raise CheckpointError(
                f"the checkpoint's replay state belongs to run {state['run_id']!r} rank "
                f"{state['rank']}, not run {self.run_id!r} rank {self.rank}"
            )
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ConfigError(
                    f"replay {key} is {value!r} but the checkpoint was written with "
                    f"{state.get(key)!r}; resume with the settings the run was started with"
                )

    @staticmethod
    def _saved_counters(state: dict[str, Any]) -> DrawCounters:
        version = state.get("version", 1)
        if version == 1:  # written before the counters were saved
            return DrawCounters()
        if version != STATE_VERSION:
            raise CheckpointError(
                f"the checkpoint's replay state has version {version!r} but this cptrain reads "
                f"versions 1 to {STATE_VERSION}; resume with the cptrain that wrote it"
            )
        return DrawCounters.from_state(state.get("counters"))

    def _saved_seeds(self, state: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """(origins, per-origin draw counts) of a state's "seed" entry; CheckpointError when
        malformed. No entry: the run was not seeded."""
        saved = state.get("seed")
        if saved is None:
            return [], []
        bad = CheckpointError(
            "the checkpoint's replay seed entry is malformed; resume from another checkpoint"
        )
        try:
            origins = [
                {
                    "origin": int(o["origin"]),
                    "name": str(o["name"]),
                    "offered": int(o["offered"]),
                    "first": int(o["first"]),
                    "end": int(o["end"]),
                }
                for o in saved["origins"]
            ]
            drawn = [int(k) for k in saved.get("drawn", [0] * len(origins))]
            stored = int(state["store"]["rows"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise bad from None
        edges = [e for o in origins for e in (o["first"], o["end"])]
        if (
            not origins
            or len(drawn) != len(origins)
            or min(drawn) < 0
            or edges[0] != 0
            or any(a > b for a, b in zip(edges, edges[1:], strict=False))
            or any(b["first"] != a["end"] for a, b in zip(origins, origins[1:], strict=False))
            or edges[-1] > stored
            or len({o["origin"] for o in origins}) != len(origins)
            or not all(0 <= o["origin"] <= MAX_SEED_ORIGIN for o in origins)
            or (saved.get("store") is None) != (self.cfg.storage == "copy")
        ):
            raise bad
        return origins, drawn

    def _restore_seed_store(self, saved: dict[str, Any] | None) -> None:
        """Back to the checkpoint's seed store (reference mode), or none."""
        if self._seed_store is not None:
            self._seed_store.close()
            self._seed_store = None
        if saved is None or saved.get("store") is None:
            self._drop_seed_dir()
            return
        self._open_seed_store().restore(saved["store"], verify_data=self.cfg.verify_on_resume)

    def _read_snapshot(self, snapshot: dict[str, Any] | None) -> dict[str, np.ndarray]:
        if not self.cfg.bounded:
            return {}
        if not snapshot:
            raise CheckpointError("the checkpoint's replay state has no policy snapshot")
        path = self._store.dir / snapshot["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"replay policy snapshot {path} is missing (deleted once "
                f"replay.keep_checkpoints={self.cfg.keep_checkpoints} newer checkpoints existed); "
                "resume from a more recent checkpoint"
            ) from None
        if len(data) != snapshot["bytes"] or zlib.crc32(data) != snapshot["crc"]:
            raise DataError(
                f"replay policy snapshot {path} fails its checksum (corrupt or truncated); "
                "resume from another checkpoint"
            )
        with np.load(io.BytesIO(data)) as npz:
            return {k: npz[k] for k in npz.files}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return to the checkpoint: rows written after it are discarded from disk."""
        if self._closed:
            raise RuntimeError("the replay buffer is closed")
        self._stop_prefetch()
        self._check_state(state)
        counters = self._saved_counters(state)
        seeds, seed_drawn = self._saved_seeds(state)
        with self._lock:
            arrays = self._read_snapshot(state["snapshot"])
            try:
                self._store.restore(state["store"], verify_data=self.cfg.verify_on_resume)
                self._restore_seed_store(state.get("seed"))
                for number, path in self._snapshots():
                    if number > state["commit"]:  # from a future this resume abandons
                        path.unlink(missing_ok=True)
                policy = make_policy(self.cfg.policy, self.cfg.capacity, self.seed, self.rank)
                first = self._store.first_kept_row()
                meta = self._store.iter_meta(first)
                policy.load(state["policy_state"], arrays, meta, first)
                self._check_reclaimed(policy)
            except BaseException as exc:
                self._failed = str(exc) or type(exc).__name__
                raise
            self._policy = policy
            self._last_step = int(state["last_step"])
            self._commit_no = int(state["commit"])
            self._horizons = [int(h) for h in state.get("horizons", [])]
            self._committed = copy.deepcopy(state)
            self._counters = counters
            self._seeds = seeds
            self._seed_ends = np.array([s["end"] for s in seeds], dtype=np.int64)
            self._seed_drawn = seed_drawn
            self._seeding_open = False
            self._dirty = False
            self._failed = None
            self._fresh = False

    def _check_reclaimed(self, policy: Policy) -> None:
        needed = np.unique(policy.needed_ids() // self._store.rows_per_chunk)
        gone = sorted(set(needed.tolist()) & self._store.reclaimed)
        if gone:
            raise CheckpointError(
                f"replay rows this checkpoint needs were in {self._store.data_path(gone[0])}, "
                f"deleted once replay.keep_checkpoints={self.cfg.keep_checkpoints} newer "
                "checkpoints existed; resume from a more recent checkpoint"
            )

    # ---- misc -----------------------------------------------------------------------------
    def verify(self) -> None:
        """Checksum every chunk file (one full read); DataError on the first damaged one."""
        with self._lock:
            self._check_usable()
            self._store.verify()
            if self._seed_store is not None:
                self._seed_store.verify()

    def stats(self) -> dict[str, Any]:
        """Counters for metrics.jsonl; the draw counters count per run (since the start of the
        run, across resumes), the others describe the buffer now."""
        c: dict[str, Any] = self._counters.as_dict()
        with self._lock:
            c["rows"] = len(self._policy)
            live = self._policy.live_counts(self._seed_ends) if self._seeds else None
        c["stored_rows"] = self._store.rows
        c["bytes_on_disk"] = self._store.bytes_on_disk()
        if self._seed_store is not None:
            c["bytes_on_disk"] += self._seed_store.bytes_on_disk()
        c["last_draw"] = dict(self._last_draw)
        if live is not None:
            # Only for a seeded buffer, so the metrics of other runs stay as they were.
            c["seed_rows"] = int(live.sum())  # seed rows in the buffer now
            c["rows_drawn_seed"] = sum(self._seed_drawn)  # per run, like rows_drawn
            c["seed"] = {
                s["name"]: {"origin": s["origin"], "rows": int(n), "rows_drawn": d}
                for s, n, d in zip(self._seeds, live.tolist(), self._seed_drawn, strict=True)
            }
        return c

    def close(self) -> None:
        """Stop the prefetch thread and release files; idempotent."""
        if self._closed:
            return
        self._stop_prefetch()
        self._closed = True
        self._store.close()
        if self._seed_store is not None:
            self._seed_store.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._policy)

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
