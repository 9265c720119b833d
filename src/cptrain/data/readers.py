"""Stream text documents from corpus files without loading a whole corpus into memory.

Supported inputs (by name, case-insensitive):

* ``.txt``: one file is one document. Files up to ``TXT_WHOLE_MAX_BYTES`` (64 MB) are yielded
  whole; larger files are cut at paragraph boundaries (blank lines) into documents of about
  ``TXT_PIECE_CHARS`` (8 M characters), so memory stays bounded. A piece keeps its trailing
  separator, so joining the pieces gives back the file (line endings read as ``\n``). Without
  a blank line in a window the cut falls on its last newline, without any newline at its end.
* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the text under ``text_key``; blank lines
  are skipped.
* ``.parquet``: the string column ``text_key``, read one record batch at a time.
* A Hugging Face ``datasets`` directory written by ``save_to_disk`` (it holds ``state.json`` /
  ``dataset_info.json``). A ``DatasetDict`` directory (``dataset_dict.json``) is read through its
  ``train`` split; for another split, pass the split's sub-directory (``DIR/validation``).
* Any other directory: every supported file (and dataset directory) below it, recursively, in
  sorted path order; other files and hidden entries are ignored.

Empty strings are skipped (they carry no tokens). A source that yields no document at all is an
error, as is every malformed record: each raises a one-line ``DataError`` naming file and fix.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cptrain.errors import DataError

TXT_WHOLE_MAX_BYTES = 64 * 2**20
TXT_PIECE_CHARS = 8 * 2**20
FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
HF_DATASET_MARKERS = ("state.json", "dataset_info.json")
HF_DATASET_DICT_MARKER = "dataset_dict.json"
_BATCH_ROWS = 1024
_SUPPORTED_TEXT = ".txt, .jsonl, .jsonl.gz, .parquet or a Hugging Face dataset directory"


def iter_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one file or directory (see the module docstring)."""
    for source in list_sources(path):
        yield from _iter_source(source, text_key)


def iter_documents_many(paths: Iterable[Path], text_key: str = "text") -> Iterator[str]:
    """Yield the documents of several inputs in order; every path is checked before reading."""
    sources = [source for path in paths for source in list_sources(path)]
    for source in sources:
        yield from _iter_source(source, text_key)


def list_sources(path: Path) -> list[Path]:
    """The files and dataset directories that ``path`` stands for, in reading order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist; fix the path in the config")
    if path.is_dir():
        if is_hf_dataset_dir(path):
            return [path]
        sources = _walk_dir(path)
        if not sources:
            raise DataError(
                f"directory {path} holds no supported input; put .txt, .jsonl, .jsonl.gz or "
                ".parquet files (or Hugging Face dataset directories) in it"
            )
        return sources
    if _suffix_kind(path) is None:
        raise DataError(
            f"input {path} has an unsupported file type; use {_SUPPORTED_TEXT}"
        )
    return [path]


def source_files(source: Path) -> list[Path]:
    """The files whose content a source's documents come from (for change detection)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source]


