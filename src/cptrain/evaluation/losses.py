"""Validation loss on a fixed set of windows from every task's held-out split."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cptrain.data.shards import ShardSet


def eval_indices(num_windows: int, count: int) -> np.ndarray:
    """Evenly spaced windows over the whole split: fixed across evaluations and runs."""
    count = min(count, num_windows)
    return np.unique(np.linspace(0, num_windows - 1, num=count).round().astype(np.int64))


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing (fp32) when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def next_token_ce(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (of ``rows[:, :-1]``) against ``rows[:, 1:]``, in fp32
    whatever the logits' dtype: the loss every trainer and evaluation of cptrain minimises."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def token_loss(
    model: torch.nn.Module, rows: torch.Tensor, autocast: torch.dtype | None
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``rows`` ([n, T+1] token ids)."""
    with autocast_to(rows.device, autocast):
        logits = model(input_ids=rows[:, :-1]).logits
    return next_token_ce(logits, rows)


@torch.no_grad()
def evaluate_tasks(
    model: torch.nn.Module,
    val_sets: Mapping[str, ShardSet],
    *,
    window_len: int,
    windows: int,
    batch_size: int,
    autocast: torch.dtype | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for name, shard in val_sets.items():
            idx = eval_indices(shard.num_windows(window_len), windows)
            total, count = 0.0, 0
            for start in range(0, len(idx), batch_size):
                part = idx[start : start + batch_size]
                rows = torch.from_numpy(shard.windows(part, window_len))
                if device is not None:
                    rows = rows.to(device)
                total += float(token_loss(model, rows, autocast)) * len(part)
                count += len(part)
            out[name] = total / count
    finally:
        model.train(was_training)
    return out
