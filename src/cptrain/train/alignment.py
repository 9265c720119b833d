"""Gradient-alignment diagnostics: how much do fresh and replayed data pull the same way?

MER's claim is that Reptile raises the dot product between gradients of different batches.
``gradient_alignment`` measures it directly on one training batch, split into its fresh and
replay rows; ``dot_and_sq_norms`` is the reduction shared with Reptile's displacement cosine.

A cosine between two mean gradients depends on how many rows each mean is over (the fewer, the
noisier, the nearer 0 on average), so every measurement reports its row counts
(``rows_fresh``, ``rows_replay``). Under DDP (``reduce``) the gradients are those of the
global rows, every rank's, not of one rank's share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from cptrain.errors import ConfigError, DataError
from cptrain.evaluation.losses import token_loss


def dot_and_sq_norms(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<x, y>, |x|², |y|² over paired tensor lists, accumulated in float64 on the tensors' device.

    float64 because these sums run over millions of elements and feed a cosine near 0 or 1,
    where float32 cancellation would be visible.
    """
    if len(xs) != len(ys):
        raise ValueError(f"tensor lists differ in length ({len(xs)} vs {len(ys)})")
    device = xs[0].device if xs else torch.device("cpu")
    dot = torch.zeros((), dtype=torch.float64, device=device)
    nx = torch.zeros((), dtype=torch.float64, device=device)
    ny = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(xs, ys, strict=True):
        xd = x.detach().reshape(-1).to(device=device, dtype=torch.float64)
        yd = y.detach().reshape(-1).to(device=device, dtype=torch.float64)
        dot += torch.dot(xd, yd)
        nx += torch.dot(xd, xd)
        ny += torch.dot(yd, yd)
    return dot, nx, ny


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter), without importing distributed eagerly."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# Sums every tensor of the list over the ranks, in place (``all_reduce_sum`` under DDP).
Reducer = Callable[[Sequence[torch.Tensor]], None]


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """A ``Reducer`` over the default process group: one all-reduce per tensor, all in flight
    together."""
    import torch.distributed as dist

    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    for w in works:
        w.wait()  # type: ignore[union-attr]


def global_mean_gradient(
    grads: list[torch.Tensor], n_local: int, n_global: int, reduce: Reducer
) -> list[torch.Tensor]:
    """The mean-loss gradient over every rank's rows from this rank's mean over its own
    ``n_local`` of the ``n_global`` rows: Σ_r (n_r / N) g_r, summed by ``reduce``. Replaces
    ``grads``' items as it goes (one extra tensor alive at a time); float32, so bf16 gradients
    lose no bits in the sum. Every rank must call it, with zeros when it has no rows."""
    w = n_local / n_global if n_global else 0.0
    for i, g in enumerate(grads):
        grads[i] = g.float() * w  # out of place: autograd may hand back expanded views
    reduce(grads)
    return grads


def cosine_from_sums(dot: float, nx: float, ny: float) -> float:
    """Cosine from the three sums; NaN when either vector is zero (the angle is undefined)."""
    if nx <= 0.0 or ny <= 0.0:
        return float("nan")
    return max(-1.0, min(1.0, dot / math.sqrt(nx * ny)))


def _check_rows(rows: torch.Tensor, name: str, allow_empty: bool = False) -> None:
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise DataError(f"gradient_alignment: {name} must be a 2-D token tensor [rows, T+1]")
    if rows.dtype not in (torch.int64, torch.int32):
        raise DataError(f"gradient_alignment: {name} must hold integer token ids, not {rows.dtype}")
    if rows.shape[0] < (0 if allow_empty else 1) or rows.shape[1] < 2:
        raise DataError(
            f"gradient_alignment: {name} has shape {tuple(rows.shape)}; it needs at least one "
            "row of two tokens (turn diagnostics off when a batch has no replay rows)"
        )


def _trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("gradient_alignment: the model has no trainable parameters")
    if any(is_dtensor(p) for p in params):
        # FSDP2 reduces gradients in hooks tied to .grad accumulation, which autograd.grad skips.
        raise ConfigError(
            "gradient-alignment diagnostics do not support FSDP2-sharded models; "
            "set diagnostics.every=0"
        )
    return params


