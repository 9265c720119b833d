"""Admission policies: true reservoir sampling, FIFO, task balance, visibility, sampling."""

import numpy as np
import pytest
from scipy.stats import chisquare

from cptrain.replay.policies import (
    AllPolicy,
    FifoPolicy,
    ReservoirPolicy,
    TaskBalancedPolicy,
    _choose,
)


def _feed(policy, stream_tasks, batch_sizes, first_step=0):
    """Offer a stream in batches (one step per batch); return phys id → stream position."""
    phys_to_pos: list[int] = []
    pos = 0
    step = first_step
    rng = np.random.default_rng(123)
    while pos < len(stream_tasks):
        k = int(min(batch_sizes(rng), len(stream_tasks) - pos))
        adm = policy.admit(np.asarray(stream_tasks[pos:pos + k]), step, len(phys_to_pos))
        phys_to_pos.extend((pos + np.flatnonzero(adm.keep)).tolist())
        pos += k
        step += 1
    return np.asarray(phys_to_pos)


def _members(policy, phys_to_pos):
    return np.sort(phys_to_pos[policy.live_ids()])


def _reservoir_counts(runs, length, capacity):
    counts = np.zeros(length)
    for seed in range(runs):
        pol = ReservoirPolicy(capacity, seed=seed, rank=0)
        p2p = _feed(pol, [0] * length, lambda r: r.integers(1, 9))
        members = _members(pol, p2p)
        assert len(members) == capacity == len(np.unique(members))
        counts[members] += 1
    return counts


def test_reservoir_is_uniform_over_the_stream():
    runs, length, capacity = 3000, 40, 8
    counts = _reservoir_counts(runs, length, capacity)
    expected = np.full(length, runs * capacity / length)
    assert chisquare(counts, expected).pvalue > 0.001


def test_the_uniformity_check_rejects_random_overwrite():
    # The official code's "reservoir": always accept, overwrite a random slot. Same statistic,
    # must fail, which shows the test above can fail.
    runs, length, capacity = 3000, 40, 8
    counts = np.zeros(length)
    rng = np.random.default_rng(0)
    for _ in range(runs):
        slots = list(range(capacity))
        for pos in range(capacity, length):
            slots[rng.integers(capacity)] = pos
        counts[slots] += 1
    assert chisquare(counts, np.full(length, runs * capacity / length)).pvalue < 1e-6


def test_reservoir_sequence_does_not_depend_on_batching():
    a, b = ReservoirPolicy(10, seed=5, rank=1), ReservoirPolicy(10, seed=5, rank=1)
    stream = [0] * 500
    pa = _feed(a, stream, lambda r: 1)
    pb = _feed(b, stream, lambda r: r.integers(1, 40))
    assert np.array_equal(_members(a, pa), _members(b, pb))
    assert a.seen == b.seen == 500
    c = ReservoirPolicy(10, seed=6, rank=1)
    assert not np.array_equal(_members(c, _feed(c, stream, lambda r: 1)), _members(a, pa))


def test_rows_displaced_within_one_add_are_not_written():
    pol = ReservoirPolicy(4, seed=0, rank=0)
    adm = pol.admit(np.zeros(1000, dtype=np.int64), step=0, first_phys=0)
    assert adm.keep.sum() == 4  # everything else was accepted and displaced, or rejected
    assert sorted(pol.live_ids().tolist()) == [0, 1, 2, 3]


def test_fifo_keeps_the_newest_rows():
    pol = FifoPolicy(7, seed=0, rank=0)
    p2p = _feed(pol, [0] * 100, lambda r: r.integers(1, 12))
    assert _members(pol, p2p).tolist() == list(range(93, 100))
    assert len(pol) == 7


def test_task_balanced_quotas_and_uniform_shares():
    runs, capacity, la, lb = 1500, 12, 30, 40
    counts_a, counts_b = np.zeros(la), np.zeros(lb)
    for seed in range(runs):
        pol = TaskBalancedPolicy(capacity, seed=seed, rank=0)
        p2p = _feed(pol, [3] * la + [9] * lb, lambda r: r.integers(1, 7))
        members = _members(pol, p2p)
        in_a, in_b = members[members < la], members[members >= la] - la
        assert (len(in_a), len(in_b)) == (6, 6)
        counts_a[in_a] += 1
        counts_b[in_b] += 1
    assert chisquare(counts_a, np.full(la, runs * 6 / la)).pvalue > 0.001
    assert chisquare(counts_b, np.full(lb, runs * 6 / lb)).pvalue > 0.001


