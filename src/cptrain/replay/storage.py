"""Append-only chunk files of replay rows, per-row metadata, and a manifest.

Layout of one rank's directory:
  manifest.json          run id, layout, committed rows, checksums of sealed chunks (atomic)
  chunk_000000.rows      rows_per_chunk records: tokens (copy) or a window index (reference)
  chunk_000000.meta      one META_DTYPE record per row: step, task, CRC-32 of the row's tokens

Rows are only ever appended, so everything a checkpoint refers to stays byte-identical until a
resume truncates what came after it. Each open chunk carries a running CRC-32 whose value at
the committed length goes into the checkpoint; sealed chunks have theirs in the manifest; and
each row's own CRC is checked whenever it is read, so a damaged row is never replayed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptrain import fsutil
from cptrain.errors import CheckpointError, ConfigError, DataError, EnvironmentProblem

META_DTYPE = np.dtype([("step", "<i8"), ("task", "<i4"), ("crc", "<u4")])
MANIFEST = "manifest.json"
FORMAT = "cptrain-replay-store"
VERSION = 1
_CHUNK_RE = re.compile(r"^chunk_(\d{6,})\.(rows|meta)$")
_AFTER_DAMAGE = "resume from an earlier checkpoint or start again with an empty replay.dir"
_VERIFY_BLOCK = 64 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def row_crcs(tokens: np.ndarray) -> np.ndarray:
    """CRC-32 of each row of a C-contiguous [n, row_len] token array (in its storage dtype)."""
    tokens = np.ascontiguousarray(tokens)
    return np.fromiter((zlib.crc32(r) for r in tokens), dtype=np.uint32, count=len(tokens))


def os_problem(err: OSError, path: Path) -> EnvironmentProblem:
    if err.errno in fsutil.DISK_FULL_ERRNOS:
        return EnvironmentProblem(
            f"disk full while writing {path} ({err.strerror}); free space or move replay.dir, "
            "then resume from the last checkpoint"
        )
    return EnvironmentProblem(
        f"cannot write {path} ({err.strerror}); check that replay.dir is writable and has space"
    )


def _write_all(fd: int, data: memoryview | bytes, path: Path) -> None:
    try:
        fsutil.write_all(fd, data)
    except OSError as err:
        raise os_problem(err, path) from None


def atomic_write(path: Path, data: bytes) -> None:
    """``path`` holds the old or the new bytes, never half of them (see fsutil)."""
    try:
        fsutil.atomic_write_bytes(path, data)
    except OSError as err:
        raise os_problem(err, path) from None


def file_crc(path: Path, nbytes: int) -> int:
    """CRC-32 of the first nbytes of a file, read in blocks."""
    crc = 0
    with open(path, "rb") as f:
        while nbytes > 0:
            block = f.read(min(nbytes, _VERIFY_BLOCK))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            nbytes -= len(block)
    return crc


@dataclass(frozen=True)
class Layout:
    storage: str  # "copy" | "reference"
    token_dtype: str  # "uint16" | "uint32"
    row_len: int  # seq_len + 1 token ids per training row

    @property
    def record_dtype(self) -> np.dtype:
        return np.dtype(self.token_dtype) if self.storage == "copy" else np.dtype("<i8")

    @property
    def width(self) -> int:
        return self.row_len if self.storage == "copy" else 1

    @property
    def record_bytes(self) -> int:
        return self.width * self.record_dtype.itemsize


# ---- read-only checks (shared by ChunkStore and `cptrain doctor`) ---------------------------
def chunk_path(directory: Path, chunk: int, kind: str) -> Path:
    """A chunk's file: kind "rows" (records) or "meta" (per-row metadata)."""
    return Path(directory) / f"chunk_{chunk:06d}.{kind}"


