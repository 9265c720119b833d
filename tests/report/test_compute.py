"""report/compute.py: the compute table (FLOPs from the summary or computed, and what an older
summary lacks) and the replay-versus-size sentences, each setting against its own baseline."""

import json

from conftest import read_summary

from cptrain.models.flops import run_flops
from cptrain.report.document import write_report
from report.test_document import _md_row, make_run
from report.test_studies import _write_run


def test_flops_are_taken_from_the_summary_or_computed(tmp_path):
    sentinel = {"flops_per_token": 123456789, "flops_per_incoming_token": 2.5e8,
                "total_flops": 7e12, "reptile_flops": 0, "convention": "test"}
    make_run(tmp_path / "a", "sequential", flops=sentinel)
    write_report([tmp_path / "a"], tmp_path / "oa")
    assert "1.23e+08" in (tmp_path / "oa" / "report.md").read_text()

    run = make_run(tmp_path / "b", "replay", 0.25)  # no "flops": computed from its facts
    write_report([tmp_path / "b"], tmp_path / "ob")
    expected = run_flops(read_summary(run))
    row = _md_row((tmp_path / "ob" / "report.md").read_text(), "Training compute",
                  "replay α=0.25 · tiny")
    assert row[2] == f"{expected['flops_per_token']:.3g}"
    assert row[3] == f"{expected['flops_per_incoming_token']:.3g}"


def test_a_summary_of_an_older_cptrain_shows_no_compute_and_says_why(tmp_path):
    run = make_run(tmp_path / "s", "mer", 0.25)
    s = json.loads((run / "summary.json").read_text())  # as an older cptrain wrote it
    del s["model_shape"], s["rows_per_step"], s["reptile_updates"], s["params"], s["wall_s"]
    del s["fresh_tokens"], s["replay_tokens"]  # as a plain loop's LossMatrix writes it
    (run / "summary.json").write_text(json.dumps(s))
    write_report([tmp_path / "s"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    row = _md_row(md, "Training compute", "MER α=0.25 · tiny")
    assert row[2] == "–"
    assert row[1] == row[6] == row[7] == row[8] == "–"  # unrecorded: not shown as 0
    assert "1 run(s) without compute figures" in md and "--resume" in md
    assert "; ;" not in md  # no convention to name: no empty clause in the caption


def test_a_released_model_run_is_shown_under_its_model_not_the_unused_preset(tmp_path):
    run = make_run(tmp_path / "r", "sequential")
    s = json.loads((run / "summary.json").read_text())
    s["config"]["model"]["init_from"] = "models/smollm2-135m"  # preset stays "tiny", unused
    (run / "summary.json").write_text(json.dumps(s))
    write_report([tmp_path / "r"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert _md_row(md, "Training compute", "sequential · smollm2-135m")[1] != "–"
    assert "· tiny" not in md


def test_replay_of_two_settings_meets_only_the_baseline_of_its_own(tmp_path):
    """Replay runs of two budgets are two sentences, each against sequential of its budget
    (never one mean over both); a replay run's unused Reptile keys split nothing."""
    from cptrain.report.document import collect_runs

    root = tmp_path / "runs"
    for tokens, shift in ((100_000, 0.0), (150_000, 1.0)):
        for method, alpha, loss in (("sequential", 0.0, 6.0), ("replay", 0.25, 5.0)):
            if method == "sequential" and tokens == 150_000:
                continue  # the second budget has no baseline
            for seed in (0, 1):
                name = f"{method}_{tokens}_s{seed}"
                _write_run(root, name, method=method, alpha=alpha, seed=seed,
                           lm=[[loss + shift, 9.0], [loss + shift, loss + shift]],
                           fpt=8000.0 if alpha else 6000.0)
                summary = json.loads((root / name / "summary.json").read_text())
                summary["config"]["data"] = {"tokens_per_task": tokens}
                summary["config"]["reptile"]["k"] = 5 if seed else 500  # unused: no Reptile
                (root / name / "summary.json").write_text(json.dumps(summary))
    runs, notes = collect_runs([root])
    assert not any("reptile" in n for n in notes)
    assert len({r.group for r in runs if r.method == "sequential"}) == 1
    write_report([root], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    lines = [line for line in md.splitlines() if " on tiny reaches retained loss" in line]
    assert len(lines) == 1, lines  # the 150k replay runs have no baseline of their own
    assert "[data.tokens_per_task=100000]" in lines[0] and "loss 5.000 " in lines[0]

