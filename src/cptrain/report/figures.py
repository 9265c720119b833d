"""The report's matplotlib figures (Agg backend, PNG); each returns its path or None if empty.

Figures take plain data (curves, statistics, points) prepared by ``cptrain.report.document`` so that
they can be drawn, and tested, without run directories.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from cptrain import fsutil  # noqa: E402
from cptrain.report.scaling import PowerLawFit  # noqa: E402

DPI = 110


@dataclass
class Curves:
    """One panel: named series over optimizer steps, with task boundaries to mark."""

    title: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    boundaries: list[int] = field(default_factory=list)
    boundary_labels: list[str] = field(default_factory=list)


def save_figure(fig: Any, path: Path) -> Path:
    """Write next to the target and rename, so a report never links a half-written PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    fsutil.replace_file(tmp, path)
    return path


def _grid(
    n: int, ncols: int, width: float = 4.2, height: float = 2.8, sharey: bool = False
) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, sharey=sharey
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _mark_boundaries(ax: Any, panel: Curves) -> None:
    for x in panel.boundaries:
        ax.axvline(x, color="0.5", linestyle="--", linewidth=0.8)
    if panel.boundary_labels:
        ends = [0, *panel.boundaries]
        for i, label in enumerate(panel.boundary_labels):
            if i < len(ends):
                ax.text(ends[i], 1.0, f" {label}", transform=ax.get_xaxis_transform(),
                        va="top", ha="left", fontsize=7, color="0.35")


