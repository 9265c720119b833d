"""Validation of the replay: config section."""

import pytest

from cptrain.config_base import build_config, load_config
from cptrain.errors import ConfigError
from cptrain.replay.config import ReplayConfig


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(ReplayConfig, data, "replay")
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_the_papers():
    cfg = build_config(ReplayConfig, {}, "replay")
    assert (cfg.alpha, cfg.mode, cfg.policy, cfg.capacity, cfg.storage, cfg.replay_from) == (
        0.0, "substitute", "all", None, "copy", "all")
    assert not cfg.bounded


@pytest.mark.parametrize("alpha", [1.0, 1.5, -0.01, float("nan")])
def test_alpha_outside_unit_interval(alpha):
    assert "alpha" in _error({"alpha": alpha})


def test_capacity_with_policy_all():
    msg = _error({"capacity": 1000})
    assert "capacity" in msg and "'all'" in msg


@pytest.mark.parametrize("policy", ["reservoir", "fifo", "task_balanced"])
def test_bounded_policy_needs_capacity(policy):
    msg = _error({"policy": policy})
    assert "capacity" in msg and policy in msg
    assert build_config(ReplayConfig, {"policy": policy, "capacity": 10}, "replay").bounded


def test_capacity_must_be_positive():
    assert "capacity" in _error({"policy": "fifo", "capacity": 0})


@pytest.mark.parametrize(
    "data, key",
    [({"mode": "both"}, "mode"), ({"storage": "link"}, "storage"), ({"capcity": 3}, "capcity"),
     ({"prefetch_mb": -1}, "prefetch_mb"), ({"visibility_lag": -1}, "visibility_lag"),
     ({"replay_from": "past"}, "replay_from"), ({"keep_checkpoints": 0}, "keep_checkpoints")],
)
def test_other_bad_values_name_their_key(data, key):
    assert key in _error(data)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "replay.yaml"
    path.write_text("alpha: 0.25\npolicy: reservoir\ncapacity: 500\n")
    cfg = load_config(ReplayConfig, path, ["mode=additive"])
    assert (cfg.alpha, cfg.mode, cfg.capacity) == (0.25, "additive", 500)
    with pytest.raises(ConfigError):
        load_config(ReplayConfig, path, ["alpha=1"])
