"""Issue 12, item 1: comparisons between methods measure the methods, not an accident of setup.

Joint training gets each task's share of the sequential budget; the gradient-alignment reference
is rows of earlier tasks only; forgetting counts every evaluation after a task was trained; a
task's windows do not depend on where it sits in the order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import read_metrics, tiny_run_config

from cptrain.config import RunConfig
from cptrain.errors import CheckpointError
from cptrain.evaluation import metrics
from cptrain.train import Trainer, train
from cptrain.train.batches import BatchPlan, JointSampler, make_sampler, task_key
from cptrain.train.data import TrainingData
from cptrain.train.hooks import Hook
from cptrain.train.state import TrainerState

TASKS = ["email", "xml", "asyncio"]


def joint_sampler(cfg: RunConfig) -> tuple[Any, TrainingData, BatchPlan]:
    data = TrainingData(cfg)
    plan = BatchPlan.build(cfg, 1, 0)
    return make_sampler(cfg, data.streams, plan, data.train_tokens), data, plan


# ------------------------------------------------------------- 1. joint mixture by budget
def test_joint_default_weights_are_the_task_budgets(make_config):
    sampler, data, _ = joint_sampler(make_config("w", method="joint"))
    sizes = np.array(data.train_tokens, dtype=np.float64)
    assert sizes.max() / sizes.min() > 1.5, "the fixture tasks must differ in size"
    assert sampler.p == pytest.approx([1 / 3] * 3)
    # unequal budgets: the share of steps sequential gives each task
    tasks = [{"name": "email", "tokens": 8 * 32 * 12}, "xml", "asyncio"]
    sampler, _, plan = joint_sampler(make_config("u", method="joint", data={"tasks": tasks}))
    assert plan.task_steps == (12, 6, 6)
    assert sampler.p == pytest.approx([0.5, 0.25, 0.25])


def test_joint_size_weighting_and_explicit_weights(make_config):
    sampler, data, _ = joint_sampler(
        make_config("s", method="joint", data={"joint_weighting": "size"})
    )
    sizes = np.array(data.train_tokens, dtype=np.float64)
    assert sampler.p == pytest.approx(sizes / sizes.sum())
    explicit = {"joint_weighting": "size", "joint_weights": [1.0, 1.0, 2.0]}
    sampler, _, _ = joint_sampler(make_config("e", method="joint", data=explicit))
    assert sampler.p == pytest.approx([0.25, 0.25, 0.5])


def test_joint_run_draws_each_task_with_equal_budget_weights(make_config):
    cfg = make_config("joint", method="joint")
    trainer = Trainer(cfg, progress=False)
    summary = trainer.run()
    cursors = list(trainer.sampler.cursors)
    assert sum(cursors) == summary["steps"] * cfg.train.batch_size
    # the run's fresh rows per task are those of an equal-weight mixture, draw for draw
    data = TrainingData(cfg)
    equal = JointSampler(data.streams, trainer.plan, np.ones(3), cfg.seed)
    for step in range(summary["steps"]):
        equal.draw(0, step)
    assert cursors == equal.cursors
    sizes = np.array(data.train_tokens, dtype=np.float64)
    by_size = JointSampler(data.streams, trainer.plan, sizes, cfg.seed)
    for step in range(summary["steps"]):
        by_size.draw(0, step)
    assert cursors != by_size.cursors, "shard-size weights would have drawn other rows"


# ------------------------------------------------- 2. alignment reference: earlier tasks only
def task_windows(data: TrainingData) -> list[set[bytes]]:
    out = []
    for stream in data.streams:
        rows = stream.rows(np.arange(stream.n)).astype(np.int64)
        out.append({r.tobytes() for r in rows})
    return out


class Taps(Hook):
    """Each step's task and replayed rows, and how many alignment calls preceded it."""

    def __init__(self, calls: list[np.ndarray]) -> None:
        self.calls = calls
        self.steps: list[tuple[int, int, np.ndarray | None, int]] = []

    def before_step(self, trainer, batch):
        replay = None if batch.replay is None else batch.replay.copy()
        self.steps.append((trainer.state.step, batch.task, replay, len(self.calls)))
        return {}


