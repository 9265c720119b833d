"""The run's one optimizer: AdamW with the paper's settings, carried across tasks."""

from __future__ import annotations

import torch

from cptrain.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norm gains are not weight-decayed (standard practice for Llama pre-training).
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=cfg.betas,
        eps=cfg.eps,
        foreach=True,
    )
