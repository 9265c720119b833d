"""cptrain's local lm-eval tasks: held-out documents written as lm-eval task files.

Nothing can be downloaded on most machines cptrain runs on, so besides the hub tasks cptrain
writes *local* lm-eval tasks from each task's held-out documents (the ``val`` split of the
prepared data, decoded back to text), with the rows of ``task_items``:

* ``cptrain_choice_<task>``: 4-way choice of a passage's true continuation; metrics acc and
  acc_norm (log-likelihood divided by the ending's length in characters).
* ``cptrain_bpb_<task>``: bits per byte of held-out documents (``loglikelihood_rolling``).

The tasks are plain lm-eval YAML with ``dataset_path: json``, so
``lm_eval --model hf --model_args pretrained=DIR --tasks cptrain_local --include_path TASKS``
runs them too.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cptrain.errors import DataError
from cptrain.evaluation.task_items import make_bpb_docs, make_choice_items, spaceless
from cptrain.fsutil import atomic_write_text

LOCAL_TAG = "cptrain_local"


def held_out_documents(data_dir: Path, task: str) -> list[str]:
    """The task's validation documents, decoded from the prepared shards (split at EOS)."""
    from cptrain.data.prepare import load_prepared_tokenizer, open_split

    shards = open_split(Path(data_dir), task, "val")
    tok = load_prepared_tokenizer(Path(data_dir))
    ids = shards.read(0, shards.num_tokens)
    cuts = np.flatnonzero(ids == shards.eos_id)
    docs, start = [], 0
    for end in [*cuts.tolist(), len(ids)]:
        if end > start:
            doc = ids[start:end]
            if shards.bos_id is not None and doc[0] == shards.bos_id:
                doc = doc[1:]  # the framing BOS of a model tokenizer is no part of the text
            text = tok.decode(doc.tolist()).strip()
            if text:
                docs.append(text)
        start = end + 1
    return docs


def _task_id(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", task)


def choice_task_name(task: str) -> str:
    return f"cptrain_choice_{_task_id(task)}"


def bpb_task_name(task: str) -> str:
    return f"cptrain_bpb_{_task_id(task)}"


def _jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _task_yaml(name: str, data_file: Path, body: dict[str, Any]) -> str:
    spec = {
        "task": name,
        "tag": [LOCAL_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        **body,
        "metadata": {"version": 1.0},
    }
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def build_local_tasks(
    data_dir: Path,
    out_dir: Path,
    *,
    tasks: Sequence[str] | None = None,
    items: int = 200,
    bpb_docs: int = 64,
    bpb_chars: int = 2000,
    seed: int = 0,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    skip_unusable: bool = False,
) -> list[str]:
    """Write the local lm-eval tasks (YAML + JSONL) for ``tasks`` (default: all prepared ones)
    under ``out_dir``; returns the lm-eval task names. Use ``out_dir`` as ``--include_path``.
    A task with too few held-out documents is an error naming it, or with ``skip_unusable``
    a warning (the others are still built).
    With ``max_tokens`` and ``count_tokens`` (see ``token_counter``), every choice item fits
    in ``max_tokens`` tokens of the model that will be evaluated (lm-eval's ``max_length``)."""
    from cptrain.data.prepare import load_prepared

    info = load_prepared(Path(data_dir))
    tasks = list(tasks or info["tasks"])
    built = []
    # Every task's items first, files after: a task that fails leaves no half-written set.
    for task in tasks:
        docs = held_out_documents(Path(data_dir), task)
        try:
            rows, delim = make_choice_items(docs, n_items=items, seed=seed,
                                            max_tokens=max_tokens, count_tokens=count_tokens)
        except DataError as exc:
            if not skip_unusable:
                raise DataError(f"task {task}: {exc}") from None
            print(f"warning: task {task}: {exc}; its local tasks are left out", file=sys.stderr)
            continue
        built.append((task, docs, rows, delim))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for task, docs, rows, delim in built:
        name = choice_task_name(task)
        _jsonl(out_dir / f"{name}.jsonl", rows)
        body = {
            "output_type": "multiple_choice",
            "doc_to_text": "{{ctx}}",
            "doc_to_choice": "endings",
            "doc_to_target": "label",
            "target_delimiter": delim,
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
        atomic_write_text(out_dir / f"{name}.yaml", _task_yaml(name, out_dir / f"{name}.jsonl",
                                                               body))
        names.append(name)

        name = bpb_task_name(task)
        _jsonl(out_dir / f"{name}.jsonl", make_bpb_docs(docs, n_docs=bpb_docs, max_chars=bpb_chars))
        body = {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": m, "aggregation": agg, "higher_is_better": False}
                for m, agg in (("bits_per_byte", "bits_per_byte"),
                               ("byte_perplexity", "weighted_perplexity"),
                               ("word_perplexity", "weighted_perplexity"))
                # a text without spaces is one "word" per document: exp() of its loss overflows
                if not (m == "word_perplexity" and spaceless(docs))
            ],
        }
        atomic_write_text(out_dir / f"{name}.yaml", _task_yaml(name, out_dir / f"{name}.jsonl",
                                                               body))
        names.append(name)
    return names
