"""Replay, Reptile and the loss matrix in a plain PyTorch loop: your model, your optimizer, your
data loader (README "Inside your own training loop"). With the same settings it trains what
`cptrain train` trains (tests/integrations/test_plain_loop.py checks the loss matrix).

    python examples/plain_loop.py --data data/prepared/demo --model models/start \
        --tasks en fr --run-dir runs/plain
    cptrain eval runs/plain
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import cptrain


def train(a: argparse.Namespace) -> cptrain.LossMatrix:
    data = cptrain.PreparedData(a.data, seq_len=a.seq_len, seed=a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    params = list(model.parameters())  # weight decay on matrices, none on norm gains
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    buffer = cptrain.ReplayBuffer(f"{a.run_dir}/replay", alpha=a.alpha, batch_size=a.batch_size,
                                  row_len=data.window_len, vocab_size=data.vocab_size, seed=a.seed)
    cptrain.Reptile(model, opt, k=a.k, epsilon=a.epsilon)  # a hook on opt.step()
    method = {"method": "mer", "seed": a.seed, "replay": {"alpha": a.alpha},
              "reptile": {"k": a.k, "epsilon": a.epsilon}}  # what the run directory records
    matrix = cptrain.LossMatrix(a.run_dir, data.val(a.tasks), tasks=a.tasks, config=method,
                                window_len=data.window_len, windows=a.eval_windows)
    matrix.before(model)
    step = 0
    for t, task in enumerate(a.tasks):
        loader = DataLoader(data.train(task, a.steps * buffer.n_fresh), batch_size=buffer.n_fresh)
        for fresh in loader:
            rows = buffer.mix(fresh, step=step, task=t)  # fresh rows, then α replayed ones
            logits = model(input_ids=rows[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            step += 1
        matrix.task_end(model, t, step=step)  # row t of the matrix; writes summary.json
    buffer.close()
    return matrix


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a `cptrain prepare` output directory")
    p.add_argument("--model", required=True, help="a Hugging Face causal LM directory")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per task")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--epsilon", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    matrix = train(p.parse_args(argv))
    print("loss matrix (row: after task, column: task):", matrix.loss_matrix)


if __name__ == "__main__":
    main()
