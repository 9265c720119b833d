"""Atomic, verifiable checkpoints: one directory is one consistent moment of a run.

Layout of ``<run_dir>/checkpoints/step_<N>/``:
  model/            Hugging Face ``save_pretrained`` directory (safetensors) + tokenizer files
  optimizer.safetensors   optimizer tensors and the CPU RNG state; the optimizer's plain values
                    (param groups, hyper-parameters) travel as JSON in the file's metadata
  tensors/*.safetensors   other components' tensors (e.g. the Reptile anchor)
  state.json        trainer counters and every component's JSON state
  MANIFEST.json     size and sha256 of every file above; written last, so its presence (and a
                    match) is what makes a checkpoint complete

Nothing is pickled: tensors are safetensors, everything else JSON. (Checkpoints of earlier
versions hold ``optimizer.pt``; it is still read, with ``torch.load(weights_only=True)``.)

The directory is built under a temporary name, fsynced, then renamed into place. A full disk
during any of it raises ``EnvironmentProblem`` and leaves the older checkpoints untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file
from safetensors.torch import save as safetensors_bytes

from cptrain import fsutil
from cptrain.errors import CheckpointError, EnvironmentProblem
from cptrain.rundir.layout import STEP_DIR, list_checkpoints

FORMAT = "cptrain-checkpoint-v1"
OPTIMIZER_FILE = "optimizer.safetensors"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
_OLD_DIR = re.compile(r"^\.old-step_(\d+)-\d+$")
_TMP_DIR = re.compile(r"^\.tmp-step_(\d+)")
_META_KEY = "cptrain"


# ---------------------------------------------------------------- optimizer (no pickle)
def _to_json(
    value: Any, tensors: dict[str, torch.Tensor], name: str, *, to_cpu: bool = True
) -> Any:
    """JSON form of a plain value; tensors go to ``tensors`` under ``name`` (a placeholder
    stays), tuples are marked so that they come back as tuples. ``to_cpu=False`` keeps the
    tensors themselves (sharded checkpoints save and load DTensors in place)."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().contiguous().cpu() if to_cpu else value
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {
            "__tuple__": [
                _to_json(v, tensors, f"{name}/{i}", to_cpu=to_cpu) for i, v in enumerate(value)
            ]
        }
    if isinstance(value, list):
        return [_to_json(v, tensors, f"{name}/{i}", to_cpu=to_cpu) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            str(k): _to_json(v, tensors, f"{name}/{k}", to_cpu=to_cpu) for k, v in value.items()
        }
    return value


def split_state(
    state: Any, name: str, *, to_cpu: bool = True
) -> tuple[Any, dict[str, torch.Tensor]]:
    """A component's ``state_dict()`` as (JSON with placeholders, flat named tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    return _to_json(state, tensors, name, to_cpu=to_cpu), tensors


def join_state(plain: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``split_state``; a placeholder without its tensor means a damaged checkpoint."""
    try:
        return _from_json(plain, tensors)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint lacks tensor {exc.args[0]!r}; it is damaged") from None


