"""Admission policies: which fresh rows enter the buffer, which leave it, and which are visible.

Policies are pure in-memory bookkeeping over *physical ids* (the row's position in the
append-only store). Every row a policy keeps is written once and never overwritten; leaving the
buffer only records a death step. A row is visible to the draw of step s, with
t = s − 1 − visibility_lag, when birth ≤ t < death, i.e. it was in the buffer after the add()
of step t. That makes a draw a pure function of the history up to t, whenever it is computed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cptrain.errors import CheckpointError

NEVER = np.iinfo(np.int64).max  # death of a row still in the buffer
GONE = np.iinfo(np.int64).min  # a row nobody can see again (or whose chunk was reclaimed)

# Stream tags keep the admission and draw generators independent of each other.
TAG_ADMISSION = 0xAD31
TAG_DRAW = 0xD7A3

State = dict[str, Any]  # a policy's small, JSON-safe state
Arrays = dict[str, np.ndarray]  # its large state, saved as an .npz snapshot
Meta = Iterable[np.ndarray]  # per-row metadata (META_DTYPE), chunk by chunk


@dataclass(frozen=True)
class Admission:
    keep: np.ndarray  # bool [k]: rows to write, in order; they take consecutive physical ids


class _Grow:
    """Append-only 1-D array with amortised O(1) growth."""

    def __init__(self, dtype: Any) -> None:
        self._a = np.empty(1024, dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        k = len(values)
        if self.n + k > len(self._a):
            bigger = np.empty(max(2 * len(self._a), self.n + k), dtype=self._a.dtype)
            bigger[: self.n] = self._a[: self.n]
            self._a = bigger
        self._a[self.n : self.n + k] = values
        self.n += k

    @property
    def view(self) -> np.ndarray:
        return self._a[: self.n]


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-safe generator state (its 128-bit integers as strings)."""
    s = rng.bit_generator.state
    return {
        "state": str(s["state"]["state"]),
        "inc": str(s["state"]["inc"]),
        "has_uint32": int(s["has_uint32"]),
        "uinteger": int(s["uinteger"]),
    }


def set_rng_state(rng: np.random.Generator, saved: dict[str, Any]) -> None:
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
        "has_uint32": int(saved["has_uint32"]),
        "uinteger": int(saved["uinteger"]),
    }


