"""Reports from run directories written here (summary.json + metrics.jsonl), and one from a
real micro sweep. ``make_run`` and ``_md_row`` are shared with the tests of the report's
modules (test_runs.py, test_sections.py, test_compute.py, ...)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import read_summary
from matplotlib.image import imread
from scipy import stats

from cptrain.errors import ConfigError
from cptrain.evaluation import metrics
from cptrain.models.flops import preset_shape, run_flops, summary_facts
from cptrain.report.document import collect_runs, mean_ci, write_report

TASKS = ["en", "fr", "de"]
BASE_LOSS = {"tiny": 5.0, "small": 4.4}
FORGET = {"sequential": 1.0, "replay": 0.3, "reptile": 0.8, "mer": 0.2}


def _loss_matrix(preset, method, alpha, seed, rows=3):
    rng = np.random.default_rng([seed, len(method), int(alpha * 100)])
    base = BASE_LOSS[preset] + rng.normal(0, 0.05)
    lm = []
    for i in range(rows):
        row = []
        for j in range(3):
            if j > i:
                row.append(8.0)  # not trained yet
            else:
                row.append(base + FORGET[method] * (i - j) * 0.5 + rng.normal(0, 0.05))
        lm.append(row)
    return lm


def make_run(root: Path, method="sequential", alpha=0.0, preset="tiny", seed=0, *,
             rows=3, grad_cos=False, flops=None, downstream=None, name=None,
             precision=None) -> Path:
    name = name or f"{method}{f'-a{alpha:g}' if alpha else ''}_{preset}_s{seed}_en-fr-de"
    run = root / name
    run.mkdir(parents=True)
    lm = _loss_matrix(preset, method, alpha, seed, rows)
    batch, seq, steps = 16, 128, 10 * rows
    n_replay = round(alpha * batch)
    shape = preset_shape(preset, 4096)
    reptile = method in ("reptile", "mer")
    summary = {
        "complete": rows == 3,
        "config": {"method": method, "seed": seed, "model": {"preset": preset},
                   "train": {"batch_size": batch, "seq_len": seq},
                   "replay": {"alpha": alpha, "mode": "substitute"},
                   "reptile": {"enabled": reptile, "k": 5},
                   "data": {"tasks": [{"name": t} for t in TASKS]}},
        "tasks": TASKS, "loss_matrix": lm, "steps": steps, "task_steps": [10, 10, 10],
        "fresh_tokens": steps * (batch - n_replay) * seq, "replay_tokens": steps * n_replay * seq,
        "params": shape.total_params(), "wall_s": 12.5,
        **metrics.summarize(lm), "union_loss": metrics.union_loss(lm[-1]),
        **summary_facts(shape, batch - n_replay, n_replay, steps // 5 if reptile else 0),
    }
    if flops is not None:
        summary["flops"] = flops
    if precision is not None:
        summary["precision"] = precision
    records = []
    for step in range(0, steps + 1, 5):
        task = TASKS[min(step // 10, 2)]
        val = {t: 6.0 - 0.01 * step + (0.02 * step if t != task else 0) for t in TASKS}
        kind = "task_end" if step and step % 10 == 0 else "eval"
        records.append({"type": kind, "step": step, "task": task, "val_loss": val,
                        "union_loss": float(np.mean(list(val.values())))})
        if grad_cos and step:
            records.append({"type": "train", "step": step, "task": task, "loss": 5.0,
                            "grad_cos": 0.1 * math.sin(step)})
    if grad_cos:
        summary["grad_cos_mean"] = 0.05
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if downstream is not None:
        (run / "downstream").mkdir()
        (run / "downstream" / "after_2_de.json").write_text(json.dumps({"tasks": downstream}))
    return run


def make_sweep(root: Path, methods=(("sequential", 0.0), ("replay", 0.25)),
               presets=("tiny", "small"), seeds=(0, 1, 2), **kw) -> list[Path]:
    return [make_run(root, m, a, p, s, **kw) for m, a in methods for p in presets for s in seeds]


def _md_row(md: str, caption: str, row: str) -> list[str]:
    """Cells of the row named ``row`` in the table captioned ``caption``."""
    block = md[md.index(caption):]
    for line in block.splitlines():
        if line.startswith(f"| {row} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {row!r} after {caption!r}")


def test_mean_ci_is_the_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert mean_ci([5.0]) == (5.0, pytest.approx(math.nan, nan_ok=True))
    assert mean_ci([])[0] is None


def test_sweep_report_has_every_table_and_figure(tmp_path):
    runs = make_sweep(tmp_path / "sweep", grad_cos=True)
    html_path = write_report([tmp_path / "sweep"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    for heading in ("Forgetting by method and model size", "Table 2 — retained loss",
                    "Table 4 — learned loss", "Union loss after the last task",
                    "Validation loss over training", "Scaling", "Power-law fits",
                    "Replay or a bigger model?", "Gradient alignment", "Compute", "All runs"):
        assert heading in md, heading
    figs = {p.name for p in (tmp_path / "out" / "figures").glob("*.png")}
    assert figs == {"forgetting.png", "val_curves.png", "union_curves.png",
                    "scaling_flops.png", "scaling_params.png", "grad_alignment.png"}

    # The forgetting cell of replay on tiny is the t-interval over its three seeds.
    values = [read_summary(r)["forgetting"] for r in runs
              if r.name.startswith("replay-a0.25_tiny")]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    cells = _md_row(md, "Forgetting by method", "replay α=0.25")
    assert cells[1] == f"{np.mean(values):+.3f} ± {half:.3f} (n=3)"
    # Retained loss: smaller model columns first, then larger.
    header = md[md.index("Table 2"):].splitlines()[2]
    assert header.index("tiny") < header.index("small")

    html = html_path.read_text()
    srcs = re.findall(r"src='([^']*)'", html)
    assert len(srcs) == len(figs)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "href=" not in html  # nothing outside the file


def test_figures_are_not_blank(tmp_path):
    make_sweep(tmp_path / "s", seeds=(0, 1), grad_cos=True)
    write_report([tmp_path / "s"], tmp_path / "out")
    # Named, not globbed: a report that drew no figure at all must fail here, not pass.
    expected = ("forgetting", "val_curves", "union_curves", "scaling_flops", "scaling_params",
                "grad_alignment")
    figs = tmp_path / "out" / "figures"
    assert sorted(p.stem for p in figs.glob("*.png")) == sorted(expected)
    for name in expected:
        png = figs / f"{name}.png"
        img = imread(png)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.05, png.name


def test_single_run_report_shows_what_applies(tmp_path):
    run = make_run(tmp_path, "sequential")
    write_report([run], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    s = read_summary(run)
    assert _md_row(md, "Forgetting by method", "sequential")[1] == f"{s['forgetting']:+.3f} (n=1)"
    assert "Scaling" not in md and "Downstream" not in md and "Gradient alignment" not in md
    assert (tmp_path / "out" / "figures" / "val_curves.png").is_file()
    assert "after en" in md  # its loss matrix


def test_incomplete_runs_are_listed_but_left_out_of_the_tables(tmp_path):
    make_run(tmp_path / "s", "sequential", seed=0)
    make_run(tmp_path / "s", "sequential", seed=1, rows=2)
    runs, _ = collect_runs([tmp_path / "s"])
    assert len(runs) == 2
    write_report([tmp_path / "s"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1 in progress" in md
    assert _md_row(md, "Forgetting by method", "sequential")[1].endswith("(n=1)")
    assert _md_row(md, "All runs", "sequential_tiny_s1_en-fr-de")[-1] == "no (2 tasks)"


def test_no_runs_or_damaged_summaries(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no runs found"):
        write_report([tmp_path / "empty"], tmp_path / "empty" / "report")
    assert not any((tmp_path / "empty").iterdir())  # no half-made report left behind
    with pytest.raises(ConfigError, match="missing is not a directory"):
        write_report([tmp_path / "missing"], tmp_path / "missing" / "report")
    assert not (tmp_path / "missing").exists()
    make_run(tmp_path / "s", "sequential")
    bad = tmp_path / "s" / "broken"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    runs, notes = collect_runs([tmp_path / "s"])
    assert len(runs) == 1 and "unreadable summary.json" in notes[0]


@pytest.mark.slow
def test_report_of_a_real_micro_sweep(tmp_path, prepared_dir):
    from cptrain.config_base import build_config
    from cptrain.sweep import SweepConfig, run_sweep

    cfg = build_config(SweepConfig, {
        "out_dir": str(tmp_path / "sweep"),
        "base": {
            "data": {"dir": str(prepared_dir), "tasks": ["email", "xml", "asyncio"],
                     "tokens_per_task": 8 * 32 * 4},
            "train": {"seq_len": 32, "batch_size": 8, "lr": 3e-3, "log_every": 2},
            "eval": {"windows": 8, "batch_size": 8, "every": 2},
            "reptile": {"k": 2, "epsilon": 0.5},
            "diagnostics": {"every": 2},
        },
        "grid": {"methods": ["sequential", "mer"], "alphas": [0.5], "presets": ["tiny"]},
    })
    run_sweep(cfg, progress=False)
    html = write_report([tmp_path / "sweep"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert html.is_file()
    for row in ("sequential", "MER α=0.5"):
        assert _md_row(md, "Table 2", row)[1].endswith("(n=1)")
    figs = {p.name for p in (tmp_path / "out" / "figures").glob("*.png")}
    assert {"forgetting.png", "val_curves.png", "union_curves.png", "grad_alignment.png",
            "scaling_flops.png"} <= figs
    s = read_summary(tmp_path / "sweep" / "mer-a0.5_tiny_s0_email-xml-asyncio")
    f = run_flops(s)
    assert f["tokens_processed"] == s["fresh_tokens"] + s["replay_tokens"]
    assert f["reptile_updates"] == s["reptile_updates"] == s["steps"] // 2
    assert s["rows_per_step"] == {"fresh": 4, "replay": 4}
    assert s["model_shape"] == {**dataclasses.asdict(preset_shape("tiny", 1)),
                                "vocab": s["model_shape"]["vocab"]}
