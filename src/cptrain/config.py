"""The run configuration: one YAML file validated by pydantic, plus ``--set a.b=c`` overrides.

Every section lives here (replay's in ``cptrain.replay.config``) and nothing here imports torch,
so a config is checked in a fraction of a second before any training code loads. ``METHODS``
is the one table of what each ``method:`` means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cptrain.anchor.config import RegularizeConfig, check_anchors
from cptrain.config_base import (
    StrictModel,
    apply_overrides,
    build_config,
    read_yaml,
    without_unset,
)
from cptrain.models.presets import DEFAULT_LR, PRESETS
from cptrain.replay.config import ReplayConfig
from cptrain.replay.mixer import mix_counts, replay_share

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Sampler = Literal["sequential", "joint"]


@dataclass(frozen=True)
class MethodSpec:
    """What ``method: NAME`` sets. ``alpha`` and ``reptile`` are defaults that explicit
    ``replay.alpha`` / ``reptile.enabled`` keys override; the sampler is fixed by the method."""

    alpha: float  # default replay fraction
    reptile: bool  # default reptile.enabled
    # sequential: the tasks one after another; joint: every step an i.i.d. mixture of all tasks
    # (weights data.joint_weights, default the per-task budgets) for the same total steps.
    sampler: Sampler
    label: str  # how reports name the method
    kl: float = 0.0  # default regularize.kl_to_start.weight
    l2: float = 0.0  # default regularize.l2_to_start.weight

    @property
    def replays(self) -> bool:
        return self.alpha > 0

    @property
    def anchors(self) -> bool:
        return self.kl > 0 or self.l2 > 0


# The one table of methods: configs, sweeps and reports read it instead of comparing names.
METHODS: dict[str, MethodSpec] = {
    "sequential": MethodSpec(alpha=0.0, reptile=False, sampler="sequential", label="sequential"),
    "replay": MethodSpec(alpha=0.25, reptile=False, sampler="sequential", label="replay"),
    "reptile": MethodSpec(alpha=0.0, reptile=True, sampler="sequential", label="Reptile"),
    "mer": MethodSpec(alpha=0.25, reptile=True, sampler="sequential", label="MER"),
    "joint": MethodSpec(alpha=0.0, reptile=False, sampler="joint", label="joint"),
    # Anchors to the start model (cptrain.anchor); λ = 1 for KL as TiC-LM ran it.
    "kl": MethodSpec(alpha=0.0, reptile=False, sampler="sequential", label="KL to start", kl=1.0),
    "kl-replay": MethodSpec(
        alpha=0.25, reptile=False, sampler="sequential", label="KL + replay", kl=1.0
    ),
    "l2": MethodSpec(alpha=0.0, reptile=False, sampler="sequential", label="L2 to start", l2=10.0),
}


class TaskSpec(StrictModel):
    name: str
    tokens: int | None = Field(default=None, gt=0)
    # Train on this many distinct tokens of the task (ceil(unique_tokens / seq_len) windows,
    # a seeded sample), repeating them as often as the budget needs: a data-constrained task,
    # or a control that repeats its own windows as replay does. None: every window.
    unique_tokens: int | None = Field(default=None, gt=0)

    @model_serializer(mode="wrap")
    def _unique_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_unset(handler(self), "unique_tokens")

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
        default=None,
        description="method joint: task mixture weights (default: data.joint_weighting)",
    )
    joint_weighting: Literal["budget", "size"] = Field(
        default="budget",
        description="method joint without joint_weights: mix tasks by their training budgets "
        "(the share sequential methods give each task) or by their shard sizes",
    )
    eval_only: list[str] = Field(
        default_factory=list,
        description="prepared tasks evaluated at every evaluation but never trained",
    )

    @field_validator("eval_only")
    @classmethod
    def _safe_eval_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError("task names use letters, digits, '_', '-', '.' only")
        return v

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
        trained = set(names) & set(self.eval_only)
        if trained:
            raise ValueError(
                f"{', '.join(sorted(trained))} is both trained (data.tasks) and evaluation-only "
                "(data.eval_only); list it in one of them"
            )
        dup = {n for n in self.eval_only if self.eval_only.count(n) > 1}
        if dup:
            raise ValueError(f"eval_only names must be unique; repeated: {', '.join(sorted(dup))}")
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
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 autocast where this machine computes it faster, else fp32",
    )
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


class DiagnosticsConfig(StrictModel):
    """Measurements that change nothing in training (a resume may change them)."""

    every: int = Field(
        default=0, ge=0, description="log cos(∇fresh, ∇reference) every N steps; 0 = off"
    )


class ReptileConfig(StrictModel):
    """The ``reptile:`` config section; defaults are the paper's (k=500, ε=0.1)."""

    enabled: bool = False
    k: int = Field(500, ge=1, description="meta-update period, in optimizer steps")
    epsilon: float = Field(0.1, gt=0.0, le=1.0, description="meta step size; 1 disables it")
    anchor_dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    anchor_device: Literal["same", "cpu"] = "same"
    reset_at_task_boundary: bool = False
    reset_optimizer_moments: bool = False
    variant: Literal["faithful", "official"] = Field(
        "faithful",
        description="faithful: interpolate the weights the optimizer steps; official: as the "
        "paper's code, only the next forward/backward sees them (the optimizer's copy is kept), "
        "on its schedule (after steps 1, k+1, 2k+1, ...; the anchor re-read at each task start)",
    )
    evaluate_weights: Literal["optimizer", "interpolated"] = Field(
        "optimizer",
        description="official only, when a task end falls between a meta-update and the next "
        "step: evaluate and export the optimizer's weights (what the official code evaluated) "
        "or the interpolated ones the next forward uses",
    )


