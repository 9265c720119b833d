"""The replay buffer's checkpoint state: what a commit records, the checks a resume makes on a
state, the commit history that decides what may be reclaimed, and the policy snapshot files
(policy_<commit>.npz) a state refers to.

A bounded policy's "slot → row" map and recent evictions are written at commit() to
policy_<commit>.npz next to the chunks; the state records that file's name, size and CRC.

State versions: 2 adds "counters" (the draw counters of stats(), so they count per run, not per
process); a version-1 state loads with them at zero.

This lives apart from buffer.py so that the format of a checkpoint, which must never change by
accident, is read in one place, and the buffer keeps to adding and drawing rows.
"""

from __future__ import annotations

import copy
import io
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.errors import CheckpointError, ConfigError, DataError
from cptrain.replay.config import ReplayConfig
from cptrain.replay.policies import Policy
from cptrain.replay.prefetch import DrawCounters
from cptrain.replay.storage import ChunkStore, atomic_write

STATE_FORMAT = "cptrain-replay"
STATE_VERSION = 2
_SNAPSHOT_RE = re.compile(r"^policy_(\d{8,})\.npz$")


def resume_settings(cfg: ReplayConfig, *, row_len: int, token_dtype: str) -> dict[str, Any]:
    """What the state records so that a resume cannot change it."""
    return {
        "policy": cfg.policy,
        "capacity": cfg.capacity,
        "storage": cfg.storage,
        "visibility_lag": cfg.visibility_lag,
        "row_len": row_len,
        "token_dtype": token_dtype,
    }


def committed_state(
    header: dict[str, Any],
    *,
    commit: int,
    last_step: int,
    rows: int,
    store: dict[str, Any],
    policy_state: Any,
    snapshot: dict[str, Any] | None,
    horizons: list[int],
    seed: dict[str, Any] | None,
) -> dict[str, Any]:
    """The state of one commit. header: run_id, rank, world_size and the settings a resume
    must not change. The key order is the one checkpoints have always been written with."""
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        **header,
        "commit": commit,
        "last_step": last_step,
        "rows": rows,
        "store": store,
        "policy_state": policy_state,
        "snapshot": snapshot,
        "horizons": list(horizons),
    }
    if seed is not None:
        state["seed"] = seed
    return state


def run_state(
    committed: dict[str, Any], counters: DrawCounters, seed_drawn: list[int]
) -> dict[str, Any]:
    """What state_dict() returns: the last commit's state with the per-run draw counts."""
    state = copy.deepcopy(committed)
    state["version"] = STATE_VERSION  # also when the commit came from an older state
    state["counters"] = counters.as_dict()
    if "seed" in state:
        state["seed"]["drawn"] = list(seed_drawn)
    return state