def _choose(rng: np.random.Generator, population: int, n: int) -> np.ndarray:
    """min(n, population) distinct indices, uniformly at random, in random order."""
    m = min(n, population)
    if m <= 0:
        return np.empty(0, dtype=np.int64)
    return rng.choice(population, size=m, replace=False).astype(np.int64)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenation of int64 id arrays (empty for no parts)."""
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _place(slots: np.ndarray, idx: np.ndarray, handles: np.ndarray) -> np.ndarray:
    """Write handles into slots in order (last write wins); return the prior occupants."""
    if len(idx) == 0:
        return np.empty(0, dtype=np.int64)
    touched, first_in_reversed = np.unique(idx[::-1], return_index=True)
    last = len(idx) - 1 - first_in_reversed
    old = slots[touched].copy()
    slots[touched] = handles[last]
    return old[old >= 0]


def _reservoir_slots(rng: np.random.Generator, seen: int, k: int, capacity: int) -> np.ndarray:
    """Algorithm R: the i-th row ever seen takes slot i−1 while filling, afterwards slot
    j ~ U[0, i) if j < capacity (probability capacity/i). One double per row, so batching
    never changes the sequence. Returns the slot of each row (≥ capacity: rejected)."""
    ns = seen + 1 + np.arange(k, dtype=np.int64)
    u = rng.random(k)
    drawn = np.minimum(np.floor(u * ns).astype(np.int64), ns - 1)
    return np.where(ns <= capacity, ns - 1, drawn)


class Policy(ABC):
    """Admission + visibility + uniform sampling over the visible rows."""

    name: str = ""

    def __init__(self, capacity: int | None, seed: int, rank: int) -> None:
        self.capacity = capacity
        self._rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([seed, rank, TAG_ADMISSION]))
        )

    @abstractmethod
    def admit(self, tasks: np.ndarray, step: int, first_phys: int) -> Admission:
        """Offer rows (their task ids) added at `step`; kept rows get ids first_phys, …"""

    @abstractmethod
    def sample(
        self, rng: np.random.Generator, t: int, n: int, exclude_task: int | None
    ) -> np.ndarray:
        """min(n, visible) distinct physical ids, uniform over the rows visible at t."""

    @abstractmethod
    def visible_count(self, t: int, exclude_task: int | None) -> int: ...

    @abstractmethod
    def __len__(self) -> int:
        """Rows in the buffer now (as admitted, without the visibility lag)."""

    def state(self) -> State:
        """Small JSON-serialisable part of the state."""
        return {}

    def arrays(self, horizon: int) -> Arrays:
        """Large part of the state: what draws at t > horizon still need."""
        return {}

    @abstractmethod
    def load(self, state: State, arrays: Arrays, meta: Meta, first_row: int) -> None:
        """Restore from state()/arrays() and the per-row metadata of rows first_row, …
        (chunk by chunk, as the store yields it)."""

    def reclaimable(self, horizon: int, rows_per_chunk: int, n_chunks: int) -> list[int]:
        """Chunks (of the first n_chunks) that no draw at t > horizon can touch."""
        return []

    def needed_ids(self) -> np.ndarray:
        """Physical ids some future draw may read (checked against reclaimed chunks on load)."""
        return np.empty(0, dtype=np.int64)

    def compact(self, horizon: int, force: bool = False) -> None:
        """Forget what no draw at t > horizon can see (a speed-up; never changes a draw)."""
        return None

    def forget_below(self, first_row: int) -> None:
        """Rows below first_row were reclaimed."""
        return None

    @abstractmethod
    def live_ids(self) -> np.ndarray:
        """Physical ids of the rows in the buffer now."""

    def live_counts(self, ends: np.ndarray) -> np.ndarray:
        """Rows in the buffer now per id range [ends[i-1], ends[i]) (ends ascending, from 0)."""
        ends = np.asarray(ends, dtype=np.int64)
        which = np.searchsorted(ends, self.live_ids(), side="right")
        return np.bincount(which[which < len(ends)], minlength=len(ends)).astype(np.int64)


class AllPolicy(Policy):
    """Every row is kept forever (the paper). Rows arrive in step order, so the rows visible
    at t are a prefix; the index is run-length (one entry per add and per task run), which
    keeps RAM tiny even for a buffer of hundreds of GB."""

    name = "all"

    def __init__(self, capacity: int | None, seed: int, rank: int) -> None:
        super().__init__(capacity, seed, rank)
        self._reset()

    def _reset(self) -> None:
        self._add_steps = _Grow(np.int64)
        self._add_ends = _Grow(np.int64)
        self._seg_starts = _Grow(np.int64)
        self._seg_tasks = _Grow(np.int64)
        self._rows = 0

    def _index(self, steps: np.ndarray, tasks: np.ndarray, first: int) -> None:
        if len(steps) == 0:
            return
        step_change = np.flatnonzero(np.diff(steps)) + 1
        ends = np.append(step_change, len(steps)) + first
        self._add_steps.extend(steps[np.append(0, step_change)])
        self._add_ends.extend(ends)
        starts = np.append(0, np.flatnonzero(np.diff(tasks)) + 1)
        seg_tasks = tasks[starts]
        if self._seg_tasks.n and self._seg_tasks.view[-1] == seg_tasks[0]:
            starts, seg_tasks = starts[1:], seg_tasks[1:]  # continues the previous run
        self._seg_starts.extend(starts + first)
        self._seg_tasks.extend(seg_tasks)
        self._rows = first + len(steps)

    def admit(self, tasks: np.ndarray, step: int, first_phys: int) -> Admission:
        if first_phys != self._rows:
            raise RuntimeError(f"store has {first_phys} rows but the index has {self._rows}")
        tasks = np.asarray(tasks, dtype=np.int64)
        self._index(np.full(len(tasks), step, dtype=np.int64), tasks, first_phys)
        return Admission(np.ones(len(tasks), dtype=bool))

    def _prefix(self, t: int) -> int:
        i = int(np.searchsorted(self._add_steps.view, t, side="right"))
        return int(self._add_ends.view[i - 1]) if i else 0

    def _segments(self, t: int, exclude_task: int | None) -> tuple[np.ndarray, np.ndarray]:
        prefix = self._prefix(t)
        starts = self._seg_starts.view
        ends = np.append(starts[1:], self._rows)
        lengths = np.clip(np.minimum(ends, prefix) - starts, 0, None)
        if exclude_task is not None:
            lengths = np.where(self._seg_tasks.view == exclude_task, 0, lengths)
        return starts, lengths

    def visible_count(self, t: int, exclude_task: int | None) -> int:
        if exclude_task is None:
            return self._prefix(t)
        return int(self._segments(t, exclude_task)[1].sum())

    def sample(
        self, rng: np.random.Generator, t: int, n: int, exclude_task: int | None
    ) -> np.ndarray:
        if exclude_task is None:
            return _choose(rng, self._prefix(t), n)
        starts, lengths = self._segments(t, exclude_task)
        picks = _choose(rng, int(lengths.sum()), n)
        # Map the k-th eligible row (in physical order) to its id through the run lengths.
        cum = np.cumsum(lengths)
        seg = np.searchsorted(cum, picks, side="right")
        return starts[seg] + picks - (cum[seg] - lengths[seg])

    def __len__(self) -> int:
        return self._rows

    def live_ids(self) -> np.ndarray:
        return np.arange(self._rows, dtype=np.int64)

    def live_counts(self, ends: np.ndarray) -> np.ndarray:
        return np.diff(np.minimum(np.asarray(ends, dtype=np.int64), self._rows), prepend=0)

    def load(self, state: State, arrays: Arrays, meta: Meta, first_row: int) -> None:
        if first_row:
            raise CheckpointError("policy 'all' never reclaims rows, yet chunks were deleted")
        self._reset()
        for chunk in meta:
            self._index(chunk["step"].astype(np.int64), chunk["task"].astype(np.int64), self._rows)


class BoundedPolicy(Policy):
    """Policies with a capacity. Slot arrays hold physical ids (−1 = empty). Each admit first
    places provisional handles (first_phys + batch index), so a row admitted and displaced
    within the same add() is never written; survivors are then renumbered consecutively.

    Per-row birth/task/death arrays cover physical rows [base, base + n); rows below base lived
    in reclaimed chunks. Draws scan a candidate list (rows that may still be visible, refreshed
    by compact()) plus rows added since, so their cost follows the capacity, not the history.

    Everything but the slot bookkeeping lives here, state() / arrays() / load() included: a
    subclass says how it picks slots (_admit_handles), how its slots are laid out
    (_slot_arrays, _slot_sizes, _set_slot_arrays) and what it counts (_admission_state,
    _load_admission_state). state() is that count, then the admission generator's state when
    admission draws from it (uses_rng); arrays() is all slots concatenated, and the rows that
    died after the horizon.
    """

    uses_rng = True  # admission draws from self._rng, so its state is part of state()

    def __init__(self, capacity: int | None, seed: int, rank: int) -> None:
        if capacity is None or capacity < 1:
            raise ValueError(f"policy {self.name!r} needs a capacity ≥ 1")
        super().__init__(capacity, seed, rank)
        self.capacity: int = capacity
        self._base = 0
        self._birth = _Grow(np.int64)
        self._task = _Grow(np.int64)
        self._death = _Grow(np.int64)
        self._cand = np.empty(0, dtype=np.int64)
        self._cand_upto = 0

    # ---- what a subclass says -------------------------------------------------------------
    @abstractmethod
    def _admit_handles(self, tasks: np.ndarray, first_phys: int) -> np.ndarray:
        """Update slot arrays with provisional handles; return the displaced occupants."""

    @abstractmethod
    def _slot_arrays(self) -> list[np.ndarray]:
        """The slot arrays, in the order arrays() concatenates them."""

    @abstractmethod
    def _slot_sizes(self) -> list[int]:
        """Lengths of the slot arrays once _load_admission_state() has run."""

    @abstractmethod
    def _set_slot_arrays(self, slots: list[np.ndarray]) -> None:
        """Install loaded slot arrays (as many, and as long, as _slot_sizes() says)."""

    @abstractmethod
    def _admission_state(self) -> State:
        """JSON-safe counts of the rows offered (the state, less the generator's)."""

    @abstractmethod
    def _load_admission_state(self, state: State) -> None: ...

    # ---- shared ---------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self._base + self._birth.n

    def admit(self, tasks: np.ndarray, step: int, first_phys: int) -> Admission:
        if first_phys != self.rows:
            raise RuntimeError(f"store has {first_phys} rows but the index has {self.rows}")
        tasks = np.asarray(tasks, dtype=np.int64)
        k = len(tasks)
        displaced = self._admit_handles(tasks, first_phys)
        keep = np.zeros(k, dtype=bool)
        for slots in self._slot_arrays():
            keep[slots[slots >= first_phys] - first_phys] = True
        new_ids = first_phys + np.cumsum(keep) - 1
        for slots in self._slot_arrays():
            fresh = slots >= first_phys
            slots[fresh] = new_ids[slots[fresh] - first_phys]
        evicted = displaced[displaced < first_phys]
        self._death.view[evicted - self._base] = step
        n_keep = int(keep.sum())
        self._birth.extend(np.full(n_keep, step, dtype=np.int64))
        self._task.extend(tasks[keep])
        self._death.extend(np.full(n_keep, NEVER, dtype=np.int64))
        return Admission(keep)

    def compact(self, horizon: int, force: bool = False) -> None:
        """Drop candidates no draw at t > horizon can see; cheap enough to call every step
        (it only works when the rows added since the last time outnumber the candidates)."""
        if not force and self.rows - self._cand_upto <= max(1024, len(self._cand)):
            return
        self._cand = np.flatnonzero(self._death.view > horizon) + self._base
        self._cand_upto = self.rows

    def _visible_ids(self, t: int, exclude_task: int | None) -> np.ndarray:
        ids = np.concatenate([self._cand, np.arange(self._cand_upto, self.rows, dtype=np.int64)])
        rel = ids - self._base
        mask = (self._birth.view[rel] <= t) & (self._death.view[rel] > t)
        if exclude_task is not None:
            mask &= self._task.view[rel] != exclude_task
        return ids[mask]

    def visible_count(self, t: int, exclude_task: int | None) -> int:
        return len(self._visible_ids(t, exclude_task))

    def sample(
        self, rng: np.random.Generator, t: int, n: int, exclude_task: int | None
    ) -> np.ndarray:
        ids = self._visible_ids(t, exclude_task)
        return ids[_choose(rng, len(ids), n)]

    def live_ids(self) -> np.ndarray:
        return np.sort(_cat([s[s >= 0] for s in self._slot_arrays()]))

    def __len__(self) -> int:
        return int(sum(int((s >= 0).sum()) for s in self._slot_arrays()))

    def state(self) -> State:
        state = self._admission_state()
        if self.uses_rng:
            state["rng"] = rng_state(self._rng)
        return state

    def arrays(self, horizon: int) -> Arrays:
        death = self._death.view
        recent = np.flatnonzero((death > horizon) & (death != NEVER))
        return {
            "slots": _cat(self._slot_arrays()),  # a copy, even of one array
            "dead_ids": recent + self._base,
            "dead_steps": death[recent].copy(),
        }

    def load(self, state: State, arrays: Arrays, meta: Meta, first_row: int) -> None:
        self._load_admission_state(state)
        if self.uses_rng:
            set_rng_state(self._rng, state["rng"])
        flat = np.asarray(arrays["slots"], dtype=np.int64)
        sizes = self._slot_sizes()
        if flat.shape != (sum(sizes),):
            raise CheckpointError(
                f"replay state holds {flat.size} {self.name} slots but replay.capacity is "
                f"{self.capacity}; resume with the capacity the run was started with"
            )
        bounds = np.cumsum([0, *sizes])
        pairs = zip(bounds[:-1], bounds[1:], strict=True)
        self._set_slot_arrays([flat[a:b].copy() for a, b in pairs])
        self._load_rows(arrays, meta, first_row)

    def _load_rows(self, arrays: Arrays, meta: Meta, first_row: int) -> None:
        self._base = first_row
        for chunk in meta:
            self._birth.extend(chunk["step"].astype(np.int64))
            self._task.extend(chunk["task"].astype(np.int64))
        self._death.extend(np.full(self._birth.n, GONE, dtype=np.int64))
        live = self.live_ids()
        dead_ids = np.asarray(arrays["dead_ids"], dtype=np.int64)
        for ids in (live, dead_ids):
            if len(ids) and (ids.min() < self._base or ids.max() >= self.rows):
                raise CheckpointError(
                    f"replay state refers to rows outside [{self._base}, {self.rows}), the rows "
                    "still on disk; resume from a more recent checkpoint of this run"
                )
        self._death.view[live - self._base] = NEVER
        self._death.view[dead_ids - self._base] = np.asarray(arrays["dead_steps"], np.int64)
        self._cand = np.sort(np.concatenate([live, dead_ids]))
        self._cand_upto = self.rows

    def reclaimable(self, horizon: int, rows_per_chunk: int, n_chunks: int) -> list[int]:
        first = self._base // rows_per_chunk
        n = min(n_chunks, self.rows // rows_per_chunk) - first
        if n <= 0:
            return []
        deaths = self._death.view[: n * rows_per_chunk].reshape(n, rows_per_chunk)
        return [first + int(c) for c in np.flatnonzero(deaths.max(1) <= horizon)]

    def forget_below(self, first_row: int) -> None:
        """Release RAM of rows below first_row (their chunks were reclaimed)."""
        drop = first_row - self._base
        if drop <= 0:
            return
        for name in ("_birth", "_task", "_death"):
            old: _Grow = getattr(self, name)
            new = _Grow(np.int64)
            new.extend(old.view[drop:])
            setattr(self, name, new)
        self._base = first_row
        self._cand = self._cand[self._cand >= first_row]
        self._cand_upto = max(self._cand_upto, first_row)

    def needed_ids(self) -> np.ndarray:
        return np.flatnonzero(self._death.view != GONE) + self._base


class _OneSlotArrayPolicy(BoundedPolicy):
    """One array of `capacity` slots and a count of the rows seen; a subclass only says which
    slot each offered row takes (_pick_slots)."""

    def __init__(self, capacity: int | None, seed: int, rank: int) -> None:
        super().__init__(capacity, seed, rank)
        self._slots = np.full(self.capacity, -1, dtype=np.int64)
        self.seen = 0

    @abstractmethod
    def _pick_slots(self, k: int) -> np.ndarray:
        """The slot of each of the next k rows (≥ capacity: rejected), self.seen rows on."""

    def _admit_handles(self, tasks: np.ndarray, first_phys: int) -> np.ndarray:
        slot = self._pick_slots(len(tasks))
        self.seen += len(tasks)
        accepted = np.flatnonzero(slot < self.capacity)
        return _place(self._slots, slot[accepted], first_phys + accepted)

    def _slot_arrays(self) -> list[np.ndarray]:
        return [self._slots]

    def _slot_sizes(self) -> list[int]:
        return [self.capacity]

    def _set_slot_arrays(self, slots: list[np.ndarray]) -> None:
        (self._slots,) = slots

    def _admission_state(self) -> State:
        return {"seen": self.seen}

    def _load_admission_state(self, state: State) -> None:
        self.seen = int(state["seen"])


class ReservoirPolicy(_OneSlotArrayPolicy):
    """True reservoir sampling (Algorithm R): after n rows seen, each is in with prob. N/n."""

    name = "reservoir"

    def _pick_slots(self, k: int) -> np.ndarray:
        return _reservoir_slots(self._rng, self.seen, k, self.capacity)


class FifoPolicy(_OneSlotArrayPolicy):
    """The newest `capacity` rows (a ring over slots)."""

    name = "fifo"
    uses_rng = False

    def _pick_slots(self, k: int) -> np.ndarray:
        return (self.seen + np.arange(k, dtype=np.int64)) % self.capacity


class TaskBalancedPolicy(BoundedPolicy):
    """Capacity split evenly over the tasks seen (earlier tasks take the remainder); each share
    is a reservoir over its task's rows. When a new task arrives, every older share shrinks by
    dropping a uniformly random subset, which keeps it a uniform sample of its task."""

    name = "task_balanced"

    def __init__(self, capacity: int | None, seed: int, rank: int) -> None:
        super().__init__(capacity, seed, rank)
        self._order: list[int] = []
        self._slots: dict[int, np.ndarray] = {}
        self._seen: dict[int, int] = {}

    def quota(self, task: int) -> int:
        n_tasks = len(self._order)
        base, extra = divmod(self.capacity, n_tasks)
        return base + (1 if self._order.index(task) < extra else 0)

    def _new_task(self, task: int) -> np.ndarray:
        self._order.append(task)
        self._seen[task] = 0
        self._slots[task] = np.full(self.quota(task), -1, dtype=np.int64)
        dropped = []
        for old in self._order[:-1]:
            q = self.quota(old)
            slots = self._slots[old]
            live = slots[slots >= 0]
            if len(live) > q:
                keep = np.zeros(len(live), dtype=bool)
                keep[self._rng.choice(len(live), size=q, replace=False)] = True
                dropped.append(live[~keep])
                live = live[keep]
            # Filling is sequential (no holes), so the live rows stay a prefix of the slots.
            self._slots[old] = np.concatenate([live, np.full(q - len(live), -1, np.int64)])
        return _cat(dropped)

    def _admit_run(self, task: int, handles: np.ndarray) -> np.ndarray:
        q = self.quota(task)
        slot = _reservoir_slots(self._rng, self._seen[task], len(handles), q)
        self._seen[task] += len(handles)
        accepted = np.flatnonzero(slot < q)
        return _place(self._slots[task], slot[accepted], handles[accepted])

    def _admit_handles(self, tasks: np.ndarray, first_phys: int) -> np.ndarray:
        displaced = []
        bounds = np.append(np.append(0, np.flatnonzero(np.diff(tasks)) + 1), len(tasks))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            task = int(tasks[a])
            if task not in self._slots:
                displaced.append(self._new_task(task))
            handles = first_phys + np.arange(a, b, dtype=np.int64)
            displaced.append(self._admit_run(task, handles))
        return _cat(displaced)

    def _slot_arrays(self) -> list[np.ndarray]:
        return [self._slots[t] for t in self._order]

    def _slot_sizes(self) -> list[int]:
        return [self.quota(t) for t in self._order]

    def _set_slot_arrays(self, slots: list[np.ndarray]) -> None:
        self._slots = dict(zip(self._order, slots, strict=True))

    def _admission_state(self) -> State:
        return {"order": list(self._order), "seen": [self._seen[t] for t in self._order]}

    def _load_admission_state(self, state: State) -> None:
        self._order = [int(t) for t in state["order"]]
        self._seen = {t: int(n) for t, n in zip(self._order, state["seen"], strict=True)}


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (AllPolicy, ReservoirPolicy, FifoPolicy, TaskBalancedPolicy)
}


def make_policy(name: str, capacity: int | None, seed: int, rank: int) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown replay policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](capacity, seed, rank)
