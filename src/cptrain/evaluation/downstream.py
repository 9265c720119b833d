"""Downstream evaluation with lm-evaluation-harness (``lm-eval[hf]``), offline by default.

Nothing can be downloaded on most machines cptrain runs on, so besides the hub tasks the paper
used (hellaswag, piqa, pubmedqa, hellaswag_fr) cptrain writes *local* lm-eval tasks from each
task's held-out documents (the ``val`` split of the prepared data, decoded back to text):

* ``cptrain_choice_<task>``: HellaSwag-style 4-way choice of the true continuation of a
  held-out passage; the three distractors are spans of the same length in units (words, or
  characters for scripts without spaces) from *other* held-out documents of the same task,
  chosen closest in characters to the true ending, so length alone does not give the answer.
  Items are sized in tokens of the evaluated model's tokenizer so that context + the longest
  choice fit its ``max_length`` (the model's own window, ``model_max_length``: a preset model
  exports the ``seq_len`` it was trained at, a released one keeps its own): lm-eval never
  truncates one. The window comes from the model directory alone, so the items do not depend
  on where that directory lies.
  Metrics: acc and acc_norm (log-likelihood divided by the ending's length in characters).
* ``cptrain_bpb_<task>``: bits per byte of held-out documents (``loglikelihood_rolling``).

The tasks are plain lm-eval YAML with ``dataset_path: json``, so
``lm_eval --model hf --model_args pretrained=DIR --tasks cptrain_local --include_path TASKS``
runs them too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cptrain.errors import CheckpointError, ConfigError, DataError, EnvironmentProblem
from cptrain.fsutil import atomic_write_json, atomic_write_text
from cptrain.progress import foreign_bars

LOCAL_TAG = "cptrain_local"
# The paper's downstream tasks and the hub datasets lm-eval reads them from.
PAPER_TASKS = {
    "hellaswag": "Rowan/hellaswag",
    "piqa": "baber/piqa",
    "pubmedqa": "bigbio/pubmed_qa",
    "hellaswag_fr": "alexandrainst/m_hellaswag",
}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


# --------------------------------------------------------------------------- local tasks
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


@dataclass(frozen=True)
class _Units:
    """A document cut into words (joined by spaces) or, for scripts without spaces, chars."""

    items: list[str]
    joiner: str

    def join(self, a: int, b: int) -> str:
        return self.joiner.join(self.items[a:b])


def _units(text: str, by_char: bool) -> _Units:
    return _Units(list(re.sub(r"\s+", "", text)), "") if by_char else _Units(text.split(), " ")


def _spaceless(docs: Sequence[str]) -> bool:
    text = "".join(docs[:50])
    return text.count(" ") < len(text) / 25  # Japanese, Chinese: few spaces per character


def make_choice_items(
    docs: Sequence[str],
    *,
    n_items: int = 200,
    seed: int = 0,
    ctx_len: int | None = None,
    end_len: int | None = None,
    candidates: int = 24,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """HellaSwag-style items and the delimiter between context and ending (" " or "").

    Passages are cut in units (words, or characters for scripts without spaces). With
    ``max_tokens`` and ``count_tokens`` (tokens of a string as the evaluated model's tokenizer
    counts them), every item fits the model's window: an ending keeps at most its share of
    ``max_tokens`` (dropping units from its end, distractors cut to the same number of units),
    then the context loses units from its start until context + delimiter + the longest choice
    take at most ``max_tokens`` tokens; a passage where even one unit of context does not fit
    is left out."""
    by_char = _spaceless(docs)
    delim = "" if by_char else " "
    # The default sizes: context + ending within ~100 tokens of a typical tokenizer.
    ctx_len = ctx_len or (72 if by_char else 24)
    end_len = end_len or (24 if by_char else 10)
    units = [_units(d, by_char) for d in docs]
    span = ctx_len + end_len
    usable = [i for i, u in enumerate(units) if len(u.items) >= span]
    if len(usable) < 4 or len({i for i, u in enumerate(units) if len(u.items) >= end_len}) < 4:
        raise DataError(
            f"only {len(usable)} of {len(docs)} held-out document(s) "
            f"{'is' if len(usable) == 1 else 'are'} long enough ({span} "
            f"{'characters' if by_char else 'words'}) for choice items, which need 4; add "
            "validation text"
        )
    budget = None
    if max_tokens is not None:
        if count_tokens is None:
            raise ValueError("max_tokens needs count_tokens (see token_counter)")
        budget = _Budget(max_tokens, count_tokens, delim, end_len / span)
    rng = np.random.default_rng([seed, 0xC401CE])
    # Non-overlapping passages, a few per document, so that no document dominates.
    per_doc = max(1, math.ceil(2 * n_items / len(usable)))
    passages = [
        (d, k * span)
        for d in usable
        for k in range(min(per_doc, len(units[d].items) // span))
    ]
    items: list[dict[str, Any]] = []
    for pos in rng.permutation(len(passages)).tolist():
        if len(items) == n_items:
            break
        d, start = passages[pos]
        u = units[d]
        cut = start + ctx_len  # where the context ends and the ending starts
        n_end = budget.ending_units(u, cut, end_len) if budget else end_len
        ending = u.join(cut, cut + n_end)
        fits = budget.distractor_fits(ending) if budget else None
        distractors = _distractors(units, d, ending, n_end, candidates, rng, fits)
        label = int(rng.integers(4))
        if len(distractors) < 3:
            if budget is None:
                raise DataError(
                    "too few distinct held-out passages for distractors; add validation text"
                )
            continue
        endings = [*distractors[:label], ending, *distractors[label:]]
        first = budget.context_start(u, start, cut, endings) if budget else start
        if first is None:
            continue
        items.append(
            {"id": len(items), "doc": d, "ctx": u.join(first, cut),
             "endings": endings, "label": label}
        )
    if not items:
        raise DataError(
            f"no choice item fits in {max_tokens} tokens of the model's tokenizer; raise "
            "--max-length"
        )
    return items, delim


@dataclass(frozen=True)
class _Budget:
    """Sizes items in tokens of the evaluated model: ``count`` tokens of a whole string (as
    lm-eval encodes context + continuation), ``limit`` of them at most."""

    limit: int
    count: Callable[[str], int]
    delim: str
    end_share: float  # of ``limit``, for an ending

    @property
    def end_limit(self) -> int:
        return max(1, int(self.limit * self.end_share))

    def ending_units(self, u: _Units, cut: int, end_len: int) -> int:
        n = end_len
        while n > 1 and self.count(self.delim + u.join(cut, cut + n)) > self.end_limit:
            n -= 1
        return n

    def distractor_fits(self, ending: str) -> Callable[[str], bool]:
        """A distractor takes no more tokens than the ending's share (or the true ending)."""
        most = max(self.end_limit, self.count(self.delim + ending))
        return lambda span: self.count(self.delim + span) <= most

    def context_start(self, u: _Units, start: int, cut: int, endings: list[str]) -> int | None:
        """The first unit of the longest context ending at ``cut`` with which every choice
        fits (None when not even one unit does); contexts are dropped from the left."""

        def fits(first: int) -> bool:
            ctx = u.join(first, cut)
            return all(self.count(ctx + self.delim + e) <= self.limit for e in endings)

        if fits(start):
            return start
        lo, hi = start, cut - 1  # lo does not fit; find the first that does, if hi does
        if not fits(hi):
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi


