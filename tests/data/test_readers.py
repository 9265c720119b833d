"""Corpus readers: every supported format, directory walking, and one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cptrain.data import readers
from cptrain.data.readers import iter_documents, iter_documents_many
from cptrain.errors import DataError

DOCS = [
    "First document.\nWith two lines.",
    "Zweites Dokument: äöü ß",
    "日本語の文書 🎉",
    "  spaces  ",
]


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def save_hf(path: Path, data: dict) -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(data).save_to_disk(str(path))
    return path


def one_line_error(path: Path, text_key: str = "text") -> str:
    with pytest.raises(DataError) as info:
        list(iter_documents(path, text_key))
    message = str(info.value)
    assert "\n" not in message
    return message


# --- formats ---

def test_txt_file_is_one_document(tmp_path: Path) -> None:
    text = "Para one.\n\nPara two.\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert list(iter_documents(tmp_path / "a.txt")) == [text]


def test_txt_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode())
    assert list(iter_documents(tmp_path / "bom.txt")) == ["hello"]


def test_large_txt_is_cut_at_paragraphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "TXT_WHOLE_MAX_BYTES", 100)
    monkeypatch.setattr(readers, "TXT_PIECE_CHARS", 64)
    paragraphs = [f"paragraph {i} " + "x" * (i * 7 % 30) for i in range(40)]
    text = "\n\n".join(paragraphs) + "\n"
    (tmp_path / "big.txt").write_text(text)
    pieces = list(iter_documents(tmp_path / "big.txt"))
    assert "".join(pieces) == text
    assert len(pieces) > 1
    assert all(len(p) <= 64 for p in pieces)
    assert all(p.endswith("\n\n") for p in pieces[:-1])


def test_large_txt_without_blank_lines_cuts_at_newline_then_hard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "TXT_WHOLE_MAX_BYTES", 10)
    monkeypatch.setattr(readers, "TXT_PIECE_CHARS", 16)
    text = "line one\nline two\n" + "z" * 40
    (tmp_path / "lines.txt").write_text(text)
    pieces = list(iter_documents(tmp_path / "lines.txt"))
    assert "".join(pieces) == text
    assert pieces[0] == "line one\n"
    assert max(len(p) for p in pieces) == 16


def test_jsonl_and_custom_key(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", DOCS, key="content")
    assert list(iter_documents(tmp_path / "a.jsonl", text_key="content")) == DOCS


def test_jsonl_skips_blank_lines_and_empty_texts(tmp_path: Path) -> None:
    lines = ['{"text": "a"}', "", '{"text": ""}', "   ", '{"text": "b"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    assert list(iter_documents(tmp_path / "a.jsonl")) == ["a", "b"]


def test_jsonl_gz(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
    assert list(iter_documents(tmp_path / "a.jsonl.gz")) == DOCS


def test_parquet_over_several_row_groups(tmp_path: Path) -> None:
    docs = [f"row {i}" for i in range(2500)]
    table = pa.table({"id": list(range(2500)), "body": docs})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1000)
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 3
    assert list(iter_documents(tmp_path / "a.parquet", text_key="body")) == docs


def test_hf_dataset_dir(tmp_path: Path) -> None:
    save_hf(tmp_path / "ds", {"text": DOCS, "n": list(range(len(DOCS)))})
    assert list(iter_documents(tmp_path / "ds")) == DOCS


def test_hf_dataset_dict_uses_train_split(tmp_path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": DOCS[:2]}),
        "validation": datasets.Dataset.from_dict({"text": DOCS[2:]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(tmp_path / "dd")) == DOCS[:2]
    assert list(iter_documents(tmp_path / "dd" / "validation")) == DOCS[2:]


def test_hf_dataset_dict_without_train_names_splits(tmp_path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": DOCS})})
    dd.save_to_disk(str(tmp_path / "dd"))
    message = one_line_error(tmp_path / "dd")
    assert "'train'" in message and "test" in message


def test_directory_is_walked_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "2.txt").write_text("b/2")
    (tmp_path / "a" / "1.txt").write_text("a/1")
    write_jsonl(tmp_path / "a.jsonl", ["a.jsonl"])
    save_hf(tmp_path / "c_ds", {"text": ["c_ds"]})
    (tmp_path / "README.md").write_text("ignored: unsupported type")
    (tmp_path / ".hidden.txt").write_text("ignored: hidden")
    assert list(iter_documents(tmp_path)) == ["a/1", "a.jsonl", "b/2", "c_ds"]


def test_many_reads_in_order_and_checks_all_paths_first(tmp_path: Path) -> None:
    (tmp_path / "1.txt").write_text("one")
    write_jsonl(tmp_path / "2.jsonl", ["two", "three"])
    paths = [tmp_path / "1.txt", tmp_path / "2.jsonl"]
    assert list(iter_documents_many(paths)) == ["one", "two", "three"]
    stream = iter_documents_many([tmp_path / "1.txt", tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="missing.txt"):
        next(stream)


def test_jsonl_is_streamed(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    stream = iter_documents(tmp_path / "a.jsonl")
    assert [next(stream), next(stream)] == ["a", "b"]
    with pytest.raises(DataError, match="line 3"):
        next(stream)


# --- errors ---

def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(tmp_path / "nope.jsonl")


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    message = one_line_error(tmp_path / "a.json")
    assert "unsupported" in message and ".jsonl" in message


@pytest.mark.parametrize("name,content", [("e.txt", ""), ("e.jsonl", "\n\n"),
                                          ("e2.jsonl", '{"text": ""}\n')])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    assert "no documents" in one_line_error(tmp_path / name)


def test_empty_parquet_and_dataset(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert "no documents" in one_line_error(tmp_path / "e.parquet")
    save_hf(tmp_path / "ds", {"text": []})
    assert "no documents" in one_line_error(tmp_path / "ds")


def test_empty_directory_and_directory_without_supported_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no supported input" in one_line_error(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("text")
    assert "no supported input" in one_line_error(tmp_path / "other")


def test_bad_json_names_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n\n{"text": oops}\n')
    message = one_line_error(tmp_path / "a.jsonl")
    assert "a.jsonl: line 3 is not valid JSON" in message


def test_json_line_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('["text"]\n')
    assert "line 1 is a JSON list" in one_line_error(tmp_path / "a.jsonl")


def test_missing_text_key_lists_keys_present(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "x", "id": 1}\n')
    message = one_line_error(tmp_path / "a.jsonl")
    assert "line 2 has no key 'text'" in message and "'body', 'id'" in message


def test_text_value_not_a_string(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": 42}\n')
    assert "'text' is int, not a string" in one_line_error(tmp_path / "a.jsonl")


def test_parquet_missing_or_non_string_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "a.parquet")
    message = one_line_error(tmp_path / "a.parquet")
    assert "no column 'text'" in message and "'body', 'n'" in message
    assert "not string" in one_line_error(tmp_path / "a.parquet", text_key="n")


def test_parquet_null_text(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "a.parquet")
    assert "row 1" in one_line_error(tmp_path / "a.parquet")


def test_hf_dataset_missing_column(tmp_path: Path) -> None:
    save_hf(tmp_path / "ds", {"body": ["x"]})
    assert "no column 'text'" in one_line_error(tmp_path / "ds")


def test_not_utf8_and_corrupt_gzip(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    assert "not UTF-8" in one_line_error(tmp_path / "a.txt")
    (tmp_path / "a.jsonl.gz").write_bytes(b"this is not gzip")
    assert "not a valid gzip" in one_line_error(tmp_path / "a.jsonl.gz")
    good = gzip.compress(b'{"text": "a"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    assert "not a valid gzip" in one_line_error(tmp_path / "cut.jsonl.gz")


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"PAR1 garbage")
    assert "not a readable parquet" in one_line_error(tmp_path / "a.parquet")


def test_an_empty_input_directory_is_a_sentence_that_reads(tmp_path):
    import pytest

    from cptrain.data.readers import list_sources
    from cptrain.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        list_sources(tmp_path / "empty")
    msg = str(err.value)
    assert "holds no supported input; put .txt, .jsonl" in msg
    assert "directory files" not in msg
