"""Tokenizer training, atomic save, loading from file or directory, and fingerprints."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from cptrain.data.tokenizer import (
    EOS_TOKEN,
    load_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)
from cptrain.errors import ConfigError, DataError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Le renard brun rapide saute par-dessus le chien paresseux. " * 5,
    "Der schnelle braune Fuchs springt über den faulen Hund. " * 5,
    "def main():\n    return 42\n\n" * 5,
] * 10
SAMPLE = "Über den faulen dog — 日本語 🦊\n\tdef  x():  return 'é'\r\n"


def train(tmp_path: Path, name: str = "tok", vocab: int = 300, texts: list[str] | None = None):
    return train_tokenizer(texts or CORPUS, vocab, tmp_path / name)


def test_train_saves_a_working_tokenizer(tmp_path: Path) -> None:
    tok = train(tmp_path)
    assert 257 < len(tok) <= 300
    assert tok.eos_token == EOS_TOKEN
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS_TOKEN
    assert tok.pad_token == tok.bos_token == EOS_TOKEN
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp leftovers
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    assert len(ids) < len(SAMPLE.encode())  # merges were learned
    assert tok.decode(ids) == SAMPLE  # byte-level: lossless on any text


@pytest.mark.parametrize("via_file", [False, True])
def test_load_round_trip(tmp_path: Path, via_file: bool) -> None:
    tok = train(tmp_path)
    path = tmp_path / "tok" / "tokenizer.json" if via_file else tmp_path / "tok"
    loaded = load_tokenizer(path)
    assert loaded.eos_token == EOS_TOKEN and loaded.eos_token_id == tok.eos_token_id
    assert len(loaded) == len(tok)
    assert loaded.encode(SAMPLE, add_special_tokens=False) == tok.encode(
        SAMPLE, add_special_tokens=False
    )
    assert tokenizer_sha256(loaded) == tokenizer_sha256(tok)


def test_fingerprint_is_stable_and_discriminating(tmp_path: Path) -> None:
    a = train(tmp_path, "a")
    b = train(tmp_path, "b")
    c = train(tmp_path, "c", vocab=310)
    d = train(tmp_path, "d", texts=[t.upper() for t in CORPUS])
    sha = tokenizer_sha256(a)
    assert len(sha) == 64 and int(sha, 16) >= 0
    assert tokenizer_sha256(b) == sha  # training is deterministic
    assert tokenizer_sha256(c) != sha
    assert tokenizer_sha256(d) != sha
    assert tokenizer_sha256(a.backend_tokenizer) == sha
    a.backend_tokenizer.enable_truncation(max_length=8)
    a.backend_tokenizer.enable_padding(length=8)
    assert tokenizer_sha256(a) == sha  # runtime settings are not part of the identity


def test_training_is_capped_and_streams(tmp_path: Path) -> None:
    head = "alpha beta gamma " * 200  # 3400 bytes
    texts = itertools.chain([head], itertools.repeat("zebra quartz " * 100))  # endless
    tok = train_tokenizer(texts, 300, tmp_path / "tok", max_bytes=len(head))
    vocab = tok.get_vocab()
    assert any("alpha" in t or "gamma" in t for t in vocab)
    assert not any("zz" in t or "qu" in t or "ebr" in t for t in vocab)


def test_save_replaces_an_existing_directory_whole(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "stale.txt").write_text("old")
    train(tmp_path)
    assert not (tmp_path / "tok" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_vocab_too_small(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 257"):
        train_tokenizer(CORPUS, 100, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_no_training_text(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(iter([]), 300, tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="not a valid tokenizer") as info:
        load_tokenizer(tmp_path / "bad.json")
    assert "\n" not in str(info.value)


def test_tokenizer_without_eos_is_refused_with_a_fix(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "[X]": 2}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no EOS token") as info:
        load_tokenizer(tmp_path / "tokenizer.json")
    assert EOS_TOKEN in str(info.value)  # says how to add one
    with pytest.raises(DataError, match='set "eos_token" in'):
        load_tokenizer(tmp_path)


def test_bare_tokenizer_json_gets_its_eos_from_known_names(tmp_path: Path) -> None:
    train(tmp_path)
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_text(json.dumps(data))
    loaded = load_tokenizer(tmp_path / "bare" / "tokenizer.json")
    assert loaded.eos_token == EOS_TOKEN and loaded.eos_token_id == 0
