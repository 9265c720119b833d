"""`cptrain sweep SWEEP.yaml`: a grid of runs (methods × α × axes × presets × seeds × task orders).

Every run of the grid is validated before the first one trains, gets a readable directory name
under ``out_dir`` (``mer-a0.25_tiny_s1_en-fr-de``) and trains after the previous one finished.
Re-running the same command continues the sweep: complete runs are skipped (after checking that
their config still matches the sweep file), interrupted runs resume from their last checkpoint.
``out_dir/sweep.json`` lists the runs with their grid coordinates; ``cptrain report`` reads it.

``grid.axes`` add any config key as a grid dimension (``reptile.k: [5, 20, 80]``), optionally
for some methods only; ``grid.baseline`` names the method the report compares every other one
with, run by run (same seed, preset, order and shared axis values).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from cptrain.config import METHODS, RunConfig, config_differences
from cptrain.config_base import StrictModel, apply_overrides, build_config, read_yaml, set_path
from cptrain.errors import ConfigError, DataError
from cptrain.fsutil import atomic_write_json
from cptrain.models.presets import PRESETS
from cptrain.rundir.layout import list_checkpoints
from cptrain.rundir.run_dir import RunDir

MANIFEST = "sweep.json"


class MethodSpec(StrictModel):
    """One method of the grid; ``alphas`` default to the grid's for methods that replay
    (replay, mer), else 0."""

    method: str
    name: str | None = Field(
        default=None, description="label in run names and reports (default: the method's)"
    )
    alphas: list[float] | None = None
    set: dict[str, Any] = Field(default_factory=dict, description="config keys for this method")
    presets: list[str] | None = Field(
        default=None, description="only at these of the grid's presets (default: all)"
    )

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/_ \\")):
            raise ValueError("name must be non-empty, without '/', '_', '\\' or spaces")
        return v


class Axis(StrictModel):
    """One extra grid dimension: a dotted config key and its values."""

    key: str = Field(description="dotted run-config key, e.g. reptile.epsilon")
    values: list[Any] = Field(min_length=1)
    label: str | None = Field(default=None, description="in run names (default: last key part)")
    methods: list[str] | None = Field(
        default=None,
        description="entries it applies to: a named entry by its name, others by their method "
        "(default: all)",
    )

    @property
    def name(self) -> str:
        return self.label or self.key.rsplit(".", 1)[-1]

    def applies(self, spec: MethodSpec) -> bool:
        # A named entry is a variant of its method; naming the method must not drag it in.
        return self.methods is None or (spec.name or spec.method) in self.methods


class SweepGrid(StrictModel):
    methods: list[str | MethodSpec] = Field(min_length=1)
    alphas: list[float] = Field(default=[0.25], min_length=1, description="for replay and mer")
    presets: list[str] | None = Field(default=None, description="default: the base's preset")
    preset_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="config keys per preset: {small: {train: {lr: 1e-3}}}"
    )
    seeds: list[int] = Field(default=[0], min_length=1)
    task_orders: list[list[str]] | None = Field(default=None, description="default: base order")
    axes: list[Axis] = Field(default_factory=list, description="extra dimensions: config keys")
    baseline: str | None = Field(
        default=None, description="method label the report pairs every other run with"
    )

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: list[Axis]) -> list[Axis]:
        names = [a.name for a in v]
        for a in v:
            if names.count(a.name) > 1:
                raise ValueError(f"axis label {a.name!r} is used twice; give each axis a label")
            if not a.name or any(c in a.name for c in "/_ -=\\"):
                raise ValueError(f"axis label {a.name!r} must not contain '/', '_', '-', '=' "
                                 "or spaces")
        return v

    @field_validator("methods", mode="after")
    @classmethod
    def _specs(cls, v: list[str | MethodSpec]) -> list[str | MethodSpec]:
        return [MethodSpec(method=m) if isinstance(m, str) else m for m in v]

    @field_validator("presets")
    @classmethod
    def _presets(cls, v: list[str] | None) -> list[str] | None:
        for p in v or []:
            if p not in PRESETS:
                raise ValueError(f"unknown preset {p!r}; choose one of {', '.join(PRESETS)}")
        return v


class SweepConfig(StrictModel):
    out_dir: str
    base: dict[str, Any] | str = Field(description="run config: inline mapping or a YAML path")
    grid: SweepGrid


@dataclass
class SweepRun:
    name: str
    config: RunConfig
    coords: dict[str, Any]  # label, method, alpha, preset, seed, order

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def status(self) -> str:
        """done | resume | new (or started: a directory without any checkpoint yet)."""
        run = RunDir(self.run_dir)
        if run.finished():
            return "done"
        if run.checkpoints():
            return "resume"
        return "started" if self.run_dir.exists() else "new"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_sweep(path: Path, overrides: list[str] | None = None) -> SweepConfig:
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return build_config(SweepConfig, data, source=str(path))


def _base_dict(cfg: SweepConfig) -> dict[str, Any]:
    if isinstance(cfg.base, str):
        return read_yaml(Path(cfg.base))
    return copy.deepcopy(cfg.base)


def _task_specs(base: dict[str, Any], order: list[str]) -> list[Any]:
    known = {(t if isinstance(t, str) else t.get("name")): t for t in base["data"]["tasks"]}
    missing = [n for n in order if n not in known]
    if missing:
        raise ConfigError(
            f"grid.task_orders: {', '.join(missing)} not in base data.tasks "
            f"({', '.join(map(str, known))}); list each task in the base config"
        )
    return [copy.deepcopy(known[n]) for n in order]


def _alphas(spec: MethodSpec, grid: SweepGrid) -> list[float]:
    if not METHODS[spec.method].replays:
        if spec.alphas and any(a != 0 for a in spec.alphas):
            replaying = " or ".join(m for m, s in METHODS.items() if s.replays)
            raise ConfigError(
                f"grid.methods: method {spec.method} does not replay; drop its alphas "
                f"(use method {replaying} for α > 0)"
            )
        return [0.0]
    alphas = spec.alphas if spec.alphas is not None else grid.alphas
    if any(not 0 < a < 1 for a in alphas):
        raise ConfigError(f"grid: method {spec.method} needs alphas in (0, 1), got {alphas}")
    return alphas


def _axis_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def run_name(
    label: str, alpha: float, preset: str, seed: int, order: list[str],
    axes: dict[str, Any] | None = None,
) -> str:
    a = f"-a{alpha:g}" if alpha else ""
    a += "".join(f"-{k}{_axis_text(v)}" for k, v in (axes or {}).items())
    return f"{label}{a}_{preset}_s{seed}_{'-'.join(order)}"


def _axis_points(spec: MethodSpec, grid: SweepGrid) -> Iterator[dict[str, tuple[str, Any]]]:
    """label → (key, value) for every combination of the axes that apply to ``spec``."""
    axes = [a for a in grid.axes if a.applies(spec)]
    for combo in itertools.product(*(a.values for a in axes)):
        yield {a.name: (a.key, v) for a, v in zip(axes, combo, strict=True)}


def _grid_points(cfg: SweepConfig, base: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    g = cfg.grid
    presets = g.presets or [base.get("model", {}).get("preset", "tiny")]
    base_order = [t if isinstance(t, str) else t.get("name") for t in base["data"]["tasks"]]
    orders = g.task_orders or [base_order]
    # Seeds vary fastest so that an early stop leaves complete methods, not complete seeds.
    for order in orders:
        for preset in presets:
            for spec in g.methods:
                assert isinstance(spec, MethodSpec)
                if spec.presets is not None and preset not in spec.presets:
                    continue
                for alpha in _alphas(spec, g):
                    for axes in _axis_points(spec, g):
                        for seed in g.seeds:
                            yield spec, alpha, preset, seed, order, axes


def expand_sweep(cfg: SweepConfig) -> list[SweepRun]:
    """Every run of the grid, validated; ConfigError on the first bad one or a repeated name."""
    base = _base_dict(cfg)
    if not isinstance(base.get("data"), dict) or "tasks" not in base["data"]:
        raise ConfigError("sweep base: needs a data section with tasks (the training order)")
    out_dir = Path(cfg.out_dir)
    runs: list[SweepRun] = []
    seen: set[str] = set()
    for spec, alpha, preset, seed, order, axes in _grid_points(cfg, base):
        method = METHODS[spec.method]
        values = {label: v for label, (_, v) in axes.items()}
        name = run_name(spec.name or spec.method, alpha, preset, seed, order, values)
        if name in seen:
            raise ConfigError(f"grid: run {name} appears twice; give repeated methods a name")
        seen.add(name)
        raw = _merge(base, spec.set)
        raw = _merge(raw, cfg.grid.preset_settings.get(preset, {}))
        for label, (key, value) in axes.items():
            set_path(raw, key.split("."), copy.deepcopy(value), where=f"grid.axes {label}")
        raw = _merge(
            raw,
            {
                "run_dir": str(out_dir / name),
                "seed": seed,
                "method": spec.method,
                "model": {"preset": preset},
                # Explicit, so that a base with replay or Reptile keys cannot relabel a method.
                "replay": {"alpha": alpha},
                "reptile": {"enabled": method.reptile},
            },
        )
        # from the merged config: an entry's set may give the tasks their own fields
        raw["data"]["tasks"] = _task_specs(raw, order)
        run_cfg = build_config(RunConfig, raw, source=f"sweep run {name}")
        coords = {"label": spec.name or method.label, "method": spec.method, "alpha": alpha,
                  "preset": preset, "seed": seed, "order": list(order), "axes": values,
                  "axis_keys": {label: key for label, (key, _) in axes.items()}}
        runs.append(SweepRun(name, run_cfg, coords))
    _check_labels(cfg.grid, {r.coords["label"] for r in runs} | {r.coords["method"] for r in runs})
    return runs


def _check_labels(grid: SweepGrid, labels: set[str]) -> None:
    known = ", ".join(sorted(labels))
    if grid.baseline is not None and grid.baseline not in labels:
        raise ConfigError(f"grid.baseline: {grid.baseline!r} is not a method of the grid "
                          f"({known}); name one of them")
    presets = set(grid.presets or [])
    for spec in grid.methods:
        assert isinstance(spec, MethodSpec)
        extra = sorted(set(spec.presets or []) - presets) if grid.presets else []
        if extra:
            raise ConfigError(f"grid.methods {spec.name or spec.method}: presets "
                              f"{', '.join(extra)} are not in grid.presets; list them there")
    for a in grid.axes:
        unknown = sorted(set(a.methods or []) - labels)
        if unknown:
            raise ConfigError(f"grid.axes {a.name}: methods {', '.join(unknown)} are not in the "
                              f"grid ({known}); name methods of grid.methods")


def _changed(run: SweepRun) -> list[str]:
    """How a finished run's settings differ from what the sweep file asks of it now."""
    summary = RunDir(run.run_dir).summary()
    diffs = config_differences(summary.get("config", {}), run.config.model_dump(mode="json"))
    return [d for d in diffs if not d.startswith("run_dir:")]  # a moved sweep is still valid