def _from_json(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v, tensors) for v in value["__tuple__"])
        return {k: _from_json(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    return value


def pack_optimizer(optimizer_state: Mapping[str, Any], rng_cpu: torch.Tensor) -> bytes:
    """An optimizer ``state_dict()`` and the CPU RNG state as one safetensors blob: tensors
    as tensors, everything else as JSON in the file's metadata."""
    tensors: dict[str, torch.Tensor] = {"rng_cpu": rng_cpu.detach().contiguous().cpu()}
    meta = {
        "state": {
            str(pid): _to_json(per_param, tensors, f"state/{pid}")
            for pid, per_param in optimizer_state["state"].items()
        },
        "param_groups": _to_json(optimizer_state["param_groups"], tensors, "groups"),
    }
    return safetensors_bytes(tensors, metadata={_META_KEY: json.dumps(meta)})


def unpack_optimizer(data: bytes, metadata_json: str) -> dict[str, Any]:
    """Inverse of ``pack_optimizer``: {"optimizer": state_dict, "rng_cpu": tensor}."""
    tensors = load(data)
    meta = json.loads(metadata_json)
    state = {int(pid): _from_json(v, tensors) for pid, v in meta["state"].items()}
    groups = _from_json(meta["param_groups"], tensors)
    return {"optimizer": {"state": state, "param_groups": groups}, "rng_cpu": tensors["rng_cpu"]}


def _metadata_of(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__") or {}


# --------------------------------------------------------------------------- reading
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
        """{"optimizer": optimizer state_dict, "rng_cpu": CPU RNG state}."""
        new, old = self.path / OPTIMIZER_FILE, self.path / LEGACY_OPTIMIZER_FILE
        target = new if new.is_file() or not old.is_file() else old
        try:
            if target == old:
                return torch.load(old, weights_only=True, map_location="cpu")
            data = new.read_bytes()
            return unpack_optimizer(data, _metadata_of(data)[_META_KEY])
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
            raise CheckpointError(
                f"{target}: unreadable ({type(exc).__name__}); resume from an older checkpoint"
            ) from None

    def tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        f = self.path / "tensors" / f"{name}.safetensors"
        return load_file(f) if f.is_file() else None

    def component(self, name: str) -> Any:
        """A component's saved ``state_dict()`` (None when the checkpoint has none)."""
        plain = self.state.get(name)
        if plain is None:
            return None
        return join_state(plain, self.tensors(name) or {})


# --------------------------------------------------------------------------- writing
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
    """Write checkpoint ``step`` atomically and prune old ones; returns its directory."""
    root = Path(root)
    final = root / f"step_{step:09d}"
    tmp = root / f".tmp-step_{step:09d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_contents(tmp, step, model, tokenizer_dir, optimizer, state, tensors)
        publish(root, tmp, final, step)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        code = fsutil.disk_full_errno(exc)
        if code is None:
            raise
        raise disk_full_error(root, final, code) from None
    prune(root, keep_last, protect=final)
    return final


def disk_full_error(root: Path, final: Path, code: int) -> EnvironmentProblem:
    newest, _ = latest_complete(root, full=False, repair=False)
    kept = f"the newest complete one, {newest.name}, is intact" if newest else "none is complete"
    return EnvironmentProblem(
        f"disk full while writing checkpoint {final} ({os.strerror(code)}); free space, then "
        f"resume with --resume ({kept})"
    )


def _write_contents(
    tmp: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer_dir: Path | None,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None,
) -> None:
    from cptrain.checkpoint.export import write_model_dir

    write_model_dir(model, tmp / "model", tokenizer_dir)
    optimizer_blob = pack_optimizer(optimizer.state_dict(), torch.get_rng_state())
    fsutil.write_new_file(tmp / OPTIMIZER_FILE, optimizer_blob)
    if tensors:
        (tmp / "tensors").mkdir()
        for name, group in tensors.items():
            contiguous = {k: v.detach().contiguous().cpu() for k, v in group.items()}
            fsutil.write_new_file(
                tmp / "tensors" / f"{name}.safetensors", safetensors_bytes(contiguous)
            )
    fsutil.atomic_write_json(tmp / "state.json", {"format": FORMAT, "step": step, **state})
    seal(tmp, step)


def seal(tmp: Path, step: int) -> None:
    """fsync every file, write MANIFEST.json (sizes, sha256) last, fsync every directory:
    after this, ``tmp`` is a complete checkpoint ready for ``publish``."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for f in files:
        fsutil.fsync_path(f)
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": {
            str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": fsutil.sha256_file(f)}
            for f in files
        },
    }
    fsutil.atomic_write_json(tmp / "MANIFEST.json", manifest)
    for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        fsutil.fsync_path(d)


def publish(root: Path, tmp: Path, final: Path, step: int) -> None:
    """Rename a finished temporary checkpoint directory into place (fsynced).

    The same step saved twice (a resumed run re-saving over a damaged copy) moves the old copy
    aside first; a kill between the two renames is repaired on resume (``_repair``)."""
    fsutil.replace_dir(tmp, final, aside=root / f".old-step_{step:09d}-{os.getpid()}")


# ----------------------------------------------------------------------- verification
_REQUIRED = ("state.json",)


def verify(path: Path, *, full: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else a one-line reason."""
    path = Path(path)
    mf = path / "MANIFEST.json"
    if not mf.is_file():
        return "no MANIFEST.json (incomplete write)"
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = manifest["step"]
        entries = [(str(rel), int(m["bytes"]), str(m["sha256"])) for rel, m in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            AttributeError):
        return "MANIFEST.json is damaged"
    name = STEP_DIR.match(path.name)
    if name and int(name.group(1)) != step:
        return f"MANIFEST.json is for step {step}, not {int(name.group(1))}"
    listed = {rel for rel, _, _ in entries}
    missing = [r for r in _REQUIRED if r not in listed]
    if not any(r.startswith("model/") and r.endswith(".safetensors") for r in listed):
        missing.append("model/*.safetensors")
    sharded = any(r.startswith("dcp/") for r in listed)  # torchrun runs: optimizer in DCP
    if OPTIMIZER_FILE not in listed and LEGACY_OPTIMIZER_FILE not in listed and not sharded:
        missing.append(OPTIMIZER_FILE)
    if missing:
        return f"MANIFEST.json does not list {', '.join(missing)}"
    for rel, size, digest in entries:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"MANIFEST.json names a file outside the checkpoint ({rel})"
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        found = f.stat().st_size
        if found != size:
            return f"{rel} has {found} bytes, expected {size}"
        if full and fsutil.sha256_file(f) != digest:
            return f"{rel} fails its sha256 check"
    return None


def leftovers(root: Path) -> list[Path]:
    """Temporary directories that interrupted saves left behind (safe to delete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _TMP_DIR.match(p.name) or _OLD_DIR.match(p.name))


def interrupted_resaves(root: Path) -> list[tuple[int, Path]]:
    """Copies moved aside by a re-save of the same step that was killed before its new copy
    was renamed into place: (step, moved-aside directory) where ``step_<N>`` is missing."""
    root = Path(root)
    present = {s for s, _ in list_checkpoints(root)}
    out = []
    for p in leftovers(root):
        m = _OLD_DIR.match(p.name)
        if m and int(m.group(1)) not in present:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _repair(root: Path) -> None:
    for step, old in interrupted_resaves(root):
        if verify(old, full=False) is None:
            fsutil.move_into_place(old, Path(root) / f"step_{step:09d}")


def latest_complete(
    root: Path, *, full: bool = True, repair: bool = True
) -> tuple[Path | None, list[str]]:
    """Newest checkpoint (by step number) that verifies; also the reasons others were skipped.

    With ``repair`` a copy that an interrupted re-save moved aside is first put back."""
    if repair:
        _repair(root)
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
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        step = int(state["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"checkpoint {path}: state.json is not a checkpoint state; resume from an older one"
        ) from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {state.get('format')!r}")
    return Checkpoint(path=path, step=step, state=state)


# ---------------------------------------------------------------------------- pruning
def prune(root: Path, keep_last: int, *, protect: Path | None = None) -> None:
    """Keep the newest ``keep_last`` intact checkpoints (``protect`` among them) and delete the
    intact ones older than all of those, plus the leftovers of interrupted saves.

    Damaged checkpoints never count as kept and are left for ``cptrain doctor`` to report. The
    protected checkpoint was just written and hashed; without one, at least one kept checkpoint
    must pass a full sha256 check, so pruning can never leave only damaged checkpoints."""
    root = Path(root)
    _repair(root)
    good = [(s, p) for s, p in reversed(list_checkpoints(root)) if verify(p, full=False) is None]
    keep: dict[Path, int] = {}
    protected = Path(protect).resolve() if protect is not None else None
    need_full = protected is None
    for step, path in good:
        if path.resolve() == protected:
            keep[path.resolve()] = step
    for step, path in good:
        if len(keep) >= max(keep_last, 1) and not need_full:
            break
        if need_full and verify(path, full=True) is not None:
            continue
        need_full = False
        keep[path.resolve()] = step
    if not keep:
        return  # nothing verifiably intact: delete nothing
    oldest_kept = min(keep.values())
    for step, path in good:
        if path.resolve() not in keep and step < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)
    for stale in leftovers(root):
        with contextlib.suppress(OSError):
            shutil.rmtree(stale, ignore_errors=True)
