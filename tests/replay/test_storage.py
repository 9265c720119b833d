"""replay/storage.py: the chunk files, their manifest and checksums. A damaged, missing or
disagreeing file is caught with a one-line error naming it; a full disk or a torn append keeps
the last checkpoint good; the read-only check finds what a resume refuses."""

import errno
import json
import os
import resource
import signal

import numpy as np
import pytest
from conftest import flip

from cptrain import fsutil
from cptrain.errors import DataError, EnvironmentProblem
from cptrain.replay.storage import Layout, check_store
from replay.test_faults import (
    ROW_LEN,
    RUN,
    assert_all_genuine,
    checkpointed,
    chunk,
    make,
    one_line,
    rank_dir,
    rows_of,
    train,
)


def test_truncated_sealed_chunk(tmp_path):
    state = checkpointed(tmp_path)
    path = chunk(tmp_path, 0)
    os.truncate(path, path.stat().st_size - 7)
    with pytest.raises(DataError) as err:
        make(tmp_path).load_state_dict(state)
    assert str(path) in one_line(err) and "truncated" in str(err.value)


def test_truncated_open_chunk(tmp_path):
    state = checkpointed(tmp_path)
    os.truncate(chunk(tmp_path, 2), 5 * ROW_LEN * 2)  # the checkpoint counts 20 rows in it
    with pytest.raises(DataError) as err:
        make(tmp_path).load_state_dict(state)
    assert str(chunk(tmp_path, 2)) in one_line(err) and "truncated" in str(err.value)


def test_missing_chunk(tmp_path):
    state = checkpointed(tmp_path)
    chunk(tmp_path, 1, "meta").unlink()
    with pytest.raises(DataError) as err:
        make(tmp_path).load_state_dict(state)
    assert str(chunk(tmp_path, 1, "meta")) in one_line(err)


@pytest.mark.parametrize("target", [(0, "rows"), (1, "meta"), (2, "rows"), (2, "meta")])
def test_flipped_byte_is_caught_on_resume(tmp_path, target):
    state = checkpointed(tmp_path)
    path = chunk(tmp_path, *target)
    flip(path, 3 * ROW_LEN * 2 + 1)
    with pytest.raises(DataError) as err:
        make(tmp_path).load_state_dict(state)
    assert str(path) in one_line(err) and "checksum" in str(err.value)


def test_manifest_and_chunks_disagree(tmp_path):
    state = checkpointed(tmp_path)
    with open(chunk(tmp_path, 0), "ab") as f:  # a sealed chunk longer than the manifest says
        f.write(b"\0" * ROW_LEN * 2)
    with pytest.raises(DataError) as err:
        make(tmp_path).load_state_dict(state)
    assert str(chunk(tmp_path, 0)) in one_line(err) and "disagree" in str(err.value)


def test_manifest_missing_a_sealed_chunk(tmp_path):
    state = checkpointed(tmp_path)
    manifest = rank_dir(tmp_path) / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["sealed"]["1"]
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError) as err:
        make(tmp_path).load_state_dict(state)
    assert str(manifest) in one_line(err)


def test_manifest_lost_or_garbled(tmp_path):
    checkpointed(tmp_path)
    manifest = rank_dir(tmp_path) / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(DataError) as err:
        make(tmp_path)
    assert str(manifest) in one_line(err)
    manifest.unlink()
    with pytest.raises(DataError) as err:
        make(tmp_path)
    assert str(rank_dir(tmp_path)) in one_line(err)


def test_disk_full_while_appending_keeps_the_last_checkpoint_good(tmp_path, monkeypatch):
    _, reference = train(make(tmp_path / "ref"), range(40))  # the uninterrupted run's draws
    buf = make(tmp_path)
    state, _ = train(buf, range(20), checkpoint_at=19)
    budget = {"bytes": 3 * ROW_LEN * 2 + 5}  # room for 3 rows and a bit of the 4th

    def filling_write(fd, data):
        n = min(len(data), budget["bytes"])
        budget["bytes"] -= n
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, bytes(data[:n]))

    monkeypatch.setattr(fsutil, "_write", filling_write)
    with pytest.raises(EnvironmentProblem) as err:
        train(buf, range(20, 30))
    assert "disk full" in one_line(err) and str(chunk(tmp_path, 2)) in str(err.value)
    for call in (lambda: buf.add(rows_of(21), task_id=0, step=21),
                 lambda: buf.draw(21, 2, current_task=0), buf.commit, buf.state_dict):
        with pytest.raises(EnvironmentProblem):
            call()
    monkeypatch.undo()
    buf.close()
    resumed = make(tmp_path)
    resumed.load_state_dict(state)
    _, again = train(resumed, range(20, 40))
    assert all(np.array_equal(again[s], reference[s]) for s in range(20, 40))


