"""Tokens/s of cptrain's training loop vs a bare hand-written PyTorch loop.

Both train the same preset on the same batch shape and the same token shard, with AdamW and
gradient clipping; blocks of steps alternate (trainer, bare, trainer, bare, …) in one process so
that machine noise hits both alike. Prints medians and the ratio trainer / bare. A third
block, the bare loop at the precision ``auto`` did not pick, checks the choice: the line
``auto picked …`` gives the ratio auto / other, which should be above 1.

    .venv/bin/python benches/throughput.py [--preset tiny] [--seq-len 256] [--batch-size 16]
        [--precision auto|fp32|bf16]
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
from cptrain.data.prepare import open_split, prepare
from cptrain.demo.corpus import demo_corpus_ready, fetch_demo
from cptrain.demo.embedded import prepare_config
from cptrain.models.build import build_model
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


def bare_model(preset: str, vocab_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(preset, vocab_size, seed=0)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
    )
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
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
        picked = trainer.precision  # what train.precision resolved to
        other = "fp32" if picked == "bf16" else "bf16"
        bare = {p: bare_model(args.preset, trainer.data.vocab_size) for p in (picked, other)}
        window_len = args.seq_len + 1
        tokens = args.steps * args.batch_size * args.seq_len

        # warm-up all (allocator, autocast caches)
        for _ in range(3):
            trainer.step(0)
        for p, (model, opt) in bare.items():
            bare_loop(model, opt, shard, window_len, args.batch_size, 3, 0, p == "bf16")

        rates: dict[str, list[float]] = {"trainer": [], picked: [], other: []}
        bare_pos = 3
        for r in range(args.rounds):
            order = ["trainer", picked, other]
            order = order[r % 3 :] + order[: r % 3]  # each goes first as often
            for who in order:
                t0 = time.perf_counter()
                if who == "trainer":
                    for _ in range(args.steps):
                        trainer.step(0)
                else:
                    model, opt = bare[who]
                    bare_loop(
                        model,
                        opt,
                        shard,
                        window_len,
                        args.batch_size,
                        args.steps,
                        bare_pos,
                        who == "bf16",
                    )
                rates[who].append(tokens / (time.perf_counter() - t0))
            bare_pos += args.steps
        trainer.stop()

    t_rates, b_rates = rates["trainer"], rates[picked]
    tm, bm = statistics.median(t_rates), statistics.median(b_rates)
    om = statistics.median(rates[other])
    per_round = [t / b for t, b in zip(t_rates, b_rates, strict=True)]
    print(
        f"preset {args.preset}, seq {args.seq_len}, batch {args.batch_size}, "
        f"precision {args.precision} -> {picked}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    print(f"trainer  median {tm:10,.0f} tok/s  (rounds: {', '.join(f'{x:,.0f}' for x in t_rates)})")
    print(f"bare     median {bm:10,.0f} tok/s  (rounds: {', '.join(f'{x:,.0f}' for x in b_rates)})")
    med_round = statistics.median(per_round)
    print(f"ratio trainer/bare: {tm / bm:.3f} (median of per-round ratios {med_round:.3f})")
    verdict = "the faster, as it should be" if bm > om else "NOT the faster"
    print(
        f"auto picked {picked}: bare {picked} {bm:,.0f} vs bare {other} {om:,.0f} tok/s, "
        f"ratio {bm / om:.3f} ({picked} is {verdict})"
        if args.precision == "auto"
        else f"{picked} (set) vs {other}: ratio {bm / om:.3f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
