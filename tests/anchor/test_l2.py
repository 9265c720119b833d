"""L2 toward the start weights: the exact pull, after the optimizer's own update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cptrain.anchor.l2 import L2ToStart
from cptrain.models.build import build_model

VOCAB = 64


def tiny() -> torch.nn.Module:
    return build_model("tiny", VOCAB, seed=0, max_positions=32)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, VOCAB, (2, 9), generator=g)
    logits = model(input_ids=rows[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, VOCAB), rows[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("weight", [0.5, 20.0])
def test_l2_moves_the_weights_toward_the_start_by_exactly_lr_lambda_times_the_distance(weight):
    lr = 1e-2
    pulled, free = tiny(), tiny()
    start = {n: p.detach().clone() for n, p in pulled.named_parameters()}
    opt_a = torch.optim.AdamW(pulled.parameters(), lr=lr, weight_decay=0.1)
    opt_b = torch.optim.AdamW(free.parameters(), lr=lr, weight_decay=0.1)
    L2ToStart(pulled.parameters(), weight).attach(opt_a)
    step(pulled, opt_a, 0)  # the first step moves away from the start...
    # ...second step: from the same weights, the free model takes the optimizer's update alone
    free.load_state_dict(pulled.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    step(pulled, opt_a, 1)
    step(free, opt_b, 1)
    moved = 0.0
    for (name, a), (_, b) in zip(pulled.named_parameters(), free.named_parameters(), strict=True):
        theta, theta0 = b.detach().double(), start[name].double()
        want = theta - lr * weight * (theta - theta0)
        torch.testing.assert_close(a.detach().double(), want, rtol=0, atol=1e-7, msg=name)
        moved = max(moved, float((a.detach() - b.detach()).abs().max()))
    assert moved > 1e-6  # the pull did something at this λ


def test_weight_zero_changes_nothing_and_a_negative_weight_is_refused():
    a, b = tiny(), tiny()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    L2ToStart(a.parameters(), 0.0).attach(opt_a)
    step(a, opt_a, 0)
    step(b, opt_b, 0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="must be >= 0"):
        L2ToStart(a.parameters(), -1.0)


def test_distance_to_start_grows_with_training_and_shrinks_with_the_pull():
    free, pulled = tiny(), tiny()
    l2_free, l2_pulled = L2ToStart(free.parameters(), 0.0), L2ToStart(pulled.parameters(), 30.0)
    assert l2_free.distance() == 0.0
    opt_f = torch.optim.AdamW(free.parameters(), lr=1e-2)
    opt_p = torch.optim.AdamW(pulled.parameters(), lr=1e-2)
    l2_pulled.attach(opt_p)
    for s in range(3):
        step(free, opt_f, s)
        step(pulled, opt_p, s)
    assert 0 < l2_pulled.distance() < l2_free.distance()
