"""The plan file of `cptrain plan` (torch-free): what to continue, the full budget, the
forgetting budget, what may vary, and the pilots' share of the budget.

    out_dir: runs/plan-demo
    start: {run: recipes/plan-demo-start.yaml}   # optional: trained first; its final model
                                                 # is the base's model.init_from
    base: recipes/plan-demo-base.yaml            # the continued training: one new task in
                                                 # data.tasks, old domains in data.eval_only
    budget: {tokens: 1200000}                    # of the new task, at full length
    forgetting: {max_rise: 0.05, over: mean}     # nats above before, or '2%' of it
    vary: {alpha: [0, 0.5], lr: [5e-4, 4e-3], schedules: [cosine]}
    pilots: {fraction: 0.2}
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cptrain.config_base import StrictModel, apply_overrides, build_config, read_yaml
from cptrain.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
_RISE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(nats?|%)?\s*$")


class StartSpec(StrictModel):
    """A run trained before the plan (a model trained from scratch on the old task): its final
    model becomes the base's ``model.init_from``."""

    run: dict[str, Any] | str = Field(description="run config: inline mapping or a YAML path")


class BudgetSpec(StrictModel):
    tokens: int = Field(gt=0, description="tokens of the new task in one full-budget run")


class ForgettingSpec(StrictModel):
    max_rise: float | str = Field(
        description="how far an old task's loss may rise above its loss before training: "
        "nats (0.05, '0.05 nats') or a percent of the loss before ('2%')"
    )
    tasks: list[str] | None = Field(default=None, description="default: base data.eval_only")
    over: Literal["mean", "each"] = "mean"

    @field_validator("max_rise")
    @classmethod
    def _unit(cls, v: float | str) -> float | str:
        if isinstance(v, float | int):
            if v < 0:
                raise ValueError(f"must be >= 0 (got {v}); a rise of 0 allows no forgetting")
            return float(v)
        m = _RISE.match(v)
        if not m:
            raise ValueError(f"{v!r} is not a rise; write nats (0.05 or '0.05 nats') or a "
                             "percent of the loss before ('2%')")
        return v

    @property
    def relative(self) -> bool:
        return isinstance(self.max_rise, str) and self.max_rise.strip().endswith("%")

    @property
    def limit(self) -> float:
        """The rise allowed: nats, or a fraction of the loss before (``relative``)."""
        if isinstance(self.max_rise, float):
            return self.max_rise
        m = _RISE.match(self.max_rise)
        assert m is not None
        value = float(m.group(1))
        return value / 100 if self.relative else value

    def rise(self, loss: float, before: float) -> float:
        """How far a loss rose above its loss before training, in the budget's unit."""
        return (loss - before) / (before if self.relative else 1.0)

    def budget_rise(self, final: dict[str, float], before: dict[str, float]) -> float:
        """What the budget reads of the old tasks' final losses: their mean or largest rise."""
        rises = [self.rise(final[t], before[t]) for t in final]
        return sum(rises) / len(rises) if self.over == "mean" else max(rises)

    def describe(self) -> str:
        what = (f"{self.limit:.1%} of its loss before" if self.relative
                else f"{self.limit:g} nats")
        return f"the {self.over} old-task rise at most {what}"


class VarySpec(StrictModel):
    alpha: list[float] = Field(description="[min, max] replay ratio")
    lr: list[float] = Field(description="[min, max] peak learning rate")
    schedules: list[str] = Field(default=["cosine"], description="cosine | wsd | constant")
    warmup: list[float] | None = Field(
        default=None, description="warm-up fractions to choose from (0: no re-warm); default: "
        "the base's"
    )

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or v[0] > v[1]:
            raise ValueError(f"must be a range [min, max] with min <= max (got {v}); e.g. "
                             "[0, 0.5]")
        if v[0] < 0 or v[1] >= 1:
            raise ValueError(f"replay ratios must lie in [0, 1) (got {v})")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or v[0] > v[1] or v[0] <= 0:
            raise ValueError(f"must be a range [min, max] of learning rates > 0 (got {v}); "
                             "e.g. [5e-4, 4e-3]")
        return v

    @field_validator("schedules")
    @classmethod
    def _schedules(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SCHEDULES]
        if not v or bad:
            raise ValueError(f"choose from {', '.join(SCHEDULES)} (got {v})")
        return v


