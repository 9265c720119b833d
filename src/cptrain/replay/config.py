"""The `replay:` section of a run config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from cptrain.config_base import StrictModel

BOUNDED_POLICIES = ("reservoir", "fifo", "task_balanced")


class ReplayConfig(StrictModel):
    """Experience replay settings; every field is documented where it is declared."""

    # Fraction of each batch replayed from the buffer (substitute) or the replay:fresh ratio
    # α/(1−α) (additive). 0 disables replay.
    alpha: float = 0.0
    # substitute: batch size fixed, round(α·B) rows replayed. additive: B fresh rows plus
    # round(α·B/(1−α)) replayed rows.
    mode: Literal["substitute", "additive"] = "substitute"
    # Admission: all = every fresh row is kept (the paper); the others keep `capacity` rows:
    # reservoir = uniform sample of everything seen, fifo = the newest rows, task_balanced =
    # capacity split evenly over the tasks seen, each share a uniform sample of its task.
    policy: Literal["all", "reservoir", "fifo", "task_balanced"] = "all"
    # Rows kept by a bounded policy; required for them and forbidden with policy `all`.
    capacity: int | None = Field(default=None, validate_default=True)
    # copy = store the tokens; reference = store (task, window index) and read the tokens back
    # from the task's token shards, which must then stay unchanged on disk.
    storage: Literal["copy", "reference"] = "copy"
    # Buffer root (each data-parallel rank writes `rank_<r>/` under it); default <run_dir>/replay.
    dir: str | None = None
    # RAM for replay batches prepared ahead by the background thread; 0 disables the thread.
    # Never changes which rows are drawn.
    prefetch_mb: float = Field(default=64.0, ge=0)
    # all = replay from every task seen, current one included (the paper's Alg. 1);
    # previous_tasks = never replay rows of the task being trained.
    replay_from: Literal["all", "previous_tasks"] = "all"
    # Rows added after optimizer step t become replayable at step t + 1 + visibility_lag. The
    # lag lets the prefetch thread prepare that many steps ahead while the draws stay a pure
    # function of (seed, step, rank); 0 is Alg. 1 to the letter but leaves nothing to prefetch.
    visibility_lag: int = Field(default=4, ge=0)
    # Target size of one chunk file; only read when a buffer directory is created.
    chunk_mb: float = Field(default=256.0, gt=0)
    # Bounded policies: rows still needed by the last `keep_checkpoints` checkpoints stay on
    # disk; older chunk files are deleted once nothing that can be resumed refers to them.
    keep_checkpoints: int = Field(default=2, ge=1)
    # On resume, checksum every chunk file (costs one read of the buffer). Every replayed row
    # is checksummed when read in any case, so corrupt rows are never replayed.
    verify_on_resume: bool = True

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise PydanticCustomError(
                "alpha_range",
                "must be in [0, 1) (got {value}); e.g. 0.25 replays a quarter of each batch",
                {"value": value},
            )
        return value

    @field_validator("capacity")
    @classmethod
    def _capacity_matches_policy(cls, value: int | None, info: ValidationInfo) -> int | None:
        policy = info.data.get("policy")
        if policy is None:  # policy itself failed validation; that error is reported instead
            return value
        if policy == "all" and value is not None:
            raise PydanticCustomError(
                "capacity_with_all",
                "policy 'all' keeps every row and takes no capacity; remove capacity or choose "
                "policy reservoir, fifo or task_balanced",
            )
        if policy in BOUNDED_POLICIES and value is None:
            raise PydanticCustomError(
                "capacity_missing",
                "policy '{policy}' needs a capacity (rows kept), e.g. capacity: 100000",
                {"policy": policy},
            )
        if value is not None and value < 1:
            raise PydanticCustomError(
                "capacity_range", "must be at least 1 row (got {value})", {"value": value}
            )
        return value

    @property
    def bounded(self) -> bool:
        return self.policy in BOUNDED_POLICIES
