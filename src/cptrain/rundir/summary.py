"""``summary.json``, typed and versioned: what a finished (or stopped) run measured, and the
facts analysis reads instead of re-deriving them.

A summary carries ``format`` and ``version``. Summaries written before the version key existed
(version 1) are read through ``migrate``, the one place that knows what older cptrains wrote;
readers then see the current shape. Keys the model does not name are kept as they are (the
summary grows with the trainer; the model types what analysis relies on)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cptrain.errors import ConfigError
from cptrain.models.flops import run_flops

FORMAT = "cptrain-summary"
VERSION = 2  # 1: no format/version keys (cptrain before the run-directory reader)


class Summary(BaseModel):
    """The keys every reader of runs relies on; all others pass through unvalidated."""

    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    version: int = VERSION
    config: dict[str, Any]
    tasks: list[str] = []
    loss_matrix: list[list[float]] = []  # none before the first task ended (a stopped run)
    complete: bool = False
    eval_only: list[str] = []


def stamp(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as the trainer writes it: with its ``format`` and ``version``."""
    return {"format": FORMAT, "version": VERSION, **summary}


def migrate(raw: dict[str, Any], source: str = "summary") -> dict[str, Any]:
    """An older summary in the current shape (a copy; ``raw`` is left alone)."""
    out = dict(raw)
    version = out.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise ConfigError(f"{source}: version {version!r} is newer than this cptrain reads "
                          f"({VERSION}); upgrade cptrain")
    if version < 2:
        out.setdefault("format", FORMAT)
        out["version"] = VERSION
        # The config as given ("auto"): the precision it resolved to goes inside, as now.
        config = out["config"] if isinstance(out.get("config"), dict) else {}
        train, resolved = config.get("train"), out.get("precision")
        if isinstance(train, dict) and train.get("precision") == "auto" and resolved:
            out["config"] = {**config, "train": {**train, "precision": resolved}}
        # Before the history-based forgetting existed, "forgetting" was the task-end figure.
        if "forgetting" in out:
            out.setdefault("forgetting_task_end", out["forgetting"])
        if not isinstance(out.get("flops"), dict) and isinstance(out.get("config"), dict):
            # Before the trainer stored its accounting: computed from the facts it did store,
            # where it stored them (a ConfigError names what an even older one lacks).
            with contextlib.suppress(ConfigError, KeyError, ValueError, TypeError):
                out["flops"] = run_flops(out)
    return out


def read_summary(path: Path) -> dict[str, Any]:
    """The migrated summary at ``path`` (a summary.json file); ConfigError naming the file when
    it is missing, not JSON, or lacks what every run writes."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path.parent}: no {path.name}; pass a run directory made by "
                          "`cptrain train`") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"{path}: damaged {path.name} (not JSON); re-run the run") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: damaged {path.name} (not a JSON object); re-run the run")
    out = migrate(raw, str(path))
    try:
        Summary.model_validate(out)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(map(str, first["loc"]))
        raise ConfigError(f"{path}: {key}: {first['msg']}; re-run the run") from None
    return out
