"""Reptile meta-update (the gradient-alignment half of MER) and its anchor.

Every ``k`` optimizer steps the weights are pulled back toward where they were ``k`` steps
earlier, θ ← θ₀ + ε(θ − θ₀), and θ₀ ← θ. The update is applied, in place, to the very tensors
the optimizer steps (fp32 masters, FSDP2 local shards), from an optimizer post-step hook, so
the next step starts from the interpolated weights (``variant: faithful``).

The official code interpolated DeepSpeed's bf16 module weights: the next forward/backward ran
on them, then the optimizer stepped its un-interpolated fp32 masters and overwrote them, so the
meta-update reached the weights only through that one gradient. ``variant: official``
reproduces this: the meta-update keeps an exact copy of the weights, interpolates, and an
optimizer pre-step hook puts the copy back after the next backward, so that step lands on the
old weights with the gradient of the interpolated ones. The anchor becomes the interpolated
weights, as the official code re-reads it from the module after the update. It also keeps the
official code's timing: its loop tests ``iteration % k == 0`` before counting the step, so the
meta-update follows optimizer steps 1, k+1, 2k+1, ... of the whole run, and each task start
re-reads the anchor from the module without restarting that count. Between a meta-update and
the next step the module holds the interpolated weights while the optimizer holds others;
``evaluated_weights()`` lends the latter for evaluation and export (``evaluate_weights``).

Build Reptile after the model is final (after ``fully_shard``, after ``init_from`` weights are
loaded) and after the optimizer, from the same parameter objects; ``attach`` checks this.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from cptrain.config import ReptileConfig
from cptrain.config_base import build_config
from cptrain.errors import CheckpointError, ConfigError
from cptrain.train.alignment import cosine_from_sums, is_dtensor

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Version 1 also covers the official variant's keys: a checkpoint without them has nothing
# pending, and a cptrain without them cannot resume such a run anyway (it refuses the
# reptile.variant config key).
STATE_VERSION = 1


def _validated(cfg: ReptileConfig | dict[str, Any]) -> ReptileConfig:
    # Re-validate so that a config built with model_construct() or mutated cannot slip through.
    data = cfg.model_dump() if isinstance(cfg, ReptileConfig) else cfg
    return build_config(ReptileConfig, data, source="reptile")


def _local(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank's optimizer steps: the local shard of a DTensor, else the tensor."""
    return p.to_local() if is_dtensor(p) else p.detach()


def _shard_count(p: torch.Tensor) -> int:
    if not is_dtensor(p):
        return 1
    mesh = p.device_mesh
    count = 1
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            count *= mesh.size(dim)
    return count


