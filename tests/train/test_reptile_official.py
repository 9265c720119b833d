"""``reptile.variant: official``: the interpolated weights feed one forward/backward, and the
optimizer keeps stepping the un-interpolated ones (what the paper's DeepSpeed code did). Its
two-rank FSDP2 run and resume are in test_distributed.py, which shares torchrun launches."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import model_after, tiny_run_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cptrain.config_base import build_config
from cptrain.errors import CheckpointError
from cptrain.train import Trainer, train
from cptrain.train import hooks as H
from cptrain.train.reptile import Reptile, ReptileConfig

EPS = 0.5
OFFICIAL = {"enabled": True, "k": 2, "epsilon": EPS, "variant": "official"}
# Two tasks of 7 steps, k = 2 (official: meta-updates after the odd steps), a checkpoint every
# 3: the checkpoints of steps 3, 9 and the first task's end (7) are written right after a
# meta-update, with a restore pending; those of 6, 12 and 14 are not.
TWO_TASKS = {
    "data": {"tasks": ["email", "xml"], "tokens_per_task": 8 * 32 * 7},
    "reptile": OFFICIAL,
    "checkpoint": {"every": 3, "keep_last": 10},
}


Capture = dict[str, Any]


@contextmanager
def capture_steps(trainer: Trainer) -> Iterator[list[Capture]]:
    """What each of the trainer's optimizer steps starts from: the weights, the (clipped)
    gradients and the optimizer state, seen before any hook of the optimizer itself runs (global
    pre-hooks run before per-optimizer ones, so Reptile has not restored anything yet)."""
    seen: list[Capture] = []

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if opt is not trainer.optimizer:
            return
        params = [p for g in opt.param_groups for p in g["params"]]
        seen.append(
            {
                "params": [p.detach().clone() for p in params],
                "grads": [p.grad.detach().clone() for p in params],
                "state": copy.deepcopy(opt.state_dict()),
                "sizes": [len(g["params"]) for g in opt.param_groups],
            }
        )

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def replay_step(step: Capture, start: list[torch.Tensor]) -> list[torch.Tensor]:
    """An independent AdamW step from ``start`` with the captured gradients and state."""
    params = [torch.nn.Parameter(w.clone()) for w in start]
    groups, at = [], 0
    for n in step["sizes"]:
        groups.append({"params": params[at : at + n]})
        at += n
    opt = torch.optim.AdamW(groups, foreach=True)
    opt.load_state_dict(copy.deepcopy(step["state"]))  # lr, betas, decay, moments, step count
    for p, g in zip(params, step["grads"], strict=True):
        p.grad = g.clone()
    opt.step()
    return [p.detach() for p in params]


def stepped_weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for g in trainer.optimizer.param_groups for p in g["params"]]


def run_steps(cfg, n: int) -> tuple[list[Capture], list[torch.Tensor], Trainer]:
    trainer = Trainer(cfg, progress=False, stop_after=n)
    trainer.start()
    try:
        with capture_steps(trainer) as seen:
            for _ in range(n):
                trainer.step(0)
    finally:
        trainer.stop()
    return seen, stepped_weights(trainer), trainer


def all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def three_steps(prepared_dir, tmp_path_factory):
    """variant -> (captures, weights after step 3) for k=2: the official meta-updates follow
    steps 1 and 3, the faithful one step 2."""
    root = tmp_path_factory.mktemp("official")
    out = {}
    for variant, updates in (("official", 2), ("faithful", 1)):
        reptile = {**OFFICIAL, "variant": variant}
        cfg = tiny_run_config(root / variant, prepared_dir, reptile=reptile)
        seen, after, trainer = run_steps(cfg, 3)
        assert trainer.reptile is not None and trainer.reptile.updates == updates
        out[variant] = (seen, after)
    return out


def test_step_after_meta_update_lands_on_the_uninterpolated_weights(three_steps):
    seen, _ = three_steps["official"]
    start, step2, step3 = seen
    # The weights after step 1, before the meta-update, replayed independently; the anchor is
    # the initial weights (the first period).
    w1 = replay_step(start, start["params"])
    interpolated = [torch.lerp(a, w, EPS) for a, w in zip(start["params"], w1, strict=True)]
    # Step 2's forward/backward ran on the interpolated weights ...
    for got, want in zip(step2["params"], interpolated, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert not all_equal(step2["params"], w1)
    # ... and its update landed on the un-interpolated ones (step 3 starts there: no
    # meta-update after step 2): the meta-update reached the weights only through that one
    # gradient.
    assert all_equal(step3["params"], replay_step(step2, w1))
    assert not all_equal(step3["params"], replay_step(step2, step2["params"]))


def test_faithful_steps_from_the_interpolated_weights(three_steps):
    seen, after = three_steps["faithful"]
    start, step2, step3 = seen
    w2 = replay_step(step2, step2["params"])
    interpolated = [torch.lerp(a, w, EPS) for a, w in zip(start["params"], w2, strict=True)]
    for got, want in zip(step3["params"], interpolated, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert all_equal(after, replay_step(step3, step3["params"]))


def update_steps(variant: str, k: int, steps: int, boundary_at: int | None = None) -> list[int]:
    """After which optimizer steps (1-based) a Reptile of ``variant`` meta-updates, with a
    task boundary before step ``boundary_at + 1``."""
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    reptile = Reptile([("w", p)], reptile_cfg(variant=variant, k=k))
    opt = torch.optim.SGD([p], lr=0.1)
    reptile.attach(opt)
    fired = []
    for step in range(1, steps + 1):
        if step - 1 == boundary_at:
            reptile.on_task_boundary(opt)
        (p**2).sum().backward()
        before = reptile.updates
        opt.step()
        opt.zero_grad()
        if reptile.updates > before:
            fired.append(step)
    return fired


def test_official_schedule_is_the_official_codes():
    # Its loop tests `iteration % k == 0` before counting the step: after steps 1, k+1, 2k+1.
    assert update_steps("official", 3, 10) == [1, 4, 7, 10]
    assert update_steps("faithful", 3, 10) == [3, 6, 9]
    assert update_steps("official", 1, 3) == [1, 2, 3]
    # A task boundary re-reads the anchor but does not restart the run-wide count.
    assert update_steps("official", 3, 10, boundary_at=5) == [1, 4, 7, 10]


class Watch(H.Hook):
    """At each task start (after the built-in hooks): the anchor and the weights."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []

    def on_task_start(self, trainer: Trainer, task: int) -> None:
        reptile = trainer.reptile
        assert reptile is not None
        anchor = [a.clone() for a in reptile.state_dict()["anchor"].values()]
        weights = [p.detach().clone() for _, p in trainer.model.named_parameters()]
        self.starts.append((trainer.state.step, anchor, weights))


