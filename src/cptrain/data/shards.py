"""Flat token shards: writing them crash-safely and reading training windows through np.memmap.

A split directory holds ``shard_00000.bin``, ``shard_00001.bin``, ... (raw little-endian uint16
when the vocabulary fits, else uint32; every document's tokens followed by EOS, and preceded by
BOS when the manifest has a ``bos_id``; a document may continue in the next file) and
``manifest.json``. The directory is built under a hidden temporary
name, the manifest is written last and the directory is renamed into place, so a split that has a
manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptrain import fsutil
from cptrain.errors import DataError

FORMAT = "cptrain-shards-v1"
MANIFEST = "manifest.json"
DEFAULT_MAX_TOKENS_PER_FILE = 250_000_000
_FLUSH_TOKENS = 1 << 20
_RERUN = "re-run `cptrain prepare`"


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Append tokenized documents; ``close()`` publishes the split directory with its manifest."""

    def __init__(
        self,
        out_dir: Path,
        vocab_size: int,
        eos_id: int,
        tokenizer_sha256: str,
        max_tokens_per_file: int = DEFAULT_MAX_TOKENS_PER_FILE,
        bos_id: int | None = None,
    ) -> None:
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        if bos_id is not None and not 0 <= bos_id < vocab_size:
            raise ValueError(f"bos_id {bos_id} is outside the vocabulary [0, {vocab_size})")
        if max_tokens_per_file < 1:
            raise ValueError(f"max_tokens_per_file must be >= 1, got {max_tokens_per_file}")
        self.out_dir = Path(out_dir)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.tokenizer_sha256 = tokenizer_sha256
        self.max_tokens_per_file = max_tokens_per_file
        self.dtype = shard_dtype(vocab_size)
        self.num_tokens = 0
        self.num_documents = 0
        self._eos = np.array([eos_id], dtype=self.dtype)
        self._bos = None if bos_id is None else np.array([bos_id], dtype=self.dtype)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._files: list[dict[str, Any]] = []
        self._fh: Any = None
        self._hasher: Any = None
        self._closed = False
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = fsutil.temp_sibling(self.out_dir)
        self._tmp.mkdir()

    def append(self, ids: np.ndarray | Sequence[int]) -> None:
        """Add one document's token ids; BOS (if any) and EOS are added here, not by the
        caller."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"expected a 1-D integer array of ids, got {arr.dtype} {arr.shape}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise DataError(
                f"token id {int(arr.max())} or {int(arr.min())} is outside the vocabulary "
                f"[0, {self.vocab_size}); the tokenizer and vocab_size disagree"
            )
        if self._bos is not None:
            self._pending.append(self._bos)
            self._pending_tokens += 1
        self._pending += [arr.astype(self.dtype, copy=False), self._eos]
        self._pending_tokens += arr.size + 1
        self.num_documents += 1
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()

    def close(self) -> dict[str, Any]:
        """Finish the files, write the manifest last and move the split into place."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        try:
            self._flush()
            self._end_file()
            manifest = self._manifest()
            fsutil.atomic_write_json(self._tmp / MANIFEST, manifest)
            fsutil.fsync_path(self._tmp)
            fsutil.replace_dir(self._tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; the final directory is left untouched."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def _manifest(self) -> dict[str, Any]:
        manifest = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "tokenizer_sha256": self.tokenizer_sha256,
            "files": self._files,
        }
        if self.bos_id is not None:  # absent: no BOS (manifests without BOS stay as they were)
            manifest["bos_id"] = self.bos_id
        return manifest

    def _flush(self) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending)
        self._pending, self._pending_tokens = [], 0
        while data.size:
            if self._fh is None:
                self._start_file()
            room = self.max_tokens_per_file - self._files[-1]["num_tokens"]
            part, data = data[:room], data[room:]
            raw = part.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._fh.write(raw)
            self._hasher.update(raw)
            self._files[-1]["num_tokens"] += int(part.size)
            self.num_tokens += int(part.size)
            if self._files[-1]["num_tokens"] == self.max_tokens_per_file:
                self._end_file()

    def _start_file(self) -> None:
        name = f"shard_{len(self._files):05d}.bin"
        self._fh = open(self._tmp / name, "wb")  # noqa: SIM115 - closed in _end_file
        self._hasher = hashlib.sha256()
        self._files.append({"name": name, "num_tokens": 0, "sha256": ""})

    def _end_file(self) -> None:
        if self._fh is None:
            return
        self._fh.flush()
        fsutil.fsync_fd(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self._files[-1]["sha256"] = self._hasher.hexdigest()


class ShardSet:
    """A prepared split opened read-only; windows never straddle two files."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        self.num_tokens: int = m["num_tokens"]
        self.num_documents: int = m["num_documents"]
        self.vocab_size: int = m["vocab_size"]
        self.eos_id: int = m["eos_id"]
        self.bos_id: int | None = m.get("bos_id")
        self.tokenizer_sha256: str = m["tokenizer_sha256"]
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.verify(full=False)
        counts = np.array([f["num_tokens"] for f in m["files"]], dtype=np.int64)
        self._file_starts = np.concatenate([[0], np.cumsum(counts)])
        self._maps = [
            np.memmap(self.path / f["name"], dtype=self.dtype, mode="r", shape=(f["num_tokens"],))
            if f["num_tokens"] else np.empty(0, dtype=self.dtype)
            for f in m["files"]
        ]
        self._window_cache: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}

    @property
    def files(self) -> list[dict[str, Any]]:
        """The manifest's file entries: name, num_tokens, sha256."""
        return [dict(f) for f in self.manifest["files"]]

    def num_windows(self, window_len: int) -> int:
        """Non-overlapping windows of ``window_len`` tokens; DataError when there are none."""
        starts, _ = self._windows_index(window_len)
        return int(starts[-1])

    def window(self, i: int, window_len: int) -> np.ndarray:
        return self.windows([i], window_len)[0]

    def windows(self, indices: Sequence[int] | np.ndarray, window_len: int) -> np.ndarray:
        """Rows ``indices`` of the window table as an int64 array of shape [n, window_len]."""
        starts, views = self._windows_index(window_len)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= starts[-1]):
            raise IndexError(f"window index out of range [0, {int(starts[-1])})")
        if len(views) == 1:
            return np.asarray(views[0][idx], dtype=np.int64)
        out = np.empty((idx.size, window_len), dtype=np.int64)
        file_of = np.searchsorted(starts, idx, side="right") - 1
        for f in np.unique(file_of):
            mask = file_of == f
            out[mask] = views[f][idx[mask] - starts[f]]
        return out

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the concatenated stream, as int64."""
        if start < 0 or n < 0 or start + n > self.num_tokens:
            raise IndexError(f"read({start}, {n}) is outside [0, {self.num_tokens})")
        parts = []
        f = int(np.searchsorted(self._file_starts, start, side="right")) - 1
        pos, end = start, start + n
        while pos < end:
            local = pos - int(self._file_starts[f])
            take = min(end - pos, len(self._maps[f]) - local)
            parts.append(self._maps[f][local : local + take])
            pos += take
            f += 1
        return np.asarray(np.concatenate(parts), dtype=np.int64) if parts else np.empty(0, np.int64)

    def verify(self, full: bool = False) -> None:
        """Quick: every file exists with the right size. Full: also its sha256."""
        itemsize = self.dtype.itemsize
        for f in self.manifest["files"]:
            file = self.path / f["name"]
            if not file.is_file():
                raise DataError(f"shard file {file} is missing; {_RERUN}")
            expected, found = f["num_tokens"] * itemsize, file.stat().st_size
            if found != expected:
                raise DataError(
                    f"shard file {file} is truncated (expected {expected} bytes, found {found}); "
                    f"{_RERUN}"
                )
            if full:
                with open(file, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
                if digest != f["sha256"]:
                    raise DataError(f"shard file {file} is corrupt (sha256 mismatch); {_RERUN}")

    def _windows_index(self, window_len: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Cumulative window counts per file and each file's [n, window_len] view (cached)."""
        cached = self._window_cache.get(window_len)
        if cached is not None:
            return cached
        if int(window_len) != window_len or window_len < 1:
            raise ValueError(f"window_len must be a positive integer, got {window_len}")
        counts = [len(mm) // window_len for mm in self._maps]
        if sum(counts) == 0:
            # name: "<task> <split>" from open_split, so the message names the split at fault
            task, _, split = (self.name or "").partition(" ")
            who = f"task {task}: its {split} split" if split else (
                f"task {task}" if task else f"shards {self.path}")
            more = "validation text" if split == "val" else "data"
            raise DataError(
                f"{who} has {self.num_tokens} tokens, fewer than one window of {window_len} "
                f"(train.seq_len + 1); lower train.seq_len or add {more}"
            )
        views = [
            mm[: c * window_len].reshape(c, window_len)
            for mm, c in zip(self._maps, counts, strict=True)
        ]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._window_cache[window_len] = (starts, views)
        return starts, views

    def __getstate__(self) -> dict[str, Any]:
        # Reopen the memmaps in a child process instead of pickling their contents.
        return {"path": self.path, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["name"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ShardSet({str(self.path)!r}, tokens={self.num_tokens}, files={len(self._maps)})"


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        why = "does not exist" if not path.exists() else f"has no {MANIFEST} (incomplete)"
        raise DataError(f"token shard directory {path} {why}; {_RERUN}")
    try:
        m = json.loads(file.read_text(encoding="utf-8"))
        _check_manifest(m)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{file} is malformed ({exc}); {_RERUN}") from None
    return m


def _check_manifest(m: Any) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"format is not {FORMAT}")
    if m["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"unknown dtype {m['dtype']!r}")
    for key in ("num_tokens", "num_documents", "vocab_size", "eos_id"):
        if not isinstance(m[key], int) or m[key] < 0:
            raise ValueError(f"{key} is not a non-negative integer")
    bos = m.get("bos_id")
    if bos is not None and (not isinstance(bos, int) or not 0 <= bos < m["vocab_size"]):
        raise ValueError("bos_id is not a token id of the vocabulary")
    if not isinstance(m["tokenizer_sha256"], str):
        raise ValueError("tokenizer_sha256 is not a string")
    for f in m["files"]:
        if Path(f["name"]).name != f["name"] or not isinstance(f["num_tokens"], int):
            raise ValueError(f"bad file entry {f!r}")
    if sum(f["num_tokens"] for f in m["files"]) != m["num_tokens"]:
        raise ValueError("file token counts do not add up to num_tokens")
