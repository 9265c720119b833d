"""What each optimizer step trains on (cptrain.train.batches): task streams, the batch plan
and the samplers, on stand-in shards (nothing here reads a prepared dataset or trains).
tests/train/test_trainer.py covers a stream's order on real shards and unique_tokens pools."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_run_config

from cptrain.errors import CheckpointError, ConfigError, DataError
from cptrain.train.batches import (
    BatchPlan,
    JointSampler,
    SequentialSampler,
    TaskStream,
    joint_weights,
    make_sampler,
    task_key,
)

WL = 5  # window length of the stand-in shards


class FakeShard:
    """``n`` windows; window i holds i * 1000 + 0..len-1, so a row tells which window it is."""

    def __init__(self, n: int, tokens: int | None = None):
        self.n = n
        self.num_tokens = tokens if tokens is not None else n * WL

    def num_windows(self, window_len: int) -> int:
        if self.n == 0:
            raise DataError("task t: its train split holds no window")
        return self.n

    def windows(self, idx, window_len: int) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return (idx[:, None] * 1000 + np.arange(window_len)[None, :]).astype(np.int64)


def stream(n: int = 10, name: str = "email", seed: int = 0, **kw) -> TaskStream:
    return TaskStream(FakeShard(n), 0, seed, WL, name, **kw)


def config(tmp_path: Path, **sections):
    return tiny_run_config(tmp_path / "run", tmp_path / "data", **sections)


def plan(n_fresh: int = 8, n_replay: int = 0, world: int = 1, rank: int = 0,
         task_steps: tuple[int, ...] = (3, 3)) -> BatchPlan:
    from cptrain.replay.mixer import split_for_rank

    return BatchPlan(seq_len=WL - 1, batch_size=n_fresh + n_replay, n_fresh=n_fresh,
                     n_replay=n_replay, fresh_slice=split_for_rank(n_fresh, world, rank),
                     n_replay_local=split_for_rank(n_replay, world, rank)[1],
                     task_steps=task_steps)


# ---------------------------------------------------------------------------- task streams
def test_task_key_is_a_stable_63_bit_sha256_key():
    # pinned: a different key would change the windows of every run, resumed ones included
    assert task_key("email") == 4688847596925179454
    assert task_key("") == 8203414616412130826
    assert task_key("ü") == 3475154268534426514  # the name's UTF-8
    keys = {task_key(n) for n in ("email", "xml", "asyncio", "Email", "email ")}
    assert len(keys) == 5 and all(0 <= k < 2**63 for k in keys)


def test_the_order_is_pinned_for_a_seed_and_a_name():
    """A pure function of seed, name and position: the same in every process and version
    (a resume, or a run comparing itself with another, relies on it)."""
    assert stream(10).indices(0, 20).tolist() == [
        4, 6, 1, 5, 9, 7, 2, 3, 8, 0, 4, 7, 6, 8, 3, 5, 1, 0, 2, 9]


def test_every_epoch_is_a_new_permutation_of_all_windows():
    s = stream(50)
    whole = s.indices(0, 50 * 4)
    epochs = whole.reshape(4, 50)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(50))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch


def test_any_position_reads_the_same_windows_in_any_order():
    s, whole = stream(13), stream(13).indices(0, 13 * 5)
    # reads that cross epoch boundaries, backwards, and in pieces of every size
    for start, count in ((60, 5), (0, 13), (11, 4), (25, 27), (12, 1), (3, 0), (26, 13)):
        assert s.indices(start, count).tolist() == whole[start:start + count].tolist()
    assert s.indices(3, 0).dtype == np.int64 and s.indices(3, 0).shape == (0,)


def test_task_idx_is_kept_but_does_not_change_the_order():
    a = TaskStream(FakeShard(20), 0, 7, WL, "xml")
    b = TaskStream(FakeShard(20), 5, 7, WL, "xml")
    assert np.array_equal(a.indices(0, 60), b.indices(0, 60))
    assert not np.array_equal(a.indices(0, 20), stream(20, "xml", seed=8).indices(0, 20))


def test_rows_are_the_shards_windows():
    s = stream(10)
    idx = s.indices(4, 3)
    rows = s.rows(idx)
    assert rows.shape == (3, WL) and rows[:, 0].tolist() == [int(i) * 1000 for i in idx]


def test_a_task_without_a_window_is_a_data_error():
    with pytest.raises(DataError, match="holds no window"):
        stream(0)


# ---------------------------------------------------------------------------- the plan
def test_plan_of_a_sequential_run(tmp_path):
    p = BatchPlan.build(config(tmp_path), world_size=1, rank=0)
    assert (p.seq_len, p.batch_size, p.n_fresh, p.n_replay) == (32, 8, 8, 0)
    assert p.fresh_slice == (0, 8) and p.n_replay_local == 0
    assert p.task_steps == (6, 6, 6) and p.total_steps == 18


@pytest.mark.parametrize(
    ("replay", "rows"),
    [({"alpha": 0.25}, (6, 2)), ({"alpha": 0.5}, (4, 4)),
     ({"alpha": 0.25, "mode": "additive"}, (8, 3)), ({"alpha": 0.2, "mode": "additive"}, (8, 2))],
)
def test_plan_rows_of_a_replay_run(tmp_path, replay, rows):
    p = BatchPlan.build(config(tmp_path, replay=replay), world_size=1, rank=0)
    assert (p.n_fresh, p.n_replay) == rows and p.batch_size == 8


def test_steps_per_task_round_each_budget_up(tmp_path):
    tasks = [{"name": "email", "tokens": 1}, {"name": "xml", "tokens": 8 * 32 + 1}, "asyncio"]
    p = BatchPlan.build(config(tmp_path, data={"tasks": tasks}), world_size=1, rank=0)
    assert p.task_steps == (1, 2, 6) and p.total_steps == 9


@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_each_rank_takes_a_contiguous_slice_of_the_rows(tmp_path, world):
    cfg = config(tmp_path, replay={"alpha": 0.25}, train={"batch_size": 12})
    plans = [BatchPlan.build(cfg, world_size=world, rank=r) for r in range(world)]
    assert {(p.n_fresh, p.n_replay, p.task_steps) for p in plans} == {(9, 3, (4, 4, 4))}
    starts = [p.fresh_slice[0] for p in plans]
    counts = [p.fresh_slice[1] for p in plans]
    assert starts == [sum(counts[:r]) for r in range(world)] and sum(counts) == 9
    assert max(counts) - min(counts) <= 1
    replay = [p.n_replay_local for p in plans]
    assert sum(replay) == 3 and max(replay) - min(replay) <= 1


def test_a_plan_without_fresh_rows_is_refused(tmp_path):
    cfg = config(tmp_path, replay={"alpha": 0.95})
    with pytest.raises(ConfigError, match="leaves no fresh sequence in a batch of 8"):
        BatchPlan.build(cfg, world_size=1, rank=0)


def test_upcoming_lists_every_step_left_with_its_task():
    p = plan(n_fresh=6, n_replay=2, task_steps=(2, 3, 1))
    assert list(p.upcoming(0, 0, 0)) == [(s, 2, t) for s, t in enumerate((0, 0, 1, 1, 1, 2))]
    assert list(p.upcoming(3, 1, 1)) == [(3, 2, 1), (4, 2, 1), (5, 2, 2)]
    assert list(p.upcoming(6, 3, 0)) == []
    two = plan(n_fresh=6, n_replay=3, world=2, rank=1, task_steps=(2,))
    assert list(two.upcoming(0, 0, 0)) == [(0, 1, 0), (1, 1, 0)]  # this rank's share


def _data(train_windows: list[int], val_windows: dict[str, int]):
    return SimpleNamespace(
        streams=[SimpleNamespace(n=n) for n in train_windows],
        val_sets={name: FakeShard(n, tokens=n * 33 + 5) for name, n in val_windows.items()},
        window_len=33,
    )


def test_no_warning_for_an_exact_share_enough_windows_and_val(tmp_path, capsys):
    cfg = config(tmp_path, replay={"alpha": 0.25}, data={"tasks": ["email", "xml"]})
    p = BatchPlan.build(cfg, 1, 0)
    assert p.warnings(cfg, _data([36, 100], {"email": 8, "xml": 8}), show=True) == []
    assert capsys.readouterr().err == ""


def test_a_rounded_replay_share_is_warned_of(tmp_path):
    cfg = config(tmp_path, replay={"alpha": 0.3}, data={"tasks": ["email"]})
    p = BatchPlan.build(cfg, 1, 0)
    assert p.warnings(cfg, _data([1000], {"email": 8}), show=False) == [
        "replay.alpha=0.3 replays 2 of 8 rows a step (25.0%, not 30.0%): the rows are whole; "
        "pick a batch size where the share is exact to get it"]


def test_repeated_windows_are_warned_of_unless_deliberate(tmp_path):
    cfg = config(tmp_path, data={"tasks": ["email", "xml"]})
    p = BatchPlan.build(cfg, 1, 0)  # 6 steps of 8 windows: 48 per task
    got = p.warnings(cfg, _data([40, 48], {"email": 8, "xml": 8}), show=False)
    assert got == ["task email: its budget draws 48 training windows of its 40 (1.2 passes): "
                   "windows repeat; lower its tokens, add data, or set unique_tokens to make "
                   "repetition deliberate"]
    limited = config(tmp_path, data={"tasks": [{"name": "email", "unique_tokens": 64}, "xml"]})
    assert p.warnings(limited, _data([2, 48], {"email": 8, "xml": 8}), show=False) == []


def test_a_thin_validation_split_is_warned_of_and_shown(tmp_path, capsys):
    cfg = config(tmp_path, data={"tasks": ["email"], "eval_only": ["xml"]})
    p = BatchPlan.build(cfg, 1, 0)
    got = p.warnings(cfg, _data([1000], {"email": 7, "xml": 8}), show=True)
    assert got == [
        "task email: its val split holds 7 window(s) of 32 tokens (236 tokens), fewer than "
        "eval.windows 8: its validation losses rest on 7; give it more val text (or a larger "
        "val_fraction when preparing)"]
    assert capsys.readouterr().err == f"warning: {got[0]}\n"
    # the bar is min(eval.windows, 16): 16 windows are enough however many eval.windows asks
    many = config(tmp_path, data={"tasks": ["email"]}, eval={"windows": 64})
    assert BatchPlan.build(many, 1, 0).warnings(many, _data([1000], {"email": 16}), False) == []


# ---------------------------------------------------------------------------- samplers
def test_sequential_draws_the_streams_windows_in_order():
    streams = [stream(20, "a"), stream(30, "b")]
    s = SequentialSampler(streams, plan(n_fresh=8))
    rows, used = s.draw(1, step=0)
    want = stream(30, "b").indices(0, 8)
    assert [t for t, _ in used] == [1] and np.array_equal(used[0][1], want)
    assert np.array_equal(rows, streams[1].rows(want))
    s.draw(1, 1)
    s.draw(0, 2)
    assert s.state_dict() == {"cursors": [8, 16]}
    _, used = s.draw(1, 3)
    assert np.array_equal(used[0][1], stream(30, "b").indices(16, 8))


@pytest.mark.parametrize("world", [2, 3])
def test_sequential_ranks_split_the_global_batch(world):
    whole = SequentialSampler([stream(25)], plan(n_fresh=7))
    ranks = [SequentialSampler([stream(25)], plan(n_fresh=7, world=world, rank=r))
             for r in range(world)]
    for step in range(5):
        rows, _ = whole.draw(0, step)
        parts = [r.draw(0, step)[0] for r in ranks]
        assert np.array_equal(np.concatenate(parts), rows)
    assert {tuple(r.cursors) for r in ranks} == {tuple(whole.cursors)} == {(35,)}


def _joint(world: int = 1, rank: int = 0, weights=(1.0, 2.0, 1.0), seed: int = 5):
    streams = [stream(n, name) for n, name in ((11, "a"), (17, "b"), (13, "c"))]
    return JointSampler(streams, plan(n_fresh=10, world=world, rank=rank),
                        np.array(weights, dtype=np.float64), seed)


def test_joint_draws_a_mixture_of_every_task():
    s = _joint()
    assert np.allclose(s.p, [0.25, 0.5, 0.25])
    seen = set()
    for step in range(8):
        before = list(s.cursors)
        rows, used = s.draw(task=0, step=step)
        assert rows.shape == (10, WL) and sum(len(i) for _, i in used) == 10
        for t, idx in used:
            # each task's windows continue its own stream, from its cursor
            assert np.array_equal(idx, s.streams[t].indices(before[t], len(idx)))
            seen.add(t)
        assert np.array_equal(rows, np.concatenate([s.streams[t].rows(i) for t, i in used]))
        assert sum(s.cursors) - sum(before) == 10
    assert seen == {0, 1, 2}
    assert _joint(weights=(0.0, 1.0, 0.0)).draw(0, 0)[1][0][0] == 1  # weight 0: never drawn


def test_joint_draws_depend_on_seed_step_and_cursors_only():
    a, b = _joint(), _joint()
    first = [a.draw(0, s)[0] for s in range(4)]
    b.load_state_dict(a.state_dict())  # a resume at step 4
    assert all(np.array_equal(a.draw(2, s)[0], b.draw(0, s)[0]) for s in range(4, 7))
    again = _joint()
    assert all(np.array_equal(again.draw(1, s)[0], first[s]) for s in range(4))
    other = _joint(seed=6)
    assert not all(np.array_equal(other.draw(0, s)[0], first[s]) for s in range(4))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_joint_ranks_split_the_global_batch(world):
    whole = _joint()
    ranks = [_joint(world, r) for r in range(world)]
    for step in range(6):
        rows, used = whole.draw(0, step)
        parts = [r.draw(0, step) for r in ranks]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), rows)
        for t, idx in used:  # the ranks' sources add up to the whole batch's
            mine = [i for p in parts for tt, i in p[1] if tt == t]
            assert np.array_equal(np.concatenate(mine), idx)
    assert all(r.cursors == whole.cursors for r in ranks)


def test_sampler_state_round_trips_through_json():
    s = SequentialSampler([stream(10, "a"), stream(10, "b")], plan(n_fresh=4))
    for step, task in enumerate((0, 0, 1)):
        s.draw(task, step)
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"cursors": [8, 4]}
    s.draw(0, 3)
    assert state == {"cursors": [8, 4]}  # a copy, not the live cursors
    resumed = SequentialSampler([stream(10, "a"), stream(10, "b")], plan(n_fresh=4))
    resumed.load_state_dict(state)
    s.load_state_dict(state)
    for step, task in ((3, 1), (4, 0), (5, 1)):
        assert np.array_equal(s.draw(task, step)[0], resumed.draw(task, step)[0])
    assert s.cursors == resumed.cursors == [12, 12]


@pytest.mark.parametrize(
    "state", [{"cursors": [1]}, {"cursors": [1, 2, 3]}, {"cursors": (1, 2)}, {"cursors": None},
              {}, None, [1, 2], {"position": [1, 2]}])
def test_cursors_that_do_not_fit_the_task_list_are_refused(state):
    s = SequentialSampler([stream(10, "a"), stream(10, "b")], plan())
    with pytest.raises(CheckpointError, match=r"not one per task \(2\); resume with the task"):
        s.load_state_dict(state)
    assert s.cursors == [0, 0]


# ---------------------------------------------------------------------------- joint weights
def test_joint_weights_by_budget_size_or_given(tmp_path):
    tasks = [{"name": "email", "tokens": 8 * 32 * 2}, "xml", {"name": "asyncio", "tokens": 1}]
    cfg = config(tmp_path, method="joint", data={"tasks": tasks})
    p = BatchPlan.build(cfg, 1, 0)
    assert joint_weights(cfg, p, [100, 200, 300]) == [2.0, 6.0, 1.0]  # each task's steps
    by_size = config(tmp_path, method="joint", data={"tasks": tasks, "joint_weighting": "size"})
    assert joint_weights(by_size, p, [100, 200, 300]) == [100.0, 200.0, 300.0]
    given = config(tmp_path, method="joint", data={"tasks": tasks, "joint_weights": [3, 0, 1],
                                                   "joint_weighting": "size"})
    assert joint_weights(given, p, [100, 200, 300]) == [3.0, 0.0, 1.0]


def test_make_sampler_picks_the_methods_sampler(tmp_path):
    streams = [stream(10, n) for n in ("email", "xml", "asyncio")]
    seq = config(tmp_path, method="replay")
    s = make_sampler(seq, streams, BatchPlan.build(seq, 1, 0), [1, 1, 1])
    assert type(s) is SequentialSampler
    joint = config(tmp_path, method="joint", seed=9,
                   data={"tasks": [{"name": "email", "tokens": 8 * 32 * 3}, "xml", "asyncio"]})
    j = make_sampler(joint, streams, BatchPlan.build(joint, 1, 0), [1, 1, 1])
    assert isinstance(j, JointSampler) and j.seed == 9
    assert np.allclose(j.p, [3 / 15, 6 / 15, 6 / 15])
