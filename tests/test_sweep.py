"""Sweep expansion, validation, resumability and the guard against mixing changed configs."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import read_summary

from cptrain.config_base import build_config
from cptrain.errors import ConfigError
from cptrain.sweep import SweepConfig, expand_sweep, load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _sweep(tmp_path, data_dir="unused", **grid):
    grid = {"methods": ["sequential", "replay", "mer", "joint"], "alphas": [0.25, 0.5],
            "presets": ["tiny", "small"], "seeds": [0, 1], **grid}
    return build_config(SweepConfig, {
        "out_dir": str(tmp_path / "sweep"),
        "base": {
            "data": {"dir": str(data_dir), "tasks": ["a", {"name": "b", "tokens": 999}, "c"],
                     "tokens_per_task": 1000},
            # Method keys in the base must not leak into other methods.
            "replay": {"alpha": 0.5},
            "reptile": {"enabled": True, "k": 7},
            "train": {"seq_len": 16, "batch_size": 4},
        },
        "grid": grid,
    })


def test_grid_expands_to_every_combination_with_readable_names(tmp_path):
    runs = expand_sweep(_sweep(tmp_path))
    # (sequential + 2 replay + 2 mer + joint) × 2 presets × 2 seeds
    assert len(runs) == 6 * 2 * 2
    names = {r.name for r in runs}
    assert "mer-a0.25_tiny_s1_a-b-c" in names
    assert "sequential_small_s0_a-b-c" in names
    assert "joint_tiny_s1_a-b-c" in names
    for r in runs:
        assert r.run_dir == tmp_path / "sweep" / r.name
        cfg = r.config
        assert cfg.method == r.coords["method"]
        assert cfg.replay.alpha == r.coords["alpha"]
        assert cfg.reptile.enabled == (cfg.method in ("reptile", "mer"))
        assert cfg.reptile.k == 7
        assert cfg.model.preset == r.coords["preset"]
        assert cfg.seed == r.coords["seed"]
        if cfg.method in ("sequential", "joint"):
            assert cfg.replay.alpha == 0.0


def test_task_orders_and_preset_settings_apply(tmp_path):
    cfg = _sweep(tmp_path, methods=["sequential"], seeds=[3],
                 task_orders=[["c", "b", "a"], ["a", "b", "c"]],
                 preset_settings={"small": {"train": {"lr": 1e-3}}})
    runs = expand_sweep(cfg)
    assert len(runs) == 4
    by_name = {r.name: r.config for r in runs}
    c = by_name["sequential_small_s3_c-b-a"]
    assert [t.name for t in c.data.tasks] == ["c", "b", "a"]
    assert c.data.tasks[1].tokens == 999  # per-task budgets follow their task
    assert c.train.lr == 1e-3
    assert by_name["sequential_tiny_s3_c-b-a"].train.lr is None


def test_method_entries_can_carry_names_alphas_and_settings(tmp_path):
    cfg = _sweep(tmp_path, presets=["tiny"], seeds=[0], methods=[
        "reptile", {"method": "reptile", "name": "reptile-k50", "set": {"reptile": {"k": 50}}},
        {"method": "replay", "alphas": [0.25]},
    ])
    runs = {r.name: r.config for r in expand_sweep(cfg)}
    assert set(runs) == {"reptile_tiny_s0_a-b-c", "reptile-k50_tiny_s0_a-b-c",
                         "replay-a0.25_tiny_s0_a-b-c"}
    assert runs["reptile-k50_tiny_s0_a-b-c"].reptile.k == 50
    assert runs["reptile_tiny_s0_a-b-c"].reptile.k == 7


@pytest.mark.parametrize("grid,match", [
    ({"methods": ["sequential", "sequential"]}, "appears twice"),
    ({"methods": [{"method": "sequential", "alphas": [0.25]}]}, "does not replay"),
    ({"task_orders": [["a", "zz"]]}, "zz not in base data.tasks"),
    ({"presets": ["huge"]}, "unknown preset"),
    ({"methods": ["magic"]}, "unknown method"),
    ({"alphas": [1.0]}, "alphas in \\(0, 1\\)"),
])
def test_bad_grids_are_one_line_config_errors(tmp_path, grid, match):
    with pytest.raises(ConfigError, match=match) as e:
        expand_sweep(_sweep(tmp_path, **grid))
    assert "\n" not in str(e.value)


def test_a_bad_run_config_is_reported_before_anything_trains(tmp_path):
    cfg = _sweep(tmp_path, methods=["sequential"])
    cfg.base["train"]["batch_size"] = 0
    with pytest.raises(ConfigError, match="sweep run sequential_tiny_s0_a-b-c: train.batch_size"):
        run_sweep(cfg)
    assert not (tmp_path / "sweep").exists()


def test_yaml_file_overrides_and_base_path(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"dir": "d", "tasks": ["x", "y"]}}))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "o"), "base": str(base),
                                     "grid": {"methods": ["sequential"]}}))
    cfg = load_sweep(sweep, ["grid.seeds=[4, 5]"])
    assert [r.name for r in expand_sweep(cfg)] == ["sequential_tiny_s4_x-y",
                                                   "sequential_tiny_s5_x-y"]
    sweep.write_text("out_dir: o\nbase: {}\ngrid: {methods: [sequential]}\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        load_sweep(sweep)


def test_demo_recipe_expands_to_the_issue_grid():
    cfg = load_sweep(REPO / "recipes" / "demo-sweep.yaml")
    runs = expand_sweep(cfg)
    groups = {(r.coords["method"], r.coords["alpha"]) for r in runs}
    assert groups == {("sequential", 0.0), ("replay", 0.25), ("replay", 0.5), ("reptile", 0.0),
                      ("mer", 0.25), ("mer", 0.5), ("joint", 0.0)}
    assert {r.coords["preset"] for r in runs} == {"tiny", "small"}
    assert {r.coords["seed"] for r in runs} == {0, 1, 2}
    assert len(runs) == 7 * 2 * 3


PAPER_SWEEPS = [p for p in sorted((REPO / "recipes").glob("paper-*.yaml"))
                if "grid" in yaml.safe_load(p.read_text())]


def test_there_are_paper_sweeps():
    assert {p.name for p in PAPER_SWEEPS} >= {"paper-3task.yaml", "paper-5task.yaml"}


@pytest.mark.parametrize("recipe", PAPER_SWEEPS, ids=lambda p: p.name)
def test_paper_recipes_are_valid_sweeps(recipe):
    runs = expand_sweep(load_sweep(recipe))
    assert runs
    for r in runs:
        assert r.config.train.seq_len == 2048
        assert r.config.train.batch_size * r.config.train.seq_len >= 2048 * 1024


def test_dry_run_lists_without_creating(tmp_path, capsys):
    dirs = run_sweep(_sweep(tmp_path), dry_run=True)
    assert len(dirs) == 24 and not (tmp_path / "sweep").exists()
    out = capsys.readouterr().out
    assert "24 runs" in out and "mer-a0.5_small_s1_a-b-c" in out


def test_finished_run_with_other_settings_is_not_silently_mixed(tmp_path):
    cfg = _sweep(tmp_path, methods=["sequential"], presets=["tiny"], seeds=[0])
    (run,) = expand_sweep(cfg)
    run.run_dir.mkdir(parents=True)
    old = run.config.model_dump(mode="json")
    old["train"]["lr"] = 0.123
    (run.run_dir / "summary.json").write_text(json.dumps({"complete": True, "config": old}))
    with pytest.raises(ConfigError, match="finished with other settings .*train.lr"):
        run_sweep(cfg, progress=False)


def test_dry_run_says_changed_where_the_real_sweep_refuses(tmp_path, capsys):
    cfg = _sweep(tmp_path, methods=["sequential"], presets=["tiny"], seeds=[0, 1])
    runs = expand_sweep(cfg)
    for r, lr in zip(runs, (0.123, None), strict=True):
        r.run_dir.mkdir(parents=True)
        old = r.config.model_dump(mode="json")
        old["train"]["lr"] = lr if lr is not None else old["train"]["lr"]
        (r.run_dir / "summary.json").write_text(json.dumps({"complete": True, "config": old}))
    run_sweep(cfg, dry_run=True)
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert "CHANGED since it finished (train.lr: " in lines[runs[0].name]
    assert lines[runs[1].name].rstrip().endswith("done")


def test_a_finished_auto_run_records_its_precision_and_stays_done(tmp_path, capsys):
    """A run's summary holds the precision `auto` resolved to; the sweep asking `auto` again
    sees the same setting (an explicit other precision is a change)."""
    cfg = _sweep(tmp_path, methods=["sequential"], presets=["tiny"], seeds=[0])
    (run,) = expand_sweep(cfg)
    run.run_dir.mkdir(parents=True)
    done = run.config.model_dump(mode="json")
    assert done["train"]["precision"] == "auto"
    done["train"]["precision"] = "bf16"
    (run.run_dir / "summary.json").write_text(json.dumps({"complete": True, "config": done,
                                                          "version": 2}))
    run_sweep(cfg, dry_run=True)
    assert capsys.readouterr().out.splitlines()[1].rstrip().endswith("done")
    explicit = run.config.model_copy(update={"train": run.config.train.model_copy(
        update={"precision": "fp32"})})
    from cptrain.sweep import _changed

    assert _changed(run.__class__(**{**vars(run), "config": explicit})) == [
        "train.precision: checkpoint has 'bf16', config has 'fp32'"]


def test_two_sweeps_on_one_directory_are_refused(tmp_path):
    cfg = _sweep(tmp_path, methods=["sequential"], presets=["tiny"], seeds=[0])
    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / ".sweep.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another `cptrain sweep` is running"):
            run_sweep(cfg, progress=False)


def _real_sweep(tmp_path, prepared_dir):
    return build_config(SweepConfig, {
        "out_dir": str(tmp_path / "real"),
        "base": {
            "data": {"dir": str(prepared_dir), "tasks": ["email", "xml", "asyncio"],
                     "tokens_per_task": 8 * 32 * 4},
            "train": {"seq_len": 32, "batch_size": 8, "lr": 3e-3, "log_every": 2},
            "eval": {"windows": 8, "batch_size": 8, "every": 2},
            "checkpoint": {"keep_last": 3},
        },
        "grid": {"methods": ["sequential", "replay"], "alphas": [0.5], "presets": ["tiny"]},
    })


@pytest.mark.slow
def test_real_sweep_trains_skips_and_resumes(tmp_path, prepared_dir, capsys):
    cfg = _real_sweep(tmp_path, prepared_dir)
    dirs = run_sweep(cfg, progress=False)
    assert [d.name for d in dirs] == ["sequential_tiny_s0_email-xml-asyncio",
                                      "replay-a0.5_tiny_s0_email-xml-asyncio"]
    out = capsys.readouterr().out
    assert "[2/2] replay-a0.5_tiny_s0_email-xml-asyncio: training" in out and "ETA" in out
    summaries = [read_summary(d) for d in dirs]
    assert all(s["complete"] for s in summaries)
    assert summaries[1]["replay_tokens"] > 0 and summaries[0]["replay_tokens"] == 0
    manifest = json.loads((tmp_path / "real" / "sweep.json").read_text())
    assert [r["label"] for r in manifest["runs"]] == ["sequential", "replay"]

    # Second call: nothing left to train, also where a run finished under an older cptrain
    # whose configs lacked a key that came later at its default.
    older = read_summary(dirs[0])
    del older["config"]["train"]["rewarm_each_task"]
    (dirs[0] / "summary.json").write_text(json.dumps(older))
    mtimes = [(d / "summary.json").stat().st_mtime_ns for d in dirs]
    run_sweep(cfg, progress=False)
    assert "2 done" in capsys.readouterr().out
    assert mtimes == [(d / "summary.json").stat().st_mtime_ns for d in dirs]

    # Interrupt the replay run after its second task: it resumes and ends where it did.
    replay = dirs[1]
    ckpts = sorted((replay / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    assert len(ckpts) == 3
    shutil.rmtree(ckpts[-1])
    (replay / "summary.json").unlink()
    run_sweep(cfg, progress=False)
    assert "resuming" in capsys.readouterr().out
    again = read_summary(replay)
    assert again["complete"]
    np.testing.assert_allclose(again["loss_matrix"], summaries[1]["loss_matrix"], atol=1e-5)


def test_a_resumed_run_counts_only_its_remaining_steps_in_the_eta(tmp_path):
    from cptrain.sweep import _left, _steps

    cfg = _sweep(tmp_path, methods=["sequential"], presets=["tiny"], seeds=[0])
    (run,) = expand_sweep(cfg)
    assert _left(run) == 1.0
    total = _steps(run.config)
    (run.run_dir / "checkpoints" / f"step_{total // 4:09d}").mkdir(parents=True)
    assert _left(run) == pytest.approx(1 - (total // 4) / total)