@dataclass(frozen=True)
class Manifest:
    """What a rank's manifest says about its chunks."""

    rows_per_chunk: int
    sealed: dict[int, tuple[int, int]]  # chunk → (data CRC, meta CRC) of a full chunk
    reclaimed: set[int]  # chunks deleted because no kept checkpoint needs them


def _manifest_missing(directory: Path) -> DataError:
    return DataError(f"replay manifest {Path(directory) / MANIFEST} is missing; {_AFTER_DAMAGE}")


def read_manifest(directory: Path, layout: Layout, *, run_id: str, rank: int) -> Manifest:
    """Read a rank's manifest and check that it belongs to this run, rank and layout."""
    where = Path(directory) / MANIFEST
    try:
        m = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(
            f"replay manifest {where} is unreadable or not JSON; {_AFTER_DAMAGE}"
        ) from None
    keys = {"format", "run_id", "rank", "storage", "token_dtype", "row_len", "rows_per_chunk"}
    if not isinstance(m, dict) or m.get("format") != FORMAT or keys - set(m):
        raise DataError(
            f"{where} is not a cptrain replay manifest; point replay.dir at an empty or "
            "cptrain-made directory"
        )
    if m["run_id"] != run_id:
        raise ConfigError(
            f"replay.dir {Path(directory).parent} belongs to run {m['run_id']!r}, not to this "
            f"run ({run_id!r}); choose another replay.dir or delete that directory"
        )
    if m["rank"] != rank:
        raise DataError(f"{where} belongs to rank {m['rank']}, not {rank}; {_AFTER_DAMAGE}")
    if m["storage"] != layout.storage:
        raise ConfigError(
            f"{where}: the buffer was written with replay.storage={m['storage']} but this "
            f"run uses {layout.storage}; keep the setting the run was started with"
        )
    if m["row_len"] != layout.row_len:
        raise DataError(
            f"{where}: buffer rows hold {m['row_len']} tokens but this run's rows hold "
            f"{layout.row_len} (seq_len + 1); use a fresh replay.dir for another seq_len"
        )
    if m["token_dtype"] != layout.token_dtype:
        raise DataError(
            f"{where}: buffer tokens are {m['token_dtype']} but this run's vocabulary needs "
            f"{layout.token_dtype}; use a fresh replay.dir for another tokenizer"
        )
    rpc = m["rows_per_chunk"]
    if not isinstance(rpc, int) or rpc < 1:
        raise DataError(f"{where}: rows_per_chunk is {rpc!r}; {_AFTER_DAMAGE}")
    try:
        sealed = {int(c): (int(d), int(e)) for c, (d, e) in m["sealed"].items()}
        reclaimed = {int(c) for c in m["reclaimed"]}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{where}: sealed/reclaimed lists are malformed; {_AFTER_DAMAGE}") from None
    return Manifest(rpc, sealed, reclaimed)


