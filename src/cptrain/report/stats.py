"""Significance in reports: t-intervals, paired and Welch t-tests, and Holm's correction.

A table or map makes many comparisons at once; at the 5 % level 36 cells with no effect at all
show about 1.8 "significant" cells by chance, so no single cell's 95 % interval decides. Every
"significant" a report prints is instead a Holm-adjusted p < 0.05 within its family: the
comparisons of one metric in one table or map (one metric, so that the paired table and the
Reptile map give the same cell the same adjusted p). Holm controls the chance of any false
"significant" in the family, under any dependence between the cells; Benjamini–Hochberg (false
discovery rate) is here for comparison but not used for the words.

Intervals stay 95 % t-intervals, unadjusted: a cell marked significant always has an interval
that excludes 0, but an interval that excludes 0 may not survive the correction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

METHOD = "Holm"
LEVEL = 0.05
# Below this many values per comparison normality cannot be checked from the data, and the
# t-based intervals and p-values rest on it alone.
MIN_N = 5


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> tuple[float | None, float]:
    """Mean and the half width of its t-interval (nan with fewer than two values)."""
    v = _finite(values)
    if v.size == 0:
        return None, math.nan
    if v.size == 1:
        return float(v[0]), math.nan
    half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def fmt(mean: float | None, half: float = math.nan, signed: bool = False, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {half:.{digits}f}" if math.isfinite(half) else "")


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)


def _flat(v: np.ndarray) -> bool:
    """Equal up to float rounding: scipy's t would be a huge number made of rounding noise."""
    return float(np.ptp(v)) <= 1e-9 * max(1.0, float(np.abs(v).max()))


@dataclass(frozen=True)
class Comparison:
    """A difference, the half width of its 95 % t-interval and its two-sided p (nan: no test)."""

    mean: float | None
    half: float
    p: float
    n: int  # pairs, or the smaller group of an unpaired comparison


def paired_test(diffs: Sequence[float | None]) -> Comparison:
    """One-sample t-test of paired differences against 0."""
    v = _finite(diffs)
    mean, half = mean_ci(v.tolist())
    if v.size < 2:
        return Comparison(mean, half, math.nan, int(v.size))
    if _flat(v):  # identical differences: t is infinite (or 0/0 when all are 0)
        return Comparison(mean, half, 1.0 if mean == 0 else 0.0, int(v.size))
    return Comparison(mean, half, float(stats.ttest_1samp(v, 0.0).pvalue), int(v.size))


def welch_test(a: Sequence[float | None], b: Sequence[float | None]) -> Comparison:
    """Mean difference a − b with Welch's interval and p (unequal variances, unpaired)."""
    x, y = _finite(a), _finite(b)
    n = int(min(x.size, y.size))
    if n == 0:
        return Comparison(None, math.nan, math.nan, 0)
    d = float(x.mean() - y.mean())
    if n < 2:
        return Comparison(d, math.nan, math.nan, n)
    # By hand rather than scipy's ttest_ind, which warns on a group of identical values (one
    # seed-independent run, e.g. joint training) though its variance is simply 0.
    vx, vy = (0.0 if _flat(v) else float(v.var(ddof=1)) / v.size for v in (x, y))
    se = math.sqrt(vx + vy)
    if se == 0:
        return Comparison(d, 0.0, 1.0 if d == 0 else 0.0, n)
    df = se**4 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))  # Welch–Satterthwaite
    p = 2 * float(stats.t.sf(abs(d) / se, df))
    return Comparison(d, float(stats.t.ppf(0.975, df)) * se, p, n)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment; nan entries (no test) stay nan and do not count."""
    idx = [i for i, p in enumerate(ps) if math.isfinite(p)]
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: ps[i])):
        # monotone: a smaller raw p never gets a larger adjusted one than a later p
        running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = running
    return out


def benjamini_hochberg(ps: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p (false discovery rate); nan entries stay nan."""
    idx = [i for i, p in enumerate(ps) if math.isfinite(p)]
    out = [math.nan] * len(ps)
    if idx:
        adj = stats.false_discovery_control([ps[i] for i in idx], method="bh")
        for i, a in zip(idx, adj, strict=True):
            out[i] = float(a)
    return out


