"""Sections drawn from the runs' metrics.jsonl over training: per-task validation loss and
union loss with task boundaries (paper Fig. 2) and the gradient-alignment diagnostics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cptrain.report.blocks import Figure, Section
from cptrain.report.figures import Curves, curves_figure
from cptrain.report.runs import Groups, Run


def _curve_points(run: Run, key: str) -> dict[int, dict[str, float]]:
    """step → {series: loss} from the before (step 0), eval and task_end records."""
    out: dict[int, dict[str, float]] = {}
    for rec in run.records:
        if rec.get("type") not in ("before", "eval", "task_end"):
            continue
        vals = rec.get("val_loss", {}) if key == "val_loss" else {"union": rec.get("union_loss")}
        out.setdefault(int(rec["step"]), {}).update(
            {k: float(v) for k, v in vals.items() if v is not None})
    return out


def _mean_curves(runs: list[Run], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """Mean over seeds at the steps every seed logged; series in training order."""
    per_run = [_curve_points(r, key) for r in runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    series: dict[str, tuple[list[float], list[float]]] = {}
    order = {t: i for i, t in enumerate(runs[0].order)} if runs else {}
    for step in steps:
        names = set.intersection(*(set(p[step]) for p in per_run))
        for n in sorted(names, key=lambda t: (order.get(t, len(order)), t)):
            xs, ys = series.setdefault(n, ([], []))
            xs.append(step)
            ys.append(float(np.mean([p[step][n] for p in per_run])))
    return series


def _boundaries(run: Run) -> tuple[list[int], list[str]]:
    steps = run.summary.get("task_steps") or []
    return [int(x) for x in np.cumsum(steps)[:-1]], list(run.order)


def curve_section(g: Groups, fig_dir: Path) -> Section:
    sec = Section("Validation loss over training (paper Fig. 2) and union loss")
    panels = []
    for grp, order in g.keyed():
        for p in g.presets:
            runs = g.by.get((grp, p, order), [])
            if runs:
                b, labels = _boundaries(runs[0])
                title = f"{g.row_name(grp, order)} · {p} (mean of {len(runs)} seed(s))"
                panels.append(Curves(title, _mean_curves(runs, "val_loss"), b, labels))
    path = curves_figure(panels, fig_dir / "val_curves.png", ylabel="validation loss",
                         ncols=max(1, len(g.presets)), sharey=True)
    if path:
        sec.blocks.append(Figure(path, "Per-task validation loss during training; dashed lines "
                                       "mark task boundaries (paper Fig. 2)."))
    union_panels = []
    for order in g.orders:
        for p in g.presets:
            panel = Curves(f"union loss · {p}" + ("" if len(g.orders) == 1 else
                                                  f" [{'→'.join(order)}]"))
            for grp in g.groups:
                runs = g.by.get((grp, p, order), [])
                if runs:
                    curve = _mean_curves(runs, "union").get("union")
                    if curve:
                        panel.series[grp] = curve
                    panel.boundaries, panel.boundary_labels = _boundaries(runs[0])
            union_panels.append(panel)
    path = curves_figure(union_panels, fig_dir / "union_curves.png", ylabel="union loss",
                         ncols=max(1, len(g.presets)))
    if path:
        sec.blocks.append(Figure(path, "Loss on the union of all tasks' validation sets during "
                                       "training, per method."))
    if not sec.blocks:
        sec.blocks.append("No eval records in metrics.jsonl: curves need `eval` / `task_end` "
                          "records.")
    return sec


def alignment_section(g: Groups, fig_dir: Path) -> Section | None:
    has = [r for rs in g.by.values() for r in rs
           if r.summary.get("grad_cos_mean") is not None
           or any("grad_cos" in rec for rec in r.records)]
    if not has:
        return None
    sec = Section("Gradient alignment diagnostics")
    sec.blocks.append(g.metric_table(
        "grad_cos_mean", "Mean cos(∇ fresh rows, ∇ replayed rows of earlier tasks — or a probe "
        "of earlier tasks' data when none are replayed) after the first task; positive = aligned",
        signed=True))
    panels = []
    for order in g.orders:
        for p in g.presets:
            panel = Curves(f"gradient cosine · {p}")
            for grp in g.groups:
                for r in g.by.get((grp, p, order), [])[:1]:
                    pts = [(rec["step"], rec["grad_cos"]) for rec in r.records
                           if rec.get("type") == "train" and rec.get("grad_cos") is not None
                           and math.isfinite(rec["grad_cos"])]
                    if pts:
                        panel.series[grp] = ([x for x, _ in pts], [y for _, y in pts])
                    panel.boundaries, panel.boundary_labels = _boundaries(r)
            panels.append(panel)
    path = curves_figure(panels, fig_dir / "grad_alignment.png", ylabel="cos(∇fresh, ∇ref)",
                         ncols=max(1, len(g.presets)))
    if path:
        sec.blocks.append(Figure(path, "Gradient cosine between fresh and replayed (or probe) "
                                       "rows over training (first seed of each method)."))
    return sec
