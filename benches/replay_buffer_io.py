"""Replay buffer I/O: fill a disk buffer with >= 1 GB of rows, then measure random single-row
reads (warm page cache and, where the OS allows, cold) and draw() throughput.

    python benches/replay_buffer_io.py [--gb 1.0] [--dir /tmp/replay-bench] [--keep]

Rows are seq_len 256 + 1 = 257 uint16 tokens (514 bytes), as in the paper-style runs. Every
figure is the median of 5 rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cptrain.replay.buffer import ReplayBuffer
from cptrain.replay.config import ReplayConfig

ROW_LEN, VOCAB, ROWS_PER_ADD, ROUNDS = 257, 32_000, 4096, 5


def fill(buf: ReplayBuffer, n_rows: int) -> float:
    rng = np.random.default_rng(0)
    block = rng.integers(0, VOCAB, (ROWS_PER_ADD, ROW_LEN), dtype=np.int64)
    start = time.perf_counter()
    step = 0
    while len(buf) < n_rows:
        block[:, 0] = step  # rows differ from step to step
        buf.add(block[: min(ROWS_PER_ADD, n_rows - len(buf))], task_id=step % 3, step=step)
        step += 1
    buf.commit()
    return time.perf_counter() - start


def drop_page_cache(directory: Path) -> bool:
    """Evict the chunk files from the page cache (clean pages only); False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in directory.glob("chunk_*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def single_row_rate(buf: ReplayBuffer, n: int, seed: int, cold: bool) -> float:
    ids = np.random.default_rng(seed).integers(0, len(buf), n)
    if cold:
        buf._store.close()  # drop mappings too, so no page stays mapped
        drop_page_cache(buf.directory)
    start = time.perf_counter()
    for row in ids:
        buf._read(np.array([row]))  # one row: memmap lookup + copy + CRC check
    return n / (time.perf_counter() - start)


def draw_rate(buf: ReplayBuffer, batch: int, draws: int, first_step: int) -> float:
    last = buf._last_step
    start = time.perf_counter()
    for k in range(draws):
        rows = buf.draw(last + 1 + first_step + k, batch, current_task=0)
        assert len(rows) == batch
    return draws * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="buffer size in GB (10^9 bytes)")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the buffer")
    ap.add_argument("--keep", action="store_true", help="do not delete the buffer afterwards")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="replay-bench-"))
    n_rows = int(args.gb * 1e9 / (ROW_LEN * 2)) + 1
    cfg = ReplayConfig(alpha=0.5, visibility_lag=0, prefetch_mb=0)
    try:
        buf = ReplayBuffer(cfg, root, row_len=ROW_LEN, vocab_size=VOCAB, seed=0, run_id="bench")
        fill_s = fill(buf, n_rows)
        disk = buf.stats()["bytes_on_disk"]
        print(
            f"buffer: {len(buf):,} rows x {ROW_LEN} uint16 = {disk / 1e9:.2f} GB on disk ({root})"
        )
        print(f"fill: {disk / 1e6 / fill_s:,.0f} MB/s ({fill_s:.1f} s, CRC per row included)")

        warm = [single_row_rate(buf, 50_000, r, cold=False) for r in range(ROUNDS)]
        print(f"random single-row reads, warm cache: {statistics.median(warm):,.0f} rows/s")
        for batch in (8, 64):
            rates = [draw_rate(buf, batch, 2000, r * 10_000) for r in range(ROUNDS)]
            med = statistics.median(rates)
            print(
                f"draw() of {batch:>2}-row batches, warm cache: {med:,.0f} rows/s "
                f"({med / batch:,.0f} draws/s, {batch / med * 1e6:.0f} us per draw)"
            )
        if drop_page_cache(buf.directory):
            cold = [single_row_rate(buf, 5_000, 100 + r, cold=True) for r in range(ROUNDS)]
            print(f"random single-row reads, cold cache: {statistics.median(cold):,.0f} rows/s")

        state = buf.state_dict()
        buf.close()
        for verify in (False, True):
            cfg_v = cfg.model_copy(update={"verify_on_resume": verify})
            again = ReplayBuffer(
                cfg_v, root, row_len=ROW_LEN, vocab_size=VOCAB, seed=0, run_id="bench"
            )
            start = time.perf_counter()
            again.load_state_dict(state)
            print(
                f"resume (load_state_dict, verify_on_resume={verify}): "
                f"{time.perf_counter() - start:.2f} s"
            )
            again.close()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
