"""SIGTERM mid-task: a checkpoint at the next step boundary, exit 143 with a message, and a
resume that ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import model_after, read_metrics

from cptrain.train import train

SLOW = {
    # Long enough per task that the signal lands inside the first one; no interval checkpoints,
    # so without the handler everything since the start would be lost.
    "data": {"tasks": ["email", "xml"], "tokens_per_task": 8 * 32 * 40},
    "train": {"log_every": 1, "precision": "fp32"},
    "checkpoint": {"every": 0, "keep_last": 5},
}


def test_sigterm_checkpoints_the_next_step_and_resumes_bit_identically(make_config, tmp_path):
    cfg = make_config("term", **SLOW)
    path = tmp_path / "term.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cptrain.cli", "train", str(path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run = Path(cfg.run_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run, "train")) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "--resume" in err
    (saved,) = run.glob("checkpoints/step_*")
    step = int(saved.name.removeprefix("step_"))
    assert 3 <= step < 40  # inside the first task: not a task-end checkpoint

    resumed = train(cfg, resume=True, progress=False)
    ref_cfg = make_config("ref", **SLOW)
    ref = train(ref_cfg, progress=False)
    assert resumed["loss_matrix"] == ref["loss_matrix"]
    got, want = model_after(run, 1), model_after(ref_cfg.run_dir, 1)
    assert all(torch.equal(got[k], want[k]) for k in want)
