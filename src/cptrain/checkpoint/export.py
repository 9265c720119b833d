"""The one Hugging Face export: a ``from_pretrained`` directory of a model's full weights.

Used for the model inside every checkpoint, for ``models/after_<i>_<task>/`` and for
``cptrain export``. Under torchrun the full weights are gathered onto rank 0, which writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from cptrain import fsutil
from cptrain.distributed import DistEnv
from cptrain.errors import EnvironmentProblem


def copy_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    if tokenizer_dir is None:
        return
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, Path(out) / f.name)


def full_state_dict(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The gathered weights under torchrun (collective: every rank calls it), else None."""
    if not env.active:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def write_model_dir(
    model: torch.nn.Module,
    out: Path,
    tokenizer_dir: Path | None,
    full: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights (safetensors), config and tokenizer files into the new directory ``out``.

    ``full`` is the gathered state of a sharded model; without it the module saves itself
    (``save_pretrained`` keeps tied embeddings tied)."""
    out = Path(out)
    if full is None:
        model.save_pretrained(out, safe_serialization=True)
    else:
        out.mkdir(parents=True)
        tensors = {k: v.contiguous() for k, v in full.items()}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(out)  # type: ignore[attr-defined]
    copy_tokenizer(tokenizer_dir, out)


def export_model(
    model: torch.nn.Module, env: DistEnv, out: Path, tokenizer_dir: Path | None
) -> None:
    """Write ``out`` atomically (temp sibling, then rename over any old copy); collective."""
    full = full_state_dict(model, env)
    if env.is_main:
        out = Path(out)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = fsutil.temp_sibling(out)
        try:
            write_model_dir(model, tmp, tokenizer_dir, full)
            fsutil.fsync_tree(tmp)
            fsutil.replace_dir(tmp, out)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            code = fsutil.disk_full_errno(exc)
            if code:
                raise EnvironmentProblem(
                    f"disk full while exporting {out} ({os.strerror(code)}); free space, then "
                    "resume with --resume"
                ) from None
            raise
    env.barrier()


def export_checkpoint(path: Path, out: Path) -> None:
    """Copy the model of checkpoint ``path`` (already a Hugging Face directory) to ``out``."""
    out = Path(out)
    tmp = fsutil.temp_sibling(out)
    try:
        shutil.copytree(Path(path) / "model", tmp)
        fsutil.fsync_tree(tmp)
        fsutil.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
