"""The trainer's own counters (cptrain.train.state.TrainerState) and their checkpoint state."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from cptrain.errors import CheckpointError
from cptrain.train.state import TrainerState

KEYS = {"step", "task_idx", "task_step", "loss_matrix", "loss_before", "eval_history",
        "fresh_tokens", "replay_tokens", "teacher_tokens", "wall_s", "run_id"}


def busy() -> TrainerState:
    s = TrainerState(step=7, task_idx=1, task_step=2, loss_matrix=[[3.0, 5.0]],
                     loss_before=[4.0, 4.5], fresh_tokens=1792, replay_tokens=256, wall_s=1.5,
                     run_id="ab" * 16)
    s.record_eval([3.5, 4.25])
    return s


def test_a_new_state_is_at_the_start():
    s = TrainerState()
    assert {f.name for f in fields(s)} == KEYS
    assert (s.step, s.task_idx, s.task_step, s.fresh_tokens, s.replay_tokens) == (0, 0, 0, 0, 0)
    assert s.loss_matrix == s.loss_before == s.eval_history == [] and s.wall_s == 0.0
    assert s.run_id == "" and s.periodic_evaluations() == []
    TrainerState().loss_matrix.append([1.0])
    assert TrainerState().loss_matrix == []  # no list shared between states


def test_record_eval_keeps_when_it_was_made():
    s = TrainerState(step=4, task_idx=0)
    losses = [5.0, 6.0, 7.0]
    s.record_eval(losses)
    s.step, s.task_idx = 9, 1
    s.record_eval([4.0, 5.5, 7.5])
    losses.append(0.0)  # the caller's list is copied
    assert s.eval_history == [
        {"step": 4, "tasks_done": 0, "losses": [5.0, 6.0, 7.0]},
        {"step": 9, "tasks_done": 1, "losses": [4.0, 5.5, 7.5]},
    ]
    assert s.periodic_evaluations() == [(0, [5.0, 6.0, 7.0]), (1, [4.0, 5.5, 7.5])]


def test_state_round_trips_through_a_json_checkpoint():
    s = busy()
    state = s.state_dict()
    assert set(state) == KEYS
    again = TrainerState()
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again == s


def test_state_dict_is_a_copy():
    s = busy()
    state = s.state_dict()
    s.loss_matrix.append([1.0, 1.0])
    s.record_eval([2.0, 2.0])
    s.step = 99
    assert state["loss_matrix"] == [[3.0, 5.0]] and len(state["eval_history"]) == 1
    assert state["step"] == 7


def test_a_checkpoint_from_before_loss_before_and_eval_history_loads():
    old = {k: v for k, v in busy().state_dict().items() if k not in ("loss_before",
                                                                       "eval_history")}
    s = TrainerState(loss_before=[9.0], eval_history=[{"step": 1, "tasks_done": 0,
                                                       "losses": [1.0]}])
    s.load_state_dict(old)
    assert s.loss_before == [] and s.eval_history == [] and s.step == 7
    assert s.loss_matrix == [[3.0, 5.0]] and s.run_id == "ab" * 16


def test_unknown_keys_are_ignored():
    s = TrainerState()
    s.load_state_dict({**busy().state_dict(), "from_the_future": 1})
    assert s == busy() and not hasattr(s, "from_the_future")


@pytest.mark.parametrize("missing", [["step"], ["run_id", "wall_s"], sorted(KEYS)])
def test_an_incomplete_state_names_what_it_lacks(missing):
    state = {k: v for k, v in busy().state_dict().items() if k not in missing}
    s = TrainerState()
    with pytest.raises(CheckpointError) as err:
        s.load_state_dict(state)
    absent = sorted(set(missing) - {"loss_before", "eval_history", "teacher_tokens"})
    assert str(err.value).startswith(f"the checkpoint's trainer state lacks {', '.join(absent)};")
    assert s == TrainerState()  # nothing half-loaded


@pytest.mark.parametrize("state", [None, [], "", [1, 2], "step"])
def test_no_state_at_all_is_refused(state):
    with pytest.raises(CheckpointError, match="trainer state lacks .*step.*; it is incomplete"):
        TrainerState().load_state_dict(state)


@pytest.mark.parametrize("state", [5, True])
def test_a_state_that_is_a_number_is_refused(state):
    with pytest.raises(CheckpointError):
        TrainerState().load_state_dict(state)


@pytest.mark.parametrize(
    "history",
    [None, {"step": 1}, "x", [{"step": 1, "tasks_done": 0}], [[1, 0, [2.0]]],
     [{"step": 1, "tasks_done": 0, "losses": [1.0]}, None]],
)
def test_a_damaged_eval_history_is_refused(history):
    s = TrainerState()
    with pytest.raises(CheckpointError, match="damaged eval_history; resume from another"):
        s.load_state_dict({**busy().state_dict(), "eval_history": history})
    assert s == TrainerState()


def test_eval_history_entries_may_carry_more_than_they_need():
    extra = [{"step": 3, "tasks_done": 1, "losses": [1.0], "union": 1.0}]
    s = TrainerState()
    s.load_state_dict({**busy().state_dict(), "eval_history": extra})
    assert s.eval_history == extra and s.periodic_evaluations() == [(1, [1.0])]