def _check_unchanged(run: SweepRun) -> None:
    """A finished run trained with other settings would silently mix into the results."""
    diffs = _changed(run)
    if diffs:
        raise ConfigError(
            f"run {run.name} finished with other settings ({diffs[0]}); delete {run.run_dir} "
            "to retrain it or restore the sweep file"
        )


def _planned_cost(run: SweepRun) -> float:
    """Relative cost (FLOPs) of a run, for the ETA; the vocabulary comes from the data."""
    from cptrain.data.prepare import load_prepared
    from cptrain.models.flops import planned_flops

    cfg = run.config
    vocab = 32000  # an ETA only: an unprepared or odd data dir fails later, with its own line
    with contextlib.suppress(DataError, KeyError, TypeError, ValueError):
        vocab = int(load_prepared(Path(cfg.data.dir))["tokenizer"]["vocab_size"])
    return planned_flops(cfg.model_dump(mode="json"), vocab, _steps(cfg))


def _steps(cfg: RunConfig) -> int:
    return sum(cfg.task_steps)


def _left(run: SweepRun) -> float:
    """The fraction of its steps a run still has to train (1 unless it resumes)."""
    done = list_checkpoints(run.run_dir / "checkpoints")
    return max(0.0, 1.0 - (done[-1][0] if done else 0) / _steps(run.config))


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _write_manifest(
    out_dir: Path, source: str, runs: list[SweepRun], baseline: str | None
) -> None:
    atomic_write_json(
        out_dir / MANIFEST,
        {
            "format": "cptrain-sweep-v1",
            "source": source,
            "baseline": baseline,
            "runs": [{"name": r.name, "run_dir": r.name, **r.coords} for r in runs],
        },
    )


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Two sweeps on one directory would train the same runs at once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".sweep.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another `cptrain sweep` is running on {out_dir}; wait for it or use another "
                "out_dir"
            ) from None
        yield


