"""Planted faults: each is caught with a one-line error naming the file, no garbage is ever
replayed, and the last good checkpoint stays usable. The helpers here are shared with
test_storage.py (faults in chunk files and the manifest) and test_rows.py (damaged rows)."""

import json

import numpy as np
import pytest
from conftest import flip

from cptrain.errors import CheckpointError, DataError
from cptrain.replay.buffer import ReplayBuffer
from cptrain.replay.config import ReplayConfig

ROW_LEN, VOCAB, N_FRESH, ROWS_PER_CHUNK = 9, 30_000, 5, 40
RUN = "run-f"


def rows_of(step: int, task: int = 0) -> np.ndarray:
    rows = np.random.default_rng(step).integers(0, VOCAB, (N_FRESH, ROW_LEN))
    rows[:, 0], rows[:, 1] = step, np.arange(N_FRESH)
    return rows


ALL_ROWS = {(s, i): tuple(rows_of(s)[i]) for s in range(200) for i in range(N_FRESH)}


def make(path, *, row_len=ROW_LEN, shards=None, **cfg) -> ReplayBuffer:
    cfg.setdefault("chunk_mb", ROWS_PER_CHUNK * ROW_LEN * 2 / 2**20)
    cfg.setdefault("visibility_lag", 0)
    resolver = None
    if shards is not None:
        cfg["storage"] = "reference"
        resolver = lambda task, w: shards[task][w]  # noqa: E731
    return ReplayBuffer(ReplayConfig(**cfg), path, row_len=row_len, vocab_size=VOCAB, seed=3,
                        run_id=RUN, resolver=resolver)


def train(buf, steps, checkpoint_at=None):
    state, draws = None, {}
    for s in steps:
        draws[s] = buf.draw(s, 4, current_task=0)
        buf.add(rows_of(s), task_id=0, step=s, refs=s * N_FRESH + np.arange(N_FRESH))
        if s == checkpoint_at:
            state = json.loads(json.dumps(buf.state_dict()))
    return state, draws


def rank_dir(tmp_path):
    return tmp_path / "rank_0"


def chunk(tmp_path, i, kind="rows"):
    return rank_dir(tmp_path) / f"chunk_{i:06d}.{kind}"


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def checkpointed(tmp_path, **cfg):
    """A run with a checkpoint after step 19 (100 rows: 2 sealed chunks + 20 rows open),
    continued to step 24 and closed."""
    buf = make(tmp_path, **cfg)
    state, _ = train(buf, range(25), checkpoint_at=19)
    buf.close()
    return state


def assert_all_genuine(rows):
    for r in rows:
        assert ALL_ROWS[(int(r[0]), int(r[1]))] == tuple(r)


def test_row_length_of_another_seq_len(tmp_path):
    checkpointed(tmp_path)
    with pytest.raises(DataError) as err:
        make(tmp_path, row_len=ROW_LEN + 8)
    assert str(rank_dir(tmp_path) / "manifest.json") in one_line(err)
    assert "seq_len" in str(err.value)
    buf = make(tmp_path / "new")
    with pytest.raises(DataError) as err:
        buf.add(np.zeros((2, ROW_LEN + 1), dtype=np.int64), task_id=0, step=0)
    assert "seq_len" in one_line(err)
    with pytest.raises(DataError) as err:
        buf.add(np.full((2, ROW_LEN), VOCAB), task_id=0, step=0)
    assert "vocabulary" in one_line(err)


def test_policy_snapshot_missing_or_corrupt(tmp_path):
    state = checkpointed(tmp_path, policy="reservoir", capacity=30)
    snap = rank_dir(tmp_path) / state["snapshot"]["file"]
    flip(snap, 40)
    with pytest.raises(DataError) as err:
        make(tmp_path, policy="reservoir", capacity=30).load_state_dict(state)
    assert str(snap) in one_line(err)
    snap.unlink()
    with pytest.raises(CheckpointError) as err:
        make(tmp_path, policy="reservoir", capacity=30).load_state_dict(state)
    assert str(snap) in one_line(err)


def test_state_of_another_run_or_incomplete(tmp_path):
    state = checkpointed(tmp_path)
    with pytest.raises(CheckpointError) as err:
        make(tmp_path).load_state_dict({**state, "run_id": "other"})
    assert "other" in one_line(err)
    broken = dict(state)
    del broken["store"]
    with pytest.raises(CheckpointError) as err:
        make(tmp_path).load_state_dict(broken)
    assert "store" in one_line(err)
