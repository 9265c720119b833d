"""`cptrain demo`: English → French → German on the embedded corpus, methods side by side."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from cptrain.config import RunConfig
from cptrain.config_base import apply_overrides, build_config
from cptrain.data.demo_corpus import demo_corpus_ready, fetch_demo
from cptrain.data.prepare import PrepareConfig, prepare
from cptrain.report import write_report
from cptrain.tables import comparison_table, run_report
from cptrain.train import train

TASKS = ("en", "fr", "de")

# Sized so that every method below fits in about 10 minutes on 2 CPU cores (see README).
BASE_RUN: dict[str, Any] = {
    "seed": 0,
    "model": {"preset": "tiny"},
    "data": {"tasks": list(TASKS), "tokens_per_task": 500_000},
    "train": {
        "seq_len": 128,
        "batch_size": 32,
        "lr": 2e-3,
        "min_lr": 1e-4,
        "warmup": 0.02,
        "precision": "bf16",
        "log_every": 10,
    },
    # every 41 steps = 3 points per task for the loss curves of the report
    "eval": {"windows": 96, "batch_size": 48, "every": 41},
    # cos(∇ fresh, ∇ replay) every 20 steps; methods without replay use a probe batch from
    # earlier tasks, so every method gets the same interference measure.
    "diagnostics": {"every": 20},
}

# The paper's Reptile (k=500, ε=0.1) spans tens of thousands of steps; this demo has ~366.
# k and ε are scaled down and were chosen by measurement (README, "Reptile at demo scale").
REPTILE_K = 25
REPTILE_EPSILON = 0.8

# name → config overrides on top of BASE_RUN
METHODS: dict[str, dict[str, Any]] = {
    "sequential": {"method": "sequential"},
    "replay-25": {"method": "replay", "replay": {"alpha": 0.25}},
    "replay-50": {"method": "replay", "replay": {"alpha": 0.5}},
    "reptile": {"method": "reptile", "reptile": {"k": REPTILE_K, "epsilon": REPTILE_EPSILON}},
    "mer-25": {
        "method": "mer",
        "replay": {"alpha": 0.25},
        "reptile": {"k": REPTILE_K, "epsilon": REPTILE_EPSILON},
    },
}


def prepare_config(data_dir: Path) -> PrepareConfig:
    demo = data_dir / "demo"
    return build_config(
        PrepareConfig,
        {
            "out_dir": str(data_dir / "prepared" / "demo"),
            "tokenizer": {"vocab_size": 4096},
            "tasks": [
                {
                    "name": lang,
                    "train": [str(demo / lang / "train.jsonl")],
                    "val": [str(demo / lang / "val.jsonl")],
                }
                for lang in TASKS
            ],
        },
        source="demo prepare config",
    )


def demo_run_config(name: str, runs_dir: Path, data_dir: Path, overrides: list[str]) -> RunConfig:
    raw = json.loads(json.dumps(BASE_RUN))
    for key, value in METHODS[name].items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    raw["run_dir"] = str(runs_dir / name)
    raw["data"]["dir"] = str(data_dir / "prepared" / "demo")
    raw = apply_overrides(raw, overrides)
    return build_config(RunConfig, raw, source=f"demo config ({name})")


def run_demo(
    *, runs_dir: Path, data_dir: Path, fresh: bool, progress: bool, overrides: list[str]
) -> dict[str, dict[str, Any]]:
    t0 = time.perf_counter()
    if not demo_corpus_ready(data_dir / "demo", TASKS):
        fetch_demo(data_dir / "demo", TASKS)
    prepare(prepare_config(data_dir), progress=progress)
    results: dict[str, dict[str, Any]] = {}
    for name in METHODS:
        cfg = demo_run_config(name, runs_dir, data_dir, overrides)
        run_dir = Path(cfg.run_dir)
        summary_path = run_dir / "summary.json"
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        if summary_path.exists() and json.loads(summary_path.read_text()).get("complete"):
            print(f"[{name}] already trained in {run_dir} (use --fresh to retrain)")
            results[name] = json.loads(summary_path.read_text())
            continue
        resume = (run_dir / "checkpoints").is_dir()
        print(f"[{name}] training {' → '.join(TASKS)} in {run_dir}")
        results[name] = train(cfg, resume=resume, progress=progress)
    print()
    for name, s in results.items():
        print(run_report(s, title=f"== {name}: validation loss (row: after task, column: task)"))
        print()
    print(comparison_table(list(results.items())))
    steps = next(iter(results.values()))["steps"] if results else 0
    print(
        "\nforgetting = final loss − best earlier loss, averaged over en and fr (positive = "
        "forgot); retained = mean final loss; learned = mean loss right after each task; grad "
        "cos = mean cos(∇ current task, ∇ replayed or earlier-task rows) after the first task."
        f"\nReptile here: k={REPTILE_K} steps, ε={REPTILE_EPSILON} over {steps} steps (the "
        "paper: k=500, ε=0.1 over tens of thousands of steps)."
    )
    if "mer-25" in results and "replay-25" in results:
        mer, rep = results["mer-25"]["retained_loss"], results["replay-25"]["retained_loss"]
        verdict = "helps" if mer < rep else "does not help"
        print(
            f"MER 25% retained loss {mer:.3f} vs replay 25% {rep:.3f}: at this budget Reptile "
            f"{verdict} on top of replay ({mer - rep:+.3f})."
        )
    report = write_report([runs_dir], runs_dir / "report")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; runs in {runs_dir}")
    print(f"report: {report}")
    return results
