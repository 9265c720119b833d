"""What `cptrain plan` prints and writes: plan.json, plan.md / plan.html (the report's one
renderer) and two figures: the predicted frontier with the pilots' measured points, and each
task's fitted curves over the pilots' measured ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from cptrain.fsutil import atomic_write_json, atomic_write_text  # noqa: E402
from cptrain.plan.config import PlanConfig  # noqa: E402
from cptrain.plan.pilots import PilotRun  # noqa: E402
from cptrain.plan.predict import Band, Prediction, Recommendation, TaskLaw  # noqa: E402
from cptrain.report.blocks import Figure, Section, Table, render  # noqa: E402
from cptrain.report.figures import save_figure  # noqa: E402


def band(b: Band, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(b.lo):
        return f.format(b.mean)
    return f"{f.format(b.mean)} [{f.format(b.lo)}, {f.format(b.hi)}]"


def _pilot_points(pilots: Sequence[PilotRun], old: list[str], new: str, before: dict[str, float],
                  cfg: PlanConfig) -> list[tuple[float, float, float]]:
    """(budget rise, new-task loss, α) at each pilot's end, as the budget reads them."""
    return [(cfg.forgetting.budget_rise({t: p.curves[t].loss[-1] for t in old}, before),
             float(p.curves[new].loss[-1]), p.setting.alpha) for p in pilots]


def frontier_figure(preds: Sequence[Prediction], pilots: Sequence[PilotRun], rec: Recommendation,
                    cfg: PlanConfig, old: list[str], new: str, before: dict[str, float],
                    path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    inside = [p for p in preds if not p.notes]
    far = [p for p in preds if p.notes]
    sc = ax.scatter([p.budget_rise.mean for p in inside], [p.new.mean for p in inside],
                    c=[p.setting.alpha for p in inside], cmap="viridis", vmin=cfg.vary.alpha[0],
                    vmax=cfg.vary.alpha[1], s=18, marker="o",
                    label="predicted at the full budget")
    if far:  # shown apart: the pilots cannot check them
        ax.scatter([p.budget_rise.mean for p in far], [p.new.mean for p in far], s=14,
                   facecolors="none", edgecolors="0.6", marker="o",
                   label="predicted, extrapolating (> 2× the pilots' forward area)")
    fig.colorbar(sc, ax=ax, label="replay ratio α")
    pts = _pilot_points(pilots, old, new, before, cfg)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis",
               vmin=cfg.vary.alpha[0], vmax=cfg.vary.alpha[1], marker="s", edgecolors="k",
               s=40, label="pilots, measured (their own budget)")
    ax.axvline(cfg.forgetting.limit, color="crimson", ls="--", lw=1, label="forgetting budget")
    if rec.best is not None:
        r, n = rec.best.budget_rise, rec.best.new
        ax.errorbar([r.mean], [n.mean],
                    xerr=None if math.isnan(r.lo) else [[r.mean - r.lo], [r.hi - r.mean]],
                    yerr=None if math.isnan(n.lo) else [[n.mean - n.lo], [n.hi - n.mean]],
                    fmt="*", color="crimson", ms=14, label="recommended (95 % interval)")
    unit = "fraction of before" if cfg.forgetting.relative else "nats"
    ax.set_xlabel(f"old-task rise ({cfg.forgetting.over} over {', '.join(old)}; {unit})")
    ax.set_ylabel(f"new-task loss ({new}) at the end")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Predicted frontier over α and lr")
    return save_figure(fig, path)


def fits_figure(laws: dict[str, TaskLaw], pilots: Sequence[PilotRun], path: Path) -> Path:
    tasks = list(laws)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, t in zip(axes[0], tasks, strict=True):
        law = laws[t]
        for i, p in enumerate(pilots):
            c = p.curves[t]
            ax.plot(c.steps, c.loss, "o", ms=3, color=colors(i % 10))
            ax.plot(c.steps, law.fit.predict(c.s1, c.s2, c.alpha, c.w), "-", lw=1,
                    color=colors(i % 10), label=p.setting.name if len(pilots) <= 10 else None)
        loo = law.loo[law.fit.form].mean_abs
        ax.set_title(f"{t}: {law.fit.form} law (leave-one-out {loo:.3f})", fontsize=9)
        ax.set_xlabel("step (pilot)")
        ax.set_ylabel("validation loss")
    axes[0][0].legend(fontsize=6)
    return save_figure(fig, path)


def _setting_cells(p: Prediction) -> list[str]:
    s = p.setting
    return [f"{s.alpha:g}", f"{s.lr:.3g}", s.schedule, f"{s.warmup:g}"]


