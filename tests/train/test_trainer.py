"""The training loop end to end. Each method's uninterrupted reference run is trained once per
module and checked for many things; other tests compare against it."""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    METHOD_SETTINGS,
    model_after,
    read_metrics,
    read_summary,
    tiny_run_config,
)
from safetensors.torch import load_file

from cptrain import checkpoint as ckpt
from cptrain.errors import CheckpointError, ConfigError, DataError
from cptrain.train import Trainer, train
from cptrain.train.batches import TaskStream
from cptrain.train.hooks import Hook


def test_sequential_run_fills_loss_matrix(reference):
    cfg, summary = reference("sequential")
    lm = np.array(summary["loss_matrix"])
    assert lm.shape == (3, 3) and np.isfinite(lm).all()
    # training a task lowers its loss: below the uniform guess (ln 512 = 6.24) for the first,
    # below its value before its turn for the others
    assert lm[0, 0] < np.log(512) - 0.3
    assert all(lm[i, i] < lm[i - 1, i] for i in (1, 2))
    run = Path(cfg.run_dir)
    on_disk = read_summary(run)
    assert on_disk["loss_matrix"] == summary["loss_matrix"] and on_disk["complete"]
    assert on_disk["retained_loss"] == pytest.approx(lm[-1].mean())
    assert on_disk["rows_per_step"] == {"fresh": 8, "replay": 0}
    assert on_disk["model_shape"]["layers"] == 2 and on_disk["reptile_updates"] == 0
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == summary["steps"]
    assert len(read_metrics(run, "task_end")) == 3


def test_diagnostics_probe_earlier_tasks_without_replay(reference):
    cfg, summary = reference("sequential")
    probes = [r for r in read_metrics(cfg.run_dir) if "grad_cos" in r]
    assert probes and {r["grad_ref"] for r in probes} == {"probe"}
    assert all(r["step"] % 3 == 0 for r in probes)
    assert min(r["step"] for r in probes) > 6  # no earlier task to probe during the first
    assert summary["grad_cos_count"] == len(probes)


def test_diagnostics_use_the_replayed_rows(reference):
    cfg, summary = reference("replay")
    diag = [r for r in read_metrics(cfg.run_dir) if "grad_cos" in r]
    assert diag and all(-1.0 <= r["grad_cos"] <= 1.0 for r in diag)
    # the reference is the replayed rows of earlier tasks; a step that replayed only
    # current-task rows falls back to the probe
    assert {r["grad_ref"] for r in diag} <= {"replay", "probe"}
    assert any(r["grad_ref"] == "replay" for r in diag)
    assert all(r["grad_ref"] == "replay" or r["replay_current_share"] == 1.0 for r in diag)
    assert all(0.0 <= r["replay_current_share"] <= 1.0 for r in diag)
    assert all(r["step"] % 2 == 0 for r in diag)
    assert summary["grad_cos_count"] > 0 and -1 <= summary["grad_cos_mean"] <= 1


def test_mer_counts_its_meta_updates(reference):
    cfg, summary = reference("mer")
    assert summary["reptile_updates"] == summary["steps"] // 3
    assert summary["rows_per_step"] == {"fresh": 6, "replay": 2}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_resume_is_bit_identical(reference, make_config, method):
    ref_cfg, ref_summary = reference(method)
    # Stopped one step past its step-8 checkpoint, in the middle of the second task: the
    # resume must redo steps 9..11 exactly.
    part = make_config("part", checkpoint={"every": 4}, **METHOD_SETTINGS[method])
    stopped = Trainer(part, progress=False, stop_after=11)
    stopped.run()
    assert stopped.state.step == 11 and stopped.state.task_idx == 1
    del stopped
    resumed = train(part, resume=True, progress=False)
    for task in range(3):
        got, want = model_after(part.run_dir, task), model_after(ref_cfg.run_dir, task)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (task, name)
    assert resumed["loss_matrix"] == ref_summary["loss_matrix"]
    steps = [r["step"] for r in read_metrics(part.run_dir, "train")]
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
    # keyed by the task's name, not its place in the order
    moved = TaskStream(shard, 1, seed=3, window_len=33, name="email").indices(0, a.n)
    assert np.array_equal(moved, whole[: a.n])
    other = TaskStream(shard, 0, seed=3, window_len=33, name="other").indices(0, a.n)
    assert not np.array_equal(other, whole[: a.n])
    reseeded = TaskStream(shard, 0, seed=4, window_len=33, name="email").indices(0, a.n)
    assert not np.array_equal(reseeded, whole[: a.n])


