"""Tokens/s of cptrain's training loop vs a bare hand-written PyTorch loop.

Both train the same preset on the same batch shape and the same token shard, with AdamW and
gradient clipping; blocks of steps alternate (trainer, bare, trainer, bare, …) in one process so
that machine noise hits both alike. Prints medians and the ratio trainer / bare.

    .venv/bin/python benches/throughput.py [--preset tiny] [--seq-len 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.data.demo_corpus import demo_corpus_ready, fetch_demo
from cptrain.data.prepare import open_split, prepare
from cptrain.demo import prepare_config
from cptrain.model import build_model
from cptrain.train import Trainer


def bare_loop(model, optimizer, shard, window_len, batch, steps, start, autocast):
    """The reference: the least code that trains this model on this data."""
    n = shard.num_windows(window_len)
    for s in range(start, start + steps):
        idx = [(s * batch + i) % n for i in range(batch)]
        rows = torch.from_numpy(shard.windows(idx, window_len))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = Path(args.data_dir)
    if not demo_corpus_ready(data_dir / "demo", ["en", "fr", "de"]):
        fetch_demo(data_dir / "demo", ["en", "fr", "de"])
    prepared = prepare(prepare_config(data_dir), progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(
            RunConfig,
            {
                "run_dir": str(Path(tmp) / "run"),
                "data": {"dir": str(prepared), "tasks": ["en"], "tokens_per_task": 10**9},
                "model": {"preset": args.preset},
                "train": {
                    "seq_len": args.seq_len,
                    "batch_size": args.batch_size,
                    "precision": args.precision,
                    "log_every": 10,
                },
            },
        )
        trainer = Trainer(cfg, progress=False)
        trainer.start()

        shard = open_split(prepared, "en", "train")
        model = build_model(args.preset, trainer.data.vocab_size, seed=0)
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
        )
        autocast = args.precision == "bf16"
        window_len = args.seq_len + 1
        tokens = args.steps * args.batch_size * args.seq_len

        # warm-up both (allocator, autocast caches)
        for _ in range(3):
            trainer.step(0)
        bare_loop(model, opt, shard, window_len, args.batch_size, 3, 0, autocast)

        t_rates, b_rates = [], []
        bare_pos = 3
        for r in range(args.rounds):
            order = ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")
            for who in order:
                t0 = time.perf_counter()
                if who == "trainer":
                    for _ in range(args.steps):
                        trainer.step(0)
                    t_rates.append(tokens / (time.perf_counter() - t0))
                else:
                    bare_loop(
                        model,
                        opt,
                        shard,
                        window_len,
                        args.batch_size,
                        args.steps,
                        bare_pos,
                        autocast,
                    )
                    bare_pos += args.steps
                    b_rates.append(tokens / (time.perf_counter() - t0))
        trainer.stop()

    tm, bm = statistics.median(t_rates), statistics.median(b_rates)
    per_round = [t / b for t, b in zip(t_rates, b_rates, strict=True)]
    print(
        f"preset {args.preset}, seq {args.seq_len}, batch {args.batch_size}, {args.precision}, "
        f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps"
    )
    print(f"trainer  median {tm:10,.0f} tok/s  (rounds: {', '.join(f'{x:,.0f}' for x in t_rates)})")
    print(f"bare     median {bm:10,.0f} tok/s  (rounds: {', '.join(f'{x:,.0f}' for x in b_rates)})")
    med_round = statistics.median(per_round)
    print(f"ratio trainer/bare: {tm / bm:.3f} (median of per-round ratios {med_round:.3f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
