"""ReplayBuffer behaviour: visibility, uniform draws, determinism across a resume, reference vs
copy storage, replay_from, ranks, chunk reclaiming. The helpers here are shared with the tests
of the buffer's parts: test_prefetch.py, test_buffer_state.py, test_seed_rows.py."""

import json
import shutil

import numpy as np
import pytest
from scipy.stats import chisquare

from cptrain.errors import CheckpointError, ConfigError
from cptrain.replay.buffer import ReplayBuffer
from cptrain.replay.config import ReplayConfig

ROW_LEN, VOCAB, SEED, RUN = 17, 50_000, 7, "run-a"
N_FRESH, STEPS_PER_TASK, SHARD_ROWS = 6, 10, 4000
_SHARDS: dict[int, np.ndarray] = {}


def shard(task: int) -> np.ndarray:
    """A task's immutable token shard: row w starts with (w, task)."""
    if task not in _SHARDS:
        a = np.random.default_rng(task).integers(0, VOCAB, (SHARD_ROWS, ROW_LEN))
        a[:, 0], a[:, 1] = np.arange(SHARD_ROWS), task
        _SHARDS[task] = a
    return _SHARDS[task]


def resolver(task: int, windows: np.ndarray) -> np.ndarray:
    return shard(task)[windows]


def task_of(step: int) -> int:
    return step // STEPS_PER_TASK


def fresh(step: int, n: int = N_FRESH) -> tuple[np.ndarray, np.ndarray]:
    windows = (step * N_FRESH + np.arange(n)) % SHARD_ROWS
    return shard(task_of(step))[windows], windows


def step_of(rows: np.ndarray) -> np.ndarray:
    return rows[:, 0] // N_FRESH


def make(path, *, run_id=RUN, rank=0, world_size=1, reference=False, **cfg) -> ReplayBuffer:
    cfg.setdefault("chunk_mb", 50 * ROW_LEN * 2 / 2**20)  # 50 rows per chunk: many chunks
    if reference:
        cfg["storage"] = "reference"
    return ReplayBuffer(ReplayConfig(**cfg), path, row_len=ROW_LEN, vocab_size=VOCAB, seed=SEED,
                        run_id=run_id, rank=rank, world_size=world_size,
                        resolver=resolver if reference else None)


def train(buf, steps, *, n_draw=5, prefetch=False, checkpoint_at=None):
    """The trainer's call pattern: draw before the step, add after it."""
    draws, state = {}, None
    if prefetch:
        buf.start_prefetch((s, n_draw, task_of(s)) for s in steps)
    for s in steps:
        draws[s] = buf.draw(s, n_draw, current_task=task_of(s))
        rows, windows = fresh(s)
        buf.add(rows, task_id=task_of(s), step=s, refs=windows)
        if s == checkpoint_at:
            buf.commit()
            state = json.loads(json.dumps(buf.state_dict()))  # as a checkpoint stores it
    return draws, state


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_draw_sees_exactly_the_rows_added_before_the_lag(tmp_path):
    buf = make(tmp_path, visibility_lag=2)
    assert buf.draw(0, 4, current_task=0).shape == (0, ROW_LEN)
    train(buf, range(10))
    got = buf.draw(10, 1000, current_task=0)
    assert got.dtype == np.int64
    assert sorted(map(tuple, got.tolist())) == sorted(
        map(tuple, np.concatenate([fresh(s)[0] for s in range(8)]).tolist()))  # steps ≤ 10-1-2
    assert buf.available(10, current_task=0) == 8 * N_FRESH
    assert len(buf) == 10 * N_FRESH


def test_draws_are_distinct_and_uniform_over_the_whole_buffer(tmp_path):
    buf = make(tmp_path, visibility_lag=0)
    train(buf, range(20))  # 120 rows in 3 chunks
    counts = np.zeros(20 * N_FRESH)
    for s in range(100, 2500):
        rows = buf.draw(s, 10, current_task=0)
        assert len({tuple(r) for r in rows.tolist()}) == 10
        counts[rows[:, 0]] += 1
    assert chisquare(counts).pvalue > 0.001


