"""Per-rank replay shards: the union of the ranks' draws is uniform over the whole buffer."""

import numpy as np
from scipy import stats

from cptrain.replay.buffer import ReplayBuffer
from cptrain.replay.config import ReplayConfig
from cptrain.replay.mixer import split_for_rank


def test_union_of_rank_draws_is_uniform(tmp_path):
    cfg = ReplayConfig(alpha=0.5, visibility_lag=0, prefetch_mb=0)
    world, row_len, steps = 2, 5, 40
    bufs = [
        ReplayBuffer(cfg, tmp_path, row_len=row_len, vocab_size=10_000, seed=3, run_id="r",
                     rank=r, world_size=world)
        for r in range(world)
    ]  # fmt: skip
    # Each step's 8 fresh windows are split across the ranks as the trainer does; the window id
    # is written into the row so draws can be traced back to it.
    next_id = 0
    for step in range(steps):
        ids = np.arange(next_id, next_id + 8)
        next_id += 8
        for r, buf in enumerate(bufs):
            start, count = split_for_rank(8, world, r)
            rows = np.repeat(ids[start : start + count, None], row_len, axis=1)
            buf.add(rows, task_id=0, step=step)
    counts = np.zeros(next_id)
    for step in range(steps, steps + 3000):
        for r, buf in enumerate(bufs):
            _, n = split_for_rank(6, world, r)
            for row in buf.draw(step, n, current_task=1):
                counts[row[0]] += 1
    for buf in bufs:
        buf.close()
    assert counts.sum() == 3000 * 6
    assert stats.chisquare(counts).pvalue > 1e-3
    assert (tmp_path / "rank_0").is_dir() and (tmp_path / "rank_1").is_dir()
