"""replay/seed_rows.py: seed rows (replay.seed) in the buffer: tagged with their origin,
visible from step 0, treated like any row by the policies, carried through a checkpoint (their
own store in reference mode), and absent without a trace from a buffer that is never seeded."""

import json
import shutil

import numpy as np
import pytest

from cptrain.errors import CheckpointError
from cptrain.replay.buffer import SEED_STEP, seed_task_id
from cptrain.replay.seed_rows import MAX_SEED_ORIGIN, saved_seeds, seed_origin
from cptrain.replay.storage import META_DTYPE
from replay.test_buffer import ROW_LEN, VOCAB, fresh, make, same, task_of, train

SEED_TAG = 49_999  # column 1 of a seed row (shard rows hold their task there)


CAPS = {"all": {}, "reservoir": {"capacity": 45}, "fifo": {"capacity": 45},
        "task_balanced": {"capacity": 45}}


def seed_rows(n: int, origin: int = 0) -> np.ndarray:
    a = np.random.default_rng(100 + origin).integers(0, VOCAB, (n, ROW_LEN))
    a[:, 0], a[:, 1], a[:, 2] = np.arange(n), SEED_TAG, origin
    return a


def is_seed(rows: np.ndarray) -> np.ndarray:
    return rows[:, 1] == SEED_TAG


def seeded(path, n=(30, 20), **cfg):
    buf = make(path, **cfg)
    for origin, k in enumerate(n):
        buf.add_seed(seed_rows(k, origin), origin=origin, name=["task:a", "self"][origin])
    return buf


@pytest.mark.parametrize("reference", [False, True])
def test_seed_rows_are_tagged_and_drawn_from_step_0(tmp_path, reference):
    buf = seeded(tmp_path, reference=reference)
    assert len(buf) == 50 and buf.available(0, current_task=0) == 50
    got = buf.draw(0, 50, current_task=0)
    assert is_seed(got).all()
    want = np.concatenate([seed_rows(30, 0), seed_rows(20, 1)])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    buf.commit()
    meta = np.fromfile(tmp_path / "rank_0" / "chunk_000000.meta", dtype=META_DTYPE)
    assert (meta["step"][:50] == SEED_STEP).all()
    assert meta["task"][:50].tolist() == [seed_task_id(0)] * 30 + [seed_task_id(1)] * 20
    assert seed_task_id(0) == -2 and seed_task_id(1) == -3
    assert (tmp_path / "rank_0" / "seed").is_dir() == reference
    st = buf.stats()
    assert (st["seed_rows"], st["rows_drawn_seed"], st["last_draw"]["seed"]) == (50, 50, 50)
    assert st["seed"] == {"task:a": {"origin": 0, "rows": 30, "rows_drawn": 30},
                          "self": {"origin": 1, "rows": 20, "rows_drawn": 20}}


@pytest.mark.parametrize("replay_from", ["all", "previous_tasks"])
def test_seed_rows_are_replayed_uniformly_with_the_rest_during_task_0(tmp_path, replay_from):
    buf = seeded(tmp_path, replay_from=replay_from, visibility_lag=0)
    draws, _ = train(buf, range(5))  # task 0: 6 fresh rows a step
    assert buf.available(5, current_task=0) == (50 if replay_from == "previous_tasks" else 80)
    assert buf.stats()["rows_drawn_seed"] == sum(int(is_seed(d).sum()) for d in draws.values())
    if replay_from == "previous_tasks":
        assert all(is_seed(d).all() and len(d) == 5 for d in draws.values())
    else:  # 50 of 80 visible rows are seed rows: about 5/8 of the draws
        share = np.mean([is_seed(buf.draw(s, 10, current_task=0)).mean() for s in range(6, 400)])
        assert abs(share - 50 / 80) < 0.03


def test_bounded_policies_treat_seed_rows_like_any_row(tmp_path):
    def seed_left(policy, steps):
        buf = seeded(tmp_path / policy, n=(40,), policy=policy, capacity=40)
        train(buf, range(steps))
        return buf.stats()["seed_rows"]

    assert seed_left("fifo", 6) == 40 - 36 and seed_left("fifo", 7) == 0  # oldest go first
    assert 0 < seed_left("reservoir", 10) < 40  # a uniform sample of all rows seen
    # task_balanced: the seed is a "task" of its own, with its share of the capacity
    assert seed_left("task_balanced", 5) == 20 and seed_left("task_balanced", 15) == 40 // 3 + 1


@pytest.mark.parametrize("policy", list(CAPS))
@pytest.mark.parametrize("reference", [False, True])
def test_seeded_buffer_resumes_exactly_after_a_kill(tmp_path, policy, reference):
    kw = {"policy": policy, "reference": reference, **CAPS[policy]}
    full, state = train(seeded(tmp_path / "a", **kw), range(40), checkpoint_at=19)
    assert state["seed"]["origins"][1] == {"origin": 1, "name": "self", "offered": 20,
                                           "first": 30, "end": 47 if policy == "reservoir" else 50}
    killed = seeded(tmp_path / "b", **kw)
    _, state_b = train(killed, range(27), checkpoint_at=19, prefetch=True)
    assert json.dumps(state_b["seed"]) == json.dumps(state["seed"])
    killed.commit()
    resumed = make(tmp_path / "b", **kw)
    resumed.load_state_dict(state_b)
    again, _ = train(resumed, range(20, 40), prefetch=True)
    assert same(again, {s: full[s] for s in range(20, 40)})
    assert resumed.stats()["rows_drawn_seed"] == sum(int(is_seed(d).sum()) for d in full.values())
    with pytest.raises(RuntimeError, match="fresh start"):
        resumed.add_seed(seed_rows(3), origin=5)