def test_disk_full_for_real_via_the_file_size_limit(tmp_path):
    buf = make(tmp_path, chunk_mb=1.0)
    state, _ = train(buf, range(10), checkpoint_at=9)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (chunk(tmp_path, 0).stat().st_size + 200, hard))
    try:
        with pytest.raises(EnvironmentProblem) as err:
            train(buf, range(10, 20))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "disk full" in one_line(err) and str(chunk(tmp_path, 0)) in str(err.value)
    buf.close()
    resumed = make(tmp_path, chunk_mb=1.0)
    resumed.load_state_dict(state)
    assert_all_genuine(resumed.draw(100, 1000, current_task=0))
    assert len(resumed) == 50


def test_disk_full_while_writing_the_manifest(tmp_path, monkeypatch):
    buf = make(tmp_path)
    state, _ = train(buf, range(10), checkpoint_at=9)
    manifest = rank_dir(tmp_path) / "manifest.json"
    before = manifest.read_bytes()
    train(buf, range(10, 15))

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil, "_write", full)
    with pytest.raises(EnvironmentProblem) as err:
        buf.commit()
    assert str(manifest) in one_line(err)
    monkeypatch.undo()
    assert manifest.read_bytes() == before
    assert not [p for p in rank_dir(tmp_path).iterdir() if ".tmp" in p.name]
    resumed = make(tmp_path)
    resumed.load_state_dict(state)
    assert len(resumed) == 50


def test_kill_in_the_middle_of_an_append(tmp_path):
    buf = make(tmp_path)
    state, _ = train(buf, range(22), checkpoint_at=19)
    _, reference = train(make(tmp_path / "ref"), range(30))
    # the process dies half-way through writing a row: a torn record at the end of each file
    with open(chunk(tmp_path, 2), "ab") as f:
        f.write(b"\x07" * 5)
    with open(chunk(tmp_path, 2, "meta"), "ab") as f:
        f.write(b"\x07" * 3)
    resumed = make(tmp_path)
    resumed.load_state_dict(state)
    assert chunk(tmp_path, 2).stat().st_size == 20 * ROW_LEN * 2
    _, again = train(resumed, range(20, 30))
    assert all(np.array_equal(again[s], reference[s]) for s in range(20, 30))


def _lengthen_sealed_1(tmp_path):
    with open(chunk(tmp_path, 1), "ab") as f:
        f.write(b"\0" * 4)


def _drop_sealed_1(tmp_path):
    manifest = rank_dir(tmp_path) / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["sealed"]["1"]
    manifest.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "plant",
    [
        lambda t: os.truncate(chunk(t, 0), 7),
        lambda t: os.truncate(chunk(t, 2, "meta"), 16),
        lambda t: chunk(t, 1, "meta").unlink(),
        lambda t: flip(chunk(t, 0), 11),
        lambda t: flip(chunk(t, 2), 11),
        _lengthen_sealed_1,
        _drop_sealed_1,
        lambda t: (rank_dir(t) / "manifest.json").unlink(),
        lambda t: (rank_dir(t) / "manifest.json").write_text("{not json"),
    ],
    ids=["sealed truncated", "open meta truncated", "meta missing", "sealed flipped",
         "open flipped", "sealed too long", "no checksum", "manifest missing", "manifest garbled"],
)
def test_read_only_check_finds_what_a_resume_refuses(tmp_path, plant):
    state = checkpointed(tmp_path)
    layout = Layout("copy", "uint16", ROW_LEN)
    check_store(rank_dir(tmp_path), layout, state["store"], run_id=RUN, rank=0)  # intact
    plant(tmp_path)
    files = {p.name: p.read_bytes() for p in rank_dir(tmp_path).iterdir()}
    with pytest.raises(DataError) as found:
        check_store(rank_dir(tmp_path), layout, state["store"], run_id=RUN, rank=0)
    assert {p.name: p.read_bytes() for p in rank_dir(tmp_path).iterdir()} == files
    with pytest.raises(DataError) as refused:
        make(tmp_path).load_state_dict(state)
    assert one_line(found) == one_line(refused)

