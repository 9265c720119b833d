"""Decoupled L2 toward the start weights: after every optimizer step
θ ← θ − lr · λ · (θ − θ_start), on the very tensors the optimizer steps (fp32 weights, FSDP2
local shards), the same discipline as Reptile: never on a bf16 copy that a master overwrites.

The start weights are read when the object is built, so build it before a resume loads the
checkpoint's weights: the model then still holds what ``init_from`` (or the seed) gave it, and
nothing about the anchor needs saving. One fp32 copy of the (local) weights; one fused pass per
step (``lerp``: θ + w·(θ_start − θ) is the update above with w = lr · λ)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p.detach()


class L2ToStart:
    def __init__(self, params: Iterable[torch.Tensor], weight: float) -> None:
        if weight < 0:
            raise ValueError(f"L2-to-start weight must be >= 0 (got {weight})")
        self.weight = weight
        self._params = [p for p in params if p.requires_grad]
        # In the weights' own dtype (fp32 for every cptrain run): one fused lerp per group.
        self._start = {id(p): _local(p).detach().clone() for p in self._params}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Pull after every ``optimizer.step()`` (attach before Reptile: its meta-update then
        sees the pulled weights)."""
        optimizer.register_step_post_hook(self._post_step)

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            w = float(group["lr"]) * self.weight
            params = [p for p in group["params"] if id(p) in self._start]
            if w == 0 or not params:
                continue
            # Re-read the locals every time: FSDP2 may re-point a shard after lazy init.
            weights = [_local(p) for p in params]
            torch._foreach_lerp_(weights, [self._start[id(p)] for p in params], w)

    def distance(self) -> float:
        """‖θ − θ_start‖₂ of this rank's (local) weights."""
        sq = sum(float((_local(p).float() - self._start[id(p)]).pow(2).sum())
                 for p in self._params)
        return sq**0.5
