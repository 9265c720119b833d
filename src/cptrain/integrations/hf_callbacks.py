"""Reptile and the loss matrix as Hugging Face ``Trainer`` callbacks.

``on_optimizer_step`` runs right after ``optimizer.step()`` (before the schedule steps and the
gradients are zeroed): where ``cptrain train``'s Reptile hook runs, so the next step starts
from the interpolated weights. ``TrainerCallback`` state is JSON in ``trainer_state.json``, so
the anchor (tensors) is written in ``on_save`` into ``checkpoint-N/`` and read back when the
``Trainer`` resumes from it; the loss matrix's rows travel the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from cptrain import fsutil
from cptrain.errors import CheckpointError, ConfigError
from cptrain.integrations.hf_data import STATE_VERSION, checkpoint_dir, read_json
from cptrain.integrations.loop import LossMatrix, Reptile


def zero_stage(args: Any) -> int | None:
    """The DeepSpeed ZeRO stage the ``Trainer`` runs, or None without DeepSpeed."""
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is None:
        return None if not getattr(args, "deepspeed", None) else 1
    stage = ds.config.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if isinstance(stage, int | float) else 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ReptileCallback(TrainerCallback):
    """Reptile (the meta-update of MER) on the ``Trainer``'s optimizer: every ``k`` optimizer
    steps θ ← θ₀ + ε(θ − θ₀), θ₀ ← θ, on the weights the optimizer steps.

    The anchor is taken from the model at ``on_train_begin`` (after a resume loaded its
    weights; the checkpoint's anchor then replaces it) and saved per rank in ``checkpoint-N/``
    (``cptrain-reptile-rank<r>.safetensors``). ``task_steps`` (steps per task) gives
    ``reset_at_task_boundary`` its boundaries. DeepSpeed ZeRO keeps the fp32 masters inside its
    optimizer, where a meta-update on the module would be overwritten: refused."""

    def __init__(self, *, k: int = 500, epsilon: float = 0.1, task_steps: Sequence[int] = (),
                 anchor_dtype: str = "float32", anchor_device: str = "same",
                 reset_at_task_boundary: bool = False, reset_optimizer_moments: bool = False):
        self.settings = dict(k=k, epsilon=epsilon, anchor_dtype=anchor_dtype,
                             anchor_device=anchor_device,
                             reset_at_task_boundary=reset_at_task_boundary,
                             reset_optimizer_moments=reset_optimizer_moments)
        self.starts = set(_cumsum(task_steps)[:-1]) - {0} if task_steps else set()
        self.reptile: Reptile | None = None
        self.resume_dir: str | Path | None = None

    @classmethod
    def from_config(cls, cfg: Any, task_steps: Sequence[int] = ()) -> ReptileCallback:
        """From a ``reptile:`` config section (``ReptileConfig``; faithful variant only)."""
        if cfg.variant != "faithful":
            raise ConfigError("reptile.variant official reproduces DeepSpeed's optimizer; the "
                              "transformers integration runs variant faithful")
        return cls(k=cfg.k, epsilon=cfg.epsilon, task_steps=task_steps,
                   anchor_dtype=cfg.anchor_dtype, anchor_device=cfg.anchor_device,
                   reset_at_task_boundary=cfg.reset_at_task_boundary,
                   reset_optimizer_moments=cfg.reset_optimizer_moments)

    def _file(self, folder: Path) -> Path:
        return folder / f"cptrain-reptile-rank{_rank()}.safetensors"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        stage = zero_stage(args)
        if stage is not None and stage >= 1:
            raise ConfigError(
                f"ReptileCallback: DeepSpeed ZeRO stage {stage} keeps the fp32 weights in its "
                "optimizer, which would overwrite the meta-update; use DDP or FSDP2 instead"
            )
        model = kw["model"]
        self.reptile = Reptile(model, **self.settings)  # type: ignore[arg-type]
        if state.global_step > 0:
            self.reptile.load_state_dict(self._read(checkpoint_dir(args, state,
                                                                   self.resume_dir)))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        assert self.reptile is not None
        self.reptile.after_step(_inner(kw.get("optimizer")))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # `cptrain train` crosses a boundary before the new task's first step
        if state.global_step in self.starts and self.reptile is not None:
            self.reptile.task_boundary(_inner(kw.get("optimizer")))

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        assert self.reptile is not None
        saved = self.reptile.state_dict()
        tensors = {f"anchor/{n}": t.detach().cpu().contiguous()
                   for n, t in saved["anchor"].items()}
        counters = {k: saved[k] for k in ("steps", "steps_since_anchor", "updates", "k",
                                          "epsilon", "variant")}
        folder = checkpoint_dir(args, state)
        folder.mkdir(parents=True, exist_ok=True)
        path = self._file(folder)
        tmp = fsutil.temp_sibling(path)
        save_file(tensors, tmp, metadata={"version": str(STATE_VERSION),
                                          "step": str(state.global_step),
                                          **{k: str(v) for k, v in counters.items()}})
        fsutil.replace_file(tmp, path)

    def _read(self, folder: Path) -> dict[str, Any]:
        from safetensors import safe_open

        path = self._file(folder)
        if not path.is_file():
            raise CheckpointError(f"{folder} has no {path.name} (the Reptile anchor); it was "
                                  "not saved with ReptileCallback: resume from another one")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        anchor = {k.removeprefix("anchor/"): v for k, v in tensors.items()}
        return {"version": int(meta.get("version", 0)), "anchor": anchor,
                **{k: int(meta[k]) for k in ("steps", "steps_since_anchor", "updates")}}


def _inner(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside Accelerate's wrapper (its moments are what a reset zeroes)."""
    return getattr(optimizer, "optimizer", optimizer)


def _cumsum(steps: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in steps:
        total += n
        out.append(total)
    return out


class LossMatrixCallback(TrainerCallback):
    """The loss matrix of a task sequence the ``Trainer`` trains as one run: every column
    (evaluation-only tasks too) before training, after each task's last step (``task_steps``)
    and every ``every`` steps; each evaluation is logged through the Trainer's loggers as
    ``eval_<task>_loss``, which TensorBoard and W&B show as ``eval/<task>_loss`` (the forgetting
    curves; call ``bind(trainer)``)
    and written to the run directory (``metrics.jsonl``, ``summary.json``,
    ``models/after_<i>_<task>/`` with ``export_models``) that ``cptrain eval`` and ``cptrain
    report`` read."""

    def __init__(self, matrix: LossMatrix, task_steps: Sequence[int], *, every: int = 0,
                 export_models: bool = True, tokenizer_dir: Path | None = None):
        if len(task_steps) != len(matrix.tasks):
            raise ConfigError(f"{len(task_steps)} task lengths for {len(matrix.tasks)} tasks; "
                              "give task_steps one entry per trained task")
        self.matrix = matrix
        self.ends = _cumsum(task_steps)
        self.every = every
        self.export_models = export_models
        self.tokenizer_dir = tokenizer_dir
        self.trainer: Any = None
        self.resume_dir: str | Path | None = None
        self.extra_summary: Any = None  # callable → dict merged into the summary's keys
        self._started: tuple[float, float] | None = None  # (perf_counter, wall_s before)

    def bind(self, trainer: Any) -> LossMatrixCallback:
        """Log evaluations through ``trainer.log`` (its reporting integrations)."""
        self.trainer = trainer
        return self

    def _file(self, folder: Path) -> Path:
        return folder / "cptrain-loss-matrix.json"

    def _log(self, losses: dict[str, float], control: Any) -> None:
        if self.trainer is None:
            return
        # Trainer.log clears control.should_log: the step's own loss line must still follow
        keep = getattr(control, "should_log", False)
        # eval_<task>_loss: the reporting integrations (TensorBoard, W&B, …) rewrite the eval_
        # prefix to eval/, so the curves appear as eval/<task>_loss beside the Trainer's own
        self.trainer.log({f"eval_{k}_loss": v for k, v in losses.items()})
        if control is not None:
            control.should_log = keep

    def _clock(self) -> None:
        # wall_s: seconds inside Trainer.train, summed over resumes (checkpoints carry it)
        if self._started is not None:
            t0, before = self._started
            self.matrix.extra["wall_s"] = before + time.perf_counter() - t0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step > 0:
            found = read_json(self._file(checkpoint_dir(args, state, self.resume_dir)),
                              "loss matrix state")
            self.matrix.load_state_dict(found["matrix"])
        self._started = (time.perf_counter(), float(self.matrix.extra.get("wall_s", 0.0)))
        if state.global_step == 0:
            self._log(self.matrix.before(kw["model"]), control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        step, model = state.global_step, kw["model"]
        if step in self.ends:
            task = self.ends.index(step)
            if self.extra_summary is not None:
                self.matrix.extra.update(self.extra_summary())
            self._clock()
            self._export(model, task)
            self._log(self.matrix.task_end(model, task, step=step), control)
            if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
                control.should_save = True  # as `cptrain train`: a checkpoint at each task end
        elif self.every and step % self.every == 0:
            self._log(self.matrix.evaluate(model, step=step), control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kw: Any) -> None:
        # the Trainer's training-loss lines join metrics.jsonl as `cptrain train`'s do
        if not logs or "loss" not in logs or not self.matrix.is_main:
            return
        step = state.global_step
        task = next((i for i, end in enumerate(self.ends) if step <= end), len(self.ends) - 1)
        rec = {"type": "train", "step": step, "task": self.matrix.tasks[task],
               "loss": logs["loss"], "lr": logs.get("learning_rate"),
               "grad_norm": logs.get("grad_norm")}
        self.matrix.metrics.write({k: v for k, v in rec.items() if v is not None})

    def _export(self, model: torch.nn.Module, task: int) -> None:
        if not self.export_models:
            return
        from cptrain.checkpoint.export import export_model
        from cptrain.distributed import DistEnv
        from cptrain.rundir import layout

        out = layout.task_model_dir(self.matrix.path, task, self.matrix.tasks[task])
        export_model(model, DistEnv("none", rank=0 if self.matrix.is_main else 1), out,
                     self.tokenizer_dir)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.matrix.is_main:
            return
        self._clock()
        folder = checkpoint_dir(args, state)
        folder.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_json(self._file(folder), {
            "version": STATE_VERSION, "step": state.global_step,
            "matrix": self.matrix.state_dict()})

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._clock()
        self.matrix.write()
        self.matrix.close()