def _distractors(
    units: Sequence[_Units], source: int, ending: str, end_len: int, candidates: int,
    rng: np.random.Generator, fits: Callable[[str], bool] | None = None,
) -> list[str]:
    """Up to three spans of other documents, the closest in character length to the true
    ending, among ``candidates`` random spans (that ``fits``, when given)."""
    others = [i for i, u in enumerate(units) if i != source and len(u.items) >= end_len]
    pool: set[str] = set()
    drawn = 0
    for _ in range(8 * candidates):
        if drawn == candidates:
            break
        d = others[int(rng.integers(len(others)))]
        start = int(rng.integers(len(units[d].items) - end_len + 1))
        span = units[d].join(start, start + end_len)
        if fits is not None and not fits(span):
            continue
        drawn += 1
        if span != ending:
            pool.add(span)
    ranked = sorted(sorted(pool), key=lambda s: abs(len(s) - len(ending)))
    return ranked[:3]


def make_bpb_docs(
    docs: Sequence[str], *, n_docs: int = 64, max_chars: int = 2000
) -> list[dict[str, Any]]:
    """Held-out documents cut to ``max_chars`` at a whitespace (bounded evaluation time)."""
    out = []
    for i, text in enumerate(docs[:n_docs]):
        if len(text) > max_chars:
            cut = text.rfind(" ", 0, max_chars)
            text = text[: cut if cut > max_chars // 2 else max_chars]
        out.append({"id": i, "text": text})
    return out


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
                if not (m == "word_perplexity" and _spaceless(docs))
            ],
        }
        atomic_write_text(out_dir / f"{name}.yaml", _task_yaml(name, out_dir / f"{name}.jsonl",
                                                               body))
        names.append(name)
    return names


