"""`prepare`: config validation, outputs, no-op re-runs, rebuilds, and refusal of bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from cptrain.config_base import build_config
from cptrain.data.prepare import (
    PrepareConfig,
    load_prepared,
    load_prepared_tokenizer,
    open_split,
    prepare,
)
from cptrain.data.shards import ShardSet
from cptrain.data.tokenizer import EOS_TOKEN, load_tokenizer, tokenizer_sha256
from cptrain.errors import ConfigError, DataError

EN = [f"English document {i}: the fox number {i} runs across field {i % 7}." for i in range(60)]
EN_VAL = ["A held-out English line about a fox.", "Another held-out line."]
FR = [f"Document français {i} : le renard numéro {i} court dans le champ {i % 5}.\n\n"
      f"Deuxième paragraphe {i}." for i in range(80)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write_jsonl(root / "en" / "train.jsonl", EN)
    write_jsonl(root / "en" / "val.jsonl", EN_VAL)
    for i, doc in enumerate(FR):  # one .txt file per document, in a directory
        (root / "fr").mkdir(parents=True, exist_ok=True)
        (root / "fr" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    return root


def config(tmp_path: Path, corpus: Path, **changes: Any) -> PrepareConfig:
    data: dict[str, Any] = {
        "out_dir": str(tmp_path / "out"),
        "tokenizer": {"vocab_size": 300},
        "val_fraction": 0.2,
        "shard_tokens": 500,
        "batch_size": 7,
        "tasks": [
            {"name": "en", "train": [str(corpus / "en" / "train.jsonl")],
             "val": [str(corpus / "en" / "val.jsonl")]},
            {"name": "fr", "train": [str(corpus / "fr")]},
        ],
    }
    data.update(changes)
    return build_config(PrepareConfig, data)


def decoded_docs(out: Path, task: str, split: str) -> list[str]:
    tok = load_tokenizer(out / "tokenizer")
    shards = open_split(out, task, split)
    text = tok.decode(shards.read(0, shards.num_tokens).tolist())
    assert text.endswith(EOS_TOKEN)
    return text.split(EOS_TOKEN)[:-1]


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in out.rglob("*") if p.is_file()}


# --- building ---

def test_prepare_writes_tokenizer_shards_and_summary(tmp_path: Path, corpus: Path) -> None:
    out = prepare(config(tmp_path, corpus), progress=False)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["en", "fr", "prepare.json", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no temp dirs
    info = load_prepared(out)
    tok = load_prepared_tokenizer(out)
    assert info["tokenizer"]["sha256"] == tokenizer_sha256(tok)
    assert info["tokenizer"]["vocab_size"] == len(tok) <= 300
    for task in ("en", "fr"):
        for split in ("train", "val"):
            shards = open_split(out, task, split)
            assert shards.num_tokens == info["tasks"][task][split]["num_tokens"] > 0
            assert shards.num_documents == info["tasks"][task][split]["num_documents"]
            assert shards.vocab_size == len(tok) and shards.eos_id == tok.eos_token_id
    assert len(ShardSet(out / "en" / "train").files) > 1  # shard_tokens=500 splits files
    assert decoded_docs(out, "en", "train") == EN
    assert decoded_docs(out, "en", "val") == EN_VAL
    fr_train, fr_val = decoded_docs(out, "fr", "train"), decoded_docs(out, "fr", "val")
    assert sorted(fr_train + fr_val) == sorted(FR)  # whole documents, each in one split
    assert 0 < len(fr_val) < len(FR) // 2


def test_rerun_is_a_no_op(tmp_path: Path, corpus: Path) -> None:
    cfg = config(tmp_path, corpus)
    out = prepare(cfg, progress=False)
    before = snapshot(out)
    assert prepare(config(tmp_path, corpus), progress=False) == out
    assert snapshot(out) == before


def test_changed_input_rebuilds(tmp_path: Path, corpus: Path) -> None:
    cfg = config(tmp_path, corpus)
    out = prepare(cfg, progress=False)
    old = load_prepared(out)
    write_jsonl(corpus / "en" / "val.jsonl", [*EN_VAL, "A third held-out line."])
    prepare(cfg, progress=False)
    new = load_prepared(out)
    assert new["inputs_fingerprint"] != old["inputs_fingerprint"]
    assert new["tasks"]["en"]["val"]["num_documents"] == 3
    assert decoded_docs(out, "en", "val")[-1] == "A third held-out line."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_touched_input_and_changed_setting_rebuild(tmp_path: Path, corpus: Path) -> None:
    out = prepare(config(tmp_path, corpus), progress=False)
    first = snapshot(out)
    st = (corpus / "fr" / "000.txt").stat()
    os.utime(corpus / "fr" / "000.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    prepare(config(tmp_path, corpus), progress=False)
    second = snapshot(out)
    assert second["prepare.json"] != first["prepare.json"]
    prepare(config(tmp_path, corpus, shard_tokens=100_000), progress=False)
    assert len(ShardSet(out / "en" / "train").files) == 1


def test_literal_eos_text_is_not_a_document_boundary(tmp_path: Path, corpus: Path) -> None:
    docs = [*EN_VAL, f"this line mentions {EOS_TOKEN} as plain text"]
    write_jsonl(corpus / "en" / "val.jsonl", docs)
    out = prepare(config(tmp_path, corpus), progress=False)
    shards = open_split(out, "en", "val")
    tokens = shards.read(0, shards.num_tokens)
    assert int((tokens == shards.eos_id).sum()) == len(docs) == shards.num_documents


def test_given_tokenizer_is_used(tmp_path: Path, corpus: Path) -> None:
    first = prepare(config(tmp_path, corpus), progress=False)
    cfg = config(tmp_path, corpus, out_dir=str(tmp_path / "out2"),
                 tokenizer={"path": str(first / "tokenizer" / "tokenizer.json")})
    second = prepare(cfg, progress=False)
    sha = load_prepared(first)["tokenizer"]["sha256"]
    assert load_prepared(second)["tokenizer"]["sha256"] == sha
    assert decoded_docs(second, "en", "train") == EN


# --- mismatches and lookups ---

def test_tokenizer_mismatch_is_detected(tmp_path: Path, corpus: Path) -> None:
    a = prepare(config(tmp_path, corpus), progress=False)
    b = prepare(config(tmp_path, corpus, out_dir=str(tmp_path / "b"),
                       tokenizer={"vocab_size": 280}), progress=False)
    sha_a = load_prepared(a)["tokenizer"]["sha256"]
    sha_b = load_prepared(b)["tokenizer"]["sha256"]
    assert sha_a != sha_b
    shutil.rmtree(a / "en" / "train")
    shutil.copytree(b / "en" / "train", a / "en" / "train")
    with pytest.raises(DataError) as info:
        open_split(a, "en", "train")
    assert sha_a[:12] in str(info.value) and sha_b[:12] in str(info.value)
    shutil.rmtree(a / "tokenizer")
    shutil.copytree(b / "tokenizer", a / "tokenizer")
    with pytest.raises(DataError, match=sha_b[:12]):
        load_prepared_tokenizer(a)


def test_lookup_errors(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(DataError, match="run `cptrain prepare` first"):
        load_prepared(tmp_path / "nothing")
    out = prepare(config(tmp_path, corpus), progress=False)
    with pytest.raises(DataError, match="tasks: en, fr"):
        open_split(out, "de", "train")
    with pytest.raises(DataError, match="use one of train, val"):
        open_split(out, "en", "test")


# --- bad input: one line, nothing half-written ---

@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "does not exist"),
    ("notes.csv", "a,b\n", "unsupported file type"),
    ("empty.jsonl", "", "contains no documents"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": nope}\n', "line 2 is not valid JSON"),
])
def test_bad_input_leaves_old_output_intact(
    tmp_path: Path, corpus: Path, name: str, content: str | None, message: str
) -> None:
    out = prepare(config(tmp_path, corpus), progress=False)
    before = snapshot(out)
    if content is not None:
        (corpus / name).write_text(content)
    tasks = [{"name": "en", "train": [str(corpus / "en" / "train.jsonl"), str(corpus / name)]}]
    with pytest.raises(DataError, match=message) as info:
        prepare(config(tmp_path, corpus, tasks=tasks), progress=False)
    assert "\n" not in str(info.value)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_error_while_tokenizing_leaves_nothing(tmp_path: Path, corpus: Path) -> None:
    bad = write_jsonl(corpus / "late.jsonl", EN)
    with bad.open("a") as f:
        f.write("{broken\n")
    tasks = [{"name": "en", "train": [str(corpus / "en" / "train.jsonl")], "val": [str(bad)]}]
    with pytest.raises(DataError, match="late.jsonl: line 61"):
        prepare(config(tmp_path, corpus, tasks=tasks), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("trained", [True, False])
def test_one_document_cannot_fill_both_splits(tmp_path: Path, corpus: Path, trained: bool) -> None:
    write_jsonl(corpus / "one.jsonl", ["a single document"])
    tasks = [{"name": "x", "train": [str(corpus / "one.jsonl")]}]
    tokenizer = {"vocab_size": 300}
    if not trained:
        tokenizer = {"path": str(prepare(config(tmp_path, corpus), progress=False) / "tokenizer")}
    with pytest.raises(DataError, match="task x: val_fraction 0.2 leaves no document for"):
        prepare(config(tmp_path, corpus, tasks=tasks, out_dir=str(tmp_path / "x"),
                       tokenizer=tokenizer), progress=False)
    assert not (tmp_path / "x").exists()


def test_leftovers_of_killed_runs_are_removed(tmp_path: Path, corpus: Path) -> None:
    dead_pid = 2**22 + 1  # above the largest pid Linux hands out
    stale = tmp_path / f".out.tmp-{dead_pid}-abcd1234"
    (stale / "en").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    prepare(config(tmp_path, corpus), progress=False)
    assert not stale.exists()
    assert live.exists()  # may belong to a run still in progress


def test_unwritable_out_dir(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "file").write_text("a file where a directory should go")
    with pytest.raises(ConfigError, match="is not writable"):
        prepare(config(tmp_path, corpus, out_dir=str(tmp_path / "file" / "out")), progress=False)


def test_foreign_out_dir_is_not_replaced(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a `cptrain prepare` output"):
        prepare(config(tmp_path, corpus, out_dir=str(tmp_path / "mine")), progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_inputs_inside_out_dir_are_refused(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(ConfigError, match="lies inside out_dir"):
        prepare(config(tmp_path, corpus, out_dir=str(corpus)), progress=False)


def test_a_holdout_that_keeps_no_document_fails_before_any_tokenizing(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """99 short documents at val_fraction 0.01 hold out none (as a README-style config once
    did): known from the documents alone, so no tokenizer is trained first."""
    from cptrain.data import prepare as prep

    docs = [f"document number {i} with a few words" for i in range(99)]
    assert not any(prep._is_val(d, 0.01) for d in docs)  # the case under test
    write_jsonl(corpus / "few.jsonl", docs)

    def no_tokenizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the tokenizer was trained before the check")

    monkeypatch.setattr(prep, "_make_tokenizer", no_tokenizing)
    tasks = [{"name": "few", "train": [str(corpus / "few.jsonl")]}]
    with pytest.raises(DataError, match="task few: val_fraction 0.01 holds out none of its 99 "
                       r"documents; .* set val_fraction to at least (0\.\d+)") as err:
        prepare(config(tmp_path, corpus, tasks=tasks, val_fraction=0.01,
                       out_dir=str(tmp_path / "few")), progress=False)
    monkeypatch.undo()
    suggested = float(str(err.value).rsplit(" ", 1)[-1])
    out = prepare(config(tmp_path, corpus, tasks=tasks, val_fraction=suggested,
                         out_dir=str(tmp_path / "few")), progress=False)
    assert load_prepared(out)["tasks"]["few"]["val"]["num_documents"] == 1



def test_a_task_can_name_its_own_text_key(tmp_path: Path, corpus: Path) -> None:
    """Sources with different field names in one prepare config: the task's key wins."""
    other = corpus / "content.jsonl"
    other.write_text("".join(json.dumps({"content": d}) + "\n" for d in FR), encoding="utf-8")
    tasks = [{"name": "en", "train": [str(corpus / "en" / "train.jsonl")]},
             {"name": "fr", "train": [str(other)], "text_key": "content"}]
    with pytest.raises(DataError, match="no key 'text'"):
        prepare(config(tmp_path, corpus, tasks=[tasks[0], {**tasks[1], "text_key": None}]),
                progress=False)
    out = prepare(config(tmp_path, corpus, tasks=tasks), progress=False)
    fr = load_prepared(out)["tasks"]["fr"]
    assert fr["train"]["num_documents"] + fr["val"]["num_documents"] == len(FR)
