"""A real short run's summary.json gives forgetting both ways, and its gradient cosines carry
their reference size."""

from __future__ import annotations

import pytest
from conftest import read_metrics, read_summary

from cptrain.evaluation import metrics
from cptrain.train import Trainer


def test_summary_of_a_short_run_carries_the_paper_code_forgetting(make_config):
    cfg = make_config(
        "paper_code",
        method="replay",
        replay={"alpha": 0.25, "visibility_lag": 1},
        eval={"every": 4},
        diagnostics={"every": 2},
    )
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    s = read_summary(cfg.run_dir)
    lm = s["loss_matrix"]
    n = len(lm)
    assert n == 3
    assert s["warnings"] == []  # α = 0.25 of 8 rows is exact, and no task repeats its windows
    # task-end: the official code's sign and averaging over the same rows as cptrain's
    assert s["forgetting_paper_code"] == pytest.approx(-(n - 1) / n * s["forgetting_task_end"])
    assert s["forgetting_paper_code_per_task"][-1] == 0.0
    assert len(s["forgetting_paper_code_per_task"]) == n
    # in-loop: the periodic evaluations (eval.every) in place of the official checkpoints
    evals = trainer.state.periodic_evaluations()
    assert evals, "no periodic evaluation: the in-loop figure is not exercised"
    assert s["forgetting_paper_code_in_loop"] == pytest.approx(
        metrics.forgetting_paper_code_in_loop(lm, evals)
    )
    # gradient cosines: every record says over how many rows either gradient was taken
    diag = [r for r in read_metrics(cfg.run_dir, "train") if "grad_cos" in r]
    assert diag and all(r["grad_cos_ref_rows"] >= 1 for r in diag)
    assert all(r["grad_cos_fresh_rows"] == s["rows_per_step"]["fresh"] for r in diag)
    assert s["grad_cos_ref_rows_mean"] >= 1
    # row losses are logged in every task, the first included, where no cosine exists
    rows = [r for r in read_metrics(cfg.run_dir, "train") if "loss_fresh" in r]
    first = [r for r in rows if r["task"] == cfg.data.tasks[0].name]
    assert first and not any("grad_cos" in r or "loss_replay_earlier" in r for r in first)
    assert any("loss_replay_current" in r for r in first)
    assert any("loss_replay_earlier" in r for r in rows if r not in first)


def test_every_row_weighs_the_same_in_a_mixed_batchs_loss(make_config):
    """A step's loss is the token mean over all its rows, fresh and replayed alike: it equals
    the row-count-weighted mean of the fresh and replayed rows' losses (measured apart, at the
    same weights), with micro-batches splitting the batch anywhere."""
    cfg = make_config(
        "weights", method="replay", replay={"alpha": 0.25, "visibility_lag": 1},
        train={"log_every": 1, "micro_batch_size": 3},
        data={"tasks": ["email", "xml"]}, diagnostics={"every": 1},
    )
    Trainer(cfg, progress=False).run()
    checked = 0
    for r in read_metrics(cfg.run_dir, "train"):
        groups = [(k, r[f"loss_{k}"]) for k in ("fresh", "replay_current", "replay_earlier")
                  if f"loss_{k}" in r]
        if len(groups) < 2 or r["replay_rows"] == 0:
            continue
        n_rep = r["replay_rows"]
        n_fresh = 8 - n_rep
        share = r.get("replay_current_share", 1.0)
        counts = {"fresh": n_fresh, "replay_current": n_rep * share,
                  "replay_earlier": n_rep * (1 - share)}
        mean = sum(counts[k] * v for k, v in groups) / sum(counts[k] for k, _ in groups)
        assert r["loss"] == pytest.approx(mean, rel=1e-5), r
        checked += 1
    assert checked >= 10
