"""What a hook sees of the running trainer: its parts, to read, and none of its actions.

Evaluations, checkpoints, task exports and Reptile's boundary are the loop's to call; a hook
gets this view instead of the trainer, so it can log, draw progress or measure, but cannot save,
evaluate, export or step, and hooks in any order give the same run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cptrain.config import RunConfig
    from cptrain.distributed import DistEnv
    from cptrain.replay.buffer import ReplayBuffer
    from cptrain.rundir.run_dir import RunDir
    from cptrain.train.batches import BatchPlan, TaskStream
    from cptrain.train.data import TrainingData
    from cptrain.train.hooks import Throughput
    from cptrain.train.reptile import Reptile
    from cptrain.train.state import TrainerState
    from cptrain.train.trainer import Trainer


class RunView:
    """The running trainer's parts, read-only (the view itself cannot be assigned to)."""

    __slots__ = ("_trainer",)

    def __init__(self, trainer: Trainer):
        object.__setattr__(self, "_trainer", trainer)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"hooks read the run; {name!r} is the trainer's to set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"hooks read the run; {name!r} is the trainer's to keep")

    @property
    def cfg(self) -> RunConfig:
        return self._trainer.cfg

    @property
    def env(self) -> DistEnv:
        return self._trainer.env

    @property
    def state(self) -> TrainerState:
        return self._trainer.state

    @property
    def plan(self) -> BatchPlan:
        return self._trainer.plan

    @property
    def data(self) -> TrainingData:
        return self._trainer.data

    @property
    def streams(self) -> list[TaskStream]:
        return self._trainer.streams

    @property
    def task_names(self) -> list[str]:
        return self._trainer.task_names

    @property
    def task_name(self) -> str:
        return self._trainer.task_name

    @property
    def at_task_end(self) -> bool:
        return self._trainer.at_task_end

    @property
    def precision(self) -> str:
        return self._trainer.precision

    @property
    def autocast(self) -> torch.dtype | None:
        return self._trainer.autocast

    @property
    def model(self) -> torch.nn.Module:
        return self._trainer.model

    @property
    def buffer(self) -> ReplayBuffer | None:
        return self._trainer.buffer

    @property
    def reptile(self) -> Reptile | None:
        return self._trainer.reptile

    @property
    def run_dir(self) -> RunDir:
        return self._trainer.run_dir

    @property
    def clock(self) -> Throughput:
        return self._trainer.clock