def check_state(state: dict[str, Any], *, run_id: str, rank: int, settings: dict[str, Any]) -> None:
    """CheckpointError unless `state` is a complete replay state of this run and rank;
    ConfigError when it was written with other settings."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError("the checkpoint's replay state is not a cptrain replay state")
    missing = {"run_id", "rank", "commit", "last_step", "store", "policy_state", "snapshot"}
    missing -= set(state)
    if missing:
        raise CheckpointError(
            f"the checkpoint's replay state lacks {', '.join(sorted(missing))}; it is "
            "incomplete: resume from another checkpoint"
        )
    if state["run_id"] != run_id or state["rank"] != rank:
        raise CheckpointError(
            f"the checkpoint's replay state belongs to run {state['run_id']!r} rank "
            f"{state['rank']}, not run {run_id!r} rank {rank}"
        )
    for key, value in settings.items():
        if state.get(key) != value:
            raise ConfigError(
                f"replay {key} is {value!r} but the checkpoint was written with "
                f"{state.get(key)!r}; resume with the settings the run was started with"
            )


def saved_counters(state: dict[str, Any]) -> DrawCounters:
    version = state.get("version", 1)
    if version == 1:  # written before the counters were saved
        return DrawCounters()
    if version != STATE_VERSION:
        raise CheckpointError(
            f"the checkpoint's replay state has version {version!r} but this cptrain reads "
            f"versions 1 to {STATE_VERSION}; resume with the cptrain that wrote it"
        )
    return DrawCounters.from_state(state.get("counters"))


def check_reclaimed(policy: Policy, store: ChunkStore, *, keep_checkpoints: int) -> None:
    """CheckpointError when rows the restored policy needs were in chunks already reclaimed."""
    needed = np.unique(policy.needed_ids() // store.rows_per_chunk)
    gone = sorted(set(needed.tolist()) & store.reclaimed)
    if gone:
        raise CheckpointError(
            f"replay rows this checkpoint needs were in {store.data_path(gone[0])}, "
            f"deleted once replay.keep_checkpoints={keep_checkpoints} newer "
            "checkpoints existed; resume from a more recent checkpoint"
        )


class PolicySnapshots:
    """The policy_<commit>.npz files in one rank's directory."""

    def __init__(self, directory: Path, *, keep_checkpoints: int) -> None:
        self.dir = directory
        self._keep = keep_checkpoints  # only for the message of a missing snapshot

    def path(self, commit: int) -> Path:
        return self.dir / f"policy_{commit:08d}.npz"

    def write(self, commit: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Write the snapshot of `commit`; returns the state's "snapshot" entry."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        path = self.path(commit)
        atomic_write(path, data)
        return {"file": path.name, "crc": zlib.crc32(data), "bytes": len(data)}

    def listed(self) -> list[tuple[int, Path]]:
        """(commit, path) of every snapshot on disk, oldest first."""
        found = []
        for p in self.dir.iterdir():
            match = _SNAPSHOT_RE.match(p.name)
            if match:
                found.append((int(match.group(1)), p))
        return sorted(found)

    def delete(self, doomed: Callable[[int], bool]) -> None:
        """Delete the snapshots whose commit number `doomed` accepts."""
        for number, path in self.listed():
            if doomed(number):
                path.unlink(missing_ok=True)

    def read(self, snapshot: dict[str, Any] | None) -> dict[str, np.ndarray]:
        """The arrays of a state's "snapshot" entry, checked against its size and CRC."""
        if not snapshot:
            raise CheckpointError("the checkpoint's replay state has no policy snapshot")
        path = self.dir / snapshot["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"replay policy snapshot {path} is missing (deleted once "
                f"replay.keep_checkpoints={self._keep} newer checkpoints existed); "
                "resume from a more recent checkpoint"
            ) from None
        if len(data) != snapshot["bytes"] or zlib.crc32(data) != snapshot["crc"]:
            raise DataError(
                f"replay policy snapshot {path} fails its checksum (corrupt or truncated); "
                "resume from another checkpoint"
            )
        with np.load(io.BytesIO(data)) as npz:
            return {k: npz[k] for k in npz.files}


class CommitLog:
    """The buffer's commits: how many there were, the draw horizons of the newest
    keep_checkpoints + 1 (the oldest bounds what the kept checkpoints can still need), the
    newest one's state, and (bounded policies) the policy snapshot each one wrote."""

    def __init__(self, directory: Path, *, keep_checkpoints: int, bounded: bool) -> None:
        self.snapshots = PolicySnapshots(directory, keep_checkpoints=keep_checkpoints)
        self._keep = keep_checkpoints
        self._bounded = bounded
        self.number = 0
        self.horizons: list[int] = []
        self.state: dict[str, Any] | None = None

    def record(
        self,
        header: dict[str, Any],
        *,
        horizon: int,
        last_step: int,
        policy: Policy,
        store: dict[str, Any],
        seed: dict[str, Any] | None,
    ) -> None:
        """Write the next commit's snapshot and make its state the newest (store and seed: the
        entries of the already durable stores)."""
        snapshot = None
        if self._bounded:
            snapshot = self.snapshots.write(self.number + 1, policy.arrays(horizon))
        self.number += 1
        self.horizons = [*self.horizons, horizon][-(self._keep + 1) :]
        self.state = committed_state(
            header,
            commit=self.number,
            last_step=last_step,
            rows=len(policy),
            store=store,
            policy_state=policy.state(),
            snapshot=snapshot,
            horizons=self.horizons,
            seed=seed,
        )

    def reclaim_horizon(self) -> int | None:
        """Rows only draws up to this horizon could need are no longer needed by any kept
        checkpoint; None until keep_checkpoints + 1 commits exist."""
        return self.horizons[0] if len(self.horizons) > self._keep else None

    def drop_old_snapshots(self) -> None:
        oldest_kept = self.number - self._keep
        self.snapshots.delete(lambda number: number < oldest_kept)

    def read_snapshot(self, snapshot: dict[str, Any] | None) -> dict[str, np.ndarray]:
        """The policy arrays a state refers to (none for an unbounded policy)."""
        return self.snapshots.read(snapshot) if self._bounded else {}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue after the commit `state` was written at."""
        self.number = int(state["commit"])
        self.horizons = [int(h) for h in state.get("horizons", [])]
        self.state = copy.deepcopy(state)
