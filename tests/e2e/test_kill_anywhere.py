"""kill -9 at any moment loses nothing: a run SIGKILLed ten times and resumed after each kill
ends bit-identical to the run that was never interrupted.

The run (tiny preset, replay α=0.25, Reptile k=3 ε=0.5, a checkpoint every 2 steps, evaluation
every 3, three tasks) is a process of its own (killable_train.py, forked from a server that
imported torch once). Kill moments come from a seeded RNG:
named phases (inside a step, a buffer append, an evaluation, the buffer's manifest write, and
four places inside a checkpoint write) at a step drawn just ahead of the newest checkpoint, and
timer kills at a random offset after the training loop starts.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_metrics, read_summary
from safetensors.torch import load_file

from cptrain import checkpoint as ckpt

from . import killable_train

pytestmark = pytest.mark.slow

# Children fork from one server that imported torch, transformers and cptrain once (~5 s), not
# from this process (whose OpenMP threads a fork would copy in a broken state).
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "transformers", "cptrain.cli", "cptrain.train",
                            killable_train.__name__])
SEED = 20261128
STEPS_PER_TASK, TASKS, CKPT_EVERY, EVAL_EVERY = 6, 3, 2, 3
TOTAL = STEPS_PER_TASK * TASKS
# Timer kills come early, while many steps remain, so that the run cannot finish first.
SCHEDULE = [
    "append",
    "timer",
    "step",
    "ckpt-optimizer",
    "timer",
    "eval",
    "ckpt-manifest",
    "buffer-commit",
    "ckpt-rename",
    "ckpt-prune",
]
PROCESS_TIMEOUT = 240


def run_config(make_config, name: str) -> Path:
    cfg = make_config(
        name,
        method="mer",
        replay={"alpha": 0.25, "visibility_lag": 1},
        reptile={"k": 3, "epsilon": 0.5},
        checkpoint={"every": CKPT_EVERY, "keep_last": 2},
        eval={"every": EVAL_EVERY},
        train={"threads": 1},  # two processes share two cores; also pins the float order
    )
    path = Path(cfg.run_dir).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


class Child:
    """One training process: a forked killable_train.child whose output goes to a file."""

    _n = itertools.count()

    def __init__(self, config: Path, *, resume: bool, kill_at: str | None = None):
        self.log = config.with_name(f"{config.stem}.out{next(self._n)}.log")
        argv = [str(config), *(["--resume"] if resume else [])]
        self.proc = CTX.Process(target=killable_train.child, args=(argv, kill_at, str(self.log)))
        self.proc.start()

    def wait_ready(self, timeout: float = PROCESS_TIMEOUT) -> None:
        """Until the training loop has started (or the process ended)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.is_alive():
            if self.log.is_file() and "HARNESS-READY" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.01)

    def kill(self) -> None:
        self.proc.kill()

    def communicate(self, timeout: float = PROCESS_TIMEOUT) -> tuple[str, None]:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"still running after {timeout} s"
        return (self.log.read_text(errors="replace") if self.log.is_file() else ""), None

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode


def launch(config: Path, *, resume: bool, kill_at: str | None = None) -> Child:
    return Child(config, resume=resume, kill_at=kill_at)


def newest_step(run_dir: Path) -> int | None:
    path, _ = ckpt.latest_complete(run_dir / "checkpoints", repair=False)
    return None if path is None else int(path.name.removeprefix("step_"))


def pick_target(point: str, after: int, rng: random.Random) -> int:
    """A step shortly after the newest checkpoint (``after``) at which ``point`` happens."""
    if point in ("step", "append"):
        # never before the first checkpoint: see test_kill_before_the_first_checkpoint
        return min(max(after, CKPT_EVERY) + rng.randint(1, 2), TOTAL - 1)
    if point == "eval":  # the evaluation at a task end, just before the task boundary
        return next(s for s in range(STEPS_PER_TASK, TOTAL + 1, STEPS_PER_TASK) if s > after)
    return min(after + CKPT_EVERY * rng.randint(1, 2), TOTAL)  # checkpoint-writing phases


@dataclass
class Segment:
    kill: str
    resumed_from: int | None
    rc: int | None = None
    output: str = ""
    notes: list[str] = field(default_factory=list)


def run_segment(config: Path, run_dir: Path, point: str, rng: random.Random) -> Segment:
    start = newest_step(run_dir)
    if point == "timer":
        offset = rng.uniform(0.05, 0.6)
        seg = Segment(f"timer:{offset:.2f}s", start)
        proc = launch(config, resume=start is not None)
        proc.wait_ready()
        time.sleep(offset)
        proc.kill()
        seg.output, _ = proc.communicate(timeout=PROCESS_TIMEOUT)
    else:
        target = pick_target(point, start or 0, rng)
        seg = Segment(f"{point}:{target}", start)
        proc = launch(config, resume=start is not None, kill_at=seg.kill)
        seg.output, _ = proc.communicate(timeout=PROCESS_TIMEOUT)
    seg.rc = proc.returncode
    return seg


