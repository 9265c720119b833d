"""The trainer's own counters: where the run is, what it has measured so far."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cptrain.errors import CheckpointError
from cptrain.evaluation import metrics


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed, over the whole run
    task_idx: int = 0  # task being trained (== number of tasks finished)
    task_step: int = 0  # steps completed inside the current task
    loss_matrix: list[list[float]] = field(default_factory=list)  # row i: after task i
    loss_before: list[float] = field(default_factory=list)  # the starting model, per column
    # Periodic (eval.every) evaluations, each {"step", "tasks_done", "losses" per column}:
    # forgetting counts them too, and a resume must not lose those made before its checkpoint.
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    fresh_tokens: int = 0
    replay_tokens: int = 0
    teacher_tokens: int = 0  # tokens the KL anchor's start model ran on (FLOPs count them)
    wall_s: float = 0.0
    run_id: str = ""

    def record_eval(self, losses: list[float]) -> None:
        """Keep a periodic evaluation, made now, of every loss-matrix column."""
        self.eval_history.append(
            {"step": self.step, "tasks_done": self.task_idx, "losses": list(losses)}
        )

    def periodic_evaluations(self) -> list[tuple[int, list[float]]]:
        """(tasks finished, losses) of each periodic evaluation, as ``metrics`` takes them."""
        return metrics.evaluations_from_history(self.eval_history)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state, dict):
            # checkpoints written before these existed
            state = {"loss_before": [], "eval_history": [], "teacher_tokens": 0, **state}
        known = {f.name for f in fields(self)}
        if not isinstance(state, dict) or not known <= set(state):
            missing = sorted(known - set(state if isinstance(state, dict) else {}))
            raise CheckpointError(
                f"the checkpoint's trainer state lacks {', '.join(missing)}; it is incomplete: "
                "resume from another checkpoint"
            )
        _check_history(state["eval_history"])
        for name in known:
            setattr(self, name, state[name])


def _check_history(history: Any) -> None:
    # Forgetting reads every entry; a damaged one would surface far from its cause.
    ok = isinstance(history, list) and all(
        isinstance(e, dict) and {"step", "tasks_done", "losses"} <= set(e) for e in history
    )
    if not ok:
        raise CheckpointError(
            "the checkpoint's trainer state has a damaged eval_history; resume from another "
            "checkpoint"
        )
