"""``cptrain prepare``: text corpora → tokenizer + per-task token shards, rebuilt only on change.

Output layout (``OUT`` = ``out_dir``)::

    OUT/tokenizer/            save_pretrained directory
    OUT/<task>/train/         token shards (see shards.py); absent for an evaluation-only task
    OUT/<task>/val/
    OUT/prepare.json          settings, tokenizer sha256 and separators, counts, inputs fingerprint

Documents end with the tokenizer's EOS. When ``tokenizer.path`` is a Hugging Face model
directory (config.json beside tokenizer.json), they are framed the model's way instead: its EOS
after, and its BOS before each document where the model uses one (see
``tokenizer.document_separators``); prepare.json and the shard manifests record the ids.
A task given only ``val`` inputs is evaluation-only: it gets a val split and no train split,
and its text is not used to train the tokenizer.

Everything is built in a hidden sibling directory that replaces ``OUT`` only once complete.
Relative input paths are resolved against the current directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cptrain import fsutil
from cptrain.data.prepare_config import (  # noqa: F401 - the config's home for importers
    SPLITS,
    TOKENIZER_DIR,
    PrepareConfig,
    TaskInputs,
    TokenizerSection,
)
from cptrain.data.readers import iter_documents_many, list_sources, source_files
from cptrain.data.shards import ShardSet, ShardWriter
from cptrain.data.tokenizer import (
    MODEL_CONFIG,
    MODEL_TOKENIZER_FILES,
    Separators,
    document_separators,
    is_model_dir,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)
from cptrain.errors import ConfigError, DataError, EnvironmentProblem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

FORMAT = "cptrain-prepared-v1"
PREPARE_JSON = "prepare.json"
# Bounds one encode batch's memory when documents are large (.txt pieces are ~8 MB).
_BATCH_MAX_CHARS = 64 * 2**20
logger = logging.getLogger(__name__)


def prepare(cfg: PrepareConfig, *, progress: bool = True) -> Path:
    """Build ``cfg.out_dir`` unless it is up to date with this config and these inputs."""
    out = Path(cfg.out_dir)
    plan = {t.name: {s: _sources(getattr(t, s)) for s in SPLITS} for t in cfg.tasks}
    _check_out_dir(out, cfg, plan)
    settings = _settings(cfg)
    fingerprint = _inputs_fingerprint(plan, cfg.tokenizer.path)
    if _up_to_date(out, settings, fingerprint):
        _say(f"cptrain prepare: {out} is up to date", progress)
        return out
    _remove_stale_temps(out)
    staging = _make_staging(out)
    try:
        info = _build(cfg, staging, settings, fingerprint, progress)
        fsutil.atomic_write_json(staging / PREPARE_JSON, info)
        fsutil.fsync_path(staging)
        fsutil.replace_dir(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if fsutil.disk_full_errno(exc) is not None:
            raise EnvironmentProblem(
                f"no space left on the disk of {out} while preparing; free space or choose "
                "another out_dir"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_prepared(out_dir: Path) -> dict[str, Any]:
    """The contents of ``OUT/prepare.json``."""
    file = Path(out_dir) / PREPARE_JSON
    if not file.is_file():
        raise DataError(f"{out_dir} has no {PREPARE_JSON}; run `cptrain prepare` first")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{file} is not valid JSON; re-run `cptrain prepare`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{file} is not a {FORMAT} file; re-run `cptrain prepare`")
    return info


def open_split(out_dir: Path, task: str, split: str) -> ShardSet:
    """Open one task's split, checking it was tokenized by the prepared tokenizer."""
    info = load_prepared(out_dir)
    if task not in info["tasks"]:
        known = ", ".join(info["tasks"])
        raise DataError(f"task {task!r} is not in {out_dir} (tasks: {known}); "
                        "fix the task name or add the task to the prepare config")
    if split not in SPLITS:
        raise DataError(f"split {split!r} does not exist; use one of {', '.join(SPLITS)}")
    if split not in info["tasks"][task]:
        raise DataError(f"task {task!r} is evaluation-only in {out_dir} (prepared from val "
                        f"inputs alone), so it has no {split} split; evaluate it only "
                        "(data.eval_only) or give it train inputs and re-run `cptrain prepare`")
    shards = ShardSet(Path(out_dir) / task / split, name=f"{task} {split}")
    expected = info["tokenizer"]["sha256"]
    if shards.tokenizer_sha256 != expected:
        raise DataError(
            f"{shards.path} was tokenized with tokenizer {shards.tokenizer_sha256[:12]}, but "
            f"{out_dir} uses tokenizer {expected[:12]}; re-run `cptrain prepare`"
        )
    return shards


