"""The prepare config (``cptrain prepare PREPARE.yaml``): tasks and their input files, the
tokenizer to train or load, and how documents are split and sharded. Torch-free, validated
before any file is read."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from cptrain.config_base import StrictModel
from cptrain.data.tokenizer import MIN_VOCAB_SIZE

TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
_TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class TokenizerSection(StrictModel):
    path: Path | None = None  # a tokenizer.json or HF tokenizer dir: load it instead of training
    # Used only when training; shards record the real size, len(tok), which can be smaller.
    vocab_size: int = Field(8192, ge=MIN_VOCAB_SIZE, lt=2**32)
    train_bytes: int = Field(50_000_000, gt=0)  # shared equally by the tasks


class TaskInputs(StrictModel):
    name: str = Field(pattern=_TASK_NAME)
    train: list[Path] = Field(default_factory=list)  # empty (with val): evaluation-only task
    val: list[Path] = Field(default_factory=list)  # empty: hold out val_fraction of train docs
    text_key: str | None = Field(None, min_length=1)  # None: the config's text_key

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == TOKENIZER_DIR:
            raise ValueError(f"{name!r} is reserved for the tokenizer directory; rename the task")
        return name

    @model_validator(mode="after")
    def _has_inputs(self) -> TaskInputs:
        if not self.train and not self.val:
            raise ValueError(f"task {self.name!r} has no inputs; give it train inputs, or only "
                             "val inputs for an evaluation-only task")
        return self

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.train else ("val",)


class PrepareConfig(StrictModel):
    out_dir: Path
    text_key: str = Field("text", min_length=1)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    shard_tokens: int = Field(250_000_000, gt=0)
    val_fraction: float = Field(0.01, gt=0, le=0.5)
    batch_size: int = Field(1000, gt=0)
    tasks: list[TaskInputs] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> PrepareConfig:
        seen: set[str] = set()
        for task in self.tasks:
            # Case-insensitive: the names become directories on possibly case-folding disks.
            if task.name.lower() in seen:
                raise ValueError(f"task name {task.name!r} is used twice; names must be unique")
            seen.add(task.name.lower())
        if self.tokenizer.path is None and not any(t.train for t in self.tasks):
            raise ValueError("every task is evaluation-only (no train inputs), so there is no "
                             "text to train a tokenizer on; set tokenizer.path or give a task "
                             "train inputs")
        return self
