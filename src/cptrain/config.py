"""The run configuration: one YAML file validated by pydantic, plus ``--set a.b=c`` overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cptrain.config_base import StrictModel, apply_overrides, build_config, read_yaml
from cptrain.distributed import DistributedConfig
from cptrain.model import PRESETS
from cptrain.replay.config import ReplayConfig
from cptrain.reptile import ReptileConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Peak learning rates: the paper's per size (DESIGN.md §3); CPU presets measured on the demo.
DEFAULT_LR = {"tiny": 2e-3, "small": 1e-3, "99m": 4e-4, "560m": 2.8e-4, "1b": 2.2e-4, "4b": 1.5e-4}

METHODS = ("sequential", "replay", "reptile", "mer", "joint")


class TaskSpec(StrictModel):
    name: str
    tokens: int | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("task names use letters, digits, '_', '-', '.' only")
        return v


class DataConfig(StrictModel):
    dir: str = Field(description="output directory of `cptrain prepare`")
    tasks: list[TaskSpec] = Field(min_length=1, description="training order")
    tokens_per_task: int = Field(default=1_000_000, gt=0, description="fresh-token budget")
    joint_weights: list[float] | None = Field(
        default=None, description="method joint: task mixture weights (default: by tokens)"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _names_to_specs(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": t} if isinstance(t, str) else t for t in v]
        return v

    @model_validator(mode="after")
    def _unique(self) -> DataConfig:
        names = [t.name for t in self.tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(sorted(dup))}")
        if self.joint_weights is not None and len(self.joint_weights) != len(self.tasks):
            raise ValueError("joint_weights needs one weight per task")
        return self

    def budget(self, task: TaskSpec) -> int:
        return task.tokens if task.tokens is not None else self.tokens_per_task


class ModelConfig(StrictModel):
    preset: str = "tiny"
    init_from: str | None = Field(
        default=None, description="HF directory: start from these weights (not a resume)"
    )

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v


class TrainConfig(StrictModel):
    seq_len: int = Field(default=256, ge=8, le=131072)
    batch_size: int = Field(default=16, ge=1, description="sequences per optimizer step")
    micro_batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0, description="peak LR; default by preset")
    min_lr: float = Field(default=5e-5, ge=0)
    warmup: float = Field(default=0.01, ge=0, lt=1, description="fraction of all steps")
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="wsd: final decay share")
    rewarm_each_task: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0, description="0 disables clipping")
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    threads: int | None = Field(default=None, ge=1)
    log_every: int = Field(default=10, ge=1)

    @model_validator(mode="after")
    def _micro(self) -> TrainConfig:
        mb = self.micro_batch_size
        if mb is not None and mb > self.batch_size:
            raise ValueError("micro_batch_size cannot exceed batch_size")
        for b in self.betas:
            if not 0 <= b < 1:
                raise ValueError("betas must lie in [0, 1)")
        return self


class EvalConfig(StrictModel):
    every: int = Field(default=0, ge=0, description="steps between evaluations; 0 = task ends")
    windows: int = Field(default=64, ge=1, description="validation windows per task")
    batch_size: int = Field(default=32, ge=1)


class CheckpointConfig(StrictModel):
    every: int = Field(default=0, ge=0, description="steps between checkpoints; 0 = task ends")
    keep_last: int = Field(default=2, ge=1)


class RunConfig(StrictModel):
    run_dir: str
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    method: Literal["sequential", "replay", "reptile", "mer", "joint"] | None = None
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    replay: ReplayConfig = ReplayConfig()
    reptile: ReptileConfig = ReptileConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="before")
    @classmethod
    def _apply_method(cls, data: Any) -> Any:
        """A method preset fills replay/reptile defaults; explicit keys still win."""
        if not isinstance(data, dict) or data.get("method") is None:
            return data
        method = data["method"]
        if method not in METHODS:
            return data  # the Literal check reports it
        preset: dict[str, dict[str, Any]] = {
            "sequential": {"replay": {"alpha": 0.0}, "reptile": {"enabled": False}},
            "replay": {"replay": {"alpha": 0.25}, "reptile": {"enabled": False}},
            "reptile": {"replay": {"alpha": 0.0}, "reptile": {"enabled": True}},
            "mer": {"replay": {"alpha": 0.25}, "reptile": {"enabled": True}},
            "joint": {"replay": {"alpha": 0.0}, "reptile": {"enabled": False}},
        }[method]
        out = dict(data)
        for section, values in preset.items():
            given = out.get(section)
            if given is not None and not isinstance(given, dict):
                continue  # let validation report the wrong type
            out[section] = {**values, **(given or {})}
        return out

    @property
    def peak_lr(self) -> float:
        return self.train.lr if self.train.lr is not None else DEFAULT_LR[self.model.preset]

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size


def load_run_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return build_config(RunConfig, data, source=str(path) if path else "config")
