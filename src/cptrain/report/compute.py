"""Sections on what the runs cost and what it bought: the compute table (parameters, FLOPs,
tokens, wall time, MFU) and loss against FLOPs per incoming token and against parameters with
power-law fits (paper Fig. 6/7), with the replay-versus-size answer."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.config import METHODS
from cptrain.report.blocks import Figure, Section, Table
from cptrain.report.figures import scaling_figure
from cptrain.report.runs import Groups, Run, settings
from cptrain.report.scaling import fit_groups, replay_vs_size
from cptrain.rundir import layout

# The α = 0 method each replay method is compared with when asking "replay or a bigger model?":
# the one that differs only in not replaying (replay → sequential, mer → reptile, kl-replay → kl).
BASELINE_OF = {
    name: next(
        base for base, b in METHODS.items()
        if not b.replays
        and (b.reptile, b.sampler, b.kl, b.l2) == (spec.reptile, spec.sampler, spec.kl, spec.l2)
    )
    for name, spec in METHODS.items()
    if spec.replays
}


def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _count(x: float) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def compute_section(g: Groups) -> Section:
    sec = Section("Compute")
    rows = []
    for grp, order in g.keyed():
        for p in g.presets:
            runs = g.by.get((grp, p, order), [])
            fl = [r.flops for r in runs if r.flops]
            if not runs:
                continue
            rows.append([
                f"{g.row_name(grp, order)} · {p}",
                _mean_of(runs, "params", _count),
                _sci(fl[0]["flops_per_token"]) if fl else "–",
                _sci(fl[0]["flops_per_incoming_token"]) if fl else "–",
                _sci(float(np.mean([f["total_flops"] for f in fl]))) if fl else "–",
                _sci(float(np.mean([f["reptile_flops"] for f in fl]))) if fl else "–",
                _mean_of(runs, "fresh_tokens", _count),
                _mean_of(runs, "replay_tokens", _count),
                _mean_of(runs, "wall_s", lambda v: f"{v:.0f}"),
                _mfu(runs),
            ])
    conv = next((r.flops["convention"] for rs in g.by.values() for r in rs if r.flops), "")
    sec.blocks.append(Table(
        ["run group", "params", "FLOPs/token", "FLOPs/incoming token", "total FLOPs",
         "Reptile FLOPs", "fresh tokens", "replayed tokens", "wall s", "MFU"],
        rows, "Training compute per run (mean over seeds); "
        f"{conv + '; ' if conv else ''}evaluation not counted. MFU: model FLOPs per second of "
        "training steps ÷ the matmul peak measured on the "
        "run's machine at its precision (cptrain.hardware)."))
    missing = sum(r.flops is None for rs in g.by.values() for r in rs)
    if missing:
        sec.blocks.append(f"{missing} run(s) without compute figures: their {layout.SUMMARY} "
                          "records no model shape (written by an older cptrain: `cptrain train "
                          "--resume` rewrites it; or by a plain loop's LossMatrix, which counts "
                          "no tokens).")
    return sec


def _mean_of(runs: list[Run], key: str, fmt: Callable[[float], str]) -> str:
    """Mean of a recorded number over seeds ('–' where no summary records it)."""
    found = [r.summary[key] for r in runs if isinstance(r.summary.get(key), int | float)]
    return fmt(float(np.mean(found))) if found else "–"


def _mfu(runs: list[Run]) -> str:
    """Mean MFU over seeds, with the precision it was measured at ('–' for summaries written
    before cptrain measured it)."""
    found = [r.summary for r in runs if isinstance(r.summary.get("mfu"), int | float)]
    if not found:
        return "–"
    dtypes = sorted({str(s.get("peak_dtype", "?")) for s in found})
    return f"{100 * float(np.mean([s['mfu'] for s in found])):.1f}% {'/'.join(dtypes)}"


def scaling_section(done: list[Run], fig_dir: Path) -> Section | None:
    points = [r.point() for r in done]
    presets = {p["preset"] for p in points}
    xs = {p["flops_per_incoming_token"] for p in points if p["flops_per_incoming_token"]}
    if len(xs) < 2:
        return None
    sec = Section("Scaling: loss against compute and size (paper Fig. 6, 7)")
    order = Groups(done).groups
    y_keys = [("retained_loss", "retained loss"), ("learned_loss", "learned loss")]
    fits = {
        (x, y): fit_groups(points, x, y, lambda p: p["group"])
        for x in ("params", "flops_per_incoming_token")
        for y, _ in y_keys
    }
    answer = _replay_vs_size_text(done, points)
    if answer:
        sec.blocks += answer
    # Same size, same Reptile setting, growing α: compute spent on replay instead of on size.
    chains: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for p in sorted(points, key=lambda p: p["alpha"]):
        spec = METHODS.get(p["method"])
        if spec is not None and spec.sampler == "sequential":
            chains[(spec.reptile, p["preset"], p["seed"])].append(p)
    path = scaling_figure(points, fits, "flops_per_incoming_token", y_keys,
                          fig_dir / "scaling_flops.png", xlabel="training FLOPs per incoming token",
                          links=list(chains.values()), order=order)
    if path:
        sec.blocks.append(Figure(path, "Loss against FLOPs per incoming token (paper Fig. 6); "
                                       "lines: power-law fits per method across sizes; dotted: "
                                       "one size and seed at growing replay fraction."))
    if len(presets) > 1:
        path = scaling_figure(points, fits, "params", y_keys, fig_dir / "scaling_params.png",
                              xlabel="parameters", order=order)
        if path:
            sec.blocks.append(Figure(path, "Loss against parameter count with power-law fits "
                                           "(paper Fig. 7)."))
    rows = []
    for grp in order:
        for (x, y), by_group in fits.items():
            fit = by_group.get(grp)
            if fit is not None:
                rows.append([grp, y.replace("_", " "), x.replace("_", " "), fit.formula("x"),
                             str(fit.n), f"{fit.r2_log:.3f}"])
    if rows:
        sec.blocks.append(Table(["method", "loss", "x", "fit: loss = a·x^−b (± s.e.)", "points",
                                 "R² (log)"], rows, "Power-law fits (scipy curve_fit in log "
                                                    "space); s.e. from the covariance."))
    else:
        sec.blocks.append("No method has runs at two sizes, so no power law is fitted.")
    return sec


def _replay_vs_size_text(done: list[Run], points: list[dict[str, Any]]) -> list[str]:
    # A replay setting meets only the baseline runs of its own setting: runs are told apart by
    # the keys that split a label into settings (replay's and Reptile's own keys aside).
    keys = sorted({k for r in done for k in r.variant_keys
                   if not k.startswith(("replay.", "reptile."))})
    by_setting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r, p in zip(done, points, strict=True):
        st = settings(r)
        by_setting[json.dumps([st.get(k) for k in keys], default=str)].append(p)
    lines = [line for pts in by_setting.values() for line in _replay_vs_size_lines(pts)]
    if lines:
        lines.insert(0, "Replay or a bigger model? Each replay setting set against a power law "
                        "of the α = 0 method's retained loss over model size (a 2× larger model "
                        "costs ≈2× the FLOPs per token; replay at α costs 1/(1−α)×):")
    return lines


def _replay_vs_size_lines(points: list[dict[str, Any]]) -> list[str]:
    lines = []
    for method, own_base in BASELINE_OF.items():
        if not any(p["method"] == method and p["alpha"] for p in points):
            continue
        # MER's own α = 0 analogue is Reptile; without Reptile runs, plain sequential training.
        for base in dict.fromkeys((own_base, "sequential")):
            base_pts = [p for p in points if p["method"] == base and not p["alpha"]]
            if base_pts:
                break
        else:
            continue
        sub = [p for p in points if p["method"] == method and p["alpha"]] + base_pts
        base_label = base_pts[0]["label"]
        for item in replay_vs_size(sub, "retained_loss", baseline=base_label):
            lines.append(item.sentence("retained loss", base_label))
    return lines