def adjust(ps: Sequence[float], method: str = METHOD) -> list[float]:
    """The family's adjusted p-values by the project's method (Holm) or by "BH"."""
    return holm(ps) if method == "Holm" else benjamini_hochberg(ps)


def adjust_tests(tests: Sequence[Comparison]) -> list[float]:
    return adjust([t.p for t in tests])


def significant(t: Comparison, p_adj: float) -> bool:
    return t.mean is not None and math.isfinite(p_adj) and p_adj < LEVEL


def verdict(t: Comparison, p_adj: float) -> str:
    """Words for a difference: significant only when its adjusted p is below 0.05."""
    if t.mean is None or not math.isfinite(t.mean):
        return "–"
    if not math.isfinite(p_adj):
        return "one pair, no interval" if t.n < 2 else "no test"
    if p_adj >= LEVEL:
        return "no significant difference"
    return "significantly lower" if t.mean < 0 else "significantly higher"


def p_text(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return f"{METHOD} p < 0.001" if p < 0.001 else f"{METHOD} p = {p:.2g}"


def cell(t: Comparison, p_adj: float, words: bool = True) -> str:
    """``-0.163 ± 0.158 (Holm p = 0.56, no significant difference)``."""
    text = fmt(t.mean, t.half, signed=True)
    if t.mean is None:
        return text
    if not math.isfinite(p_adj):
        return f"{text} ({verdict(t, p_adj)})" if words else text
    return f"{text} ({p_text(p_adj)}" + (f", {verdict(t, p_adj)})" if words else ")")


def n_note(ns: Sequence[int], unit: str, paired: bool) -> str:
    """The number of values per comparison and, below MIN_N, what the intervals rest on."""
    ns = [n for n in ns if n > 0]
    if not ns:
        return ""
    lo, hi = min(ns), max(ns)
    text = f"n = {lo} {unit}" if lo == hi else f"n = {lo}–{hi} {unit}"
    if lo >= MIN_N:
        return text + "."
    text += (f". Caution: with n < {MIN_N} the t-intervals and p-values rest on the assumption "
             f"that the values are normally distributed, which so few values cannot check")
    if paired:  # the floor of a distribution-free test says how little n pairs can show
        text += f" (an exact sign-flip test on {lo} pairs cannot go below p = {2 ** (1 - lo):.2g})"
    return text + "."


def family_note(n_tests: int, what: str) -> str:
    return (f"Significant = {METHOD}-adjusted p < {LEVEL:g} across the {n_tests} {what}; each "
            f"p shown is the {METHOD}-adjusted one.")


def versus_lowest(values: dict[str, list[float]]) -> tuple[str, list[str], list[str]] | None:
    """The group with the lowest mean and, by Welch t-tests Holm-adjusted over every pair of
    groups (so picking the lowest after looking does not inflate the count), the groups
    significantly higher than it and those not distinguishable from it, each with its adjusted
    p. None when a group has fewer than two values: there is no test, so no ranking."""
    vals = {k: _finite(v) for k, v in values.items()}
    vals = {k: v for k, v in vals.items() if v.size}
    if len(vals) < 2 or any(v.size < 2 for v in vals.values()):
        return None
    names = list(vals)
    pair_keys = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    tests = [welch_test(vals[a].tolist(), vals[b].tolist()) for a, b in pair_keys]
    adj = dict(zip(pair_keys, adjust_tests(tests), strict=True))
    best = min(names, key=lambda k: float(vals[k].mean()))
    higher, same = [], []
    for k in names:
        if k == best:
            continue
        p = adj.get((best, k), adj.get((k, best), math.nan))
        (higher if p < LEVEL else same).append(f"{k} ({p_text(p)})")
    return best, higher, same
