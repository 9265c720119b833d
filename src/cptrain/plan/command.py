"""`cptrain plan PLAN.yaml [--verify]`: check everything, train the start model (if the plan
has one) and the pilots (resumable), fit, predict, recommend, write; ``--verify`` then trains
the recommended setting at the full budget and compares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cptrain.data.prepare import load_prepared
from cptrain.errors import ConfigError, DataError
from cptrain.fsutil import atomic_write_json
from cptrain.plan.config import PlanConfig, base_dict, load_plan, start_dict
from cptrain.plan.output import band, recommendation_lines, write_plan
from cptrain.plan.pilots import (
    PilotRun,
    Setting,
    candidate_settings,
    check_runs,
    full_steps,
    pilot_settings,
    pilot_sweep,
    read_pilot,
    run_pilots,
    setting_lrs,
    start_run_config,
    sweep_settings,
    tasks_of,
    train_start,
    verify_sweep,
)
from cptrain.plan.predict import (
    Prediction,
    before_losses,
    fit_tasks,
    predict,
    recommend,
)
from cptrain.rundir import layout


def _check_prepared(base: dict[str, Any], tasks: list[str], seed: list[dict[str, Any]] | None
                    ) -> None:
    """Every task the plan names is prepared (when prepare.json is there to say so)."""
    data_dir = Path(base["data"].get("dir", ""))
    try:
        prepared = load_prepared(data_dir)["tasks"]
    except (DataError, KeyError):
        return  # not prepared yet: the first run's own check names what is missing
    wanted = [*tasks, *(s["task"] for s in seed or [] if s.get("task"))]
    for t in wanted:
        if t not in prepared:
            raise ConfigError(f"unknown task {t!r}: {data_dir} has {', '.join(prepared)}; "
                              "prepare it (`cptrain prepare`) or name a prepared task")


def _start_model(cfg: PlanConfig, start: dict[str, Any] | None, progress: bool
                 ) -> Path | None:
    if start is None:
        return None
    return train_start(start_run_config(cfg, start), progress)


def _planned_start(cfg: PlanConfig, start: dict[str, Any] | None) -> Path | None:
    """Where the start run's final model will be (for checking the pilots before it exists)."""
    if start is None:
        return None
    run_cfg = start_run_config(cfg, start)
    last = run_cfg.data.tasks[-1].name
    return Path(run_cfg.run_dir) / layout.MODELS / layout.task_model_name(
        len(run_cfg.data.tasks) - 1, last)


def _cost(cfg: PlanConfig, base: dict[str, Any], pilots: list[PilotRun],
          n_candidates: int) -> dict[str, Any]:
    """Training and evaluation FLOPs of the pilots against a full-budget sweep over the
    candidates (each evaluated before and at its end); the start run is shared by both."""
    s = pilots[0].summary
    per_token = float(s["flops"]["flops_per_token"])
    tokens_per_step = int(base["train"]["batch_size"]) * int(base["train"]["seq_len"])
    ev = base.get("eval", {})
    eval_tokens = int(ev.get("windows", 64)) * int(base["train"]["seq_len"]) * (
        1 + len(base["data"].get("eval_only") or []))
    pilot = sum(float(p.summary["flops"]["total_flops"]) + per_token / 3 * eval_tokens
                * len(p.curves[next(iter(p.curves))].steps) for p in pilots)
    full = n_candidates * (per_token * tokens_per_step * full_steps(cfg, base)
                           + per_token / 3 * eval_tokens * 2)
    return {"pilot_flops": pilot, "sweep_flops": full, "ratio": pilot / full,
            "candidates": n_candidates}


def prepare_plan(path: Path, overrides: list[str] | None = None
                 ) -> tuple[PlanConfig, dict[str, Any], dict[str, Any] | None]:
    """The plan file, checked with everything it would train (ConfigError before any run)."""
    cfg = load_plan(path, overrides)
    base = base_dict(cfg)
    start = start_dict(cfg)
    old, new = tasks_of(cfg, base)
    _check_prepared(base, [new, *old], cfg.replay_seed)
    if start is not None:
        start_run_config(cfg, start)
    check_runs(pilot_sweep(cfg, base, _planned_start(cfg, start)))
    for s in candidate_settings(cfg, base)[:1]:  # the candidates' configs build too
        setting_lrs(base, s, cfg.budget.tokens)
    return cfg, base, start


