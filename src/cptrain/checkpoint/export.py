"""The one Hugging Face export: a ``from_pretrained`` directory of a model's full weights.

Used for the model inside every checkpoint, for ``models/after_<i>_<task>/`` and for
``cptrain export``. Under torchrun the full weights are gathered onto rank 0, which writes.
The exported directories (not the checkpoints' own ``model/``) carry a Hugging Face model card,
``README.md``, written in the same temporary directory as the weights (the card itself is a
report: ``cptrain.report.model_card``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cptrain import fsutil
from cptrain.distributed import DistEnv

# The card is written here but made in report/; callers (hooks, tests) import it from here.
from cptrain.report.model_card import CARD, model_card
from cptrain.report.model_card import base_model_facts as base_model_facts


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
        # What save_pretrained would have written: the class to load (fully_shard renames it
        # FSDP<class>), the weights' dtype and the generation defaults (EOS to stop at).
        config = model.config  # type: ignore[attr-defined]
        name = type(model).__name__.removeprefix("FSDP")
        config.architectures = config.architectures or [name]
        config.dtype = next(iter(tensors.values())).dtype
        config.save_pretrained(out)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    for f in out.iterdir():
        # safetensors writes its file 0600: another user or a serving container could not
        # read the weights beside a 0644 config.
        if f.is_file():
            f.chmod(0o644)


def export_model(
    model: torch.nn.Module,
    env: DistEnv,
    out: Path,
    tokenizer_dir: Path | None,
    card: str | None = None,
    base: str | None = None,
) -> None:
    """Write ``out`` atomically (temp sibling, then rename over any old copy); collective.
    ``card``, when given, becomes its ``README.md``; ``base`` (``model.init_from``) gives its
    licence files."""
    full = full_state_dict(model, env)
    if env.is_main:
        with fsutil.built_dir(out, what=f"exporting {out}",
                              fix="free space, then resume with --resume") as tmp:
            write_model_dir(model, tmp, tokenizer_dir, full)
            if card is not None:
                fsutil.atomic_write_text(tmp / CARD, card)
            copy_base_licence(base, tmp)
    env.barrier()


_LICENCE_FILES = ("LICENSE*", "LICENCE*", "NOTICE*", "COPYING*")


def copy_base_licence(base: str | None, out: Path) -> None:
    """The base model's licence files beside weights derived from it (its licence asks for
    them to travel with the weights); nothing for a fresh model or a .gguf file."""
    if not base or not Path(base).is_dir():
        return
    for pattern in _LICENCE_FILES:
        for f in sorted(Path(base).glob(pattern)):
            if f.is_file() and not (Path(out) / f.name).exists():
                shutil.copy2(f, Path(out) / f.name)
                (Path(out) / f.name).chmod(0o644)


def export_checkpoint(path: Path, out: Path) -> None:
    """Copy the model of checkpoint ``path`` (already a Hugging Face directory) to ``out``,
    with the model card of those weights (from the checkpoint's config and trainer state)."""
    out = Path(out)
    state: Any = None
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    card = None
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        card = model_card(state["config"], state.get("trainer") or {})
    with fsutil.built_dir(out, what=f"exporting {out}", fix="free space and run it again") as tmp:
        shutil.copytree(Path(path) / "model", tmp)
        if card is not None:
            fsutil.atomic_write_text(tmp / CARD, card)
            copy_base_licence(state["config"].get("model", {}).get("init_from"), tmp)

