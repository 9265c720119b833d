"""GradientDiagnostics on one process, against gradient_alignment itself: which steps it
measures, what the reference is (earlier tasks' replayed rows, else a probe of earlier tasks'
windows, never the current task), what it logs beside it, and that it changes nothing.
(Two ranks: test_alignment_ddp.py; in a whole run: test_trainer.py's reference runs.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cptrain.distributed import DistEnv
from cptrain.errors import CheckpointError
from cptrain.evaluation.losses import token_loss
from cptrain.models.build import build_model
from cptrain.train.alignment import gradient_alignment
from cptrain.train.diagnostics import GradientDiagnostics, row_losses
from cptrain.train.hooks import Batch

VOCAB, T = 64, 12


def rows(seed: int, n: int, low: int = 0, high: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, T + 1), dtype=np.int64)


class Stream:
    """A task's training windows; each task's tokens come from its own range."""

    def __init__(self, task: int) -> None:
        self.data = rows(10 + task, 16, low=16 * task, high=16 * (task + 1))
        self.n = len(self.data)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.data[idx]


class Buffer:
    def __init__(self, origins: np.ndarray | None) -> None:
        self.origins = origins

    def last_drawn(self, step: int) -> SimpleNamespace:
        return SimpleNamespace(tasks=None if self.origins is None else self.origins.copy())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("tiny", VOCAB, seed=0, max_positions=64)


def view(model, step: int = 5, origins=None, strategy: str = "none"):
    """What the hook reads of a run (a RunView's parts)."""
    return SimpleNamespace(
        env=DistEnv(strategy), model=model, autocast=None, state=SimpleNamespace(step=step),
        buffer=None if origins is None else Buffer(np.asarray(origins)),
        streams=[Stream(t) for t in range(3)],
    )  # fmt: skip


FRESH = rows(1, 4)


def cos(model, fresh: np.ndarray, ref: np.ndarray) -> float:
    return gradient_alignment(model, torch.from_numpy(fresh), torch.from_numpy(ref))["grad_cos"]


def test_measures_every_nth_step_only_and_never_a_sharded_model(model):
    hook = GradientDiagnostics(every=3, seed=0, probe_rows=2)
    measured = [s for s in range(9) if hook.before_step(view(model, s), Batch(1, FRESH, None))]
    assert measured == [2, 5, 8]  # before steps 3, 6, 9
    off = GradientDiagnostics(every=0, seed=0, probe_rows=2)
    assert all(off.before_step(view(model, s), Batch(1, FRESH, None)) == {} for s in range(4))
    fsdp = view(model, 2, strategy="fsdp2")
    assert hook.before_step(fsdp, Batch(1, FRESH, None)) == {}


def test_first_task_without_earlier_rows_logs_the_row_losses_alone(model):
    hook = GradientDiagnostics(every=1, seed=0, probe_rows=2)
    current = rows(2, 2)
    got = hook.before_step(view(model, origins=[0, 0]), Batch(0, FRESH, current))
    assert set(got) == {"loss_fresh", "loss_replay_current"}
    with torch.no_grad():
        assert got["loss_fresh"] == pytest.approx(
            float(token_loss(model, torch.from_numpy(FRESH), None)), rel=1e-6)
        assert got["loss_replay_current"] == pytest.approx(
            float(token_loss(model, torch.from_numpy(current), None)), rel=1e-6)
    assert hook.summary() == {}


def test_earlier_replayed_rows_are_the_reference_and_current_ones_are_logged_beside(model):
    hook = GradientDiagnostics(every=1, seed=0, probe_rows=2)
    replay = rows(3, 3, high=VOCAB // 4)
    got = hook.before_step(view(model, origins=[0, 1, 1]), Batch(1, FRESH, replay))
    earlier, current = replay[:1], replay[1:]
    assert got["grad_ref"] == "replay"
    assert (got["grad_cos_ref_rows"], got["grad_cos_fresh_rows"]) == (1, 4)
    assert got["grad_cos_current_ref_rows"] == 2
    assert got["replay_current_share"] == pytest.approx(2 / 3)
    assert got["grad_cos"] == pytest.approx(cos(model, FRESH, earlier), abs=1e-6)
    assert got["grad_cos_current"] == pytest.approx(cos(model, FRESH, current), abs=1e-6)
    assert got["loss_replay_earlier"] == got["loss_replay"]
    assert hook.summary() == {"grad_cos_mean": got["grad_cos"], "grad_cos_count": 1,
                              "grad_cos_ref_rows_mean": 1.0}


def test_seed_rows_count_as_earlier_even_in_the_first_task(model):
    hook = GradientDiagnostics(every=1, seed=0, probe_rows=2)
    replay = rows(4, 2)
    got = hook.before_step(view(model, origins=[-1, 0]), Batch(0, FRESH, replay))
    assert got["grad_ref"] == "replay" and got["grad_cos_ref_rows"] == 1
    assert got["grad_cos"] == pytest.approx(cos(model, FRESH, replay[:1]), abs=1e-6)
    assert hook.summary() == {}  # the run's mean counts cosines after the first task only


@pytest.mark.parametrize("origins", [[2, 2], None], ids=["all-current", "origins-unknown"])
def test_without_earlier_replayed_rows_the_reference_is_a_probe_of_earlier_tasks(model,
                                                                                 origins):
    hook = GradientDiagnostics(every=1, seed=7, probe_rows=3)
    run = view(model, origins=[] if origins is None else origins)
    if origins is None:
        run.buffer.origins = None  # the buffer cannot tell where its rows came from
    got = hook.before_step(run, Batch(2, FRESH, rows(5, 2)))
    assert got["grad_ref"] == "probe" and got["grad_cos_ref_rows"] == 3
    if origins is None:
        assert "replay_current_share" not in got  # none counts as earlier, nor as current
    else:
        assert got["replay_current_share"] == 1.0 and got["grad_cos_current_ref_rows"] == 2
    probe = hook._probe(run, Batch(2, FRESH, None))
    assert got["grad_cos"] == pytest.approx(cos(model, FRESH, probe), abs=1e-6)
    # windows of tasks 0 and 1 only, drawn the same way again at the same step, not at another
    earlier = {r.tobytes() for t in (0, 1) for r in run.streams[t].data}
    assert len(probe) == 3 and all(r.tobytes() in earlier for r in probe)
    assert np.array_equal(hook._probe(view(model), Batch(2, FRESH, None)), probe)
    assert not np.array_equal(hook._probe(view(model, step=6), Batch(2, FRESH, None)), probe)
    assert hook._probe(run, Batch(0, FRESH, None)) is None  # no earlier task to probe


def test_measuring_changes_no_weight_gradient_or_mode(model):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook = GradientDiagnostics(every=1, seed=0, probe_rows=2)
    for training in (True, False):
        model.train(training)
        hook.before_step(view(model, origins=[0, 1]), Batch(1, FRESH, rows(6, 2)))
        row_losses(view(model), {"fresh": FRESH})
        assert model.training is training
    model.train()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_row_losses_leave_out_empty_groups(model):
    got = row_losses(view(model), {"fresh": FRESH, "replay_current": FRESH[:0]})
    assert list(got) == ["loss_fresh"]


def test_state_round_trips_and_a_damaged_one_is_refused(model):
    hook = GradientDiagnostics(every=1, seed=0, probe_rows=2)
    hook.before_step(view(model, origins=[0, 1]), Batch(1, FRESH, rows(7, 2)))
    again = GradientDiagnostics(every=1, seed=0, probe_rows=2)
    again.load_state_dict(hook.state_dict())
    assert again.summary() == hook.summary() and again.summary()["grad_cos_count"] == 1
    # a checkpoint from before reference sizes were kept: the mean size is left out
    old = GradientDiagnostics(every=1, seed=0, probe_rows=2)
    old.load_state_dict({"cos_sum": 0.5, "cos_n": 2})
    assert old.summary() == {"grad_cos_mean": 0.25, "grad_cos_count": 2}
    for bad in ({}, {"cos_sum": "x", "cos_n": 1}, None):
        with pytest.raises(CheckpointError, match="diagnostics state is damaged"):
            GradientDiagnostics(every=1, seed=0, probe_rows=2).load_state_dict(bad)
