"""torchrun / DDP / FSDP2 set-up on PyTorch's own engine, and rank-aware helpers.

``cptrain train`` launched by ``torchrun`` finds RANK / WORLD_SIZE / LOCAL_RANK in the
environment, initialises the default process group (nccl on GPU, gloo on CPU) and wraps the
model: DDP, or FSDP2 ``fully_shard`` on every decoder layer and then the root module. A program
that set up the process group itself (to train several runs in one launch) keeps it: training
ends without destroying it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cptrain.config import DistributedConfig
from cptrain.errors import ConfigError


@dataclass
class DistEnv:
    strategy: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # a process group the caller set up before training stays theirs: shutdown leaves it open
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_scalar(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: DistributedConfig) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if cfg.strategy == "none":
        if world > 1:
            raise ConfigError(
                f"launched with {world} processes but distributed.strategy is none; set "
                "distributed.strategy=ddp or fsdp2"
            )
        return DistEnv("none", device=torch.device("cuda") if cuda else torch.device("cpu"))
    if not launched_by_torchrun():
        raise ConfigError(
            f"distributed.strategy={cfg.strategy} needs torchrun: launch with `torchrun "
            "--nproc_per_node=N -m cptrain.cli train CONFIG`"
        )
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("distributed.backend=nccl needs GPUs; use gloo (or auto) on CPU")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend=backend)
    return DistEnv(
        cfg.strategy, rank=rank, world_size=world, local_rank=local, device=device,
        owns_group=owns_group,
    )  # fmt: skip


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, each of which FSDP2 shards as one unit, found whatever the
    architecture: the modules of the classes transformers keeps whole (``_no_split_modules``,
    outermost only), else the longest ``ModuleList`` of one module type."""
    keep_whole = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in keep_whole and not any(
            name.startswith(outer + ".") for outer, _ in found
        ):
            found.append((name, module))
    if found:
        return [module for _, module in found]
    lists = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1
    ]
    if not lists:
        raise ConfigError(
            f"distributed.strategy=fsdp2: cannot find the decoder layers of "
            f"{type(model).__name__} (no _no_split_modules, no ModuleList of layers); use ddp"
        )
    return list(max(lists, key=len))


def wrap_model(
    model: torch.nn.Module, env: DistEnv, cfg: DistributedConfig
) -> torch.nn.Module:
    """Returns the module to call forward on; ``model`` itself stays the unwrapped module
    (FSDP2 shards it in place, so its parameters become DTensors)."""
    if cfg.activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if env.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if cfg.mixed_precision and env.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    return model


def set_grad_sync(forward_model: torch.nn.Module, env: DistEnv, enabled: bool) -> Any:
    """A context in which backward does (or skips) the gradient all-reduce, so gradient
    accumulation communicates once per optimizer step."""
    import contextlib

    if env.strategy == "ddp" and not enabled:
        return forward_model.no_sync()
    if env.strategy == "fsdp2":
        forward_model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    return contextlib.nullcontext()


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.barrier()  # a rank leaving early aborts the other's pending gloo work
        if env.owns_group:
            dist.destroy_process_group()
