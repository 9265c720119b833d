"""The `replay:` section of a run config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cptrain.config_base import StrictModel, without_unset
from cptrain.errors import ConfigError

BOUNDED_POLICIES = ("reservoir", "fifo", "task_balanced")
SEED_SOURCES = ("task", "self")
# Keys only `source: self` takes, with their defaults.
_SELF_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 0.95,
    "batch_size": 16,
    "prompt": "bos",
}


class SeedPrompt(StrictModel):
    """Prompts for `source: self`: the first prefix_tokens tokens of documents of a task."""

    task: str = Field(min_length=1)
    prefix_tokens: int = Field(default=8, ge=1)


class SeedSource(StrictModel):
    """One entry of replay.seed: rows put in the buffer before the first task that stand in for
    the starting model's pre-training data.

    source task: `tokens` tokens of training windows of a task prepared in data.dir (`task`).
    source self: `tokens` tokens sampled from the starting model (temperature, top_p,
    batch_size sequences at a time, each started from BOS or from a document prefix of a task).
    Tokens count like data.tokens_per_task: seq_len per row, so a seed holds
    ceil(tokens / seq_len) rows.
    """

    source: Literal["task", "self"]
    tokens: int
    task: str | None = Field(default=None, min_length=1)
    temperature: float | None = None
    top_p: float | None = None
    batch_size: int | None = None
    prompt: SeedPrompt | None = None  # None: every sequence starts from BOS (written "bos")

    @model_validator(mode="before")
    @classmethod
    def _keys_of_the_source(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        source = data.get("source")
        if source not in SEED_SOURCES:
            raise PydanticCustomError(
                "seed_source",
                "source must be task (a prepared proxy corpus) or self (text sampled from the "
                "starting model), got {source}",
                {"source": repr(source)},
            )
        if source == "task":
            extra = [k for k in _SELF_DEFAULTS if k in data]
            if extra:
                raise PydanticCustomError(
                    "seed_key_for_self",
                    "{key} applies to source: self only; remove it from this source: task entry",
                    {"key": extra[0]},
                )
            if data.get("task") is None:
                raise PydanticCustomError(
                    "seed_task_missing",
                    "source: task needs task: NAME, a task prepared in data.dir",
                )
            return data
        if "task" in data:
            raise PydanticCustomError(
                "seed_task_for_self",
                "source: self takes no task; to prompt with a task's documents write "
                "prompt: {task: NAME, prefix_tokens: 8}",
            )
        return {**_SELF_DEFAULTS, **data}

    @field_validator("tokens")
    @classmethod
    def _tokens_positive(cls, value: int) -> int:
        if value <= 0:
            raise PydanticCustomError(
                "seed_tokens",
                "must be > 0 (got {value}); e.g. tokens: 10000000, or remove this seed entry "
                "to seed nothing",
                {"value": value},
            )
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature_positive(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise PydanticCustomError(
                "seed_temperature",
                "must be > 0 (got {value}); 1.0 samples the model's own distribution",
                {"value": value},
            )
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise PydanticCustomError(
                "seed_top_p",
                "must be in (0, 1] (got {value}); 1.0 samples from the whole vocabulary",
                {"value": value},
            )
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise PydanticCustomError(
                "seed_batch_size",
                "must be at least 1 sequence (got {value}); e.g. batch_size: 16",
                {"value": value},
            )
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value: Any) -> Any:
        if value == "bos":
            return None
        if value is None or isinstance(value, dict | SeedPrompt):
            return value
        raise PydanticCustomError(
            "seed_prompt",
            "must be bos or {task: NAME, prefix_tokens: 8} (got {value})",
            {"value": repr(value)},
        )

    @field_serializer("prompt")
    def _prompt_out(self, value: SeedPrompt | None) -> Any:
        return "bos" if value is None else value.model_dump()

    @model_serializer(mode="wrap")
    def _only_own_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        drop = ("task",) if self.source == "self" else tuple(_SELF_DEFAULTS)
        return {k: v for k, v in out.items() if k not in drop}

    @property
    def tasks(self) -> list[str]:
        """The prepared tasks this source reads."""
        if self.task is not None:
            return [self.task]
        if isinstance(self.prompt, SeedPrompt):
            return [self.prompt.task]
        return []

    @property
    def label(self) -> str:
        """A short name for metrics: task:NAME or self."""
        return f"task:{self.task}" if self.source == "task" else "self"


def check_seed_tasks(seed: Sequence[SeedSource] | None, prepared_tasks: Sequence[str]) -> None:
    """ConfigError (one line) when a replay.seed entry names a task not prepared in data.dir.
    Call at run start, where the prepared tasks are known."""
    known = list(prepared_tasks)
    for i, source in enumerate(seed or []):
        for name in source.tasks:
            if name not in known:
                key = "task" if source.source == "task" else "prompt.task"
                raise ConfigError(
                    f"replay.seed.{i}.{key}: {name} is not prepared in data.dir (prepared "
                    f"tasks: {', '.join(known) or 'none'}); fix the name or run `cptrain "
                    "prepare` for it"
                )


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
    # Rows put in the buffer before the first task, standing in for pre-training data one does
    # not have (a continued released model): one source or a list of them, see SeedSource. They
    # are visible to every draw from step 0 on, also with replay_from: previous_tasks.
    seed: list[SeedSource] | None = None

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_as_list(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return [value]
        return value or None  # an empty list seeds nothing, like no key

    @model_serializer(mode="wrap")
    def _seed_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_unset(handler(self), "seed")

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