def train_records(path: Path) -> tuple[list[tuple], list[tuple]]:
    """(train records, eval records) without the fields that measure time or throughput."""
    train, evals = [], []
    for r in read_metrics(path.parent):
        if r["type"] == "train":
            train.append((r["step"], r["task"], r["loss"], r["lr"], r["grad_norm"],
                          r["replay_rows"]))
        else:
            evals.append((r["type"], r["step"], r["task"], r["val_loss"]))
    return train, evals


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str):
    assert set(a) == set(b), what
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{what} differs in {differ}"


def assert_same_final_checkpoint(got_dir: Path, ref_dir: Path) -> None:
    got, ref = ckpt.load_checkpoint(got_dir), ckpt.load_checkpoint(ref_dir)
    assert_same_tensors(got.model_state(), ref.model_state(), "model")
    go, ro = got.optimizer_blob()["optimizer"], ref.optimizer_blob()["optimizer"]
    assert go["param_groups"] == ro["param_groups"]
    for pid in ro["state"]:
        assert_same_tensors(go["state"][pid], ro["state"][pid], f"optimizer param {pid}")
    assert_same_tensors(got.tensors("reptile"), ref.tensors("reptile"), "reptile anchor")
    volatile = {"wall_s", "run_id"}
    strip = lambda t: {k: v for k, v in t.items() if k not in volatile}  # noqa: E731
    assert strip(got.state["trainer"]) == strip(ref.state["trainer"])
    assert got.state["reptile"] == ref.state["reptile"]
    for key in ("rows", "last_step", "store"):
        assert got.state["replay"][key] == ref.state["replay"][key], key


def test_ten_kills_then_resume_is_bit_identical(make_config):
    ref_cfg, cfg = run_config(make_config, "reference"), run_config(make_config, "killed")
    ref_dir, run_dir = ref_cfg.with_suffix(""), cfg.with_suffix("")
    reference = launch(ref_cfg, resume=False)  # runs alongside the killed chain (2 cores)

    rng = random.Random(SEED)
    segments = []
    for point in SCHEDULE:
        segments.append(run_segment(cfg, run_dir, point, rng))
        log = "\n".join(f"{s.kill} from {s.resumed_from}: rc {s.rc}" for s in segments)
        seg = segments[-1]
        assert seg.rc == -9, f"not killed ({seg.kill}):\n{seg.output}\n{log}"
        if seg.resumed_from is not None:
            # resume says which checkpoint it took: the newest complete one, by step number
            said = re.search(r"resuming from (\S+) \(step (\d+) of (\d+)\)", seg.output)
            assert said and int(said.group(2)) == seg.resumed_from, seg.output
    print(log)  # shown with -s, and by pytest when an assertion below fails
    final = launch(cfg, resume=True)
    out, _ = final.communicate(timeout=PROCESS_TIMEOUT)
    assert final.returncode == 0, out
    ref_out, _ = reference.communicate(timeout=PROCESS_TIMEOUT)
    assert reference.returncode == 0, ref_out

    # weights after every task, bit for bit
    for task in ("after_0_email", "after_1_xml", "after_2_asyncio"):
        a = load_file(run_dir / "models" / task / "model.safetensors")
        b = load_file(ref_dir / "models" / task / "model.safetensors")
        assert_same_tensors(a, b, task)
    # optimizer, schedule, cursors, replay buffer, Reptile anchor, RNG of the last checkpoint
    last = f"step_{TOTAL:09d}"
    assert_same_final_checkpoint(run_dir / "checkpoints" / last, ref_dir / "checkpoints" / last)
    for f in sorted((ref_dir / "replay" / "rank_0").glob("chunk_*")):
        assert (run_dir / "replay" / "rank_0" / f.name).read_bytes() == f.read_bytes(), f.name

    got_summary = read_summary(run_dir)
    ref_summary = read_summary(ref_dir)
    assert got_summary["loss_matrix"] == ref_summary["loss_matrix"]
    assert got_summary["complete"] and got_summary["steps"] == TOTAL

    got_train, got_evals = train_records(run_dir / "metrics.jsonl")
    ref_train, ref_evals = train_records(ref_dir / "metrics.jsonl")
    steps = [r[0] for r in got_train]
    assert len(steps) == len(set(steps)), "a step was logged twice after a resume"
    assert got_train == ref_train, "missing, repeated or different train records"
    assert got_evals == ref_evals, "missing, repeated or different evaluation records"
    assert not ckpt.leftovers(run_dir / "checkpoints"), "temporary checkpoint dirs left behind"

    kinds = {s.kill.split(":")[0] for s in segments}
    assert {"step", "append", "eval", "timer", "buffer-commit"} <= kinds
    assert any(k.startswith("ckpt-") for k in kinds)


def test_kill_before_the_first_checkpoint_then_start_again(make_config):
    cfg = run_config(make_config, "early")
    run_dir = cfg.with_suffix("")
    proc = launch(cfg, resume=False, kill_at="append:1")
    out, _ = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == -9, out
    assert newest_step(run_dir) is None
    again = launch(cfg, resume=False)  # no checkpoint yet: the user simply starts again
    out, _ = again.communicate(timeout=PROCESS_TIMEOUT)
    assert again.returncode == 0, out