def curves_figure(
    panels: Sequence[Curves], path: Path, *, ylabel: str, ncols: int = 2, sharey: bool = False
) -> Path | None:
    """Loss curves over training, one panel per group, task boundaries dashed (paper Fig. 2);
    ``sharey`` puts every panel on one scale so that methods compare at a glance."""
    panels = [p for p in panels if any(len(xs) for xs, _ in p.series.values())]
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols, sharey=sharey)
    for ax, panel in zip(axes, panels, strict=True):
        for name, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, label=name, linewidth=1.3, marker="." if len(xs) < 30 else None)
        _mark_boundaries(ax, panel)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelleft=True)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def bars_figure(
    groups: Sequence[str],
    series: Mapping[str, Sequence[tuple[float | None, float | None]]],
    path: Path,
    *,
    ylabel: str,
    title: str,
) -> Path | None:
    """Grouped bars (one bar per series in each group) with error bars: (mean, half width)."""
    if not groups or not series:
        return None
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 2), 3.6))
    for i, (name, vals) in enumerate(series.items()):
        means = [v[0] if v[0] is not None else np.nan for v in vals]
        errs = [v[1] if v[1] is not None and math.isfinite(v[1]) else 0.0 for v in vals]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=errs, capsize=3,
               label=name)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def scaling_figure(
    points: Sequence[dict[str, Any]],
    fits: Mapping[tuple[str, str], Mapping[Any, PowerLawFit]],
    x_key: str,
    y_keys: Sequence[tuple[str, str]],
    path: Path,
    *,
    xlabel: str,
    links: Sequence[list[dict[str, Any]]] = (),
    order: Sequence[str] = (),
) -> Path | None:
    """Loss against ``x_key`` on log–log axes, one colour per group, fitted power laws drawn.

    ``fits[(x_key, y_key)][group]``; ``links`` are runs joined by a dotted line (the same model
    size at growing replay fractions: compute spent on replay instead of on size)."""
    if len({p[x_key] for p in points if p.get(x_key)}) < 2:
        return None
    present = {p["group"] for p in points}
    groups = [g for g in order if g in present] + sorted(present - set(order))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    fig, axes = _grid(len(y_keys), len(y_keys), width=5.0, height=3.8)
    for ax, (y_key, y_label) in zip(axes, y_keys, strict=True):
        for g in groups:
            pts = [p for p in points if p["group"] == g and p.get(y_key) is not None]
            ax.scatter([p[x_key] for p in pts], [p[y_key] for p in pts], s=18,
                       color=colors[g], label=g, alpha=0.8)
            fit = fits.get((x_key, y_key), {}).get(g)
            if fit is not None:
                xs = np.geomspace(fit.x_min / 1.5, fit.x_max * 1.5, 50)
                ax.plot(xs, fit.predict(xs), color=colors[g], linewidth=1.0)
        for chain in links:
            pts = [p for p in chain if p.get(y_key) is not None]
            if len(pts) > 1:
                ax.plot([p[x_key] for p in pts], [p[y_key] for p in pts], color="0.4",
                        linestyle=":", linewidth=1.0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 4.5, not 4.5×10⁰
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(y_label, fontsize=8)
        ax.tick_params(labelsize=7, which="both")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def heatmap_figure(
    grids: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    row_ticks: Sequence[str],
    col_ticks: Sequence[str],
    path: Path,
    *,
    row_label: str,
    col_label: str,
) -> Path | None:
    """One heatmap per (metric, panel): ``grids[metric][panel] = (means, significant)``; a
    diverging scale centred on 0 per metric, each cell annotated, * where significant (the
    caller decides: Holm-adjusted p < 0.05 across the metric's cells, cptrain.report.stats)."""
    metrics = [m for m, panels in grids.items() if panels]
    if not metrics:
        return None
    panels = list(grids[metrics[0]])
    fig, axes = _grid(len(metrics) * len(panels), len(panels), width=3.4, height=2.7)
    for mi, metric in enumerate(metrics):
        finite = [np.abs(m[np.isfinite(m)]) for m, _ in grids[metric].values()]
        lim = max((float(f.max()) for f in finite if f.size), default=0.0) or 1e-9
        for pi, panel in enumerate(panels):
            ax = axes[mi * len(panels) + pi]
            mean, sig = grids[metric][panel]
            im = ax.imshow(mean, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            for i in range(mean.shape[0]):
                for j in range(mean.shape[1]):
                    if np.isfinite(mean[i, j]):
                        ax.text(j, i, f"{mean[i, j]:+.3f}{' *' if sig[i, j] else ''}",
                                ha="center", va="center", fontsize=7,
                                fontweight="bold" if sig[i, j] else "normal")
            ax.set_xticks(range(len(col_ticks)), col_ticks, fontsize=7)
            ax.set_yticks(range(len(row_ticks)), row_ticks, fontsize=7)
            ax.set_xlabel(col_label, fontsize=8)
            ax.set_ylabel(row_label, fontsize=8)
            ax.set_title(f"Δ {metric} · {panel}", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def ratio_figure(
    series: Mapping[str, Mapping[str, Sequence[tuple[float, float | None, float]]]], path: Path
) -> Path | None:
    """Old-task and new-task loss against the replay fraction, one line per setting:
    ``series[setting]["old" | "new"] = [(α, mean, half width)]``; ``["joint"]`` holds the
    (nan, mean, half) of the union-trained baseline for the old and the new task."""
    if not series:
        return None
    alphas = sorted({a for s in series.values() for a, _, _ in s["old"]})
    pos = {a: i for i, a in enumerate(alphas)}
    fig, axes = _grid(2, 2, width=4.6, height=3.4)
    for ax, (key, title) in zip(axes, (("old", "old task"), ("new", "new task")), strict=True):
        for j, (name, s) in enumerate(series.items()):
            pts = [(pos[a], m, h) for a, m, h in s[key] if m is not None]
            color = plt.cm.tab10(j % 10)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[h if math.isfinite(h) else 0.0 for _, _, h in pts],
                        marker="o", capsize=3, label=name, color=color)
        joint = next((s["joint"] for s in series.values() if "joint" in s), None)
        if joint is not None:
            _, m, h = joint[0 if key == "old" else 1]
            if m is not None:
                ax.axhline(m, color="0.3", linestyle="--", linewidth=1.0, label="joint (union)")
                if math.isfinite(h):
                    ax.axhspan(m - h, m + h, color="0.5", alpha=0.15)
        ax.set_xticks(range(len(alphas)), [f"{100 * a:g}%" for a in alphas], fontsize=7)
        ax.set_xlabel("replay fraction α", fontsize=8)
        ax.set_ylabel("final validation loss", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def pareto_figure(
    points: Sequence[dict[str, Any]],
    line: Sequence[tuple[float, float, float]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    line_label: str = "",
) -> Path | None:
    """One point per group with its 95% intervals both ways (``x``/``y``: (mean, half width));
    ``line``: (λ, x, y) joined and labelled by λ (a merge curve)."""
    shown = [p for p in points if p["x"][0] is not None and p["y"][0] is not None]
    if len(shown) < 2:
        return None
    fig, (ax,) = _grid(1, 1, width=6.5, height=4.6)
    for i, p in enumerate(shown):
        (x, xh), (y, yh) = p["x"], p["y"]
        ax.errorbar([x], [y], xerr=[[xh if math.isfinite(xh) else 0]],
                    yerr=[[yh if math.isfinite(yh) else 0]], fmt="o", ms=5, capsize=3,
                    color=plt.cm.tab10(i % 10), label=p["group"])
    if len(line) > 1:
        ax.plot([p[1] for p in line], [p[2] for p in line], color="0.35", linestyle="--",
                linewidth=1.0, marker=".", label=line_label or None)
        for lam, x, y in line:
            ax.annotate(f"λ={lam:g}", (x, y), fontsize=6, color="0.35",
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.0, color="0.7", linewidth=0.8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