def test_alignment_reference_holds_no_current_task_row(make_config, monkeypatch):
    import cptrain.train.alignment as alignment

    calls: list[list[np.ndarray]] = []  # the row sets of each measurement
    real = alignment.gradient_alignments

    def spy(model, fresh, references, **kw):
        calls.append([r.cpu().numpy().copy() for r in references])
        return real(model, fresh, references, **kw)

    monkeypatch.setattr(alignment, "gradient_alignments", spy)
    taps = Taps(calls)
    replay = {"alpha": 0.5, "visibility_lag": 0, "replay_from": "all"}
    cfg = make_config("diag", method="replay", replay=replay, diagnostics={"every": 1})
    trainer = Trainer(cfg, progress=False, hooks=[taps])
    trainer.run()
    windows = task_windows(trainer.data)
    logged = {r["step"]: r for r in read_metrics(cfg.run_dir, "train") if "grad_cos" in r}
    mixed = 0
    start = 0
    for step, task, rows, end in taps.steps:
        step_calls, start = calls[start:end], end
        if not step_calls:
            continue
        (sets,) = step_calls  # one measurement per step, the fresh gradient computed once
        reference = sets[0]
        assert not any(r.tobytes() in windows[task] for r in reference), step
        assert rows is not None
        current = np.array([r.tobytes() in windows[task] for r in rows])
        rec = logged[step + 1]
        # the share the buffer's metadata reports is what the rows' contents say
        assert rec["replay_current_share"] == pytest.approx(current.mean())
        assert ("grad_cos_current" in rec) == bool(current.any()) == (len(sets) == 2)
        if current.any():
            mixed += 1
            got = {r.tobytes() for r in sets[1]}
            assert got == {r.tobytes() for r in rows[current]}
        assert rec["grad_ref"] == ("replay" if not current.all() else "probe")
    assert mixed > 0, "no step replayed current-task rows: the test proves nothing"


# ------------------------------------------------ 3. forgetting over the whole eval history
L = [
    [2.0, 5.0, 6.0],
    [3.0, 2.5, 5.5],
    [3.5, 2.2, 1.8],
]


def test_periodic_evaluation_below_every_task_end_row_counts():
    assert metrics.forgetting_per_task_history(L, []) == pytest.approx([1.5, -0.3])
    # during task 1 (1 task done) en reached 1.7, below rows 0 and 1; during task 2 fr 2.0
    evals = [(1, [1.7, 4.0, 6.0]), (2, [3.2, 2.0, 3.0])]
    assert metrics.forgetting_per_task_history(L, evals) == pytest.approx([1.8, 0.2])
    assert metrics.average_forgetting_history(L, evals) == pytest.approx(1.0)
    s = metrics.summarize(L, evals)
    assert s["forgetting"] == pytest.approx(1.0)
    assert s["forgetting_per_task"] == pytest.approx([1.8, 0.2])
    assert s["forgetting_task_end"] == pytest.approx(0.6)
    assert s["forgetting_task_end_per_task"] == pytest.approx([1.5, -0.3])


def test_evaluations_before_a_task_ended_or_after_the_final_row_do_not_count():
    # en at 0.5 while en itself trained (0 done); fr at 0.1 during task 1 (fr's own training);
    # both at 0.0 after the final row of a partial matrix
    evals = [(0, [0.5, 9.0, 9.0]), (1, [9.0, 0.1, 9.0]), (3, [0.0, 0.0, 0.0])]
    assert metrics.forgetting_per_task_history(L, evals) == pytest.approx([1.5, -0.3])
    part = L[:2]
    assert metrics.forgetting_per_task_history(part, [(2, [0.0, 0.0, 0.0])]) == [1.0]
    assert metrics.average_forgetting_history([[2.0, 4.0]], [(1, [0.0, 0.0])]) is None


