"""report/runs.py: the runs a report finds, how they are named, and runs of one label kept apart
where they differ in more than their seed."""

import json

from conftest import read_summary

from cptrain.report.document import collect_runs, write_report
from report.test_document import make_run
from report.test_studies import _write_run


def test_groups_are_named_by_the_method_table(tmp_path):
    make_run(tmp_path / "s", "mer", 0.25)
    make_run(tmp_path / "s", "reptile")
    cfg_only = make_run(tmp_path / "s", "replay", 0.25, name="custom")
    s = read_summary(cfg_only)
    del s["config"]["method"]  # replay keys only: still recognised as replay
    (cfg_only / "summary.json").write_text(json.dumps(s))
    runs, _ = collect_runs([tmp_path / "s"])
    assert {(r.method, r.group) for r in runs} == {
        ("mer", "MER α=0.25"), ("reptile", "Reptile"), ("replay", "replay α=0.25")}


def test_sweep_labels_name_the_groups(tmp_path):
    make_run(tmp_path / "s", "reptile", name="reptile-k50_tiny_s0_en-fr-de")
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(
        {"runs": [{"name": "reptile-k50_tiny_s0_en-fr-de", "label": "reptile-k50"}]}))
    runs, _ = collect_runs([tmp_path / "s"])
    assert runs[0].group == "reptile-k50" and runs[0].method == "reptile"


def test_runs_are_found_at_any_depth_but_not_inside_runs(tmp_path):
    run = make_run(tmp_path / "a" / "b", "sequential", name="replay")  # a run named like a folder
    inner = run / "checkpoints" / "step_3"
    inner.mkdir(parents=True)
    (inner / "summary.json").write_text((run / "summary.json").read_text())
    make_run(tmp_path / "c", "sequential")
    runs, _ = collect_runs([tmp_path])
    assert sorted(r.dir for r in runs) == sorted([run, tmp_path / "c" /
                                                  "sequential_tiny_s0_en-fr-de"])


def test_a_group_label_shows_the_effective_alpha_when_rows_round(tmp_path):
    from cptrain.report.document import collect_runs

    root, coords = tmp_path / "alpha", []
    for name, rows in (("exact", {"fresh": 12, "replay": 4}), ("rounded", {"fresh": 11,
                                                                          "replay": 5})):
        _write_run(root, name, method="replay", alpha=0.25 if name == "exact" else 0.3,
                   seed=0, lm=[[5.0, 9.0], [6.0, 5.5]], coords=coords)
        summary = json.loads((root / name / "summary.json").read_text())
        summary["rows_per_step"] = rows
        (root / name / "summary.json").write_text(json.dumps(summary))
    runs, _ = collect_runs([root])
    assert sorted(r.group for r in runs) == ["replay α=0.25", "replay α=0.3 (effective 0.312)"]


def test_runs_of_one_method_with_other_settings_are_never_pooled_as_seeds(tmp_path):
    from cptrain.report.document import collect_runs

    a, b = tmp_path / "a", tmp_path / "b"
    for root, tokens, seeds in ((a, 200_000, (0, 1)), (b, 24_000, (0,))):
        for seed in seeds:
            name = f"sequential_s{seed}"
            _write_run(root, name, method="sequential", alpha=0.0, seed=seed,
                       lm=[[5.0, 9.0], [6.0, 5.5]])
            summary = json.loads((root / name / "summary.json").read_text())
            summary["config"]["data"] = {"tokens_per_task": tokens}
            (root / name / "summary.json").write_text(json.dumps(summary))
    runs, notes = collect_runs([a, b])
    groups = sorted({r.group for r in runs})
    assert groups == ["sequential [data.tokens_per_task=200000]",
                      "sequential [data.tokens_per_task=24000]"]
    assert any("differ in data.tokens_per_task" in n and "never pooled" in n for n in notes)
    # the same setting and seed twice: flagged as a repeat, not a second seed
    runs, notes = collect_runs([a, a])
    assert any("2 runs of seed 0 with the same settings" in n for n in notes)
    write_report([a, b], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "never pooled as seeds" in md and "(n=3)" not in md

