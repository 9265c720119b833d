"""``cptrain merge RUN``: interpolate a run's final weights with its starting model.

θ_λ = θ_start + λ(θ_final − θ_start) (``torch.lerp``, exact at λ = 0 and λ = 1) is evaluated on
every task and evaluation-only task of the run, with the run's own evaluation settings. The
table and a plot of old-domain loss against new-domain loss (the trade-off curve) go to
``RUN/merge/``. Old domain: the evaluation-only tasks when the run has any, else the first task;
new domain: the trained tasks (without evaluation-only ones, the tasks after the first). Sibling
runs (other run directories next to RUN on the same tasks) are drawn as points on the same axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptrain import fsutil
from cptrain.config import RunConfig, load_run_config, result_settings
from cptrain.errors import CheckpointError, ConfigError
from cptrain.rundir import layout
from cptrain.rundir.run_dir import RunDir, require_finished

DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lambdas {text!r}: give numbers like 0,0.25,0.5,0.75,1") from None
    if not values or any(not np.isfinite(v) for v in values):
        raise ConfigError(f"--lambdas {text!r}: give finite numbers like 0,0.25,0.5,0.75,1")
    return values


def _trained_precision(run: Path, cfg: RunConfig) -> str:
    """The precision the run trained in: what `auto` resolved to is in the run's summary."""
    try:
        return str(RunDir(run).summary()["precision"])
    except (ConfigError, KeyError):
        return cfg.train.precision


def _final_model_dir(run: Path, cfg: RunConfig) -> Path:
    last = len(cfg.data.tasks) - 1
    out = RunDir(run).task_model_dir(last, cfg.data.tasks[last].name)
    if not (out / "config.json").is_file():
        raise ConfigError(f"{run}: no {out.name} model (the run is not finished); finish it first")
    return out


