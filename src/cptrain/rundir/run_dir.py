"""A run directory, the seam between training and everything that reads runs: the trainer
writes its identity, resolved config, metrics log, task models and summary through ``RunDir``;
report, downstream, merge, sweep, doctor and ``cptrain eval`` read them through the same class
(``RunDir.open``), so no other module parses these files or builds their names."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from cptrain import fsutil
from cptrain.config import RunConfig
from cptrain.errors import ConfigError
from cptrain.rundir import layout
from cptrain.rundir.layout import list_checkpoints, no_checkpoint
from cptrain.rundir.summary import read_summary, stamp


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


ATTEMPTS = layout.ATTEMPTS

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
    saved = list_checkpoints(path / layout.CHECKPOINTS)
    if mode is False and (saved or (path / layout.SUMMARY).exists()):
        raise ConfigError(
            f"run_dir {path} already holds a run; pass --resume to continue it, "
            "--restart to start it again (the old attempt is kept under attempts/), or "
            "choose a new run_dir"
        )
    if mode is True and not saved:
        raise no_checkpoint(path / layout.CHECKPOINTS)


def check_run_dirs(dirs: Sequence[Path]) -> None:
    """ConfigError for a path that is not a directory (`cptrain report`'s arguments), checked
    before anything heavy is imported or any output directory is made."""
    for root in map(Path, dirs):
        if not root.is_dir():
            raise ConfigError(f"{root} is not a directory; pass run or sweep directories")


def find_runs(root: Path) -> Iterator[RunDir]:
    """``root`` if it is a run (it holds a summary), else the runs below it, in sorted order; a
    run's own subfolders (checkpoints, exported models) and a restarted run's earlier attempts
    are not searched."""
    for dirpath, dirnames, filenames in os.walk(root):
        if layout.SUMMARY in filenames:
            dirnames.clear()
            yield RunDir(Path(dirpath), is_main=False)
        else:
            dirnames[:] = sorted(d for d in dirnames if d != layout.ATTEMPTS)


def require_finished(run: Path) -> None:
    """ConfigError unless ``run`` holds a run's config.yaml and summary.json (torch-free)."""
    if not (run / layout.CONFIG).is_file() or not (run / layout.SUMMARY).is_file():
        raise ConfigError(f"{run} is not a finished cptrain run (no {layout.CONFIG} / "
                          f"{layout.SUMMARY})")


class RunDir:
    """One run directory. ``RunDir.open(path)`` reads a run (nothing is created or changed);
    ``RunDir.start(path, env, mode)`` prepares one for training and writes it."""

    def __init__(self, path: Path, *, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main  # only rank 0 writes
        self.metrics = MetricsLog(self.path / layout.METRICS, enabled=is_main)

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, path: Path) -> RunDir:
        """A run directory to read; ConfigError when ``path`` is none."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path} does not exist; pass the run_dir of a `cptrain train` run")
        return cls(path, is_main=False)

    def summary(self) -> dict[str, Any]:
        """summary.json in the current shape (older versions migrated); ConfigError when it is
        missing or damaged."""
        return read_summary(self.summary_path)

    def finished(self) -> bool:
        """Whether the run trained to its end (a readable summary that says so)."""
        try:
            return bool(self.summary().get("complete"))
        except ConfigError:
            return False

    def config(self) -> dict[str, Any]:
        """The resolved config the run trained with (config.yaml), as a dict."""
        try:
            data = yaml.safe_load((self.path / layout.CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            raise ConfigError(f"{self.path}: no readable {layout.CONFIG}; pass the run_dir of "
                              "a `cptrain train` run") from None
        return data if isinstance(data, dict) else {}

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records in order (a line torn by a kill is skipped)."""
        path = self.path / layout.METRICS
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def task_models(self) -> list[Path]:
        """``models/after_<i>_<task>/`` directories, in task order."""
        root = self.path / layout.MODELS
        found = [(parsed[0], p) for p in root.iterdir() if p.is_dir()
                 and (parsed := layout.parse_task_model_name(p.name))] if root.is_dir() else []
        return [p for _, p in sorted(found)]

    def final_model(self) -> Path | None:
        """The model after the last trained task, or None before the run has one."""
        models = self.task_models()
        return models[-1] if models else None

    def downstream_results(self) -> dict[str, Any]:
        """lm-eval scores of the newest evaluated task model (``downstream/after_<i>_<task>.json``
        files, by task index), or {} before any; an unreadable file is passed over."""
        root = self.path / layout.DOWNSTREAM
        found = [(parsed[0], f) for f in root.glob("*.json")
                 if (parsed := layout.parse_task_model_name(f.stem))] if root.is_dir() else []
        for _, f in sorted(found, reverse=True):
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                return dict(json.loads(f.read_text(encoding="utf-8")).get("tasks", {}))
        return {}

    def merge_curve(self) -> dict[str, Any] | None:
        """``cptrain merge``'s result (``merge/merge.json``: rows of λ with their losses), or
        None where the run has none or it cannot be read."""
        with contextlib.suppress(OSError, ValueError):
            found = json.loads((self.path / layout.MERGE / "merge.json").read_text("utf-8"))
            if isinstance(found, dict) and isinstance(found.get("rows"), list):
                return found
        return None

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, directory) of every checkpoint, oldest first (complete or not)."""
        return list_checkpoints(self.path / layout.CHECKPOINTS)

    # ------------------------------------------------------------------ writing
    @classmethod
    def start(cls, path: Path, env: Any, mode: StartMode) -> tuple[RunDir, bool]:
        """The run directory for ``mode`` and whether the run resumes; rank 0 moves an earlier
        attempt aside (``restart``, or ``auto`` without a checkpoint) while the others wait."""
        resume = mode
        if mode in ("auto", "restart"):
            if env.is_main:
                resume = mode == "auto" and bool(list_checkpoints(path / layout.CHECKPOINTS))
                moved = None if resume else set_aside(path)
                if moved is not None:
                    print(f"the earlier attempt of this run is kept in {moved}")
            resume = env.broadcast_object(resume if env.is_main else None)
        run = cls(path, is_main=env.is_main)
        run._prepare(bool(resume))
        return run, bool(resume)

    def _prepare(self, resume: bool) -> None:
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

    @property
    def checkpoint_root(self) -> Path:
        return self.path / layout.CHECKPOINTS

    @property
    def summary_path(self) -> Path:
        return self.path / layout.SUMMARY

    def task_model_dir(self, index: int, name: str) -> Path:
        return layout.task_model_dir(self.path, index, name)

    def attempt_run_id(self) -> str:
        """The run id of an attempt that died before its first checkpoint, else a new one, so
        that its replay directory is recognised (and emptied) rather than refused."""
        path = self.path / layout.RUN_ID
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
                self.path / layout.CONFIG, yaml.safe_dump(resolved, sort_keys=False)
            )

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            fsutil.atomic_write_json(self.summary_path, stamp(summary))
