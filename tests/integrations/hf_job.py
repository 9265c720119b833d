"""A `ContinualTrainer` run as its own process (the kill -9 and torchrun proofs).

Usage: python hf_job.py CONFIG.yaml MODEL_DIR OUT [--save-steps N] [--kill-at N] [--resume]

Writes OUT/rows_rank<r>.jsonl (every step's rows as each rank reads them: task, digests of the
fresh and replayed rows, the replayed rows' buffer ids) and, at the end, OUT/final.safetensors
(rank 0: the weights). --kill-at N SIGKILLs the process right after step N.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for integrations.common


def main() -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, TrainerCallback

    from cptrain.config import RunConfig
    from cptrain.config_base import load_config
    from cptrain.integrations.transformers import ContinualTrainer, training_arguments
    from integrations.common import digest

    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(RunConfig, Path(a.config))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    args = training_arguments(cfg, out / "hf", save_steps=a.save_steps)
    trainer = ContinualTrainer(AutoModelForCausalLM.from_pretrained(a.model), args, config=cfg)
    ds = trainer.dataset
    log = open(out / f"rows_rank{ds.rank}.jsonl", "a")  # noqa: SIM115 - open for the run

    def record(rows) -> None:
        drawn = ds.buffer.last_drawn(rows.step) if ds.buffer is not None else None
        ids = [] if drawn is None or drawn.ids is None else drawn.ids.tolist()
        log.write(json.dumps({"step": rows.step, "task": rows.task, "fresh": digest(rows.fresh),
                              "replay": digest(rows.replay), "replay_ids": ids}) + "\n")
        log.flush()

    ds.on_rows = record

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer.add_callback(Kill())
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    if ds.rank == 0:
        weights = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(weights, out / "final.safetensors")


if __name__ == "__main__":
    main()
