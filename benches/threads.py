"""What `train.threads` should default to: the demo's shape trained with 1 and with every core's
thread, on a quiet machine and beside a busy one (one process spinning on one core, as a
neighbour's job would). Each setting runs in its own process (torch's thread pool is set once per
process); settings alternate in rounds so that drift hits them alike; prints median training
tokens/s per setting and the ratios.

    .venv/bin/python benches/threads.py [--rounds 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, tempfile, time, torch
from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.train import Trainer
threads, steps = int(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as d:
    cfg = build_config(RunConfig, {"run_dir": d + "/run", "data": {"dir": "data/prepared/demo",
        "tasks": ["en"], "tokens_per_task": 10**7}, "model": {"preset": "tiny"},
        "train": {"seq_len": 128, "batch_size": 32, "precision": "fp32", "threads": threads},
        "eval": {"windows": 1}})
    t = Trainer(cfg, progress=False)
    t.start()
    for _ in range(3):  # warm-up
        t.step(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        t.step(0)
    dt = time.perf_counter() - t0
    t.stop()
    t.close()
print(json.dumps({"tokens_per_s": steps * 32 * 128 / dt}))
"""


def _spin(stop: float) -> None:
    while time.time() < stop:
        pass


def measure(threads: int, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = [(load, n) for load in ("quiet", "busy") for n in sorted({1, cores})]
    found: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for load, n in settings:
            spinner = None
            if load == "busy":
                spinner = mp.Process(target=_spin, args=(time.time() + 600,), daemon=True)
                spinner.start()
            try:
                found[(load, n)].append(measure(n, args.steps))
            finally:
                if spinner is not None:
                    spinner.terminate()
                    spinner.join()
    med = {s: statistics.median(v) for s, v in found.items()}
    print(f"{cores} cores, median of {args.rounds} rounds, {args.steps} steps each "
          "(tiny, seq 128 × 32, fp32)")
    for (load, n), v in med.items():
        print(f"  {load:5s} threads={n}: {v:,.0f} training tokens/s")
    for load in ("quiet", "busy"):
        if cores > 1:
            ratio = med[(load, cores)] / med[(load, 1)]
            print(f"  {load}: {cores} threads ÷ 1 thread = {ratio:.2f}")


if __name__ == "__main__":
    tempfile.tempdir = None
    main()
