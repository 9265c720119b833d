"""Atomic, verifiable checkpoints: one directory is one consistent moment of a run.

Layout of ``<run_dir>/checkpoints/step_<N>/``:
  model/            Hugging Face ``save_pretrained`` directory (safetensors) + tokenizer files
  optimizer.pt      optimizer state and RNG states, tensors only (loaded with weights_only=True)
  tensors/*.safetensors   other components' tensors (e.g. the Reptile anchor)
  state.json        trainer counters and every component's JSON state
  MANIFEST.json     size and sha256 of every file above; written last, so its presence (and a
                    match) is what makes a checkpoint complete

The directory is built under a temporary name, fsynced, then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cptrain.errors import CheckpointError

FORMAT = "cptrain-checkpoint-v1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def model_state(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.model_dir}: no safetensors weights; checkpoint damaged")
        for f in files:
            tensors.update(load_file(f))
        return tensors

    def optimizer_blob(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / "optimizer.pt", weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise CheckpointError(
                f"{self.path / 'optimizer.pt'}: unreadable ({type(exc).__name__}); "
                "resume from an older checkpoint"
            ) from None

    def tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        f = self.path / "tensors" / f"{name}.safetensors"
        return load_file(f) if f.is_file() else None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer_dir: Path | None,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    keep_last: int = 2,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = root / f".tmp-step_{step:09d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / "model" / f.name)
        blob = {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}
        torch.save(blob, tmp / "optimizer.pt")
        if tensors:
            (tmp / "tensors").mkdir()
            for name, group in tensors.items():
                contiguous = {k: v.detach().contiguous().cpu() for k, v in group.items()}
                save_file(contiguous, tmp / "tensors" / f"{name}.safetensors")
        atomic_write_json(tmp / "state.json", {"format": FORMAT, "step": step, **state})
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for f in files:
            _fsync_path(f)
        manifest = {
            "format": FORMAT,
            "step": step,
            "files": {
                str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                for f in files
            },
        }
        atomic_write_json(tmp / "MANIFEST.json", manifest)
        for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            _fsync_path(d)
        if final.exists():
            # The same step saved twice (e.g. a resumed run re-saving): replace the old copy only
            # after the new one is complete.
            old = root / f".old-step_{step:09d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last, protect=final)
    return final


def verify(path: Path, *, full: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else a one-line reason."""
    mf = path / "MANIFEST.json"
    if not mf.is_file():
        return "no MANIFEST.json (incomplete write)"
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "MANIFEST.json is damaged"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != meta["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, expected {meta['bytes']}"
        if full and sha256_file(f) != meta["sha256"]:
            return f"{rel} fails its sha256 check"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(root: Path, *, full: bool = True) -> tuple[Path | None, list[str]]:
    """Newest checkpoint (by step number) that verifies; also the reasons others were skipped."""
    skipped = []
    for _step, path in reversed(list_checkpoints(root)):
        reason = verify(path, full=full)
        if reason is None:
            return path, skipped
        skipped.append(f"{path.name}: {reason}")
    return None, skipped


def load_checkpoint(path: Path) -> Checkpoint:
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {reason}; resume from an older one")
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {state.get('format')!r}")
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def prune(root: Path, keep_last: int, *, protect: Path | None = None) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last``; never the protected one,
    never an incomplete one's newer sibling, and never the last complete one."""
    complete = [(s, p) for s, p in list_checkpoints(root) if (p / "MANIFEST.json").is_file()]
    excess = complete[:-keep_last] if keep_last > 0 else []
    for _, p in excess:
        if protect is not None and p.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
    for stale in Path(root).glob(".tmp-step_*"):
        with contextlib.suppress(OSError):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)
