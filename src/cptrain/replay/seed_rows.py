"""Seed rows of a replay buffer (replay.seed): their task ids, their bookkeeping and their store.

ReplayBuffer.add_seed() puts rows that stand in for data the run does not have into the buffer
before the first add(). They are rows like any other for the policy, admitted at step SEED_STEP
(before every draw's horizon, so the draw of step 0 already sees them), and tagged in the
per-row metadata with task id seed_task_id(origin) = −2 − origin (negative: never a trained
task, so replay_from: previous_tasks still replays them; −1 marks rows of reclaimed chunks).
In copy mode their tokens are ordinary records. In reference mode they are not windows of any
task's shards, so their tokens go to a copy-mode store of their own (rank_<r>/seed/) and the
main store records their index in it. A state with seed rows has a "seed" entry (origins, that
store's position, per-origin draw counts); a state without one has no seed rows, so states,
files and draws of a buffer that is never seeded are exactly what they were without seeding.

This lives apart from buffer.py because seeding only matters at a fresh start, in a
checkpoint's "seed" entry and in stats(): the draw path only asks which origin an id came from
and, in reference mode, where a seed row's tokens are.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.errors import CheckpointError
from cptrain.replay.storage import ChunkStore, Layout

SEED_STEP = -(1 << 62)  # admission step of seed rows: visible to every draw
SEED_DIR = "seed"  # reference mode: the seed rows' own copy-mode store, inside rank_<r>/
_FIRST_SEED_TASK = -2  # task id of seed origin 0; origin k is −2 − k
MAX_SEED_ORIGIN = np.iinfo(np.int32).max - 1  # −2 − origin stays an int32 (META "task")


def seed_task_id(origin: int) -> int:
    """The META task id of seed rows of `origin` (0, 1, …): −2 − origin."""
    if not 0 <= origin <= MAX_SEED_ORIGIN:
        raise ValueError(f"seed origin {origin} must be in [0, {MAX_SEED_ORIGIN}]")
    return _FIRST_SEED_TASK - origin


def seed_origin(task_id: int) -> int | None:
    """The seed origin of a META task id, None for a trained task's id."""
    return _FIRST_SEED_TASK - task_id if task_id <= _FIRST_SEED_TASK else None


