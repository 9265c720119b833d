"""The KL anchor's arithmetic against hand computations."""

from __future__ import annotations

import math

import torch

from cptrain.anchor.kl import kl_rows, topk_kl_rows, topk_targets


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().view(1, 1, -1)


def test_kl_matches_a_hand_computation_on_planted_distributions():
    p, q = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]  # teacher p, student q
    want = 0.7 * math.log(3.5) + 0.2 * math.log(2 / 3) + 0.1 * math.log(0.2)  # 0.634897…
    got = kl_rows(logits_of(q), logits_of(p))
    assert abs(float(got) - want) < 1e-6
    assert abs(want - 0.634897) < 1e-6
    # forward KL(p‖q), not the reverse: the reverse of this pair is different
    reverse = sum(b * math.log(b / a) for a, b in zip(p, q, strict=True))
    assert abs(reverse - want) > 1e-3


def test_kl_is_the_mean_over_tokens_and_per_row():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    per_token = (lt.exp() * (lt - ls)).sum(-1)
    torch.testing.assert_close(kl_rows(s, t), per_token.mean(-1))
    assert torch.all(kl_rows(s, s) == 0)


def test_topk_with_k_the_vocabulary_equals_the_full_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 7, 13, generator=g), torch.randn(2, 7, 13, generator=g)
    ids, logp = topk_targets(t, 13)
    # float16 log-probabilities: equal to the stored precision
    torch.testing.assert_close(topk_kl_rows(s, ids, logp), kl_rows(s, t), rtol=2e-3, atol=2e-4)


def test_topk_below_the_vocabulary_never_exceeds_the_full_kl_and_is_not_trivial():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 9, 50, generator=g), 3 * torch.randn(4, 9, 50, generator=g)
    full = kl_rows(s, t)
    for k in (1, 5, 20):
        ids, logp = topk_targets(t, k)
        got = topk_kl_rows(s, ids, logp)
        assert torch.all(got >= -1e-6) and torch.all(got <= full + 1e-3), k
        assert torch.all(got > 0.1 * full), k  # the coarse KL still sees most of it


def test_topk_targets_are_the_most_likely_tokens_in_order():
    t = logits_of([0.1, 0.6, 0.05, 0.25])
    ids, logp = topk_targets(t, 2)
    assert ids.flatten().tolist() == [1, 3]
    torch.testing.assert_close(logp.float().exp().flatten(), torch.tensor([0.6, 0.25]),
                               rtol=1e-3, atol=0)
    assert logp.dtype == torch.float16


def test_topk_kl_gradient_flows_to_the_student():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 4, 20, generator=g, requires_grad=True)
    ids, logp = topk_targets(torch.randn(1, 4, 20, generator=g), 5)
    topk_kl_rows(s, ids, logp).sum().backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
