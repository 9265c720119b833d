"""The runs a report reads and how they group: one ``Run`` per run directory (read through
``RunDir``) under the directories given, runs of one label split into settings where they
differ in more than their seed, and ``Groups``, the complete runs keyed by (group, preset,
task order)."""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cptrain.config import METHODS, result_settings
from cptrain.errors import ConfigError
from cptrain.models.presets import PRESETS
from cptrain.replay.mixer import effective_alpha
from cptrain.report.blocks import Table
from cptrain.report.stats import fmt, mean_ci
from cptrain.rundir import layout
from cptrain.rundir.run_dir import RunDir, check_run_dirs, find_runs


@dataclass
class Run:
    name: str
    dir: Path
    summary: dict[str, Any]
    label: str
    method: str
    alpha: float
    preset: str  # the model: its preset, or the released model's folder (see _size)
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

    @property
    def flops(self) -> dict[str, Any] | None:
        """Compute accounting (older summaries get theirs from the run directory's migrator)."""
        found = self.summary.get("flops")
        return found if isinstance(found, dict) else None

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        return RunDir(self.dir).records()

    @cached_property
    def downstream(self) -> dict[str, dict[str, float]]:
        """Scores of the run's final model (``downstream/<model>.json``), if evaluated."""
        return RunDir(self.dir).downstream_results()

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


def _infer_method(cfg: dict[str, Any]) -> str:
    """The config's method, or for a config without one the method its keys amount to."""
    if cfg.get("method"):
        return str(cfg["method"])
    replays = float(cfg.get("replay", {}).get("alpha", 0.0)) > 0
    reptile = bool(cfg.get("reptile", {}).get("enabled"))
    # the plain method of these keys (an anchor without a method keeps its plain method's name)
    return next(
        name for name, spec in METHODS.items()
        if spec.sampler == "sequential" and not spec.anchors
        and (spec.replays, spec.reptile) == (replays, reptile)
    )


def _method_label(method: str) -> str:
    spec = METHODS.get(method)
    return spec.label if spec is not None else method


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
        for run in find_runs(root):
            try:
                s = run.summary()
                cfg = s["config"]
                s["loss_matrix"], s["tasks"]  # noqa: B018 - required keys
            except (ConfigError, KeyError):
                notes.append(f"{run.summary_path}: unreadable {layout.SUMMARY}, skipped")
                continue
            method = _infer_method(cfg)
            name = run.path.name
            coords = labels.get(name, {})
            runs.append(Run(
                name=name, dir=run.path, summary=s,
                label=str(coords.get("label") or _method_label(method)),
                method=method,
                alpha=float(cfg.get("replay", {}).get("alpha", 0.0)),
                preset=_size(cfg), seed=int(cfg.get("seed", 0)),
                order=tuple(s["tasks"]),
                axes=dict(coords.get("axes") or {}), axis_keys=dict(coords.get("axis_keys") or {}),
            ))
    if not runs:
        raise ConfigError(
            f"no runs found under {', '.join(map(str, dirs))} (no {layout.SUMMARY}); pass the "
            "directories of `cptrain train` or `cptrain sweep`"
        )
    notes += _keep_settings_apart(runs)
    return runs, notes


def _size(cfg: dict[str, Any]) -> str:
    """The model a run trained: its preset, or the folder of the released model it continued
    (whose preset the config keeps unused)."""
    model = cfg.get("model", {})
    init = model.get("init_from")
    return Path(str(init)).name if init else str(model.get("preset", "?"))


def settings(run: Run) -> dict[str, Any]:
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
        found = [settings(r) for r in members]
        keys = sorted({k for s in found for k in s if len({json.dumps(x.get(k), sort_keys=True)
                                                           for x in found}) > 1})
        if keys:
            for r, st in zip(members, found, strict=True):
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


# ------------------------------------------------------------------------------- grouping
def _method_rank(method: str) -> int:
    names = list(METHODS)
    return names.index(method) if method in names else len(names)


def _preset_rank(preset: str) -> tuple[int, str]:
    """Presets smallest first (their order in PRESETS), unknown ones after, by name."""
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
                row.append(fmt(mean, half, signed) + (f" (n={len(vals)})" if vals else ""))
            rows.append(row)
        return Table(["method", *self.presets], rows, caption)
