"""Checkpoints of a multi-process run: DCP shards plus a gathered Hugging Face export.

Layout of ``<run_dir>/checkpoints/step_<N>/`` when ``distributed.strategy`` is ddp or fsdp2:
  dcp/          torch.distributed.checkpoint: model, optimizer and Reptile anchors, each rank
                writing its own shards (FSDP2 DTensors keep their sharding)
  model/        full weights gathered on rank 0 (safetensors + config + tokenizer), so the
                checkpoint loads with ``from_pretrained`` and lm-eval like a single-process one
  state.json    trainer counters, world size and every rank's own state (data cursors are
                global; replay-buffer lengths are per rank)
  MANIFEST.json sizes and checksums, written last by rank 0
Every rank writes into the same temporary directory; rank 0 renames it into place after a
barrier, so a kill at any moment leaves either the old or the new checkpoint complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from cptrain import checkpoint as ckpt
from cptrain.distributed import DistEnv
from cptrain.errors import CheckpointError


def _full_state_dict(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    if not env.active:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export_hf(
    model: torch.nn.Module, env: DistEnv, out: Path, tokenizer_dir: Path | None
) -> None:
    """A ``from_pretrained`` directory of the full weights; collective under torchrun."""
    full = _full_state_dict(model, env)
    if env.is_main:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp-export")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {k: v.contiguous() for k, v in full.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    env.barrier()


def save(
    root: Path,
    step: int,
    env: DistEnv,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer_dir: Path | None,
    state: Mapping[str, Any],
    rank_state: Mapping[str, Any],
    anchors: Mapping[str, torch.Tensor] | None,
    keep_last: int,
) -> Path:
    root = Path(root)
    final = root / f"step_{step:09d}"
    tmp = root / f".tmp-step_{step:09d}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    env.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if anchors:
        payload["reptile"] = dict(anchors)
    dcp.save(payload, checkpoint_id=str(tmp / "dcp"))
    export_hf(model, env, tmp / "model", tokenizer_dir)
    ranks = env.all_gather_object(dict(rank_state))
    if env.is_main:
        ckpt.atomic_write_json(
            tmp / "state.json",
            {
                "format": ckpt.FORMAT,
                "step": step,
                "world_size": env.world_size,
                "sharded": True,
                **state,
                "ranks": ranks,
            },
        )
        ckpt.seal(tmp, step)
        ckpt.publish(root, tmp, final, step)
        ckpt.prune(root, keep_last, protect=final)
    env.barrier()
    return final


def load(
    path: Path,
    env: DistEnv,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    anchors_template: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restores model and optimizer in place; returns (state.json, loaded anchors)."""
    state = json.loads((Path(path) / "state.json").read_text())
    if not state.get("sharded"):
        raise CheckpointError(
            f"{path} was written by a single-process run; resume it without torchrun "
            "(distributed.strategy=none)"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if anchors_template:
        payload["reptile"] = dict(anchors_template)
    dcp.load(payload, checkpoint_id=str(Path(path) / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"]
    )
    return state, payload.get("reptile")