class DistributedConfig(StrictModel):
    strategy: Literal["none", "ddp", "fsdp2"] = "none"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    activation_checkpointing: bool = False
    # FSDP2 on GPU: parameters cast to bf16 for compute, gradients reduced in fp32.
    mixed_precision: bool = Field(default=True, description="fsdp2 on GPU only")


class LoggingConfig(StrictModel):
    """Where training is mirrored besides metrics.jsonl (changes no number; a resume may)."""

    tensorboard: Literal["auto"] | bool = Field(
        default="auto",
        description="TensorBoard events under <run_dir>/tensorboard/; auto: when installed",
    )

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError("use auto, true or false")


class RunConfig(StrictModel):
    run_dir: str
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    method: str | None = Field(default=None, description=" | ".join(METHODS))
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    replay: ReplayConfig = ReplayConfig()
    reptile: ReptileConfig = ReptileConfig()
    regularize: RegularizeConfig = RegularizeConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    distributed: DistributedConfig = DistributedConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="before")
    @classmethod
    def _apply_method(cls, data: Any) -> Any:
        """A method preset fills replay/reptile defaults; explicit keys still win."""
        if not isinstance(data, dict):
            return data
        spec = METHODS.get(data["method"]) if isinstance(data.get("method"), str) else None
        if spec is None:
            return data  # no method, or an unknown one that the method check reports
        preset: dict[str, Any] = {
            "replay": {"alpha": spec.alpha}, "reptile": {"enabled": spec.reptile}
        }
        anchors = {"kl_to_start": spec.kl, "l2_to_start": spec.l2}
        preset["regularize"] = {k: {"weight": w} for k, w in anchors.items() if w > 0}
        return _merged(preset, data)

    @model_serializer(mode="wrap")
    def _anchors_when_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Runs that use no anchor dump as they did before the section existed.
        out = handler(self)
        if self.regularize == RegularizeConfig():
            out.pop("regularize", None)
        return out

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str | None) -> str | None:
        if v is not None and v not in METHODS:
            raise PydanticCustomError(
                "unknown_method",
                "unknown method {method}; choose one of {choices}",
                {"method": repr(v), "choices": ", ".join(METHODS)},
            )
        return v

    @field_validator("reptile", mode="before")
    @classmethod
    def _moved_keys(cls, v: Any) -> Any:
        if isinstance(v, dict) and "diagnostics_every" in v:
            raise PydanticCustomError(
                "moved_key", "reptile.diagnostics_every moved to diagnostics.every; rename the key"
            )
        return v

    @model_validator(mode="after")
    def _joint_alone(self) -> RunConfig:
        if self.sampler == "joint" and (self.replay.alpha > 0 or self.reptile.enabled):
            raise PydanticCustomError(
                "joint_exclusive",
                "method joint trains on an i.i.d. mixture and uses no replay or Reptile; drop "
                "replay.alpha / reptile.enabled or choose another method",
            )
        return self

    @model_validator(mode="after")
    def _replay_rows_exist(self) -> RunConfig:
        # An error, not a warning: the run would be sequential under a replay label.
        alpha, mode, b = self.replay.alpha, self.replay.mode, self.train.batch_size
        if alpha > 0 and mix_counts(alpha, b, mode)[1] == 0:
            need = math.ceil(Fraction(1, 2) / replay_share(alpha, mode))
            raise PydanticCustomError(
                "no_replayed_rows",
                "replay.alpha={alpha} replays round(α·{b}) = 0 rows a step, so the run would be "
                "sequential; raise train.batch_size to at least {need} or set alpha 0",
                {"alpha": alpha, "b": b, "need": need},
            )
        return self

    @model_validator(mode="after")
    def _anchor_rows_exist(self) -> RunConfig:
        check_anchors(self.regularize, alpha=self.replay.alpha, seeded=bool(self.replay.seed),
                      peak_lr=self.peak_lr, sharded=self.distributed.strategy == "fsdp2")
        return self

    @property
    def method_spec(self) -> MethodSpec | None:
        """The table row of ``method`` (None: replay and Reptile set by their own keys)."""
        return METHODS[self.method] if self.method is not None else None

    @property
    def sampler(self) -> Sampler:
        """How fresh rows are drawn: ``sequential`` (task by task) or ``joint`` (all at once)."""
        spec = self.method_spec
        return spec.sampler if spec is not None else "sequential"

    @property
    def peak_lr(self) -> float:
        return self.train.lr if self.train.lr is not None else DEFAULT_LR[self.model.preset]

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size

    @property
    def task_steps(self) -> tuple[int, ...]:
        """Optimizer steps of each task: its token budget over the tokens of one batch, rounded
        up (at least one). The one formula the trainer, sweeps and model cards use."""
        tokens_per_step = self.train.batch_size * self.train.seq_len
        return tuple(max(1, math.ceil(self.data.budget(t) / tokens_per_step))
                     for t in self.data.tasks)


