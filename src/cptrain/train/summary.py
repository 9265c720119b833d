"""``summary.json``: what a run measured, and the facts reports need to read it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cptrain.evaluation import metrics
from cptrain.hardware.probe import resolved_config
from cptrain.models.flops import run_flops, shape_from_hf_config, summary_facts

if TYPE_CHECKING:
    from cptrain.train.trainer import Trainer


def run_summary(trainer: Trainer) -> dict[str, Any]:
    state, plan = trainer.state, trainer.plan
    lm = state.loss_matrix
    out: dict[str, Any] = {
        "config": resolved_config(trainer.cfg, trainer.precision),  # what auto resolved to
        "tasks": trainer.task_names,
        "eval_only": trainer.data.eval_only,
        "loss_matrix": lm,  # columns: tasks, then eval_only
        "loss_before": (
            dict(zip(trainer.data.columns, state.loss_before, strict=True))
            if state.loss_before
            else {}
        ),
        "steps": state.step,
        "task_steps": list(plan.task_steps),
        "fresh_tokens": state.fresh_tokens,
        "replay_tokens": state.replay_tokens,
        "teacher_tokens": state.teacher_tokens,  # the KL anchor's start model (FLOPs)
        "params": trainer.n_params,
        **summary_facts(
            shape_from_hf_config(trainer.model.config.to_dict()),
            plan.n_fresh,
            plan.n_replay,
            trainer.reptile.updates if trainer.reptile is not None else 0,
        ),
        "wall_s": state.wall_s,
        "precision": trainer.precision,  # what train.precision (maybe auto) resolved to
        "precision_evidence": trainer.precision_evidence,  # and why (cptrain.hardware.probe)
        "complete": trainer.finished,
        "threads": torch.get_num_threads(),  # train.threads, or the free CPUs at start
        "warnings": trainer.warnings,  # what the run start printed (BatchPlan.warnings)
    }
    if lm:
        # forgetting: every evaluation after a task was trained (periodic ones too);
        # forgetting_task_end: the loss-matrix rows alone; forgetting_paper_code(_in_loop):
        # the official code's (opposite sign, all tasks averaged: see cptrain.evaluation.metrics).
        out.update(metrics.summarize(lm, state.periodic_evaluations()))
        final = dict(zip(trainer.task_names, lm[-1], strict=False))
        out["union_loss"] = trainer.data.union_loss(final, trainer.cfg.eval.windows)
        if state.loss_before and trainer.data.eval_only:
            out["eval_only_forgetting"] = metrics.forgetting_since_start(
                lm, state.loss_before, trainer.task_names, trainer.data.eval_only
            )
    if trainer.buffer is not None:
        out["replay"] = trainer.buffer.stats()
    out["flops"] = run_flops(out)
    # train_s, eval_s, checkpoint_s, export_s, tokens_per_s, mfu, peak_flops, peak_dtype
    out.update(trainer.clock.summary(trainer.env.world_size))
    out.update(trainer.diagnostics.summary())
    return out
