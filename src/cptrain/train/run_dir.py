"""A run directory: its identity, its resolved config, its metrics log and its summary."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import yaml

from cptrain import fsutil
from cptrain.checkpoint import list_checkpoints
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


class RunDir:
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
        if not resume and (list_checkpoints(self.checkpoints) or self.summary_path.exists()):
            raise ConfigError(
                f"run_dir {self.path} already holds a run; pass --resume to continue it, "
                "or choose a new run_dir"
            )
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