def load_prepared_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a prepared directory, checked against the sha256 in prepare.json."""
    info = load_prepared(out_dir)
    tok = load_tokenizer(Path(out_dir) / TOKENIZER_DIR)
    found, expected = tokenizer_sha256(tok), info["tokenizer"]["sha256"]
    if found != expected:
        raise DataError(
            f"{Path(out_dir) / TOKENIZER_DIR} has sha256 {found[:12]}, but the shards were made "
            f"with {expected[:12]}; re-run `cptrain prepare`"
        )
    return tok


# --- planning and change detection ---

def _sources(paths: list[Path]) -> list[Path]:
    return [s.resolve() for p in paths for s in list_sources(p)]


def _check_out_dir(out: Path, cfg: PrepareConfig, plan: dict[str, dict[str, list[Path]]]) -> None:
    """Refuse out_dirs whose replacement would destroy anything that prepare did not write."""
    root = out.resolve()
    inputs = [s for splits in plan.values() for srcs in splits.values() for s in srcs]
    if cfg.tokenizer.path is not None:
        inputs.append(Path(cfg.tokenizer.path).resolve())
    for src in inputs:
        if src == root or root in src.parents:
            raise ConfigError(
                f"input {src} lies inside out_dir {out}, which prepare replaces; "
                "move the input or choose another out_dir"
            )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / PREPARE_JSON).is_file():
        raise ConfigError(
            f"out_dir {out} exists and is not a `cptrain prepare` output (no {PREPARE_JSON}); "
            "choose a new or empty directory"
        )


def _settings(cfg: PrepareConfig) -> dict[str, Any]:
    """The config with absolute paths and without out_dir (a moved output stays valid)."""
    data = cfg.model_dump(mode="json", exclude={"out_dir"})
    tok_path = cfg.tokenizer.path
    data["tokenizer"]["path"] = str(Path(tok_path).resolve()) if tok_path else None
    for task in data["tasks"]:
        for split in SPLITS:
            task[split] = [str(Path(p).resolve()) for p in task[split]]
        if task["text_key"] is None:
            del task["text_key"]  # outputs prepared before per-task keys stay up to date
    return data


def _inputs_fingerprint(plan: dict[str, dict[str, list[Path]]], tok_path: Path | None) -> str:
    """sha256 over every input file's path, size and mtime, in reading order.

    Of a model directory only the files that decide its tokenizer and separators count (new
    weights saved there change nothing prepared)."""
    h = hashlib.sha256()
    groups = [(f"{task}/{split}", [f for src in srcs for f in source_files(src)])
              for task, splits in plan.items() for split, srcs in splits.items()]
    if tok_path is not None:
        root = Path(tok_path).resolve()
        if is_model_dir(root):
            h.update(b"model-separators-v1\n")  # outputs from before model separators rebuild
            files = [root / n for n in MODEL_TOKENIZER_FILES if (root / n).is_file()]
        else:
            files = source_files(root)
        groups.append(("tokenizer", files))
    for label, files in groups:
        for file in files:
            st = file.stat()
            h.update(f"{label}\t{file}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(out: Path, settings: dict[str, Any], fingerprint: str) -> bool:
    try:
        info = load_prepared(out)
        if info.get("settings") != settings or info.get("inputs_fingerprint") != fingerprint:
            return False
        if not (out / TOKENIZER_DIR / "tokenizer.json").is_file():
            return False
        for task, splits in info["tasks"].items():
            for split in splits:
                ShardSet(out / task / split, name=f"{task} {split}")
    except (DataError, KeyError, TypeError):
        return False
    return True


def _remove_stale_temps(out: Path) -> None:
    """Delete build directories left by prepare runs that were killed (their pid is gone)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for path in out.parent.glob(pattern):
            pid = path.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else
    return True


def _make_staging(out: Path) -> Path:
    staging = fsutil.temp_sibling(out)
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise ConfigError(
            f"out_dir {out} is not writable ({exc.strerror or exc}); "
            "choose another out_dir or fix its permissions"
        ) from None
    return staging