def _part_grads(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    rows: torch.Tensor,
    autocast_dtype: torch.dtype | None,
) -> tuple[list[torch.Tensor], float]:
    if rows.shape[0] == 0:  # a rank without rows of this set (DDP): it adds nothing
        return [torch.zeros_like(p) for p in params], 0.0
    rows = rows.to(device=params[0].device, dtype=torch.long)
    loss = token_loss(model, rows, autocast_dtype)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # A parameter the loss does not reach has a zero gradient, not a missing one.
    filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return filled, loss.item()


def gradient_alignment(
    model: torch.nn.Module,
    fresh: torch.Tensor,
    replay: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Cosine and norms of the mean-loss gradients of the fresh and the replay rows, separately.

    ``fresh`` and ``replay`` are int token rows ``[n, T+1]``. Uses ``torch.autograd.grad``, so
    the parameters' ``.grad`` (the training step's accumulation) is never touched. Pass the
    unwrapped module under DDP, with ``reduce``: see ``gradient_alignments``.
    """
    return gradient_alignments(model, fresh, [replay], autocast_dtype=autocast_dtype)[0]


def gradient_alignments(
    model: torch.nn.Module,
    fresh: torch.Tensor,
    references: Sequence[torch.Tensor],
    *,
    autocast_dtype: torch.dtype | None = None,
    reduce: Reducer | None = None,
) -> list[dict[str, float]]:
    """``gradient_alignment`` of the fresh rows with each of several row sets, the fresh
    gradient computed once: one forward/backward per set, plus one. Each result also gives
    the number of rows of either side (``rows_fresh``, ``rows_replay``).

    Under DDP pass ``reduce`` (``all_reduce_sum``) and call it on every rank, each with its own
    rows (a rank may have none of a set): every figure is then that of all ranks' rows
    together, the same on every rank. The gradients themselves are summed over ranks before
    any dot product: Σ_r <g_r, h_r> is not <Σ_r g_r, Σ_r h_r> (it misses the cross-rank
    terms <g_r, h_s>), and no sum of per-rank scalars can stand in for them. That costs one
    gradient-sized all-reduce per set (the fresh one shared by all), about what DDP spends on
    one training step, every ``diagnostics.every`` steps; gathering the per-rank gradients
    instead would move world-size times more.
    """
    _check_rows(fresh, "fresh", allow_empty=reduce is not None)
    for rows in references:
        _check_rows(rows, "replay", allow_empty=reduce is not None)
    params = _trainable(model)
    sizes = [fresh.shape[0], *(r.shape[0] for r in references)]
    g_fresh, loss_fresh = _part_grads(model, params, fresh, autocast_dtype)
    counts = [float(n) for n in sizes]
    if reduce is not None:
        # every set's global row count, in one small reduction
        stats = torch.tensor(sizes, dtype=torch.float64, device=params[0].device)
        reduce([stats])
        counts = stats.tolist()
        g_fresh = global_mean_gradient(g_fresh, sizes[0], int(counts[0]), reduce)
        loss_fresh = _global_loss(loss_fresh, sizes[0], counts[0], params[0].device, reduce)
    out = []
    for k, rows in enumerate(references, start=1):
        g_replay, loss_replay = _part_grads(model, params, rows, autocast_dtype)
        if reduce is not None:
            g_replay = global_mean_gradient(g_replay, sizes[k], int(counts[k]), reduce)
            loss_replay = _global_loss(loss_replay, sizes[k], counts[k], params[0].device, reduce)
        dot, nf, nr = (t.item() for t in dot_and_sq_norms(g_fresh, g_replay))
        del g_replay  # one reference gradient alive at a time
        out.append({
            "grad_cos": cosine_from_sums(dot, nf, nr),
            "grad_norm_fresh": math.sqrt(nf),
            "grad_norm_replay": math.sqrt(nr),
            "loss_fresh": loss_fresh,
            "loss_replay": loss_replay,
            "rows_fresh": int(counts[0]),
            "rows_replay": int(counts[k]),
        })  # fmt: skip
    return out


def _global_loss(
    loss: float, n_local: int, n_global: float, device: torch.device, reduce: Reducer
) -> float:
    """The mean loss over every rank's rows from this rank's mean over its own."""
    t = torch.tensor([loss * n_local], dtype=torch.float64, device=device)
    reduce([t])
    return float(t.item()) / n_global if n_global else float("nan")