def is_hf_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is a ``datasets`` ``save_to_disk`` directory (Dataset or DatasetDict)."""
    markers = (*HF_DATASET_MARKERS, HF_DATASET_DICT_MARKER)
    return path.is_dir() and any((path / name).is_file() for name in markers)


def _walk_dir(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        # A dataset directory is one source; its .arrow files must not be walked into.
        for name in [d for d in dirnames if is_hf_dataset_dir(here / d)]:
            found.append(here / name)
            dirnames.remove(name)
        found.extend(
            here / f for f in filenames if not f.startswith(".") and _suffix_kind(Path(f))
        )
    # Sorting by path components lists a directory's contents right after its name.
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _iter_source(source: Path, text_key: str) -> Iterator[str]:
    if source.is_dir():
        reader = _read_hf_dataset(source, text_key)
    else:
        kind = _suffix_kind(source)
        if kind == ".txt":
            reader = _read_txt(source)
        elif kind == ".parquet":
            reader = _read_parquet(source, text_key)
        else:
            reader = _read_jsonl(source, text_key)
    count = 0
    for text in reader:
        if text:
            count += 1
            yield text
    if count == 0:
        raise DataError(f"input {source} contains no documents; add text to it or remove it")


def _read_txt(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            if os.path.getsize(path) <= TXT_WHOLE_MAX_BYTES:
                yield f.read()
            else:
                yield from _split_paragraphs(f)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start} of a block); "
            "convert it, e.g. with iconv -t UTF-8"
        ) from None


def _split_paragraphs(f: Any) -> Iterator[str]:
    buf = ""
    while True:
        block = f.read(TXT_PIECE_CHARS)
        buf += block
        while len(buf) >= TXT_PIECE_CHARS or (not block and buf):
            if not block:
                yield buf
                buf = ""
                break
            cut = _paragraph_cut(buf, TXT_PIECE_CHARS)
            yield buf[:cut]
            buf = buf[cut:]
        if not block:
            return


def _paragraph_cut(buf: str, limit: int) -> int:
    """Where to end a piece: after the last blank line (else newline) within ``limit`` chars."""
    window = buf[:limit]
    for sep in ("\n\n", "\n"):
        pos = window.rfind(sep)
        if pos > 0:
            return pos + len(sep)
    return limit


def _read_jsonl(path: Path, text_key: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):  # noqa: B007 - read after the loop
                if line.strip():
                    yield _json_text(path, lineno, line, text_key)
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: line {lineno + 1} is not UTF-8; convert the file to UTF-8"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path} is not a valid gzip file ({exc or 'truncated'}); re-create or re-download it"
        ) from None


def _json_text(path: Path, lineno: int, line: str, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
            "fix or remove that line"
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object; "
            f'write one object per line, e.g. {{"{text_key}": "..."}}'
        )
    if text_key not in record:
        keys = ", ".join(map(repr, record)) or "none"
        raise DataError(
            f"{path}: line {lineno} has no key {text_key!r} (keys present: {keys}); "
            "set text_key to the key that holds the text"
        )
    return _check_text(record[text_key], f"{path}: line {lineno}", text_key)


def _check_text(value: Any, where: str, text_key: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {text_key!r} is {type(value).__name__}, not a string; "
            "store the text as a string or set text_key to the text field"
        )
    return value


def _read_parquet(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({_first_line(exc)}); "
                        "re-create it") from None
    _check_column(path, pf.schema_arrow, text_key)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text_key]):
            for value in batch.column(0).to_pylist():
                yield _check_text(value, f"{path}: row {row}", text_key)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read row group after row {row} "
                        f"({_first_line(exc)}); re-create the file") from None


def _check_column(where: Path, schema: Any, text_key: str) -> None:
    import pyarrow as pa

    if text_key not in schema.names:
        cols = ", ".join(map(repr, schema.names)) or "none"
        raise DataError(
            f"{where} has no column {text_key!r} (columns: {cols}); "
            "set text_key to the column that holds the text"
        )
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise DataError(
            f"{where}: column {text_key!r} has type {kind}, not string; "
            "set text_key to the text column"
        )


def _read_hf_dataset(path: Path, text_key: str) -> Iterator[str]:
    import datasets

    if _saved_without_data(path):
        # datasets cannot reload an empty Dataset it saved itself (IndexError).
        raise DataError(f"input {path} contains no documents; add text to it or remove it")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged directory
        raise DataError(f"{path}: cannot load the Hugging Face dataset ({_first_line(exc)}); "
                        "re-create it with save_to_disk") from None
    ds = _pick_split(path, loaded)
    _check_column(path, ds.data.schema, text_key)
    row = 0
    for batch in ds.select_columns([text_key]).iter(batch_size=_BATCH_ROWS):
        for value in batch[text_key]:
            yield _check_text(value, f"{path}: row {row}", text_key)
            row += 1


def _saved_without_data(path: Path) -> bool:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _pick_split(path: Path, loaded: Any) -> Any:
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    splits = ", ".join(loaded) or "none"
    raise DataError(
        f"{path} is a DatasetDict without a 'train' split (splits: {splits}); "
        f"pass one split's directory instead, e.g. {path / next(iter(loaded), 'SPLIT')}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
