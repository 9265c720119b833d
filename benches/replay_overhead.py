"""Cost of replay in the training loop: tokens/s at α=0.5 ÷ tokens/s at α=0.

Two trainers on the `tiny` preset with the same global batch (same tokens per step): one
without replay, one with α=0.5 whose disk buffer is first filled with ≥ 1 GB of rows, so every
replayed row is a random read from a large file through the prefetch thread. Blocks of steps
alternate between the two in one process. Also prints prefetch waits and the buffer's random
single-row read rate.

    .venv/bin/python benches/replay_overhead.py [--gb 1.0] [--seq-len 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from replay_buffer_io import single_row_rate  # noqa: E402

from cptrain.config import RunConfig  # noqa: E402
from cptrain.config_base import build_config  # noqa: E402
from cptrain.data.prepare import prepare  # noqa: E402
from cptrain.demo.corpus import demo_corpus_ready, fetch_demo  # noqa: E402
from cptrain.demo.embedded import prepare_config  # noqa: E402
from cptrain.train import Trainer  # noqa: E402


def make_trainer(run_dir: Path, prepared: Path, alpha: float, args) -> Trainer:
    cfg = build_config(
        RunConfig,
        {
            "run_dir": str(run_dir),
            "data": {"dir": str(prepared), "tasks": ["en", "fr"], "tokens_per_task": 10**10},
            "model": {"preset": "tiny"},
            "train": {
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "precision": args.precision,
                "log_every": 10,
            },
            "replay": {"alpha": alpha, "prefetch_mb": 64},
        },
    )
    return Trainer(cfg, progress=False)


def prefill(trainer: Trainer, gigabytes: float) -> int:
    """Fill the buffer with random rows as if many earlier steps had been trained."""
    buf = trainer.buffer
    assert buf is not None
    row_bytes = trainer.data.window_len * 2
    target = int(gigabytes * 1e9 / row_bytes)
    rng = np.random.default_rng(0)
    data = trainer.data
    block = rng.integers(0, data.vocab_size, (8192, data.window_len), dtype=np.int64)
    step = 0
    while len(buf) < target:
        block[:, 0] = step % trainer.data.vocab_size
        buf.add(block[: target - len(buf)], task_id=0, step=step)
        step += 1
    buf.commit()
    # The trainer continues as if those steps were its own past (task 1 of 2).
    trainer.state.step = step
    trainer.state.task_idx = 1
    trainer.state.task_step = 0
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--dir", default=None, help="where to put the runs (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    data_dir = Path(args.data_dir)
    if not demo_corpus_ready(data_dir / "demo", ["en", "fr", "de"]):
        fetch_demo(data_dir / "demo", ["en", "fr", "de"])
    prepared = prepare(prepare_config(data_dir), progress=False)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = make_trainer(Path(tmp) / "alpha0", prepared, 0.0, args)
        rep = make_trainer(Path(tmp) / "alpha50", prepared, 0.5, args)
        t0 = time.perf_counter()
        prefill(rep, args.gb)
        fill_s = time.perf_counter() - t0
        assert rep.buffer is not None
        disk = sum(f.stat().st_size for f in Path(rep.buffer.directory).rglob("*") if f.is_file())
        base.state.task_idx, base.state.step = 1, rep.state.step
        for t in (base, rep):
            t.start()
        for _ in range(3):  # warm-up
            base.step(1)
            rep.step(1)
        waits0 = rep.buffer.stats()["prefetch_waits"]
        tokens = args.steps * args.batch_size * args.seq_len
        r0, r50 = [], []
        for r in range(args.rounds):
            order = (base, rep) if r % 2 == 0 else (rep, base)
            for t in order:
                start = time.perf_counter()
                for _ in range(args.steps):
                    t.step(1)
                (r0 if t is base else r50).append(tokens / (time.perf_counter() - start))
        stats = rep.buffer.stats()
        read_rate = single_row_rate(rep.buffer, 20_000, seed=1, cold=False)
        n_rows = len(rep.buffer)
        base.stop()
        rep.stop()

    m0, m50 = statistics.median(r0), statistics.median(r50)
    print(
        f"tiny, seq {args.seq_len}, global batch {args.batch_size} (α=0.5: "
        f"{rep.plan.n_fresh} fresh + {rep.plan.n_replay} replayed), {args.precision}, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    print(f"buffer: {n_rows:,} rows, {disk / 1e9:.2f} GB on disk, filled in {fill_s:.1f} s")
    print(f"alpha=0    median {m0:9,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in r0)})")
    print(f"alpha=0.5  median {m50:9,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in r50)})")
    print(f"ratio alpha=0.5 / alpha=0: {m50 / m0:.3f}")
    waits = stats["prefetch_waits"] - waits0
    print(
        f"steps that waited on the prefetcher (timed part): {waits}; total wait "
        f"{stats['prefetch_wait_s']:.3f} s"
    )
    print(f"random single-row reads (warm page cache): {read_rate:,.0f} rows/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