def test_official_anchor_is_reread_at_each_task_start(make_config):
    cfg = make_config("anchor", **{**TWO_TASKS, "reptile": {**OFFICIAL, "k": 3}})
    watch = Watch()
    trainer = Trainer(cfg, progress=False, hooks=[watch])
    trainer.run()
    (_, _, _), (step, anchor, weights) = watch.starts
    # Task 2 starts at step 7, right after the meta-update of step 7 (1, 4, 7 with k = 3): the
    # anchor is the module's weights there, not the anchor of that meta-update's period.
    assert step == 7 and all_equal(anchor, weights)
    assert trainer.reptile is not None and trainer.reptile.updates == 5  # 1, 4, 7, 10, 13


def test_task_end_evaluates_and_exports_the_optimizers_weights(make_config):
    """The first task ends right after a meta-update: by default its loss-matrix row and
    exported model are the weights the optimizer steps; ``interpolated`` shows the others.
    Training itself is the same either way."""
    cut = Trainer(make_config("cut", **TWO_TASKS), progress=False, stop_after=7)
    cut.run()
    assert cut.reptile is not None and cut.reptile.pending_restore
    held = dict(zip(cut.reptile._names, cut.reptile._masters or [], strict=True))
    shown = {
        name: make_config(name, **{**TWO_TASKS, "reptile": {**OFFICIAL, "evaluate_weights": w}})
        for name, w in (("opt", "optimizer"), ("interp", "interpolated"))
    }
    summaries = {name: train(cfg, progress=False) for name, cfg in shown.items()}
    opt_0, interp_0 = (model_after(shown[n].run_dir, 0) for n in ("opt", "interp"))
    assert all(torch.equal(opt_0[n], held[n]) for n in held)
    assert not all(torch.equal(interp_0[n], held[n]) for n in held)
    rows = {n: s["loss_matrix"] for n, s in summaries.items()}
    assert rows["opt"][0] != rows["interp"][0]
    assert rows["opt"][1] == rows["interp"][1]  # step 14: nothing pending, same training
    assert summaries["opt"]["loss_matrix"][0] == cut.state.loss_matrix[0]


