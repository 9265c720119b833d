"""Continue SmolLM2-135M on French with a Hugging Face `Trainer`, replaying 25 % of each batch
from a buffer seeded with English (a proxy of the old data) and Reptile (k=5, ε=0.5): MER.
English Wikipedia summaries are evaluated before training and after it, never trained.

    cptrain models fetch smollm2-135m
    cptrain data fetch-demo --languages en fr en-wiki
    cptrain prepare recipes/released-smollm2-prepare.yaml
    python examples/hf_trainer_cpt.py                  # 20 steps of 4 × 256 tokens, fp32
    python examples/hf_trainer_cpt.py --resume         # after an interruption
    cptrain eval runs/hf-smollm2-fr                    # the loss matrix, from the run directory

The same run through `cptrain train` gives the same loss matrix (tests/integrations/). Measured
alone on 2 cores of an AMD EPYC (avx512_bf16; fp32 here): 2.9 and 3.2 min wall in two runs
(`/usr/bin/time`: 174 s and 191 s, 5.0 GB peak RSS, two checkpoints written); before fr 3.126,
en-wiki 2.926; after fr: fr 2.681, en-wiki 2.750 (MER kept English below its start).
`cptrain demo --released` trains these steps in bf16 where the CPU computes it natively, this
example in fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.integrations.transformers import ContinualTrainer, training_arguments


def run_config(a: argparse.Namespace) -> RunConfig:
    return build_config(RunConfig, {
        "run_dir": a.run_dir, "seed": a.seed, "method": "mer",
        "model": {"init_from": a.model},
        "data": {"dir": a.data, "tasks": a.tasks, "eval_only": a.eval_only,
                 "tokens_per_task": a.steps * a.batch_size * a.seq_len},
        "replay": {"alpha": 0.25, "seed": [{"source": "task", "task": a.proxy,
                                            "tokens": a.proxy_tokens}]},
        "reptile": {"k": a.k, "epsilon": a.epsilon},
        "train": {"seq_len": a.seq_len, "batch_size": a.batch_size, "lr": a.lr,
                  "schedule": "constant", "warmup": 0.05, "precision": "fp32", "log_every": 4},
        "eval": {"windows": a.eval_windows, "batch_size": 8},
    })


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/smollm2-135m")
    p.add_argument("--data", default="data/prepared/demo-released")
    p.add_argument("--tasks", nargs="+", default=["fr"])
    p.add_argument("--eval-only", nargs="*", default=["en-wiki"])
    p.add_argument("--proxy", default="en", help="the prepared task that seeds the buffer")
    p.add_argument("--proxy-tokens", type=int, default=4096)
    p.add_argument("--run-dir", default="runs/hf-smollm2-fr")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per task")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--epsilon", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N")
    a = p.parse_args(argv)
    if not (Path(a.data) / "prepare.json").is_file():
        p.error(f"{a.data} is not prepared; run `cptrain prepare "
                "recipes/released-smollm2-prepare.yaml` (see this file's docstring)")
    cfg = run_config(a)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    args = training_arguments(cfg, output_dir=Path(a.run_dir) / "hf", save_steps=a.save_steps,
                              save_total_limit=2)
    trainer = ContinualTrainer(model, args, config=cfg)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    summary = trainer.loss_matrix.matrix.summary()
    print(f"before: {summary['loss_before']}")
    for task, row in zip(summary["tasks"], summary["loss_matrix"], strict=True):
        print(f"after {task}: {dict(zip(trainer.loss_matrix.matrix.columns, row, strict=True))}")
    return summary


if __name__ == "__main__":
    main()