# --- building ---

def _build(
    cfg: PrepareConfig,
    staging: Path,
    settings: dict[str, Any],
    fingerprint: str,
    progress: bool,
) -> dict[str, Any]:
    start = time.monotonic()
    for task in cfg.tasks:
        _check_holdout(cfg, task)
    tok = _make_tokenizer(cfg, staging / TOKENIZER_DIR, progress)
    sha = tokenizer_sha256(tok)
    seps = document_separators(tok, cfg.tokenizer.path)
    tasks = {t.name: _write_task(cfg, t, tok, seps, sha, staging, progress) for t in cfg.tasks}
    return {
        "format": FORMAT,
        "settings": settings,
        "out_dir": str(Path(cfg.out_dir).resolve()),
        "tokenizer": {
            "path": TOKENIZER_DIR,
            "sha256": sha,
            "vocab_size": len(tok),
            "eos_id": seps.eos_id,
            "eos_token": seps.eos_token,
            "bos_id": seps.bos_id,  # null: documents have no BOS
            "bos_token": seps.bos_token,
            "separators": seps.source,  # "tokenizer" or "model" (a model directory's own)
        },
        "inputs_fingerprint": fingerprint,
        "tasks": tasks,
        "seconds": round(time.monotonic() - start, 3),
    }


def _make_tokenizer(cfg: PrepareConfig, out_dir: Path, progress: bool) -> PreTrainedTokenizerFast:
    if cfg.tokenizer.path is not None:
        tok = load_tokenizer(cfg.tokenizer.path)
        _check_model_vocab(tok, Path(cfg.tokenizer.path))
        save_tokenizer(tok, out_dir)  # a copy keeps the prepared directory self-contained
        return tok
    trained = [t for t in cfg.tasks if t.train]  # evaluation-only tasks stay unseen
    share = max(1, cfg.tokenizer.train_bytes // len(trained))
    _say(f"cptrain prepare: training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on up to "
         f"{cfg.tokenizer.train_bytes / 1e6:.1f} MB", progress)
    texts = (doc for t in trained for doc in _tokenizer_texts(cfg, t, share))
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, out_dir,
                          max_bytes=cfg.tokenizer.train_bytes, progress=progress)
    if len(tok) < cfg.tokenizer.vocab_size:
        logger.warning("tokenizer vocabulary is %d, below the requested %d: too little text",
                       len(tok), cfg.tokenizer.vocab_size)
    return tok


def _check_model_vocab(tok: PreTrainedTokenizerFast, path: Path) -> None:
    """Warn when a model directory's tokenizer has ids its embedding cannot look up."""
    if not is_model_dir(path):
        return
    try:
        rows = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return
    if isinstance(rows, int) and len(tok) > rows:
        logger.warning("%s: the tokenizer has %d tokens but the model's vocab_size is %d; "
                       "token ids from %d on cannot be embedded", path, len(tok), rows, rows)


def _tokenizer_texts(cfg: PrepareConfig, task: TaskInputs, share: int) -> Iterator[str]:
    """Up to ``share`` bytes of the task's training documents (held-out documents excluded)."""
    used = 0
    for doc in iter_documents_many(task.train, _text_key(cfg, task)):
        if not task.val and _is_val(doc, cfg.val_fraction):
            continue
        if used >= share:
            return
        raw = doc.encode("utf-8")[: share - used]
        used += len(raw)
        yield raw.decode("utf-8", errors="ignore")
    if used == 0:
        raise _no_documents(task.name, cfg.val_fraction, "train")


def _is_val(doc: str, fraction: float) -> bool:
    """Whole-document hold-out by content hash: stable across runs and input order."""
    return _split_hash(doc) < fraction * 2**64


