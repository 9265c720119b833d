import copy
import subprocess
import sys
import time

import pytest

from cptrain.config import METHODS, RunConfig, config_differences
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
        ({"train": {"batch_size": 0}}, "train.batch_size: must be >= 1 (got 0)"),
        ({"train": {"batch_size": 4, "micro_batch_size": 8}}, "micro_batch_size"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"model": {"preset": "huge"}}, "unknown preset 'huge'"),
        ({"data": {"dir": "d", "tasks": []}}, "data.tasks: must list at least 1 item(s) (got 0)"),
        ({"data": {"dir": "d", "tasks": ["en", "en"]}}, "repeated: en"),
        ({"data": {"dir": "d", "tasks": ["../etc"]}}, "task names"),
        ({"method": "magic"}, "method: unknown method 'magic'; choose one of sequential,"),
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


def test_config_layer_imports_neither_torch_nor_transformers():
    code = (
        "import sys, cptrain.config, cptrain.models.flops, cptrain.models.presets; "
        "heavy = {'torch', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_bad_config_is_refused_before_torch_is_imported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{dir: d, tasks: [en]}}\ntrian: {{}}\n")
    t0 = time.perf_counter()
    # What the `cptrain` console script runs; exit code 99 if torch was imported after all.
    main = (
        "import sys; from cptrain.cli import main; rc = main(sys.argv[1:]); "
        "sys.exit(99 if 'torch' in sys.modules else rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", main, "train", str(bad)], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cptrain: error: "), proc.stderr
    assert "trian: unknown key" in lines[0]
    assert not (tmp_path / "run").exists()
    # About 0.5 s on an idle machine (torch alone takes seconds); generous for loaded CI.
    assert elapsed < 3.0, f"{elapsed:.2f} s"


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "joint", "replay": {"alpha": 0.25}},
        {"method": "joint", "reptile": {"enabled": True}},
    ],
)
def test_joint_with_replay_or_reptile_is_refused(changes):
    with pytest.raises(ConfigError) as err:
        make(**changes)
    msg = str(err.value)
    assert "method joint trains on an i.i.d. mixture and uses no replay or Reptile" in msg
    assert "\n" not in msg


def test_joint_alone_is_valid_and_samples_jointly():
    cfg = make(method="joint", replay={"alpha": 0.0, "policy": "all"})
    assert cfg.sampler == "joint" and cfg.replay.alpha == 0.0 and not cfg.reptile.enabled
    assert make(method="mer").sampler == "sequential"
    assert make().sampler == "sequential" and make().method_spec is None


def test_the_method_table_is_what_method_presets_apply():
    for name, spec in METHODS.items():
        cfg = make(method=name)
        assert cfg.method_spec is spec
        assert (cfg.replay.alpha, cfg.reptile.enabled) == (spec.alpha, spec.reptile)
        assert cfg.sampler == spec.sampler


def test_reptile_diagnostics_every_names_its_new_place():
    with pytest.raises(ConfigError) as err:
        make(method="mer", reptile={"k": 3, "diagnostics_every": 20})
    msg = str(err.value)
    assert msg == (
        "cfg: reptile: reptile.diagnostics_every moved to diagnostics.every; rename the key"
    )
    assert make(diagnostics={"every": 20}).diagnostics.every == 20
    with pytest.raises(ConfigError, match="diagnostics.every"):
        make(diagnostics={"every": -1})


def test_diagnostics_and_the_old_key_do_not_block_a_resume():
    old = make(method="mer").model_dump(mode="json")
    new = make(method="mer", diagnostics={"every": 5}).model_dump(mode="json")
    assert config_differences(old, new) == []
    del old["diagnostics"]
    old["reptile"]["diagnostics_every"] = 10  # a checkpoint of an older cptrain
    assert config_differences(old, new) == []
    new["train"]["lr"] = 0.5
    assert config_differences(old, new) == ["train.lr: checkpoint has None, config has 0.5"]


def test_a_key_an_older_cptrain_lacked_differs_only_away_from_its_default():
    new = make(method="replay").model_dump(mode="json")
    old = copy.deepcopy(new)
    del old["train"]["rewarm_each_task"], old["replay"]["policy"]
    assert config_differences(old, new) == []
    flipped = not new["train"]["rewarm_each_task"]
    new["train"]["rewarm_each_task"] = flipped
    want = f"train.rewarm_each_task: checkpoint has None, config has {flipped!r}"
    assert config_differences(old, new) == [want]
    del new["train"]["rewarm_each_task"]
    old["train"]["rewarm_each_task"] = True  # a key this cptrain no longer has still counts
    want = "train.rewarm_each_task: checkpoint has True, config has None"
    assert config_differences(old, new) == [want]


@pytest.mark.parametrize(("alpha", "batch", "mode", "need"),
                         [(0.05, 8, "substitute", 10), (0.05, 8, "additive", 10)])
def test_an_alpha_that_replays_no_row_is_refused_with_the_batch_that_would(alpha, batch, mode,
                                                                            need):
    from cptrain.config import load_run_config
    from cptrain.errors import ConfigError

    overrides = [f"replay.alpha={alpha}", f"train.batch_size={batch}", f"replay.mode={mode}"]
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["run_dir=x", "data.dir=d", "data.tasks=[a]", *overrides])
    msg = str(err.value)
    assert f"at least {need}" in msg and "<root>" not in msg and "Value error" not in msg
    overrides[1] = f"train.batch_size={need}"
    assert load_run_config(None, ["run_dir=x", "data.dir=d", "data.tasks=[a]", *overrides])