def _replicas(p: torch.Tensor) -> int:
    """How many ranks hold this same local shard, so that global sums count it once."""
    if is_dtensor(p):
        return p.device_mesh.size() // _shard_count(p)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class Reptile:
    """One anchor copy of the trainable parameters and the every-k-steps meta-update (with
    ``variant: official`` and ε < 1, one more exact copy: the weights the optimizer keeps)."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.Tensor]],
        cfg: ReptileConfig,
        *,
        track_displacement: bool = False,
    ):
        """``track_displacement`` keeps the last period's θ − θ₀ (one more copy of the weights)
        to log the cosine between consecutive meta-steps; the trainer turns it on with
        ``diagnostics.every``."""
        self.cfg = _validated(cfg)
        pairs = [(n, p) for n, p in named_params if p.requires_grad]
        if not pairs:
            raise ConfigError("reptile: the model has no trainable parameters to anchor")
        self._names = [n for n, _ in pairs]
        if len(set(self._names)) != len(self._names):
            raise ConfigError("reptile: parameter names are not unique; pass named_parameters()")
        self._params = [p for _, p in pairs]
        self._sharded = any(is_dtensor(p) for p in self._params)
        with torch.no_grad():
            self._anchors = [self._new_buffer(_local(p)) for p in self._params]
        # Allocated up front so that the state_dict has a fixed structure (DCP loads into a
        # template built from a fresh object); it only holds data once _has_prev is set.
        self._prev_disp: list[torch.Tensor] | None = None
        if track_displacement:
            self._prev_disp = [torch.zeros_like(a) for a in self._anchors]
        self._has_prev = False
        # official: the weights the optimizer steps, from a meta-update until the next step puts
        # them back. Exact (the parameters' dtype) and allocated up front, like _prev_disp.
        self._masters: list[torch.Tensor] | None = None
        if self.cfg.variant == "official" and self.cfg.epsilon < 1.0:
            self._masters = [self._new_buffer(_local(p), exact=True) for p in self._params]
        self.pending_restore = False
        self.steps = 0  # optimizer steps seen: the official schedule counts the whole run
        self.steps_since_anchor = 0
        self.updates = 0
        self.last_displacement_cosine: float | None = None
        self._handles: list[Any] = []

    # ---------------------------------------------------------------- buffers
    def _new_buffer(self, local: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        device = local.device if self.cfg.anchor_device == "same" else torch.device("cpu")
        dtype = local.dtype if exact else _DTYPES[self.cfg.anchor_dtype]
        buf = torch.empty(local.shape, dtype=dtype, device=device)
        if device.type == "cpu" and local.device.type == "cuda":
            buf = buf.pin_memory()  # host anchors of GPU weights: pinned for fast copies
        buf.copy_(local)
        return buf

    def _locals(self) -> list[torch.Tensor]:
        # Re-read every time: FSDP2 may re-point a parameter's local shard after lazy init.
        return [_local(p) for p in self._params]

    def _split(self, locals_: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """Indices whose anchor matches the weight's dtype and device (foreach-able), and others."""
        fast, slow = [], []
        for i, (x, a) in enumerate(zip(locals_, self._anchors, strict=True)):
            (fast if x.dtype == a.dtype and x.device == a.device else slow).append(i)
        return fast, slow

    def anchor_bytes(self) -> int:
        """Bytes held by the anchor (one copy of this rank's trainable parameters)."""
        return sum(a.numel() * a.element_size() for a in self._anchors)

    def memory_bytes(self) -> int:
        """All bytes Reptile holds: the anchor plus, when tracked, the last displacement and,
        with ``variant: official``, the kept weights."""
        extra = [*(self._prev_disp or []), *(self._masters or [])]
        return self.anchor_bytes() + sum(d.numel() * d.element_size() for d in extra)

    # ---------------------------------------------------------------- hook
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run the meta-update after every k-th ``optimizer.step()`` (official: and put the
        kept weights back before the step that follows it)."""
        hooks = ["register_step_post_hook"]
        if self._masters is not None:
            hooks.append("register_step_pre_hook")
        registers = [getattr(optimizer, name, None) for name in hooks]
        for name, register in zip(hooks, registers, strict=True):
            if not callable(register):
                raise ConfigError(
                    f"reptile: optimizer {type(optimizer).__name__} has no {name}; "
                    "use a torch.optim optimizer or set reptile.enabled=false"
                )
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = zip(self._names, self._params, strict=True)
        missing = [n for n, p in named if id(p) not in stepped]
        if missing:
            raise ConfigError(
                f"reptile: parameter {missing[0]} ({len(missing)} in all) is not stepped by the "
                "optimizer; build Reptile from the same (sharded) model the optimizer was built on"
            )
        self.detach()
        self._handles = [registers[0](self._post_step)]
        if len(registers) > 1:
            self._handles.append(registers[1](self._pre_step))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.restore_masters()

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        self.steps_since_anchor += 1
        if self.due():
            self.meta_update(optimizer)

    def due(self) -> bool:
        """Whether the step just counted is followed by a meta-update: every k-th step of the
        period (faithful), or steps 1, k+1, 2k+1, ... of the run (official)."""
        if self.cfg.variant == "official":
            return (self.steps - 1) % self.cfg.k == 0
        return self.steps_since_anchor >= self.cfg.k

    # ---------------------------------------------------------------- the update
    @torch.no_grad()
    def meta_update(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """θ ← θ₀ + ε(θ − θ₀), then θ₀ ← θ; called by the hook, public for tests and benches.
        Official: the weights before it are kept for ``restore_masters``."""
        locals_ = self._locals()
        self._record_displacement(locals_)
        if self.cfg.epsilon < 1.0:
            self._keep_masters(locals_)
            self._interpolate(locals_)
        self._reanchor(locals_)
        if self.cfg.reset_optimizer_moments and optimizer is not None:
            self._reset_moments(optimizer)
        self.steps_since_anchor = 0
        self.updates += 1

    def _keep_masters(self, locals_: list[torch.Tensor]) -> None:
        # Already pending (a second meta-update before any step): the kept copy is still what
        # the optimizer holds, as DeepSpeed's masters would be; the module weights move again.
        if self._masters is None or self.pending_restore:
            return
        self._copy(self._masters, locals_)
        self.pending_restore = True

    @contextmanager
    def evaluated_weights(self) -> Iterator[None]:
        """The weights evaluations and exports see. Official, with a restore pending and
        ``evaluate_weights: optimizer``: the module holds the optimizer's weights inside the
        block and the interpolated ones again after it, so the next forward/backward is
        unchanged. Otherwise the module's weights are the ones: nothing moves."""
        shown = self.cfg.evaluate_weights == "optimizer"
        if not (shown and self.pending_restore) or self._masters is None:
            yield
            return
        locals_ = self._locals()
        with torch.no_grad():
            interpolated = [x.clone() for x in locals_]
            self._copy(locals_, self._masters)
        try:
            yield
        finally:
            with torch.no_grad():
                self._copy(locals_, interpolated)

    @torch.no_grad()
    def restore_masters(self) -> None:
        """Official: put the kept (un-interpolated) weights back; the pre-step hook calls it
        after the backward, so the gradients stay those of the interpolated weights."""
        if not self.pending_restore or self._masters is None:
            return
        self._copy(self._locals(), self._masters)
        self.pending_restore = False

    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        same: list[int] = []
        other: list[int] = []
        for i, (d, s) in enumerate(zip(dst, src, strict=True)):
            (same if d.device == s.device else other).append(i)
        if same:
            torch._foreach_copy_([dst[i] for i in same], [src[i] for i in same])
        for i in other:  # host copies of GPU weights (anchor_device: cpu)
            dst[i].copy_(src[i])

    def _interpolate(self, locals_: list[torch.Tensor]) -> None:
        eps = self.cfg.epsilon
        fast, slow = self._split(locals_)
        if fast:
            # lerp the anchor toward θ (θ₀ + ε(θ − θ₀) exactly as written), then copy it into θ:
            # two foreach passes, and the anchor already holds the new θ afterwards.
            anchors = [self._anchors[i] for i in fast]
            params = [locals_[i] for i in fast]
            torch._foreach_lerp_(anchors, params, eps)
            torch._foreach_copy_(params, anchors)
        for i in slow:
            x, a = locals_[i], self._anchors[i]
            # Other dtype or device: one tensor at a time, so at most one extra copy is alive.
            wide = torch.promote_types(x.dtype, a.dtype)
            tmp = a.to(device=x.device, dtype=wide)
            tmp.lerp_(x.to(wide), eps)
            x.copy_(tmp)

    def _reanchor(self, locals_: list[torch.Tensor]) -> None:
        fast, slow = self._split(locals_)
        if fast:
            torch._foreach_copy_([self._anchors[i] for i in fast], [locals_[i] for i in fast])
        for i in slow:
            self._anchors[i].copy_(locals_[i])

    def _record_displacement(self, locals_: list[torch.Tensor]) -> None:
        """Cosine between this period's θ − θ₀ and the previous period's (diagnostics only)."""
        if self._prev_disp is None:  # not tracked: nothing was allocated to compare with
            return
        device = locals_[0].device
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for i, (x, a) in enumerate(zip(locals_, self._anchors, strict=True)):
            d = x.double() - a.to(device=x.device, dtype=torch.float64)
            prev = self._prev_disp[i].to(device=x.device, dtype=torch.float64)
            d1, p1 = d.reshape(-1), prev.reshape(-1)
            part = torch.stack([torch.dot(d1, p1), torch.dot(d1, d1), torch.dot(p1, p1)])
            sums += part.to(device) / _replicas(self._params[i])
            self._prev_disp[i].copy_(d)
        had_prev, self._has_prev = self._has_prev, True
        if not had_prev:
            return
        if self._sharded and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # three scalars; the update itself never talks
        dot, nd, np_ = sums.tolist()
        self.last_displacement_cosine = cosine_from_sums(dot, nd, np_)

    def _reset_moments(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-parameter optimizer state (Adam's moments and step count)."""
        for p in self._params:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                elif key == "step":
                    state[key] = type(value)(0)

    @torch.no_grad()
    def reanchor(self) -> None:
        """Start a new meta-period from the current weights, dropping the pending one."""
        self._reanchor(self._locals())
        self.steps_since_anchor = 0

    def on_task_boundary(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """A new task starts. With ``reset_at_task_boundary``: re-anchor (and reset moments if
        configured). Official: re-anchor always, from the module's weights (interpolated ones
        when a restore is pending), as the official code copies its anchor at each task start;
        its schedule still counts the whole run."""
        official = self.cfg.variant == "official"
        if not (self.cfg.reset_at_task_boundary or official):
            return
        self.reanchor()
        moments = self.cfg.reset_at_task_boundary and self.cfg.reset_optimizer_moments
        if moments and optimizer is not None:
            self._reset_moments(optimizer)

    # ---------------------------------------------------------------- checkpoint
    def _as_global(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Sharded anchors travel as DTensors so that DCP saves every rank's shard."""
        if not is_dtensor(p):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    def state_dict(self) -> dict[str, Any]:
        """Counters, the anchor (and the tracked displacement); tensors are references, not
        copies."""

        def by_name(buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            return {
                n: self._as_global(p, b)
                for n, p, b in zip(self._names, self._params, buffers, strict=True)
            }

        return {
            "version": STATE_VERSION,
            "k": self.cfg.k,
            "epsilon": self.cfg.epsilon,
            "steps": self.steps,
            "steps_since_anchor": self.steps_since_anchor,
            "updates": self.updates,
            "anchor": by_name(self._anchors),
            "has_prev_displacement": self._has_prev,
            "prev_displacement": by_name(self._prev_disp) if self._prev_disp else None,
            "last_displacement_cosine": self.last_displacement_cosine,
            "variant": self.cfg.variant,
            # A checkpoint written between a meta-update and the next step (an interval or
            # task-end save right after the meta-update's step) holds interpolated model
            # weights; these are the ones the next step must put back.
            "pending_restore": self.pending_restore,
            "masters": by_name(self._masters) if self._masters is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; a missing or mismatched anchor is a CheckpointError."""
        if not isinstance(state, dict) or not isinstance(state.get("anchor"), dict):
            raise CheckpointError(
                "checkpoint has no Reptile anchor but reptile.enabled is on; resume from a "
                "checkpoint saved with Reptile, or start a new run from its weights (init_from)"
            )
        if state.get("version", STATE_VERSION) > STATE_VERSION:
            raise CheckpointError(
                f"checkpoint Reptile state has version {state['version']}, newer than this "
                f"cptrain understands ({STATE_VERSION}); upgrade cptrain to resume it"
            )
        counters = {key: state.get(key) for key in ("steps_since_anchor", "updates")}
        # A checkpoint from before the run-wide count (only the official schedule reads it,
        # and cptrain had not used it yet): the steps its counters account for.
        counters["steps"] = state.get(
            "steps",
            counters["updates"] * self.cfg.k + counters["steps_since_anchor"]
            if all(isinstance(v, int) for v in counters.values())
            else None,
        )
        for key, value in counters.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(
                    f"checkpoint Reptile state: {key} is {value!r}, not a count; the checkpoint "
                    "is corrupt, resume from an earlier one"
                )
        tensors = self._checked_tensors(state["anchor"], "anchor")
        masters = self._saved_masters(state)
        prev_state = state.get("prev_displacement")
        prev = None
        has_prev = state.get("has_prev_displacement") is True and isinstance(prev_state, dict)
        if self._prev_disp is not None and has_prev:
            prev = self._checked_tensors(prev_state, "prev_displacement")
        with torch.no_grad():
            for anchor, t in zip(self._anchors, tensors, strict=True):
                anchor.copy_(t)
            if prev is not None:
                for buf, t in zip(self._prev_disp, prev, strict=True):
                    buf.copy_(t)
            if masters is not None and self._masters is not None:
                for buf, t in zip(self._masters, masters, strict=True):
                    buf.copy_(t)
        self.pending_restore = masters is not None
        # Tracking turned on at resume: the first period has nothing to compare with.
        self._has_prev = prev is not None
        self.steps = counters["steps"]
        self.steps_since_anchor = counters["steps_since_anchor"]
        self.updates = counters["updates"]
        cos = state.get("last_displacement_cosine")
        self.last_displacement_cosine = float(cos) if cos is not None else None

    def _saved_masters(self, state: dict[str, Any]) -> list[torch.Tensor] | None:
        """The kept weights of a checkpoint saved with a restore pending, else None."""
        pending = state.get("pending_restore", False)
        if not isinstance(pending, bool):
            raise CheckpointError(
                f"checkpoint Reptile state: pending_restore is {pending!r}, not a bool; the "
                "checkpoint is corrupt, resume from an earlier one"
            )
        if not pending:
            return None
        if self._masters is None:
            raise CheckpointError(
                "checkpoint was saved by reptile.variant=official between a meta-update and the "
                "next step; resume it with reptile.variant: official and epsilon < 1"
            )
        if not isinstance(state.get("masters"), dict):
            raise CheckpointError(
                "checkpoint Reptile state has a restore pending but no kept weights; the "
                "checkpoint is corrupt, resume from an earlier one"
            )
        return self._checked_tensors(state["masters"], "masters")

    def _checked_tensors(self, saved: dict[str, Any], what: str) -> list[torch.Tensor]:
        names = set(self._names)
        missing = [n for n in self._names if n not in saved]
        extra = sorted(set(saved) - names)
        if missing or extra:
            which = f"lacks {missing[0]}" if missing else f"has unknown {extra[0]}"
            raise CheckpointError(
                f"checkpoint Reptile {what} {which} ({len(missing)} missing, {len(extra)} "
                "unknown); it was saved for a different model or set of trainable parameters"
            )
        out = []
        for name, anchor in zip(self._names, self._anchors, strict=True):
            t = saved[name]
            if is_dtensor(t):
                t = t.to_local()
            if not torch.is_tensor(t) or tuple(t.shape) != tuple(anchor.shape):
                found = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise CheckpointError(
                    f"checkpoint Reptile {what} {name}: shape {found}, expected "
                    f"{tuple(anchor.shape)}; resume with the same model and sharding"
                )
            out.append(t)
        return out
