"""Where checkpoints lie in a run directory, readable without torch (``cptrain train`` checks a
run directory before it imports torch, so that a mistake there is reported at once)."""

from __future__ import annotations

import re
from pathlib import Path

from cptrain.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d+)$")


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
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)