@pytest.mark.parametrize("policy", ["all", "reservoir", "fifo", "task_balanced"])
@pytest.mark.parametrize("reference", [False, True])
def test_resume_replays_exactly_and_discards_rows_after_the_checkpoint(tmp_path, policy,
                                                                       reference):
    cap = {} if policy == "all" else {"capacity": 45}
    steps = range(50)
    full, state = train(make(tmp_path / "a", policy=policy, reference=reference, **cap), steps,
                        checkpoint_at=24)
    # A run that continued past the checkpoint, then was killed without closing.
    killed = make(tmp_path / "b", policy=policy, reference=reference, **cap)
    _, state_b = train(killed, range(33), checkpoint_at=24)
    assert state_b == state
    killed.commit()  # even rows made durable after the checkpoint must go
    resumed = make(tmp_path / "b", policy=policy, reference=reference, **cap)
    resumed.load_state_dict(state_b)
    assert len(resumed) == state["rows"]
    assert resumed.stats()["stored_rows"] == state["store"]["rows"]
    # nothing written after the checkpoint comes back, however far ahead one looks
    assert step_of(resumed.draw(10_000, 10_000, current_task=0)).max() <= 24
    again, _ = train(resumed, range(25, 50), prefetch=True)
    assert same(again, {s: full[s] for s in range(25, 50)})


def test_resume_continues_the_reservoir_sequence(tmp_path):
    cfg = {"policy": "reservoir", "capacity": 20, "visibility_lag": 0}
    full = make(tmp_path / "a", **cfg)
    _, state = train(full, range(60), checkpoint_at=29)
    resumed = make(tmp_path / "b", **cfg)
    train(resumed, range(30), checkpoint_at=29)
    resumed.close()
    resumed = make(tmp_path / "b", **cfg)
    resumed.load_state_dict(state)
    train(resumed, range(30, 60))
    contents = [sorted(map(tuple, b.draw(1000, 100, current_task=0).tolist())) for b in
                (full, resumed)]
    assert contents[0] == contents[1] and len(contents[0]) == 20
    assert state["policy_state"]["seen"] == 30 * N_FRESH


def test_reference_and_copy_return_the_same_tokens(tmp_path):
    copy_buf = make(tmp_path / "copy")
    ref_buf = make(tmp_path / "ref", reference=True)
    a, _ = train(copy_buf, range(40), n_draw=8)
    b, _ = train(ref_buf, range(40), n_draw=8)
    assert same(a, b)
    for rows in b.values():  # and they are the shard's tokens
        for r in rows:
            assert np.array_equal(r, shard(int(r[1]))[r[0]])
    token_bytes = [sum(f.stat().st_size for f in (tmp_path / d / "rank_0").glob("*.rows"))
                   for d in ("ref", "copy")]
    assert token_bytes[0] * 4 < token_bytes[1]  # 8 bytes per row instead of 2 per token


def test_replay_from_previous_tasks_skips_the_current_task(tmp_path):
    buf = make(tmp_path, replay_from="previous_tasks", visibility_lag=1)
    draws, _ = train(buf, range(35), n_draw=8)
    for s, rows in draws.items():
        assert (rows[:, 1] != task_of(s)).all()
        assert (rows[:, 1] < task_of(s)).all()
    assert all(len(draws[s]) == 0 for s in range(10))  # only task 0 so far
    assert all(len(draws[s]) == 8 for s in range(10, 35))
    assert buf.available(100, current_task=1) == 25 * N_FRESH


def test_ranks_have_their_own_directories_and_draws(tmp_path):
    b0, b1 = make(tmp_path, rank=0, world_size=2), make(tmp_path, rank=1, world_size=2)
    d0, _ = train(b0, range(20))
    d1, _ = train(b1, range(20))
    assert (tmp_path / "rank_0" / "manifest.json").exists()
    assert (tmp_path / "rank_1" / "manifest.json").exists()
    assert not same(d0, d1)


