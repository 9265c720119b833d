"""`cptrain report DIR…`: tables and figures of runs and sweeps → report.md + report.html.

Runs are grouped by method (label and replay fraction α), model preset and task order; seeds
are averaged, with 95% t-intervals across seeds. What a report shows follows the paper: loss
curves with task boundaries (Fig. 2), union loss, forgetting with confidence intervals
(Fig. 4), retained / learned loss by method and size (Tables 2 and 4), downstream scores
(Table 3), loss against FLOPs per incoming token and against parameters with power-law fits
(Fig. 6/7) and the replay-versus-size answer, and gradient-alignment diagnostics. Sections
without data (one size, no downstream results) are left out. ``report.html`` embeds its PNGs
so it can be mailed as one file.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import html
import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.config import METHODS, result_settings
from cptrain.errors import ConfigError
from cptrain.fsutil import atomic_write_text
from cptrain.models.flops import run_flops
from cptrain.models.presets import PRESETS
from cptrain.replay.mixer import effective_alpha
from cptrain.report.figures import Curves, bars_figure, curves_figure, scaling_figure
from cptrain.report.scaling import fit_groups, replay_vs_size
from cptrain.report.stats import METHOD, mean_ci, n_note, versus_lowest
from cptrain.report.stats import fmt as _fmt
from cptrain.train.run_dir import check_run_dirs

# The α = 0 method each replay method is compared with when asking "replay or a bigger model?":
# the one that differs only in not replaying (replay → sequential, mer → reptile).
BASELINE_OF = {
    name: next(
        base for base, b in METHODS.items()
        if not b.replays and (b.reptile, b.sampler) == (spec.reptile, spec.sampler)
    )
    for name, spec in METHODS.items()
    if spec.replays
}


# ------------------------------------------------------------------------------- runs
@dataclass
class Run:
    name: str
    dir: Path
    summary: dict[str, Any]
    label: str
    method: str
    alpha: float
    preset: str
    seed: int
    order: tuple[str, ...]
    axes: dict[str, Any] = field(default_factory=dict)  # sweep axis label → value
    axis_keys: dict[str, str] = field(default_factory=dict)  # sweep axis label → config key
    variant: str = ""  # the settings that set it apart from runs of the same label (see below)
    variant_keys: tuple[str, ...] = ()  # the config keys named in ``variant``

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))

    @property
    def group(self) -> str:
        """Method label with its replay fraction, e.g. ``mer α=0.25``."""
        mode = self.summary["config"].get("replay", {}).get("mode", "substitute")
        suffix = f" α={self.alpha:g}" if self.alpha else ""
        rows = self.summary.get("rows_per_step")
        if self.alpha and isinstance(rows, dict):
            # whole rows: α=0.3 of 16 replays 5 (0.3125); the label must not claim 0.3
            share = effective_alpha(rows.get("fresh", 0), rows.get("replay", 0))
            suffix += f" (effective {share:.3g})" if abs(share - self.alpha) > 1e-9 else ""
        suffix += " additive" if self.alpha and mode == "additive" else ""
        if self.axes:
            suffix += f" {axes_text(self.axes)}"
        return f"{self.label}{suffix}{self.variant}"

    @cached_property
    def flops(self) -> dict[str, Any] | None:
        if isinstance(self.summary.get("flops"), dict):
            return self.summary["flops"]
        try:  # summaries written before the trainer stored its accounting
            return run_flops(self.summary)
        except (ConfigError, KeyError, ValueError, TypeError):
            return None

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        out: list[dict[str, Any]] = []
        if not path.is_file():
            return out
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    @cached_property
    def downstream(self) -> dict[str, dict[str, float]]:
        """Scores of the run's final model (``downstream/<model>.json``), if evaluated."""
        files = sorted((self.dir / "downstream").glob("after_*.json"),
                       key=lambda p: _task_index(p.stem))
        for f in reversed(files):
            with contextlib.suppress(OSError, ValueError):
                return dict(json.loads(f.read_text(encoding="utf-8")).get("tasks", {}))
        return {}

    def point(self) -> dict[str, Any]:
        """The run as one row for scaling fits and tables."""
        s, f = self.summary, self.flops or {}
        return {
            "run": self.name, "group": self.group, "label": self.label, "method": self.method,
            "variant": self.variant,
            "alpha": self.alpha, "preset": self.preset, "seed": self.seed,
            "params": s.get("params"),
            "flops_per_incoming_token": f.get("flops_per_incoming_token"),
            "total_flops": f.get("total_flops"), "forgetting": s.get("forgetting"),
            "retained_loss": s.get("retained_loss"), "learned_loss": s.get("learned_loss"),
            "union_loss": s.get("union_loss"), "grad_cos_mean": s.get("grad_cos_mean"),
        }


