"""torchrun on CPU with gloo: DDP and FSDP2 against a single process, kill-and-resume, and
the world-size check. Each rank runs one thread (two ranks ≈ one two-thread process)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import read_metrics, tiny_run_config
from safetensors.torch import load_file

from cptrain.train import train

pytestmark = pytest.mark.slow


def write_cfg(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def torchrun(cfg_path: Path, *extra: str, nproc: int = 2, wait: bool = True):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "cptrain.cli", "train", str(cfg_path),
        "--no-progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def weights(run_dir, task_idx):
    (d,) = (Path(run_dir) / "models").glob(f"after_{task_idx}_*")
    return load_file(d / "model.safetensors")


SETTINGS = dict(
    data={"tasks": ["email", "xml"], "tokens_per_task": 8 * 32 * 6},
    reptile={"enabled": True, "k": 3, "epsilon": 0.5},
    train={"threads": 1},
)


REPLAY = {**SETTINGS, "replay": {"alpha": 0.25, "visibility_lag": 1}}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single_runs(module_dir, prepared_dir):
    """One-process references (without and with replay), shared by both strategies."""
    runs = {}
    for name, settings in (("plain", SETTINGS), ("replay", REPLAY)):
        cfg = tiny_run_config(module_dir / f"single_{name}", prepared_dir, **settings)
        runs[name] = (cfg, train(cfg, progress=False))
    return runs


def audited_torchrun(cfg, cfg_path: Path, audit: Path) -> subprocess.CompletedProcess:
    """torchrun of dist_audit_train.py: `cptrain train` recording each rank's buffer writes."""
    audit.mkdir()
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(__file__).parent / "dist_audit_train.py"), "train",
         str(write_cfg(cfg, cfg_path)), "--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "AUDIT_DIR": str(audit)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ddp_replay_run(module_dir, prepared_dir):
    """Two DDP ranks with replay and Reptile, trained once: the replay test checks it against
    one process, the kill test resumes a killed copy of it to the same weights."""
    cfg = tiny_run_config(module_dir / "ddp_replay", prepared_dir, **REPLAY,
                          distributed={"strategy": "ddp"})
    proc = audited_torchrun(cfg, module_dir / "ddp_replay.yaml", module_dir / "audit_ddp")
    return cfg, proc, module_dir / "audit_ddp"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process_without_replay(single_runs, make_config, tmp_path, strategy):
    single, ref = single_runs["plain"]
    multi = make_config("multi", **SETTINGS, distributed={"strategy": strategy})
    proc = torchrun(write_cfg(multi, tmp_path / "multi.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads((Path(multi.run_dir) / "summary.json").read_text())
    # Same global batch, same windows, gradients averaged over ranks: equal up to float
    # re-association in the all-reduce (stated tolerance 1e-4 relative on losses).
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], rtol=1e-4)
    a, b = weights(single.run_dir, 1), weights(multi.run_dir, 1)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_replay_and_reptile_track_one_process(
    single_runs, ddp_replay_run, make_config, tmp_path, strategy
):
    ref = single_runs["replay"][1]
    if strategy == "ddp":
        multi, proc, audit = ddp_replay_run
    else:
        multi = make_config("multi", **REPLAY, distributed={"strategy": strategy})
        audit = tmp_path / "audit"
        proc = audited_torchrun(multi, tmp_path / "m.yaml", audit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads((Path(multi.run_dir) / "summary.json").read_text())
    # Each rank replays from its own buffer shard, so the replayed rows differ from the
    # single process's: losses agree to a statistical tolerance, not bit for bit.
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], atol=0.1)
    assert got["replay_tokens"] == ref["replay_tokens"]
    # No two ranks ever open the same buffer file for writing; each writes only its own shard.
    opened = {r: set(json.loads((audit / f"rank_{r}.json").read_text())) for r in (0, 1)}
    assert opened[0] and opened[1]
    assert not opened[0] & opened[1]
    for r in (0, 1):
        assert all(f"/replay/rank_{r}/" in p for p in opened[r]), opened[r]


def test_kill_and_resume_two_ranks_is_bit_identical(ddp_replay_run, make_config, tmp_path):
    full, proc, _ = ddp_replay_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    part = make_config(
        "part", **REPLAY, distributed={"strategy": "ddp"}, checkpoint={"every": 2, "keep_last": 5}
    )
    cfg_path = write_cfg(part, tmp_path / "part.yaml")
    proc = torchrun(cfg_path, wait=False)
    ckpts = Path(part.run_dir) / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [p for p in ckpts.glob("step_*") if (p / "MANIFEST.json").exists()]
        if any(int(p.name[5:]) >= 8 for p in done):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (Path(part.run_dir) / "summary.json").exists() or not json.loads(
        (Path(part.run_dir) / "summary.json").read_text()
    ).get("complete")

    wrong = subprocess.run(
        [sys.executable, "-m", "cptrain.cli", "train", str(cfg_path), "--resume",
         "--set", "distributed.strategy=none"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert wrong.returncode == 2
    assert "written by 2 process(es) but this run has 1" in wrong.stderr

    resumed = torchrun(cfg_path, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = weights(full.run_dir, 1), weights(part.run_dir, 1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(part.run_dir, "train")]
    assert len(steps) == len(set(steps))
