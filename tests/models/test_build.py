"""`prepare` with a Hugging Face model directory as tokenizer.path: the model's own EOS/BOS
frame the documents, the ids are recorded, and `model_tokenizer_sha256` matches the shards.
Also evaluation-only tasks (val inputs alone)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cptrain.config_base import build_config
from cptrain.data.prepare import (
    PrepareConfig,
    load_prepared,
    load_prepared_tokenizer,
    open_split,
    prepare,
)
from cptrain.data.shards import ShardSet, ShardWriter
from cptrain.data.tokenizer import (
    Separators,
    document_separators,
    is_model_dir,
    load_tokenizer,
    model_separators,
    model_tokenizer_sha256,
    tokenizer_sha256,
)
from cptrain.errors import DataError

DOCS = [f"Document {i}: the fox number {i} runs across the field {i % 7}." for i in range(40)]
VAL = ["A held-out line about a fox.", "Another held-out line, with <s> and </s> as text."]
BOS, EOS, PAD = "<s>", "</s>", "<pad>"  # ids 0, 1, 2


def make_model_dir(
    path: Path,
    *,
    bos: str | None = "post",  # "post": post-processor adds BOS; "flag": add_bos_token only
    config_eos: Any = 1,
    tokenizer_eos: str | None = EOS,
    bos_token: str | None = BOS,
) -> Path:
    """A tiny tokenizer-bearing model directory, as save_pretrained of a Llama-like model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(DOCS * 3, trainer=trainer)
    if bos == "post":
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos_token,
                                  eos_token=tokenizer_eos, pad_token=PAD)
    tok.save_pretrained(str(path))
    if bos == "flag":
        file = path / "tokenizer_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "add_bos_token": True}))
    LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, bos_token_id=0,
                eos_token_id=config_eos).save_pretrained(str(path))
    (path / "model.safetensors").write_bytes(b"weights")  # stands in for the weights
    return path


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def config(tmp_path: Path, tokenizer: dict[str, Any], **changes: Any) -> PrepareConfig:
    data: dict[str, Any] = {
        "out_dir": str(tmp_path / "out"),
        "tokenizer": tokenizer,
        "shard_tokens": 100,
        "batch_size": 5,
        "tasks": [{"name": "en", "train": [str(write_jsonl(tmp_path / "train.jsonl", DOCS))],
                   "val": [str(write_jsonl(tmp_path / "val.jsonl", VAL))]}],
    }
    data.update(changes)
    return build_config(PrepareConfig, data)


def documents(shards: ShardSet) -> list[list[int]]:
    ids = shards.read(0, shards.num_tokens)
    assert ids[-1] == shards.eos_id
    cuts = np.flatnonzero(ids == shards.eos_id)
    return [ids[a + 1 : b].tolist() for a, b in zip([-1, *cuts[:-1].tolist()], cuts.tolist(),
                                                     strict=True)]


@pytest.mark.parametrize("bos", ["post", "flag"])
def test_model_dir_frames_documents_with_its_bos_and_eos(tmp_path: Path, bos: str) -> None:
    model = make_model_dir(tmp_path / "model", bos=bos)
    assert is_model_dir(model) and not is_model_dir(tmp_path / "nothing")
    out = prepare(config(tmp_path, {"path": str(model)}), progress=False)
    info = load_prepared(out)
    tok = load_tokenizer(model)
    assert info["tokenizer"] | {"sha256": None} == {
        "path": "tokenizer", "sha256": None, "vocab_size": len(tok), "eos_id": 1,
        "eos_token": EOS, "bos_id": 0, "bos_token": BOS, "separators": "model"}
    sha = model_tokenizer_sha256(model)
    assert sha == info["tokenizer"]["sha256"] == tokenizer_sha256(load_prepared_tokenizer(out))
    assert model_separators(model) == Separators(1, EOS, 0, BOS, "model")
    for split, texts in (("train", DOCS), ("val", VAL)):
        shards = open_split(out, "en", split)
        assert shards.tokenizer_sha256 == sha
        assert (shards.eos_id, shards.bos_id) == (1, 0)
        manifest = json.loads((out / "en" / split / "manifest.json").read_text())
        assert (manifest["eos_id"], manifest["bos_id"]) == (1, 0)
        docs = documents(shards)
        assert len(docs) == shards.num_documents == len(texts)
        assert all(d[0] == 0 and 0 not in d[1:] for d in docs)  # one BOS, in front
        # Special-token text inside a document stays text.
        assert [tok.decode(d[1:]) for d in docs] == texts


def test_model_without_bos_gets_eos_only(tmp_path: Path) -> None:
    # SmolLM-like: bos_token == eos_token, and nothing adds it.
    model = make_model_dir(tmp_path / "model", bos=None, bos_token=EOS)
    out = prepare(config(tmp_path, {"path": str(model)}), progress=False)
    info = load_prepared(out)["tokenizer"]
    assert (info["eos_id"], info["bos_id"], info["separators"]) == (1, None, "model")
    manifest = json.loads((out / "en" / "train" / "manifest.json").read_text())
    assert "bos_id" not in manifest and ShardSet(out / "en" / "train").bos_id is None
    assert all(1 not in d for d in documents(open_split(out, "en", "train")))


