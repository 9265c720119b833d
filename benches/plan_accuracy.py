"""How well `cptrain plan` predicts: the plan's pilots and fit, then held-out settings the
pilots never ran, each trained at the full budget with several seeds, predicted against
measured; the recommendation verified with the same seeds; the plan's FLOPs against a
full-budget sweep over its candidate grid.

    .venv/bin/python benches/plan_accuracy.py [--plan recipes/plan-demo.yaml] [--seeds 0 1 2]
        [--set KEY=VALUE ...]    # plan overrides

fr → de on the demo corpus: ``--set out_dir=runs/plan-demo-fr-de --set 'start.run.data.tasks=[fr]'
--set 'base.data.tasks=[de]' --set 'base.data.eval_only=[fr]'
--set 'replay_seed=[{source: task, task: fr, tokens: 300000}]'``; the released model:
``--plan recipes/plan-released.yaml --seeds 0``.

Prints, per held-out setting and task: predicted (95 % interval), measured (mean over seeds),
the absolute error and whether the measured mean lies inside the interval; for the old tasks'
rise too. Writes ``OUT_DIR/plan_accuracy.json``. Resumable: finished runs are skipped. The
held-out settings sit off the pilots' α and lr values, inside their ranges.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.fsutil import atomic_write_json
from cptrain.plan.command import fit_plan, prepare_plan, verify
from cptrain.plan.output import band
from cptrain.plan.pilots import (
    Setting,
    pilot_settings,
    pilot_sweep,
    plan_sweep,
    read_pilot,
    realizable,
    run_pilots,
    start_run_config,
    sweep_settings,
    tasks_of,
    train_start,
)
from cptrain.plan.predict import predict


def held_out(cfg: Any, base: dict[str, Any]) -> list[Setting]:
    """Four settings at fractions of the ranges the pilots' design never uses (its α are the
    ends and the middle; its lr the ends and the geometric middle), α as whole replayed rows."""
    (a_lo, a_hi), (l_lo, l_hi) = cfg.vary.alpha, cfg.vary.lr
    sched, warm = cfg.vary.schedules[0], pilot_settings(cfg, base)[0].warmup

    def at(fa: float, fl: float) -> Setting:
        lr = math.exp(math.log(l_lo) + fl * (math.log(l_hi) - math.log(l_lo)))
        (alpha,) = realizable([a_lo + fa * (a_hi - a_lo)], base) or [0.0]
        return Setting(alpha, float(f"{lr:.3g}"), sched, warm)

    return [at(0.2, 0.3), at(0.7, 0.15), at(0.4, 0.8), at(0.9, 0.6)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default="recipes/plan-demo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    overrides = [*args.overrides, f"verify_seeds={json.dumps(args.seeds)}"]
    cfg, base, start = prepare_plan(Path(args.plan), overrides)
    start_model = None
    if start is not None:
        start_model = train_start(start_run_config(cfg, start), progress=False)
    run_pilots(pilot_sweep(cfg, base, start_model), progress=False)
    preds, rec, fitted = fit_plan(cfg, base, start_model)
    old, new = tasks_of(cfg, base)
    laws, before = fitted["laws"], fitted["before"]
    settings = held_out(cfg, base)
    sweep = plan_sweep(cfg, base, settings, tokens=cfg.budget.tokens, seeds=args.seeds,
                   sub="heldout", start_model=start_model)
    run_pilots(sweep, progress=False)
    runs = [read_pilot(d, s, seed, old, new) for d, s, seed in sweep_settings(sweep, settings)]
    rows, errors, inside = [], [], []
    print(f"\nheld-out settings at the full budget ({cfg.budget.tokens:,} tokens), "
          f"{len(args.seeds)} seeds each; predicted [95 % interval] vs measured mean")
    for s, p in zip(settings, predict(cfg, base, laws, old, new, before, settings),
                    strict=True):
        mine = [r for r in runs if r.setting == s]
        for t in [*old, new]:
            measured = float(np.mean([r.curves[t].loss[-1] for r in mine]))
            for what, pred, value in (("loss", p.old[t] if t in old else p.new, measured),
                                      ("rise", p.rise.get(t), measured - before[t])):
                if pred is None:
                    continue
                err = abs(value - pred.mean)
                hit = bool(pred.lo <= value <= pred.hi) if math.isfinite(pred.lo) else None
                errors.append((what, err))
                inside.append(hit)
                rows.append({"setting": s.as_dict(), "task": t, "what": what,
                             "predicted": pred.as_list(), "measured": value, "abs_error": err,
                             "inside": hit, "seeds": len(mine)})
                shown = f"{value:+.3f}" if what == "rise" else f"{value:.3f}"
                print(f"  α {s.alpha:<5g} lr {s.lr:<8.3g} {t:>8} {what}: predicted "
                      f"{band(pred, what == 'rise')}, measured {shown}"
                      f" | error {err:.3f} | {'inside' if hit else 'outside'}")
    final = [e for w, e in errors if w == "loss"]
    print(f"mean absolute error on final losses: {np.mean(final):.4f} nats over {len(final)} "
          f"(goal ≤ 0.05); measured inside the interval: {sum(map(bool, inside))}/{len(inside)}")
    ver = None
    if rec.best is not None:
        ver = verify(cfg, base, start_model, rec.best.setting, rec.best, progress=False)
    ratio = json.loads((Path(cfg.out_dir) / "plan.json").read_text(encoding="utf-8"))["cost"]
    print(f"plan (pilots + fit) FLOPs ÷ a full-budget sweep over the {ratio['candidates']} "
          f"candidates: {ratio['ratio']:.3f} (goal ≤ 0.25)")
    atomic_write_json(Path(cfg.out_dir) / "plan_accuracy.json", {
        "plan": args.plan, "overrides": args.overrides, "seeds": args.seeds, "rows": rows,
        "mae_final_loss": float(np.mean(final)),
        "inside": [sum(map(bool, inside)), len(inside)], "verify": ver, "cost": ratio})
    sys.stdout.flush()


if __name__ == "__main__":
    main()
