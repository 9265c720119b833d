"""Learning-rate schedules as pure functions of the global step (nothing to checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """Warm-up then cosine / warmup-stable-decay / constant, over the run or per task.

    The paper's default is one linear warm-up (a fraction of *all* steps) and one cosine to
    ``min_lr`` across the whole run, with no re-warming at task boundaries. ``rewarm_each_task``
    restarts the warm-up and the decay inside every task instead.
    """

    kind: str
    peak_lr: float
    min_lr: float
    warmup: float
    task_steps: Sequence[int]
    rewarm_each_task: bool = False
    decay_fraction: float = 0.2

    @classmethod
    def for_run(cls, train: Any, peak_lr: float, task_steps: Sequence[int]) -> Schedule:
        """The schedule of a run's ``train:`` config section."""
        return cls(
            kind=train.schedule,
            peak_lr=peak_lr,
            min_lr=train.min_lr,
            warmup=train.warmup,
            task_steps=list(task_steps),
            rewarm_each_task=train.rewarm_each_task,
            decay_fraction=train.decay_fraction,
        )

    def _segment(self, step: int) -> tuple[int, int]:
        """(position inside the segment, segment length)."""
        if not self.rewarm_each_task:
            return step, sum(self.task_steps)
        start = 0
        for n in self.task_steps:
            if step < start + n:
                return step - start, n
            start += n
        return step - (start - self.task_steps[-1]), self.task_steps[-1]

    def lr(self, step: int) -> float:
        pos, total = self._segment(step)
        warm = max(1, round(self.warmup * total)) if self.warmup > 0 else 0
        if pos < warm:
            return self.peak_lr * (pos + 1) / warm
        if self.kind == "constant":
            return self.peak_lr
        rest = max(1, total - warm)
        if self.kind == "cosine":
            frac = min(1.0, (pos - warm) / rest)
            return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * frac))
        # wsd: hold the peak, then decay linearly over the last decay_fraction of the segment
        decay = max(1, round(self.decay_fraction * total))
        start = total - decay
        if pos < start:
            return self.peak_lr
        frac = min(1.0, (pos - start + 1) / decay)
        return self.peak_lr + (self.min_lr - self.peak_lr) * frac