def token_counter(model_dir: Path) -> Callable[[str], int]:
    """Tokens of a string as lm-eval's ``hf`` model counts them: the model directory's own
    tokenizer, with its default special tokens (a BOS where the tokenizer adds one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({first})") from None
    return lambda text: len(tok.encode(text))


def model_max_length(model_dir: Path) -> int:
    """The window lm-eval's ``hf`` model uses without ``max_length``: the model config's
    positions (``n_positions``, ``max_position_embeddings``, ``n_ctx``), else 2048."""
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            if isinstance(config.get(key), int) and config[key] > 0:
                return int(config[key])
    return 2048


# --------------------------------------------------------------------------- model lookup
@dataclass(frozen=True)
class Target:
    """What to evaluate: an HF model directory and, when it belongs to a run, that run."""

    model_dir: Path
    run_dir: Path | None
    config: dict[str, Any] | None  # the run's resolved config


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    with contextlib.suppress(yaml.YAMLError, OSError):
        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    return None


def _final_model(run_dir: Path) -> Path | None:
    models = sorted(
        (p for p in (run_dir / "models").glob("after_*") if (p / "config.json").is_file()),
        key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1,
    )
    return models[-1] if models else None


def resolve_target(path: Path) -> Target:
    """A run directory (its last exported model), ``models/after_*``, ``checkpoints/step_N``
    (its ``model/``), or any Hugging Face ``save_pretrained`` directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run directory or a model directory")
    if (path / "models").is_dir() or (path / "summary.json").is_file():
        model = _final_model(path)
        if model is None:
            raise CheckpointError(
                f"{path} has no exported model (models/after_*/); let the run finish its first "
                "task, or pass a model directory"
            )
        return Target(model, path, _run_config(path))
    if (path / "model" / "config.json").is_file():  # a training checkpoint
        path = path / "model"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a run "
            "directory, models/after_<i>_<task>/ or checkpoints/step_<n>/"
        )
    run_dir = next((p for p in path.parents if (p / "config.yaml").is_file()), None)
    return Target(path, run_dir, _run_config(run_dir) if run_dir else None)


# --------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def offline_mode(enabled: bool = True) -> Iterator[None]:
    """Hub access off (env and already-imported libraries), restored afterwards."""
    if not enabled:
        yield
        return
    saved = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    os.environ.update({k: "1" for k in _OFFLINE_VARS})
    patched: list[tuple[Any, str, Any]] = []
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        with contextlib.suppress(ImportError, AttributeError):
            mod = __import__(module, fromlist=[attr])
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, old in patched:
            setattr(mod, attr, old)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """lm-eval logs every task default it fills in; keep warnings that matter (errors)."""
    log = logging.getLogger(logger)
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _require_lm_eval() -> str:
    try:
        import lm_eval
    except ImportError:
        raise EnvironmentProblem(
            "downstream evaluation needs lm-evaluation-harness; pip install 'lm-eval[hf]==0.4.13'"
        ) from None
    return str(getattr(lm_eval, "__version__", "unknown"))


def _task_names(requested: Sequence[str]) -> list[str]:
    """``--tasks`` as names: each argument may hold several, comma-separated."""
    return [n.strip() for item in requested for n in item.split(",") if n.strip()]


