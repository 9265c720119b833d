"""Shared fixtures: a small prepared dataset of real text available on every machine.

The three tasks are documents (source files with their docstrings and comments) from three
different corners of the Python standard library, so they differ in vocabulary the way
languages do, but cost nothing to obtain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.data.prepare import PrepareConfig, prepare

# Where the environment sets PYTHONDONTWRITEBYTECODE (this project's machines do), every process
# the tests start (torchrun ranks, the CLI, lm-eval) would compile cptrain from source again
# (~0.8 s each) and pytest would re-rewrite every test module in every worker. Bytecode goes to
# the __pycache__ folders git ignores.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # xdist runs one worker per core: torch's default (one thread per core in every worker)
    # would oversubscribe the machine
    import torch

    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

# xdist hands out whole files in collection order (`--no-loadscope-reorder` in pyproject):
# the files that hold the longest end-to-end tests start first, so that no worker picks one of
# them up when the other is nearly done. Measured with `--durations=0` on 2 cores; a file
# missing here only runs later, nothing else changes.
HEAVY_FIRST = (
    "e2e/test_distributed.py",  # 61 s of the 327 s the files take together
    "integrations/test_trainer_distributed.py",
    "evaluation/test_downstream.py",
    "demo/test_corpus.py",
    "train/test_trainer.py",
    "e2e/test_fault_matrix.py",
    "e2e/test_kill_anywhere.py",
    "test_merge.py",
    "train/test_reptile.py",
    "report/test_document.py",
    "test_progress.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(Path(__file__).parent).as_posix()
        return HEAVY_FIRST.index(path) if path in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order inside a file stays as written


REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TASK_SOURCES = {"email": "email", "xml": "xml", "asyncio": "asyncio"}


def _write_task(out: Path, package: str, limit_bytes: int = 400_000) -> None:
    files = sorted(p for p in (STDLIB / package).rglob("*.py") if "test" not in p.parts)
    train, val, used = [], [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) < 500:
            continue
        held_out = int(hashlib.sha256(f.name.encode()).hexdigest(), 16) % 8 == 0
        (val if held_out else train).append({"text": text})
        used += len(text)
        if used > limit_bytes:
            break
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("val", val)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps(d) + "\n")


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    tasks = []
    for name, package in TASK_SOURCES.items():
        _write_task(root / "text" / name, package)
        tasks.append(
            {
                "name": name,
                "train": [str(root / "text" / name / "train.jsonl")],
                "val": [str(root / "text" / name / "val.jsonl")],
            }
        )
    cfg = build_config(
        PrepareConfig,
        {"out_dir": str(root / "prepared"), "tokenizer": {"vocab_size": 512}, "tasks": tasks},
    )
    return prepare(cfg, progress=False)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_run_config(run_dir: Path, data_dir: Path, **sections: Any) -> RunConfig:
    """The tests' run: the tiny preset on the three small tasks, 6 steps of 8×32 tokens per
    task; keyword sections are merged over these defaults."""
    raw = {
        "run_dir": str(run_dir),
        "seed": 0,
        "data": {
            "dir": str(data_dir),
            "tasks": list(TASK_SOURCES),
            "tokens_per_task": 8 * 32 * 6,
        },
        "model": {"preset": "tiny"},
        # fp32, not the default auto: the suite's numbers must not depend on the machine
        "train": {"seq_len": 32, "batch_size": 8, "lr": 3e-3, "log_every": 2,
                  "precision": "fp32"},
        "eval": {"windows": 8, "batch_size": 8},
    }
    return build_config(RunConfig, _merge(raw, sections))


def with_tokenizer(model_dir: Path, prepared: Path) -> Path:
    """``model_dir`` given the tokenizer ``prepared`` was made with, as a released model
    directory carries its own (``init_from`` refuses a model without one)."""
    for f in (Path(prepared) / "tokenizer").iterdir():
        shutil.copy2(f, Path(model_dir) / f.name)
    return Path(model_dir)


def read_metrics(run_dir: Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (only those of ``type == kind`` when given)."""
    from cptrain.rundir.run_dir import RunDir

    return [r for r in RunDir.open(run_dir).records() if kind is None or r.get("type") == kind]


def read_summary(run_dir: Path | str) -> dict[str, Any]:
    """A run's summary, read as every command reads it."""
    from cptrain.rundir.run_dir import RunDir

    return RunDir.open(run_dir).summary()


def model_after(run_dir: Path | str, task: int) -> dict[str, Any]:
    """The weights a run exported after its task number ``task`` (name -> tensor)."""
    from safetensors.torch import load_file

    from cptrain.rundir.run_dir import RunDir

    model_dir = RunDir.open(run_dir).task_models()[task]
    return load_file(model_dir / "model.safetensors")


def flip(path: Path, offset: int | None = None, mask: int = 0xFF) -> None:
    """XOR one byte of a file (by default in its middle)."""
    offset = path.stat().st_size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


@pytest.fixture
def make_config(prepared_dir, tmp_path):
    """A fast run config on the small dataset; keyword sections override the defaults."""

    def factory(run_name: str = "run", **sections: Any) -> RunConfig:
        return tiny_run_config(tmp_path / run_name, prepared_dir, **sections)

    return factory


# The reference runs several test modules compare against: one uninterrupted run per method,
# trained once per module that asks for it.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "sequential": {"method": "sequential"},
    "replay": {"method": "replay", "replay": {"alpha": 0.25, "visibility_lag": 1}},
    "mer": {
        "method": "mer",
        "replay": {"alpha": 0.25, "visibility_lag": 1},
        "reptile": {"k": 3, "epsilon": 0.5},
    },
}
# Run-control settings of the reference runs: diagnostics and checkpoints change no number,
# which the resumed runs (trained without them) prove by matching the references bit for bit.
REFERENCE_EXTRAS: dict[str, dict[str, Any]] = {
    "sequential": {"diagnostics": {"every": 3}, "checkpoint": {"every": 2, "keep_last": 3}},
    "replay": {"diagnostics": {"every": 2}},
    "mer": {},
}


@pytest.fixture(scope="module")
def reference(prepared_dir, tmp_path_factory):
    """method -> (config, summary) of a finished uninterrupted run, trained on first use."""
    root = tmp_path_factory.mktemp("reference")
    done: dict[str, Any] = {}

    def get(method: str):
        from cptrain.train import train

        if method not in done:
            extra = {**METHOD_SETTINGS[method], **REFERENCE_EXTRAS[method]}
            cfg = tiny_run_config(root / method, prepared_dir, **extra)
            done[method] = (cfg, train(cfg, progress=False))
        return done[method]

    return get