# Config keys that change nothing about the numbers a run produces; a resume may change them.
_RUN_CONTROL_KEYS = {
    "checkpoint",
    "eval.every",
    "train.log_every",
    "train.threads",
    "train.compile",
    "replay.prefetch_mb",
    "diagnostics",  # measurements only
    "reptile.diagnostics_every",  # the old name of diagnostics.every, in older checkpoints
    "distributed",  # strategy/backend; the world size is checked on its own
    "run_dir",  # a moved run is the same run
    "replay.dir",
    "logging",  # where metrics are mirrored (TensorBoard)
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_NO_DEFAULT = object()


def _schema_default(key: str) -> Any:
    """The JSON value a run config takes for the dotted ``key`` when nothing sets it, or
    ``_NO_DEFAULT`` (no such key, or a required one)."""
    from pydantic import BaseModel, TypeAdapter

    model: Any = RunConfig
    *sections, leaf = key.split(".")
    for name in sections:
        field = model.model_fields.get(name)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return _NO_DEFAULT
    field = model.model_fields.get(leaf)
    if field is None or field.is_required():
        return _NO_DEFAULT
    value = field.get_default(call_default_factory=True, validated_data={})
    return TypeAdapter(field.annotation).dump_python(value, mode="json")


def result_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config (JSON dump) as dotted keys, without the keys that change nothing
    about a run's numbers (``_RUN_CONTROL_KEYS``)."""
    return {
        k: v
        for k, v in _flatten(config).items()
        if not any(k == c or k.startswith(c + ".") for c in _RUN_CONTROL_KEYS)
    }


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Result-changing keys whose values differ between two resolved configs (JSON dumps).

    A key the older config does not have came with a later cptrain, whose convention is a
    default that does what the code did before: at that default it is no difference, so
    upgrading cptrain neither blocks a resume nor retrains a finished sweep run. A run records
    the precision ``train.precision: auto`` resolved to, and ``auto`` keeps it, so ``auto`` in
    ``new`` matches either; an explicit precision must equal the recorded one."""
    train = new.get("train")
    if isinstance(train, dict) and train.get("precision") == "auto":
        kept = (old.get("train") or {}).get("precision", "auto")
        new = {**new, "train": {**train, "precision": kept}}
    a, b = result_settings(old), result_settings(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key not in a and key in b and b[key] == _schema_default(key):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: checkpoint has {a.get(key)!r}, config has {b.get(key)!r}")
    return diffs


def _merged(preset: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``preset``, section by section, down to the leaves (a value of the wrong
    type is kept for validation to report)."""
    out = dict(given)
    for key, values in preset.items():
        mine = out.get(key)
        if isinstance(values, dict) and (mine is None or isinstance(mine, dict)):
            out[key] = _merged(values, mine or {})
        elif key not in out:
            out[key] = values
    return out


def load_run_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return build_config(RunConfig, data, source=str(path) if path else "config")
