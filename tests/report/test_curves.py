"""report/curves.py: loss curves from the runs' metrics.jsonl, the mean over seeds at the steps
every seed logged, with task boundaries (paper Fig. 2), and the gradient-alignment section."""

import json
import math

import pytest

from cptrain.report import curves
from cptrain.report.blocks import Figure, Table
from cptrain.report.document import collect_runs
from cptrain.report.runs import Groups
from report.test_document import TASKS, make_run


@pytest.fixture
def drawn(monkeypatch):
    """The panels each curves figure was asked to draw, by file name (drawn for real too)."""
    seen = {}
    real = curves.curves_figure

    def capture(panels, path, **kw):
        seen[path.name] = panels
        return real(panels, path, **kw)

    monkeypatch.setattr(curves, "curves_figure", capture)
    return seen


def _groups(root):
    runs, _ = collect_runs([root])
    return Groups([r for r in runs if r.complete])


def _write_records(run, records):
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _eval(step, losses, union, kind="eval"):
    return {"type": kind, "step": step, "val_loss": losses, "union_loss": union}


def test_curves_are_the_mean_over_seeds_at_the_steps_every_seed_logged(tmp_path, drawn):
    a, b = (make_run(tmp_path / "s", "sequential", seed=s) for s in (0, 1))
    # step 0: the evaluation before training, logged as `before` by every trainer
    _write_records(a, [_eval(0, {"fr": 3.0, "en": 2.0, "de": 4.0}, 3.0, "before"),
                       _eval(5, {"fr": 3.0, "en": 2.0, "de": 4.0}, 3.0),
                       {"type": "train", "step": 7, "loss": 9.0},
                       _eval(10, {"fr": 2.0, "en": 1.0, "de": None}, 1.5, "task_end")])
    _write_records(b, [_eval(0, {"de": 5.0, "fr": 4.0, "en": 3.0}, 4.0, "before"),
                       _eval(10, {"de": 5.0, "fr": 3.0, "en": 2.0}, 3.5, "task_end"),
                       _eval(15, {"de": 5.0, "fr": 3.0, "en": 2.0}, 3.5)])
    sec = curves.curve_section(_groups(tmp_path / "s"), tmp_path / "fig")
    assert [type(b) for b in sec.blocks] == [Figure, Figure]
    assert (tmp_path / "fig" / "val_curves.png").is_file()
    (panel,) = drawn["val_curves.png"]
    assert list(panel.series) == TASKS  # training order, whatever order the records list
    assert panel.series["en"] == ([0, 10], [2.5, 1.5])  # step 5 and 15: one seed only
    assert panel.series["fr"] == ([0, 10], [3.5, 2.5])
    assert panel.series["de"] == ([0], [4.5])  # not logged by seed 0 at step 10
    assert (panel.boundaries, panel.boundary_labels) == ([10, 20], TASKS)
    assert "mean of 2 seed(s)" in panel.title
    (union,) = drawn["union_curves.png"]
    xs, ys = union.series["sequential"]
    assert (xs, ys) == ([0, 10], [3.5, 2.5])


def test_runs_without_eval_records_get_a_note_and_no_figure(tmp_path):
    run = make_run(tmp_path / "s", "sequential")
    _write_records(run, [{"type": "train", "step": 1, "loss": 5.0}])
    sec = curves.curve_section(_groups(tmp_path / "s"), tmp_path / "fig")
    assert len(sec.blocks) == 1 and sec.blocks[0].startswith("No eval records in metrics.jsonl")
    assert not (tmp_path / "fig").exists() or not any((tmp_path / "fig").iterdir())


def test_the_alignment_section_needs_gradient_cosines_and_skips_non_finite_ones(tmp_path,
                                                                              drawn):
    make_run(tmp_path / "plain", "sequential")
    assert curves.alignment_section(_groups(tmp_path / "plain"), tmp_path / "fig") is None
    run = make_run(tmp_path / "cos", "replay", 0.25, grad_cos=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "grad_cos" in r]
    records.append({"type": "train", "step": 31, "loss": 5.0, "grad_cos": math.nan})
    _write_records(run, records)
    sec = curves.alignment_section(_groups(tmp_path / "cos"), tmp_path / "fig")
    assert sec is not None and isinstance(sec.blocks[0], Table)
    assert sec.blocks[0].rows == [["replay α=0.25", "+0.050 (n=1)"]]  # the summary's mean
    assert isinstance(sec.blocks[1], Figure) and sec.blocks[1].path.name == "grad_alignment.png"
    (panel,) = drawn["grad_alignment.png"]
    xs, ys = panel.series["replay α=0.25"]
    assert xs == logged and all(math.isfinite(y) for y in ys)
