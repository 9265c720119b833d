"""kill -9 in the middle of a run with each anchor to the start model, then --resume: the final
weights and loss matrix are the uninterrupted run's, bit for bit (the anchors are rebuilt from
the start model, the KL's stored top-k targets read back from the buffer's folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import model_after, read_summary

from cptrain.train import train

from .test_kill_anywhere import PROCESS_TIMEOUT, launch, newest_step

pytestmark = pytest.mark.slow

SEED = [{"source": "task", "task": "asyncio", "tokens": 32 * 12}]
VARIANTS = {
    "kl": {"method": "kl"},
    "l2": {"method": "l2", "regularize": {"l2_to_start": {"weight": 30.0}}},
    "kl-topk": {"method": "kl-replay", "replay": {"visibility_lag": 1, "seed": SEED},
                "regularize": {"kl_to_start": {"rows": "seed", "top_k": 16}}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kill_9_then_resume_is_bit_identical(make_config, variant):
    extra = {**VARIANTS[variant], "data": {"tasks": ["email", "xml"]},
             "checkpoint": {"every": 2, "keep_last": 2}, "train": {"threads": 1}}
    ref = train(make_config(f"{variant}-ref", **extra), progress=False)
    cfg = make_config(f"{variant}-killed", **extra)
    path = Path(cfg.run_dir).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    killed = launch(path, resume=False, kill_at="step:7")  # mid-task 2, after checkpoint 6
    out, _ = killed.communicate(timeout=PROCESS_TIMEOUT)
    assert killed.returncode == -9, out
    assert newest_step(Path(cfg.run_dir)) == 6
    resumed = launch(path, resume=True)
    out, _ = resumed.communicate(timeout=PROCESS_TIMEOUT)
    assert resumed.returncode == 0, out
    got = read_summary(cfg.run_dir)
    assert got["loss_matrix"] == ref["loss_matrix"]
    assert got["teacher_tokens"] == ref["teacher_tokens"]
    a = model_after(cfg.run_dir, 1)
    b = model_after(Path(cfg.run_dir).with_name(f"{variant}-ref"), 1)
    assert all(torch.equal(a[k], b[k]) for k in b)