def _pred_table(preds: Sequence[Prediction], old: list[str], new: str, caption: str) -> Table:
    header = ["α", "lr", "schedule", "warm-up", *(f"{t} rise" for t in old),
              f"{new} loss", "FLOPs / incoming token", "meets", "notes"]
    rows = [[*_setting_cells(p), *(band(p.rise[t], True) for t in old), band(p.new),
             f"×{p.cost:.2f}", "yes" if p.meets else "no", "; ".join(p.notes)] for p in preds]
    return Table(header, rows, caption)


def recommendation_lines(rec: Recommendation, cfg: PlanConfig, old: list[str], new: str
                         ) -> list[str]:
    lines = [f"Forgetting budget: {cfg.forgetting.describe()} ({', '.join(old)})."]
    for title, p in (("Recommended", rec.best), ("Cheapest within budget", rec.cheapest)):
        if p is None or (title.startswith("Cheapest") and p is rec.best):
            continue
        s = p.setting
        lines.append(
            f"{title}: α {s.alpha:g}, lr {s.lr:.3g}, {s.schedule}, warm-up {s.warmup:g}: "
            f"predicted {new} loss {band(p.new)}, old-task rise {band(p.budget_rise, True)} "
            f"(95 % bootstrap intervals), FLOPs per incoming token ×{p.cost:.2f} of no replay.")
    if rec.best is not None and rec.cheapest is rec.best:
        lines.append("It is also the cheapest setting that meets the budget.")
    lines += [f"Warning: {w}" for w in rec.warnings]
    return lines


def write_plan(out_dir: Path, cfg: PlanConfig, laws: dict[str, TaskLaw], preds: list[Prediction],
               rec: Recommendation, pilots: Sequence[PilotRun], old: list[str], new: str,
               before: dict[str, float], cost: dict[str, Any]) -> Path:
    fig_dir = out_dir / "figures"
    frontier = frontier_figure(preds, pilots, rec, cfg, old, new, before,
                               fig_dir / "frontier.png")
    fits = fits_figure(laws, pilots, fig_dir / "fits.png")
    law_rows = [[t, law.fit.form, f"{law.fit.rmse:.4f}",
                 *(f"{law.loo[f].mean_abs:.4f} / {law.loo[f].final_abs:.4f}" for f in law.loo),
                 f"{len(law.boots)}", f"{law.fit.s1_max:.3g}"] for t, law in laws.items()]
    forms = list(next(iter(laws.values())).loo)
    sections = [
        Section("Recommendation", [" ".join(recommendation_lines(rec, cfg, old, new)),
                                   Figure(frontier, "Predicted old-task rise against new-task "
                                          "loss for every candidate; squares: the pilots as "
                                          "measured at their own (shorter) budget.")]),
        Section("Fits", [Table(["task", "form used", "RMSE", *(f"LOO {f} (mean / final)"
                                                              for f in forms),
                                "bootstrap refits", "largest S1 seen"], law_rows,
                               "Leave-one-pilot-out: each pilot predicted by a fit on the "
                               "others; the form with the lower mean error is used."),
                         Figure(fits, "Fitted curves (lines) over the pilots' measured losses "
                                f"(points); fitted from {cfg.pilots.fit_from:.0%} of each "
                                "pilot's steps on.")]),
        Section("Candidates", [_pred_table(preds, old, new, "Every candidate at the full "
                                           "budget; rise: final − before.")]),
        Section("Cost", [f"Pilots: {cost['pilot_flops']:.3g} FLOPs; a full-budget sweep over "
                         f"the {cost['candidates']} candidates: {cost['sweep_flops']:.3g} FLOPs "
                         f"(ratio {cost['ratio']:.3f})."]),
    ]
    md, page = render("cptrain plan", sections, out_dir)
    atomic_write_text(out_dir / "plan.md", md)
    atomic_write_text(out_dir / "plan.html", page)
    atomic_write_json(out_dir / "plan.json", {
        "format": "cptrain-plan-v1",
        "budget": {"tokens": cfg.budget.tokens, "max_rise": cfg.forgetting.limit,
                   "relative": cfg.forgetting.relative, "over": cfg.forgetting.over},
        "old_tasks": old, "new_task": new, "before": before,
        "recommended": rec.best.as_dict() if rec.best else None,
        "cheapest": rec.cheapest.as_dict() if rec.cheapest else None,
        "closest": rec.closest.as_dict() if rec.closest else None,
        "warnings": rec.warnings,
        "laws": {t: {"form": law.fit.form, "params": law.fit.params, "rmse": law.fit.rmse,
                     "loo": {f: {"mean_abs": v.mean_abs, "final_abs": v.final_abs,
                                 "per_pilot": v.per_curve} for f, v in law.loo.items()},
                     "bootstrap": len(law.boots)} for t, law in laws.items()},
        "candidates": [p.as_dict() for p in preds],
        "cost": cost,
    })
    return out_dir / "plan.md"
