"""The prepared data a run trains and evaluates on (cptrain.train.data.TrainingData), opened
on the suite's small prepared dataset; nothing here builds or trains a model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import flip

from cptrain.data.prepare import load_prepared, load_prepared_tokenizer, open_split
from cptrain.errors import ConfigError, DataError
from cptrain.evaluation import metrics
from cptrain.train.batches import TaskStream
from cptrain.train.data import TrainingData

PREPARED = "asyncio, email, xml"  # the fixture's tasks, as prepare.json lists them


def test_the_configured_tasks_in_training_order(make_config, prepared_dir):
    data = TrainingData(make_config(data={"tasks": ["xml", "email"], "eval_only": ["asyncio"]}))
    assert data.dir == prepared_dir and data.tokenizer_dir == prepared_dir / "tokenizer"
    assert data.task_names == ["xml", "email"] and data.eval_only == ["asyncio"]
    assert data.columns == ["xml", "email", "asyncio"]  # trained tasks, then eval-only ones
    assert data.window_len == 33
    assert list(data.train_sets) == ["xml", "email"]
    assert list(data.val_sets) == ["xml", "email", "asyncio"]
    assert [s.n for s in data.streams] == [data.train_sets[n].num_windows(33)
                                           for n in ("xml", "email")]
    want = TaskStream(open_split(prepared_dir, "email", "train"), 0, 0, 33, "email")
    assert np.array_equal(data.streams[1].indices(0, 50), want.indices(0, 50))
    assert data.train_tokens == [data.train_sets[n].num_tokens for n in ("xml", "email")]
    assert data.vocab_size == 512
    assert data.prepared == load_prepared(prepared_dir)


def test_unique_tokens_limit_a_streams_windows(make_config):
    tasks = [{"name": "email", "unique_tokens": 100}, "xml"]
    data = TrainingData(make_config(data={"tasks": tasks}))
    assert data.streams[0].n == math.ceil(100 / 32) == 4
    assert data.streams[1].n == data.train_sets["xml"].num_windows(33)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"tasks": ["email", "klingon", "vulcan"]}, "data.tasks: klingon, vulcan not in"),
        ({"tasks": ["email"], "eval_only": ["xml", "klingon"]}, "data.eval_only: klingon not in"),
        ({"tasks": ["vulcan"], "eval_only": ["klingon"]}, "data.tasks: vulcan not in"),
    ],
)
def test_tasks_that_were_not_prepared_are_a_config_error(make_config, prepared_dir, data, says):
    with pytest.raises(ConfigError) as err:
        TrainingData(make_config(data=data))
    assert str(err.value) == (
        f"{says} {prepared_dir} (prepared tasks: {PREPARED}); fix the task list or re-run "
        "`cptrain prepare`")


def test_a_config_mistake_is_reported_before_the_data_is_read(make_config, prepared_dir,
                                                              tmp_path):
    copy = Path(shutil.copytree(prepared_dir, tmp_path / "copy"))
    flip(copy / "email" / "train" / "shard_00000.bin")  # a token id stays in the vocabulary
    with pytest.raises(ConfigError, match="klingon not in"):
        TrainingData(make_config(data={"dir": str(copy), "tasks": ["email", "klingon"]}))
    with pytest.raises(DataError, match="email"):  # the full checksum finds the flipped byte
        TrainingData(make_config(data={"dir": str(copy), "tasks": ["email"]}))
    TrainingData(make_config(data={"dir": str(copy), "tasks": ["xml"]}))  # others still open


def test_a_missing_prepared_directory_is_a_data_error(make_config, tmp_path):
    with pytest.raises(DataError, match="has no prepare.json; run `cptrain prepare` first"):
        TrainingData(make_config(data={"dir": str(tmp_path / "nothing")}))


def test_union_loss_weighs_each_task_by_its_evaluated_windows(make_config):
    data = TrainingData(make_config())
    have = {n: data.val_sets[n].num_windows(33) for n in data.columns}
    assert len(set(have.values())) > 1  # the fixture's val splits differ in size
    losses = {"email": 4.0, "xml": 6.0, "asyncio": 5.0}
    # eval.windows above every split: each loss averages all of its split's windows
    many = data.union_loss(losses, windows=10**6)
    want = sum(losses[n] * have[n] for n in losses) / sum(have.values())
    assert many == pytest.approx(want)
    assert many == pytest.approx(metrics.union_loss(list(losses.values()),
                                                    [have[n] for n in losses]))
    # eval.windows within every split: the same count each, the plain mean
    few = min(have.values())
    assert data.union_loss(losses, windows=few) == pytest.approx(5.0)
    assert data.union_loss({"xml": 6.0}, windows=10**6) == pytest.approx(6.0)


def test_union_loss_of_a_thin_task_between_the_extremes(make_config):
    data = TrainingData(make_config(data={"tasks": ["email", "xml"]}))
    have = {n: data.val_sets[n].num_windows(33) for n in ("email", "xml")}
    thin, thick = sorted(have, key=have.get)
    w = have[thin] + 1  # the thin task evaluates all it has, the other w windows
    got = data.union_loss({thin: 2.0, thick: 8.0}, windows=w)
    assert got == pytest.approx((2.0 * have[thin] + 8.0 * w) / (have[thin] + w))


def test_check_token_ids_refuses_an_id_the_model_cannot_embed(make_config):
    data = TrainingData(make_config(data={"tasks": ["email", "xml"]}))
    rows = data.streams[1].rows(data.streams[1].indices(0, 4))
    top = int(rows.max())
    data.check_token_ids(rows, 1, vocab_size=top + 1)
    with pytest.raises(DataError) as err:
        data.check_token_ids(rows, 1, vocab_size=top)
    assert str(err.value) == (
        f"token id {top} in task xml is >= the model's vocabulary ({top}); the shards do not "
        "match the model's tokenizer")
    with pytest.raises(DataError, match="token id 512 in task email .* vocabulary \\(512\\)"):
        data.check_token_ids(np.array([[1, 2], [512, 0]]), 0, vocab_size=512)


def test_separators_and_tokenizer_are_those_prepare_recorded(make_config, prepared_dir):
    data = TrainingData(make_config())
    info = load_prepared(prepared_dir)["tokenizer"]
    shard = data.train_sets["email"]
    assert data.separators == (info["eos_id"], info["bos_id"]) == (shard.eos_id, shard.bos_id)
    assert data.tokenizer_sha256 == info["sha256"] == shard.tokenizer_sha256
    assert len(data.tokenizer_sha256) == 64


def test_identity_is_the_datas_wherever_it_lies(make_config, prepared_dir, tmp_path):
    data = TrainingData(make_config())
    ident = data.identity
    assert set(ident) == {"tokenizer_sha256", "data_sha256"}
    assert ident["tokenizer_sha256"] == data.tokenizer_sha256
    assert len(ident["data_sha256"]) == 64
    copy = shutil.copytree(prepared_dir, tmp_path / "elsewhere")
    assert TrainingData(make_config(data={"dir": str(copy)})).identity == ident
    fewer = TrainingData(make_config(data={"tasks": ["email", "xml"]})).identity
    assert fewer["data_sha256"] != ident["data_sha256"]
    assert fewer["tokenizer_sha256"] == ident["tokenizer_sha256"]
    # the order the run trains in is the config's business, not the data's
    swapped = TrainingData(make_config(data={"tasks": ["xml", "email", "asyncio"]})).identity
    assert swapped == ident
    evaluated = make_config(data={"tasks": ["email", "xml"], "eval_only": ["asyncio"]})
    assert TrainingData(evaluated).identity["data_sha256"] != ident["data_sha256"]


def test_a_model_with_the_datas_tokenizer_is_accepted(make_config, prepared_dir, tmp_path):
    data = TrainingData(make_config())
    model = Path(shutil.copytree(prepared_dir / "tokenizer", tmp_path / "model"))
    data.check_model_tokenizer(str(model))


def test_a_model_without_a_tokenizer_is_refused(make_config, tmp_path):
    data = TrainingData(make_config())
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json, so nothing shows that"):
        data.check_model_tokenizer(str(tmp_path / "weights-only"))
    with pytest.raises(DataError, match="does not exist"):
        data.check_model_tokenizer(str(tmp_path / "missing"))


def test_a_model_with_another_tokenizer_is_refused(make_config, prepared_dir, tmp_path):
    data = TrainingData(make_config())
    other = load_prepared_tokenizer(prepared_dir)
    other.add_tokens(["<another-token>"])
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(DataError) as err:
        data.check_model_tokenizer(str(tmp_path / "other"))
    msg = str(err.value)
    assert msg.startswith(f"{prepared_dir} was tokenized with tokenizer "
                          f"{data.tokenizer_sha256[:12]} but the model.init_from model")
    assert f"`tokenizer: {{path: {tmp_path / 'other'}}}`" in msg


def _gguf(path: Path, tokens: list[str] | None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if tokens is not None:
        w.add_token_list(tokens)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_model_is_compared_token_by_token(make_config, prepared_dir, tmp_path):
    data = TrainingData(make_config())
    tok = load_prepared_tokenizer(prepared_dir)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    data.check_model_tokenizer(str(_gguf(tmp_path / "same.gguf", vocab)))
    changed = [*vocab[:5], "zzz-not-a-token", *vocab[6:]]
    with pytest.raises(DataError, match=rf"another vocabulary .*\(1 of {len(vocab)} token ids "
                                        "differ\\)"):
        data.check_model_tokenizer(str(_gguf(tmp_path / "changed.gguf", changed)))
    with pytest.raises(DataError, match=rf"\(3 of {len(vocab) + 3} token ids differ\)"):
        data.check_model_tokenizer(str(_gguf(tmp_path / "longer.gguf", [*vocab, "a", "b", "c"])))
    with pytest.raises(DataError, match="carries no vocabulary"):
        data.check_model_tokenizer(str(_gguf(tmp_path / "bare.gguf", None)))
