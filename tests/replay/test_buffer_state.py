"""replay/buffer_state.py: the checkpoint state a commit records (JSON, small, versioned), the
settings a resume may not change, and the draw counters that count per run across a resume."""

import json
import shutil

import pytest

from cptrain.errors import CheckpointError, ConfigError
from replay.test_buffer import make, train


def test_settings_that_change_the_buffer_cannot_change_on_resume(tmp_path):
    _, state = train(make(tmp_path, policy="fifo", capacity=30), range(5), checkpoint_at=4)
    with pytest.raises(ConfigError) as err:
        make(tmp_path, policy="reservoir", capacity=30).load_state_dict(state)
    assert "policy" in str(err.value)
    with pytest.raises(CheckpointError):
        make(tmp_path / "x", policy="fifo", capacity=30, run_id="run-z").load_state_dict(state)


def test_state_is_json_and_small(tmp_path):
    buf = make(tmp_path, policy="reservoir", capacity=100)
    _, state = train(buf, range(30), checkpoint_at=29)
    assert len(json.dumps(state)) < 2000
    assert state["store"]["rows"] == buf.stats()["stored_rows"]


def test_draw_counters_count_per_run_across_a_resume(tmp_path):
    buf = make(tmp_path / "a", policy="fifo", capacity=40)
    _, state = train(buf, range(20), prefetch=True, checkpoint_at=19)
    counted = state["counters"]
    assert state["version"] == 2 and counted == {k: buf.stats()[k] for k in counted}
    assert counted["draws"] == 20 and counted["prefetch_hits"] > 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = make(tmp_path / "b", policy="fifo", capacity=40)
    resumed.load_state_dict(state)
    assert {k: resumed.stats()[k] for k in counted} == counted
    train(resumed, range(20, 30))
    st = resumed.stats()
    assert st["draws"] == 30 and st["rows_requested"] == 30 * 5
    assert st["prefetch_hits"] == counted["prefetch_hits"]  # no prefetching since


def test_a_version_1_state_loads_with_zero_counters(tmp_path):
    _, state = train(make(tmp_path, policy="reservoir", capacity=30), range(10), checkpoint_at=9)
    old = {k: v for k, v in state.items() if k != "counters"} | {"version": 1}
    buf = make(tmp_path, policy="reservoir", capacity=30)
    buf.load_state_dict(old)
    assert buf.stats()["draws"] == 0 and len(buf) == state["rows"]
    again = buf.state_dict()
    assert again["version"] == 2 and again["counters"]["draws"] == 0
    assert {k: v for k, v in again.items() if k not in ("version", "counters")} == {
        k: v for k, v in old.items() if k != "version"}


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pop("counters"),
        lambda s: s["counters"].pop("draws"),
        lambda s: s["counters"].update(draws=-1),
        lambda s: s["counters"].update(prefetch_hits=True),
        lambda s: s["counters"].update(rows_drawn=1.5),
        lambda s: s.update(version=3),
    ],
    ids=["missing", "key missing", "negative", "bool", "float count", "newer version"],
)
def test_malformed_counters_are_refused_before_anything_changes(tmp_path, change):
    _, state = train(make(tmp_path), range(10), checkpoint_at=9)
    before = {p.name: p.read_bytes() for p in (tmp_path / "rank_0").iterdir()}
    change(state)
    with pytest.raises(CheckpointError) as err:
        make(tmp_path).load_state_dict(state)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "rank_0").iterdir()} == before

