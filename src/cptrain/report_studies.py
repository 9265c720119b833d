"""Report sections for study sweeps: paired differences against a baseline method, the Reptile
map (k × ε heatmaps), the replay-ratio curve and size against replay at equal FLOPs.

Each section appears only when the runs contain what it needs. Differences are paired run by
run (same seed, preset, task order and the baseline's own axis values), so seed-to-seed noise
shared by both runs cancels; intervals are 95% t-intervals, and an interval that contains 0 is
reported as "no significant difference", never as a ranking.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from cptrain.config import METHODS
from cptrain.presets import PRESETS
from cptrain.report import (
    Figure,
    Run,
    Section,
    Table,
    _fmt,
    axes_text,
    mean_ci,
    precision_caution,
)
from cptrain.report_figures import heatmap_figure, ratio_figure

METRICS = (("retained_loss", "retained"), ("learned_loss", "learned"), ("forgetting", "forgetting"))

# Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train LLMs"), 405M,
# Pile → German: final loss on the old and the new task per replay fraction, and the
# union-trained baseline. Shown for the shape of the curve, not to compare values.
IBRAHIM = {0.0: (3.56, 1.11), 0.01: (2.83, 1.12), 0.05: (2.57, 1.12), 0.1: (2.46, 1.13),
           0.25: (2.33, 1.16), 0.5: (2.24, 1.22)}
IBRAHIM_UNION = (2.26, 1.25)


def verdict(mean: float | None, half: float) -> str:
    """Words for a difference: significant only when its 95% interval excludes 0."""
    if mean is None or not math.isfinite(mean):
        return "–"
    if not math.isfinite(half):
        return "one pair, no interval"
    if abs(mean) <= half:
        return "no significant difference"
    return "significantly lower" if mean < 0 else "significantly higher"


def pairs(runs: Sequence[Run], baseline: str) -> dict[str, list[tuple[Run, Run]]]:
    """group → [(run, its baseline run)] for every run not of the baseline method."""
    base = [r for r in runs if r.label == baseline]
    out: dict[str, list[tuple[Run, Run]]] = defaultdict(list)
    for r in runs:
        if r.label == baseline:
            continue
        for b in base:
            if (b.seed, b.preset, b.order) == (r.seed, r.preset, r.order) and all(
                r.axes.get(k) == v for k, v in b.axes.items()
            ):
                out[r.group].append((r, b))
                break
    return out


def _delta(pair_list: list[tuple[Run, Run]], key: str) -> tuple[float | None, float]:
    vals = [r.summary.get(key) - b.summary.get(key) for r, b in pair_list
            if r.summary.get(key) is not None and b.summary.get(key) is not None]
    return mean_ci(vals)


def paired_section(done: Sequence[Run], baseline: str | None) -> Section | None:
    if not baseline:
        return None
    found = pairs(done, baseline)
    if not found:
        return None
    sec = Section(f"Paired differences against {baseline}")
    sec.blocks.append(
        f"Each run minus the {baseline} run of the same seed, size, task order and shared "
        "settings; mean ± 95% t-interval over the pairs. Negative = lower loss (better) than "
        f"{baseline}. A difference counts only when its interval excludes 0."
    )
    rows, counts = [], {k: defaultdict(int) for k, _ in METRICS}
    for grp in sorted(found, key=lambda g: (len(g), g)):
        cells = []
        for key, _ in METRICS:
            mean, half = _delta(found[grp], key)
            word = verdict(mean, half)
            counts[key][word] += 1
            cells.append(f"{_fmt(mean, half, signed=True)} ({word})")
        rows.append([grp, str(len(found[grp])), *cells])
    sec.blocks.append(Table(["run group", "pairs", *(f"Δ {n}" for _, n in METRICS)], rows))
    for key, name in METRICS:
        c = counts[key]
        sec.blocks.append(
            f"Δ {name}: {c['significantly lower']} setting(s) significantly lower, "
            f"{c['significantly higher']} significantly higher, {c['no significant difference']} "
            f"with no significant difference (of {sum(c.values())})."
        )
    return sec


# ------------------------------------------------------------------------------ Reptile map
def _map_axes(runs: Sequence[Run]) -> tuple[str, str] | None:
    for r in runs:
        keys = {v: k for k, v in r.axis_keys.items()}
        if "reptile.k" in keys and "reptile.epsilon" in keys:
            return keys["reptile.k"], keys["reptile.epsilon"]
    return None


def reptile_map_section(done: Sequence[Run], baseline: str | None, fig_dir: Path) -> Section | None:
    if not baseline:
        return None
    found = pairs(done, baseline)
    mapped = [(r, b) for ps in found.values() for r, b in ps]
    labels = _map_axes([r for r, _ in mapped])
    if labels is None:
        return None
    k_lab, e_lab = labels
    cells: dict[tuple[Any, ...], list[tuple[Run, Run]]] = defaultdict(list)
    panel_keys: dict[str, tuple[Any, ...]] = {}
    for r, b in mapped:
        if k_lab in r.axes and e_lab in r.axes:
            panel = axes_text(b.axes)
            panel_keys[panel] = tuple(b.axes.values())  # sort panels by value, not by text
            cells[(panel, r.axes[k_lab], r.axes[e_lab])].append((r, b))
    panels = sorted(panel_keys, key=panel_keys.__getitem__)
    ks = sorted({c[1] for c in cells})
    es = sorted({c[2] for c in cells})
    sec = Section("The Reptile map: MER − replay over k × ε")
    sec.blocks.append(
        f"Each cell: mean over seeds of (run with Reptile every k steps at ε) − ({baseline} run "
        "of the same seed and the same other settings); * marks cells whose 95% interval "
        "excludes 0. Negative = Reptile lowered the loss (or the forgetting)."
    )
    grids: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for key, name in METRICS:
        grids[name] = {}
        for panel in panels:
            mean = np.full((len(ks), len(es)), np.nan)
            sig = np.zeros((len(ks), len(es)), dtype=bool)
            rows = []
            for i, k in enumerate(ks):
                row = [f"{panel} k={k:g}"]
                for j, e in enumerate(es):
                    m, h = _delta(cells.get((panel, k, e), []), key)
                    if m is not None:
                        mean[i, j] = m
                        sig[i, j] = math.isfinite(h) and abs(m) > h
                    row.append(_fmt(m, h, signed=True) + (" *" if sig[i, j] else ""))
                rows.append(row)
            grids[name][panel] = (mean, sig)
            sec.blocks.append(Table(["setting", *(f"ε={e:g}" for e in es)], rows,
                                    f"Δ {name} (MER − {baseline}) · {panel}"))
    path = heatmap_figure(grids, [f"{k:g}" for k in ks], [f"{e:g}" for e in es],
                          fig_dir / "reptile_map.png", row_label="k", col_label="ε")
    if path:
        sec.blocks.insert(1, Figure(path, f"Δ (MER − {baseline}) per k × ε; rows: retained, "
                                          "learned, forgetting; columns: learning rate and "
                                          "tokens per task; * = 95% interval excludes 0."))
    for name in ("retained", "learned", "forgetting"):
        n_sig = sum(int(s.sum()) for _, s in grids[name].values())
        n_lo = sum(int(((m < 0) & s).sum()) for m, s in grids[name].values())
        total = sum(int(np.isfinite(m).sum()) for m, _ in grids[name].values())
        sec.blocks.append(f"Δ {name}: {n_lo} of {total} cells significantly lower, "
                          f"{n_sig - n_lo} significantly higher, {total - n_sig} with no "
                          "significant difference.")
    return sec


# ------------------------------------------------------------------------------ replay ratio
def _plain_sequential(r: Run) -> bool:
    spec = METHODS.get(r.method)
    return spec is not None and spec.sampler == "sequential" and not spec.reptile


def _rewarm(r: Run) -> bool:
    return bool(r.summary["config"].get("train", {}).get("rewarm_each_task"))


def replay_ratio_section(done: Sequence[Run], fig_dir: Path) -> Section | None:
    """Old- and new-task final loss against α on a two-task shift (Ibrahim et al. 2024)."""
    two = [r for r in done if len(r.order) == 2 and len(r.summary["loss_matrix"]) == 2]
    curves: dict[tuple[Any, ...], dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in two:
        if _plain_sequential(r) and not r.axes:
            curves[(r.preset, r.order, _rewarm(r))][r.alpha].append(r)
    curves = {k: v for k, v in curves.items() if len(v) >= 3 and 0.0 in v}
    if not curves:
        return None
    joint = defaultdict(list)
    for r in two:
        if METHODS.get(r.method) is not None and METHODS[r.method].sampler == "joint":
            joint[(r.preset, r.order)].append(r)

    def final(runs: list[Run], i: int) -> tuple[float | None, float]:
        return mean_ci([r.summary["loss_matrix"][-1][i] for r in runs])

    sec = Section("Replay-ratio curve (Ibrahim et al. 2024, Table 1, in shape)")
    series: dict[str, dict[str, list[tuple[float, float | None, float]]]] = {}
    alphas = sorted({a for c in curves.values() for a in c})
    rows = []
    for (preset, order, rewarm), by_alpha in sorted(curves.items()):
        tag = f"{preset} {'→'.join(order)} {'re-warm' if rewarm else 'no re-warm'}"
        old = [(a, *final(by_alpha[a], 0)) for a in alphas if a in by_alpha]
        new = [(a, *final(by_alpha[a], 1)) for a in alphas if a in by_alpha]
        series[tag] = {"old": old, "new": new}
        olds = [m for _, m, _ in old]
        mono = all(x > y for x, y in zip(olds, olds[1:], strict=False))
        shape = "falls monotonically" if mono else "does not fall monotonically"
        trail = " → ".join(f"{m:.3f}" for m in olds)
        sec.blocks.append(
            f"{tag}: old-task ({order[0]}) loss {shape} as α grows ({trail}); new-task "
            f"({order[1]}) loss {new[0][1]:.3f} at α=0 and {new[-1][1]:.3f} at α={alphas[-1]:g}."
        )
        for a in alphas:
            if a in by_alpha:
                (om, oh), (nm, nh) = final(by_alpha[a], 0), final(by_alpha[a], 1)
                ref = IBRAHIM.get(a)
                rows.append([tag, f"{a:g}", str(len(by_alpha[a])), _fmt(om, oh), _fmt(nm, nh),
                             f"{ref[0]:.2f} / {ref[1]:.2f}" if ref else "–"])
    for (preset, order), runs in sorted(joint.items()):
        (om, oh), (nm, nh) = final(runs, 0), final(runs, 1)
        rows.append([f"{preset} {'→'.join(order)} joint (union)", "–", str(len(runs)),
                     _fmt(om, oh), _fmt(nm, nh),
                     f"{IBRAHIM_UNION[0]:.2f} / {IBRAHIM_UNION[1]:.2f}"])
        for s in series.values():
            s.setdefault("joint", [(math.nan, om, oh), (math.nan, nm, nh)])
    sec.blocks.append(Table(
        ["setting", "α", "seeds", "old-task loss", "new-task loss",
         "Ibrahim et al. old / new (405M, Pile→German)"], rows,
        "Final validation loss after the second task; ± 95% t-interval across seeds. The last "
        "column is the published curve, for its shape only (other data, model and scale)."))
    path = ratio_figure(series, fig_dir / "replay_ratio.png")
    if path:
        sec.blocks.insert(0, Figure(path, "Old-task and new-task loss after the shift against "
                                          "the replay fraction; dashed: joint (union) "
                                          "training; error bars: 95% t-interval."))
    return sec


# ------------------------------------------------------------------------------ size vs replay
def _welch(a: list[float], b: list[float]) -> tuple[float | None, float]:
    """Mean difference a − b and the half width of its Welch 95% interval."""
    if not a or not b:
        return None, math.nan
    d = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return d, math.nan
    if np.var(a) == 0 and np.var(b) == 0:
        return d, 0.0
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return d, float(ci.high - ci.low) / 2


def size_vs_replay_section(done: Sequence[Run]) -> Section | None:
    """The smaller model with replay against the next larger one trained sequentially."""
    by: dict[tuple[Any, ...], list[Run]] = defaultdict(list)
    for r in done:
        if _plain_sequential(r) and not r.axes and not _rewarm(r):
            by[(r.preset, r.order, r.alpha)].append(r)
    presets = sorted({k[0] for k in by}, key=lambda p: list(PRESETS).index(p)
                     if p in PRESETS else len(PRESETS))
    if len(presets) < 2:
        return None
    sec = Section("Replay or a bigger model? (equal FLOPs per incoming token)")

    def vals(runs: list[Run], key: str) -> list[float]:
        return [float(r.summary[key]) for r in runs if r.summary.get(key) is not None]

    def fpt(runs: list[Run]) -> float:
        return float(np.mean([(r.flops or {}).get("flops_per_incoming_token") or math.nan
                              for r in runs]))

    for small, large in zip(presets, presets[1:], strict=False):
        for order in sorted({k[1] for k in by if k[0] == small}):
            s0, l0 = by.get((small, order, 0.0), []), by.get((large, order, 0.0), [])
            if not s0 or not l0:
                continue
            n_ratio = np.mean([r.summary["params"] for r in l0]) / np.mean(
                [r.summary["params"] for r in s0])
            d, h = _welch(vals(l0, "learned_loss"), vals(s0, "learned_loss"))
            valid = d is not None and d < 0 and (not math.isfinite(h) or abs(d) > h)
            replays = {a: runs for (p, o, a), runs in sorted(by.items())
                       if p == small and o == order and a}
            compared = [*s0, *l0, *(r for runs in replays.values() for r in runs)]
            caution = precision_caution(compared, "size")
            if caution:
                sec.blocks.append(caution)
            sec.blocks.append(
                f"{large} ({n_ratio:.2f}× the parameters, {fpt(l0) / fpt(s0):.2f}× the FLOPs "
                f"per incoming token of {small}) trained sequentially: learned loss "
                f"{_fmt(d, h, signed=True)} against {small} ({verdict(d, h)})."
            )
            if not valid:
                sec.blocks.append(
                    f"The comparison is void at this budget: the larger model does not reach a "
                    f"significantly lower loss than {small}, so it cannot show what size buys."
                )
                continue
            rows = []
            for a, runs in replays.items():
                dd, hh = _welch(vals(runs, "retained_loss"), vals(l0, "retained_loss"))
                df_, hf = _welch(vals(runs, "forgetting"), vals(l0, "forgetting"))
                dl, hl = _welch(vals(runs, "learned_loss"), vals(l0, "learned_loss"))
                rows.append([f"{small} α={a:g}", f"{fpt(runs) / fpt(s0):.2f}×",
                             f"{fpt(l0) / fpt(s0):.2f}×", _fmt(dd, hh, signed=True),
                             verdict(dd, hh), _fmt(df_, hf, signed=True), verdict(df_, hf),
                             _fmt(dl, hl, signed=True), verdict(dl, hl)])
            if rows:
                sec.blocks.append(Table(
                    ["replay run", "its FLOPs/incoming token", f"{large}'s", "Δ retained vs "
                     f"{large} sequential", "", "Δ forgetting", "", "Δ learned", ""], rows,
                    f"{'→'.join(order)}: replay on {small} minus {large} trained sequentially; "
                    "Welch 95% intervals (unpaired: different models). Negative = replay "
                    "better."))
    return sec if sec.blocks else None