def axes_text(axes: dict[str, Any]) -> str:
    """Sweep axis values as ``lr=0.003 k=5``: in group names and Reptile-map panels."""
    return " ".join(f"{k}={v:g}" if isinstance(v, int | float) and not isinstance(v, bool)
                    else f"{k}={v}" for k, v in axes.items())


def _task_index(stem: str) -> int:
    parts = stem.split("_")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1


def _infer_method(cfg: dict[str, Any]) -> str:
    """The config's method, or for a config without one the method its keys amount to."""
    if cfg.get("method"):
        return str(cfg["method"])
    replays = float(cfg.get("replay", {}).get("alpha", 0.0)) > 0
    reptile = bool(cfg.get("reptile", {}).get("enabled"))
    return next(
        name for name, spec in METHODS.items()
        if spec.sampler == "sequential" and (spec.replays, spec.reptile) == (replays, reptile)
    )


def _method_label(method: str) -> str:
    spec = METHODS.get(method)
    return spec.label if spec is not None else method


def _summary_files(root: Path) -> Iterator[Path]:
    """summary.json of ``root`` or of the runs below it; a run's own subfolders are not searched
    (its checkpoints and exported models are not runs)."""
    for dirpath, dirnames, filenames in os.walk(root):
        if "summary.json" in filenames:
            dirnames.clear()
            yield Path(dirpath) / "summary.json"
        else:  # a restarted run's earlier attempts (train.run_dir.ATTEMPTS) are not runs
            dirnames[:] = sorted(d for d in dirnames if d != "attempts")


