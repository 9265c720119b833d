"""Hooks: what happens around the loop without being the loop.

The trainer calls every hook, in the order given, at these moments:
  on_run_start(trainer)                       before the first step of this process
  on_task_start(trainer, task)                before the first step of a task
  before_step(trainer, batch) -> dict         rows drawn, weights not yet stepped; fields it
                                              returns join the step's record
  on_step_end(trainer, record)                after each optimizer step; a hook may add fields
                                              to the record for the hooks after it
  on_eval(trainer, losses, kind)              after each evaluation ("eval", "task_end", …)
  on_task_end(trainer, task, losses)          after a task's last step and evaluation, before
                                              its checkpoint
  on_run_end(trainer)                         when the loop stops, also on an error
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from cptrain import metrics
from cptrain.errors import ConfigError

if TYPE_CHECKING:
    from cptrain.train.trainer import Trainer


@dataclass
class Batch:
    task: int
    fresh: np.ndarray  # this rank's fresh rows [n, T+1]
    replay: np.ndarray | None  # this rank's replayed rows, if any


class Hook:
    def on_run_start(self, trainer: Trainer) -> None: ...

    def on_task_start(self, trainer: Trainer, task: int) -> None: ...

    def before_step(self, trainer: Trainer, batch: Batch) -> dict[str, Any]:
        return {}

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: Trainer, losses: dict[str, float], kind: str) -> None: ...

    def on_task_end(self, trainer: Trainer, task: int, losses: dict[str, float]) -> None: ...

    def on_run_end(self, trainer: Trainer) -> None: ...


def is_log_step(trainer: Trainer, record: dict[str, Any]) -> bool:
    """Every ``train.log_every`` steps, at each task's last step, and with diagnostics."""
    return (
        trainer.state.step % trainer.cfg.train.log_every == 0
        or trainer.at_task_end
        or "grad_cos" in record
    )


class Throughput(Hook):
    """tokens/s over the steps since the last logged one."""

    def on_run_start(self, trainer: Trainer) -> None:
        self._t = time.perf_counter()
        self._steps = 0

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._steps += 1
        if not is_log_step(trainer, record):
            return
        now = time.perf_counter()
        rows = trainer.plan.n_fresh + record["replay_rows"]
        elapsed = max(now - self._t, 1e-9)
        record["tokens_per_s"] = self._steps * rows * trainer.plan.seq_len / elapsed
        self._t, self._steps = now, 0


class MetricsLogger(Hook):
    """Train records at log steps and every evaluation into ``metrics.jsonl``."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if not is_log_step(trainer, record):
            return
        record.update(type="train", step=trainer.state.step, task=trainer.task_name)
        if trainer.env.device.type == "cuda":
            record["cuda_max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if trainer.buffer is not None:
            stats = trainer.buffer.stats()
            record.update({f"buffer_{k}": v for k, v in stats.items() if not isinstance(v, dict)})
        trainer.run_dir.metrics.write(record)

    def on_eval(self, trainer: Trainer, losses: dict[str, float], kind: str) -> None:
        trainer.run_dir.metrics.write(
            {
                "type": kind,
                "step": trainer.state.step,
                "task": trainer.task_name,
                "val_loss": losses,
                "union_loss": metrics.union_loss(list(losses.values())),
            }
        )


class ProgressBar(Hook):
    """A tqdm bar of steps; without one (``progress=False``), a line per finished task."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: tqdm | None = None

    def on_run_start(self, trainer: Trainer) -> None:
        self._bar = tqdm(
            total=trainer.plan.total_steps,
            initial=trainer.state.step,
            unit="step",
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        if "tokens_per_s" in record:
            self._bar.set_postfix_str(
                f"{trainer.task_name} loss {record['loss']:.3f} "
                f"{record['tokens_per_s']:,.0f} tok/s",
                refresh=False,
            )
        self._bar.update(1)

    def on_eval(self, trainer: Trainer, losses: dict[str, float], kind: str) -> None:
        if kind == "before" and not self.enabled and trainer.env.is_main:
            print(f"before training: val loss {_losses(losses)}")

    def on_task_end(self, trainer: Trainer, task: int, losses: dict[str, float]) -> None:
        if not self.enabled and trainer.env.is_main:
            name, step = trainer.task_names[task], trainer.state.step
            print(f"after {name} (step {step}): val loss {_losses(losses)}")

    def on_run_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in losses.items())


class PeriodicEval(Hook):
    """``eval.every``: extra evaluations inside tasks (task ends are always evaluated)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.every and not trainer.at_task_end and trainer.state.step % self.every == 0:
            trainer.evaluate("eval")


class CheckpointInterval(Hook):
    """``checkpoint.every``: checkpoints inside tasks (task ends always save)."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if not trainer.at_task_end and trainer.checkpoints.should_save(trainer.state.step):
            trainer.save()


class TaskExport(Hook):
    """The weights after each task: ``models/after_<i>_<task>/`` (from_pretrained, lm-eval),
    with a Hugging Face model card (``README.md``: base model, data, method, loss matrix so
    far) written inside the export's temporary directory, so it appears with the weights."""

    def on_task_end(self, trainer: Trainer, task: int, losses: dict[str, float]) -> None:
        from cptrain.checkpoint.export import model_card

        card = model_card(trainer.cfg.model_dump(mode="json"), trainer.state.state_dict())
        trainer.export(trainer.run_dir.task_model_dir(task, trainer.task_names[task]), card)


class ReptileBoundary(Hook):
    """``reptile.reset_at_task_boundary``: a new meta-period when a new task starts."""

    def on_task_start(self, trainer: Trainer, task: int) -> None:
        if task > 0 and trainer.reptile is not None:
            trainer.reptile.on_task_boundary(trainer.optimizer)


class TensorBoard(Hook):
    """``logging.tensorboard``: what ``metrics.jsonl`` gets, as TensorBoard scalars under
    ``<run_dir>/tensorboard/`` (rank 0): each numeric field of a logged train record as
    ``train/<field>``, each evaluation as ``val_loss/<task>`` and ``union_loss``. ``auto``: on
    when the ``tensorboard`` package is installed. A resume purges the events after its
    checkpoint's step (``purge_step``), as ``metrics.jsonl`` drops those records; a fresh start
    purges those of an attempt that died before its first checkpoint."""

    def __init__(self, setting: bool | str, is_main: bool = True):
        import importlib.util

        installed = importlib.util.find_spec("tensorboard") is not None
        if setting is True and not installed:
            raise ConfigError(
                "logging.tensorboard is true but the tensorboard package is not installed; "
                "pip install tensorboard (or set logging.tensorboard: auto)"
            )
        self.enabled = is_main and installed and setting is not False
        self._writer: Any = None

    def on_run_start(self, trainer: Trainer) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        step = trainer.state.step
        self._writer = SummaryWriter(
            log_dir=str(trainer.run_dir.path / "tensorboard"), purge_step=step + 1 if step else 0
        )

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self._writer is None or not is_log_step(trainer, record):
            return
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self._writer.add_scalar(f"train/{key}", value, trainer.state.step)

    def on_eval(self, trainer: Trainer, losses: dict[str, float], kind: str) -> None:
        if self._writer is None:
            return
        step = trainer.state.step
        for task, loss in losses.items():
            self._writer.add_scalar(f"val_loss/{task}", loss, step)
        self._writer.add_scalar("union_loss", metrics.union_loss(list(losses.values())), step)
        self._writer.flush()

    def on_run_end(self, trainer: Trainer) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