def test_run_dir_reuse_and_resume_errors(reference, make_config, prepared_dir):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(make_config("empty"), resume=True, progress=False)
    cfg, _ = reference("sequential")
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, progress=False)
    changed = tiny_run_config(
        cfg.run_dir, prepared_dir, train={"seq_len": 16}, **METHOD_SETTINGS["sequential"]
    )
    with pytest.raises(CheckpointError, match="train.seq_len: checkpoint has 32, config has 16"):
        Trainer(changed, resume=True, progress=False)
    # --resume restores every weight from the run's checkpoint; a changed init_from changes
    # the run, so it is refused like any result-changing key.
    other = tiny_run_config(
        cfg.run_dir, prepared_dir, model={"init_from": str(Path(cfg.run_dir) / "models" /
                                          "after_0_email")}, **METHOD_SETTINGS["sequential"]
    )
    with pytest.raises(CheckpointError, match="model.init_from: checkpoint has None"):
        Trainer(other, resume=True, progress=False)
    # A refused resume leaves every checkpoint (the changed configs keep_last 2, the run 3).
    kept = ckpt.list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    assert len(kept) == cfg.checkpoint.keep_last > changed.checkpoint.keep_last


def test_checkpoint_resume_picks_newest_complete(reference, tmp_path):
    cfg, _ = reference("sequential")
    root = tmp_path / "checkpoints"
    shutil.copytree(Path(cfg.run_dir) / "checkpoints", root)
    found = ckpt.list_checkpoints(root)
    assert len(found) == cfg.checkpoint.keep_last  # pruning keeps exactly that many
    newest = found[-1][1]
    (newest / "MANIFEST.json").unlink()  # as if killed before the manifest was written
    path, skipped = ckpt.latest_complete(root)
    assert path == found[-2][1] and skipped


def test_init_from_loads_weights_only(reference, make_config):
    cfg, _ = reference("sequential")
    src = Path(cfg.run_dir) / "models" / "after_0_email"
    t = Trainer(make_config("cont", model={"init_from": str(src)}), progress=False)
    want = load_file(src / "model.safetensors")
    for name, p in t.model.state_dict().items():
        assert torch.equal(p, want[name])
    assert t.state.step == 0 and t.optimizer.state == {}


def test_bad_data_errors(make_config, prepared_dir, tmp_path):
    unprepared = make_config("x", data={"tasks": ["email", "klingon"]})
    with pytest.raises(ConfigError, match="not in"):
        Trainer(unprepared, progress=False)
    assert not Path(unprepared.run_dir).exists(), "a data error left a run directory behind"
    with pytest.raises(DataError, match="fewer than one window"):
        Trainer(make_config("y", train={"seq_len": 100_000}), progress=False)
    # the split at fault is named: here the validation split, the training one is long enough
    from cptrain.data.prepare import open_split

    val = min(open_split(prepared_dir, t, "val").num_tokens for t in ("email", "xml", "asyncio"))
    with pytest.raises(DataError, match=r"task \w+: its val split has \d+ tokens, fewer than one "
                                        r"window of \d+ \(train.seq_len \+ 1\); lower "
                                        r"train.seq_len or add validation text"):
        Trainer(make_config("v", train={"seq_len": val}), progress=False)
    with pytest.raises(DataError, match="cptrain prepare"):
        Trainer(make_config("z", data={"dir": str(tmp_path / "nowhere")}), progress=False)