def _sweep_manifest(root: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads((root / "sweep.json").read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            return data
    return {}


def _sweep_labels(root: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in _sweep_manifest(root).get("runs", []) if "name" in r}


def sweep_baseline(dirs: Sequence[Path]) -> str | None:
    """The method label a sweep named as its ``grid.baseline`` (the first one found)."""
    return next((b for d in dirs if (b := _sweep_manifest(Path(d)).get("baseline"))), None)


def collect_runs(dirs: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """Every run under ``dirs`` (run or sweep directories) and notes on what was skipped."""
    runs: list[Run] = []
    notes: list[str] = []
    check_run_dirs(dirs)
    for root in map(Path, dirs):
        labels = _sweep_labels(root)
        for f in _summary_files(root):
            try:
                s = json.loads(f.read_text(encoding="utf-8"))
                cfg = s["config"]
                s["loss_matrix"], s["tasks"]  # noqa: B018 - required keys
            except (OSError, ValueError, KeyError, TypeError):
                notes.append(f"{f}: unreadable summary.json, skipped")
                continue
            method = _infer_method(cfg)
            name = f.parent.name
            coords = labels.get(name, {})
            runs.append(Run(
                name=name, dir=f.parent, summary=s,
                label=str(coords.get("label") or _method_label(method)),
                method=method,
                alpha=float(cfg.get("replay", {}).get("alpha", 0.0)),
                preset=str(cfg.get("model", {}).get("preset", "?")), seed=int(cfg.get("seed", 0)),
                order=tuple(s["tasks"]),
                axes=dict(coords.get("axes") or {}), axis_keys=dict(coords.get("axis_keys") or {}),
            ))
    if not runs:
        raise ConfigError(
            f"no runs found under {', '.join(map(str, dirs))} (no summary.json); pass the "
            "directories of `cptrain train` or `cptrain sweep`"
        )
    notes += _keep_settings_apart(runs)
    return runs, notes


def _settings(run: Run) -> dict[str, Any]:
    """What sets a run's numbers apart, beyond its group label and its seed."""
    out = result_settings(run.summary["config"])
    # Keys of a method the run does not use change nothing (reptile.k of a replay run).
    unused = (*(("replay.",) if not run.alpha else ()),
              *(("reptile.",) if not out.get("reptile.enabled") else ()))
    out = {k: v for k, v in out.items() if not k.startswith(unused)} if unused else out
    # the label, the seed, and what tables show as their own columns (size, task order)
    for key in ("seed", "method", "replay.alpha", "model.preset", *run.axis_keys.values()):
        out.pop(key, None)
    out["data.tasks"] = json.dumps(out.get("data.tasks"), sort_keys=True)
    return out


def _keep_settings_apart(runs: list[Run]) -> list[str]:
    """Runs of one group label must differ in their seed alone: a group is the mean over
    seeds of one setting. Where runs of one label differ in anything else that changes
    results, each setting becomes its own group (its differing keys appended to the label),
    and the report says so; runs repeating one seed of one setting are flagged."""
    notes = []
    by_group: dict[tuple[str, str, tuple[str, ...]], list[Run]] = {}
    for r in runs:  # the cells of Groups: (group, preset, order)
        by_group.setdefault((r.group, r.preset, r.order), []).append(r)
    for (group, _, _), members in by_group.items():
        settings = [_settings(r) for r in members]
        keys = sorted({k for s in settings for k in s if len({json.dumps(x.get(k), sort_keys=True)
                                                          for x in settings}) > 1})
        if keys:
            for r, st in zip(members, settings, strict=True):
                r.variant = " [" + ", ".join(f"{k}={_short(st.get(k))}" for k in keys) + "]"
                r.variant_keys = tuple(keys)
            notes.append(
                f"runs labelled {group} differ in {', '.join(keys)}; each setting is its own "
                "group, never pooled as seeds of one"
            )
    seen: dict[tuple[str, str, tuple[str, ...], int], int] = {}
    for r in runs:
        key = (r.group, r.preset, r.order, r.seed)
        seen[key] = seen.get(key, 0) + 1
    notes += [f"{g} ({p}) holds {n} runs of seed {seed} with the same settings: they are "
              "repeats, not independent seeds" for (g, p, _, seed), n in seen.items() if n > 1]
    return notes


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------- statistics
def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _count(x: float) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


# ------------------------------------------------------------------------------- blocks
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Row:
    """Tables shown side by side in HTML (one after another in Markdown)."""

    tables: list[Table]


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Figure | Row] = field(default_factory=list)


def _md_blocks(sec: Section) -> Iterator[str | Table | Figure]:
    for b in sec.blocks:
        if isinstance(b, Row):
            yield from b.tables
        else:
            yield b


def _to_markdown(title: str, sections: list[Section], out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        for b in _md_blocks(sec):
            if isinstance(b, Table):
                if b.caption:
                    lines += [f"*{b.caption}*", ""]
                lines.append("| " + " | ".join(b.header) + " |")
                lines.append("|" + "|".join("---" for _ in b.header) + "|")
                lines += ["| " + " | ".join(r) + " |" for r in b.rows]
            elif isinstance(b, Figure):
                lines.append(f"![{b.caption}]({b.path.relative_to(out_dir).as_posix()})")
                lines += ["", f"*{b.caption}*"]
            else:
                lines.append(b)
            lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
figcaption,.caption{font-size:.88em;color:#555;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:0 1.5em}
"""


def _html_table(b: Table) -> list[str]:
    e = html.escape
    out = [f"<p class='caption'>{e(b.caption)}</p>"] if b.caption else []
    out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows]
    out.append("</table>")
    return out


def _to_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{e(sec.title)}</h2>")
        for b in sec.blocks:
            if isinstance(b, Table):
                out += _html_table(b)
            elif isinstance(b, Row):
                out.append("<div class='row'>")
                out += ["<div>" + "\n".join(_html_table(t)) + "</div>" for t in b.tables]
                out.append("</div>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                out.append(f"<figure><img alt='{e(b.caption)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
            else:
                out.append(f"<p>{e(b)}</p>")
    out.append("</body></html>")
    return "\n".join(out)


# ------------------------------------------------------------------------------- grouping
def _method_rank(method: str) -> int:
    names = list(METHODS)
    return names.index(method) if method in names else len(names)


def _preset_rank(preset: str) -> tuple[int, str]:
    names = list(PRESETS)
    return (names.index(preset) if preset in names else len(names), preset)


class Groups:
    """Complete runs keyed by (group, preset, order); helpers for row/column tables."""

    def __init__(self, runs: Sequence[Run]):
        self.by: dict[tuple[str, str, tuple[str, ...]], list[Run]] = defaultdict(list)
        for r in runs:
            self.by[(r.group, r.preset, r.order)].append(r)
        rank = {r.group: (_method_rank(r.method), r.alpha, r.group) for r in runs}
        self.groups = sorted(rank, key=rank.__getitem__)
        self.presets = sorted({k[1] for k in self.by}, key=_preset_rank)
        self.orders = sorted({k[2] for k in self.by})

    def row_name(self, group: str, order: tuple[str, ...]) -> str:
        return group if len(self.orders) == 1 else f"{group} [{'→'.join(order)}]"

    def keyed(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        for order in self.orders:
            for g in self.groups:
                if any((g, p, order) in self.by for p in self.presets):
                    yield g, order

    def metric_table(self, key: str, caption: str, signed: bool = False) -> Table:
        rows = []
        for g, order in self.keyed():
            row = [self.row_name(g, order)]
            for p in self.presets:
                vals = [v for r in self.by.get((g, p, order), [])
                        if (v := r.summary.get(key)) is not None]  # older runs may lack a key
                mean, half = mean_ci(vals)
                row.append(_fmt(mean, half, signed) + (f" (n={len(vals)})" if vals else ""))
            rows.append(row)
        return Table(["method", *self.presets], rows, caption)


# ------------------------------------------------------------------------------- sections
def _overview(runs: list[Run], done: list[Run], dirs: Sequence[Path], notes: list[str]) -> Section:
    sec = Section("Overview")
    seeds = sorted({r.seed for r in done})
    sec.blocks.append(
        f"{len(runs)} runs from {', '.join(map(str, dirs))}: {len(done)} complete"
        + (f", {len(runs) - len(done)} in progress (left out of the tables)"
           if len(runs) > len(done) else "")
        + f"; seeds {', '.join(map(str, seeds)) or '–'}. Losses are validation cross-entropy "
        "(nats per token); ± is the half width of the 95% t-interval across seeds."
    )
    sec.blocks.append(
        "Forgetting = final loss − best earlier loss of each task, averaged over all tasks but "
        "the last (positive = forgot); retained = mean final loss over all tasks; learned = "
        "mean loss on each task right after training it; union = loss on all tasks' "
        "validation windows together (a task with fewer windows weighs less)."
    )
    sec.blocks += notes
    caution = precision_caution(done, "what the runs vary")
    if caution:
        sec.blocks.append(caution)
    return sec


def precision_caution(runs: Sequence[Run], varied: str) -> str | None:
    """A caution naming each precision's runs when ``runs`` trained at more than one:
    ``train.precision: auto`` picks per model width and machine, so a sweep over sizes (or
    over machines) can train its groups at different precisions without saying so."""
    by: dict[str, set[str]] = {}
    for r in runs:
        if r.summary.get("precision"):
            by.setdefault(str(r.summary["precision"]), set()).add(f"{r.preset} {r.group}")
    if len(by) < 2:
        return None
    each = "; ".join(f"{p}: {', '.join(sorted(names))}" for p, names in sorted(by.items()))
    return (
        f"Caution: these runs trained at different precisions ({each}), so {varied} is "
        "confounded with precision; set train.precision for all of them."
    )


def _metric_tables(g: Groups) -> Section:
    sec = Section("Forgetting, retained and learned loss (paper Fig. 4, Tables 2 and 4)")
    sec.blocks.append(g.metric_table("forgetting", "Forgetting by method and model size "
                                     "(lower is better)", signed=True))
    sec.blocks.append(g.metric_table("retained_loss", "Table 2 — retained loss (mean final loss "
                                     "over all tasks; lower is better)"))
    sec.blocks.append(g.metric_table("learned_loss", "Table 4 — learned loss (loss on each task "
                                     "right after training it; lower is better)"))
    sec.blocks.append(g.metric_table("union_loss", "Union loss after the last task"))
    if any("forgetting_paper_code" in r.summary for rs in g.by.values() for r in rs):
        sec.blocks.insert(1, g.metric_table(
            "forgetting_paper_code", "Forgetting as the paper's official code computes it "
            "(its sign and averaging, comparable with the paper's Fig. 4; see the README)",
            signed=True))
    for key, name in (("forgetting", "forgetting"), ("retained_loss", "retained loss"),
                      ("learned_loss", "learned loss")):
        sec.blocks += overlap_words(g, key, name)
    sec.blocks.append(n_note([len(rs) for rs in g.by.values()], "seeds per method and size",
                             paired=False))
    return sec


def overlap_words(g: Groups, key: str, name: str) -> list[str]:
    """Which methods are significantly higher than the lowest one, by Welch t-tests
    Holm-adjusted over every pair of methods of one preset and order; with one seed somewhere
    there is no test and no ranking is claimed."""
    out = []
    for order in g.orders:
        for p in g.presets:
            values = {grp: [r.summary.get(key) for r in g.by[(grp, p, order)]]
                      for grp in g.groups if (grp, p, order) in g.by}
            values = {k: v for k, v in values.items() if any(x is not None for x in v)}
            if len(values) < 2:
                continue
            where = p + ("" if len(g.orders) == 1 else f" [{'→'.join(order)}]")
            found = versus_lowest(values)
            if found is None:
                out.append(f"{name.capitalize()}, {where}: some methods have one seed, so "
                           "there is no test: cannot tell which is lowest.")
                continue
            best, higher, same = found
            bm = mean_ci(values[best])[0]
            out.append(
                f"{name.capitalize()}, {where}: lowest mean {best} ({bm:.3f}); "
                + (f"no significant difference from {_listed(same)}; " if same else "")
                + f"{len(higher)} method(s) significantly higher"
                + (f": {_listed(higher)}" if higher else "") + f" (Welch t-tests, {METHOD}-"
                f"adjusted across {len(values) * (len(values) - 1) // 2} pair(s) of methods)."
            )
    return out


def _listed(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def _forgetting_figure(g: Groups, fig_dir: Path) -> Figure | None:
    names = [g.row_name(grp, o) for grp, o in g.keyed()]
    series = {
        p: [mean_ci([r.summary.get("forgetting") for r in g.by.get((grp, p, o), [])])
            for grp, o in g.keyed()]
        for p in g.presets
    }
    path = bars_figure(names, series, fig_dir / "forgetting.png",
                       ylabel="forgetting (Δ loss, nats)",
                       title="Forgetting per method, 95% CI across seeds")
    return Figure(path, "Forgetting per method and size; error bars: 95% t-interval across "
                        "seeds (paper Fig. 4).") if path else None


def _curve_points(run: Run, key: str) -> dict[int, dict[str, float]]:
    """step → {series: loss} from the eval and task_end records (and step 0 when logged)."""
    out: dict[int, dict[str, float]] = {}
    for rec in run.records:
        if rec.get("type") not in ("eval", "task_end"):
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


def _curve_sections(g: Groups, fig_dir: Path) -> Section:
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


def _loss_matrices(g: Groups) -> Section:
    sec = Section("Loss matrices (row: after task, column: task; mean over seeds)")
    for grp, order in g.keyed():
        row = Row([])
        sec.blocks.append(row)
        for p in g.presets:
            runs = g.by.get((grp, p, order), [])
            if not runs:
                continue
            m = np.mean([np.asarray(r.summary["loss_matrix"], dtype=float) for r in runs], axis=0)
            eval_only = list(runs[0].summary.get("eval_only") or [])
            columns = [*order, *eval_only]
            rows = [[f"after {order[i]}", *(f"{v:.3f}" for v in row)] for i, row in enumerate(m)]
            befores = [r.summary.get("loss_before") or {} for r in runs]
            if all(set(columns) <= set(b) for b in befores):
                before = np.mean([[b[c] for c in columns] for b in befores], axis=0)
                rows.insert(0, ["before", *(f"{v:.3f}" for v in before)])
            header = ["", *order, *(f"{t} (eval only)" for t in eval_only)]
            row.tables.append(Table(header, rows, f"{g.row_name(grp, order)} · {p}"))
    return sec


def _compute_section(g: Groups) -> Section:
    sec = Section("Compute")
    rows = []
    for grp, order in g.keyed():
        for p in g.presets:
            runs = g.by.get((grp, p, order), [])
            fl = [r.flops for r in runs if r.flops]
            if not runs:
                continue
            s = runs[0].summary
            rows.append([
                f"{g.row_name(grp, order)} · {p}", _count(s.get("params", 0)),
                _sci(fl[0]["flops_per_token"]) if fl else "–",
                _sci(fl[0]["flops_per_incoming_token"]) if fl else "–",
                _sci(float(np.mean([f["total_flops"] for f in fl]))) if fl else "–",
                _sci(float(np.mean([f["reptile_flops"] for f in fl]))) if fl else "–",
                _count(float(np.mean([r.summary.get("fresh_tokens", 0) for r in runs]))),
                _count(float(np.mean([r.summary.get("replay_tokens", 0) for r in runs]))),
                f"{np.mean([r.summary.get('wall_s', 0.0) for r in runs]):.0f}",
                _mfu(runs),
            ])
    conv = next((r.flops["convention"] for rs in g.by.values() for r in rs if r.flops), "")
    sec.blocks.append(Table(
        ["run group", "params", "FLOPs/token", "FLOPs/incoming token", "total FLOPs",
         "Reptile FLOPs", "fresh tokens", "replayed tokens", "wall s", "MFU"],
        rows, f"Training compute per run (mean over seeds); {conv}; evaluation not counted. "
        "MFU: model FLOPs per second of training steps ÷ the matmul peak measured on the "
        "run's machine at its precision (cptrain.hardware.probe)."))
    missing = sum(r.flops is None for rs in g.by.values() for r in rs)
    if missing:
        sec.blocks.append(f"{missing} run(s) without compute figures: their summary.json was "
                          "written by an older cptrain; `cptrain train --resume` rewrites it.")
    return sec


def _mfu(runs: list[Run]) -> str:
    """Mean MFU over seeds, with the precision it was measured at ('–' for summaries written
    before cptrain measured it)."""
    found = [r.summary for r in runs if isinstance(r.summary.get("mfu"), int | float)]
    if not found:
        return "–"
    dtypes = sorted({str(s.get("peak_dtype", "?")) for s in found})
    return f"{100 * float(np.mean([s['mfu'] for s in found])):.1f}% {'/'.join(dtypes)}"


def _scaling_section(done: list[Run], fig_dir: Path) -> Section | None:
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
        st = _settings(r)
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


def _downstream_section(g: Groups) -> Section | None:
    tasks = sorted({t for rs in g.by.values() for r in rs for t in r.downstream})
    if not tasks:
        return None
    main = {t: ("bits_per_byte" if "bpb" in t else "acc_norm") for t in tasks}
    rows = []
    for grp, order in g.keyed():
        for p in g.presets:
            runs = [r for r in g.by.get((grp, p, order), []) if r.downstream]
            if not runs:
                continue
            cells = []
            for t in tasks:
                vals = [r.downstream.get(t, {}).get(main[t]) for r in runs]
                if main[t] not in next((r.downstream[t] for r in runs if t in r.downstream), {}):
                    vals = [r.downstream.get(t, {}).get("acc") for r in runs]
                cells.append(_fmt(*mean_ci([v for v in vals if v is not None])))
            rows.append([f"{g.row_name(grp, order)} · {p} (n={len(runs)})", *cells])
    header = ["model", *(f"{t} ({main[t]})" for t in tasks)]
    return Section("Downstream evaluation (paper Table 3)", [Table(
        header, rows, "lm-evaluation-harness, final model of each run; acc_norm: higher is "
                      "better (chance 0.25 on 4-way choice); bits per byte: lower is better.")])


def _alignment_section(g: Groups, fig_dir: Path) -> Section | None:
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


def _runs_table(runs: list[Run]) -> Section:
    rows = []
    for r in sorted(runs, key=lambda r: r.name):
        s = r.summary
        rows.append([r.name, r.group, r.preset, str(r.seed), "→".join(r.order),
                     _fmt(s.get("forgetting"), signed=True),
                     _fmt(s.get("forgetting_paper_code"), signed=True),  # "–" for older runs
                     # summaries written before the history-based figure have only this one
                     _fmt(s.get("forgetting_task_end", s.get("forgetting")), signed=True),
                     _fmt(s.get("retained_loss")),
                     _fmt(s.get("learned_loss")), _fmt(s.get("union_loss")),
                     "yes" if r.complete else f"no ({len(s['loss_matrix'])} tasks)"])
    return Section("All runs", [Table(["run", "method", "preset", "seed", "order", "forgetting",
                                       "forgetting (paper code)", "forgetting (task-end only)",
                                       "retained", "learned", "union", "complete"], rows)])


# ------------------------------------------------------------------------------- entry point
def build_sections(dirs: Sequence[Path], fig_dir: Path) -> list[Section]:
    runs, notes = collect_runs(dirs)
    done = [r for r in runs if r.complete]
    sections = [_overview(runs, done, dirs, notes)]
    if done:
        g = Groups(done)
        sections += [_metric_tables(g)]
        fig = _forgetting_figure(g, fig_dir)
        if fig:
            sections[-1].blocks.insert(1, fig)
        sections.append(_curve_sections(g, fig_dir))
        from cptrain.report import studies  # imports this module's blocks

        baseline = sweep_baseline(dirs)
        optional = [studies.paired_section(done, baseline),
                    studies.reptile_map_section(done, baseline, fig_dir),
                    studies.replay_ratio_section(done, fig_dir),
                    studies.size_vs_replay_section(done),
                    _scaling_section(done, fig_dir), _downstream_section(g),
                    _alignment_section(g, fig_dir)]
        sections += [s for s in optional if s is not None]
        sections += [_compute_section(g), _loss_matrices(g)]
    sections.append(_runs_table(runs))
    return sections


def write_report(dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` and ``out_dir/figures/``; returns
    the HTML path."""
    out_dir = Path(out_dir)
    check_run_dirs(dirs)  # before out_dir (often inside the first of them) is made
    fig_dir = out_dir / "figures"
    made = not out_dir.exists()
    fig_dir.mkdir(parents=True, exist_ok=True)
    try:
        sections = build_sections([Path(d) for d in dirs], fig_dir)
    except BaseException:
        if made:  # no runs, or a failure: leave no empty report directory behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"cptrain report ({stamp})"
    atomic_write_text(out_dir / "report.md", _to_markdown(title, sections, out_dir))
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, _to_html(title, sections))
    return html_path