def _store_position(state: dict[str, Any]) -> tuple[int, tuple[int, int]]:
    """(rows, (data CRC, meta CRC) of the open chunk) of a checkpoint's store state."""
    try:
        return int(state["rows"]), (int(state["data_crc"]), int(state["meta_crc"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            "the checkpoint's replay state is incomplete (its store position is malformed); "
            "resume from another checkpoint"
        ) from None


def _require_size(path: Path, expected: int, exact_per: Path | None) -> None:
    """At least `expected` bytes; exactly, when exact_per (the manifest) fixes the size."""
    try:
        found = path.stat().st_size
    except FileNotFoundError:
        raise DataError(
            f"replay chunk file {path} is missing (expected {expected} bytes); {_AFTER_DAMAGE}"
        ) from None
    if found < expected:
        raise DataError(
            f"replay chunk file {path} is truncated (expected {expected} bytes, found "
            f"{found}); {_AFTER_DAMAGE}"
        )
    if exact_per is not None and found != expected:
        raise DataError(
            f"replay chunk file {path} holds {found} bytes but {exact_per} says {expected} "
            f"(manifest and chunk files disagree); {_AFTER_DAMAGE}"
        )


def _require_crc(path: Path, nbytes: int, expected: int) -> None:
    if file_crc(path, nbytes) != expected:
        raise DataError(
            f"replay chunk file {path} fails its checksum (corrupt bytes); {_AFTER_DAMAGE}"
        )


def _chunks_to_check(
    directory: Path, manifest: Manifest, rows: int, crcs: tuple[int, int]
) -> Iterator[tuple[int, int, tuple[int, int], bool]]:
    """(chunk, rows, CRCs, sealed) of each chunk holding some of the first `rows` rows and
    still on disk, in order; raises (when reached) on one the manifest cannot vouch for."""
    full, rest = divmod(rows, manifest.rows_per_chunk)
    for c in range(full):
        if c in manifest.reclaimed:
            continue  # the policy checks that nothing it needs lived there
        if c not in manifest.sealed:
            raise DataError(
                f"{directory / MANIFEST} has no checksum for chunk "
                f"{chunk_path(directory, c, 'rows').name}, which the checkpoint counts as full "
                f"(manifest and chunks disagree); {_AFTER_DAMAGE}"
            )
        yield c, manifest.rows_per_chunk, manifest.sealed[c], True
    if rest:
        if full in manifest.reclaimed:
            raise CheckpointError(
                f"the checkpoint's open replay chunk {chunk_path(directory, full, 'rows')} was "
                "deleted; resume from a more recent checkpoint"
            )
        yield full, rest, crcs, False


def check_chunks(
    directory: Path,
    layout: Layout,
    manifest: Manifest,
    rows: int,
    crcs: tuple[int, int],
    *,
    verify_data: bool,
) -> None:
    """Read-only: the first `rows` rows are on disk and intact. Sealed chunks must match the
    manifest's size and CRCs (of the data file only when verify_data), the open chunk's prefix
    the running CRCs `crcs` (always both). Raises DataError / CheckpointError naming the first
    bad file; the order of the checks is that of the files."""
    directory = Path(directory)
    for chunk, n, (data_crc, meta_crc), sealed in _chunks_to_check(directory, manifest, rows, crcs):
        data, meta = chunk_path(directory, chunk, "rows"), chunk_path(directory, chunk, "meta")
        data_bytes, meta_bytes = n * layout.record_bytes, n * META_DTYPE.itemsize
        exact_per = directory / MANIFEST if sealed else None
        _require_size(data, data_bytes, exact_per)
        _require_size(meta, meta_bytes, exact_per)
        _require_crc(meta, meta_bytes, meta_crc)
        if verify_data or not sealed:
            _require_crc(data, data_bytes, data_crc)


def check_store(
    directory: Path, layout: Layout, state: dict[str, Any], *, run_id: str, rank: int
) -> None:
    """Read-only check of one rank's directory against a checkpoint's store state (what
    ChunkStore.commit() returned): the checks a resume makes before it changes anything, with
    every data checksum. Raises the error the resume would raise."""
    if not (Path(directory) / MANIFEST).is_file():
        raise _manifest_missing(directory)
    manifest = read_manifest(directory, layout, run_id=run_id, rank=rank)
    rows, crcs = _store_position(state)
    check_chunks(directory, layout, manifest, rows, crcs, verify_data=True)


class ChunkStore:
    """One rank's append-only row store. Not thread-safe for writers (one trainer thread);
    reads of rows already appended may come from any thread."""

    def __init__(
        self, directory: Path, layout: Layout, *, run_id: str, rank: int, chunk_bytes: int
    ) -> None:
        self.dir = Path(directory)
        self.layout = layout
        self.run_id = run_id
        self.rank = rank
        self.manifest_path = self.dir / MANIFEST
        self._map_lock = threading.Lock()
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._fds: tuple[int, int] | None = None
        self._broken: str | None = None
        self.rows = 0
        self._sealed: dict[int, tuple[int, int]] = {}
        self._reclaimed: set[int] = set()
        self._crcs = (0, 0)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise os_problem(err, self.dir) from None
        for pattern in (".*.tmp-*", ".*.tmp"):  # left by a crash inside atomic_write
            for tmp in self.dir.glob(pattern):
                tmp.unlink(missing_ok=True)
        # Rows already in an existing directory count only once a checkpoint's state is
        # restored; a writer that starts without one starts from an empty buffer.
        self._pending_reset = self.manifest_path.exists()
        if self._pending_reset:
            m = read_manifest(self.dir, layout, run_id=run_id, rank=rank)
            self.rows_per_chunk = m.rows_per_chunk
            self._sealed, self._reclaimed = m.sealed, m.reclaimed
        else:
            if self._chunk_files():
                raise _manifest_missing(self.dir)
            self.rows_per_chunk = max(1, chunk_bytes // layout.record_bytes)
            self._write_manifest()

    # ---- manifest -------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        m = {
            "format": FORMAT,
            "version": VERSION,
            "run_id": self.run_id,
            "rank": self.rank,
            "storage": self.layout.storage,
            "token_dtype": self.layout.token_dtype,
            "row_len": self.layout.row_len,
            "rows_per_chunk": self.rows_per_chunk,
            "rows": self.rows,
            "sealed": {str(c): list(v) for c, v in sorted(self._sealed.items())},
            "reclaimed": sorted(self._reclaimed),
        }
        atomic_write(self.manifest_path, (json.dumps(m, indent=1) + "\n").encode())

    # ---- paths ----------------------------------------------------------------------------
    def data_path(self, chunk: int) -> Path:
        return chunk_path(self.dir, chunk, "rows")

    def meta_path(self, chunk: int) -> Path:
        return chunk_path(self.dir, chunk, "meta")

    def _chunk_files(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.dir.iterdir():
            match = _CHUNK_RE.match(p.name)
            if match:
                found.append((int(match.group(1)), p))
        return sorted(found)

    def locate(self, row: int) -> tuple[Path, int]:
        """(data file, row within it) of a physical row, for error messages."""
        chunk, local = divmod(int(row), self.rows_per_chunk)
        return self.data_path(chunk), local

    def _chunk_rows(self, chunk: int) -> int:
        full, rest = divmod(self.rows, self.rows_per_chunk)
        return self.rows_per_chunk if chunk < full else rest if chunk == full else 0

    # ---- writing --------------------------------------------------------------------------
    @property
    def reclaimed(self) -> set[int]:
        return set(self._reclaimed)

    def ensure_writable(self) -> None:
        """Refuse after a write failure; start empty if no checkpoint state was restored."""
        if self._pending_reset:
            self.reset()
        if self._broken:
            raise EnvironmentProblem(
                f"the replay buffer in {self.dir} stopped after an earlier write failure "
                f"({self._broken}); resume from the last checkpoint"
            )

    def _open_fds(self) -> tuple[int, int]:
        if self._fds is None:
            chunk = self.rows // self.rows_per_chunk
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            paths = (self.data_path(chunk), self.meta_path(chunk))
            fds = []
            try:
                for p in paths:
                    fds.append(os.open(p, flags, 0o644))
            except OSError as err:
                for fd in fds:
                    os.close(fd)
                raise os_problem(err, p) from None
            self._fds = (fds[0], fds[1])
        return self._fds

    def _close_fds(self, sync: bool) -> None:
        if self._fds is None:
            return
        fds, self._fds = self._fds, None
        try:
            if sync:
                for fd in fds:
                    fsutil.fsync_fd(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def append(self, records: np.ndarray, meta: np.ndarray) -> None:
        """Append rows (records [k, width] in the record dtype; meta [k] META_DTYPE)."""
        self.ensure_writable()
        records = np.ascontiguousarray(records, dtype=self.layout.record_dtype)
        meta = np.ascontiguousarray(meta, dtype=META_DTYPE)
        if records.shape != (len(meta), self.layout.width):
            raise ValueError(f"records {records.shape} do not match meta ({len(meta)} rows)")
        try:
            done = 0
            while done < len(meta):
                done += self._append_some(records[done:], meta[done:])
        except (EnvironmentProblem, OSError) as err:
            self._broken = str(err)
            if isinstance(err, OSError):
                raise os_problem(err, self.dir) from None
            raise

    def _append_some(self, records: np.ndarray, meta: np.ndarray) -> int:
        chunk, used = divmod(self.rows, self.rows_per_chunk)
        take = min(self.rows_per_chunk - used, len(meta))
        data, rows_meta = records[:take], meta[:take]
        fd_data, fd_meta = self._open_fds()
        _write_all(fd_data, data.data, self.data_path(chunk))
        _write_all(fd_meta, rows_meta.data, self.meta_path(chunk))
        self._crcs = (
            zlib.crc32(data.data, self._crcs[0]),
            zlib.crc32(rows_meta.data, self._crcs[1]),
        )
        self.rows += take
        if self.rows % self.rows_per_chunk == 0:
            # Sealed: durable now, its checksums go into the manifest at the next commit.
            self._close_fds(sync=True)
            self._sealed[chunk] = self._crcs
            self._crcs = (0, 0)
        return take

    def commit(self) -> dict[str, int]:
        """Make every appended row durable and the manifest current; return the store state."""
        self.ensure_writable()
        try:
            if self._fds is not None:
                for fd in self._fds:
                    fsutil.fsync_fd(fd)
            self._write_manifest()
        except OSError as err:
            raise os_problem(err, self.dir) from None
        return {"rows": self.rows, "data_crc": self._crcs[0], "meta_crc": self._crcs[1]}

    def reset(self) -> None:
        """Forget every row (a fresh run over a directory this run id already used)."""
        self.restore({"rows": 0, "data_crc": 0, "meta_crc": 0}, verify_data=False)

    def reclaim(self, chunks: list[int]) -> None:
        """Delete sealed chunks that nothing restorable refers to (manifest first)."""
        chunks = [c for c in chunks if c in self._sealed and c not in self._reclaimed]
        if not chunks:
            return
        self._reclaimed.update(chunks)
        self._write_manifest()
        with self._map_lock:
            for c in chunks:
                self._maps.pop(c, None)
        for c in chunks:
            self.data_path(c).unlink(missing_ok=True)
            self.meta_path(c).unlink(missing_ok=True)

    # ---- restoring ------------------------------------------------------------------------
    def _check_rows(self, rows: int, crcs: tuple[int, int], verify_data: bool) -> None:
        manifest = Manifest(self.rows_per_chunk, self._sealed, self._reclaimed)
        check_chunks(self.dir, self.layout, manifest, rows, crcs, verify_data=verify_data)

    def restore(self, state: dict[str, Any], *, verify_data: bool) -> None:
        """Return to the committed state of a checkpoint: check what it refers to (read-only,
        see check_chunks), then drop every row written after it."""
        rows, crcs = _store_position(state)
        self._check_rows(rows, crcs, verify_data)
        self._truncate_to(rows, crcs)

    def _truncate_to(self, rows: int, crcs: tuple[int, int]) -> None:
        self._close_fds(sync=False)
        with self._map_lock:
            self._maps.clear()
        full, rest = divmod(rows, self.rows_per_chunk)
        try:
            for chunk, path in self._chunk_files():
                if chunk > full or (chunk == full and rest == 0):
                    path.unlink()
                elif chunk == full:
                    per_row = (
                        self.layout.record_bytes if path.suffix == ".rows" else META_DTYPE.itemsize
                    )
                    os.truncate(path, rest * per_row)
        except OSError as err:
            raise os_problem(err, self.dir) from None
        self.rows = rows
        self._crcs = crcs
        self._sealed = {c: v for c, v in self._sealed.items() if c < full}
        self._reclaimed = {c for c in self._reclaimed if c < full}
        self._broken = None
        self._pending_reset = False
        self._write_manifest()

    def first_kept_row(self) -> int:
        """First row of the first chunk not reclaimed (everything before it is gone)."""
        chunk = 0
        while chunk in self._reclaimed:
            chunk += 1
        return min(chunk * self.rows_per_chunk, self.rows)

    def iter_meta(self, first_row: int = 0) -> Iterator[np.ndarray]:
        """Per-row metadata from first_row (a chunk boundary) on, chunk by chunk, with
        placeholders for reclaimed chunks."""
        first_chunk = first_row // self.rows_per_chunk
        for chunk in range(first_chunk, -(-self.rows // self.rows_per_chunk)):
            n = self._chunk_rows(chunk)
            if chunk in self._reclaimed:
                gone = np.zeros(n, dtype=META_DTYPE)
                gone["step"], gone["task"] = np.iinfo(np.int64).min, -1
                yield gone
            else:
                yield np.fromfile(self.meta_path(chunk), dtype=META_DTYPE, count=n)

    def verify(self) -> None:
        """Checksum every chunk file against the manifest / running checksums."""
        if self._fds is not None:
            for fd in self._fds:
                fsutil.fsync_fd(fd)
        self._check_rows(self.rows, self._crcs, verify_data=True)

    # ---- reading --------------------------------------------------------------------------
    def _maps_for(self, chunk: int, need: int) -> tuple[np.ndarray, np.ndarray]:
        with self._map_lock:
            cached = self._maps.get(chunk)
            if cached is not None and len(cached[0]) >= need:
                return cached
            if chunk in self._reclaimed:
                raise CheckpointError(
                    f"replay chunk {self.data_path(chunk)} was reclaimed but a draw needs it; "
                    "resume from a more recent checkpoint"
                )
            n = self._chunk_rows(chunk)
            paths = (self.data_path(chunk), self.meta_path(chunk))
            try:
                data = np.memmap(
                    paths[0], self.layout.record_dtype, "r", shape=(n, self.layout.width)
                )
                meta = np.memmap(paths[1], META_DTYPE, "r", shape=(n,))
            except (OSError, ValueError):
                raise DataError(
                    f"replay chunk file {paths[0]} (or its .meta) is missing or shorter than its "
                    f"{n} rows; {_AFTER_DAMAGE}"
                ) from None
            # Plain ndarray views (they keep the mapping alive) index faster than np.memmap.
            self._maps[chunk] = (np.asarray(data), np.asarray(meta))
            return self._maps[chunk]

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Records [m, width] and metadata [m] of the given physical rows, in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return (
                np.empty((0, self.layout.width), dtype=self.layout.record_dtype),
                np.empty(0, dtype=META_DTYPE),
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.rows:
            raise IndexError(f"row ids outside [0, {self.rows})")
        rpc = self.rows_per_chunk
        if lo // rpc == hi // rpc:  # one chunk: the common case for small draws
            chunk = lo // rpc
            data, meta = self._maps_for(chunk, hi - chunk * rpc + 1)
            local = ids - chunk * rpc
            return data[local], meta[local]
        records = np.empty((len(ids), self.layout.width), dtype=self.layout.record_dtype)
        meta_out = np.empty(len(ids), dtype=META_DTYPE)
        chunks = ids // rpc
        for chunk in np.unique(chunks):
            sel = np.flatnonzero(chunks == chunk)
            local = ids[sel] - int(chunk) * rpc
            data, meta = self._maps_for(int(chunk), int(local.max()) + 1)
            records[sel] = data[local]
            meta_out[sel] = meta[local]
        return records, meta_out

    def bytes_on_disk(self) -> int:
        total = 0
        for _, path in self._chunk_files():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._close_fds(sync=False)
        with self._map_lock:
            self._maps.clear()
