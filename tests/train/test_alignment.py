"""gradient_alignment against brute force: two separate backward passes into .grad."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cptrain.errors import DataError
from cptrain.models.build import build_model
from cptrain.train.alignment import (
    cosine_from_sums,
    dot_and_sq_norms,
    gradient_alignment,
    gradient_alignments,
)

VOCAB = 64


def rows(seed: int, n: int = 3, t: int = 12, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, (n, t + 1), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("tiny", VOCAB, seed=0, max_positions=64)


def brute_grads(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch[:, :-1]).logits
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    loss.backward()
    flat = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return flat, loss.item()


def test_matches_two_brute_force_backward_passes(model):
    # Replay rows drawn from another token range, so the two gradients really differ.
    fresh, replay = rows(1), rows(2, n=5, high=VOCAB // 4)
    got = gradient_alignment(model, fresh, replay)
    gf, lf = brute_grads(model, fresh)
    gr, lr = brute_grads(model, replay)
    expected_cos = F.cosine_similarity(gf, gr, dim=0).item()
    assert got["grad_cos"] == pytest.approx(expected_cos, abs=1e-6)
    assert got["grad_norm_fresh"] == pytest.approx(gf.norm().item(), rel=1e-5)
    assert got["grad_norm_replay"] == pytest.approx(gr.norm().item(), rel=1e-5)
    assert got["loss_fresh"] == pytest.approx(lf, rel=1e-6)
    assert got["loss_replay"] == pytest.approx(lr, rel=1e-6)
    assert abs(got["grad_cos"]) < 0.99


def test_several_references_share_one_fresh_gradient(model):
    fresh, refs = rows(1), [rows(2, high=VOCAB // 2), rows(3, n=2)]
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        got = gradient_alignments(model, fresh, refs)
    finally:
        handle.remove()
    assert len(forwards) == 1 + len(refs)
    assert got == [gradient_alignment(model, fresh, r) for r in refs]  # to the last bit
    assert got[0]["grad_cos"] != got[1]["grad_cos"]


def test_identical_batches_have_cosine_one(model):
    batch = rows(3)
    got = gradient_alignment(model, batch, batch.clone())
    assert got["grad_cos"] == pytest.approx(1.0, abs=1e-9)
    assert got["grad_norm_fresh"] == pytest.approx(got["grad_norm_replay"], rel=1e-12)
    assert got["grad_norm_fresh"] > 0


def test_grad_buffers_are_untouched(model):
    marks = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if i % 2 == 0:  # half hold an accumulated gradient, half have none
            p.grad = torch.full_like(p, float(i))
            marks[name] = p.grad.clone()
    try:
        gradient_alignment(model, rows(4), rows(5))
        for name, p in model.named_parameters():
            if name in marks:
                assert torch.equal(p.grad, marks[name]), name
            else:
                assert p.grad is None, name
    finally:
        model.zero_grad(set_to_none=True)


def test_bf16_autocast_close_to_fp32(model):
    fresh, replay = rows(6), rows(7, high=VOCAB // 4)
    fp32 = gradient_alignment(model, fresh, replay)
    bf16 = gradient_alignment(model, fresh, replay, autocast_dtype=torch.bfloat16)
    assert bf16["grad_cos"] == pytest.approx(fp32["grad_cos"], abs=0.05)
    assert bf16["grad_norm_fresh"] == pytest.approx(fp32["grad_norm_fresh"], rel=0.05)


def test_frozen_parameters_are_left_out():
    model = build_model("tiny", VOCAB, seed=0, max_positions=64)
    batch = rows(8)
    full = gradient_alignment(model, batch, rows(9))
    for p in model.parameters():
        p.requires_grad_(p is model.lm_head.weight)
    only_head = gradient_alignment(model, batch, rows(9))
    logits_grad_norm = brute_head_norm(model, batch)
    assert only_head["grad_norm_fresh"] == pytest.approx(logits_grad_norm, rel=1e-5)
    assert only_head["grad_norm_fresh"] < full["grad_norm_fresh"]


def brute_head_norm(model, batch) -> float:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch[:, :-1]).logits
    F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).backward()
    norm = model.lm_head.weight.grad.norm().item()
    model.zero_grad(set_to_none=True)
    return norm


@pytest.mark.parametrize(
    "bad",
    [
        torch.arange(13),  # 1-D
        torch.zeros(2, 13),  # float tokens
        torch.zeros(0, 13, dtype=torch.long),  # no rows (a batch without replay)
        torch.zeros(2, 1, dtype=torch.long),  # no next token
    ],
)
def test_bad_rows_are_one_line_data_errors(model, bad):
    with pytest.raises(DataError) as exc:
        gradient_alignment(model, rows(1), bad)
    assert "\n" not in str(exc.value) and "replay" in str(exc.value)


def test_reductions():
    xs = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    ys = [torch.tensor([1.0, 2.0]), torch.tensor([[-1.0]])]
    dot, nx, ny = (t.item() for t in dot_and_sq_norms(xs, ys))
    assert (dot, nx, ny) == (3.0 - 4.0, 25.0, 6.0)
    assert cosine_from_sums(dot, nx, ny) == pytest.approx(-1.0 / (5.0 * math.sqrt(6.0)))
    assert math.isnan(cosine_from_sums(0.0, 0.0, 6.0))
