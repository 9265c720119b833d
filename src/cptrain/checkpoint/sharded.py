"""Checkpoints of a multi-process run: DCP shards plus a gathered Hugging Face export.

Layout of ``<run_dir>/checkpoints/step_<N>/`` when ``distributed.strategy`` is ddp or fsdp2:
  dcp/          torch.distributed.checkpoint: model, optimizer and every component's tensors
                (e.g. Reptile anchors), each rank writing its own shards (FSDP2 DTensors keep
                their sharding)
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
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from cptrain import fsutil
from cptrain.checkpoint import local
from cptrain.checkpoint.export import full_state_dict, write_model_dir
from cptrain.distributed import DistEnv
from cptrain.errors import CheckpointError


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
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
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
    payload.update({name: dict(group) for name, group in tensors.items() if group})
    dcp.save(payload, checkpoint_id=str(tmp / "dcp"))
    full = full_state_dict(model, env)
    if env.is_main:
        write_model_dir(model, tmp / "model", tokenizer_dir, full)
    ranks = env.all_gather_object(dict(rank_state))
    if env.is_main:
        fsutil.atomic_write_json(
            tmp / "state.json",
            {
                "format": local.FORMAT,
                "step": step,
                "world_size": env.world_size,
                "sharded": True,
                **state,
                "ranks": ranks,
            },
        )
        local.seal(tmp, step)
        local.publish(root, tmp, final, step)
        local.prune(root, keep_last, protect=final)
    env.barrier()
    return final


def load(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    templates: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Restores model and optimizer in place; returns (state.json, each component's tensors
    loaded into ``templates``, the live tensors of the components)."""
    state = json.loads((Path(path) / "state.json").read_text())
    if not state.get("sharded"):
        raise CheckpointError(
            f"{path} was written by a single-process run; resume it without torchrun "
            "(distributed.strategy=none)"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    payload.update({name: dict(group) for name, group in templates.items() if group})
    dcp.load(payload, checkpoint_id=str(Path(path) / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"]
    )
    return state, {name: payload[name] for name, group in templates.items() if group}
