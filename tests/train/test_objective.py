"""The anchors to the start model inside real runs: the KL is zero where the model is the start
model, counted in FLOPs, on the rows it should be, equal in its top-k form at k = vocabulary,
and every variant resumes bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import model_after, read_metrics

from cptrain.train import Trainer, train

TWO = {"data": {"tasks": ["email", "xml"]}, "train": {"log_every": 1}}
SEED = [{"source": "task", "task": "asyncio", "tokens": 32 * 12}]


def anchored(**regularize: Any) -> dict[str, Any]:
    return {"regularize": regularize}


def test_kl_is_zero_and_gradients_unchanged_when_the_model_is_the_start_model(make_config):
    trainer = Trainer(make_config("start", method="kl", **TWO), progress=False)
    rows, _ = trainer.sampler.draw(0, 0)
    part = torch.from_numpy(rows)
    obj = trainer.objective
    obj.begin_step(len(rows), None, 0, len(rows), len(rows))
    ce, term = obj.loss(trainer.forward_model, part, 0)
    assert term is not None and float(term.detach()) == 0.0
    (ce * len(rows) + term).backward()
    with_kl = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    ce, _ = obj.loss(trainer.forward_model, part, 0)
    (ce * len(rows)).backward()
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(with_kl[n], p.grad, rtol=0, atol=1e-6, msg=n)
    trainer.close()


def test_a_kl_run_logs_the_kl_and_counts_the_teachers_forward_in_flops(make_config):
    plain = train(make_config("plain", method="sequential", **TWO), progress=False)
    kl = train(make_config("kl", method="kl", **TWO), progress=False)
    cfg_kl = make_config("kl", method="kl", **TWO)
    logged = [r["kl_to_start"] for r in read_metrics(cfg_kl.run_dir, "train")]
    assert logged[0] == 0.0 and all(x > 0 for x in logged[1:])  # step 0: the start model
    assert kl["teacher_tokens"] == kl["fresh_tokens"]  # rows: all, every row once
    f, g = kl["flops"], plain["flops"]
    assert f["teacher_flops"] == f["flops_per_token"] * kl["teacher_tokens"] // 3
    assert f["total_flops"] == g["total_flops"] + f["teacher_flops"]
    assert f["flops_per_incoming_token"] == pytest.approx(g["flops_per_incoming_token"] * 4 / 3)
    assert kl["loss_matrix"] != plain["loss_matrix"]
    assert plain["teacher_tokens"] == 0


def test_kl_on_replayed_rows_runs_the_teacher_on_those_rows_only(make_config):
    cfg = make_config("kl-replay", method="kl-replay", replay={"visibility_lag": 1},
                      **TWO, **anchored(kl_to_start={"rows": "replay"}))
    out = train(cfg, progress=False)
    assert 0 < out["teacher_tokens"] == out["replay_tokens"]
    logged = [r.get("kl_to_start") for r in read_metrics(cfg.run_dir, "train")]
    assert logged[0] is None  # nothing replayed at step 0 (visibility lag): no KL
    assert any(x is not None and x > 0 for x in logged)


def test_topk_at_the_vocabulary_equals_the_full_kl_on_seed_rows(make_config, prepared_dir):
    import json

    vocab = json.loads((prepared_dir / "prepare.json").read_text())["tokenizer"]["vocab_size"]
    common = {"method": "kl-replay", "replay": {"visibility_lag": 0, "seed": SEED}, **TWO}
    full_cfg = make_config("full", **common, **anchored(kl_to_start={"rows": "seed"}))
    topk_cfg = make_config("topk", **common,
                           **anchored(kl_to_start={"rows": "seed", "top_k": vocab}))
    full, topk = train(full_cfg, progress=False), train(topk_cfg, progress=False)
    stored = list((Path(topk_cfg.run_dir) / "replay" / "rank_0").glob(f"seed_top{vocab}_*.npy"))
    assert len(stored) == 2
    a = [r.get("kl_to_start") for r in read_metrics(full_cfg.run_dir, "train")]
    b = [r.get("kl_to_start") for r in read_metrics(topk_cfg.run_dir, "train")]
    assert a[0] == 0.0 and b[0] == pytest.approx(0.0, abs=2e-3)  # float16 targets
    # the same draws: no seed row drawn, no KL, in both runs
    assert [x is None for x in a] == [x is None for x in b]
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None]
    assert sum(x > 0 for x, _ in pairs) >= 3
    assert [y for _, y in pairs] == pytest.approx([x for x, _ in pairs], rel=2e-2, abs=2e-3)
    # the teacher ran on the seed rows once (top-k) against on every drawn seed row (full)
    assert topk["teacher_tokens"] == full["replay"]["seed_rows"] * 32
    assert full["teacher_tokens"] > 0


VARIANTS = {
    "kl": {"method": "kl"},
    "l2": {"method": "l2"},
    "kl-topk-mer": {"method": "kl-replay", "reptile": {"enabled": True, "k": 3, "epsilon": 0.5},
                    "replay": {"visibility_lag": 1, "seed": SEED},
                    **anchored(kl_to_start={"rows": "seed", "top_k": 16})},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_is_bit_identical_with_each_anchor(make_config, variant):
    extra = {**VARIANTS[variant], "data": {"tasks": ["email", "xml"]}}
    ref = train(make_config(f"{variant}-ref", **extra), progress=False)
    part = make_config(f"{variant}-part", checkpoint={"every": 4}, **extra)
    Trainer(part, progress=False, stop_after=9).run()  # one step past the step-8 checkpoint
    resumed = train(part, resume=True, progress=False)
    assert resumed["loss_matrix"] == ref["loss_matrix"]
    got = model_after(part.run_dir, 1)
    want = model_after(Path(part.run_dir).with_name(f"{variant}-ref"), 1)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["teacher_tokens"] == ref["teacher_tokens"]