def print_plan(runs: list[SweepRun]) -> None:
    width = max(len(r.name) for r in runs)
    for r in runs:
        status = r.status()
        diffs = _changed(r) if status == "done" else []
        if diffs:  # what the real sweep refuses must not read "done" here
            status = (f"CHANGED since it finished ({diffs[0]}); the sweep refuses it: delete "
                      "the run to retrain it or restore the sweep file")
        print(f"  {r.name.ljust(width)}  {status}")


def run_sweep(
    path_or_cfg: Path | str | SweepConfig,
    *,
    overrides: list[str] | None = None,
    progress: bool = True,
    dry_run: bool = False,
) -> list[Path]:
    """Train every run of the sweep not yet complete; returns all run directories in order."""
    if isinstance(path_or_cfg, SweepConfig):
        cfg, source = path_or_cfg, "<config>"
        if overrides:
            data = apply_overrides(cfg.model_dump(mode="json"), overrides)
            cfg = build_config(SweepConfig, data, source="sweep")
    else:
        cfg, source = load_sweep(Path(path_or_cfg), overrides), str(path_or_cfg)
    runs = expand_sweep(cfg)
    out_dir = Path(cfg.out_dir)
    counts = {s: sum(r.status() == s for r in runs) for s in ("done", "resume", "started", "new")}
    print(
        f"sweep {source}: {len(runs)} runs in {out_dir} ({counts['done']} done, "
        f"{counts['resume']} to resume, {counts['new'] + counts['started']} to train)"
    )
    if dry_run:
        print_plan(runs)
        return [r.run_dir for r in runs]
    with _exclusive(out_dir):
        for r in runs:
            if r.status() == "done":
                _check_unchanged(r)
        _write_manifest(out_dir, source, runs, cfg.grid.baseline)
        _train_all(runs, progress)
    return [r.run_dir for r in runs]


