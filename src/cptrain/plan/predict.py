"""From pilot curves to a recommendation: one law per task (the form with the lower
leave-one-pilot-out error), bootstrap intervals, every candidate setting predicted at the full
budget, and the setting with the lowest new-task loss whose old-task rise stays in budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cptrain.models.flops import rows_per_step
from cptrain.plan.config import PlanConfig
from cptrain.plan.law import (
    FORMS,
    Curve,
    LawFit,
    LeaveOneOut,
    bootstrap_fits,
    fit_law,
    leave_one_out,
)
from cptrain.plan.law import schedule_areas as areas
from cptrain.plan.pilots import PilotRun, Setting, full_steps, setting_lrs

# Beyond this multiple of the largest forward area a pilot reached, a prediction extrapolates
# the power law further than the pilots can check: flagged, and not recommended while another
# setting meets the budget inside it.
EXTRAPOLATION_LIMIT = 2.0


@dataclass(frozen=True)
class TaskLaw:
    task: str
    fit: LawFit
    loo: dict[str, LeaveOneOut]  # form → its leave-one-pilot-out errors
    boots: list[LawFit]


def _from(c: Curve, fraction: float) -> Curve:
    """The curve from ``fraction`` of its steps on: the first steps of continued training are a
    transient no form here models (at a high lr the old domain's loss jumps, then partly
    recovers), and what the plan predicts is the loss at the end."""
    keep = c.steps >= fraction * c.steps.max()
    return replace(c, steps=c.steps[keep], s1=c.s1[keep], s2=c.s2[keep], loss=c.loss[keep])


def fit_tasks(pilots: Sequence[PilotRun], tasks: Sequence[str], n_boot: int,
              fit_from: float = 0.0, seed: int = 0) -> dict[str, TaskLaw]:
    """Every form fitted to every task; the one whose leave-one-pilot-out error on the pilots'
    final losses is lowest is used, with ``n_boot`` bootstrap refits for its intervals."""
    out = {}
    for t in tasks:
        curves = [_from(p.curves[t], fit_from) for p in pilots]
        fits = {f: fit_law(curves, f) for f in FORMS}
        loo = {f: leave_one_out(curves, f, full=fits[f]) for f in FORMS}
        chosen = min(FORMS, key=lambda f: (math.isnan(loo[f].final_abs), loo[f].final_abs))
        out[t] = TaskLaw(t, fits[chosen], loo, bootstrap_fits(curves, fits[chosen], n_boot,
                                                              seed))
    return out


@dataclass(frozen=True)
class Band:
    """A prediction and its 95 % bootstrap interval (nan where there were no refits)."""

    mean: float
    lo: float
    hi: float

    def as_list(self) -> list[float]:
        return [self.mean, self.lo, self.hi]


def _band(point: float, draws: Sequence[float]) -> Band:
    d = np.asarray([x for x in draws if math.isfinite(x)])
    if d.size < 5:
        return Band(point, math.nan, math.nan)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return Band(point, float(min(lo, point)), float(max(hi, point)))


@dataclass
class Prediction:
    setting: Setting
    old: dict[str, Band]
    rise: dict[str, Band]  # nats (or a fraction of before, for a relative budget)
    budget_rise: Band  # what the budget reads: the mean or the largest rise over old tasks
    new: Band
    cost: float  # FLOPs per incoming token relative to no replay
    extrapolation: float  # full-budget forward area ÷ the largest a pilot reached
    meets: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.setting.as_dict(),
            "old": {t: b.as_list() for t, b in self.old.items()},
            "rise": {t: b.as_list() for t, b in self.rise.items()},
            "budget_rise": self.budget_rise.as_list(),
            "new": self.new.as_list(),
            "cost": self.cost,
            "extrapolation": self.extrapolation,
            "meets": self.meets,
            "notes": self.notes,
        }


def relative_cost(base: dict[str, Any], alpha: float) -> float:
    """FLOPs per incoming token against no replay: replayed rows cost a step's share."""
    cfg = {**base, "replay": {**base.get("replay", {}), "alpha": alpha}}
    fresh, replay = rows_per_step(cfg)
    return (fresh + replay) / fresh


