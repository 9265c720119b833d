"""run_summary: what a run measured (loss matrix, forgetting, throughput) and the facts
reports need to read it (config, tasks, shape, batch mix, precision, threads, warnings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cptrain.train import Trainer
from cptrain.train.summary import run_summary


def test_a_run_not_yet_trained_reports_its_facts_and_no_measurement(make_config):
    cfg = make_config("unstarted", method="replay", replay={"alpha": 0.3})
    trainer = Trainer(cfg, progress=False)
    trainer.close()
    s = run_summary(trainer)
    assert s["config"] == cfg.model_dump(mode="json")
    assert s["tasks"] == ["email", "xml", "asyncio"] and s["eval_only"] == []
    assert (s["steps"], s["loss_matrix"], s["loss_before"]) == (0, [], {})
    assert s["task_steps"] == [6, 6, 6] and not s["complete"]
    assert s["rows_per_step"] == {"fresh": 6, "replay": 2}
    assert s["model_shape"]["layers"] == 2 and s["params"] == trainer.n_params
    assert s["precision"] == "fp32" and s["threads"] == torch.get_num_threads()
    assert s["config"]["train"]["precision"] == s["precision"]  # resolved, inside the config
    assert s["warnings"] == trainer.warnings and "25.0%, not 30.0%" in s["warnings"][0]
    assert s["replay"] == trainer.buffer.stats()
    assert "forgetting" not in s and "union_loss" not in s and "grad_cos_mean" not in s


def test_a_finished_run_reports_its_losses_and_forgetting(make_config):
    cfg = make_config("short", data={"tasks": ["email", "xml"], "eval_only": ["asyncio"],
                                     "tokens_per_task": 8 * 32 * 2})
    trainer = Trainer(cfg, progress=False)
    summary = trainer.run()
    s = run_summary(trainer)
    assert s["loss_matrix"] == summary["loss_matrix"] and s["complete"]
    lm = np.array(s["loss_matrix"])
    assert lm.shape == (2, 3) and s["steps"] == sum(s["task_steps"]) == 4
    assert s["fresh_tokens"] == 4 * 8 * 32 and s["replay_tokens"] == 0
    assert list(s["loss_before"]) == ["email", "xml", "asyncio"]
    final = {"email": lm[-1, 0], "xml": lm[-1, 1]}
    assert s["union_loss"] == pytest.approx(trainer.data.union_loss(final, cfg.eval.windows))
    assert s["eval_only_forgetting"]["asyncio"] == pytest.approx(
        lm[-1, 2] - s["loss_before"]["asyncio"])
    assert "forgetting" in s and "replay" not in s
    assert s["train_s"] > 0 and s["tokens_per_s"] > 0 and s["flops"]
