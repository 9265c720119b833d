"""The same run three ways, one process, fp32: `cptrain train`, the transformers `Trainer`
integration and the README's plain PyTorch loop (examples/plain_loop.py). Each step trains on
the rows `cptrain train` trains it on, and the loss matrices agree to 1e-5."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_config

from integrations.common import MER, cptrain_train, digest, start_model

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("equal")


@pytest.fixture(scope="module")
def model_dir(root, prepared_dir):
    return start_model(root, prepared_dir)


def test_trainer_integration_equals_cptrain_train(root, prepared_dir, model_dir):
    from transformers import AutoModelForCausalLM

    from cptrain.integrations.transformers import ContinualTrainer, training_arguments
    from cptrain.rundir.run_dir import RunDir

    settings = {**MER, "model": {"init_from": str(model_dir)}, "eval": {"every": 4}}
    ref, rows = cptrain_train(tiny_run_config(root / "cptrain", prepared_dir, **settings))
    cfg = tiny_run_config(root / "hf", prepared_dir, **settings)
    args = training_arguments(cfg, root / "hf" / "checkpoints", report_to=["tensorboard"])
    trainer = ContinualTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args, config=cfg)
    seen = {}
    trainer.dataset.on_rows = lambda r: seen.setdefault(r.step, r)
    trainer.train()
    # the data: every step's fresh and replayed rows, in order
    assert sorted(seen) == sorted(rows.rows) == list(range(12))
    for step, (task, fresh, replay) in rows.rows.items():
        got = seen[step]
        assert got.task == task
        np.testing.assert_array_equal(got.fresh, fresh)
        assert digest(got.replay) == digest(replay), f"step {step}: other replayed rows"
    assert sum(len(r.replay) for r in seen.values() if r.replay is not None) > 12
    # the result, read back from the run directory as `cptrain eval` reads it
    got = RunDir.open(cfg.run_dir).summary()
    np.testing.assert_allclose(got["loss_before"]["email"], ref["loss_before"]["email"],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], rtol=0, atol=1e-5)
    assert got["forgetting"] == pytest.approx(ref["forgetting"], abs=1e-5)  # eval.every too
    assert got["complete"] and len(RunDir.open(cfg.run_dir).task_models()) == 2
    # the compute accounting the report's table reads: the same as `cptrain train`'s
    for key in ("params", "fresh_tokens", "replay_tokens", "reptile_updates", "precision",
                "model_shape", "rows_per_step"):
        assert got[key] == ref[key], key
    assert got["flops"] == ref["flops"] and got["flops"]["reptile_updates"] == 4  # 12 steps, k=3
    assert 0 < got["wall_s"] < ref["wall_s"] * 20
    train_lines = [r for r in RunDir.open(cfg.run_dir).records() if r["type"] == "train"]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 8, 10, 12]  # train.log_every: 2
    assert train_lines[-1]["task"] == "xml" and train_lines[0]["loss"] > 0
    logged = [h for h in trainer.state.log_history if "eval_email_loss" in h]
    assert len(logged) == 1 + 2 + 2  # before, two task ends, eval.every at steps 4 and 8
    # TensorBoard shows them as eval/<task>_loss: the forgetting curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (root / "hf" / "checkpoints" / "runs").glob("*")
    board = EventAccumulator(str(events))
    board.Reload()
    curve = board.Scalars("eval/email_loss")
    assert [e.step for e in curve] == [0, 4, 6, 8, 12]
    assert curve[-1].value == pytest.approx(got["loss_matrix"][1][0])
    assert "eval/asyncio_loss" not in board.Tags()["scalars"]  # not a column of this run


def test_plain_loop_example_equals_cptrain_train(root, prepared_dir, model_dir):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import plain_loop
    finally:
        sys.path.remove(str(EXAMPLES))
    # the example's loop has a constant learning rate: so has this `cptrain train` run
    settings = {**MER, "model": {"init_from": str(model_dir)},
                "train": {"schedule": "constant", "warmup": 0.0}}
    ref, _ = cptrain_train(tiny_run_config(root / "cptrain_constant", prepared_dir, **settings))
    plain_loop.main(["--data", str(prepared_dir), "--model", str(model_dir),
                     "--tasks", "email", "xml", "--run-dir", str(root / "plain")])
    from cptrain.rundir.run_dir import RunDir

    got = RunDir.open(root / "plain").summary()
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], rtol=0, atol=1e-5)
    assert got["config"]["method"] == "mer"


def test_kl_mixin_equals_cptrains_kl_anchor(root, prepared_dir, model_dir):
    from transformers import AutoModelForCausalLM

    from cptrain.errors import ConfigError
    from cptrain.integrations.transformers import (
        ContinualTrainer,
        KLToStartMixin,
        training_arguments,
    )
    from cptrain.rundir.run_dir import RunDir

    settings = {**MER, "model": {"init_from": str(model_dir)},
                "regularize": {"kl_to_start": {"weight": 1.0}}}
    ref, _ = cptrain_train(tiny_run_config(root / "cptrain_kl", prepared_dir, **settings))
    cfg = tiny_run_config(root / "hf_kl", prepared_dir, **settings)
    args = training_arguments(cfg, root / "hf_kl" / "checkpoints")
    with pytest.raises(ConfigError, match="KLToStartMixin"):
        ContinualTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args, config=cfg)

    class KLTrainer(KLToStartMixin, ContinualTrainer):
        pass

    trainer = KLTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args, config=cfg)
    trainer.train()
    got = RunDir.open(cfg.run_dir).summary()
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], rtol=0, atol=1e-5)
    assert got["teacher_tokens"] == ref["teacher_tokens"] > 0  # the start model's forwards
    assert got["flops"]["total_flops"] == ref["flops"]["total_flops"]
    assert trainer.last_kl is not None and trainer.last_kl > 0
