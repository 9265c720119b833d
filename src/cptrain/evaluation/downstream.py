"""Downstream evaluation with lm-evaluation-harness (``lm-eval[hf]``), offline by default.

This module drives lm-eval: it picks the tasks ``--tasks`` asks for (local ones built with
``local_tasks`` for the target that ``targets`` resolves, hub ones checked first so that a
missing dataset is one line), runs the harness with hub access off unless ``online``, and
writes one results record per model (``<run>/downstream/<model>.json``) and its terminal table.

The names other code imports from here (task generation, target lookup) live in
``task_items``, ``local_tasks`` and ``targets``; they are re-exported so that those imports
keep working.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cptrain.errors import ConfigError, EnvironmentProblem
from cptrain.evaluation.local_tasks import (
    LOCAL_TAG,
    bpb_task_name,
    build_local_tasks,
    choice_task_name,
    held_out_documents,
)
from cptrain.evaluation.targets import (
    Target,
    model_max_length,
    resolve_target,
    token_counter,
)
from cptrain.evaluation.task_items import make_bpb_docs, make_choice_items
from cptrain.fsutil import atomic_write_json
from cptrain.progress import foreign_bars

__all__ = [
    "LOCAL_TAG",
    "PAPER_TASKS",
    "Target",
    "bpb_task_name",
    "build_local_tasks",
    "choice_task_name",
    "format_results",
    "held_out_documents",
    "make_bpb_docs",
    "make_choice_items",
    "model_max_length",
    "offline_mode",
    "resolve_target",
    "run_downstream",
    "token_counter",
]

# The paper's downstream tasks and the hub datasets lm-eval reads them from.
PAPER_TASKS = {
    "hellaswag": "Rowan/hellaswag",
    "piqa": "baber/piqa",
    "pubmedqa": "bigbio/pubmed_qa",
    "hellaswag_fr": "alexandrainst/m_hellaswag",
}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


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
