"""cptrain inside Hugging Face ``transformers``: a task sequence trained by a ``Trainer`` with
cptrain's replay mix, Reptile and loss matrix, equal to ``cptrain train`` on the same config.

    from cptrain.integrations.transformers import ContinualTrainer, training_arguments
    args = training_arguments(cfg, output_dir="runs/x/hf", save_steps=50)
    trainer = ContinualTrainer(model, args, config=cfg)    # cfg: a cptrain run config
    trainer.train()                                        # or train(resume_from_checkpoint=True)

``ContinualTrainer`` is a ``Trainer`` with one optimizer and one schedule over all tasks
(``cptrain train``'s AdamW and warm-up/cosine), the loss ``cptrain train`` minimises (mean
next-token cross-entropy over the global batch), the replay dataset and the Reptile and
loss-matrix callbacks. Each piece works in a plain ``Trainer`` too (``hf_data``,
``hf_callbacks``); ``KLToStartMixin`` adds the KL anchor to the start model to either.
Supported: transformers 4.56 up to 5.x (``SUPPORTED``); tested against the pinned one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import Trainer, TrainingArguments

from cptrain.config import RunConfig
from cptrain.errors import ConfigError
from cptrain.evaluation.losses import next_token_ce
from cptrain.integrations.hf_callbacks import LossMatrixCallback, ReptileCallback
from cptrain.integrations.hf_data import ReplayDataCallback, ReplayDataset
from cptrain.integrations.loop import LossMatrix

SUPPORTED = ("4.56", "6")  # [lowest, first unsupported major)


def check_version(found: str = transformers.__version__) -> None:
    """One line when the installed ``transformers`` is outside ``SUPPORTED``."""
    low, high = SUPPORTED
    v = Version(found)
    if not Version(low) <= Version(v.base_version) < Version(high):
        raise ConfigError(
            f"cptrain.integrations.transformers supports transformers >={low},<{high} (found "
            f"{found}); pip install 'transformers>={low},<{high}'"
        )


check_version()

__all__ = ["ContinualTrainer", "KLToStartMixin", "LossMatrixCallback", "ReplayDataCallback",
           "ReplayDataset", "ReptileCallback", "check_version", "training_arguments"]


class StepSchedule(torch.optim.lr_scheduler.LRScheduler):
    """``cptrain train``'s learning rate (warm-up then cosine/WSD/constant over the whole run,
    a pure function of the step) as a scheduler the ``Trainer`` steps after each optimizer
    step: the lr of step s is exactly ``Schedule.lr(s)``, no ratio to a base lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Any):
        self.schedule = schedule
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.schedule.lr(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        # the schedule is rebuilt from the config; the Trainer reloads this with weights_only
        return {k: v for k, v in super().state_dict().items() if k != "schedule"}


def training_arguments(cfg: RunConfig, output_dir: str | Path, **overrides: Any
                       ) -> TrainingArguments:
    """``TrainingArguments`` that train ``cfg`` as ``cptrain train`` does: its steps, seed, grad
    clip and precision, checkpoints every ``checkpoint.every`` steps (besides each task end)
    keeping the last ``checkpoint.keep_last``, one item (one step's rows) per device batch,
    and the data-loader settings the replay dataset needs; ``overrides`` set the rest."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "fp32"  # the Trainer has no probe; fp32 is what every machine computes
    fixed = dict(
        output_dir=str(output_dir), max_steps=sum(cfg.task_steps), seed=cfg.seed,
        per_device_train_batch_size=1, gradient_accumulation_steps=1,
        max_grad_norm=cfg.train.grad_clip if cfg.train.grad_clip > 0 else 0.0,
        bf16=precision == "bf16", dataloader_num_workers=0, ignore_data_skip=True,
        accelerator_config={"dispatch_batches": False}, logging_steps=cfg.train.log_every,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
    )
    every = cfg.checkpoint.every or sum(cfg.task_steps)  # task ends: LossMatrixCallback
    return TrainingArguments(**{"report_to": "none", "save_strategy": "steps",
                                "save_steps": max(1, every),
                                "save_total_limit": cfg.checkpoint.keep_last, **fixed,
                                **overrides})


def _refuse_unsupported(cfg: RunConfig) -> None:
    reg = cfg.regularize
    if reg.l2_to_start.weight > 0 or reg.kl_to_start.top_k is not None:
        raise ConfigError("regularize.l2_to_start and kl_to_start.top_k run in `cptrain train` "
                          "only; with the Trainer use KLToStartMixin (full KL to the start model)")
    if cfg.reptile.enabled and cfg.reptile.variant != "faithful":
        raise ConfigError("reptile.variant official reproduces DeepSpeed's optimizer; the "
                          "transformers integration runs variant faithful")
    kl = reg.kl_to_start
    if kl.weight > 0 and kl.rows != "all":
        raise ConfigError(f"regularize.kl_to_start.rows {kl.rows} runs in `cptrain train` only; "
                          "KLToStartMixin anchors every row (rows: all)")
    if cfg.micro_batch_size != cfg.train.batch_size:
        raise ConfigError("train.micro_batch_size splits a step inside `cptrain train`'s loop; "
                          "with the Trainer leave it unset (one item is one step)")


def _run_id(run_dir: Path, rank: int, world: int) -> str:
    from cptrain.rundir.run_dir import RunDir

    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = RunDir(run_dir, is_main=rank == 0).attempt_run_id() if rank == 0 else ""
    if world > 1:
        box = [run_id]
        torch.distributed.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


class ContinualTrainer(Trainer):
    """A ``Trainer`` that trains a cptrain run config's task sequence with its replay mix,
    Reptile and loss matrix (run directory ``cfg.run_dir``; the Trainer's own checkpoints go
    to ``args.output_dir``). Build ``args`` with ``training_arguments(cfg, …)``; ``model`` is
    yours (``cptrain train`` would build ``model.preset`` or load ``model.init_from``)."""

    def __init__(self, model: torch.nn.Module, args: TrainingArguments, *,
                 config: RunConfig | str | Path, eval_every: int | None = None,
                 callbacks: list[Any] | None = None, **kwargs: Any):
        from cptrain.train.data import TrainingData
        from cptrain.train.schedule import Schedule

        cfg = config if isinstance(config, RunConfig) else _load(Path(config))
        _refuse_unsupported(cfg)
        if cfg.regularize.kl_to_start.weight > 0 and not isinstance(self, KLToStartMixin):
            raise ConfigError("regularize.kl_to_start needs the KL mix-in: class "
                              "T(KLToStartMixin, ContinualTrainer)")
        self.cpt = cfg
        rank, world = args.process_index, args.world_size
        self._world = world
        self.data = TrainingData(cfg)
        run_dir = Path(cfg.run_dir)
        self.dataset = ReplayDataset(cfg, self.data, rank=rank, world_size=world,
                                     run_dir=run_dir, run_id=_run_id(run_dir, rank, world))
        plan = self.dataset.plan
        if args.max_steps != plan.total_steps:
            raise ConfigError(f"args.max_steps is {args.max_steps} but the config's tasks take "
                              f"{plan.total_steps} steps; build args with training_arguments(cfg)")
        self.schedule = Schedule.for_run(cfg.train, cfg.peak_lr, plan.task_steps)
        matrix = LossMatrix(run_dir, self.data.val_sets, tasks=self.data.task_names,
                            eval_only=self.data.eval_only, window_len=self.data.window_len,
                            windows=cfg.eval.windows, batch_size=cfg.eval.batch_size,
                            config=cfg, is_main=rank == 0)
        self.loss_matrix = LossMatrixCallback(matrix, plan.task_steps,
                                              every=cfg.eval.every if eval_every is None
                                              else eval_every,
                                              tokenizer_dir=self.data.tokenizer_dir)
        self.loss_matrix.extra_summary = self._summary_extra
        ours: list[Any] = [self.dataset.callback, self.loss_matrix]
        self._reptile = (ReptileCallback.from_config(cfg.reptile, plan.task_steps)
                         if cfg.reptile.enabled else None)
        if self._reptile is not None:
            ours.append(self._reptile)
        super().__init__(model=model, args=args, train_dataset=self.dataset,
                         data_collator=ReplayDataset.collate,
                         callbacks=[*ours, *(callbacks or [])], **kwargs)
        self.loss_matrix.bind(self)

    def _summary_extra(self) -> dict[str, Any]:
        """What `cptrain train` records for the report's compute table: the model's shape,
        the tokens trained (replayed rows summed over ranks), meta-updates and precision."""
        from cptrain.models.build import count_parameters
        from cptrain.models.flops import shape_from_hf_config, summary_facts

        plan = self.dataset.plan
        reptile = self._reptile.reptile if self._reptile is not None else None
        updates = reptile.updates if reptile is not None else 0
        config = getattr(self.model, "config", None)
        out: dict[str, Any] = {"task_steps": list(plan.task_steps), "trainer": "transformers",
                               "rows_per_step": {"fresh": plan.n_fresh, "replay": plan.n_replay}}
        if config is not None and hasattr(config, "to_dict"):
            out |= summary_facts(shape_from_hf_config(config.to_dict()), plan.n_fresh,
                                 plan.n_replay, updates)
        out["params"] = count_parameters(self.model)
        replayed = 0
        if self.dataset.buffer is not None:
            out["replay"] = self.dataset.buffer.stats()
            replayed = int(out["replay"].get("rows_drawn", 0))
        if self._world > 1:  # every rank reaches a task end: one collective
            box = torch.tensor([float(replayed)], device=self.args.device)
            torch.distributed.all_reduce(box)
            replayed = int(box.item())
        out["fresh_tokens"] = self.state.global_step * plan.n_fresh * plan.seq_len
        out["replay_tokens"] = replayed * plan.seq_len
        if getattr(self, "kl_weight", 0) > 0 and hasattr(self, "start_model"):
            out["teacher_tokens"] = out["fresh_tokens"] + out["replay_tokens"]
        out["precision"] = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32"
        return out

    # ------------------------------------------------------------ one optimizer, one schedule
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        from cptrain.train.optim import build_optimizer

        if self.optimizer is None:
            self.optimizer = build_optimizer(model or self.model, self.cpt.train,
                                             self.schedule.lr(0))
        return self.optimizer

    def create_scheduler(self, num_training_steps: int,
                         optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = StepSchedule(optimizer or self.optimizer, self.schedule)
        return self.lr_scheduler

    # ------------------------------------------------------------ the loss
    def row_scale(self, n_local: int, device: torch.device) -> float:
        """Weight of this rank's mean loss so that DDP's gradient average is the mean over
        the global batch whatever each rank drew (``cptrain train``'s world/n_global)."""
        if self._world == 1:
            return 1.0
        n = torch.tensor([float(n_local)], device=device)
        torch.distributed.all_reduce(n)
        return n_local * self._world / float(n.item())

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        rows = inputs["input_ids"]
        outputs = model(input_ids=rows[:, :-1])
        logits = outputs.logits
        loss = next_token_ce(logits, rows)
        loss = loss * self.row_scale(rows.shape[0], rows.device)
        return (loss, outputs) if return_outputs else loss

    def teacher_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": inputs["input_ids"][:, :-1]}

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; a resume also points the callbacks at the checkpoint-N/ whose
        replay buffer, Reptile anchor and loss-matrix rows they restore."""
        resume = resume_from_checkpoint
        if resume is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume = get_last_checkpoint(self.args.output_dir)
            if resume is None:
                raise ConfigError(f"no checkpoint-N under {self.args.output_dir} to resume; "
                                  "train without resume_from_checkpoint")
        for cb in self.callback_handler.callbacks:
            if hasattr(cb, "resume_dir"):
                cb.resume_dir = resume or None
        return super().train(resume_from_checkpoint=resume or None, **kwargs)


def _load(path: Path) -> RunConfig:
    from cptrain.config_base import load_config

    return load_config(RunConfig, path)


class KLToStartMixin:
    """``compute_loss`` + λ · KL(p_start ‖ p_θ): the KL anchor of ``cptrain train``'s
    ``regularize.kl_to_start`` (rows: all), for a ``Trainer`` (put it first in the bases:
    ``class T(KLToStartMixin, ContinualTrainer)``). The start model is a frozen copy of the
    model when the trainer is built, so a resumed run anchors to the same weights; its forward
    passes cost one more forward per step. ``kl_weight`` is λ (default: the run config's
    ``regularize.kl_to_start.weight`` with ``ContinualTrainer``, else 1)."""

    kl_weight: float = 1.0

    def __init__(self, *args: Any, kl_weight: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cpt = getattr(self, "cpt", None)
        if kl_weight is not None:
            self.kl_weight = kl_weight
        elif cpt is not None and cpt.regularize.kl_to_start.weight > 0:
            self.kl_weight = cpt.regularize.kl_to_start.weight
        model: torch.nn.Module = self.model  # type: ignore[attr-defined]
        self.start_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.last_kl: float | None = None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        from cptrain.anchor.kl import kl_rows

        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            # ContinualTrainer feeds rows without their last token; a plain Trainer its inputs
            pick = getattr(self, "teacher_inputs", None)
            given = pick(inputs) if pick is not None else {
                k: v for k, v in inputs.items() if k != "labels"}
            start = self.start_model(**given).logits
        kl = kl_rows(outputs.logits, start).mean()
        self.last_kl = float(kl.detach())
        scale = getattr(self, "row_scale", None)
        n = outputs.logits.shape[0]
        factor = scale(n, outputs.logits.device) if scale is not None else 1.0
        loss = loss + self.kl_weight * kl * factor
        return (loss, outputs) if return_outputs else loss
