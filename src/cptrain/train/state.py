"""The trainer's own counters: where the run is, what it has measured so far."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cptrain.errors import CheckpointError


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed, over the whole run
    task_idx: int = 0  # task being trained (== number of tasks finished)
    task_step: int = 0  # steps completed inside the current task
    loss_matrix: list[list[float]] = field(default_factory=list)  # row i: after task i
    loss_before: list[float] = field(default_factory=list)  # the starting model, per column
    fresh_tokens: int = 0
    replay_tokens: int = 0
    wall_s: float = 0.0
    run_id: str = ""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state, dict):
            state = {"loss_before": [], **state}  # checkpoints written before it existed
        known = {f.name for f in fields(self)}
        if not isinstance(state, dict) or not known <= set(state):
            missing = sorted(known - set(state or {}))
            raise CheckpointError(
                f"the checkpoint's trainer state lacks {', '.join(missing)}; it is incomplete: "
                "resume from another checkpoint"
            )
        for name in known:
            setattr(self, name, state[name])
