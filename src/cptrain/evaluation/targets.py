"""Which model a downstream evaluation means, and the window and tokenizer it is scored with.

A target may be a run directory, one of its ``models/after_<i>_<task>/`` exports, a training
checkpoint ``checkpoints/step_<n>/`` or any Hugging Face model directory; when it lies inside a
run, the run's config says which data its local tasks come from. The window (``max_length``)
and the token counts come from the model directory alone, so a copied-out model gets the same
items as it did inside its run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptrain.errors import CheckpointError, ConfigError
from cptrain.rundir import layout
from cptrain.rundir.run_dir import RunDir


def token_counter(model_dir: Path) -> Callable[[str], int]:
    """Tokens of a string as lm-eval's ``hf`` model counts them: the model directory's own
    tokenizer, with its default special tokens (a BOS where the tokenizer adds one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({first})") from None
    return lambda text: len(tok.encode(text))


def model_max_length(model_dir: Path) -> int:
    """The window lm-eval's ``hf`` model uses without ``max_length``: the model config's
    positions (``n_positions``, ``max_position_embeddings``, ``n_ctx``), else 2048."""
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            if isinstance(config.get(key), int) and config[key] > 0:
                return int(config[key])
    return 2048

# --------------------------------------------------------------------------- model lookup
@dataclass(frozen=True)
class Target:
    """What to evaluate: an HF model directory and, when it belongs to a run, that run."""

    model_dir: Path
    run_dir: Path | None
    config: dict[str, Any] | None  # the run's resolved config


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    run = RunDir(run_dir)
    if not (run.path / layout.CONFIG).is_file():
        return None
    with contextlib.suppress(ConfigError):
        return run.config()
    return None


def _final_model(run_dir: Path) -> Path | None:
    models = [p for p in RunDir(run_dir).task_models() if (p / "config.json").is_file()]
    return models[-1] if models else None


def resolve_target(path: Path) -> Target:
    """A run directory (its last exported model), ``models/after_*``, ``checkpoints/step_N``
    (its ``model/``), or any Hugging Face ``save_pretrained`` directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run directory or a model directory")
    if (path / layout.MODELS).is_dir() or (path / layout.SUMMARY).is_file():
        model = _final_model(path)
        if model is None:
            raise CheckpointError(
                f"{path} has no exported model (models/after_*/); let the run finish its first "
                "task, or pass a model directory"
            )
        return Target(model, path, _run_config(path))
    if (path / "model" / "config.json").is_file():  # a training checkpoint
        path = path / "model"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a run "
            "directory, models/after_<i>_<task>/ or checkpoints/step_<n>/"
        )
    run_dir = next((p for p in path.parents if (p / layout.CONFIG).is_file()), None)
    return Target(path, run_dir, _run_config(run_dir) if run_dir else None)
