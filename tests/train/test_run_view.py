"""What a hook sees of the running trainer: a RunView of its parts, to read, never the trainer
itself, and none of its actions."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import tiny_run_config

from cptrain.train import Trainer
from cptrain.train.hooks import Hook
from cptrain.train.run_view import RunView

# The parts a hook reads, all of them the trainer's own objects.
PARTS = ("cfg", "env", "state", "plan", "data", "streams", "task_names", "model", "buffer",
         "reptile", "run_dir", "clock")
# Computed on each read: the trainer's value at that moment.
VALUES = ("task_name", "at_task_end", "precision", "autocast")
# What the loop calls by name: none of it is a hook's.
ACTIONS = ("save", "evaluate", "export", "step", "train_step", "start_task", "finish_task",
           "run", "start", "stop", "close", "summary", "write_summary", "optimizer",
           "checkpoints", "hooks", "sampler", "schedule")
EVENTS = ("on_run_start", "on_task_start", "before_step", "on_step_end", "on_eval",
          "on_task_end", "on_run_end")


class Spy(Hook):
    """Checks, in every event, what it was handed against the trainer it runs in."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.seen: list[tuple[str, Any]] = []
        self.mismatches: list[tuple[str, str]] = []
        self.refused: list[str] = []
        self.at_end: list[bool] = []

    def _look(self, event: str, run: Any) -> None:
        t = self.trainer
        self.seen.append((event, run))
        for name in PARTS:
            if getattr(run, name) is not getattr(t, name):
                self.mismatches.append((event, name))
        for name in VALUES:
            if getattr(run, name) != getattr(t, name):
                self.mismatches.append((event, name))
        step = t.state.step
        try:
            run.state = None  # a hook cannot swap the trainer's parts through the view
        except AttributeError:
            self.refused.append(event)
        assert t.state is not None and t.state.step == step

    def on_run_start(self, run):
        self._look("on_run_start", run)

    def on_task_start(self, run, task):
        self._look("on_task_start", run)

    def before_step(self, run, batch):
        self._look("before_step", run)
        return {}

    def on_step_end(self, run, record):
        self._look("on_step_end", run)
        self.at_end.append(run.at_task_end)

    def on_eval(self, run, losses, kind):
        self._look("on_eval", run)

    def on_task_end(self, run, task, losses):
        self._look("on_task_end", run)

    def on_run_end(self, run):
        self._look("on_run_end", run)


@pytest.fixture(scope="module")
def spied(prepared_dir, tmp_path_factory):
    """A short MER run (so buffer and Reptile exist): one task of two steps, every event."""
    spy = Spy()
    cfg = tiny_run_config(
        tmp_path_factory.mktemp("view") / "run",
        prepared_dir,
        method="mer",
        replay={"alpha": 0.25, "visibility_lag": 1},
        reptile={"k": 2, "epsilon": 0.5},
        data={"tasks": ["email"], "tokens_per_task": 8 * 32 * 2},
    )
    trainer = Trainer(cfg, progress=False, hooks=[spy])
    spy.trainer = trainer
    trainer.run()
    return trainer, spy


def test_every_event_hands_hooks_a_view_not_the_trainer(spied):
    trainer, spy = spied
    assert {e for e, _ in spy.seen} == set(EVENTS)
    assert all(type(run) is RunView and run is not trainer for _, run in spy.seen)
    assert all(run is trainer.view for _, run in spy.seen)  # one view for the whole run


def test_the_view_reads_the_trainers_own_parts(spied):
    trainer, spy = spied
    assert trainer.buffer is not None and trainer.reptile is not None
    assert spy.mismatches == []
    # the computed ones follow the run: the task's end shows at its last step only
    assert spy.at_end == [False, True]
    assert trainer.view.task_name == "email" and trainer.view.state.step == 2


def test_no_attribute_can_be_set_through_the_view(spied):
    trainer, spy = spied
    assert spy.refused == [e for e, _ in spy.seen]
    view = trainer.view
    for name in (*PARTS, *VALUES, "_trainer", "something_new", "save"):
        before = getattr(trainer, name, None)
        with pytest.raises(AttributeError):
            setattr(view, name, object())
        assert getattr(trainer, name, None) == before
    assert not hasattr(view, "__dict__")
    with pytest.raises(AttributeError):
        del view._trainer  # nor taken apart
    assert view.state is trainer.state


def test_the_view_offers_none_of_the_trainers_actions(spied):
    trainer, _ = spied
    view = trainer.view
    for name in ACTIONS:
        assert hasattr(trainer, name), name  # the trainer has it ...
        assert not hasattr(view, name), name  # ... its view does not
