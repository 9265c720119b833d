"""torchrun on CPU with gloo: DDP and FSDP2 against a single process, kill-and-resume, and
the world-size check. Each rank runs one thread (two ranks ≈ one two-thread process).

A torchrun launch costs each rank seconds of imports, so the runs that finish share one launch
(tests/dist_jobs.py trains them in turn) and the resumes share another; only the run that is
killed has a launch of its own."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import model_after, read_metrics, read_summary, tiny_run_config, with_tokenizer
from models.test_released_models import tiny_model

from cptrain.config import RunConfig
from cptrain.train import train

pytestmark = pytest.mark.slow


def write_cfg(cfg: RunConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class Launch:
    """One torchrun of tests/dist_jobs.py: its output and the jobs (by name) that finished."""

    proc: subprocess.CompletedProcess
    done: set[str]

    def check(self, name: str) -> None:
        output = self.proc.stdout + self.proc.stderr
        assert name in self.done, f"job {name!r} did not finish:\n{output}"


def launch_jobs(root: Path, jobs: dict[str, list[str]], audit: dict[str, Path]) -> Launch:
    """``cptrain`` command lines (name -> argv) in one launch; ``audit`` names the jobs whose
    replay-file writes each rank records (into the given folder)."""
    names = list(jobs)
    root.mkdir()
    spec = [
        {"argv": jobs[n], "audit": str(audit[n]) if n in audit else None} for n in names
    ]  # fmt: skip
    (root / "JOBS.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [*TORCHRUN, str(Path(__file__).parent / "dist_jobs.py"), str(root / "JOBS.json")],
        env=ONE_THREAD, capture_output=True, text=True, timeout=900,
    )
    done_file = root / "DONE.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else []
    return Launch(proc, {names[i] for i in done})


SETTINGS = dict(
    data={"tasks": ["email", "xml"], "tokens_per_task": 8 * 32 * 6},
    reptile={"enabled": True, "k": 3, "epsilon": 0.5},
    train={"threads": 1},
)
REPLAY = {**SETTINGS, "replay": {"alpha": 0.25, "visibility_lag": 1}}
# reptile.variant official: two tasks of 6 steps, k = 5 (meta-updates after steps 1, 6, 11) and
# a checkpoint every 3, so the first task's end (step 6) is written right after a meta-update,
# with a restore pending.
OFFICIAL = {
    **SETTINGS,
    "reptile": {**SETTINGS["reptile"], "k": 5, "variant": "official"},
    "checkpoint": {"every": 3, "keep_last": 10},
}

# Both anchors to the start model, with Reptile (SETTINGS): the KL's teacher is a replica per
# rank under DDP and sharded like the model under FSDP2; L2 pulls each rank's local shard.
ANCHORS = {**SETTINGS, "regularize": {"kl_to_start": {"weight": 1.0},
                                      "l2_to_start": {"weight": 30.0}}}


def tied(qwen2: Path) -> dict:
    """A tied qwen2-like model trained on two tasks of the default budget."""
    return {"data": {"tasks": ["email", "xml"]}, "train": {"threads": 1},
            "model": {"init_from": str(qwen2)}}  # fmt: skip


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def qwen2_dir(module_dir, prepared_dir) -> Path:
    tiny_model("qwen2").save_pretrained(module_dir / "qwen2")  # q/k/v biases, tied head
    return with_tokenizer(module_dir / "qwen2", prepared_dir)


def multi_configs(module_dir: Path, data: Path, qwen2: Path) -> dict[str, RunConfig]:
    """The two-rank runs that train to the end (name -> config)."""
    out = {}
    for strategy in ("ddp", "fsdp2"):
        out[f"plain-{strategy}"] = (SETTINGS, strategy)
        out[f"replay-{strategy}"] = (REPLAY, strategy)
        out[f"anchors-{strategy}"] = (ANCHORS, strategy)
    out["official-fsdp2"] = (OFFICIAL, "fsdp2")
    out["tied-fsdp2"] = (tied(qwen2), "fsdp2")
    return {
        name: tiny_run_config(module_dir / name, data, **settings,
                              distributed={"strategy": strategy})
        for name, (settings, strategy) in out.items()
    }  # fmt: skip


@pytest.fixture(scope="module")
def single_runs(module_dir, prepared_dir, qwen2_dir):
    """One-process references, name -> (config, summary)."""
    runs = {}
    for name, settings in (
        ("plain", SETTINGS), ("replay", REPLAY), ("official", OFFICIAL), ("tied", tied(qwen2_dir)),
        ("anchors", ANCHORS),
    ):  # fmt: skip
        cfg = tiny_run_config(module_dir / f"single_{name}", prepared_dir, **settings)
        runs[name] = (cfg, train(cfg, progress=False))
    return runs


@pytest.fixture(scope="module")
def multi(module_dir, prepared_dir, qwen2_dir) -> tuple[dict[str, RunConfig], Launch]:
    """Every two-rank run that trains to the end, in one launch."""
    cfgs = multi_configs(module_dir, prepared_dir, qwen2_dir)
    jobs = {
        name: ["train", str(write_cfg(cfg, module_dir / f"{name}.yaml")), "--no-progress"]
        for name, cfg in cfgs.items()
    }
    audit = {n: module_dir / f"audit_{n}" for n in jobs if n.startswith("replay-")}
    return cfgs, launch_jobs(module_dir / "multi", jobs, audit)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("setting", ["plain", "anchors"])
def test_two_ranks_match_one_process_without_replay(single_runs, multi, setting, strategy):
    single, ref = single_runs[setting]
    cfgs, launch = multi
    launch.check(f"{setting}-{strategy}")
    got = read_summary(cfgs[f"{setting}-{strategy}"].run_dir)
    # Same global batch, same windows, gradients averaged over ranks: equal up to float
    # re-association in the all-reduce (stated tolerance 1e-4 relative on losses).
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], rtol=1e-4)
    # anchors: each rank counts what its teacher ran on, the summary all ranks' (rows: all)
    assert got["teacher_tokens"] == ref["teacher_tokens"] == (
        ref["fresh_tokens"] if setting == "anchors" else 0)
    a, b = model_after(single.run_dir, 1), model_after(cfgs[f"{setting}-{strategy}"].run_dir, 1)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_replay_and_reptile_track_one_process(single_runs, multi, module_dir, strategy):
    ref = single_runs["replay"][1]
    cfgs, launch = multi
    launch.check(f"replay-{strategy}")
    got = read_summary(cfgs[f"replay-{strategy}"].run_dir)
    # Each rank replays from its own buffer shard, so the replayed rows differ from the
    # single process's: losses agree to a statistical tolerance, not bit for bit.
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], atol=0.1)
    assert got["replay_tokens"] == ref["replay_tokens"]
    # No two ranks ever open the same buffer file for writing; each writes only its own shard.
    audit = module_dir / f"audit_replay-{strategy}"
    opened = {r: set(json.loads((audit / f"rank_{r}.json").read_text())) for r in (0, 1)}
    assert opened[0] and opened[1]
    assert not opened[0] & opened[1]
    for r in (0, 1):
        assert all(f"/replay/rank_{r}/" in p for p in opened[r]), opened[r]
        own = os.path.realpath(cfgs[f"replay-{strategy}"].run_dir)
        assert all(p.startswith(own + "/") for p in opened[r]), opened[r]


def test_fsdp2_official_reptile_tracks_one_process(single_runs, multi):
    single, ref = single_runs["official"]
    cfgs, launch = multi
    launch.check("official-fsdp2")
    got = read_summary(cfgs["official-fsdp2"].run_dir)
    # Gradients are all-reduced, so equal up to float re-association.
    torch.testing.assert_close(
        torch.tensor(got["loss_matrix"]), torch.tensor(ref["loss_matrix"]), rtol=1e-4, atol=0
    )
    a, b = model_after(single.run_dir, 1), model_after(cfgs["official-fsdp2"].run_dir, 1)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_fsdp2_two_ranks_train_a_tied_qwen2_like_one_process(single_runs, multi):
    single, ref = single_runs["tied"]
    cfgs, launch = multi
    launch.check("tied-fsdp2")
    got = read_summary(cfgs["tied-fsdp2"].run_dir)
    np.testing.assert_allclose(got["loss_matrix"], ref["loss_matrix"], rtol=1e-4)
    a, b = model_after(single.run_dir, 1), model_after(cfgs["tied-fsdp2"].run_dir, 1)
    # the gathered (FSDP2) export writes the tied head out as well; it is the embedding
    assert set(b) - set(a) <= {"lm_head.weight"} and set(a) <= set(b)
    if "lm_head.weight" in b:
        assert torch.equal(b["lm_head.weight"], b["model.embed_tokens.weight"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


@dataclass
class Resumed:
    killed: RunConfig
    finished_before_kill: bool
    wrong_world: subprocess.CompletedProcess
    official: RunConfig
    official_pending: bool
    launch: Launch


@pytest.fixture(scope="module")
def resumed(multi, module_dir, prepared_dir) -> Resumed:
    """A two-rank DDP replay run killed at its step-8 checkpoint, and a copy of the finished
    FSDP2 official-Reptile run cut back to its step-6 checkpoint: both resumed in one launch."""
    cfgs, _ = multi
    killed = tiny_run_config(
        module_dir / "killed", prepared_dir, **REPLAY, distributed={"strategy": "ddp"},
        checkpoint={"every": 2, "keep_last": 5},
    )  # fmt: skip
    killed_yaml = write_cfg(killed, module_dir / "killed.yaml")
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "cptrain.cli", "train", str(killed_yaml), "--no-progress"],
        env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    ckpts = Path(killed.run_dir) / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [p for p in ckpts.glob("step_*") if (p / "MANIFEST.json").exists()]
        if any(int(p.name[5:]) >= 8 for p in done):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = (Path(killed.run_dir) / "summary.json").exists() and bool(
        read_summary(killed.run_dir).get("complete")
    )
    wrong = subprocess.run(
        [sys.executable, "-m", "cptrain.cli", "train", str(killed_yaml), "--resume",
         "--set", "distributed.strategy=none"],
        capture_output=True, text=True,
    )  # fmt: skip

    # The sharded official run, from its step-6 checkpoint (task end, right after a
    # meta-update, so a restore is pending in every rank's shard), in a copy with the later
    # steps removed.
    official = tiny_run_config(
        module_dir / "official-part", prepared_dir, **OFFICIAL, distributed={"strategy": "fsdp2"}
    )
    shutil.copytree(cfgs["official-fsdp2"].run_dir, official.run_dir, symlinks=True)
    run = Path(official.run_dir)
    (run / "summary.json").unlink()
    later = [p for p in run.glob("checkpoints/step_*") if int(p.name[5:]) > 6]
    assert len(later) == 2  # steps 9 and 12
    for path in [*later, *run.glob("models/after_1_*")]:
        shutil.rmtree(path)
    (step6,) = [p for p in run.glob("checkpoints/step_*") if int(p.name[5:]) == 6]
    pending = json.loads((step6 / "state.json").read_text())["reptile"]["pending_restore"]

    jobs = {
        "killed": ["train", str(killed_yaml), "--no-progress", "--resume"],
        "official": ["train", str(write_cfg(official, module_dir / "official-part.yaml")),
                     "--no-progress", "--resume"],
    }  # fmt: skip
    launch = launch_jobs(module_dir / "resume", jobs, {})
    return Resumed(killed, finished, wrong, official, pending is True, launch)


def test_kill_and_resume_two_ranks_is_bit_identical(multi, resumed):
    cfgs, launch = multi
    launch.check("replay-ddp")
    assert not resumed.finished_before_kill
    assert resumed.wrong_world.returncode == 2
    assert "written by 2 process(es) but this run has 1" in resumed.wrong_world.stderr
    resumed.launch.check("killed")
    a, b = model_after(cfgs["replay-ddp"].run_dir, 1), model_after(resumed.killed.run_dir, 1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(resumed.killed.run_dir, "train")]
    assert len(steps) == len(set(steps))


def test_fsdp2_official_reptile_resumes_bit_identically(multi, resumed):
    cfgs, launch = multi
    launch.check("official-fsdp2")
    assert resumed.official_pending
    resumed.launch.check("official")
    a, b = model_after(cfgs["official-fsdp2"].run_dir, 1), model_after(resumed.official.run_dir, 1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
