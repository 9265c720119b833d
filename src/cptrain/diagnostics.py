"""Gradient-alignment diagnostics as a training hook (config section ``diagnostics:``).

Every ``diagnostics.every`` steps, before the step, measure cos(∇ fresh rows, ∇ reference rows)
on the weights the step starts from. The reference is the step's replayed rows; without replay
(sequential, Reptile only) it is a probe batch of the same size from earlier tasks' training
windows, so every method gets a measure of interference between the current task and the past.
Nothing here changes training: gradients come from ``torch.autograd.grad``, never ``.grad``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cptrain.errors import CheckpointError
from cptrain.train.hooks import Batch, Hook

if TYPE_CHECKING:
    from cptrain.train.trainer import Trainer


class GradientDiagnostics(Hook):
    def __init__(self, every: int, seed: int, probe_rows: int):
        self.every = every
        self.seed = seed
        self.probe_rows = probe_rows
        # Cosines measured after the first task, for the run's mean.
        self.cos_sum = 0.0
        self.cos_n = 0

    def _reference(self, trainer: Trainer, batch: Batch) -> tuple[np.ndarray, str] | None:
        if batch.replay is not None and len(batch.replay):
            return batch.replay, "replay"
        if batch.task == 0:
            return None
        rng = np.random.default_rng([self.seed, trainer.state.step, 0xD1A6])
        tasks = rng.integers(0, batch.task, self.probe_rows)
        streams = trainer.streams
        ref = np.concatenate(
            [streams[t].rows(rng.integers(0, streams[t].n, 1)) for t in tasks.tolist()]
        )
        return ref, "probe"

    def before_step(self, trainer: Trainer, batch: Batch) -> dict[str, Any]:
        step = trainer.state.step
        # autograd.grad bypasses FSDP2's reduce hooks, so sharded runs are not measured.
        if not self.every or (step + 1) % self.every or trainer.env.strategy == "fsdp2":
            return {}
        found = self._reference(trainer, batch)
        if found is None:
            return {}
        ref, kind = found
        from cptrain.alignment import gradient_alignment

        device = trainer.env.device
        out: dict[str, Any] = gradient_alignment(
            trainer.model,
            torch.from_numpy(batch.fresh).to(device),
            torch.from_numpy(ref).to(device),
            autocast_dtype=trainer.autocast,
        )
        out["grad_ref"] = kind
        if batch.task > 0 and math.isfinite(out["grad_cos"]):
            self.cos_sum += out["grad_cos"]
            self.cos_n += 1
        return out

    def summary(self) -> dict[str, Any]:
        if not self.cos_n:
            return {}
        return {"grad_cos_mean": self.cos_sum / self.cos_n, "grad_cos_count": self.cos_n}

    def state_dict(self) -> dict[str, Any]:
        return {"cos_sum": self.cos_sum, "cos_n": self.cos_n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.cos_sum, self.cos_n = float(state["cos_sum"]), int(state["cos_n"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(
                "the checkpoint's diagnostics state is damaged; resume from another checkpoint"
            ) from None