class PilotSpec(StrictModel):
    fraction: float = Field(default=0.2, gt=0, description="of the full budget, per pilot")
    points: int = Field(default=12, ge=4, description="evaluations per pilot (whole curves)")
    fit_from: float = Field(default=0.2, ge=0, lt=1, description="fit each pilot's curve from "
                            "this fraction of its steps on (skips the first steps' transient)")
    seeds: list[int] = Field(default=[0], min_length=1)
    alphas: list[float] | None = Field(default=None, description="default: min, middle, max")
    lrs: list[float] | None = Field(default=None, description="default: min, geometric "
                                    "middle, max")

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if v >= 1:
            raise ValueError(f"must be < 1 (got {v}): pilots are a fraction of the full "
                             "budget; e.g. 0.2")
        return v


class PlanConfig(StrictModel):
    out_dir: str
    start: StartSpec | None = None
    base: dict[str, Any] | str = Field(description="run config: inline mapping or a YAML path")
    budget: BudgetSpec
    forgetting: ForgettingSpec
    vary: VarySpec
    pilots: PilotSpec = Field(default_factory=PilotSpec)
    replay_seed: list[dict[str, Any]] | None = Field(
        default=None, description="replay.seed of the settings that replay (α > 0): the old "
        "data, a proxy of it, or the model's own text")
    candidates: int = Field(default=7, ge=2, description="grid points per varied axis")
    bootstrap: int = Field(default=100, ge=0, description="refits for the 95 % intervals")
    verify_seeds: list[int] = Field(default=[0], min_length=1)

    @model_validator(mode="after")
    def _pilots_in_range(self) -> PlanConfig:
        lo, hi = self.vary.alpha
        for a in self.pilots.alphas or []:
            if not lo <= a <= hi:
                raise ValueError(f"pilots.alphas: {a} lies outside vary.alpha {self.vary.alpha}")
        lo, hi = self.vary.lr
        for x in self.pilots.lrs or []:
            if not lo <= x <= hi:
                raise ValueError(f"pilots.lrs: {x:g} lies outside vary.lr {self.vary.lr}")
        return self


def _yaml_or_inline(value: dict[str, Any] | str, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{where}: {value} is not a file; give a run config YAML path "
                              "or an inline mapping")
        return read_yaml(path)
    return copy.deepcopy(value)


def load_plan(path: Path, overrides: list[str] | None = None) -> PlanConfig:
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return build_config(PlanConfig, data, source=str(path))


def base_dict(cfg: PlanConfig) -> dict[str, Any]:
    """The base run config as a mapping, checked for what the plan needs of it."""
    base = _yaml_or_inline(cfg.base, "base")
    data = base.get("data")
    if not isinstance(data, dict) or not data.get("tasks"):
        raise ConfigError("base: needs data.tasks (the new task) and data.eval_only (the old "
                          "domains)")
    tasks = [t if isinstance(t, str) else t.get("name") for t in data["tasks"]]
    if len(tasks) != 1:
        raise ConfigError(f"base data.tasks: the plan predicts one continued-training step; "
                          f"give one new task (got {', '.join(map(str, tasks))}); plan the "
                          "next task from this one's result")
    old = list(data.get("eval_only") or [])
    if not old:
        raise ConfigError("base data.eval_only: name the old domains to keep (evaluated, never "
                          "trained), e.g. eval_only: [en]")
    for name in cfg.forgetting.tasks or []:
        if name not in old:
            raise ConfigError(f"forgetting.tasks: unknown task {name!r}; the budget applies to "
                              f"the base's data.eval_only ({', '.join(old)})")
    if cfg.start is None and not base.get("model", {}).get("init_from"):
        raise ConfigError("base model.init_from: the plan continues a trained model; set it, "
                          "or add start: {run: ...} to train one first")
    return base


def start_dict(cfg: PlanConfig) -> dict[str, Any] | None:
    return None if cfg.start is None else _yaml_or_inline(cfg.start.run, "start.run")


def old_tasks(cfg: PlanConfig, base: dict[str, Any]) -> list[str]:
    return list(cfg.forgetting.tasks or base["data"]["eval_only"])


def new_task(base: dict[str, Any]) -> str:
    (t,) = base["data"]["tasks"]
    return t if isinstance(t, str) else str(t.get("name"))
