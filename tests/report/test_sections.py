"""report/sections.py: the overview and its precision caution, the metric tables with their
tests, the downstream table and the list of all runs."""

import json
import math
from pathlib import Path

import numpy as np
from conftest import read_summary
from scipy import stats

from cptrain.report.document import write_report
from report.test_document import _md_row, make_run
from report.test_studies import _write_run


def test_overview_cautions_when_runs_trained_at_different_precisions(tmp_path):
    def overview(root: Path, small_precision: str) -> str:
        for preset, precision in (("tiny", "fp32"), ("small", small_precision)):
            for seed in (0, 1):
                make_run(root, "replay", 0.25, preset, seed, precision=precision)
        make_run(root, "sequential", 0.0, "tiny", 0, rows=2, precision="bf16")  # in progress
        write_report([root], root / "out")
        return (root / "out" / "report.md").read_text().split("\n## ")[1]

    assert "different precisions" not in overview(tmp_path / "one", "fp32")
    # `precision: auto` picked bf16 for the wider model only
    mixed = overview(tmp_path / "two", "bf16")
    assert mixed.startswith("Overview")
    assert ("different precisions (bf16: small replay α=0.25; fp32: tiny replay α=0.25)"
            in mixed)


def test_paper_code_forgetting_is_shown_beside_forgetting_and_older_runs_show_a_dash(tmp_path):
    new, old = make_run(tmp_path / "s", "sequential", seed=0), make_run(tmp_path / "s", seed=1)
    for run, value in ((new, -0.4321), (old, None)):
        s = read_summary(run)
        s.pop("forgetting_paper_code", None)  # an older cptrain wrote no such key
        if value is not None:
            s["forgetting_paper_code"] = value
        (run / "summary.json").write_text(json.dumps(s))
    write_report([tmp_path / "s"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    header = md[md.index("## All runs"):].split("| run |")[1].splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    at = 1 + cols.index("forgetting (paper code)")
    assert cols[at - 2] == "forgetting"  # next to cptrain's own figure
    assert _md_row(md, "All runs", new.name)[at] == "-0.432"
    assert _md_row(md, "All runs", old.name)[at] == "–"
    assert _md_row(md, "Forgetting as the paper's official code", "sequential")[1] == (
        "-0.432 (n=1)")  # n counts the seeds that have it


def test_downstream_scores_are_tabulated(tmp_path):
    for seed, acc in ((0, 0.30), (1, 0.40)):
        make_run(tmp_path / "s", "replay", 0.25, seed=seed, downstream={
            "cptrain_choice_en": {"acc": acc - 0.05, "acc_norm": acc},
            "cptrain_bpb_en": {"bits_per_byte": 2.0 + seed},
        })
    write_report([tmp_path / "s"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    row = _md_row(md, "Downstream evaluation", "replay α=0.25 · tiny (n=2)")
    header = md[md.index("Downstream evaluation"):].split("| model |")[1].splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    half = stats.t.ppf(0.975, 1) * np.std([0.3, 0.4], ddof=1) / math.sqrt(2)
    assert row[1 + cols.index("cptrain_choice_en (acc_norm)")] == f"0.350 ± {half:.3f}"
    assert row[1 + cols.index("cptrain_bpb_en (bits_per_byte)")].startswith("2.500")


def test_metric_tables_say_no_significant_difference_where_intervals_overlap(tmp_path):
    root = tmp_path / "o"
    for seed in range(3):
        j = 0.05 * seed
        _write_run(root, f"seq-{seed}", method="sequential", alpha=0.0, seed=seed,
                   lm=[[5.0, 9.0], [7.0 + j, 5.0]])
        _write_run(root, f"rep-{seed}", method="replay", alpha=0.25, seed=seed,
                   lm=[[5.0, 9.0], [5.5 + j, 5.0]])
        _write_run(root, f"mer-{seed}", method="mer", alpha=0.25, seed=seed,
                   lm=[[5.0, 9.0], [5.52 + j, 5.0]])
    write_report([root], root / "report")
    md = (root / "report" / "report.md").read_text()
    line = next(s for s in md.splitlines() if s.startswith("Forgetting, tiny:"))
    assert "lowest mean replay α=0.25" in line
    # Welch t-tests Holm-adjusted over the 3 pairs of methods: replay vs MER (0.02 apart) has
    # the largest raw p, so Holm leaves it as it is (× 1)
    p = stats.ttest_ind([0.5, 0.55, 0.6], [0.52, 0.57, 0.62], equal_var=False).pvalue
    assert f"no significant difference from MER α=0.25 (Holm p = {p:.2g})" in line
    assert "1 method(s) significantly higher: sequential (Holm p < 0.001)" in line
    assert "across 3 pair(s) of methods" in line
    assert "n = 3 seeds per method and size. Caution: with n < 5" in md

