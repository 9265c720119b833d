"""Multiple-comparison control in reports: Holm and Benjamini–Hochberg against hand-worked and
scipy values, and a planted Reptile map whose one borderline cell (p ≈ .04 on 3 pairs, as in
the audit of issue 20) must not be called significant once the map's cells are a family."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cptrain.report.document import write_report
from cptrain.report.stats import (
    Comparison,
    benjamini_hochberg,
    holm,
    n_note,
    paired_test,
    verdict,
    welch_test,
)
from report.test_studies import _manifest, _write_run

P = [0.01, 0.04, 0.03, 0.005, 0.2]


def test_holm_matches_a_hand_worked_example():
    # sorted: .005 .01 .03 .04 .2, times 5 4 3 2 1 = .025 .04 .09 .08 .2, then running max
    assert holm(P) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1, still monotone
    # a cell without a test (one pair) is not part of the family
    out = holm([0.01, math.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


def test_benjamini_hochberg_matches_scipy_and_a_hand_worked_example():
    # sorted p × m / rank = .025 .025 .05 .05 .2, then running min from the top
    assert benjamini_hochberg(P) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])
    assert benjamini_hochberg(P) == pytest.approx(stats.false_discovery_control(P).tolist())


def test_tests_and_words():
    t = paired_test([-0.10, -0.16, -0.22])
    assert t.p == pytest.approx(stats.ttest_1samp([-0.10, -0.16, -0.22], 0).pvalue)
    assert t.p < 0.05 and abs(t.mean) > t.half  # the uncorrected interval excludes 0 ...
    assert verdict(t, t.p) == "significantly lower"
    assert verdict(t, holm([t.p] * 6)[0]) == "no significant difference"  # ... Holm over 6 not
    assert verdict(Comparison(0.2, 0.1, 0.001, 3), 0.001) == "significantly higher"
    assert verdict(paired_test([0.3]), math.nan) == "one pair, no interval"
    assert paired_test([0.2, 0.2, 0.2]).p == 0.0 and paired_test([0.0, 0.0]).p == 1.0
    w = welch_test([1.0, 1.2, 1.1], [2.0, 2.5, 2.1, 2.2])
    ref = stats.ttest_ind([1.0, 1.2, 1.1], [2.0, 2.5, 2.1, 2.2], equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert w.p == pytest.approx(ref.pvalue) and w.n == 3
    assert w.half == pytest.approx((ci.high - ci.low) / 2)
    # a group of identical values has variance 0; the other group's spread still counts
    assert welch_test([1.0, 1.0, 1.0], [2.0, 2.5, 2.1]).p == pytest.approx(
        stats.ttest_1samp([2.0, 2.5, 2.1], 1.0).pvalue)
    assert "Caution" in n_note([3, 3], "pairs", paired=True)
    assert "cannot go below p = 0.25" in n_note([3], "pairs", paired=True)
    assert n_note([5, 6], "pairs", paired=True) == "n = 5–6 pairs."


# Paired differences (MER − replay) in forgetting per (k, ε) cell, three seeds each. (5, 0.5)
# is a clear effect; (5, 0.9) is the audit's kind of cell: t ≈ 4.6 on 2 df, p ≈ .044, so its
# 95% interval excludes 0 but it cannot survive a correction over 6 cells.
PLANTED = {
    (5, 0.1): [0.05, -0.05, 0.02], (5, 0.5): [-0.30, -0.31, -0.29],
    (5, 0.9): [-0.10, -0.16, -0.22], (20, 0.1): [0.10, -0.02, -0.05],
    (20, 0.5): [-0.03, 0.04, 0.00], (20, 0.9): [0.02, 0.06, -0.07],
}


def _hand_holm(ps: list[float]) -> list[float]:
    # textbook form: adj_(i) = max over j ≤ i of min(1, (m − j + 1) p_(j))
    order = np.argsort(ps)
    scaled = np.minimum(1.0, (len(ps) - np.arange(len(ps))) * np.asarray(ps)[order])
    out = np.empty(len(ps))
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


def test_planted_map_is_corrected_across_its_cells(tmp_path):
    root, coords = tmp_path / "map", []
    for seed in range(3):
        base_en = 6.0 + 0.5 * seed
        _write_run(root, f"replay_s{seed}", method="replay", alpha=0.25, seed=seed,
                   lm=[[5.0, 9.0], [base_en, 5.5]], axes={"lr": 0.003}, coords=coords)
        for (k, e), shifts in PLANTED.items():
            _write_run(root, f"mer-k{k}-e{e}_s{seed}", method="mer", alpha=0.25, seed=seed,
                       lm=[[5.0, 9.0], [base_en + shifts[seed], 5.5]],
                       axes={"lr": 0.003, "k": k, "e": e}, coords=coords)
    _manifest(root, coords, "replay")
    write_report([root], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()

    raw = [stats.ttest_1samp(d, 0).pvalue for d in PLANTED.values()]
    adj = dict(zip(PLANTED, _hand_holm(raw), strict=True))
    assert sum(p < 0.05 for p in raw) == 2 and sum(p < 0.05 for p in adj.values()) == 1
    section = md.split("## The Reptile map")[1].split("\n## ")[0]
    table = section.split("Δ forgetting (MER − replay)")[1].split("\n\n")[1]
    shown = {}
    for k in (5, 20):
        line = next(s for s in table.splitlines() if f"k={k} " in s)
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        shown.update({(k, e): text for e, text in zip((0.1, 0.5, 0.9), cells, strict=True)})
    # (5, 0.9)'s interval excludes 0, yet Holm over the 6 cells leaves it unmarked
    assert {c for c, text in shown.items() if text.endswith("*")} == {(5, 0.5)}, shown
    for c, text in shown.items():
        assert text.startswith(f"{np.mean(PLANTED[c]):+.3f} ± "), text
        assert f"(Holm p = {adj[c]:.2g})" in text, (text, adj[c])
    assert "1 of 6 cells significantly lower, 0 significantly higher, 5 with no" in section
    assert "Before the correction 2 cell(s) had p < 0.05" in section
    assert "Holm-adjusted p < 0.05 across the 6 cells" in section
    assert "n = 3 pairs per cell. Caution: with n < 5" in section

    # The paired table is the same family per metric: same adjusted p, words to match.
    paired = md.split("## Paired differences against replay")[1].split("\n## ")[0]
    row = next(s for s in paired.splitlines() if s.startswith("| mer α=0.25 lr=0.003 k=5 e=0.9"))
    assert f"(Holm p = {adj[(5, 0.9)]:.2g}, no significant difference) |" in row
    row = next(s for s in paired.splitlines() if s.startswith("| mer α=0.25 lr=0.003 k=5 e=0.5"))
    assert f"(Holm p = {adj[(5, 0.5)]:.2g}, significantly lower) |" in row
    assert "Δ forgetting: 1 setting(s) significantly lower, 0 significantly higher, 5" in paired
