"""Does `train.compile` pay on this machine? cptrain's loop with and without torch.compile.

For each shape (the demo's: tiny, seq 128, batch 32; SmolLM2-135M's: seq 256, batch 4) both
trainers are built in one process; the compiled one's first steps are timed apart (compilation),
then blocks of steps alternate (eager, compiled, eager, …) so that machine noise hits both
alike. Prints the compile time, the median step times, and the number of steps a run must have
before compiling wins, next to the steps of the run that uses the shape.

    .venv/bin/python benches/compile.py [--shapes demo,smollm2] [--precision auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.train import Trainer

# name → (run config sections, steps of the run that trains at this shape)
SHAPES: dict[str, tuple[dict[str, Any], int]] = {
    "demo": (
        {"model": {"preset": "tiny"}, "data": {"dir": "data/prepared/demo", "tasks": ["en"]},
         "train": {"seq_len": 128, "batch_size": 32}},
        3 * 74,  # one demo method: 3 tasks × 74 steps
    ),
    "smollm2": (
        {"model": {"init_from": "models/smollm2-135m"},
         "data": {"dir": "data/prepared/demo-released", "tasks": ["fr"]},
         "train": {"seq_len": 256, "batch_size": 4}},
        40,  # one released-demo method: 2 tasks × 20 steps
    ),
}


def trainer(sections: dict[str, Any], tmp: Path, compiled: bool, precision: str) -> Trainer:
    raw = {
        "run_dir": str(tmp / ("compiled" if compiled else "eager")),
        **sections,
        "data": {**sections["data"], "tokens_per_task": 10**9},
        "train": {**sections["train"], "compile": compiled, "precision": precision,
                  "log_every": 10**6},
        "eval": {"every": 0},
    }
    t = Trainer(build_config(RunConfig, raw), progress=False)
    t.start()
    return t


def timed(t: Trainer, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        t.step(0)
    return (time.perf_counter() - t0) / steps


def measure(name: str, args: argparse.Namespace) -> None:
    sections, run_steps = SHAPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        eager = trainer(sections, Path(tmp), False, args.precision)
        comp = trainer(sections, Path(tmp), True, args.precision)
        timed(eager, 1)  # warm-up
        t0 = time.perf_counter()
        comp.step(0)  # tracing and code generation happen in the first steps
        comp.step(0)
        first = time.perf_counter() - t0
        e_times, c_times = [], []
        for r in range(args.rounds):
            for who in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                (e_times if who == "eager" else c_times).append(
                    timed(eager if who == "eager" else comp, args.steps))
        eager.stop()
        comp.stop()
    e, c = statistics.median(e_times), statistics.median(c_times)
    overhead = first - 2 * c
    gain = e - c
    print(f"{name}: eager {e * 1000:.1f} ms/step, compiled {c * 1000:.1f} ms/step "
          f"(ratio {e / c:.3f}); compile {overhead:.1f} s")
    if gain <= 0:
        print(f"  compiled is not faster: compile never pays at this shape ({run_steps} steps)")
    else:
        pays = overhead / gain
        verdict = "pays" if pays < run_steps else "does not pay"
        print(f"  pays after {pays:.0f} steps; its run has {run_steps}: compile {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="demo,smollm2")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.shapes.split(","):
        measure(name, args)


if __name__ == "__main__":
    main()