def before_losses(pilots: Sequence[PilotRun], tasks: Sequence[str]) -> dict[str, float]:
    """Each task's loss before training (the same start model in every pilot: their mean)."""
    return {t: float(np.mean([p.before[t] for p in pilots])) for t in tasks}


def predict(cfg: PlanConfig, base: dict[str, Any], laws: dict[str, TaskLaw], old: list[str],
            new: str, before: dict[str, float], settings: Sequence[Setting]) -> list[Prediction]:
    steps = full_steps(cfg, base)
    budget = cfg.forgetting
    out = []
    for s in settings:
        s1, s2 = areas(setting_lrs(base, s, cfg.budget.tokens), [steps])

        def at(law: LawFit, new_task: bool = False, s1: np.ndarray = s1, s2: np.ndarray = s2,
               a: float = s.alpha) -> float:
            return float(law.predict(s1, s2, a, 1 - a if new_task else a)[0])

        olds = {t: _band(at(laws[t].fit), [at(b) for b in laws[t].boots]) for t in old}
        rises = {t: Band(*(budget.rise(v, before[t]) for v in (b.mean, b.lo, b.hi)))
                 for t, b in olds.items()}
        n_boot = min((len(laws[t].boots) for t in old), default=0)
        boot_rise = [budget.budget_rise({t: at(laws[t].boots[i]) for t in old}, before)
                     for i in range(n_boot)]
        budget_rise = _band(budget.budget_rise({t: olds[t].mean for t in old}, before),
                            boot_rise)
        newb = _band(at(laws[new].fit, True), [at(b, True) for b in laws[new].boots])
        reach = max(laws[t].fit.s1_max for t in (*old, new))
        p = Prediction(s, olds, rises, budget_rise, newb, relative_cost(base, s.alpha),
                       float(s1[0] / reach) if reach > 0 else math.inf)
        p.meets = budget_rise.mean <= cfg.forgetting.limit
        if p.extrapolation > EXTRAPOLATION_LIMIT:
            p.notes.append(f"extrapolates: its forward area is {p.extrapolation:.1f}× the "
                           "largest a pilot reached")
        out.append(p)
    return out


@dataclass
class Recommendation:
    best: Prediction | None
    cheapest: Prediction | None
    warnings: list[str]
    closest: Prediction | None = None  # when no setting meets the budget


def recommend(cfg: PlanConfig, preds: Sequence[Prediction]) -> Recommendation:
    """The lowest predicted new-task loss among settings that meet the budget, preferring those
    the pilots support (no extrapolation note); the cheapest (FLOPs per incoming token, then
    new-task loss) that meets it too."""
    warnings = []
    inside = [p for p in preds if not p.notes]
    meets = [p for p in inside if p.meets]
    if not meets and any(p.meets for p in preds):
        meets = [p for p in preds if p.meets]
        warnings.append("only settings beyond the pilots' reach meet the budget: the "
                        "recommendation extrapolates; verify it (--verify) or add longer pilots")
    if not meets:
        closest = min(preds, key=lambda p: p.budget_rise.mean)
        warnings.append(
            f"no setting meets the budget ({cfg.forgetting.describe()}): the lowest predicted "
            f"rise is {closest.budget_rise.mean:+.4f} ({closest.setting.name}); widen vary, "
            "allow more forgetting, or raise the replay ratio's range")
        return Recommendation(None, None, warnings, closest)
    best = min(meets, key=lambda p: p.new.mean)
    cheapest = min(meets, key=lambda p: (p.cost, p.new.mean))
    if math.isfinite(best.budget_rise.hi) and best.budget_rise.hi > cfg.forgetting.limit:
        warnings.append(f"the recommendation's 95 % interval reaches {best.budget_rise.hi:+.4f}"
                        ", past the budget: it meets it on the prediction, not with confidence")
    return Recommendation(best, cheapest, warnings)
