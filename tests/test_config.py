import pytest

from cptrain.config import RunConfig, load_run_config
from cptrain.config_base import build_config
from cptrain.errors import ConfigError

BASE = {"run_dir": "runs/x", "data": {"dir": "d", "tasks": ["en", "fr"]}}


def make(**changes):
    raw = {**BASE, **changes}
    return build_config(RunConfig, raw, source="cfg")


def test_defaults_follow_the_paper():
    cfg = make()
    t = cfg.train
    assert (t.betas, t.eps, t.weight_decay, t.grad_clip) == ((0.9, 0.95), 1e-8, 0.1, 1.0)
    assert t.schedule == "cosine" and t.rewarm_each_task is False
    assert cfg.replay.alpha == 0.0 and cfg.reptile.enabled is False
    assert [task.name for task in cfg.data.tasks] == ["en", "fr"]


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"seq_len": "long"}}, "train.seq_len"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"batch_size": 4, "micro_batch_size": 8}}, "micro_batch_size"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"model": {"preset": "huge"}}, "unknown preset 'huge'"),
        ({"data": {"dir": "d", "tasks": []}}, "data.tasks"),
        ({"data": {"dir": "d", "tasks": ["en", "en"]}}, "repeated: en"),
        ({"data": {"dir": "d", "tasks": ["../etc"]}}, "task names"),
        ({"method": "magic"}, "method"),
    ],
)
def test_bad_values_name_the_key(changes, fragment):
    with pytest.raises(ConfigError) as err:
        make(**changes)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


def test_method_presets_and_explicit_override():
    assert make(method="replay").replay.alpha == 0.25
    mer = make(method="mer")
    assert mer.replay.alpha == 0.25 and mer.reptile.enabled
    assert make(method="replay", replay={"alpha": 0.5}).replay.alpha == 0.5
    assert make(method="sequential").replay.alpha == 0.0


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("run_dir: r\ndata: {dir: d, tasks: [en]}\ntrain: {lr: 0.001}\n")
    cfg = load_run_config(p, ["train.lr=3e-4", "train.seq_len=64", "model.preset=small"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.seq_len == 64 and cfg.model.preset == "small"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_run_config(p, ["train.lr"])
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_run_config(p, ["train.nope=1"])


def test_yaml_errors_are_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(p)
