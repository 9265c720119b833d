"""The transformers `Trainer` path under `torchrun --nproc_per_node=2` (gloo, DDP): each rank
reads its contiguous slice of `cptrain train`'s fresh rows and replays from its own buffer
exactly what cptrain's buffer of that rank draws; the loss matrix is within noise of one
process (the replayed rows differ: each rank draws from what it saw); and a kill -9 of both
ranks mid-task resumes to the uninterrupted run's weights, every rank re-reading its rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_run_config

from integrations.common import MER, cptrain_train, digest, read_rows, start_model

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("hf_job.py")


def torchrun(cfg_path: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(JOB), str(cfg_path), str(model), str(out), *extra],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=900)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, prepared_dir):
    """(root, start model, settings, config) of an uninterrupted two-rank run."""
    root = tmp_path_factory.mktemp("hf_ddp")
    model = start_model(root, prepared_dir)
    settings = {**MER, "model": {"init_from": str(model)}, "train": {"threads": 1}}
    cfg = tiny_run_config(root / "ddp" / "run", prepared_dir, **settings)
    (root / "ddp.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    launch = torchrun(root / "ddp.yaml", model, root / "ddp")
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
    return root, model, settings, cfg


def test_two_ranks_read_cptrains_rows_and_track_one_process(ddp, prepared_dir):
    from cptrain.replay.buffer import ReplayBuffer
    from cptrain.replay.mixer import split_for_rank

    tmp_path, _, settings, cfg = ddp
    ref, rows = cptrain_train(tiny_run_config(tmp_path / "one", prepared_dir, **settings))
    got = {r: read_rows(tmp_path / "ddp" / f"rows_rank{r}.jsonl") for r in (0, 1)}
    # fresh rows: rank r's contiguous slice of the step's windows; replay: what a buffer of
    # rank r (cptrain's own) fed with those slices draws, by id and by content
    buffers = [ReplayBuffer(cfg.replay, tmp_path / "oracle", row_len=33, vocab_size=10**4,
                            seed=cfg.seed, run_id="o" * 32, rank=r, world_size=2)
               for r in (0, 1)]
    replayed = 0
    for step, (task, fresh, _) in sorted(rows.rows.items()):
        for r in (0, 1):
            start, count = split_for_rank(6, 2, r)
            mine = fresh[start:start + count]
            want = buffers[r].draw(step, 1, current_task=task)
            drawn = buffers[r].last_drawn(step)
            assert got[r][step]["fresh"] == digest(mine), f"rank {r} step {step}"
            assert got[r][step]["replay"] == digest(want), f"rank {r} step {step}"
            assert got[r][step]["replay_ids"] == drawn.ids.tolist()
            replayed += len(drawn.ids)
            buffers[r].add(mine, task_id=task, step=step)
    for b in buffers:
        b.close()
    summary = yaml.safe_load((tmp_path / "ddp" / "run" / "summary.json").read_text())
    # the replayed rows differ from one process's, so losses agree statistically (the bound
    # tests/e2e/test_distributed.py holds `cptrain train`'s DDP replay runs to)
    np.testing.assert_allclose(summary["loss_matrix"], ref["loss_matrix"], atol=0.1)
    np.testing.assert_allclose(summary["loss_before"]["email"], ref["loss_before"]["email"],
                               atol=1e-6)
    # the compute table's tokens: the global batch's, replayed rows summed over both ranks
    assert summary["fresh_tokens"] == ref["fresh_tokens"]
    assert summary["replay_tokens"] == replayed * 32 > 0


def test_kill_minus_9_of_both_ranks_then_resume_is_exact(ddp, prepared_dir):
    import torch
    from safetensors.torch import load_file

    root, model, settings, _ = ddp
    cfg = tiny_run_config(root / "killed" / "run", prepared_dir, **settings)
    (root / "killed.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    killed = torchrun(root / "killed.yaml", model, root / "killed", "--kill-at", "9")
    assert killed.returncode != 0 and not (root / "killed" / "final.safetensors").exists()
    resumed = torchrun(root / "killed.yaml", model, root / "killed", "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    a = load_file(root / "ddp" / "final.safetensors")
    b = load_file(root / "killed" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in (0, 1):
        got = read_rows(root / "killed" / f"rows_rank{r}.jsonl")
        want = read_rows(root / "ddp" / f"rows_rank{r}.jsonl")
        assert [got[s] for s in range(8, 12)] == [want[s] for s in range(8, 12)], f"rank {r}"
