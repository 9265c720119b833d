"""The KL anchor's arithmetic: forward KL(p_start ‖ p_θ) per row, from the start model's full
logits or from its stored top-k log-probabilities. Computed in fp32 whatever the logits' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Log-probabilities are stored as float16 (2 bytes each, 1e-3 relative): stored targets are a
# cheap stand-in for the start model, not a bit-exact copy of it.
TOPK_LOGP_DTYPE = torch.float16


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) of each row ([n, T, V] logits → [n]), the mean over its tokens."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean(-1)


@torch.no_grad()
def topk_targets(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens of each position: (ids int64 [n, T, k], log-probabilities
    as stored, ``TOPK_LOGP_DTYPE``)."""
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids, values.to(TOPK_LOGP_DTYPE)


def topk_kl_rows(
    student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor
) -> torch.Tensor:
    """KL between the teacher and student distributions coarsened to the teacher's top k tokens
    plus one bucket for all others, per row ([n] as ``kl_rows``). Equal to the full KL when k
    is the vocabulary; never above it otherwise (coarsening only loses information)."""
    s_all = F.log_softmax(student_logits.float(), dim=-1)
    s = s_all.gather(-1, ids.long())
    t = teacher_logp.float()
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    # The rest bucket: mass outside the top k, for the teacher (stored values rounded: clamp)
    # and for the student (log1p of minus the top-k mass, clamped off log(0)).
    t_rest = (1 - t.exp().sum(-1)).clamp(min=0.0)
    s_rest = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = kl + torch.xlogy(t_rest, t_rest) - t_rest * s_rest
    return kl.mean(-1)
