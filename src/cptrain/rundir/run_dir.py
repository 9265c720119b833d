"""A run directory: its identity, its resolved config, its metrics log and its summary."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from cptrain import fsutil
from cptrain.checkpoint.layout import list_checkpoints, no_checkpoint
from cptrain.config import RunConfig
from cptrain.errors import ConfigError


class MetricsLog:
    """Append-only JSON lines; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # only rank 0 writes
        self._f = None

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if rec.get("step", 0) <= step and not rec.get("after_checkpoint_only"):
                kept.append(line)
        fsutil.atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def clear(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


ATTEMPTS = "attempts"  # earlier attempts of a restarted run: <run_dir>/attempts/<n>/

# How a run starts: False = a new run (the directory must not hold one), True = resume it,
# "restart" = move what the directory holds aside and start again, "auto" = resume when a
# checkpoint exists, else restart (what a requeued job wants).
StartMode = bool | Literal["auto", "restart"]


def set_aside(path: Path) -> Path | None:
    """Move everything in ``path`` but earlier attempts into ``path/attempts/<n>/`` (never
    deleted); the new folder, or None when there was nothing to move."""
    entries = sorted(p for p in path.iterdir() if p.name != ATTEMPTS) if path.is_dir() else []
    if not entries:
        return None
    root = path / ATTEMPTS
    root.mkdir(exist_ok=True)
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    dest = root / str(n)
    dest.mkdir()
    for entry in entries:
        fsutil.move_into_place(entry, dest / entry.name)
    fsutil.fsync_path(path)
    return dest


def check_start(path: Path, mode: StartMode) -> None:
    """ConfigError when the run directory cannot start as ``mode`` asks (no torch needed):
    a new run where one exists, or --resume where no checkpoint was ever written."""
    saved = list_checkpoints(path / "checkpoints")
    if mode is False and (saved or (path / "summary.json").exists()):
        raise ConfigError(
            f"run_dir {path} already holds a run; pass --resume to continue it, "
            "--restart to start it again (the old attempt is kept under attempts/), or "
            "choose a new run_dir"
        )
    if mode is True and not saved:
        raise no_checkpoint(path / "checkpoints")


def check_run_dirs(dirs: Sequence[Path]) -> None:
    """ConfigError for a path that is not a directory (`cptrain report`'s arguments), checked
    before anything heavy is imported or any output directory is made."""
    for root in map(Path, dirs):
        if not root.is_dir():
            raise ConfigError(f"{root} is not a directory; pass run or sweep directories")


def require_finished(run: Path) -> None:
    """ConfigError unless ``run`` holds a run's config.yaml and summary.json (torch-free)."""
    if not (run / "config.yaml").is_file() or not (run / "summary.json").is_file():
        raise ConfigError(f"{run} is not a finished cptrain run (no config.yaml / summary.json)")


class RunDir:
    @classmethod
    def open(cls, path: Path, env: Any, mode: StartMode) -> tuple[RunDir, bool]:
        """The run directory for ``mode`` and whether the run resumes; rank 0 moves an earlier
        attempt aside (``restart``, or ``auto`` without a checkpoint) while the others wait."""
        resume = mode
        if mode in ("auto", "restart"):
            if env.is_main:
                resume = mode == "auto" and bool(list_checkpoints(path / "checkpoints"))
                moved = None if resume else set_aside(path)
                if moved is not None:
                    print(f"the earlier attempt of this run is kept in {moved}")
            resume = env.broadcast_object(resume if env.is_main else None)
        return cls(path, resume=bool(resume), is_main=env.is_main), bool(resume)

    def __init__(self, path: Path, *, resume: bool, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"run_dir {self.path} is not writable ({exc.strerror}); choose another run_dir"
            ) from None
        check_start(self.path, resume)
        self.metrics = MetricsLog(self.path / "metrics.jsonl", enabled=is_main)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def task_model_dir(self, index: int, name: str) -> Path:
        return self.path / "models" / f"after_{index}_{name}"

    def attempt_run_id(self) -> str:
        """The run id of an attempt that died before its first checkpoint, else a new one, so
        that its replay directory is recognised (and emptied) rather than refused."""
        path = self.path / "run_id"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            old = path.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{32}", old):
                return old
        new = uuid.uuid4().hex
        fsutil.atomic_write_text(path, new + "\n")
        return new

    def write_config(self, cfg: RunConfig) -> None:
        if self.is_main:
            resolved = cfg.model_dump(mode="json")
            fsutil.atomic_write_text(
                self.path / "config.yaml", yaml.safe_dump(resolved, sort_keys=False)
            )

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            fsutil.atomic_write_json(self.summary_path, summary)
