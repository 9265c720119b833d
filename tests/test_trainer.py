import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cptrain import checkpoint as ckpt
from cptrain.errors import CheckpointError, ConfigError, DataError
from cptrain.trainer import TaskStream, Trainer, train


def final_weights(run_dir):
    (model_dir,) = sorted((run_dir / "models").glob("after_2_*"))
    return load_file(model_dir / "model.safetensors")


def test_sequential_run_fills_loss_matrix(make_config):
    cfg = make_config()
    summary = train(cfg, progress=False)
    lm = np.array(summary["loss_matrix"])
    assert lm.shape == (3, 3) and np.isfinite(lm).all()
    # training a task lowers its loss: below the uniform guess (ln 512 = 6.24) for the first,
    # below its value before its turn for the others
    assert lm[0, 0] < np.log(512) - 0.3
    assert all(lm[i, i] < lm[i - 1, i] for i in (1, 2))
    run = cfg.run_dir
    on_disk = json.loads((tmp := Path(run) / "summary.json").read_text())
    assert on_disk["loss_matrix"] == summary["loss_matrix"] and on_disk["complete"]
    assert on_disk["retained_loss"] == pytest.approx(lm[-1].mean())
    records = [json.loads(x) for x in (tmp.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == summary["steps"]
    assert sum(r["type"] == "task_end" for r in records) == 3


METHOD_SETTINGS = {
    "sequential": {},
    "replay": {"replay": {"alpha": 0.25, "visibility_lag": 1}},
    "mer": {"replay": {"alpha": 0.25, "visibility_lag": 1}, "reptile": {"k": 3, "epsilon": 0.5}},
}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_same_seed_same_result_and_resume_is_bit_identical(make_config, method):
    extra = {"method": method, **METHOD_SETTINGS[method]}
    full = make_config("full", **extra)
    train(full, progress=False)
    ref = final_weights(Path(full.run_dir))

    # interrupted run: stop after task 1 plus a mid-task checkpoint, then resume
    part = make_config("part", checkpoint={"every": 4}, **extra)
    t = Trainer(part, progress=False)
    # drive the loop by hand to stop in the middle of the second task
    t._last_log_t = t._wall_mark = 0.0
    while t.state.step < t.task_steps[0] + 4:
        task = t.state.task_idx
        t.step_once(task)
        if t.state.task_step == t.task_steps[task]:
            t._finish_task(task)
        elif t.state.step % 4 == 0:
            t.save()
    t.step_once(t.state.task_idx)  # one step past the checkpoint: must be redone after resume
    t.close()
    del t

    resumed = train(part, resume=True, progress=False)
    got = final_weights(Path(part.run_dir))
    assert set(got) == set(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    full_summary = json.loads((Path(full.run_dir) / "summary.json").read_text())
    assert resumed["loss_matrix"] == full_summary["loss_matrix"]
    lines = (Path(part.run_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["type"] == "train"]
    assert len(steps) == len(set(steps)), "a step was logged twice after resume"


def test_task_stream_is_a_pure_function_of_position(prepared_dir):
    from cptrain.data.prepare import open_split

    shard = open_split(prepared_dir, "email", "train")
    a = TaskStream(shard, 0, seed=3, window_len=33, name="email")
    b = TaskStream(shard, 0, seed=3, window_len=33, name="email")
    whole = a.indices(0, a.n * 2 + 5)
    assert np.array_equal(whole[17:40], b.indices(17, 23))
    # each epoch is a permutation of all windows
    assert sorted(whole[: a.n]) == list(range(a.n))
    other = TaskStream(shard, 1, seed=3, window_len=33, name="email").indices(0, a.n)
    assert not np.array_equal(other, whole[: a.n])


def test_run_dir_reuse_and_resume_errors(make_config):
    cfg = make_config("r")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(cfg, resume=True, progress=False)
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, progress=False)
    changed = make_config("r", train={"seq_len": 16})
    with pytest.raises(CheckpointError, match="train.seq_len: checkpoint has 32, config has 16"):
        Trainer(changed, resume=True, progress=False)
    with pytest.raises(ConfigError, match="cannot be combined"):
        Trainer(make_config("r", model={"init_from": cfg.run_dir}), resume=True, progress=False)


def test_init_from_loads_weights_only(make_config):
    first = make_config("first")
    train(first, progress=False)
    src = Path(first.run_dir) / "models" / "after_0_email"
    cont = make_config("cont", model={"init_from": str(src)})
    t = Trainer(cont, progress=False)
    want = load_file(src / "model.safetensors")
    for name, p in t.model.state_dict().items():
        assert torch.equal(p, want[name])
    assert t.state.step == 0 and t.optimizer.state == {}


def test_bad_data_errors(make_config, tmp_path):
    with pytest.raises(ConfigError, match="not in"):
        Trainer(make_config("x", data={"tasks": ["email", "klingon"]}), progress=False)
    with pytest.raises(DataError, match="fewer than one window"):
        Trainer(make_config("y", train={"seq_len": 100_000}), progress=False)
    with pytest.raises(DataError, match="cptrain prepare"):
        Trainer(make_config("z", data={"dir": str(tmp_path / "nowhere")}), progress=False)


def test_unwritable_run_dir(make_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        Trainer(make_config(run_name="file/run"), progress=False)


def test_checkpoint_resume_picks_newest_complete(make_config):
    cfg = make_config("ck", checkpoint={"every": 2, "keep_last": 3})
    train(cfg, progress=False)
    root = Path(cfg.run_dir) / "checkpoints"
    found = ckpt.list_checkpoints(root)
    assert 1 <= len(found) <= 3
    newest = found[-1][1]
    (newest / "MANIFEST.json").unlink()  # as if killed before the manifest was written
    path, skipped = ckpt.latest_complete(root)
    assert path == found[-2][1] and skipped


def test_alignment_diagnostics_are_logged_and_change_nothing(make_config):
    quiet = make_config("quiet", method="replay", replay={"alpha": 0.25, "visibility_lag": 0})
    train(quiet, progress=False)
    loud = make_config(
        "loud",
        method="replay",
        replay={"alpha": 0.25, "visibility_lag": 0},
        reptile={"diagnostics_every": 2},
    )
    summary = train(loud, progress=False)
    a, b = final_weights(Path(quiet.run_dir)), final_weights(Path(loud.run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in (Path(loud.run_dir) / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in recs if "grad_cos" in r]
    assert diag and all(-1.0 <= r["grad_cos"] <= 1.0 and r["grad_ref"] == "replay" for r in diag)
    assert all(r["step"] % 2 == 0 for r in diag)
    assert summary["grad_cos_count"] > 0 and -1 <= summary["grad_cos_mean"] <= 1

    seq = make_config("seq", method="sequential", reptile={"diagnostics_every": 3})
    train(seq, progress=False)
    recs = [json.loads(x) for x in (Path(seq.run_dir) / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in recs if "grad_cos" in r]
    assert probes and {r["grad_ref"] for r in probes} == {"probe"}
    assert min(r["step"] for r in probes) > 6  # no earlier task to probe during the first


def test_joint_mixes_all_tasks_for_the_same_steps(make_config):
    seq = Trainer(make_config("seq"), progress=False)
    cfg = make_config("joint", method="joint")
    summary = train(cfg, progress=False)
    assert summary["steps"] == seq.total_steps
    assert np.array(summary["loss_matrix"]).shape == (3, 3)
    state = json.loads(
        (ckpt.latest_complete(Path(cfg.run_dir) / "checkpoints")[0] / "state.json").read_text()
    )
    cursors = state["trainer"]["cursors"]
    assert sum(cursors) == summary["steps"] * cfg.train.batch_size
    assert all(c > 0 for c in cursors), "every task contributes rows from the start"


def test_model_vocabulary_smaller_than_shards_is_refused(make_config, tmp_path):
    from cptrain.model import build_model

    small = build_model("tiny", 100)
    small.save_pretrained(tmp_path / "small-vocab")
    cfg = make_config("v", model={"init_from": str(tmp_path / "small-vocab")})
    with pytest.raises(DataError, match="embedding has 100 rows"):
        Trainer(cfg, progress=False)


@pytest.mark.slow
def test_compile_and_bf16_run(make_config):
    cfg = make_config(
        "compiled",
        data={"tasks": ["email"], "tokens_per_task": 8 * 32 * 3},
        train={"compile": True, "precision": "bf16"},
    )
    summary = train(cfg, progress=False)
    assert np.isfinite(summary["loss_matrix"]).all()


def test_grad_accumulation_matches_full_batch(make_config):
    whole = make_config("whole", data={"tasks": ["email"]})
    accum = make_config("accum", data={"tasks": ["email"]}, train={"micro_batch_size": 2})
    train(whole, progress=False)
    train(accum, progress=False)
    a = load_file(next((Path(whole.run_dir) / "models").glob("after_0_*")) / "model.safetensors")
    b = load_file(next((Path(accum.run_dir) / "models").glob("after_0_*")) / "model.safetensors")
    for k in a:
        # Adam normalises updates, so float re-association noise shows at ~1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)


def test_activation_checkpointing_gives_the_same_weights(make_config):
    short = {"tasks": ["email"], "tokens_per_task": 8 * 32 * 3}
    plain = make_config("plain", data=short)
    ckpt_act = make_config("act", data=short, distributed={"activation_checkpointing": True})
    train(plain, progress=False)
    train(ckpt_act, progress=False)
    a = load_file(next((Path(plain.run_dir) / "models").glob("after_0_*")) / "model.safetensors")
    b = load_file(next((Path(ckpt_act.run_dir) / "models").glob("after_0_*")) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