def _data_tasks_asked(requested: Sequence[str], run_tasks: list[str]) -> tuple[list[str], bool]:
    """The data tasks whose local lm-eval tasks ``--tasks`` needs, and whether it asked for all
    of them (``local``: a task too small for items is then skipped, not fatal)."""
    names = set(_task_names(requested))
    if names & {"local", LOCAL_TAG}:
        return list(run_tasks), True
    return [t for t in run_tasks if {choice_task_name(t), bpb_task_name(t)} & names], False


def _split_tasks(requested: Sequence[str], local: list[str]) -> tuple[list[str], list[str]]:
    names = _task_names(requested)
    if not names:
        raise ConfigError("--tasks is empty; use local, a local task name, or e.g. hellaswag")
    chosen_local, hub = [], []
    for n in names:
        if n in ("local", LOCAL_TAG):
            chosen_local += local
        elif n.startswith("cptrain_"):
            if n not in local:
                raise ConfigError(
                    f"--tasks: no local task {n!r}; local tasks here: {', '.join(local)}"
                )
            chosen_local.append(n)
        else:
            hub.append(n)
    return list(dict.fromkeys(chosen_local)), list(dict.fromkeys(hub))


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, defaults: bool) -> Any:
    """Indexing lm-eval's ~200 built-in task folders takes seconds: only hub tasks need them,
    and one index serves every call of a process (local task files keep their paths)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _check_hub_tasks(names: list[str], manager: Any, online: bool) -> None:
    """Load each hub task once, so that a missing dataset is one line naming the task."""
    known = set(manager.all_tasks)
    for n in names:
        if n not in known:
            raise ConfigError(
                f"--tasks: unknown task {n!r}; use local, cptrain_* tasks, or an lm-eval task "
                f"such as {', '.join(PAPER_TASKS)}"
            )
        try:
            manager.load([n])
        except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline
            source = PAPER_TASKS.get(n, "the Hugging Face Hub")
            how = (
                "it is not in the local datasets cache and downloads are off; re-run with "
                "--online on a machine with network access, or use the local tasks"
                if not online
                else f"loading failed ({type(exc).__name__}); check network access"
            )
            raise EnvironmentProblem(f"task {n} needs its data from {source}: {how}") from None


def _metrics(raw: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": x, "acc_stderr,none": s}`` → ``{"acc": x, "acc_stderr": s}``."""
    out = {}
    for key, value in raw.items():
        metric, _, _filter = key.partition(",")
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[metric] = float(value)
    return out


