"""Study sweeps: grid axes over any config key, paired differences against a baseline, the
Reptile map heatmaps, the replay-ratio curve and size against replay. ``_write_run`` and
``_manifest`` are shared with the tests of the other report modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cptrain.errors import ConfigError
from cptrain.report.document import write_report
from cptrain.report.studies import IBRAHIM, pairs
from cptrain.sweep import expand_sweep, load_sweep


def _sweep(tmp_path: Path, grid: dict, prepared_dir: Path) -> Path:
    base = {"data": {"dir": str(prepared_dir), "tasks": ["en", "fr"], "tokens_per_task": 4096},
            "model": {"preset": "tiny"}, "train": {"seq_len": 32, "batch_size": 8}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "base": base,
                                    "grid": grid}))
    return path


def test_axes_expand_per_method_and_set_config_keys(tmp_path, prepared_dir):
    path = _sweep(tmp_path, {
        "methods": ["replay", "mer"], "baseline": "replay", "seeds": [0, 1],
        "axes": [{"key": "train.lr", "values": [0.001, 0.003]},
                 {"key": "reptile.k", "label": "k", "values": [5, 20], "methods": ["mer"]}],
    }, prepared_dir)
    runs = expand_sweep(load_sweep(path))
    assert len(runs) == 2 * 2 + 2 * 2 * 2  # replay: lr × seeds; mer: lr × k × seeds
    by = {r.name: r for r in runs}
    mer = by["mer-a0.25-lr0.003-k20_tiny_s1_en-fr"]
    assert mer.config.train.lr == 0.003 and mer.config.reptile.k == 20
    assert mer.coords["axes"] == {"lr": 0.003, "k": 20}
    assert mer.coords["axis_keys"] == {"lr": "train.lr", "k": "reptile.k"}
    rep = by["replay-a0.25-lr0.001_tiny_s0_en-fr"]
    assert rep.coords["axes"] == {"lr": 0.001} and rep.config.reptile.k == 500  # default


@pytest.mark.parametrize("grid, message", [
    ({"methods": ["replay"], "baseline": "mer"}, "grid.baseline: 'mer' is not a method"),
    ({"methods": ["replay"], "axes": [{"key": "reptile.k", "values": [5], "methods": ["mer"]}]},
     "methods mer are not in the grid"),
    ({"methods": ["replay"], "axes": [{"key": "train.nope", "values": [1]}]}, "nope"),
])
def test_bad_axes_and_baselines_are_one_line_errors(tmp_path, prepared_dir, grid, message):
    with pytest.raises(ConfigError, match=message) as err:
        expand_sweep(load_sweep(_sweep(tmp_path, grid, prepared_dir)))
    assert "\n" not in str(err.value)


def test_repeated_axis_label_is_refused(tmp_path, prepared_dir):
    grid = {"methods": ["replay"], "axes": [{"key": "train.lr", "values": [1e-3]},
                                            {"key": "eval.lr", "label": "lr", "values": [1]}]}
    with pytest.raises(ConfigError, match="used twice"):
        load_sweep(_sweep(tmp_path, grid, prepared_dir))


# ---------------------------------------------------------------- report from run directories
def _write_run(root: Path, name: str, *, method: str, alpha: float, seed: int, lm: list,
               axes: dict | None = None, preset: str = "tiny", rewarm: bool = False,
               params: int = 1000, fpt: float = 6000.0, coords: list | None = None,
               precision: str = "fp32") -> None:
    d = root / name
    d.mkdir(parents=True)
    order = ["en", "de"][: len(lm[0])]
    learned = float(np.mean([lm[i][i] for i in range(len(lm))]))
    retained = float(np.mean(lm[-1]))
    forgetting = float(np.mean([lm[-1][j] - lm[j][j] for j in range(len(lm) - 1)]))
    summary = {
        "complete": True, "tasks": order, "loss_matrix": lm, "task_steps": [10] * len(lm),
        "config": {"method": method, "seed": seed, "model": {"preset": preset},
                   "replay": {"alpha": alpha}, "train": {"rewarm_each_task": rewarm},
                   "reptile": {"enabled": method == "mer"}},
        "retained_loss": retained, "learned_loss": learned, "forgetting": forgetting,
        "union_loss": retained, "params": params, "precision": precision,
        "flops": {"flops_per_incoming_token": fpt, "flops_per_token": fpt, "total_flops": 1e9,
                  "reptile_flops": 0, "convention": "test"},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    if coords is not None:
        coords.append({"name": name, "run_dir": name, "label": method, "method": method,
                       "alpha": alpha, "preset": preset, "seed": seed, "order": order,
                       "axes": axes or {}, "axis_keys": {k: {"k": "reptile.k",
                                                             "e": "reptile.epsilon",
                                                             "lr": "train.lr"}[k]
                                                         for k in (axes or {})}})


def _manifest(root: Path, coords: list, baseline: str | None) -> None:
    (root / "sweep.json").write_text(json.dumps({"format": "cptrain-sweep-v1", "source": "t",
                                                 "baseline": baseline, "runs": coords}))


def test_reptile_map_marks_only_cells_whose_interval_excludes_zero(tmp_path):
    root, coords = tmp_path / "map", []
    rng = np.random.default_rng(0)
    # MER at k=5, ε=0.9 lowers the final en loss by 0.3 on every seed; every other cell adds
    # noise of mean zero. Paired differences must find exactly that cell.
    for seed in range(3):
        base_en = 6.0 + 0.5 * seed  # large seed-to-seed spread that pairing removes
        _write_run(root, f"replay_s{seed}", method="replay", alpha=0.25, seed=seed,
                   lm=[[5.0, 9.0], [base_en, 5.5]], axes={"lr": 0.003}, coords=coords)
        for k in (5, 20):
            for e in (0.1, 0.9):
                noise = float(rng.normal(0, 0.05))
                shift = -0.3 + noise / 10 if (k, e) == (5, 0.9) else noise
                _write_run(root, f"mer-k{k}-e{e}_s{seed}", method="mer", alpha=0.25, seed=seed,
                           lm=[[5.0, 9.0], [base_en + shift, 5.5]],
                           axes={"lr": 0.003, "k": k, "e": e}, coords=coords)
    _manifest(root, coords, "replay")
    out = tmp_path / "report"
    write_report([root], out)
    md = (out / "report.md").read_text()
    assert (out / "figures" / "reptile_map.png").stat().st_size > 10_000
    section = md.split("## The Reptile map")[1].split("\n## ")[0]
    forget_table = section.split("Δ forgetting (MER − replay)")[1].split("\n\n")[1]
    k5 = next(line for line in forget_table.splitlines() if "k=5 " in line)
    cells = [c.strip() for c in k5.strip("|").split("|")][1:]
    assert cells[0].startswith(("+", "-")) and not cells[0].endswith("*")
    assert cells[1].startswith("-0.3") and cells[1].endswith("*")
    assert "1 of 4 cells significantly lower, 0 significantly higher" in section
    paired = md.split("## Paired differences against replay")[1].split("\n## ")[0]
    assert "significantly lower" in paired and "no significant difference" in paired


def test_pairs_match_seed_and_the_baselines_axis_values(tmp_path):
    from cptrain.report.document import collect_runs

    root, coords = tmp_path / "p", []
    for lr in (0.001, 0.003):
        for seed in (0, 1):
            _write_run(root, f"replay-{lr}-{seed}", method="replay", alpha=0.25, seed=seed,
                       lm=[[5.0, 9.0], [6.0, 5.5]], axes={"lr": lr}, coords=coords)
            _write_run(root, f"mer-{lr}-{seed}", method="mer", alpha=0.25, seed=seed,
                       lm=[[5.0, 9.0], [6.0, 5.5]], axes={"lr": lr, "k": 5}, coords=coords)
    _manifest(root, coords, "replay")
    runs, _ = collect_runs([root])
    found = pairs(runs, "replay")
    assert len(found) == 2
    for ps in found.values():
        for r, b in ps:
            assert (r.seed, r.axes["lr"]) == (b.seed, b.axes["lr"]) and b.label == "replay"


def test_replay_ratio_curve_table_and_shape_words(tmp_path):
    root = tmp_path / "ratio"
    alphas = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5]
    for rewarm in (False, True):
        for seed in range(3):
            for a in alphas:
                old = 7.5 - 2 * a + (0.2 if rewarm else 0) + 0.01 * seed
                new = 6.0 + 0.4 * a
                method = "replay" if a else "sequential"
                _write_run(root, f"{method}-{a}-{rewarm}-{seed}", method=method, alpha=a,
                           seed=seed, lm=[[5.0, 9.0], [old, new]], rewarm=rewarm)
    for seed in range(3):
        _write_run(root, f"joint-{seed}", method="joint", alpha=0.0, seed=seed,
                   lm=[[5.0, 9.0], [5.9, 6.3]])
    out = tmp_path / "report"
    write_report([root], out)
    md = (out / "report.md").read_text()
    section = md.split("## Replay-ratio curve")[1].split("\n## ")[0]
    assert (out / "figures" / "replay_ratio.png").is_file()
    assert section.count("falls monotonically") == 2
    assert "tiny en→de no re-warm: old-task (en) loss falls monotonically" in section
    assert f"{IBRAHIM[0.25][0]:.2f} / {IBRAHIM[0.25][1]:.2f}" in section
    assert "joint (union)" in section and "6.300" in section


def test_size_vs_replay_is_void_unless_the_larger_model_learns_better(tmp_path):
    def build(root: Path, large_learned: float, large_precision: str = "fp32") -> str:
        for seed in range(3):
            j = 0.01 * seed
            _write_run(root, f"seq-tiny-{seed}", method="sequential", alpha=0.0, seed=seed,
                       lm=[[5.0 + j, 9.0], [6.5 + j, 5.0 + j]], params=1000, fpt=6000.0)
            _write_run(root, f"rep-tiny-{seed}", method="replay", alpha=0.5, seed=seed,
                       lm=[[5.0 + j, 9.0], [5.6 + j, 5.2 + j]], params=1000, fpt=12000.0)
            _write_run(root, f"seq-mid-{seed}", method="sequential", alpha=0.0, seed=seed,
                       preset="small", lm=[[large_learned + j, 9.0],
                                           [6.0 + j, large_learned + j]],
                       params=2000, fpt=12000.0, precision=large_precision)
        write_report([root], root / "report")
        md = (root / "report" / "report.md").read_text()
        return md.split("## Replay or a bigger model? (equal")[1].split("\n## ")[0]

    void = build(tmp_path / "void", large_learned=5.2)
    assert "comparison is void" in void and "Δ retained" not in void
    real = build(tmp_path / "real", large_learned=4.6)
    assert "comparison is void" not in real
    assert "2.00× the parameters" in real
    assert "-0.400 ± 0.023 (Holm p < 0.001) against tiny (significantly lower; Welch" in real
    row = next(line for line in real.splitlines() if line.startswith("| tiny α=0.5"))
    # retained (5.6 + 5.2) / 2 − (6.0 + 4.6) / 2; forgetting (5.6 − 5.0) − (6.0 − 4.6)
    assert "| 2.00× | 2.00× | +0.100 ± " in row
    assert "| significantly higher (Holm p < 0.001) |" in row
    assert "| -0.800 ± 0.000 | significantly lower (Holm p < 0.001) |" in row
    # learned (5.0 + 5.2) / 2 − 4.6 (unpaired: the interval is the retained one's, same spread)
    assert row.endswith("| +0.500 ± 0.023 | significantly higher (Holm p < 0.001) |")
    assert "n = 3 seeds per group" in real and "Caution: with n < 5" in real
    assert "different precisions" not in real
    # `precision: auto` can pick bf16 for one size only: the report says size is confounded
    mixed = build(tmp_path / "mixed", large_learned=4.6, large_precision="bf16")
    assert ("different precisions (bf16: small sequential; fp32: tiny replay α=0.5, tiny "
            "sequential), so size is confounded with precision" in mixed)


def test_a_method_can_be_limited_to_some_presets(tmp_path, prepared_dir):
    grid = {"presets": ["tiny", "mini"], "alphas": [0.5], "seeds": [0],
            "methods": ["sequential", {"method": "replay", "presets": ["tiny"]}]}
    names = [r.name for r in expand_sweep(load_sweep(_sweep(tmp_path, grid, prepared_dir)))]
    assert names == ["sequential_tiny_s0_en-fr", "replay-a0.5_tiny_s0_en-fr",
                     "sequential_mini_s0_en-fr"]
    grid["methods"][1]["presets"] = ["small"]
    with pytest.raises(ConfigError, match="presets small are not in grid.presets"):
        expand_sweep(load_sweep(_sweep(tmp_path, grid, prepared_dir)))


def test_paired_table_splits_retained_into_learned_and_after_learning(tmp_path):
    """A method that learns the first task 0.4 better and loses it as fast as the baseline
    does gains retained loss from learning alone: Δ after learning is no difference."""
    root, coords = tmp_path / "split", []
    rng = np.random.default_rng(1)
    for seed in range(4):
        s = 0.3 * seed
        _write_run(root, f"sequential_s{seed}", method="sequential", alpha=0.0, seed=seed,
                   lm=[[5.0 + s, 9.0], [6.0 + s, 5.5]], coords=coords)
        learned = 4.6 + s + float(rng.normal(0, 0.01))
        drift = 1.0 + float(rng.normal(0, 0.02))
        _write_run(root, f"replay_s{seed}", method="replay", alpha=0.25, seed=seed,
                   lm=[[learned, 9.0], [learned + drift, 5.5]], coords=coords)
    _manifest(root, coords, "sequential")
    out = tmp_path / "report"
    write_report([root], out)
    paired = (out / "report.md").read_text().split("## Paired differences against sequential")[1]
    header = next(line for line in paired.splitlines() if line.startswith("| run group"))
    assert header.rstrip(" |").endswith("Δ after learning | Δ first task learned")
    row = next(line for line in paired.splitlines() if line.startswith("| replay"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    retained, learned, after, first = cells[2], cells[3], cells[5], cells[6]
    assert float(first.split()[0]) == pytest.approx(-0.4, abs=0.02)
    for c in (retained, learned):
        assert float(c.split()[0]) == pytest.approx(-0.2, abs=0.02)
        assert "significantly lower" in c
    assert "no significant difference" in after
    assert "Δ after learning: 0 setting(s) significantly lower, 0 significantly higher" in paired


def test_an_axis_naming_a_method_leaves_its_named_variants_alone(tmp_path, prepared_dir):
    path = _sweep(tmp_path, {
        "methods": ["replay", {"method": "replay", "name": "replay-add",
                               "set": {"replay": {"mode": "additive"}}}],
        "seeds": [0], "axes": [{"key": "train.lr", "values": [0.001, 0.003],
                                "methods": ["replay"]}],
    }, prepared_dir)
    names = sorted(r.name for r in expand_sweep(load_sweep(path)))
    assert names == ["replay-a0.25-lr0.001_tiny_s0_en-fr", "replay-a0.25-lr0.003_tiny_s0_en-fr",
                     "replay-add-a0.25_tiny_s0_en-fr"]


def test_a_control_without_the_axis_pairs_with_the_baseline_at_its_own_setting(tmp_path):
    from cptrain.report.document import collect_runs

    root, coords = tmp_path / "c", []
    for lr in (0.001, 0.003):
        _write_run(root, f"sequential-{lr}", method="sequential", alpha=0.0, seed=0,
                   lm=[[5.0, 9.0], [6.0, 5.5]], axes={"lr": lr}, coords=coords)
    _write_run(root, "replay-previous", method="replay", alpha=0.25, seed=0,
               lm=[[5.0, 9.0], [6.0, 5.5]], coords=coords)
    summary = json.loads((root / "replay-previous" / "summary.json").read_text())
    summary["config"]["train"]["lr"] = 0.003
    (root / "replay-previous" / "summary.json").write_text(json.dumps(summary))
    _manifest(root, coords, "sequential")
    runs, _ = collect_runs([root])
    (pair,) = pairs(runs, "sequential").values()
    assert [b.axes["lr"] for _, b in pair] == [0.003]


def test_an_entrys_task_fields_survive_the_task_order(tmp_path, prepared_dir):
    path = _sweep(tmp_path, {
        "methods": ["sequential", {"method": "sequential", "name": "seq-repeat", "set": {
            "data": {"tasks": [{"name": "en", "unique_tokens": 640}, {"name": "fr"}]}}}],
        "seeds": [0],
    }, prepared_dir)
    by = {r.name.split("_")[0]: r.config for r in expand_sweep(load_sweep(path))}
    assert by["seq-repeat"].data.tasks[0].unique_tokens == 640
    assert by["sequential"].data.tasks[0].unique_tokens is None


def test_paired_differences_are_never_pooled_across_sizes(tmp_path):
    root, coords = tmp_path / "sizes", []
    for preset in ("nano", "micro"):
        for seed in range(3):
            _write_run(root, f"sequential_{preset}_s{seed}", method="sequential", alpha=0.0,
                       seed=seed, preset=preset, lm=[[5.0, 9.0], [6.0, 5.5]], coords=coords)
            _write_run(root, f"replay_{preset}_s{seed}", method="replay", alpha=0.25, seed=seed,
                       preset=preset, lm=[[5.0, 9.0], [5.5, 5.5]], coords=coords)
    _manifest(root, coords, "sequential")
    runs, _ = __import__("cptrain.report.document", fromlist=["collect_runs"]).collect_runs([root])
    found = pairs(runs, "sequential")
    assert sorted(found) == ["replay α=0.25 [micro]", "replay α=0.25 [nano]"]
    assert all(len(v) == 3 for v in found.values())
