"""replay.seed: stand-in rows put in the buffer before the first task (config, the buffer's
seed(), proxy windows of a task, text sampled from the starting model)."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cptrain.config_base import build_config
from cptrain.errors import ConfigError
from cptrain.replay import seeding
from cptrain.replay.buffer import SEED_STEP, seed_task_id
from cptrain.replay.config import ReplayConfig, check_seed_tasks
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


# ---- config ---------------------------------------------------------------------------------
def _error(seed) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(ReplayConfig, {"seed": seed}, "replay")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_seed_config_one_source_or_a_list_and_self_defaults():
    one = build_config(ReplayConfig, {"seed": {"source": "task", "task": "a", "tokens": 9}}, "r")
    assert [s.label for s in one.seed] == ["task:a"]
    two = build_config(ReplayConfig, {"seed": [
        {"source": "self", "tokens": 5},
        {"source": "self", "tokens": 5, "prompt": {"task": "b"}, "top_p": 1.0}]}, "r")
    s0, s1 = two.seed
    assert (s0.temperature, s0.top_p, s0.batch_size, s0.prompt) == (1.0, 0.95, 16, None)
    assert (s1.prompt.task, s1.prompt.prefix_tokens) == ("b", 8)
    dumped = two.model_dump(mode="json")
    assert dumped["seed"][0]["prompt"] == "bos" and "task" not in dumped["seed"][0]
    assert ReplayConfig.model_validate(dumped) == two
    # no seed: the dump is the one from before replay.seed existed (old checkpoints compare)
    assert "seed" not in build_config(ReplayConfig, {"seed": []}, "r").model_dump(mode="json")


@pytest.mark.parametrize("seed, words", [
    ({"source": "task", "task": "a", "tokens": 0}, ["tokens", "> 0", "remove this seed"]),
    ({"source": "web", "tokens": 5}, ["source", "task", "self"]),
    ({"source": "self", "tokens": 5, "temperature": 0}, ["temperature", "> 0"]),
    ({"source": "self", "tokens": 5, "top_p": 0}, ["top_p", "(0, 1]"]),
    ({"source": "self", "tokens": 5, "top_p": 1.5}, ["top_p", "(0, 1]"]),
    ({"source": "self", "tokens": 5, "prompt": "eos"}, ["prompt", "bos"]),
    ({"source": "self", "tokens": 5, "prompt": {"task": "a", "prefix_tokens": 0}},
     ["prefix_tokens"]),
    ({"source": "task", "tokens": 5}, ["task: NAME"]),
    ({"source": "task", "task": "a", "tokens": 5, "top_p": 0.5}, ["top_p", "self only"]),
    ({"source": "self", "tokens": 5, "task": "a"}, ["prompt: {task"]),
])
def test_seed_config_errors_are_one_line_and_name_the_fix(seed, words):
    msg = _error([seed])
    assert "seed.0" in msg and all(w in msg for w in words), msg


def test_seed_tasks_are_checked_against_the_prepared_ones():
    cfg = build_config(ReplayConfig, {"seed": [
        {"source": "task", "task": "a", "tokens": 5},
        {"source": "self", "tokens": 5, "prompt": {"task": "b"}}]}, "r")
    check_seed_tasks(cfg.seed, ["a", "b"])
    check_seed_tasks(None, [])
    with pytest.raises(ConfigError, match=r"seed.1.prompt.task: b is not prepared.*tasks: a\)"):
        check_seed_tasks(cfg.seed, ["a"])


# ---- the buffer -----------------------------------------------------------------------------
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


# ---- proxy windows and prompts -------------------------------------------------------------
def test_proxy_rows_are_a_seeded_sample_of_the_tasks_windows_split_over_ranks():
    windows = np.arange(500 * 9).reshape(500, 9)
    reads = []

    def rows(idx):
        reads.append(idx)
        return windows[idx]

    got = seeding.proxy_rows(rows, 500, tokens=1000, row_len=9, seed=3)
    assert got.shape == (125, 9) and got.dtype == np.int64  # ceil(1000 / 8) rows
    assert len(set(got[:, 0].tolist())) == 125
    assert all(np.all(np.diff(r) > 0) for r in reads)  # read in file order
    assert np.array_equal(got, seeding.proxy_rows(rows, 500, tokens=1000, row_len=9, seed=3))
    assert not np.array_equal(got, seeding.proxy_rows(rows, 500, tokens=1000, row_len=9,
                                                      seed=3, origin=1))
    parts = [seeding.proxy_rows(rows, 500, tokens=1000, row_len=9, seed=3, rank=r, world_size=3)
             for r in range(3)]
    assert np.array_equal(np.concatenate(parts), got)
    more = seeding.proxy_rows(rows, 50, tokens=1000, row_len=9, seed=3)  # 125 of 50 windows
    assert sorted(np.bincount(more[:, 0] // 9).tolist()) == [2] * 25 + [3] * 25


class Stream:
    def __init__(self, docs, eos):
        self.tokens = np.concatenate([np.append(d, eos) for d in docs]).astype(np.int64)
        self.num_tokens, self.eos_id = len(self.tokens), eos

    def read(self, start, n):
        return self.tokens[start:start + n]


def test_document_prefixes_start_documents_long_enough():
    docs = [np.arange(10, 10 + k) for k in (2, 6, 3, 9, 5)]
    got = seeding.document_prefixes(Stream(docs, eos=0), n=7, prefix_tokens=5, seed=1)
    assert got.shape == (7, 5)
    assert {tuple(r) for r in got.tolist()} == {(10, 11, 12, 13, 14)}
    got = seeding.document_prefixes(Stream([np.arange(1, 8), np.arange(20, 30)], eos=0), n=2,
                                    prefix_tokens=3, seed=1)
    assert sorted(got.tolist()) == [[1, 2, 3], [20, 21, 22]]
    with pytest.raises(Exception, match="prefix_tokens"):
        seeding.document_prefixes(Stream(docs, eos=0), n=2, prefix_tokens=20, seed=1)


# ---- sampling from the starting model ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only wait for each other (on a busy machine)
    yield model.train()
    torch.set_num_threads(threads)


def gen(model, work_dir, **kw):
    args = {"tokens": 16 * 10, "row_len": 17, "batch_size": 3, "temperature": 1.0,
            "top_p": 0.9, "seed": 5, "prompts": None, "bos_id": 1, "work_dir": work_dir,
            "progress": False, "vocab_size": 60, **kw}
    return seeding.generate_rows(model, **args)


def test_generated_rows_are_deterministic_and_within_the_vocabulary(tiny_model, tmp_path):
    rows = gen(tiny_model, tmp_path / "a")
    assert rows.shape == (10, 17) and rows.dtype == np.int64  # 4 batches: 3 + 3 + 3 + 1
    assert (rows[:, 0] == 1).all() and rows.max() < 60  # ids ≥ 60 of the model are masked
    assert len({tuple(r) for r in rows.tolist()}) == 10
    assert tiny_model.training  # handed back in the mode it came in
    assert np.array_equal(rows, gen(tiny_model, tmp_path / "b"))
    assert not np.array_equal(rows, gen(tiny_model, tmp_path / "c", seed=6))
    parts = [gen(tiny_model, tmp_path / f"r{r}", rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in parts] == [6, 3, 1] and np.array_equal(np.concatenate(parts), rows)
    prompts = np.array([[7, 8, 9], [10, 11, 12]])
    texts = []
    cued = gen(tiny_model, tmp_path / "d", prompts=prompts, bos_id=None,
               decode=lambda ids: texts.append(ids) or " ".join(map(str, ids)),
               sample_path=tmp_path / "sample.txt")
    assert np.array_equal(cued[:, :3], prompts[np.arange(10) % 2])
    sample = (tmp_path / "sample.txt").read_text()
    assert len(texts) == 8 and " ".join(map(str, cued[0])) in sample
    with pytest.raises(ConfigError, match="prefix_tokens"):
        gen(tiny_model, tmp_path / "e", prompts=np.zeros((1, 16), dtype=np.int64))


def test_generation_resumes_from_committed_batches_to_the_same_rows(tiny_model, tmp_path,
                                                                  monkeypatch):
    whole = gen(tiny_model, tmp_path / "a")
    real, calls, kill_at = seeding._generate_batch, [], [3]

    def killed_in_batch_3(*args, **kw):
        calls.append(1)
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt  # a kill while the third batch is being sampled
        return real(*args, **kw)

    monkeypatch.setattr(seeding, "_generate_batch", killed_in_batch_3)
    with pytest.raises(KeyboardInterrupt):
        gen(tiny_model, tmp_path / "b")
    kill_at[0] = 0
    assert sorted(p.name for p in (tmp_path / "b").glob("batch_*")) == [
        "batch_000000.npz", "batch_000001.npz"]
    calls.clear()
    assert np.array_equal(gen(tiny_model, tmp_path / "b"), whole)
    assert len(calls) == 2  # batches 2 and 3 only
    calls.clear()
    assert np.array_equal(gen(tiny_model, tmp_path / "b"), whole) and not calls
    (tmp_path / "b" / "batch_000001.npz").write_bytes(b"damaged")  # not trusted: made again
    assert np.array_equal(gen(tiny_model, tmp_path / "b"), whole) and len(calls) == 1
    calls.clear()
    other = gen(tiny_model, tmp_path / "b", temperature=0.7)  # other settings: start over
    assert len(calls) == 4 and not np.array_equal(other, whole)


def test_generated_rows_seed_a_reference_buffer(tiny_model, tmp_path):
    rows = gen(tiny_model, tmp_path / "work")
    buf = make(tmp_path / "buf", reference=True)
    buf.add_seed(rows, origin=0, name="self")
    got = buf.draw(0, 100, current_task=0)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, rows.tolist()))


def test_nucleus_sampling_draws_only_the_nucleus_in_proportion():
    import torch

    from cptrain.replay.seeding import NUCLEUS_K, _sample_next

    probs = torch.tensor([0.05, 0.4, 0.0, 0.3, 0.1, 0.15, 0.0, 0.0])  # ids 6, 7: outside vocab
    logits = probs.clamp_min(1e-12).log().expand(40_000, -1).clone()
    logits[:, 6:] = 5.0  # would dominate if the vocabulary mask were missing
    g = torch.Generator().manual_seed(0)
    got = _sample_next(logits, temperature=1.0, top_p=0.8, vocab_size=6, generator=g)
    counts = torch.bincount(got, minlength=8).double() / len(got)
    # Sorted 0.4, 0.3, 0.15 (cumulative 0.85 ≥ 0.8): ids 1, 3, 5 renormalised; nothing else.
    want = torch.zeros(8, dtype=torch.float64)
    want[[1, 3, 5]] = torch.tensor([0.4, 0.3, 0.15], dtype=torch.float64) / 0.85
    assert torch.allclose(counts, want, atol=0.01)
    assert counts[[0, 2, 4, 6, 7]].sum() == 0
    # A flat distribution whose nucleus is larger than the first top-k still samples all of it.
    flat = torch.zeros(3000, 2 * NUCLEUS_K)
    ids = _sample_next(flat, temperature=1.0, top_p=0.99, vocab_size=2 * NUCLEUS_K, generator=g)
    assert ids.max() > 1.5 * NUCLEUS_K and len(ids.unique()) > NUCLEUS_K
