"""cptrain.fsutil: crash-safe writes (old or new content, never half), directory swaps, and
the one place that recognises a full disk."""

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cptrain import fsutil
from cptrain.errors import EnvironmentProblem


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def fill_after(monkeypatch: pytest.MonkeyPatch, limit: int, code: int = errno.ENOSPC) -> None:
    """Make the disk "fill up" once ``limit`` bytes went through ``fsutil.write_all``."""
    written = [0]
    real = os.write

    def write(fd: int, data) -> int:
        room = limit - written[0]
        if room <= 0:
            raise OSError(code, os.strerror(code))
        n = real(fd, bytes(data[:room]))
        written[0] += n
        return n

    monkeypatch.setattr(fsutil, "_write", write)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------- temp files
def test_temp_sibling_is_hidden_unique_and_beside_its_target(tmp_path):
    target = tmp_path / "sub" / "file.json"
    a, b = fsutil.temp_sibling(target), fsutil.temp_sibling(target, "old")
    assert a.parent == b.parent == target.parent
    assert a.name.startswith(".file.json.tmp-") and b.name.startswith(".file.json.old-")
    assert a != fsutil.temp_sibling(target)


def test_write_all_writes_every_byte_of_short_writes(tmp_path, monkeypatch):
    real = os.write
    calls = []

    def three_at_a_time(fd: int, data) -> int:
        calls.append(len(data))
        return real(fd, bytes(data[:3]))

    monkeypatch.setattr(fsutil, "_write", three_at_a_time)
    data = bytes(range(256)) * 2
    fsutil.write_new_file(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data
    assert len(calls) == -(-len(data) // 3)


def test_write_new_file_is_exclusive_unless_told_otherwise(tmp_path):
    f = tmp_path / "f"
    fsutil.write_new_file(f, b"first")
    with pytest.raises(FileExistsError):
        fsutil.write_new_file(f, b"second")
    assert f.read_bytes() == b"first"
    fsutil.write_new_file(f, b"2nd", exclusive=False)
    assert f.read_bytes() == b"2nd"  # truncated, not overwritten in place


# ------------------------------------------------------------------------- atomic writes
def test_atomic_write_bytes_creates_and_replaces(tmp_path, umask_022):
    f = tmp_path / "f.bin"
    fsutil.atomic_write_bytes(f, b"old content")
    fsutil.atomic_write_bytes(f, memoryview(b"new"))
    assert f.read_bytes() == b"new"
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert names(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("limit", [0, 5])
def test_atomic_write_bytes_keeps_the_old_file_when_the_disk_fills(tmp_path, monkeypatch, limit):
    f = tmp_path / "f.bin"
    f.write_bytes(b"old content")
    fill_after(monkeypatch, limit)
    with pytest.raises(OSError) as info:
        fsutil.atomic_write_bytes(f, b"new content that does not fit")
    assert info.value.errno == errno.ENOSPC
    assert f.read_bytes() == b"old content"
    assert names(tmp_path) == ["f.bin"]  # the half-written temporary file is gone


def test_atomic_write_bytes_cleans_up_when_interrupted(tmp_path, monkeypatch):
    def interrupted(fd: int, data) -> int:
        raise KeyboardInterrupt

    f = tmp_path / "f.bin"
    f.write_bytes(b"old")
    monkeypatch.setattr(fsutil, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fsutil.atomic_write_bytes(f, b"new")
    assert f.read_bytes() == b"old"
    assert names(tmp_path) == ["f.bin"]


def test_atomic_write_json_is_sorted_indented_utf8_and_newline_terminated(tmp_path):
    f = tmp_path / "x.json"
    fsutil.atomic_write_json(f, {"b": 1, "a": "é"})
    text = f.read_text(encoding="utf-8")
    assert text == '{\n  "a": "é",\n  "b": 1\n}\n'
    assert json.loads(text) == {"a": "é", "b": 1}


def test_atomic_write_text_round_trips(tmp_path):
    fsutil.atomic_write_text(tmp_path / "t.txt", "ünïcode\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ünïcode\n"


def test_atomic_writer_replaces_only_when_the_block_succeeds(tmp_path, umask_022):
    f = tmp_path / "deep" / "er" / "f.bin"  # parents are created
    with fsutil.atomic_writer(f) as fh:
        fh.write(b"one")
        assert not f.exists()  # nothing visible before the block ends
    assert f.read_bytes() == b"one"
    assert stat.S_IMODE(f.stat().st_mode) == 0o644

    with pytest.raises(RuntimeError, match="boom"), fsutil.atomic_writer(f) as fh:
        fh.write(b"two, half written")
        raise RuntimeError("boom")
    assert f.read_bytes() == b"one"
    assert names(f.parent) == ["f.bin"]


def test_atomic_writer_honours_mode(tmp_path, umask_022):
    f = tmp_path / "secret"
    with fsutil.atomic_writer(f, mode=0o600) as fh:
        fh.write(b"x")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- directories
def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_replace_dir_into_an_empty_place(tmp_path):
    src = _tree(tmp_path / "src", {"a": b"1", "sub/b": b"2"})
    fsutil.replace_dir(src, tmp_path / "dst")
    assert not src.exists()
    assert (tmp_path / "dst" / "sub" / "b").read_bytes() == b"2"


def test_replace_dir_replaces_the_old_directory_as_a_whole(tmp_path):
    old = _tree(tmp_path / "dst", {"stale": b"old", "a": b"old a"})
    src = _tree(tmp_path / "src", {"a": b"new a"})
    fsutil.replace_dir(src, old)
    assert names(old) == ["a"]  # no file of the old copy survives
    assert (old / "a").read_bytes() == b"new a"
    assert names(tmp_path) == ["dst"]  # the old copy, moved aside, is deleted


def test_replace_dir_uses_and_removes_the_given_aside_path(tmp_path):
    _tree(tmp_path / "dst", {"x": b"old"})
    src = _tree(tmp_path / "src", {"x": b"new"})
    aside = tmp_path / ".aside"
    fsutil.replace_dir(src, tmp_path / "dst", aside=aside)
    assert not aside.exists()
    assert (tmp_path / "dst" / "x").read_bytes() == b"new"


def test_move_into_place(tmp_path):
    src = _tree(tmp_path / "src", {"x": b"1"})
    fsutil.move_into_place(src, tmp_path / "dst")
    assert names(tmp_path) == ["dst"]
    assert (tmp_path / "dst" / "x").read_bytes() == b"1"


def test_fsync_tree_and_sha256_file(tmp_path):
    _tree(tmp_path / "t", {"a": b"abc", "s/b": b""})
    fsutil.fsync_tree(tmp_path / "t")  # files and directories alike
    assert fsutil.sha256_file(tmp_path / "t" / "a") == hashlib.sha256(b"abc").hexdigest()


def test_built_dir_swaps_in_the_finished_directory(tmp_path):
    out = _tree(tmp_path / "out", {"stale": b"old"})
    with fsutil.built_dir(out, what="building out", fix="retry") as tmp:
        assert tmp.parent == out.parent and not tmp.exists()  # yielded, not created
        _tree(tmp, {"new": b"1"})
        assert names(out) == ["stale"]  # the old one stays until the block ends
    assert names(out) == ["new"]
    assert names(tmp_path) == ["out"]


def test_built_dir_removes_its_half_built_directory_and_keeps_the_old_one(tmp_path):
    out = _tree(tmp_path / "out", {"keep": b"old"})
    with pytest.raises(ValueError, match="bad"), fsutil.built_dir(out, what="w", fix="f") as tmp:
        _tree(tmp, {"half": b"1"})
        raise ValueError("bad")
    assert names(out) == ["keep"]
    assert names(tmp_path) == ["out"]


def test_built_dir_removes_what_a_killed_build_left(tmp_path):
    killed = _tree(tmp_path / ".out.tmp-123-abcdef01", {"half": b"1"})
    other = _tree(tmp_path / ".other.tmp-123-abcdef01", {"x": b"1"})  # another target's
    with fsutil.built_dir(tmp_path / "out", what="w", fix="f") as tmp:
        assert not killed.exists()
        _tree(tmp, {"x": b"1"})
    assert other.exists()
    assert names(tmp_path) == [".other.tmp-123-abcdef01", "out"]


def test_built_dir_turns_a_full_disk_into_one_line(tmp_path, monkeypatch):
    out = _tree(tmp_path / "out", {"keep": b"old"})
    fill_after(monkeypatch, 10)
    with (
        pytest.raises(EnvironmentProblem) as info,
        fsutil.built_dir(out, what="exporting out", fix="free space") as tmp,
    ):
        tmp.mkdir()
        fsutil.write_new_file(tmp / "weights", b"x" * 100)
    assert str(info.value) == (
        f"disk full while exporting out ({os.strerror(errno.ENOSPC)}); free space"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert names(out) == ["keep"]
    assert names(tmp_path) == ["out"]


def test_built_dir_recognises_a_full_disk_met_by_safetensors(tmp_path):
    """A real write past a file-size limit (EFBIG, "os error 27" in the Rust error) inside
    ``built_dir``; in a child process, because the limit applies to the whole process."""
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from pathlib import Path
        import numpy as np
        from safetensors.numpy import save_file
        from cptrain import fsutil
        from cptrain.errors import EnvironmentProblem

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        out = Path(sys.argv[1])
        try:
            with fsutil.built_dir(out, what="writing weights", fix="free space") as tmp:
                tmp.mkdir()
                save_file({"w": np.zeros(10_000, dtype=np.float32)}, str(tmp / "w.safetensors"))
        except EnvironmentProblem as exc:
            print(exc)
        """
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"disk full while writing weights ({os.strerror(errno.EFBIG)}); free space"
    )
    assert names(tmp_path) == []


# ------------------------------------------------------------------------------ disk full
class SafetensorError(Exception):
    """Stands in for safetensors' Rust exception, recognised by its class name."""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
        (OSError(errno.EFBIG, "File too large"), errno.EFBIG),
        (OSError(errno.EACCES, "Permission denied"), None),
        (FileNotFoundError(errno.ENOENT, "gone"), None),
        (RuntimeError("Error while serializing: No space left on device (os error 28)"), 28),
        (ValueError("write failed (os error 122)"), errno.EDQUOT),
        (SafetensorError("I/O error: File too large (os error 27)"), 27),
        (RuntimeError("Permission denied (os error 13)"), None),
        (KeyError("(os error 28)"), None),  # only the error types Rust writers raise
        (RuntimeError("out of memory"), None),
    ],
)
def test_disk_full_errno(exc, expected):
    assert fsutil.disk_full_errno(exc) == expected