def test_unwritable_run_dir(make_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        Trainer(make_config(run_name="file/run"), progress=False)


def test_joint_mixes_all_tasks_for_the_same_steps(reference, make_config):
    _, seq = reference("sequential")
    cfg = make_config("joint", method="joint")
    summary = train(cfg, progress=False)
    assert summary["steps"] == seq["steps"]
    assert np.array(summary["loss_matrix"]).shape == (3, 3)
    state = json.loads(
        (ckpt.latest_complete(Path(cfg.run_dir) / "checkpoints")[0] / "state.json").read_text()
    )
    cursors = state["sampler"]["cursors"]
    assert sum(cursors) == summary["steps"] * cfg.train.batch_size
    assert all(c > 0 for c in cursors), "every task contributes rows from the start"


def test_model_vocabulary_smaller_than_shards_is_refused(make_config, prepared_dir, tmp_path):
    from cptrain.models.build import build_model

    small = build_model("tiny", 100)
    small.save_pretrained(tmp_path / "small-vocab")
    for f in (prepared_dir / "tokenizer").iterdir():  # its tokenizer is the data's
        shutil.copy2(f, tmp_path / "small-vocab" / f.name)
    cfg = make_config("v", model={"init_from": str(tmp_path / "small-vocab")})
    with pytest.raises(DataError, match="embedding has 100 rows"):
        Trainer(cfg, progress=False)


class Recorder(Hook):
    """Counts what the loop tells its hooks."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_task_start(self, trainer, task):
        self.events.append(("task_start", task))

    def on_step_end(self, trainer, record):
        self.events.append(("step", trainer.state.step))

    def on_eval(self, trainer, losses, kind):
        self.events.append((kind, trainer.state.step))

    def on_task_end(self, trainer, task, losses):
        self.events.append(("task_end_hook", task))


def test_hooks_see_every_step_eval_and_task(make_config):
    rec = Recorder()
    cfg = make_config("hooks", data={"tasks": ["email", "xml"]}, eval={"every": 4})
    Trainer(cfg, progress=False, hooks=[rec]).run()
    steps = [v for k, v in rec.events if k == "step"]
    assert steps == list(range(1, 13))
    assert [v for k, v in rec.events if k == "task_start"] == [0, 1]
    assert [v for k, v in rec.events if k == "task_end"] == [6, 12]
    assert [v for k, v in rec.events if k == "eval"] == [4, 8]  # not at the task ends
    assert [v for k, v in rec.events if k == "before"] == [0]
    assert [v for k, v in rec.events if k == "task_end_hook"] == [0, 1]


def test_grad_accumulation_and_activation_checkpointing_match(reference, make_config):
    # The first task's weights, trained under the reference's schedule, three ways.
    cfg, _ = reference("sequential")
    want = model_after(cfg.run_dir, 0)
    accum = make_config("accum", train={"micro_batch_size": 2})
    act = make_config("act", distributed={"activation_checkpointing": True})
    for variant in (accum, act):
        Trainer(variant, progress=False, stop_after=6).run()
    got = model_after(accum.run_dir, 0)
    for k in want:
        # Adam normalises updates, so float re-association noise shows at ~1e-5
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=2e-4)
    got = model_after(act.run_dir, 0)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_and_bf16_run(make_config):
    cfg = make_config(
        "compiled",
        data={"tasks": ["email"], "tokens_per_task": 8 * 32 * 3},
        train={"compile": True, "precision": "bf16"},
    )
    summary = train(cfg, progress=False)
    assert np.isfinite(summary["loss_matrix"]).all()


def test_loss_before_is_the_starting_models_evaluation(reference, prepared_dir):
    from cptrain.evaluation.losses import evaluate_tasks
    from cptrain.models.build import build_model
    from cptrain.train.data import TrainingData

    cfg, summary = reference("sequential")
    data = TrainingData(cfg)
    model = build_model("tiny", data.vocab_size, seed=cfg.seed, max_positions=2048)
    want = evaluate_tasks(
        model, data.val_sets, window_len=data.window_len, windows=cfg.eval.windows,
        batch_size=cfg.eval.batch_size,
    )
    assert summary["loss_before"] == want
    assert read_metrics(cfg.run_dir, "before")[0]["val_loss"] == want


class BatchTaps(Hook):
    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def before_step(self, trainer, batch):
        self.rows.append(batch.fresh.copy())
        return {}


def test_eval_only_tasks_are_evaluated_but_never_trained(make_config, prepared_dir):
    from cptrain.data.prepare import open_split
    from cptrain.report.tables import run_report

    taps = BatchTaps()
    cfg = make_config("evalonly", data={"tasks": ["email", "xml"], "eval_only": ["asyncio"]})
    summary = Trainer(cfg, progress=False, hooks=[taps]).run()
    lm = np.array(summary["loss_matrix"])
    assert lm.shape == (2, 3) and summary["eval_only"] == ["asyncio"]
    assert set(summary["loss_before"]) == {"email", "xml", "asyncio"}
    final, start = lm[-1, 2], summary["loss_before"]["asyncio"]
    assert summary["eval_only_forgetting"]["asyncio"] == pytest.approx(final - start)
    # forgetting / retained / learned are over the trained tasks only
    assert summary["retained_loss"] == pytest.approx(lm[-1, :2].mean())
    # every fresh row is a window of a trained task's training split
    trained = set()
    for name in ("email", "xml"):
        shard = open_split(prepared_dir, name, "train")
        n = shard.num_windows(33)
        trained |= {r.tobytes() for r in shard.windows(np.arange(n), 33).astype(np.int64)}
    rows = np.concatenate(taps.rows).astype(np.int64)
    assert len(rows) == 12 * 8 and all(r.tobytes() in trained for r in rows)
    text = run_report(summary)
    assert "before" in text and "asyncio*" in text and "asyncio forgetting" in text


def test_eval_only_errors(make_config):
    with pytest.raises(ConfigError, match="both trained"):
        make_config("x", data={"tasks": ["email", "xml"], "eval_only": ["xml"]})
    with pytest.raises(ConfigError, match="data.eval_only: klingon not in"):
        Trainer(
            make_config("y", data={"tasks": ["email"], "eval_only": ["klingon"]}), progress=False
        )


def test_seeded_replay_draws_seed_rows_and_resumes_bit_identically(make_config):
    seed = [
        {"source": "task", "task": "asyncio", "tokens": 32 * 12},
        {"source": "self", "tokens": 32 * 8, "batch_size": 4, "prompt": {"task": "asyncio"}},
    ]
    extra = {
        "method": "replay",
        "replay": {"alpha": 0.25, "visibility_lag": 1, "seed": seed},
        "data": {"tasks": ["email", "xml"]},
    }
    full = make_config("seeded-full", **extra)
    ref = train(full, progress=False)
    assert ref["replay"]["seed_rows"] == 12 + 8
    drawn = [r.get("buffer_rows_drawn_seed", 0) for r in read_metrics(full.run_dir, "train")]
    assert drawn[0] > 0, "step 0 already replays seed rows"
    assert (Path(full.run_dir) / "replay_seed_1.txt").read_text().count("--- row") == 8
    assert not (Path(full.run_dir) / "seed_work").exists()  # generation scratch, removed
    part = make_config("seeded-part", checkpoint={"every": 4}, **extra)
    Trainer(part, progress=False, stop_after=9).run()
    resumed = train(part, resume=True, progress=False)
    got, want = model_after(part.run_dir, 1), model_after(full.run_dir, 1)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["loss_matrix"] == ref["loss_matrix"]


def test_unique_windows_repeat_a_prefix_of_the_full_order(prepared_dir):
    """unique_tokens: a limited stream starts exactly as the full one, then repeats its pool
    in a fresh order each pass."""
    from cptrain.data.prepare import open_split

    shard = open_split(prepared_dir, "email", "train")
    full = TaskStream(shard, 0, seed=3, window_len=33, name="email")
    limited = TaskStream(shard, 0, seed=3, window_len=33, name="email", unique_windows=7)
    assert limited.n == 7 < full.n
    first = full.indices(0, 7)
    got = limited.indices(0, 7 * 3)
    assert np.array_equal(got[:7], first)
    for p in range(3):
        assert sorted(got[7 * p : 7 * (p + 1)]) == sorted(first)
    assert not np.array_equal(got[7:14], first)
    # a pool at least as large as the task is no limit
    same = TaskStream(shard, 0, seed=3, window_len=33, name="email", unique_windows=full.n + 1)
    assert np.array_equal(same.indices(0, full.n * 2), full.indices(0, full.n * 2))


def test_unique_tokens_limits_the_windows_a_run_trains_on(make_config):
    from cptrain.train.trainer import Trainer

    tasks = [{"name": "email", "unique_tokens": 3 * 32}, "xml", "asyncio"]
    cfg = make_config("limited", data={"tasks": tasks})
    assert "unique_tokens" not in cfg.model_dump()["data"]["tasks"][1]
    trainer = Trainer(cfg, progress=False)
    seen = [trainer.sampler.draw(0, s)[1][0][1] for s in range(3)]
    trainer.close()
    assert len(np.unique(np.concatenate(seen))) == 3


def test_run_start_warns_of_a_rounded_alpha_and_of_a_budget_beyond_the_data(make_config,
                                                                            capsys):
    from cptrain.train.trainer import Trainer

    cfg = make_config("warned", method="replay", replay={"alpha": 0.3},
                      data={"tokens_per_task": 8 * 32 * 6, "tasks": [
                          {"name": "email", "tokens": 10_000_000}, "xml", "asyncio"]})
    trainer = Trainer(cfg, progress=False)
    trainer.close()
    alpha, passes = trainer.warnings
    assert "replays 2 of 8 rows a step (25.0%, not 30.0%)" in alpha
    assert passes.startswith("task email:") and " passes)" in passes
    n = trainer.streams[0].n
    assert f"{trainer.plan.task_steps[0] * 6:,} training windows of its {n:,}" in passes
    err = capsys.readouterr().err
    assert err.count("warning: ") == 2
    # exact share, one pass: nothing to say
    quiet = Trainer(make_config("quiet", method="replay", replay={"alpha": 0.25}),
                    progress=False)
    quiet.close()
    assert quiet.warnings == []


def test_auto_resume_restarts_an_attempt_without_checkpoint_and_resumes_one_with(
    reference, prepared_dir, tmp_path, capsys
):
    from cptrain.train import train
    from cptrain.train.trainer import Trainer

    ref_cfg, ref_summary = reference("sequential")
    cfg = ref_cfg.model_copy(update={"run_dir": str(tmp_path / "auto")})
    Trainer(cfg, progress=False, stop_after=1).run()  # killed before its first checkpoint
    with pytest.raises(CheckpointError, match="--restart"):
        Trainer(cfg, resume=True, progress=False)
    assert train(cfg, resume="auto", progress=False)["loss_matrix"] == ref_summary["loss_matrix"]
    kept = tmp_path / "auto" / "attempts" / "1"
    assert (kept / "metrics.jsonl").is_file() and not (kept / "checkpoints").exists()
    assert f"the earlier attempt of this run is kept in {kept}" in capsys.readouterr().out
    # with a complete checkpoint, auto resumes (bit-identical, no new attempt)
    cfg2 = ref_cfg.model_copy(update={"run_dir": str(tmp_path / "auto2")})
    Trainer(cfg2, progress=False, stop_after=8).run()
    assert train(cfg2, resume="auto", progress=False)["loss_matrix"] == ref_summary["loss_matrix"]
    assert "resuming from" in capsys.readouterr().out
    assert not (tmp_path / "auto2" / "attempts").exists()


def test_resume_follows_prepared_data_copied_elsewhere_but_not_other_data(
    reference, prepared_dir, tmp_path, capsys
):
    from cptrain.train import train
    from cptrain.train.trainer import Trainer

    ref_cfg, ref_summary = reference("sequential")
    cfg = ref_cfg.model_copy(update={"run_dir": str(tmp_path / "moved")})
    Trainer(cfg, progress=False, stop_after=8).run()
    copy = tmp_path / "data-copy"
    shutil.copytree(prepared_dir, copy)
    data = cfg.data.model_copy(update={"dir": str(copy)})
    moved = cfg.model_copy(update={"data": data})
    assert train(moved, resume=True, progress=False)["loss_matrix"] == ref_summary["loss_matrix"]
    assert "the prepared data moved (data.dir: " in capsys.readouterr().out
    # a copy whose shards differ is other data: refused as before
    cfg2 = ref_cfg.model_copy(update={"run_dir": str(tmp_path / "other")})
    Trainer(cfg2, progress=False, stop_after=8).run()
    shard = sorted(copy.rglob("*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    manifest = shard.parent / "manifest.json"
    m = json.loads(manifest.read_text())
    for f in m["files"]:
        if f["name"] == shard.name:
            f["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    manifest.write_text(json.dumps(m))
    other = ref_cfg.model_copy(update={"run_dir": str(tmp_path / "other"), "data": data})
    with pytest.raises(CheckpointError, match="data.dir"):
        Trainer(other, resume=True, progress=False)


def test_run_start_warns_of_a_validation_split_too_small_to_measure(prepared_dir, make_config,
                                                                    tmp_path):
    """A val split of a few windows gives losses that move with the windows, not the model."""
    from cptrain.config_base import build_config
    from cptrain.data.prepare import PrepareConfig, prepare
    from cptrain.train.trainer import Trainer

    thin = tmp_path / "thin.jsonl"
    thin.write_text(json.dumps({"text": "a short held-out note about email headers " * 12}) + "\n")
    text = prepared_dir.parent / "text"
    out = prepare(build_config(PrepareConfig, {
        "out_dir": str(tmp_path / "prepared"),
        "tokenizer": {"path": str(prepared_dir / "tokenizer")},
        "tasks": [{"name": "email", "train": [str(text / "email" / "train.jsonl")],
                   "val": [str(thin)]},
                  {"name": "xml", "train": [str(text / "xml" / "train.jsonl")],
                   "val": [str(text / "xml" / "val.jsonl")]}]}), progress=False)
    trainer = Trainer(make_config("thin", data={"dir": str(out), "tasks": ["email", "xml"]}),
                      progress=False)
    trainer.close()
    have = trainer.data.val_sets["email"].num_windows(trainer.data.window_len)
    assert 0 < have < 16 <= trainer.data.val_sets["xml"].num_windows(trainer.data.window_len)
    assert trainer.warnings == [
        f"task email: its val split holds {have} window(s) of 32 tokens "
        f"({trainer.data.val_sets['email'].num_tokens:,} tokens), fewer than eval.windows "
        f"{trainer.cfg.eval.windows}: its validation losses rest on {have}; give it more val "
        "text (or a larger val_fraction when preparing)"]
    # The union loss weighs each task by the windows its loss averages.
    w = trainer.cfg.eval.windows
    assert trainer.data.union_loss({"email": 4.0, "xml": 6.0}, w) == pytest.approx(
        (4.0 * have + 6.0 * w) / (have + w))
