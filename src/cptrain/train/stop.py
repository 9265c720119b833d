"""SIGTERM, what SLURM and Kubernetes send some time before they kill a job: the loop stops at
the next step boundary, a checkpoint is written, and the run ends with a message and exit code
143, so that ``--resume`` continues bit-identically instead of from the last task end.

Under torchrun every rank gets the signal, but not at the same step: the ranks agree through
one scalar all-reduce per step check, so they stop (and save, a collective) at the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

from cptrain.errors import Stopped

if TYPE_CHECKING:
    from cptrain.distributed import DistEnv
    from cptrain.train.trainer import Trainer


class StopRequest:
    """Catches SIGTERM between ``install`` and ``uninstall`` (main thread only)."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._catch)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _catch(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def requested(self, env: DistEnv) -> bool:
        """Whether any rank was signalled; every rank must ask at the same points."""
        if env.active:
            self.signalled = env.sum_scalar(float(self.signalled)) > 0
        return self.signalled

    def save_and_stop(self, trainer: Trainer) -> None:
        """Checkpoint the step just taken (unless a task end just did), then end the run."""
        step = trainer.state.step
        if trainer.checkpoints.last_step != step:
            trainer.save()
        raise Stopped(
            f"stopped by SIGTERM after step {step} of {trainer.plan.total_steps}; checkpoint "
            "saved: continue with --resume"
        )