def test_directory_of_another_run_is_refused(tmp_path):
    train(make(tmp_path, run_id="run-a"), range(3))
    with pytest.raises(ConfigError) as err:
        make(tmp_path, run_id="run-b")
    assert "run-a" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("policy", ["all", "fifo"])
def test_a_fresh_start_over_an_old_directory_starts_empty(tmp_path, policy):
    cap = {} if policy == "all" else {"capacity": 1000}
    earlier = make(tmp_path, policy=policy, **cap)
    for start in range(0, 50, 10):  # an earlier attempt that checkpointed 5 times
        train(earlier, range(start, start + 10), checkpoint_at=start + 9)
    earlier.close()
    buf = make(tmp_path, policy=policy, **cap)
    draws, state = train(buf, range(100, 110), checkpoint_at=109)
    assert len(buf) == 10 * N_FRESH
    assert all(step_of(d).min() >= 100 for d in draws.values() if len(d))
    snapshots = sorted(p.name for p in (tmp_path / "rank_0").glob("policy_*.npz"))
    assert snapshots == ([] if policy == "all" else [state["snapshot"]["file"]])


def test_bounded_policy_reclaims_chunks_and_old_checkpoints_fail_cleanly(tmp_path):
    cfg = {"policy": "fifo", "capacity": 30, "keep_checkpoints": 2}
    buf = make(tmp_path, **cfg)
    states = []
    for start in range(0, 200, 10):
        _, st = train(buf, range(start, start + 10), checkpoint_at=start + 9)
        states.append(st)
    # 1200 rows seen; only the last ~3 checkpoints' rows (plus one open chunk) stay on disk
    assert buf.stats()["bytes_on_disk"] < 200 * ROW_LEN * 2 * 3
    assert len(list((tmp_path / "rank_0").glob("policy_*.npz"))) == 3
    expected = {s: buf.draw(s, 5, current_task=task_of(s)) for s in range(200, 205)}
    buf.close()
    for i, st in enumerate(states[-3:]):  # each kept checkpoint resumes (in a copy: resuming
        copy = tmp_path / f"copy{i}"      # an older one abandons the newer ones)
        shutil.copytree(tmp_path / "rank_0", copy / "rank_0")
        b = make(copy, **cfg)
        b.load_state_dict(st)
        assert len(b) == 30
        b.close()
    b = make(tmp_path, **cfg)
    b.load_state_dict(states[-1])
    assert same({s: b.draw(s, 5, current_task=task_of(s)) for s in range(200, 205)}, expected)
    with pytest.raises(CheckpointError) as err:
        make(tmp_path, **cfg).load_state_dict(states[-5])
    assert "keep_checkpoints" in str(err.value) and "\n" not in str(err.value)


def test_steps_must_increase(tmp_path):
    buf = make(tmp_path)
    buf.add(fresh(3)[0], task_id=0, step=3)
    with pytest.raises(ValueError):
        buf.add(fresh(3)[0], task_id=0, step=3)


@pytest.mark.parametrize("prefetch", [False, True])
def test_the_last_draw_names_the_task_and_id_of_every_returned_row(tmp_path, prefetch):
    buf = make(tmp_path, replay_from="all")
    steps = range(40)
    if prefetch:
        buf.start_prefetch((s, 5, task_of(s)) for s in steps)
    seen = 0
    for s in steps:
        rows = buf.draw(s, 5, current_task=task_of(s))
        drawn = buf.last_drawn(s)
        assert drawn is not None and drawn.tasks is not None and len(drawn.tasks) == len(rows)
        assert rows[:, 1].tolist() == drawn.tasks.tolist()  # a shard row's 2nd token: its task
        # the buffer ids read back the same rows
        assert (buf.read_rows(drawn.ids)[0] == rows).all()
        seen += len(rows)
        assert buf.last_drawn(s + 1) is None  # only the latest draw's
        buf.add(*fresh(s)[:1], task_id=task_of(s), step=s, refs=fresh(s)[1])
    assert seen > 0
    buf.close()