def _train_all(runs: list[SweepRun], progress: bool) -> None:
    from cptrain.report.tables import metrics_line
    from cptrain.train import train

    todo = [r for r in runs if r.status() != "done"]
    # what is left of each run: a resumed one costs (and takes) only its remaining steps, so
    # its short time does not make the ETA per run look short
    costs = {r.name: _planned_cost(r) * _left(r) for r in todo}
    spent_cost, t_start = 0.0, time.perf_counter()
    for r in todo:
        i = runs.index(r) + 1
        status = r.status()
        remaining = sum(costs[x.name] for x in todo[todo.index(r) :])
        elapsed = time.perf_counter() - t_start
        eta = f", ETA {_fmt_s(elapsed / spent_cost * remaining)}" if spent_cost else ""
        verb = "resuming" if status == "resume" else "training"
        print(f"[{i}/{len(runs)}] {r.name}: {verb} (elapsed {_fmt_s(elapsed)}{eta})", flush=True)
        t0 = time.perf_counter()
        summary = train(r.config, resume=status == "resume", progress=progress)
        spent_cost += costs[r.name]
        print(
            f"[{i}/{len(runs)}] {r.name}: done in {_fmt_s(time.perf_counter() - t0)}; "
            f"{metrics_line(summary)}",
            flush=True,
        )
    print(f"sweep finished: {len(runs)} runs in {Path(runs[0].config.run_dir).parent}")