def test_seed_rows_come_back_bit_identical_and_a_damaged_seed_store_is_refused(tmp_path):
    _, state = train(seeded(tmp_path / "a", reference=True), range(3), checkpoint_at=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    buf = make(tmp_path / "b", reference=True)
    buf.load_state_dict(state)
    got = buf.draw(0, 50, current_task=0)
    want = np.concatenate([seed_rows(30, 0), seed_rows(20, 1)])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    data = tmp_path / "b" / "rank_0" / "seed" / "chunk_000000.rows"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum"):
        make(tmp_path / "b", reference=True).load_state_dict(state)


def test_unseeded_buffer_keeps_its_state_files_and_stats(tmp_path):
    buf = make(tmp_path / "a", reference=True)
    _, state = train(buf, range(10), checkpoint_at=9)
    assert "seed" not in state and "seed" not in buf.stats()
    assert "seed" not in buf.stats()["last_draw"]
    assert sorted(p.name for p in (tmp_path / "a" / "rank_0").iterdir()) == [
        "chunk_000000.meta", "chunk_000000.rows", "manifest.json"]
    # a fresh start over a seeded attempt's directory drops its seed store
    train(seeded(tmp_path / "b", reference=True), range(3))
    fresh_start = make(tmp_path / "b", reference=True)
    train(fresh_start, range(3))
    assert not (tmp_path / "b" / "rank_0" / "seed").exists()
    assert "seed" not in fresh_start.state_dict()


def test_seed_is_refused_once_training_started(tmp_path):
    buf = make(tmp_path / "a")
    buf.add_seed(seed_rows(3), origin=0)
    with pytest.raises(ValueError, match="already"):
        buf.add_seed(seed_rows(3), origin=0)
    buf.add(fresh(0)[0], task_id=0, step=0)
    with pytest.raises(RuntimeError, match="before the first add"):
        buf.add_seed(seed_rows(3), origin=1)
    other = make(tmp_path / "b")
    other.start_prefetch((s, 2, task_of(s)) for s in range(3))
    with pytest.raises(RuntimeError):
        other.add_seed(seed_rows(3), origin=0)
    other.close()


# ---- task ids and the checkpoint entry, directly --------------------------------------------
def test_seed_task_ids_are_negative_below_minus_one_and_map_back_to_their_origin():
    assert [seed_task_id(k) for k in (0, 1, 5)] == [-2, -3, -7]
    for origin in (0, 1, 17, MAX_SEED_ORIGIN):
        assert seed_origin(seed_task_id(origin)) == origin
    assert np.int32(seed_task_id(MAX_SEED_ORIGIN)) == seed_task_id(MAX_SEED_ORIGIN)
    for task in (-1, 0, 3):  # -1: rows of reclaimed chunks; 0, 3: trained tasks
        assert seed_origin(task) is None
    for origin in (-1, MAX_SEED_ORIGIN + 1):
        with pytest.raises(ValueError, match="seed origin"):
            seed_task_id(origin)


def _entry(**changes):
    origins = [{"origin": 0, "name": "task:a", "offered": 30, "first": 0, "end": 30},
               {"origin": 1, "name": "self", "offered": 20, "first": 30, "end": 47}]
    seed = {"origins": origins, "store": None, "drawn": [4, 2]} | changes
    return {"store": {"rows": 60}, "seed": seed}


def test_saved_seeds_reads_a_checkpoints_entry_and_refuses_a_malformed_one():
    assert saved_seeds({"store": {"rows": 5}}, storage="copy") == ([], [])
    origins, drawn = saved_seeds(_entry(), storage="copy")
    assert [o["end"] for o in origins] == [30, 47] and drawn == [4, 2]
    no_counts = _entry()
    del no_counts["seed"]["drawn"]  # written before the counts were saved
    assert saved_seeds(no_counts, storage="copy")[1] == [0, 0]
    ref = _entry(store={"rows": 47, "data_crc": 0, "meta_crc": 0})
    assert saved_seeds(ref, storage="reference")[0] == origins
    first, second = _entry()["seed"]["origins"]
    bad = [
        _entry(origins=[]),
        _entry(origins=[first, second | {"first": 31}]),  # a gap between origins
        _entry(origins=[first | {"first": 1}, second]),  # not from row 0
        _entry(origins=[first, second | {"origin": 0}]),  # an origin twice
        _entry(origins=[first, second | {"end": 61}]),  # beyond the stored rows
        _entry(drawn=[4]),
        _entry(drawn=[4, -1]),
        _entry(origins=[first | {"end": "x"}, second]),
        ref,  # a seed store in copy mode
    ]
    for state in bad:
        with pytest.raises(CheckpointError, match="seed entry is malformed"):
            saved_seeds(state, storage="copy")
    with pytest.raises(CheckpointError, match="seed entry is malformed"):
        saved_seeds(_entry(), storage="reference")  # reference mode without its seed store