def test_task_balanced_gives_the_remainder_to_earlier_tasks():
    pol = TaskBalancedPolicy(31, seed=0, rank=0)
    p2p = _feed(pol, [0] * 50 + [1] * 50 + [2] * 50, lambda r: 10)
    members = _members(pol, p2p)
    assert [int(((members >= 50 * t) & (members < 50 * (t + 1))).sum()) for t in range(3)] == [
        11, 10, 10]
    assert len(pol) == 31


def test_visibility_follows_birth_and_death_steps():
    pol = FifoPolicy(3, seed=0, rank=0)
    for step in range(10):  # one row per step: phys id == step
        pol.admit(np.zeros(1, dtype=np.int64), step, step)
    rng = np.random.default_rng(0)
    for t in range(-1, 12):
        seen = sorted(pol.sample(rng, t, 100, None).tolist())
        # the row of step s leaves when step s + 3 adds its successor; nothing leaves after 9
        assert seen == [s for s in range(10) if min(t, 9) - 3 < s <= t], t
        assert pol.visible_count(t, None) == len(seen)


def _brute_force_sample(steps, tasks, seed, t, n, exclude):
    eligible = np.flatnonzero((steps <= t) & ((tasks != exclude) if exclude is not None else True))
    return eligible[_choose(np.random.default_rng(seed), len(eligible), n)]


def test_all_policy_index_matches_brute_force():
    rng = np.random.default_rng(1)
    pol = AllPolicy(None, seed=0, rank=0)
    steps, tasks = [], []
    task = 0
    for step in range(60):
        if rng.random() < 0.15:
            task = int(rng.integers(0, 4))  # tasks may come back (EN→FR→EN)
        k = int(rng.integers(0, 6))
        pol.admit(np.full(k, task), step, len(steps))
        steps += [step] * k
        tasks += [task] * k
    steps_a, tasks_a = np.asarray(steps), np.asarray(tasks)
    for t in range(-2, 62, 3):
        for exclude in (None, 0, 1, 2, 3):
            for n in (0, 1, 7, 1000):
                got = pol.sample(np.random.default_rng(t + 10), t, n, exclude)
                want = _brute_force_sample(steps_a, tasks_a, t + 10, t, n, exclude)
                assert np.array_equal(got, want), (t, exclude, n)
                assert pol.visible_count(t, exclude) == len(
                    _brute_force_sample(steps_a, tasks_a, 0, t, 10**9, exclude))


@pytest.mark.parametrize("cls", [ReservoirPolicy, FifoPolicy, TaskBalancedPolicy])
def test_bounded_policies_need_a_capacity(cls):
    with pytest.raises(ValueError):
        cls(None, seed=0, rank=0)


@pytest.mark.parametrize("cls", [ReservoirPolicy, FifoPolicy, TaskBalancedPolicy])
def test_compaction_and_forgetting_never_change_a_draw(cls):
    plain, pruned = cls(15, seed=2, rank=0), cls(15, seed=2, rank=0)
    lag = 2
    for step in range(120):
        tasks = np.full(4, step // 30)
        for pol in (plain, pruned):
            pol.admit(tasks, step, pol.rows)
        pruned.compact(step - lag - 1, force=True)
        if step % 10 == 9:  # rows below every candidate are dead for good: forget them
            pruned.forget_below(int(pruned._cand.min()) if len(pruned._cand) else pruned.rows)
        t = step - lag  # the next step's draw
        for exclude in (None, step // 30):
            got = pruned.sample(np.random.default_rng(step), t, 10, exclude)
            want = plain.sample(np.random.default_rng(step), t, 10, exclude)
            assert np.array_equal(got, want)
    assert len(pruned._cand) < plain.rows / 3 and pruned._base > 0