def fit_plan(cfg: PlanConfig, base: dict[str, Any], start_model: Path | None,
             ) -> tuple[list[Prediction], Any, dict[str, Any]]:
    old, new = tasks_of(cfg, base)
    sweep = pilot_sweep(cfg, base, start_model)
    pilots = [read_pilot(d, s, seed, old, new)
              for d, s, seed in sweep_settings(sweep, pilot_settings(cfg, base))]
    laws = fit_tasks(pilots, [*old, new], cfg.bootstrap, cfg.pilots.fit_from)
    before = before_losses(pilots, [*old, new])
    cands = candidate_settings(cfg, base)
    preds = predict(cfg, base, laws, old, new, before, cands)
    rec = recommend(cfg, preds)
    cost = _cost(cfg, base, pilots, len(cands))
    path = write_plan(Path(cfg.out_dir), cfg, laws, preds, rec, pilots, old, new, before, cost)
    for line in recommendation_lines(rec, cfg, old, new):
        print(line)
    for t, law in laws.items():
        loo = ", ".join(f"{f} {v.mean_abs:.4f}" for f, v in law.loo.items())
        print(f"  {t}: {law.fit.form} law, RMSE {law.fit.rmse:.4f}; leave-one-pilot-out mean "
              f"abs error: {loo}")
    print(f"pilots cost {cost['ratio']:.3f} of a full-budget sweep over the {len(cands)} "
          f"candidates (FLOPs)")
    print(f"plan: {path} (and plan.html, plan.json, figures/)")
    return preds, rec, {"laws": laws, "before": before, "pilots": pilots}


def verify(cfg: PlanConfig, base: dict[str, Any], start_model: Path | None,
           setting: Setting, pred: Prediction, progress: bool) -> dict[str, Any]:
    """Train ``setting`` at the full budget (verify_seeds) and compare with its prediction."""
    old, new = tasks_of(cfg, base)
    sweep = verify_sweep(cfg, base, setting, start_model)
    run_pilots(sweep, progress)
    runs = [read_pilot(d, s, seed, old, new)
            for d, s, seed in sweep_settings(sweep, [setting])]
    before = before_losses(runs, [*old, new])
    measured = {t: float(np.mean([r.curves[t].loss[-1] for r in runs])) for t in [*old, new]}
    rows = {}
    print(f"verify: {setting.name} at the full budget, {len(runs)} seed(s)")
    for t in [*old, new]:
        p = pred.old[t] if t in old else pred.new
        inside = p.lo <= measured[t] <= p.hi if np.isfinite(p.lo) else None
        rows[t] = {"predicted": p.as_list(), "measured": measured[t],
                   "abs_error": abs(measured[t] - p.mean), "inside": inside}
        where = "" if inside is None else ", inside the interval" if inside else ", outside it"
        print(f"  {t}: predicted {band(p)}, measured {measured[t]:.3f} (error "
              f"{measured[t] - p.mean:+.3f}{where})")
    rise = cfg.forgetting.budget_rise({t: measured[t] for t in old}, before)
    held = rise <= cfg.forgetting.limit
    print(f"  forgetting budget ({cfg.forgetting.describe()}): measured {rise:+.4f}, "
          f"predicted {band(pred.budget_rise, True)}: {'held' if held else 'NOT held'}")
    out = {"setting": setting.as_dict(), "seeds": cfg.verify_seeds, "tasks": rows,
           "rise": rise, "predicted_rise": pred.budget_rise.as_list(), "held": held}
    atomic_write_json(Path(cfg.out_dir) / "verify.json", out)
    return out


def run_plan(path: Path, *, overrides: list[str] | None = None, do_verify: bool = False,
             progress: bool = True) -> dict[str, Any]:
    cfg, base, start = prepare_plan(path, overrides)
    n = len(pilot_settings(cfg, base)) * len(cfg.pilots.seeds)
    print(f"plan {path}: {n} pilots at {cfg.pilots.fraction:g} of {cfg.budget.tokens:,} tokens "
          f"in {Path(cfg.out_dir) / 'pilots'}")
    start_model = _start_model(cfg, start, progress)
    run_pilots(pilot_sweep(cfg, base, start_model), progress)
    preds, rec, _ = fit_plan(cfg, base, start_model)
    result: dict[str, Any] = {"recommended": rec.best, "cheapest": rec.cheapest}
    if do_verify:
        if rec.best is None:
            raise ConfigError("--verify: no setting meets the forgetting budget, so there is "
                              "nothing to verify; see plan.md for the closest one")
        result["verify"] = verify(cfg, base, start_model, rec.best.setting, rec.best, progress)
    return result