def domains(summary: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(old-domain columns, new-domain columns) of a run's loss matrix (module docstring)."""
    tasks, eval_only = list(summary["tasks"]), list(summary.get("eval_only") or [])
    if eval_only:
        return eval_only, tasks
    return tasks[:1], tasks[1:] or tasks[:1]


def merge_losses(
    run: Path, lambdas: list[float], summary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every task's loss at θ_start + λ(θ_final − θ_start) for each λ; ``summary`` is the run's
    summary (read here when not given)."""
    from cptrain.evaluation.losses import evaluate_tasks
    from cptrain.models.build import load_pretrained, model_for_run
    from cptrain.train.data import TrainingData

    cfg = load_run_config(run / layout.CONFIG)
    if summary is None:
        summary = RunDir(run).summary()
    data = TrainingData(cfg)
    start = model_for_run(
        cfg.model.preset,
        cfg.model.init_from,
        data.vocab_size,
        seed=cfg.seed,
        seq_len=cfg.train.seq_len,
    )
    final = load_pretrained(_final_model_dir(run, cfg))
    # state_dict() shares storage with the model: without the clone, each load below would
    # overwrite the start weights, and every later λ would interpolate from the previous merge.
    a = {k: v.detach().clone() for k, v in start.state_dict().items()}
    b = final.state_dict()
    autocast = torch.bfloat16 if _trained_precision(run, cfg) == "bf16" else None
    rows = []
    for lam in sorted({0.0, *lambdas}):  # λ = 0 first: it checks the start weights
        with torch.no_grad():
            start.load_state_dict({k: torch.lerp(a[k], b[k], lam) for k in a}, strict=True)
        losses = evaluate_tasks(
            start,
            data.val_sets,
            window_len=data.window_len,
            windows=cfg.eval.windows,
            batch_size=cfg.eval.batch_size,
            autocast=autocast,
        )
        if lam == 0.0:
            _check_start(run, cfg, losses, summary.get("loss_before"))
        if lam in lambdas:
            rows.append({"lambda": lam, "val_loss": losses})
    rows.sort(key=lambda r: lambdas.index(r["lambda"]))
    return {"run": str(run), "columns": data.columns, "rows": rows}


def _check_start(run: Path, cfg: RunConfig, losses: dict[str, float], before: Any) -> None:
    """The weights rebuilt as the start must be those the run started from: their losses are
    the run's ``loss_before`` (else every merge would interpolate from other weights)."""
    if not isinstance(before, dict):
        return  # a summary older than loss_before: nothing to compare with
    off = {k: losses[k] - v for k, v in before.items() if k in losses}
    worst = max(off, key=lambda k: abs(off[k]), default=None)
    if worst is not None and abs(off[worst]) > 1e-3:
        start = cfg.model.init_from or f"preset {cfg.model.preset}, seed {cfg.seed}"
        raise CheckpointError(
            f"the start weights ({start}) are not those {run} started from: {worst} loss "
            f"{losses[worst]:.4f} at λ = 0, {before[worst]:.4f} before training; restore the "
            "model the run started from"
        )


# What may differ between a run and the siblings plotted beside its merges: the method.
_METHOD_KEYS = ("method", "replay.", "reptile.")


def _start_and_budget(config: dict[str, Any]) -> dict[str, Any]:
    """A run's result-changing settings but its method's: the same start model, data, budget
    and training settings make other methods comparable points on the merge plot."""
    return {k: v for k, v in result_settings(config).items() if not k.startswith(_METHOD_KEYS)}


def _siblings(
    run: Path, columns: list[str], config: dict[str, Any]
) -> list[tuple[str, dict[str, float]]]:
    """Finished runs beside ``run`` (whose resolved config is ``config``) that differ from it
    in the method alone."""
    mine = _start_and_budget(config)
    out = []
    for other in sorted(run.parent.glob(f"*/{layout.SUMMARY}")):
        if other.parent.resolve() == run.resolve():
            continue
        try:
            s = RunDir(other.parent).summary()
        except ConfigError:
            continue  # a damaged neighbour is no sibling
        cols = [*s.get("tasks", []), *(s.get("eval_only") or [])]
        if (cols == columns and s.get("complete") and s.get("loss_matrix")
                and _start_and_budget(s.get("config") or {}) == mine):
            out.append((other.parent.name, dict(zip(cols, s["loss_matrix"][-1], strict=True))))
    return out


def write_merge(run: Path, lambdas: list[float]) -> Path:
    """Evaluate the merges, write merge.json, merge.md and merge.png under RUN/merge/."""
    run = Path(run)
    require_finished(run)
    summary = RunDir(run).summary()
    result = merge_losses(run, lambdas, summary)
    old, new = domains(summary)
    for row in result["rows"]:
        row["old_loss"] = float(np.mean([row["val_loss"][c] for c in old]))
        row["new_loss"] = float(np.mean([row["val_loss"][c] for c in new]))
    result.update(old_domain=old, new_domain=new,
                  from_scratch=not (summary.get("config") or {}).get("model", {}).get("init_from"))
    siblings = _siblings(run, result["columns"], summary["config"])
    result["siblings"] = [
        {"run": name, "old_loss": float(np.mean([f[c] for c in old])),
         "new_loss": float(np.mean([f[c] for c in new]))}
        for name, f in siblings
    ]
    out = run / layout.MERGE
    out.mkdir(exist_ok=True)
    fsutil.atomic_write_json(out / "merge.json", result)
    fsutil.atomic_write_text(out / "merge.md", merge_table(result))
    _plot(result, out / "merge.png")
    return out


def merge_table(result: dict[str, Any]) -> str:
    cols = result["columns"]
    head = "| λ | " + " | ".join(cols) + " | old domain | new domain |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in result["rows"]:
        cells = [f"{r['val_loss'][c]:.3f}" for c in cols]
        lines.append(
            f"| {r['lambda']:g} | " + " | ".join(cells)
            + f" | {r['old_loss']:.3f} | {r['new_loss']:.3f} |"
        )
    for s in result.get("siblings", []):
        lines.append(f"| {s['run']} (final) | " + " | ".join("" for _ in cols)
                     + f" | {s['old_loss']:.3f} | {s['new_loss']:.3f} |")
    old, new = ", ".join(result["old_domain"]), ", ".join(result["new_domain"])
    lines.append("")
    lines.append(f"λ = 0: the starting model; λ = 1: the run's final model. Old domain: {old}; "
                 f"new domain: {new} (mean validation loss).")
    if result.get("from_scratch"):
        lines.append("")
        lines.append("This run started from random weights (no model.init_from): λ = 0 is an "
                     "untrained model, so this curve says nothing about keeping earlier "
                     "knowledge; merging is meant for a run that continues a pretrained model.")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    xs = [r["new_loss"] for r in result["rows"]]
    ys = [r["old_loss"] for r in result["rows"]]
    ax.plot(xs, ys, "o-", label="merge θ_start + λ(θ_final − θ_start)")
    for r in result["rows"]:
        ax.annotate(f"λ={r['lambda']:g}", (r["new_loss"], r["old_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    for s in result.get("siblings", []):
        ax.plot([s["new_loss"]], [s["old_loss"]], "s", label=s["run"])
    ax.set_xlabel(f"new domain loss ({', '.join(result['new_domain'])})")
    ax.set_ylabel(f"old domain loss ({', '.join(result['old_domain'])})")
    ax.legend(fontsize=7)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    fsutil.replace_file(tmp, path)
