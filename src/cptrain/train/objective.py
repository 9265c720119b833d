"""What each micro-batch's backward minimises: the next-token cross-entropy of its rows plus,
with ``regularize.kl_to_start``, λ · KL(p_start ‖ p_θ) on the chosen rows; and the L2 pull to
the start weights (an optimizer post-step hook). Without anchors the loss is ``token_loss``,
computed exactly as before they existed.

The start model is the trainer's model as built, before a resume loads a checkpoint into it
(``init_from`` weights, or the seeded preset init), so nothing about it is checkpointed: a
resumed run rebuilds the same anchors. The teacher is a frozen copy run under the same
autocast as the model, so at step 0 the KL is exactly 0. Its weights stay fp32 on CPU; on a GPU
in bf16 they are cast to bf16 (half the memory), which puts a floor under the KL: 0.0026 nats
per token on SmolLM2-135M under bf16 autocast (the model's own forward, measured on French rows),
a small pull toward the rounded model rather than the start model. It is sharded like the model
under FSDP2 (whose forwards are collective, so every rank then runs the
teacher on every row). Its forward passes are counted (``teacher_tokens``) for FLOPs.

Scaling: the step minimises mean CE over the global batch + λ · (Σ KL of chosen rows) / (number
of chosen rows in the global batch), so the KL's weight does not depend on α or world size.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from cptrain.anchor.kl import kl_rows, topk_kl_rows, topk_targets
from cptrain.anchor.l2 import L2ToStart
from cptrain.anchor.topk import TopKStore
from cptrain.distributed import wrap_model
from cptrain.evaluation.losses import autocast_to, next_token_ce, token_loss

if TYPE_CHECKING:
    from cptrain.replay.buffer import ReplayBuffer
    from cptrain.train.trainer import Trainer


def start_teacher(trainer: Trainer) -> torch.nn.Module:
    """A frozen copy of the start model (call before a resume restores weights)."""
    model, env = trainer.model, trainer.env
    if env.strategy == "fsdp2":  # a sharded module cannot be deep-copied: build it again
        from cptrain.models.build import model_for_config

        teacher = model_for_config(trainer.cfg, trainer.data.vocab_size,
                                   trainer.data.separators).to(env.device)
    else:
        teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    teacher.eval()
    if trainer.autocast == torch.bfloat16 and env.device.type == "cuda":
        teacher.to(torch.bfloat16)  # where memory is scarce; see the module docstring
    if env.strategy == "fsdp2":
        wrap_model(teacher, env, trainer.cfg.distributed.model_copy(
            update={"activation_checkpointing": False}))
    return teacher


def _chosen(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """The chosen rows of ``x`` (no copy, and no scatter in backward, when all are chosen)."""
    return x if bool(sel.all()) else x[sel]


class Objective:
    """``begin_step`` once per optimizer step (which rows the KL covers), then ``loss`` per
    micro-batch, then ``end_step`` for the step's mean KL."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        cfg = trainer.cfg.regularize
        self.kl = cfg.kl_to_start
        self.teacher: torch.nn.Module | None = None
        self.store: TopKStore | None = None
        if self.kl.weight > 0 and self.kl.top_k is None:
            self.teacher = start_teacher(trainer)
        if self.kl.top_k is not None:  # the config refuses it under FSDP2
            assert trainer.buffer is not None  # the config requires replay.seed with top_k
            self.store = TopKStore(trainer.buffer.directory, self.kl.top_k,
                                   trainer.data.vocab_size)
        self.l2: L2ToStart | None = None
        if cfg.l2_to_start.weight > 0:
            self.l2 = L2ToStart(trainer.model.parameters(), cfg.l2_to_start.weight)
            self.l2.attach(trainer.optimizer)
        self._mask: np.ndarray | None = None
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None
        self._factor = 0.0
        self._kl_sum = 0.0
        self._tokens = 0  # this rank's teacher tokens in the current step
        self._n_sel = 0

    @property
    def anchored(self) -> bool:
        return self.kl.weight > 0

    # ---------------------------------------------------------------- a step
    def begin_step(self, n_fresh: int, buffer: ReplayBuffer | None, step: int, n_rows: int,
                   n_global: int) -> None:
        """Choose the local rows the KL covers; ``n_global``: rows of the global batch."""
        if not self.anchored:
            return
        mask = np.ones(n_rows, dtype=bool)
        if self.kl.rows != "all":
            mask[:n_fresh] = False
            if self.kl.rows == "seed" and n_rows > n_fresh:
                drawn = buffer.last_drawn(step) if buffer is not None else None
                tasks = None if drawn is None else drawn.tasks
                mask[n_fresh:] = tasks is not None and tasks < 0  # seed task ids are negative
        self._targets = None
        if self.store is not None and mask.any():
            assert buffer is not None
            drawn = buffer.last_drawn(step)
            assert drawn is not None and drawn.ids is not None
            ids = drawn.ids
            if self.store._ids is None:
                self.store.open(buffer.seed_rows, self.trainer.data.window_len - 1)
            self._targets = self.store.read(ids[mask[n_fresh:]])
        env = self.trainer.env
        n_local = int(mask.sum())
        self._n_sel = int(round(env.sum_scalar(n_local))) if env.active else n_local
        self._mask = mask
        # Σ_chosen KL / n_sel, in units of the CE's per-row weight (rows are weighed n_global)
        self._factor = self.kl.weight * n_global / self._n_sel if self._n_sel else 0.0
        self._kl_sum = 0.0
        self._tokens = 0

    def loss(self, model: torch.nn.Module, part: torch.Tensor, start: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean CE of ``part``, the anchor's term in CE-row units or None); ``start``: the
        offset of ``part`` in the step's local rows."""
        autocast = self.trainer.autocast
        if not self.anchored or self._mask is None:
            return token_loss(model, part, autocast), None
        sel = torch.from_numpy(self._mask[start : start + part.shape[0]]).to(part.device)
        with autocast_to(part.device, autocast):
            logits = model(input_ids=part[:, :-1]).logits
        # one fp32 copy of the logits for both terms (under bf16 they are the largest tensors
        # of the step: 4 × 256 × 49,152 × 4 bytes = 200 MB for SmolLM2)
        logits = logits.float()
        ce = next_token_ce(logits, part)
        collective = self.teacher is not None and self.trainer.env.strategy == "fsdp2"
        if self._factor == 0.0 or not (collective or bool(sel.any())):
            return ce, None
        per_row = self._kl_of(logits, part, sel, start)
        if per_row is None:
            return ce, None
        self._kl_sum += float(per_row.detach().sum())
        return ce, per_row.sum() * self._factor

    def _kl_of(self, logits: torch.Tensor, part: torch.Tensor, sel: torch.Tensor, start: int
               ) -> torch.Tensor | None:
        if self.store is not None:
            assert self._targets is not None and self._mask is not None
            before = int(self._mask[:start].sum())  # chosen rows in earlier micro-batches
            n = int(sel.sum())
            ids, logp = (t[before : before + n].to(part.device) for t in self._targets)
            return topk_kl_rows(_chosen(logits, sel), ids, logp)
        assert self.teacher is not None
        # FSDP2's forwards are collective: every rank runs the teacher on every row then.
        everyone = self.trainer.env.strategy == "fsdp2"
        rows = part if everyone else _chosen(part, sel)
        if rows.shape[0] == 0:
            return None
        with torch.no_grad(), autocast_to(part.device, self.trainer.autocast):
            t_logits = self.teacher(input_ids=rows[:, :-1]).logits
        self._tokens += int(rows[:, :-1].numel())
        if everyone:
            t_logits = _chosen(t_logits, sel)
        return kl_rows(_chosen(logits, sel), t_logits) if bool(sel.any()) else None

    def end_step(self) -> dict[str, float]:
        """Count the step's teacher tokens (all ranks') and return its mean KL over the global
        batch's chosen rows (logged as kl_to_start)."""
        if not self.anchored:
            return {}
        total, tokens = self._kl_sum, self._tokens
        self._count(tokens)
        env = self.trainer.env
        if env.active:
            total = env.sum_scalar(total)
        return {"kl_to_start": total / self._n_sel} if self._n_sel else {}

    def _count(self, local_tokens: int) -> None:
        env = self.trainer.env
        tokens = env.sum_scalar(local_tokens) if env.active else local_tokens
        self.trainer.state.teacher_tokens += int(round(tokens))

    # ------------------------------------------------------- stored targets
    @torch.no_grad()
    def write_topk(self, buffer: ReplayBuffer, batch_size: int) -> None:
        """The start model's top-k of every seed row (fresh start, right after seeding)."""
        if self.store is None:
            return
        model, k = self.trainer.model, self.kl.top_k
        assert k is not None
        was = model.training
        model.eval()
        ids_out, logp_out, tokens = [], [], 0
        for first in range(0, buffer.seed_rows, batch_size):
            idx = np.arange(first, min(first + batch_size, buffer.seed_rows))
            rows = torch.from_numpy(buffer.read_rows(idx)[0]).to(self.trainer.env.device)
            with autocast_to(rows.device, self.trainer.autocast):
                logits = model(input_ids=rows[:, :-1]).logits
            tokens += int(rows[:, :-1].numel())
            ids, logp = topk_targets(logits, k)
            ids_out.append(ids.cpu().numpy())
            logp_out.append(logp.cpu().numpy())
        model.train(was)
        self._count(tokens)  # a collective: every rank seeds its own buffer, all get here
        if ids_out:
            self.store.write(np.concatenate(ids_out), np.concatenate(logp_out))
