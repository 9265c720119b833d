"""replay/prefetch.py: the thread that computes draws ahead never changes them, is used, hands
its errors to the training thread, and stops with the buffer."""

import itertools
import threading

import pytest

from cptrain.replay.buffer import ReplayBuffer
from cptrain.replay.config import ReplayConfig
from replay.test_buffer import ROW_LEN, RUN, VOCAB, fresh, make, same, shard, train


@pytest.mark.parametrize("policy", ["all", "reservoir", "fifo", "task_balanced"])
def test_prefetch_never_changes_the_draws(tmp_path, policy):
    cap = {} if policy == "all" else {"capacity": 40}
    plain, _ = train(make(tmp_path / "a", policy=policy, **cap), range(40))
    buf = make(tmp_path / "b", policy=policy, prefetch_mb=0.001, **cap)  # a 1-item queue
    ahead, _ = train(buf, range(40), prefetch=True)
    assert same(plain, ahead)
    assert buf.stats()["prefetch_hits"] > 0
    buf2 = make(tmp_path / "c", policy=policy, **cap)
    ahead2, _ = train(buf2, range(40), prefetch=True)
    assert same(plain, ahead2)
    assert sum(len(v) for v in plain.values()) > 100  # the runs did replay


def test_prefetch_is_used_and_draw_takes_its_rows(tmp_path):
    buf = make(tmp_path, visibility_lag=3)
    train(buf, range(30), prefetch=True)
    st = buf.stats()
    assert st["prefetch_hits"] >= 20
    assert st["draws"] == 30 and st["rows_drawn"] == st["rows_requested"] - 5 * 4


def test_prefetch_exception_reaches_the_training_thread(tmp_path):
    buf = make(tmp_path)
    train(buf, range(5))

    def plan():
        raise KeyError("plan exploded")
        yield (5, 3, 0)

    buf.start_prefetch(plan())
    with pytest.raises(KeyError, match="plan exploded"):
        buf.draw(5, 3, current_task=0)
    buf.close()


def test_errors_inside_a_prefetched_draw_propagate(tmp_path):
    calls = itertools.count()

    def flaky(task, windows):
        if next(calls) >= 3:
            raise RuntimeError("shard reader died")
        return shard(task)[windows]

    cfg = ReplayConfig(storage="reference", visibility_lag=0)
    buf = ReplayBuffer(cfg, tmp_path, row_len=ROW_LEN, vocab_size=VOCAB, seed=1, run_id=RUN,
                       resolver=flaky)
    train(buf, range(3))
    buf.start_prefetch((s, 4, 0) for s in itertools.count(3))
    with pytest.raises(RuntimeError, match="shard reader died"):
        for s in range(3, 20):
            buf.draw(s, 4, current_task=0)
            buf.add(*fresh(s)[:1], task_id=0, step=s, refs=fresh(s)[1])
    buf.close()


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("replay-prefetch")]


def test_close_stops_the_thread_and_is_idempotent(tmp_path):
    before = len(_prefetch_threads())
    buf = make(tmp_path)
    train(buf, range(3))
    buf.start_prefetch((s, 4, 0) for s in itertools.count(3))  # endless plan
    assert len(_prefetch_threads()) == before + 1
    buf.start_prefetch((s, 4, 0) for s in itertools.count(3))  # replaces, does not add
    assert len(_prefetch_threads()) == before + 1
    buf.close()
    assert len(_prefetch_threads()) == before
    buf.close()
    with pytest.raises(RuntimeError):
        buf.draw(3, 1, current_task=0)