def test_model_config_eos_wins_over_a_different_tokenizer_eos(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listed = make_model_dir(tmp_path / "listed", config_eos=[2, 1])  # includes the tokenizer's
    assert document_separators(load_tokenizer(listed), listed).eos_id == 1
    other = make_model_dir(tmp_path / "other", config_eos=2)
    with caplog.at_level(logging.WARNING):
        seps = document_separators(load_tokenizer(other), other)
    assert (seps.eos_id, seps.eos_token) == (2, PAD)
    assert "eos_token_id 2" in caplog.text
    bad = make_model_dir(tmp_path / "bad", config_eos=999)
    with pytest.raises(DataError, match="eos_token_id 999"):
        document_separators(load_tokenizer(bad), bad)
    unnamed = make_model_dir(tmp_path / "unnamed", tokenizer_eos=None, config_eos=2)
    assert load_tokenizer(unnamed).eos_token == PAD  # config.json's, before known EOS names


def test_tokenizer_dirs_keep_the_plain_eos_separator(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    (model / "config.json").unlink()  # the same tokenizer, no longer a model directory
    out = prepare(config(tmp_path, {"path": str(model)}), progress=False)
    info = load_prepared(out)["tokenizer"]
    assert (info["eos_id"], info["bos_id"], info["separators"]) == (1, None, "tokenizer")
    assert all(0 not in d for d in documents(open_split(out, "en", "train")))
    trained = prepare(config(tmp_path, {"vocab_size": 300}, out_dir=str(tmp_path / "t")),
                      progress=False)
    assert load_prepared(trained)["tokenizer"]["separators"] == "tokenizer"
    assert "bos_id" not in json.loads((trained / "en/val/manifest.json").read_text())


def test_model_tokenizer_sha256_none_and_errors(tmp_path: Path) -> None:
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    (weights_only / "config.json").write_text("{}")
    assert model_tokenizer_sha256(weights_only) is None
    assert model_separators(weights_only) is None
    with pytest.raises(DataError, match="does not exist"):
        model_tokenizer_sha256(tmp_path / "missing")
    with pytest.raises(DataError, match="model directory .* has no tokenizer.json"):
        load_tokenizer(weights_only)
    broken = make_model_dir(tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer"):
        model_tokenizer_sha256(broken)


def test_model_dir_changes_that_matter_rebuild(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    cfg = config(tmp_path, {"path": str(model)})
    out = prepare(cfg, progress=False)
    stamp = (out / "prepare.json").stat().st_mtime_ns
    (model / "model.safetensors").write_bytes(b"new weights")  # not the tokenizer's business
    assert prepare(cfg, progress=False) == out
    assert (out / "prepare.json").stat().st_mtime_ns == stamp
    file = model / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "add_bos_token": False}))
    prepare(cfg, progress=False)  # an explicit "no BOS" overrides the post-processor
    assert (out / "prepare.json").stat().st_mtime_ns != stamp
    assert load_prepared(out)["tokenizer"]["bos_id"] is None


def test_shard_writer_bos_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bos_id 9"):
        ShardWriter(tmp_path / "s", 5, 1, "x", bos_id=9)
    with ShardWriter(tmp_path / "s", 5, 1, "x", bos_id=0) as w:
        w.append([3, 4])
    assert ShardSet(tmp_path / "s").read(0, 4).tolist() == [0, 3, 4, 1]
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"bos_id": 0', '"bos_id": 7'))
    with pytest.raises(DataError, match="bos_id"):
        ShardSet(tmp_path / "s")


# --- evaluation-only tasks ---

def test_evaluation_only_task_has_a_val_split_only(tmp_path: Path) -> None:
    held = write_jsonl(tmp_path / "wiki" / "val.jsonl", [f"Wiki zebra {i} quartz." for i in
                                                         range(5)])
    cfg = config(tmp_path, {"vocab_size": 300}, val_fraction=0.2,
                 tasks=[{"name": "en", "train": [str(write_jsonl(tmp_path / "t.jsonl", DOCS))]},
                        {"name": "en-wiki", "val": [str(held)]}])
    out = prepare(cfg, progress=False)
    info = load_prepared(out)
    assert set(info["tasks"]["en-wiki"]) == {"val"} and set(info["tasks"]["en"]) == {"train",
                                                                                      "val"}
    assert not (out / "en-wiki" / "train").exists()
    assert open_split(out, "en-wiki", "val").num_documents == 5
    with pytest.raises(DataError, match="evaluation-only"):
        open_split(out, "en-wiki", "train")
    # Its text did not train the tokenizer: "zebra"/"quartz" were never merged.
    vocab = load_prepared_tokenizer(out).get_vocab()
    assert not any("zeb" in t or "quar" in t for t in vocab)
    stamp = (out / "prepare.json").stat().st_mtime_ns
    prepare(cfg, progress=False)
    assert (out / "prepare.json").stat().st_mtime_ns == stamp  # up to date


