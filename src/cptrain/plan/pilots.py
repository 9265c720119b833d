"""The plan's runs: the settings it compares, the pilots (a sweep underneath: resumable, skips
finished runs), the optional start run, and the loss curves read back through ``RunDir``."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.errors import ConfigError
from cptrain.plan.config import PlanConfig, new_task, old_tasks
from cptrain.plan.law import Curve, schedule_areas
from cptrain.replay.mixer import mix_counts
from cptrain.rundir.run_dir import RunDir
from cptrain.sweep import MethodSpec, SweepConfig, SweepGrid, expand_sweep, run_sweep
from cptrain.train.schedule import Schedule

PILOTS, VERIFY, START = "pilots", "verify", "start"
CURVE_KINDS = ("before", "eval", "task_end")


@dataclass(frozen=True)
class Setting:
    """One point of what may vary: replay ratio, peak lr, schedule family, warm-up fraction."""

    alpha: float
    lr: float
    schedule: str
    warmup: float

    @property
    def name(self) -> str:
        """A sweep entry name and report label (unique per setting)."""
        return f"r{self.alpha:g}-lr{self.lr:.3g}-{self.schedule}-w{self.warmup:g}"

    def settings(self, replay_seed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train": {"lr": self.lr, "schedule": self.schedule, "warmup": self.warmup}}
        if self.alpha > 0 and replay_seed:
            out["replay"] = {"seed": copy.deepcopy(replay_seed)}
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lr": self.lr, "schedule": self.schedule,
                "warmup": self.warmup}


def _mid(lo: float, hi: float, geometric: bool) -> float:
    return math.sqrt(lo * hi) if geometric else (lo + hi) / 2


def _warmups(cfg: PlanConfig, base: dict[str, Any]) -> list[float]:
    if cfg.vary.warmup is not None:
        return list(cfg.vary.warmup)
    return [float(base.get("train", {}).get("warmup", 0.02))]


def pilot_settings(cfg: PlanConfig, base: dict[str, Any]) -> list[Setting]:
    """A 3 × 3 grid over the (α, lr) range (ends and middle; lr geometric) in the first
    schedule, every pilot annealing over its own short horizon so the fit sees S1 and S2 move
    apart; the centre again in every other schedule and warm-up. ``pilots.alphas``/``lrs``
    replace the grid's values. (Corners and centre alone, 5 pilots, left each corner to an
    extrapolation in both α and lr when held out: leave-one-out errors of 0.1–1.5 nats on the
    demo.)"""
    (a_lo, a_hi), (l_lo, l_hi) = cfg.vary.alpha, cfg.vary.lr
    warm = _warmups(cfg, base)
    first = cfg.vary.schedules[0]
    alphas = cfg.pilots.alphas or [a_lo, _mid(a_lo, a_hi, False), a_hi]
    lrs = cfg.pilots.lrs or [l_lo, _mid(l_lo, l_hi, True), l_hi]
    points = list(itertools.product(alphas, lrs))
    out = [Setting(a, lr, first, warm[0]) for a, lr in points]
    centre = (_mid(a_lo, a_hi, False), _mid(l_lo, l_hi, True))
    out += [Setting(*centre, s, w) for s in cfg.vary.schedules for w in warm
            if (s, w) != (first, warm[0])]
    return list(dict.fromkeys(out))


def realizable(alphas: Sequence[float], base: dict[str, Any]) -> list[float]:
    """Each α as the share of the batch it really replays (whole rows: at 4 rows a step, α 0.1
    replays none and 0.3 one, i.e. 0.25), without repeats; an α > 0 that replays no row is
    dropped (it would be sequential training)."""
    batch = int(base["train"]["batch_size"])
    mode = base.get("replay", {}).get("mode", "substitute")
    out = []
    for a in alphas:
        fresh, rep = mix_counts(float(a), batch, mode)
        if a > 0 and rep == 0:
            continue
        out.append(round(rep / (fresh + rep), 6))
    return sorted(set(out))


def candidate_settings(cfg: PlanConfig, base: dict[str, Any]) -> list[Setting]:
    """The grid the recommendation is chosen from: ``candidates`` replay ratios (evenly, as
    whole replayed rows) and learning rates (geometrically) across the ranges, every schedule
    and warm-up."""
    n = cfg.candidates
    alphas = np.linspace(*cfg.vary.alpha, n) if cfg.vary.alpha[1] > cfg.vary.alpha[0] else [
        cfg.vary.alpha[0]]
    lrs = np.geomspace(*cfg.vary.lr, n) if cfg.vary.lr[1] > cfg.vary.lr[0] else [cfg.vary.lr[0]]
    return [Setting(a, float(f"{lr:.4g}"), s, w)
            for s in cfg.vary.schedules for w in _warmups(cfg, base)
            for a in realizable(alphas, base) for lr in lrs]


def _tokens_per_step(base: dict[str, Any]) -> int:
    train = base.get("train", {})
    try:
        return int(train["batch_size"]) * int(train["seq_len"])
    except KeyError:
        raise ConfigError("base train: set batch_size and seq_len (the plan counts steps from "
                          "them)") from None


def full_steps(cfg: PlanConfig, base: dict[str, Any]) -> int:
    return max(1, math.ceil(cfg.budget.tokens / _tokens_per_step(base)))


def plan_sweep(cfg: PlanConfig, base: dict[str, Any], settings: list[Setting], *, tokens: int,
           seeds: list[int], sub: str, start_model: Path | None) -> SweepConfig:
    raw = copy.deepcopy(base)
    raw["data"]["tokens_per_task"] = tokens
    raw["data"]["tasks"] = [new_task(base)]
    steps = max(1, math.ceil(tokens / _tokens_per_step(base)))
    raw.setdefault("eval", {})["every"] = max(1, steps // cfg.pilots.points)
    if start_model is not None:
        raw.setdefault("model", {})["init_from"] = str(start_model)
    methods = [MethodSpec(method="replay" if s.alpha > 0 else "sequential", name=s.name,
                          alphas=[s.alpha] if s.alpha > 0 else None,
                          set=s.settings(cfg.replay_seed))
               for s in settings]
    grid = SweepGrid(methods=methods, seeds=seeds)
    return SweepConfig(out_dir=str(Path(cfg.out_dir) / sub), base=raw, grid=grid)


def pilot_sweep(cfg: PlanConfig, base: dict[str, Any], start_model: Path | None) -> SweepConfig:
    tokens = max(1, round(cfg.pilots.fraction * cfg.budget.tokens))
    return plan_sweep(cfg, base, pilot_settings(cfg, base), tokens=tokens, seeds=cfg.pilots.seeds,
                  sub=PILOTS, start_model=start_model)


def verify_sweep(cfg: PlanConfig, base: dict[str, Any], setting: Setting,
                 start_model: Path | None) -> SweepConfig:
    return plan_sweep(cfg, base, [setting], tokens=cfg.budget.tokens, seeds=cfg.verify_seeds,
                  sub=VERIFY, start_model=start_model)


def check_runs(sweep: SweepConfig) -> None:
    """Every run the sweep would train, validated (ConfigError before anything trains)."""
    expand_sweep(sweep)


def start_run_config(cfg: PlanConfig, start: dict[str, Any]) -> RunConfig:
    raw = copy.deepcopy(start)
    raw["run_dir"] = str(Path(cfg.out_dir) / START)
    return build_config(RunConfig, raw, source="plan start.run")


def train_start(run_cfg: RunConfig, progress: bool) -> Path:
    """The start run, trained (or resumed) unless finished; its final model."""
    from cptrain.train import train

    run = RunDir(Path(run_cfg.run_dir))
    if not run.finished():
        print(f"[plan] training the start model in {run.path}")
        train(run_cfg, resume=bool(run.checkpoints()), progress=progress)
    else:
        print(f"[plan] start model already trained in {run.path}")
    final = RunDir.open(run.path).final_model()
    if final is None:
        raise ConfigError(f"{run.path}: the start run left no final model; delete it and rerun")
    return final


def run_pilots(sweep: SweepConfig, progress: bool) -> list[Path]:
    return run_sweep(sweep, progress=progress)


def lr_sequence(cfg: RunConfig) -> list[float]:
    """The peak-scaled lr of every optimizer step of a run, from its config (the trainer's own
    schedule, so the areas are those the run trained with)."""
    sched = Schedule.for_run(cfg.train, cfg.train.lr, cfg.task_steps)
    return [sched.lr(i) for i in range(sum(cfg.task_steps))]


def setting_lrs(base: dict[str, Any], setting: Setting, tokens: int) -> list[float]:
    """The lr sequence a setting trains with at a given budget (the candidates' areas)."""
    raw = copy.deepcopy(base)
    raw["data"]["tokens_per_task"] = tokens
    raw.setdefault("train", {}).update(setting.settings()["train"])
    raw["run_dir"] = "unused"
    if setting.alpha > 0:
        raw["method"], raw.setdefault("replay", {})["alpha"] = "replay", setting.alpha
    else:
        raw["method"], raw.setdefault("replay", {})["alpha"] = "sequential", 0.0
    return lr_sequence(build_config(RunConfig, raw, source=f"plan candidate {setting.name}"))


@dataclass(frozen=True)
class PilotRun:
    name: str
    setting: Setting
    seed: int
    curves: dict[str, Curve]  # task → its curve
    before: dict[str, float]
    summary: dict[str, Any]


def read_pilot(run_dir: Path, setting: Setting, seed: int, old: list[str], new: str
               ) -> PilotRun:
    """One finished run's loss curves (the before row, periodic evaluations, the task end);
    ``new``: the task trained (its share of each batch is 1 − α; an old one's, α)."""
    run = RunDir.open(run_dir)
    cfg = build_config(RunConfig, run.config(), source=str(run_dir))
    lrs = lr_sequence(cfg)
    by_step: dict[int, dict[str, float]] = {}
    for rec in run.records():
        if rec.get("type") in CURVE_KINDS and isinstance(rec.get("val_loss"), dict):
            by_step[int(rec["step"])] = rec["val_loss"]
    steps = sorted(by_step)
    if not steps or steps[0] != 0:
        raise ConfigError(f"{run_dir}: no evaluation before training; delete the run and rerun "
                          "the plan")
    s1, s2 = schedule_areas(lrs, steps)
    curves = {
        t: Curve(run_dir.name, setting.alpha, np.array(steps), s1, s2,
                 np.array([by_step[s][t] for s in steps]),
                 share=1 - setting.alpha if t == new else setting.alpha)
        for t in [*old, new]
    }
    return PilotRun(run_dir.name, setting, seed, curves, dict(by_step[0]), run.summary())


def sweep_settings(sweep: SweepConfig, settings: list[Setting]) -> list[tuple[Path, Setting,
                                                                               int]]:
    """(run dir, setting, seed) of every run of a plan's sweep."""
    by_name = {s.name: s for s in settings}
    out = []
    for r in expand_sweep(sweep):
        s = by_name[r.coords["label"]]
        out.append((r.run_dir, s, int(r.coords["seed"])))
    return out


def tasks_of(cfg: PlanConfig, base: dict[str, Any]) -> tuple[list[str], str]:
    return old_tasks(cfg, base), new_task(base)