def run_downstream(
    target: Path,
    *,
    tasks: Sequence[str] = ("local",),
    out_dir: Path | None = None,
    data_dir: Path | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    max_length: int | None = None,
    items: int = 200,
    bpb_chars: int = 2000,
    online: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate one model with lm-eval; writes and returns ``<out_dir>/<model>.json``.

    ``out_dir`` defaults to ``<run>/downstream``; ``max_length`` to the model's own window
    (for a model cptrain trained from a preset, the ``seq_len`` it was trained at).
    Local choice items are sized in tokens of the model's tokenizer to fit ``max_length``.
    """
    version = _require_lm_eval()
    tgt = resolve_target(Path(target))
    cfg = tgt.config or {}
    data_dir = Path(data_dir) if data_dir else (Path(cfg["data"]["dir"]) if cfg else None)
    if out_dir is None:
        if tgt.run_dir is None:
            raise ConfigError(f"{tgt.model_dir} is not inside a run; pass --out DIR for results")
        out_dir = tgt.run_dir / "downstream"
    out_dir = Path(out_dir)
    task_dir = out_dir / "tasks"
    if max_length is None:  # from the directory alone: a copied-out model gets the same items
        max_length = model_max_length(tgt.model_dir)
    local: list[str] = []
    if data_dir is not None:
        from cptrain.data.prepare import load_prepared

        # evaluation-only tasks are what a released model knew: scored like trained ones
        run_tasks = (
            [t["name"] for t in cfg["data"]["tasks"]] + list(cfg["data"].get("eval_only") or [])
            if cfg
            else list(load_prepared(data_dir)["tasks"])
        )
        wanted, every = _data_tasks_asked(tasks, run_tasks)
        local = build_local_tasks(data_dir, task_dir, tasks=wanted, items=items,
                                  bpb_chars=bpb_chars, seed=seed, max_tokens=max_length,
                                  count_tokens=token_counter(tgt.model_dir),
                                  skip_unusable=every) if wanted else []
    local_req, hub_req = _split_tasks(tasks, local)
    if not local and not hub_req:
        raise ConfigError(
            f"{tgt.model_dir} is not inside a run, so its data is unknown; pass --data "
            "PREPARED_DIR for the local tasks"
        )
    with offline_mode(not online):
        results = _evaluate(tgt.model_dir, local_req, hub_req, task_dir, online=online,
                            limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                            max_length=max_length, device=device, seed=seed)
    record = {
        "model_dir": str(tgt.model_dir),
        "model": tgt.model_dir.name,
        "lm_eval_version": version,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "max_length": max_length,
        "tasks": results,
        "command": _cli_equivalent(tgt.model_dir, [*local_req, *hub_req], task_dir, max_length,
                                   num_fewshot, limit),
    }
    path = out_dir / f"{tgt.model_dir.name}.json"
    old: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("model_dir") == record["model_dir"]:
        record["tasks"] = {**old.get("tasks", {}), **results}  # keep tasks of earlier calls
    atomic_write_json(path, record)
    record["path"] = str(path)
    return record


@contextlib.contextmanager
def _one_line(tasks: list[str]) -> Iterator[None]:
    """A failure inside lm-eval as one line naming the tasks, not a traceback."""
    try:
        yield
    except (ConfigError, EnvironmentProblem):
        raise
    except Exception as exc:  # noqa: BLE001 - lm-eval raises anything from asserts to math
        what = str(exc).splitlines()[0] if str(exc) else ""
        raise EnvironmentProblem(
            f"lm-eval failed on {', '.join(tasks)}: {type(exc).__name__}"
            f"{': ' + what if what else ''}; rerun with fewer tasks (--tasks) to find the one"
        ) from exc


def _evaluate(
    model_dir: Path, local: list[str], hub: list[str], task_dir: Path, *, online: bool,
    limit: int | None, num_fewshot: int, batch_size: int, max_length: int | None, device: str,
    seed: int,
) -> dict[str, dict[str, float]]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(str(task_dir) if local else None, bool(hub))
    if hub:
        _check_hub_tasks(hub, manager, online)
    kwargs: dict[str, Any] = {"pretrained": str(model_dir), "batch_size": batch_size,
                              "device": device, "dtype": "float32"}
    if max_length:
        kwargs["max_length"] = max_length
    lm = HFLM(**kwargs)
    with _quiet("lm_eval"), foreign_bars(), _one_line(local + hub), _quiet_git_hash():
        res = simple_evaluate(
            model=lm,
            tasks=[*local, *hub],
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if res is None:
        raise EnvironmentProblem("lm-eval returned no results (non-zero rank?); run on one process")
    return {name: _metrics(vals) for name, vals in res["results"].items()}


@contextlib.contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """lm-eval records ``git describe`` of the current directory (not the model's) and lets
    git print "fatal: not a git repository" outside one; ask git with its stderr silenced."""
    import subprocess

    from lm_eval import evaluator

    def quiet() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True,
                                 text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None

    saved = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


def _cli_equivalent(model_dir: Path, names: list[str], task_dir: Path, max_length: int | None,
                    num_fewshot: int, limit: int | None) -> str:
    args = f"pretrained={model_dir}" + (f",max_length={max_length}" if max_length else "")
    cmd = (f"lm_eval --model hf --model_args {args} --tasks {','.join(names)} "
           f"--include_path {task_dir} --num_fewshot {num_fewshot} --device cpu")
    return cmd + (f" --limit {limit}" if limit else "")


def format_results(record: dict[str, Any]) -> str:
    """A plain-text table of one results record for the terminal."""
    lines = [f"downstream: {record['model_dir']} ({record['num_fewshot']}-shot)"]
    for task, metrics in sorted(record["tasks"].items()):
        shown = [
            f"{m} {v:.4f}" + (f" ± {metrics[m + '_stderr']:.4f}"
                              if math.isfinite(metrics.get(m + "_stderr", math.nan)) else "")
            for m, v in metrics.items()
            if not m.endswith("_stderr") and m != "sample_len"
        ]
        lines.append(f"  {task:<28} " + "  ".join(shown))
    return "\n".join(lines)
