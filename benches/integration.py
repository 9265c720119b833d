"""What cptrain's transformers integration costs: a `Trainer` fed by the replay dataset with the
Reptile callback, against the same `Trainer` fed a plain dataset of the very same rows.

Usage: PYTHONPATH=src python benches/integration.py [--data DIR] [--rounds 5] [--steps 30]

Each round trains both, in alternating order (so load from other processes hits both alike),
from the same start model: the replay run (ContinualTrainer with its replay dataset, buffer
callback and ReptileCallback; no evaluations, no checkpoints) and the plain run (the same
ContinualTrainer, its dataset swapped for the same rows, recorded once beforehand, and its
cptrain callbacks removed). Tokens/s counts the time between consecutive step ends (data,
forward, backward, optimizer, callbacks), the first step of each run left out. The ratio is the
median over rounds of (replay tokens/s ÷ plain tokens/s); the goal is ≥ 0.97.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.integrations.hf_callbacks import LossMatrixCallback, ReptileCallback
from cptrain.integrations.hf_data import ReplayDataCallback
from cptrain.integrations.transformers import ContinualTrainer, training_arguments
from cptrain.models.build import build_model


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ends.append(time.perf_counter())

    def rate(self) -> float:
        # the first interval (from the first step's end) on: set-up and the first step out
        spans = sum(b - a for a, b in zip(self.ends, self.ends[1:], strict=False))
        return sum(self.tokens[1:]) / spans


class Rows(torch.utils.data.IterableDataset):
    """The recorded rows, one step an item: the plain dataset."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows

    def __iter__(self):
        for r in self.rows:
            yield {"input_ids": r}


def config(a: argparse.Namespace, run_dir: Path) -> RunConfig:
    return build_config(RunConfig, {
        "run_dir": str(run_dir), "seed": 0, "method": "mer",
        "model": {"preset": a.preset},
        "data": {"dir": a.data, "tasks": [a.task], "tokens_per_task": a.steps * a.batch * a.seq},
        "replay": {"alpha": 0.25}, "reptile": {"k": a.k, "epsilon": 0.1},
        "train": {"seq_len": a.seq, "batch_size": a.batch, "precision": "fp32"},
    })


def run(a: argparse.Namespace, tmp: Path, rows: list[torch.Tensor] | None) -> tuple[float, Any]:
    cfg = config(a, tmp / ("plain" if rows is not None else "replay"))
    from cptrain.train.data import TrainingData

    vocab = TrainingData(cfg).vocab_size
    model = build_model(a.preset, vocab, seed=0, max_positions=a.seq)
    args = training_arguments(cfg, tmp / "hf", save_strategy="no", logging_steps=10**6,
                              disable_tqdm=True)
    trainer = ContinualTrainer(model, args, config=cfg, eval_every=0)
    clock = StepClock()
    trainer.remove_callback(LossMatrixCallback)
    seen: list[torch.Tensor] = []
    if rows is None:
        trainer.dataset.on_rows = lambda r: (seen.append(torch.from_numpy(r.rows)),
                                             clock.tokens.append(r.rows[:, 1:].size))
    else:
        for cb in (ReplayDataCallback, ReptileCallback):
            trainer.remove_callback(cb)
        trainer.train_dataset = Rows(rows)
        clock.tokens = [int(r[:, 1:].numel()) for r in rows]
    trainer.add_callback(clock)
    trainer.train()
    if rows is None:
        trainer.dataset.close()
    return clock.rate(), seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/prepared/demo")
    ap.add_argument("--task", default="en")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--k", type=int, default=5, help="Reptile's period (short: updates count)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    replay: list[float] = []
    plain: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        _, rows = run(a, Path(tmp) / "record", None)  # the rows, once (they never change)
        for r in range(a.rounds):
            # alternate which one runs first, so that load and warm caches hit both alike
            for who in ("replay", "plain") if r % 2 == 0 else ("plain", "replay"):
                where = Path(tmp) / f"{who}{r}"
                if who == "replay":
                    replay.append(run(a, where, None)[0])
                else:
                    plain.append(run(a, where, rows)[0])
            print(f"round {r + 1}: replay+Reptile {replay[-1]:,.0f} tok/s, plain "
                  f"{plain[-1]:,.0f} tok/s, ratio {replay[-1] / plain[-1]:.3f}", flush=True)
    ratios = [x / y for x, y in zip(replay, plain, strict=True)]
    print(f"\n{'':24s}{'tokens/s (median)':>20s}")
    print(f"{'replay dataset+Reptile':24s}{statistics.median(replay):>20,.0f}")
    print(f"{'plain dataset':24s}{statistics.median(plain):>20,.0f}")
    print(f"ratio (median over {a.rounds} rounds of paired runs): {statistics.median(ratios):.3f}"
          f" (goal ≥ 0.97); spread {min(ratios):.3f}–{max(ratios):.3f}")


if __name__ == "__main__":
    main()
