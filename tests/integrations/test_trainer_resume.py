"""kill -9 of a transformers `Trainer` run mid-task, then `train(resume_from_checkpoint=True)`:
the final weights are the uninterrupted run's (torch.equal), the rows read after the resume
(fresh and replayed, by buffer id) are the ones it read, and both are `cptrain train`'s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_run_config
from safetensors.torch import load_file

from integrations.common import MER, cptrain_train, digest, read_rows, start_model

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("hf_job.py")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def job(cfg_path: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), str(cfg_path), str(model), str(out),
                           "--save-steps", "4", *extra],
                          env=ONE_THREAD, capture_output=True, text=True, timeout=600)


def test_kill_minus_9_mid_task_then_resume_is_exact(tmp_path, prepared_dir):
    model = start_model(tmp_path, prepared_dir)
    settings = {**MER, "model": {"init_from": str(model)}}
    paths = {}
    for name in ("whole", "killed"):
        cfg = tiny_run_config(tmp_path / name / "run", prepared_dir, **settings)
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    whole = job(paths["whole"], model, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    # step 9 of 12: the second task's third step, one step after checkpoint-8
    killed = job(paths["killed"], model, tmp_path / "killed", "--kill-at", "9")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "hf").glob("checkpoint-*"))
    assert "checkpoint-8" in ckpts and "checkpoint-12" not in ckpts
    resumed = job(paths["killed"], model, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(tmp_path / "whole" / "final.safetensors")
    b = load_file(tmp_path / "killed" / "final.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the rows after the resume: the resumed run logged steps 8… again, after the killed ones
    got, want = read_rows(tmp_path / "killed" / "rows_rank0.jsonl"), read_rows(
        tmp_path / "whole" / "rows_rank0.jsonl")
    assert sorted(got) == sorted(want) == list(range(12))
    for step in range(8, 12):
        assert got[step] == want[step], f"step {step} after the resume"
    assert any(got[s]["replay_ids"] for s in range(8, 12))
    # ... and the uninterrupted run's rows are `cptrain train`'s
    _, rows = cptrain_train(tiny_run_config(tmp_path / "cptrain", prepared_dir, **settings))
    for step, (task, fresh, replay) in rows.rows.items():
        assert (want[step]["task"], want[step]["fresh"], want[step]["replay"]) == (
            task, digest(fresh), digest(replay)), f"step {step}"
    # the loss matrix survived the kill as well
    import json

    s1 = json.loads((tmp_path / "whole" / "run" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "killed" / "run" / "summary.json").read_text())
    assert s1["loss_matrix"] == s2["loss_matrix"] and s2["complete"]
    np.testing.assert_array_equal(s1["loss_before"]["email"], s2["loss_before"]["email"])
