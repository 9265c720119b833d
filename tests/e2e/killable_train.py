"""`cptrain train` that SIGKILLs itself at a named moment: the subprocess of the kill tests.

Usage: python killable_train.py CONFIG [--resume]    (the arguments of `cptrain train`), or
child(argv, kill_at, log_path) in a process forked from a server that imported torch and
cptrain once (test_kill_anywhere.py): a dozen runs then do not pay a dozen imports.

CPTRAIN_KILL_AT=<point>:<step> (or kill_at) picks the moment; without it the run is left alone.
Points:
  step            inside optimizer step <step> (0-based step count when it starts): after the
                  weights, Adam moments and Reptile anchor changed, before the step's rows
                  enter the replay buffer and before the counters advance
  append          inside the replay-buffer append of step <step>: the first write of it puts
                  half its bytes on disk (a torn record), then the process dies
  eval            inside the evaluation that follows step <step>, after the first task's
                  first validation batch
  buffer-commit   inside the replay manifest write of the checkpoint at step <step> (torn temp)
  ckpt-optimizer  inside checkpoint <step>: optimizer.safetensors half written
  ckpt-manifest   inside checkpoint <step>: every file written, MANIFEST.json not yet
  ckpt-rename     inside checkpoint <step>: complete temporary directory, not yet renamed
  ckpt-prune      inside checkpoint <step>: renamed into place, older ones not yet pruned
A line "HARNESS-READY" on stdout says the training loop has started (for kills by timer).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from cptrain import cli, fsutil
from cptrain.checkpoint import local as ckpt
from cptrain.evaluation import losses as evaluate_mod
from cptrain.replay.buffer import ReplayBuffer
from cptrain.train import Trainer


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def torn_write(real_write: Any) -> Any:
    """A write function that puts half of the bytes on disk, then kills the process."""

    def write(fd: int, data: Any) -> int:
        view = memoryview(data).cast("B")
        real_write(fd, view[: max(1, len(view) // 2)])
        os.fsync(fd)
        die()
        return 0  # not reached

    return write


def install(point: str, target: int) -> None:
    armed = {"on": False}

    if point == "step":
        real_step = Trainer.train_step

        def train_step(self: Trainer, task_idx: int) -> dict[str, Any]:
            if self.state.step == target:
                self.optimizer.register_step_post_hook(lambda *_: die())
            return real_step(self, task_idx)

        Trainer.train_step = train_step  # type: ignore[method-assign]

    elif point == "append":
        real_add, real_write = ReplayBuffer.add, fsutil._write

        def add(self: ReplayBuffer, rows: Any, *, task_id: int, step: int, refs: Any = None):
            if step == target:
                fsutil._write = torn_write(real_write)
            return real_add(self, rows, task_id=task_id, step=step, refs=refs)

        ReplayBuffer.add = add  # type: ignore[method-assign]

    elif point == "eval":
        real_evaluate, real_loss = Trainer.evaluate, evaluate_mod.token_loss

        def evaluate(self: Trainer, kind: str | None = None) -> dict[str, float]:
            armed["on"] = self.state.step == target
            return real_evaluate(self, kind)

        def token_loss(*args: Any, **kwargs: Any) -> Any:
            out = real_loss(*args, **kwargs)
            if armed["on"]:
                die()
            return out

        Trainer.evaluate = evaluate  # type: ignore[method-assign]
        evaluate_mod.token_loss = token_loss

    elif point == "buffer-commit":
        real_save, real_write = Trainer.save, fsutil._write

        def save(self: Trainer) -> Path:
            if self.state.step == target:
                fsutil._write = torn_write(real_write)
            return real_save(self)

        Trainer.save = save  # type: ignore[method-assign]

    elif point.startswith("ckpt-"):
        install_checkpoint(point.removeprefix("ckpt-"), target)

    else:
        raise SystemExit(f"unknown kill point {point!r}")


def install_checkpoint(where: str, target: int) -> None:
    real_save = ckpt.save_checkpoint
    armed = {"on": False}

    def save_checkpoint(root: Path, step: int, **kwargs: Any) -> Path:
        armed["on"] = step == target
        return real_save(root, step, **kwargs)

    ckpt.save_checkpoint = save_checkpoint

    if where == "optimizer":
        real_write_file = fsutil.write_new_file

        def write_file(path: Path, data: Any, **kwargs: Any) -> None:
            if armed["on"] and Path(path).name == ckpt.OPTIMIZER_FILE:
                fsutil._write = torn_write(os.write)
            real_write_file(path, data, **kwargs)

        fsutil.write_new_file = write_file
    elif where == "manifest":
        real_json = fsutil.atomic_write_json

        def atomic_write_json(path: Path, obj: Any) -> None:
            if armed["on"] and Path(path).name == "MANIFEST.json":
                die()
            real_json(path, obj)

        fsutil.atomic_write_json = atomic_write_json
    elif where == "rename":
        real_publish = ckpt.publish

        def publish(root: Path, tmp: Path, final: Path, step: int) -> None:
            if armed["on"]:
                die()
            real_publish(root, tmp, final, step)

        ckpt.publish = publish
    elif where == "prune":
        real_prune = ckpt.prune

        def prune(root: Path, keep_last: int, *, protect: Path | None = None) -> None:
            if armed["on"]:
                die()
            real_prune(root, keep_last, protect=protect)

        ckpt.prune = prune
    else:
        raise SystemExit(f"unknown checkpoint kill point {where!r}")


def announce_start() -> None:
    real_run = Trainer.run

    def run(self: Trainer) -> dict[str, Any]:
        print("HARNESS-READY", flush=True)
        return real_run(self)

    Trainer.run = run  # type: ignore[method-assign]


def main(argv: list[str], spec: str | None = None) -> int:
    spec = spec if spec is not None else os.environ.get("CPTRAIN_KILL_AT")
    if spec:
        point, step = spec.rsplit(":", 1)
        install(point, int(step))
    announce_start()
    return cli.main(["train", *argv, "--no-progress"])


def child(argv: list[str], kill_at: str | None, log_path: str) -> None:
    """Entry point of a forked child: stdout and stderr go to ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    rc = main(argv, kill_at or "")
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