def eval_history_from_metrics(run_dir: Path) -> list[tuple[int, list[float]]]:
    out = []
    for r in read_metrics(run_dir, "eval"):
        out.append((TASKS.index(r["task"]), [r["val_loss"][n] for n in TASKS]))
    return out


@pytest.fixture(scope="module")
def periodic_run(prepared_dir, tmp_path_factory):
    cfg = tiny_run_config(
        tmp_path_factory.mktemp("periodic") / "run",
        prepared_dir,
        eval={"every": 4},
        checkpoint={"every": 4},
    )
    return cfg, train(cfg, progress=False)


def test_run_forgetting_counts_the_periodic_evaluations(periodic_run):
    cfg, summary = periodic_run
    evals = eval_history_from_metrics(Path(cfg.run_dir))
    assert [done for done, _ in evals] == [0, 1, 2]  # steps 4, 8, 16 (12 is a task end)
    lm = summary["loss_matrix"]
    assert summary["forgetting_per_task"] == pytest.approx(
        metrics.forgetting_per_task_history(lm, evals)
    )
    assert summary["forgetting_task_end_per_task"] == pytest.approx(metrics.forgetting_per_task(lm))
    assert summary["forgetting"] == pytest.approx(metrics.average_forgetting_history(lm, evals))
    # more evaluations can only find a lower best loss
    for hist, end in zip(
        summary["forgetting_per_task"], summary["forgetting_task_end_per_task"], strict=True
    ):
        assert hist >= end - 1e-12


def test_eval_history_survives_a_resume(periodic_run, make_config):
    ref_cfg, ref = periodic_run
    part = make_config("part", eval={"every": 4}, checkpoint={"every": 4})
    stopped = Trainer(part, progress=False, stop_after=10)
    stopped.run()
    assert [e["step"] for e in stopped.state.eval_history] == [4, 8]
    del stopped
    resumed = Trainer(part, resume=True, progress=False)
    assert [e["step"] for e in resumed.state.eval_history] == [4, 8]  # checkpoint of step 8
    summary = resumed.run()
    assert [e["step"] for e in resumed.state.eval_history] == [4, 8, 16]
    assert summary["loss_matrix"] == ref["loss_matrix"]
    assert summary["forgetting_per_task"] == ref["forgetting_per_task"]


def test_trainer_state_round_trips_its_eval_history():
    st = TrainerState(step=5, task_idx=1, run_id="r")
    st.record_eval([1.0, 2.0])
    back = TrainerState()
    back.load_state_dict(st.state_dict())
    assert back == st and back.periodic_evaluations() == [(1, [1.0, 2.0])]
    old = st.state_dict()
    del old["eval_history"]  # a checkpoint written before the history existed
    back.load_state_dict(old)
    assert back.eval_history == []
    with pytest.raises(CheckpointError, match="eval_history"):
        back.load_state_dict({**st.state_dict(), "eval_history": [{"step": 1}]})


# ------------------------------------------------ 4. window order keyed by the task's name
def test_a_task_gets_the_same_windows_at_any_position(make_config):
    first = TrainingData(make_config("a", data={"tasks": ["email", "xml", "asyncio"]}))
    last = TrainingData(make_config("b", data={"tasks": ["xml", "asyncio", "email"]}))
    a, b = first.streams[0], last.streams[2]
    assert np.array_equal(a.indices(0, 2 * a.n + 7), b.indices(0, 2 * b.n + 7))
    # other tasks keep distinct orders
    assert not np.array_equal(first.streams[1].indices(0, 50), a.indices(0, 50))


def test_task_key_is_a_stable_63_bit_digest():
    want = int.from_bytes(hashlib.sha256(b"email").digest()[:8], "big") >> 1
    assert task_key("email") == want and 0 <= want < 2**63
    assert task_key("fr") != task_key("de")
