"""replay.seed: stand-in rows put in the buffer before the first task (config, proxy windows
of a task, text sampled from the starting model). The seed rows in the buffer itself are
tested in test_seed_rows.py."""


import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cptrain.config_base import build_config
from cptrain.errors import ConfigError
from cptrain.replay import seeding
from cptrain.replay.config import ReplayConfig, check_seed_tasks
from replay.test_buffer import make


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