def _split_hash(doc: str) -> int:
    """A document's place in [0, 2**64): held out when below ``val_fraction`` of the range."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


def _text_key(cfg: PrepareConfig, task: TaskInputs) -> str:
    return task.text_key or cfg.text_key


def _write_task(
    cfg: PrepareConfig,
    task: TaskInputs,
    tok: PreTrainedTokenizerFast,
    seps: Separators,
    sha: str,
    staging: Path,
    progress: bool,
) -> dict[str, Any]:
    writers = {
        split: ShardWriter(staging / task.name / split, len(tok), seps.eos_id, sha,
                           max_tokens_per_file=cfg.shard_tokens, bos_id=seps.bos_id)
        for split in task.splits
    }
    try:
        with _progress_bar(task.name, progress) as bar:
            if task.val:
                for split in task.splits:
                    docs = iter_documents_many(getattr(task, split), _text_key(cfg, task))
                    _encode_into(docs, lambda _d, w=writers[split]: w, tok, cfg.batch_size, bar)
            else:
                def route(doc: str) -> ShardWriter:
                    return writers["val" if _is_val(doc, cfg.val_fraction) else "train"]

                docs = iter_documents_many(task.train, _text_key(cfg, task))
                _encode_into(docs, route, tok, cfg.batch_size, bar)
        _require_documents(task, cfg.val_fraction, writers)
        return {split: _summary(w.close()) for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def _check_holdout(cfg: PrepareConfig, task: TaskInputs) -> None:
    """Before any tokenizing: a task without val inputs must hold out a document by
    ``val_fraction`` and keep one for training. Reads documents until it has seen both (at
    once for a corpus of any size; a small one, the case that fails, is read whole)."""
    if task.val or not task.train:
        return
    seen = {True: False, False: False}
    lowest, count = 2**64, 0
    for doc in iter_documents_many(task.train, _text_key(cfg, task)):
        place = _split_hash(doc)  # hashed once: the same test as _is_val, and the suggestion
        seen[place < cfg.val_fraction * 2**64] = True
        if all(seen.values()):
            return
        lowest, count = min(lowest, place), count + 1
    lowest /= 2**64
    if count >= 2 and lowest < 0.499:
        # The smallest fraction that holds out a document is known from the hashes read.
        raise DataError(
            f"task {task.name}: val_fraction {cfg.val_fraction} holds out none of its {count} "
            f"documents; give the task val inputs or set val_fraction to at least "
            f"{math.ceil(lowest * 1000 + 1e-9) / 1000:g}"
        )
    raise _no_documents(task.name, cfg.val_fraction, "val" if not seen[True] else "train")


def _require_documents(task: TaskInputs, fraction: float, writers: dict[str, ShardWriter]) -> None:
    for split, w in writers.items():
        if w.num_documents == 0:
            raise _no_documents(task.name, fraction, split)


def _no_documents(task: str, fraction: float, split: str) -> DataError:
    return DataError(
        f"task {task}: val_fraction {fraction} leaves no document for {split}; "
        "give the task val inputs or more (smaller) documents"
    )


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_tokens", "num_documents", "dtype")
    return {**{k: manifest[k] for k in keys}, "num_files": len(manifest["files"])}


def _encode_into(
    docs: Iterator[str],
    route: Callable[[str], ShardWriter],
    tok: PreTrainedTokenizerFast,
    batch_size: int,
    bar: Any,
) -> None:
    """Tokenize documents in parallel batches and append each to the writer ``route`` picks."""
    backend = tok.backend_tokenizer
    # A literal "<|endoftext|>" inside a document is text, not a document boundary.
    saved, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        batch: list[str] = []
        chars = 0
        for doc in docs:
            batch.append(doc)
            chars += len(doc)
            if len(batch) >= batch_size or chars >= _BATCH_MAX_CHARS:
                _encode_batch(batch, route, backend, bar)
                batch, chars = [], 0
        if batch:
            _encode_batch(batch, route, backend, bar)
    finally:
        backend.encode_special_tokens = saved


def _encode_batch(batch: list[str], route: Callable[[str], ShardWriter], backend: Any,
                  bar: Any) -> None:
    encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
    n_bytes = 0
    for doc, enc in zip(batch, encodings, strict=True):
        writer = route(doc)
        writer.append(np.array(enc.ids, dtype=writer.dtype))
        n_bytes += len(doc.encode("utf-8"))
    bar.update(n_bytes)
    bar.set_postfix(docs=bar.docs + len(batch), refresh=False)
    bar.docs += len(batch)


def _progress_bar(task: str, enabled: bool) -> Any:
    from cptrain.progress import progress_bar

    bar = progress_bar(desc=f"prepare {task}", unit="B", unit_scale=True, disable=not enabled,
                       file=sys.stderr, dynamic_ncols=True)
    bar.docs = 0
    return bar


def _say(message: str, enabled: bool) -> None:
    logger.info(message)
    if enabled:
        print(message, file=sys.stderr)