def test_official_with_epsilon_one_is_bit_identical_to_no_reptile(make_config):
    off = make_config("off", reptile={**OFFICIAL, "epsilon": 1.0})
    _, official, trainer = run_steps(off, 4)
    assert trainer.reptile is not None and trainer.reptile.updates == 2
    assert trainer.reptile.memory_bytes() == trainer.reptile.anchor_bytes()  # nothing kept
    _, plain, _ = run_steps(make_config("plain"), 4)
    assert all_equal(official, plain)


def test_resume_between_meta_update_and_next_step_is_bit_identical(make_config):
    ref = train(make_config("ref", **TWO_TASKS), progress=False)
    part = make_config("part", **TWO_TASKS)
    stopped = Trainer(part, progress=False, stop_after=9)
    stopped.run()
    # Step 9's meta-update fired and its checkpoint was written before step 10 restored anything.
    assert stopped.state.step == 9 and stopped.reptile is not None
    assert stopped.reptile.pending_restore
    del stopped
    resumed = Trainer(part, resume=True, progress=False)
    assert resumed.state.step == 9 and resumed.reptile is not None
    assert resumed.reptile.pending_restore
    summary = resumed.run()
    assert summary["loss_matrix"] == ref["loss_matrix"]
    for task in range(2):
        got, want = model_after(part.run_dir, task), model_after(make_config("ref").run_dir, task)
        for name in want:
            assert torch.equal(got[name], want[name]), (task, name)


def reptile_cfg(**over: Any) -> ReptileConfig:
    return build_config(ReptileConfig, {**OFFICIAL, **over}, "reptile")


def test_sgd_step_after_meta_update_by_hand():
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    reptile = Reptile([("w", p)], reptile_cfg())
    opt = torch.optim.SGD([p], lr=0.1)
    reptile.attach(opt)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, -2.0]))  # as if step 1 had moved it
    reptile.steps = 1  # ... and its meta-update is this one: step 2 has none (k = 2)
    reptile.meta_update(opt)
    assert torch.equal(p.detach(), torch.tensor([2.0, -1.0])) and reptile.pending_restore
    (p**2).sum().backward()  # gradient at the interpolated point: 2p = (4, -2)
    opt.step()
    # kept weights (4, -2) minus lr · (4, -2); the anchor is the interpolated weights
    torch.testing.assert_close(p.detach(), torch.tensor([3.6, -1.8]))
    assert torch.equal(reptile.state_dict()["anchor"]["w"], torch.tensor([2.0, -1.0]))
    assert not reptile.pending_restore


def test_pending_checkpoint_needs_the_official_variant():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    official = Reptile([("w", p)], reptile_cfg())
    official.meta_update()
    saved = copy.deepcopy(official.state_dict())
    assert saved["pending_restore"] and saved["variant"] == "official"
    faithful = Reptile([("w", p)], reptile_cfg(variant="faithful"))
    with pytest.raises(CheckpointError, match="resume it with reptile.variant: official"):
        faithful.load_state_dict(saved)
    for bad in (dict(saved, pending_restore="yes"), dict(saved, masters=None)):
        with pytest.raises(CheckpointError, match="corrupt"):
            official.load_state_dict(bad)
    fresh = Reptile([("w", p)], reptile_cfg())
    fresh.load_state_dict(saved)
    assert fresh.pending_restore
    not_pending = dict(saved, pending_restore=False)
    faithful.load_state_dict(not_pending)  # nothing to restore: any variant resumes it
    old = {k: v for k, v in saved.items() if k not in ("pending_restore", "masters", "variant")}
    fresh.load_state_dict(old)  # a checkpoint from before the variant existed
    assert not fresh.pending_restore
