"""Crash-safe file writing: the only place that renames into place or fsyncs.

Every durable write in cptrain goes through here: a new file is written next to its target,
fsynced, renamed over it, and the directory fsynced, so a reader sees the old or the new
content, never half of it. Disk-full conditions are recognised in one place, whoever raised
them (Python, or Rust writers such as safetensors that put ``os error N`` in the message).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_OS_ERROR_CODE = re.compile(r"os error (\d+)")

# Indirection so that tests can make the disk "fill up" at an exact byte.
_write = os.write


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique path next to ``path``: renames within one directory are atomic."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_fd(fd: int) -> None:
    os.fsync(fd)


def fsync_path(path: Path) -> None:
    """Persist a file's bytes, or a directory's entries (renames, new files)."""
    path = Path(path)
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (before it is renamed into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[_write(fd, view) :]


def write_new_file(path: Path, data: bytes | memoryview, *, exclusive: bool = True) -> None:
    """Write a whole file and fsync it; used inside a temporary directory or for temp files."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` over ``path`` and persist the rename."""
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """``path`` holds the old or the new bytes, never half of them."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A file object whose content replaces ``path`` only when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def move_into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` (a file or directory) to a ``dst`` that does not exist, persisted."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def replace_dir(src: Path, dst: Path, *, aside: Path | None = None) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing any old ``dst`` as a whole.

    The old copy is first renamed to ``aside`` (default: a hidden sibling) and deleted after
    the rename, so a kill in between leaves the old or the new directory, never a mix."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = Path(aside) if aside is not None else temp_sibling(dst, "old")
        os.replace(dst, old)
        os.replace(src, dst)
        fsync_path(dst.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
        fsync_path(dst.parent)


@contextlib.contextmanager
def built_dir(out: Path, *, what: str, fix: str, tag: str = "tmp") -> Iterator[Path]:
    """A directory built at a temporary sibling of ``out`` (yielded, not yet created), fsynced
    and renamed over ``out`` when the block ends. Siblings a killed build of ``out`` left are
    removed first. On any error the half-built one is removed, and a full disk becomes one line:
    "disk full while <what> (…); <fix>"."""
    from cptrain.errors import EnvironmentProblem

    out = Path(out)
    for stale in out.parent.glob(f".{out.name}.{tag}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_sibling(out, tag)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        code = disk_full_errno(exc)
        if code:
            raise EnvironmentProblem(
                f"disk full while {what} ({os.strerror(code)}); {fix}"
            ) from None
        raise


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def disk_full_errno(exc: BaseException) -> int | None:
    """errno of a full disk / quota / size limit behind ``exc``, whoever raised it."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_FULL_ERRNOS else None
    if isinstance(exc, RuntimeError | ValueError) or type(exc).__name__ == "SafetensorError":
        match = _OS_ERROR_CODE.search(str(exc))
        if match and int(match.group(1)) in DISK_FULL_ERRNOS:
            return int(match.group(1))
    return None
