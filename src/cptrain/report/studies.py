"""Report sections for study sweeps: paired differences against a baseline method, the Reptile
map (k × ε heatmaps), the replay-ratio curve and size against replay at equal FLOPs.

Each section appears only when the runs contain what it needs. Differences are paired run by
run (same seed, preset, task order and the baseline's own axis values), so seed-to-seed noise
shared by both runs cancels; intervals are 95% t-intervals. "Significant" is decided by
`cptrain.report.stats`: Holm-adjusted p < 0.05 across the comparisons of one metric in the
table or map, never by one interval alone; anything else is "no significant difference", never
a ranking.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.config import METHODS
from cptrain.models.presets import PRESETS
from cptrain.report.blocks import Figure, Section, Table
from cptrain.report.figures import heatmap_figure, ratio_figure
from cptrain.report.runs import Run, axes_text
from cptrain.report.sections import precision_caution
from cptrain.report.stats import (
    LEVEL,
    METHOD,
    Comparison,
    adjust_tests,
    cell,
    family_note,
    fmt,
    mean_ci,
    n_note,
    p_text,
    paired_test,
    significant,
    verdict,
    welch_test,
)

NO_TEST = Comparison(None, math.nan, math.nan, 0)  # an empty cell of the map
METRICS = (("retained_loss", "retained"), ("learned_loss", "learned"), ("forgetting", "forgetting"))
# retained − learned: the mean rise of each task's loss after it was learned. A method's Δ
# retained splits exactly into Δ learned (learning each task better) + Δ this (keeping it), so
# a method that learns faster is not credited with retention it did not add (issue 21).
DRIFT = ("after_learning", "after learning")
# The first task's loss right after training it: learning before anything could be forgotten
# (a replay batch then repeats rows of that task only).
FIRST = ("first_learned", "first task learned")
PAIRED_METRICS = (*METRICS, DRIFT, FIRST)


def metric(run: Run, key: str) -> float | None:
    """A run's summary figure, or one derived from its summary: ``after_learning`` (retained −
    learned) and ``first_learned`` (the loss matrix's first diagonal cell)."""
    s = run.summary
    if key == DRIFT[0]:
        r, lrn = s.get("retained_loss"), s.get("learned_loss")
        return None if r is None or lrn is None else r - lrn
    if key == FIRST[0]:
        lm = s.get("loss_matrix") or []
        return float(lm[0][0]) if lm and lm[0] else None
    return s.get(key)

# Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train LLMs"), 405M,
# Pile → German: final loss on the old and the new task per replay fraction, and the
# union-trained baseline. Shown for the shape of the curve, not to compare values.
IBRAHIM = {0.0: (3.56, 1.11), 0.01: (2.83, 1.12), 0.05: (2.57, 1.12), 0.1: (2.46, 1.13),
           0.25: (2.33, 1.16), 0.5: (2.24, 1.22)}
IBRAHIM_UNION = (2.26, 1.25)


def pairs(runs: Sequence[Run], baseline: str) -> dict[str, list[tuple[Run, Run]]]:
    """group → [(run, its baseline run)] for every run not of the baseline method."""
    base = [r for r in runs if r.label == baseline]
    out: dict[str, list[tuple[Run, Run]]] = defaultdict(list)
    # one row per size (and task order) when there are several: differences are never pooled
    # across settings that are not seeds of one another
    sizes, orders = len({r.preset for r in runs}) > 1, len({r.order for r in runs}) > 1
    for r in runs:
        if r.label == baseline:
            continue
        for b in base:
            if (b.seed, b.preset, b.order) == (r.seed, r.preset, r.order) and all(
                _setting(r, k, b.axis_keys.get(k)) == v for k, v in b.axes.items()
            ):
                key = r.group + (f" [{r.preset}]" if sizes else "")
                key += f" [{'→'.join(r.order)}]" if orders else ""
                out[key].append((r, b))
                break
    return out


def _setting(run: Run, label: str, key: str | None) -> Any:
    """The run's value of a baseline's axis: its own axis value, else (an entry the axis does
    not vary, e.g. a control at one learning rate) what its config sets for that key."""
    if label in run.axes or key is None:
        return run.axes.get(label)
    value: Any = run.summary.get("config", {})
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _delta(pair_list: list[tuple[Run, Run]], key: str) -> Comparison:
    values = [(metric(r, key), metric(b, key)) for r, b in pair_list]
    return paired_test([x - y for x, y in values if x is not None and y is not None])


def paired_section(done: Sequence[Run], baseline: str | None) -> Section | None:
    if not baseline:
        return None
    found = pairs(done, baseline)
    if not found:
        return None
    sec = Section(f"Paired differences against {baseline}")
    groups = sorted(found, key=lambda g: (len(g), g))
    tests = {key: [_delta(found[grp], key) for grp in groups] for key, _ in PAIRED_METRICS}
    adj = {key: adjust_tests(ts) for key, ts in tests.items()}
    sec.blocks.append(
        f"Each run minus the {baseline} run of the same seed, size, task order and shared "
        "settings; mean ± 95% t-interval over the pairs and a paired t-test. Negative = lower "
        f"loss (better) than {baseline}. Δ retained = Δ learned + Δ after learning: the first "
        "is learning each task better (its loss right after training it), the second keeping "
        "it (the mean rise of each task's loss after it was learned); Δ first task learned "
        "is the first task's loss right after training it, before anything can be forgotten. "
        + family_note(len(groups), "settings of each column")
        + " " + n_note([len(found[g]) for g in groups], "pairs per setting", paired=True)
    )
    rows = [[grp, str(len(found[grp])),
             *(cell(tests[key][i], adj[key][i]) for key, _ in PAIRED_METRICS)]
            for i, grp in enumerate(groups)]
    sec.blocks.append(Table(["run group", "pairs", *(f"Δ {n}" for _, n in PAIRED_METRICS)], rows))
    for key, name in PAIRED_METRICS:
        c = defaultdict(int)
        for t, p in zip(tests[key], adj[key], strict=True):
            c[verdict(t, p)] += 1
        sec.blocks.append(
            f"Δ {name}: {c['significantly lower']} setting(s) significantly lower, "
            f"{c['significantly higher']} significantly higher, {c['no significant difference']} "
            f"with no significant difference (of {sum(c.values())}; {METHOD} across them)."
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
    places = [(panel, i, k, j, e) for panel in panels for i, k in enumerate(ks)
              for j, e in enumerate(es) if (panel, k, e) in cells]
    sec.blocks.append(
        f"Each cell: mean over seeds of (run with Reptile every k steps at ε) − ({baseline} run "
        "of the same seed and the same other settings) ± 95% t-interval, and the paired t-test's "
        f"{METHOD}-adjusted p; * marks significant cells. Negative = Reptile lowered the loss "
        "(or the forgetting). " + family_note(len(places), "cells of each metric's map (all "
                                              "panels)")
        + " " + n_note([len(cells[(pn, k, e)]) for pn, _, k, _, e in places], "pairs per cell",
                       paired=True)
    )
    grids: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for key, name in METRICS:
        tests = [_delta(cells[(pn, k, e)], key) for pn, _, k, _, e in places]
        adj = adjust_tests(tests)
        found = {(pn, i, j): (t, p) for (pn, i, _, j, _), t, p in zip(places, tests, adj,
                                                                       strict=True)}
        grids[name] = {}
        for panel in panels:
            mean = np.full((len(ks), len(es)), np.nan)
            sig = np.zeros((len(ks), len(es)), dtype=bool)
            rows = []
            for i, k in enumerate(ks):
                row = [f"{panel} k={k:g}"]
                for j in range(len(es)):
                    t, p = found.get((panel, i, j), (NO_TEST, math.nan))
                    if t.mean is not None:
                        mean[i, j] = t.mean
                        sig[i, j] = significant(t, p)
                    row.append(cell(t, p, words=False) + (" *" if sig[i, j] else ""))
                rows.append(row)
            grids[name][panel] = (mean, sig)
            sec.blocks.append(Table(["setting", *(f"ε={e:g}" for e in es)], rows,
                                    f"Δ {name} (MER − {baseline}) · {panel}"))
        raw = sum(t.mean is not None and t.p < LEVEL for t in tests)
        n_sig = sum(int(sg.sum()) for _, sg in grids[name].values())
        n_lo = sum(int(((m < 0) & sg).sum()) for m, sg in grids[name].values())
        total = sum(int(np.isfinite(m).sum()) for m, _ in grids[name].values())
        sec.blocks.append(
            f"Δ {name}: {n_lo} of {total} cells significantly lower, {n_sig - n_lo} "
            f"significantly higher, {total - n_sig} with no significant difference ({METHOD}). "
            f"Before the correction {raw} cell(s) had p < {LEVEL:g} (a 95% interval that "
            f"excludes 0); with no effect anywhere about {LEVEL * total:.1f} would by chance."
        )
    path = heatmap_figure(grids, [f"{k:g}" for k in ks], [f"{e:g}" for e in es],
                          fig_dir / "reptile_map.png", row_label="k", col_label="ε")
    if path:
        sec.blocks.insert(1, Figure(path, f"Δ (MER − {baseline}) per k × ε; rows: retained, "
                                          "learned, forgetting; columns: learning rate and "
                                          f"tokens per task; * = {METHOD}-adjusted p < "
                                          f"{LEVEL:g} across that metric's cells."))
    return sec


# ------------------------------------------------------------------------------ replay ratio
def _plain_sequential(r: Run) -> bool:
    spec = METHODS.get(r.method)
    return (spec is not None and spec.sampler == "sequential" and not spec.reptile
            and not spec.anchors)


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
                rows.append([tag, f"{a:g}", str(len(by_alpha[a])), fmt(om, oh), fmt(nm, nh),
                             f"{ref[0]:.2f} / {ref[1]:.2f}" if ref else "–"])
    for (preset, order), runs in sorted(joint.items()):
        (om, oh), (nm, nh) = final(runs, 0), final(runs, 1)
        rows.append([f"{preset} {'→'.join(order)} joint (union)", "–", str(len(runs)),
                     fmt(om, oh), fmt(nm, nh),
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

    # Whether the larger model learns better is asked once per (size pair, order): one family.
    combos = [(small, large, order) for small, large in zip(presets, presets[1:], strict=False)
              for order in sorted({k[1] for k in by if k[0] == small})
              if by.get((small, order, 0.0)) and by.get((large, order, 0.0))]
    checks = [welch_test(vals(by[(lg, o, 0.0)], "learned_loss"),
                         vals(by[(sm, o, 0.0)], "learned_loss")) for sm, lg, o in combos]
    ns: list[int] = [t.n for t in checks]
    for (small, large, order), t, p in zip(combos, checks, adjust_tests(checks), strict=True):
        s0, l0 = by[(small, order, 0.0)], by[(large, order, 0.0)]
        n_ratio = np.mean([r.summary["params"] for r in l0]) / np.mean(
            [r.summary["params"] for r in s0])
        # with one seed there is no test: the comparison goes ahead, marked "no interval"
        valid = t.mean is not None and t.mean < 0 and (not math.isfinite(p) or p < LEVEL)
        replays = {a: runs for (pr, o, a), runs in sorted(by.items())
                   if pr == small and o == order and a}
        compared = [*s0, *l0, *(r for runs in replays.values() for r in runs)]
        caution = precision_caution(compared, "size")
        if caution:
            sec.blocks.append(caution)
        sec.blocks.append(
            f"{large} ({n_ratio:.2f}× the parameters, {fpt(l0) / fpt(s0):.2f}× the FLOPs "
            f"per incoming token of {small}) trained sequentially: learned loss "
            f"{cell(t, p, words=False)} against {small} ({verdict(t, p)}; Welch t-test, "
            f"{METHOD} across the {len(checks)} size pair(s) and task order(s))."
        )
        if not valid:
            sec.blocks.append(
                f"The comparison is void at this budget: the larger model does not reach a "
                f"significantly lower loss than {small}, so it cannot show what size buys."
            )
            continue
        keys = ("retained_loss", "forgetting", "learned_loss")
        tests = {k: [welch_test(vals(runs, k), vals(l0, k)) for runs in replays.values()]
                 for k in keys}
        adj = {k: adjust_tests(ts) for k, ts in tests.items()}
        ns += [t.n for ts in tests.values() for t in ts]
        rows = []
        for i, (a, runs) in enumerate(replays.items()):
            row = [f"{small} α={a:g}", f"{fpt(runs) / fpt(s0):.2f}×", f"{fpt(l0) / fpt(s0):.2f}×"]
            for k in keys:
                tk, pk = tests[k][i], adj[k][i]
                row += [fmt(tk.mean, tk.half, signed=True),
                        verdict(tk, pk) + (f" ({p_text(pk)})" if math.isfinite(pk) else "")]
            rows.append(row)
        if rows:
            sec.blocks.append(Table(
                ["replay run", "its FLOPs/incoming token", f"{large}'s", "Δ retained vs "
                 f"{large} sequential", "", "Δ forgetting", "", "Δ learned", ""], rows,
                f"{'→'.join(order)}: replay on {small} minus {large} trained sequentially; "
                "Welch 95% intervals and t-tests (unpaired: different models), "
                f"{METHOD}-adjusted across the {len(rows)} replay run(s) of each column. "
                "Negative = replay better."))
    if sec.blocks:
        sec.blocks.append(n_note(ns, "seeds per group (the smaller group of each comparison)",
                                 paired=False))
    return sec if sec.blocks else None
