"""The names inside a run directory, in one place: every reader and writer of runs builds them
here, so a run written by one command is found by every other (torch-free)."""

from __future__ import annotations

import re
from pathlib import Path

from cptrain.errors import CheckpointError

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODELS = "models"
MERGE = "merge"  # `cptrain merge`: merge/merge.json (+ .md, .png)
DOWNSTREAM = "downstream"  # lm-eval results per task model: downstream/after_<i>_<task>.json
RUN_ID = "run_id"
ATTEMPTS = "attempts"  # earlier attempts of a restarted run: <run_dir>/attempts/<n>/

_TASK_MODEL = re.compile(r"^after_(\d+)_(.+)$")
STEP_DIR = re.compile(r"^step_(\d+)$")  # checkpoints/step_<N>/


def task_model_name(index: int, task: str) -> str:
    """``after_<i>_<task>``: the weights after the i-th task (0-based), the name of the model
    directory under ``models/`` and of its downstream results."""
    return f"after_{index}_{task}"


def parse_task_model_name(name: str) -> tuple[int, str] | None:
    """(index, task) of an ``after_<i>_<task>`` name, or None for any other name."""
    m = _TASK_MODEL.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def task_model_dir(run: Path, index: int, task: str) -> Path:
    return Path(run) / MODELS / task_model_name(index, task)


def no_checkpoint(root: Path) -> CheckpointError:
    """What --resume says where nothing can be resumed (none written, or all damaged)."""
    return CheckpointError(
        f"--resume: no complete checkpoint under {root}; start the run again with --restart "
        "(what the run_dir holds is kept under attempts/)"
    )


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every ``step_<N>`` directory, sorted by step number."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)