class SeedRows:
    """The seed rows of one rank's buffer: the id range [first, end) each add_seed() call
    filled, how many rows of each origin the run drew, and (reference mode) their token store.

    Not locked itself: the buffer calls it under its own lock, except for the draw counts,
    which only the thread that calls draw() updates (like the buffer's DrawCounters)."""

    def __init__(
        self,
        directory: Path,
        *,
        token_dtype: str,
        row_len: int,
        run_id: str,
        rank: int,
        chunk_bytes: int,
    ) -> None:
        self.dir = directory
        self._layout = Layout("copy", token_dtype, row_len)
        self._run_id = run_id
        self._rank = rank
        self._chunk_bytes = chunk_bytes
        self.origins: list[dict[str, Any]] = []  # one per add_seed() call, in call order
        self.ends = np.empty(0, dtype=np.int64)  # each origin's "end", for searchsorted
        self.drawn: list[int] = []  # per origin, counted per run like the draw counters
        self.store: ChunkStore | None = None  # reference mode only
        self.accepting = True  # until the first add(), start_prefetch() or resume

    @property
    def seeded(self) -> bool:
        return bool(self.origins)

    # ---- seeding --------------------------------------------------------------------------
    def check_accepting(self) -> None:
        if not self.accepting:
            raise RuntimeError(
                "add_seed() must come before the first add() and start_prefetch(), on a fresh "
                "start; a resumed buffer gets its seed rows from the checkpoint"
            )

    def label(self, origin: int, name: str | None) -> str:
        """The stats() name of a new origin; ValueError when the origin was seeded already."""
        if any(s["origin"] == origin for s in self.origins):
            raise ValueError(f"seed origin {origin} was seeded already")
        name = name or f"seed{origin}"
        if any(s["name"] == name for s in self.origins):
            name = f"{name}#{origin}"  # names key stats(): two `self` sources stay apart
        return name

    def record(self, *, origin: int, name: str, offered: int, first: int, end: int) -> None:
        """Note one add_seed() call, whose kept rows got the ids [first, end)."""
        self.origins.append(
            {"origin": origin, "name": name, "offered": offered, "first": first, "end": end}
        )
        self.ends = np.array([s["end"] for s in self.origins], dtype=np.int64)
        self.drawn.append(0)

    def open_store(self) -> ChunkStore:
        if self.store is None:
            self.store = ChunkStore(
                self.dir,
                self._layout,
                run_id=self._run_id,
                rank=self._rank,
                chunk_bytes=self._chunk_bytes,
            )
        return self.store

    def drop_dir(self) -> None:
        """Delete a seed store this buffer does not use (left by an abandoned attempt)."""
        if self.store is None and self.dir.exists():
            shutil.rmtree(self.dir)

    # ---- drawing --------------------------------------------------------------------------
    def counts(self, ids: np.ndarray) -> np.ndarray | None:
        """Drawn seed rows per origin. Seed rows precede every other row, each origin's kept
        rows in one consecutive id range, so an id says where it came from."""
        if not self.origins:
            return None
        ends = self.ends
        which = np.searchsorted(ends, ids[ids < ends[-1]], side="right")
        return np.bincount(which, minlength=len(ends)).astype(np.int64)

    def count_drawn(self, counts: np.ndarray) -> None:
        for i, k in enumerate(counts.tolist()):
            self.drawn[i] += k

    def read_tokens(self, index: np.ndarray) -> np.ndarray:
        """Tokens of seed rows by their index in the seed store; IndexError when it does not
        hold them (the caller knows which main-store row pointed there)."""
        if self.store is None:
            raise IndexError("no seed store")
        return self.store.read(index)[0]

    # ---- checkpoints ----------------------------------------------------------------------
    def commit(self) -> dict[str, Any] | None:
        """The state's "seed" entry, after making the seed store durable; None without seeds."""
        if not self.origins:
            return None
        store = self.store.commit() if self.store is not None else None
        return {"origins": copy.deepcopy(self.origins), "store": store}

    def restore_store(self, saved: dict[str, Any] | None, *, verify_data: bool) -> None:
        """Back to the checkpoint's seed store (reference mode), or none."""
        if self.store is not None:
            self.store.close()
            self.store = None
        if saved is None or saved.get("store") is None:
            self.drop_dir()
            return
        self.open_store().restore(saved["store"], verify_data=verify_data)

    def load(self, origins: list[dict[str, Any]], drawn: list[int]) -> None:
        """Take the origins and draw counts of a checkpoint (see saved_seeds)."""
        self.origins = origins
        self.ends = np.array([s["end"] for s in origins], dtype=np.int64)
        self.drawn = drawn
        self.accepting = False

    # ---- misc -----------------------------------------------------------------------------
    def stats(self, live: np.ndarray) -> dict[str, Any]:
        """The seed part of stats(), given the live seed rows per origin."""
        return {
            "seed_rows": int(live.sum()),  # seed rows in the buffer now
            "rows_drawn_seed": sum(self.drawn),  # per run, like rows_drawn
            "seed": {
                s["name"]: {"origin": s["origin"], "rows": int(n), "rows_drawn": d}
                for s, n, d in zip(self.origins, live.tolist(), self.drawn, strict=True)
            },
        }

    def verify(self) -> None:
        if self.store is not None:
            self.store.verify()

    def bytes_on_disk(self) -> int:
        return self.store.bytes_on_disk() if self.store is not None else 0

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def saved_seeds(state: dict[str, Any], *, storage: str) -> tuple[list[dict[str, Any]], list[int]]:
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
        or (saved.get("store") is None) != (storage == "copy")
    ):
        raise bad
    return origins, drawn
