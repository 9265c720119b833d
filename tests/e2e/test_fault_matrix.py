"""Fault matrix: one test per planted fault. Each is caught with a one-line error of the right
type (exit 2 at the CLI), or skipped in favour of an older complete checkpoint that then resumes
bit-identically to the run that never saw the fault.

Covered elsewhere, not repeated here: replay-buffer faults at the buffer level (torn, truncated,
bit-flipped chunks and snapshots, lost manifests, ENOSPC while appending: test_replay_faults.py),
shard truncation and missing files at the ShardSet level (test_shards.py), tokenizer/shard
mismatch in open_split (test_prepare.py), a model vocabulary smaller than the shards' with
init_from and seq_len refused on resume (test_trainer.py), kills at any moment
(test_kill_anywhere.py).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import resource
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import flip, read_metrics, read_summary, tiny_run_config
from safetensors.torch import load_file

from cptrain import checkpoint as ckpt
from cptrain import cli, fsutil
from cptrain.checkpoint import local
from cptrain.config import RunConfig
from cptrain.config_base import build_config
from cptrain.data.prepare import PrepareConfig, prepare
from cptrain.errors import CheckpointError, EnvironmentProblem
from cptrain.models.build import build_model
from cptrain.train import train

TASKS = ["email", "xml", "asyncio"]
LAST, PREVIOUS = "step_000000018", "step_000000016"
FINAL_MODEL = Path("models") / "after_2_asyncio" / "model.safetensors"


# ----------------------------------------------------------------------------- the world
@dataclass
class World:
    """One finished MER run (checkpoints at 14, 16, 18) on a private copy of the data, plus
    pristine copies of both that every test starts from."""

    run: Path
    data: Path
    pristine_run: Path
    pristine_data: Path
    source_data: Path
    ref_weights: dict[str, torch.Tensor]
    ref_summary: dict[str, Any]
    ref_train_steps: list[int]

    @property
    def config(self) -> Path:
        return self.run / "config.yaml"

    def restore(self) -> None:
        for live, saved in ((self.run, self.pristine_run), (self.data, self.pristine_data)):
            shutil.rmtree(live, ignore_errors=True)
            shutil.copytree(saved, live)


def run_config(run: Path, data: Path, **extra: Any) -> RunConfig:
    return tiny_run_config(
        run,
        data,
        **{
            "method": "mer",
            "checkpoint": {"every": 2, "keep_last": 3},
            "replay": {"alpha": 0.25, "visibility_lag": 1},
            "reptile": {"k": 3, "epsilon": 0.5},
            **extra,
        },
    )


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run, "train")]


@pytest.fixture(scope="module")
def world_once(prepared_dir, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    shutil.copytree(prepared_dir, data)
    run = root / "run"
    train(run_config(run, data), progress=False)
    shutil.copytree(run, root / "pristine_run")
    shutil.copytree(data, root / "pristine_data")
    return World(
        run=run,
        data=data,
        pristine_run=root / "pristine_run",
        pristine_data=root / "pristine_data",
        source_data=prepared_dir,
        ref_weights=load_file(run / FINAL_MODEL),
        ref_summary=read_summary(run),
        ref_train_steps=train_steps(run),
    )


@pytest.fixture
def world(world_once: World) -> World:
    world_once.restore()
    return world_once


@pytest.fixture(scope="module")
def other_prepared(prepared_dir, tmp_path_factory) -> Path:
    """The same text prepared with a larger (hence different) tokenizer: vocabulary 640."""
    text = prepared_dir.parent / "text"
    tasks = [
        {"name": n, "train": [str(text / n / "train.jsonl")], "val": [str(text / n / "val.jsonl")]}
        for n in TASKS
    ]
    out = tmp_path_factory.mktemp("other") / "prepared"
    cfg = build_config(
        PrepareConfig, {"out_dir": str(out), "tokenizer": {"vocab_size": 640}, "tasks": tasks}
    )
    return prepare(cfg, progress=False)


# ------------------------------------------------------------------------------ helpers


def chop(path: Path, nbytes: int = 100) -> None:
    os.truncate(path, path.stat().st_size - nbytes)


def cptrain(*args: str) -> int:
    return cli.main(["train", *args, "--no-progress"])


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, f"rc {rc}, stderr:\n{err}"
    assert lines[0].startswith("cptrain: error: ") and "Traceback" not in err
    return lines[0]


def assert_resumed_like_the_reference(world: World) -> None:
    got = load_file(world.run / FINAL_MODEL)
    differ = [k for k in world.ref_weights if not torch.equal(got[k], world.ref_weights[k])]
    assert set(got) == set(world.ref_weights) and not differ, f"weights differ: {differ}"
    summary = read_summary(world.run)
    assert summary["loss_matrix"] == world.ref_summary["loss_matrix"] and summary["complete"]
    assert train_steps(world.run) == world.ref_train_steps, "missing or repeated train steps"


# ------------------------------------------------------- damaged checkpoint → fall back
CHECKPOINT_FAULTS = {
    "model weights truncated": (
        lambda d: chop(d / "model" / "model.safetensors"),
        "model/model.safetensors has",
    ),
    "model weights bit-flipped": (
        lambda d: flip(d / "model" / "model.safetensors"),
        "model/model.safetensors fails its sha256 check",
    ),
    "optimizer state truncated": (
        lambda d: chop(d / ckpt.OPTIMIZER_FILE),
        f"{ckpt.OPTIMIZER_FILE} has",
    ),
    "optimizer state bit-flipped": (
        lambda d: flip(d / ckpt.OPTIMIZER_FILE),
        f"{ckpt.OPTIMIZER_FILE} fails its sha256 check",
    ),
    "reptile anchor bit-flipped": (
        lambda d: flip(d / "tensors" / "reptile.safetensors"),
        "tensors/reptile.safetensors fails its sha256 check",
    ),
    "state.json bit-flipped": (
        lambda d: flip(d / "state.json", mask=0x01),
        "state.json fails its sha256 check",
    ),
    "file missing": (
        lambda d: (d / ckpt.OPTIMIZER_FILE).unlink(),
        f"missing file {ckpt.OPTIMIZER_FILE}",
    ),
    "manifest missing": (
        lambda d: (d / "MANIFEST.json").unlink(),
        "no MANIFEST.json (incomplete write)",
    ),
    "manifest garbled": (
        lambda d: (d / "MANIFEST.json").write_text('{"files": '),
        "MANIFEST.json is damaged",
    ),
}


@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_damaged_newest_checkpoint_falls_back_and_resumes_bit_identically(world, capsys, fault):
    plant, reason = CHECKPOINT_FAULTS[fault]
    plant(world.run / "checkpoints" / LAST)
    shutil.rmtree(world.run / "models" / "after_2_asyncio")  # must be made again
    (world.run / "summary.json").unlink()

    assert cptrain(str(world.config), "--resume") == 0
    out = capsys.readouterr().out
    assert f"skipping damaged or incomplete checkpoint {LAST}: {reason}" in out
    assert re.search(rf"resuming from \S+/{PREVIOUS} \(step 16 of 18\)", out), out
    assert_resumed_like_the_reference(world)


def test_no_complete_checkpoint_is_a_one_line_error(world, capsys):
    for _, path in ckpt.list_checkpoints(world.run / "checkpoints"):
        flip(path / "model" / "model.safetensors")
    line = one_line_error(capsys, cptrain(str(world.config), "--resume"))
    assert "no complete checkpoint under" in line and "with --restart" in line


# ------------------------------------------------------------------------- disk full
def enospc(*_: Any) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def enospc_in_checkpoints(fd: int, data: Any) -> int:
    """A disk that is full for checkpoint files only (the replay buffer still appends)."""
    if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
        enospc()
    return os.write(fd, data)


def keep_only_step_14(world: World) -> None:
    for name in (LAST, PREVIOUS):
        shutil.rmtree(world.run / "checkpoints" / name)


def test_disk_full_while_checkpointing(world, capsys, monkeypatch):
    keep_only_step_14(world)
    monkeypatch.setattr(fsutil, "_write", enospc_in_checkpoints)
    line = one_line_error(capsys, cptrain(str(world.config), "--resume"))
    assert f"disk full while writing checkpoint {world.run / 'checkpoints' / PREVIOUS}" in line
    assert "No space left on device" in line and "step_000000014, is intact" in line
    assert not ckpt.leftovers(world.run / "checkpoints"), "half-written checkpoint left behind"
    monkeypatch.undo()
    assert cptrain(str(world.config), "--resume") == 0
    assert_resumed_like_the_reference(world)


def test_file_size_limit_hit_inside_the_safetensors_writer(world, capsys):
    """A real EFBIG from the Rust writer of save_pretrained, not a simulated one."""
    keep_only_step_14(world)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # model.safetensors is ~2 MB
    try:
        rc = cptrain(str(world.config), "--resume")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    line = one_line_error(capsys, rc)
    assert "disk full while writing checkpoint" in line and "File too large" in line
    assert ckpt.verify(world.run / "checkpoints" / "step_000000014") is None


def test_disk_full_while_exporting_the_task_model(world, capsys):
    shutil.rmtree(world.run / "checkpoints" / LAST)  # resume from 16: the task-end export is next
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        rc = cptrain(str(world.config), "--resume")  # from 16: the task-end export comes first
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert "disk full" in one_line_error(capsys, rc)


def test_disk_full_while_appending_to_the_buffer(world, capsys, monkeypatch):
    real_write = fsutil._write

    def full_for_chunks(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".rows"):
            return enospc()
        return real_write(fd, data)

    shutil.rmtree(world.run / "checkpoints" / LAST)  # so that steps 17 and 18 append rows
    monkeypatch.setattr(fsutil, "_write", full_for_chunks)
    line = one_line_error(capsys, cptrain(str(world.config), "--resume"))
    chunk = world.run / "replay" / "rank_0" / "chunk_000000.rows"
    assert f"disk full while writing {chunk}" in line and "No space left" in line
    monkeypatch.undo()
    assert cptrain(str(world.config), "--resume") == 0
    assert_resumed_like_the_reference(world)


# -------------------------------------------------------------- damaged or mismatched data
def shard(world: World, task: str = "email", split: str = "train") -> Path:
    return world.data / task / split / "shard_00000.bin"


def swap_tokenizer(world: World, other: Path) -> None:
    shutil.rmtree(world.data / "tokenizer")
    shutil.copytree(other / "tokenizer", world.data / "tokenizer")


def swap_shards(world: World, other: Path) -> None:
    shutil.rmtree(world.data / "xml" / "train")
    shutil.copytree(other / "xml" / "train", world.data / "xml" / "train")


def swap_everything(world: World, other: Path) -> None:
    shutil.rmtree(world.data)
    shutil.copytree(other, world.data)


DATA_FAULTS = [
    pytest.param(
        lambda w, o: chop(shard(w), 10),
        ["shard file", "email/train/shard_00000.bin", "is truncated", "re-run `cptrain prepare`"],
        id="shard truncated",
    ),
    pytest.param(
        lambda w, o: (shard(w).parent / "manifest.json").unlink(),
        ["email/train has no manifest.json", "re-run `cptrain prepare`"],
        id="shard manifest missing",
    ),
    pytest.param(
        lambda w, o: swap_shards(w, o),
        ["xml/train was tokenized with tokenizer", "re-run `cptrain prepare`"],
        id="shards of another tokenizer",
    ),
    pytest.param(
        lambda w, o: flip(shard(w), 2 * 1000, mask=0x01),  # id stays inside the vocabulary
        ["email/train/shard_00000.bin", "sha256"],
        id="shard bit-flipped",
    ),
    pytest.param(
        lambda w, o: swap_tokenizer(w, o),
        ["tokenizer", "re-run `cptrain prepare`"],
        id="tokenizer does not match the shards",
    ),
    pytest.param(
        lambda w, o: swap_everything(w, o),
        ["512", "640"],
        id="vocabulary larger than the checkpoint's embedding",
    ),
    pytest.param(
        lambda w, o: flip(w.run / "replay" / "rank_0" / "chunk_000000.rows", 100),
        ["replay chunk file", "chunk_000000.rows fails its checksum"],
        id="buffer chunk bit-flipped",
    ),
    pytest.param(
        lambda w, o: chop(w.run / "replay" / "rank_0" / "chunk_000000.meta", 16 * 5),
        ["replay chunk file", "chunk_000000.meta is truncated"],
        id="buffer chunk truncated",
    ),
    pytest.param(
        lambda w, o: (w.run / "replay" / "rank_0" / "manifest.json").unlink(),
        ["replay", "manifest.json"],
        id="buffer manifest missing",
    ),
]


@pytest.mark.parametrize(("plant", "fragments"), DATA_FAULTS)
def test_damaged_or_mismatched_data_is_a_one_line_error(
    world, other_prepared, capsys, plant, fragments
):
    plant(world, other_prepared)
    line = one_line_error(capsys, cptrain(str(world.config), "--resume"))
    for fragment in fragments:
        assert fragment in line, line


# ----------------------------------------------------------- config changed on resume
CHANGES = {
    "train.seq_len=16": "train.seq_len: checkpoint has 32, config has 16",
    "replay.alpha=0.5": "replay.alpha: checkpoint has 0.25, config has 0.5",
    "data.tasks=[email,asyncio,xml]": r"data.tasks: checkpoint has \[.*'email'.*'xml'.*"
    r"'asyncio'.*\], config has \[.*'email'.*'asyncio'.*'xml'.*\]",
    "seed=1": "seed: checkpoint has 0, config has 1",
    "reptile.epsilon=0.1": "reptile.epsilon: checkpoint has 0.5, config has 0.1",
    "data.tokens_per_task=999": "data.tokens_per_task: checkpoint has 1536, config has 999",
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_result_changing_config_is_refused_naming_both_values(world, capsys, change):
    line = one_line_error(capsys, cptrain(str(world.config), "--resume", "--set", change))
    assert re.search(CHANGES[change], line), line
    assert "--allow-config-change" in line


@pytest.mark.parametrize("change", ["replay.alpha=0.5", "data.tasks=[email,asyncio,xml]"])
def test_changed_config_is_accepted_with_the_override(world, capsys, change):
    shutil.rmtree(world.run / "checkpoints" / LAST)  # so that the changed config trains
    rc = cptrain(str(world.config), "--resume", "--allow-config-change", "--set", change)
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search("warning: resuming with a changed config: " + CHANGES[change], out), out
    assert read_summary(world.run)["complete"]


def test_override_cannot_reuse_a_buffer_of_another_seq_len(world, capsys):
    rc = cptrain(str(world.config), "--resume", "--allow-config-change", "--set",
                 "train.seq_len=16")
    line = one_line_error(capsys, rc)
    assert "buffer rows hold 33 tokens" in line and "17" in line


def test_checkpoint_of_another_world_size_is_refused(world, capsys):
    """As if written by two torchrun ranks (the torchrun path: test_distributed.py)."""
    path = world.run / "checkpoints" / LAST
    state = json.loads((path / "state.json").read_text())
    state["world_size"] = 2
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = {
        "bytes": (path / "state.json").stat().st_size,
        "sha256": fsutil.sha256_file(path / "state.json"),
    }
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    line = one_line_error(capsys, cptrain(str(world.config), "--resume"))
    assert f"checkpoint {LAST} was written by 2 process(es) but this run has 1" in line


def test_a_moved_run_directory_resumes(world, capsys):
    moved = world.run.with_name("moved")
    shutil.rmtree(moved, ignore_errors=True)
    shutil.copytree(world.run, moved)
    shutil.rmtree(moved / "checkpoints" / LAST)
    cfg = moved / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(world.run), str(moved)))
    assert cptrain(str(cfg), "--resume") == 0, capsys.readouterr().err


# --------------------------------------------------- checkpoint module: pruning and safety
@pytest.fixture(scope="module")
def small_model():
    model = build_model("tiny", 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(input_ids=torch.arange(16).reshape(2, 8)).logits.sum().backward()
    opt.step()
    return model, opt


def save(root: Path, step: int, small_model, keep_last: int = 10) -> Path:
    model, opt = small_model
    return local.save_checkpoint(
        root, step, model=model, tokenizer_dir=None, optimizer=opt,
        state={"trainer": {"step": step}}, tensors={"extra": {"x": torch.ones(3)}},
        keep_last=keep_last,
    )


def names(root: Path) -> list[str]:
    return [p.name for _, p in ckpt.list_checkpoints(root)]


def test_newest_is_chosen_by_step_number_not_name(tmp_path, small_model):
    for step, name in ((9, "step_9"), (10, "step_10")):
        path = save(tmp_path / str(step), step, small_model)
        shutil.move(path, tmp_path / name)
    # "step_10" < "step_9" as strings; the manifest's step must match the name's
    for name in ("step_9", "step_10"):
        shutil.rmtree(tmp_path / name.removeprefix("step_"))
    path, skipped = ckpt.latest_complete(tmp_path)
    assert path == tmp_path / "step_10" and skipped == []
    shutil.move(tmp_path / "step_9", tmp_path / "step_11")  # claims 11, manifest says 9
    path, skipped = ckpt.latest_complete(tmp_path)
    assert path == tmp_path / "step_10"
    assert skipped == ["step_11: MANIFEST.json is for step 9, not 11"]


def test_pruning_never_counts_a_damaged_checkpoint_as_kept(tmp_path, small_model):
    save(tmp_path, 10, small_model)
    save(tmp_path, 12, small_model)
    chop(tmp_path / "step_000000012" / ckpt.OPTIMIZER_FILE)  # damaged after it was written
    save(tmp_path, 14, small_model, keep_last=2)
    # two good ones kept (10 and 14); the damaged 12 stays for `cptrain doctor` to report
    assert names(tmp_path) == ["step_000000010", "step_000000012", "step_000000014"]
    save(tmp_path, 16, small_model, keep_last=1)
    assert names(tmp_path) == ["step_000000012", "step_000000016"]
    path, skipped = ckpt.latest_complete(tmp_path)
    assert path == tmp_path / "step_000000016"


def test_pruning_keeps_the_only_good_checkpoint(tmp_path, small_model):
    save(tmp_path, 10, small_model)
    save(tmp_path, 12, small_model)
    flip(tmp_path / "step_000000012" / "state.json", 5, mask=0x01)  # sizes still match
    ckpt.prune(tmp_path, keep_last=1)
    assert names(tmp_path) == ["step_000000010", "step_000000012"]
    assert ckpt.latest_complete(tmp_path)[0] == tmp_path / "step_000000010"


def test_a_kill_between_the_two_renames_of_a_resave_is_repaired(tmp_path, small_model):
    path = save(tmp_path, 4, small_model)
    os.replace(path, tmp_path / ".old-step_000000004-999")  # old copy moved aside, then killed
    assert ckpt.interrupted_resaves(tmp_path) == [(4, tmp_path / ".old-step_000000004-999")]
    found, _ = ckpt.latest_complete(tmp_path)
    assert found == path and ckpt.verify(path) is None and not ckpt.leftovers(tmp_path)


def test_saving_the_same_step_again_replaces_it_whole(tmp_path, small_model):
    save(tmp_path, 4, small_model)
    chop(tmp_path / "step_000000004" / ckpt.OPTIMIZER_FILE)
    save(tmp_path, 4, small_model)
    assert ckpt.verify(tmp_path / "step_000000004") is None and not ckpt.leftovers(tmp_path)


def test_disk_full_leaves_older_checkpoints_and_no_litter(tmp_path, small_model, monkeypatch):
    save(tmp_path, 2, small_model)
    monkeypatch.setattr(fsutil, "_write", enospc)
    with pytest.raises(EnvironmentProblem) as err:
        save(tmp_path, 4, small_model)
    msg = str(err.value)
    assert "\n" not in msg and "step_000000004" in msg and "step_000000002, is intact" in msg
    assert names(tmp_path) == ["step_000000002"] and not ckpt.leftovers(tmp_path)


def test_nothing_in_a_checkpoint_is_pickled(tmp_path, small_model):
    model, opt = small_model
    path = save(tmp_path, 3, small_model)
    for f in path.rglob("*"):
        if f.is_file():
            assert f.suffix in {".json", ".safetensors", ".txt", ".jinja"}, f
    blob = ckpt.load_checkpoint(path).optimizer_blob()
    want = opt.state_dict()
    assert blob["optimizer"]["param_groups"] == want["param_groups"]
    for pid, per_param in want["state"].items():
        for key, value in per_param.items():
            assert torch.equal(blob["optimizer"]["state"][pid][key], value)


def test_optimizer_state_round_trips_without_pickle_even_with_tensor_hyperparameters():
    model = build_model("tiny", 64)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), foreach=False)
    model(input_ids=torch.arange(16).reshape(2, 8)).logits.sum().backward()
    opt.step()
    data = ckpt.pack_optimizer(opt.state_dict(), torch.get_rng_state())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    blob = ckpt.unpack_optimizer(data, header["__metadata__"]["cptrain"])
    again = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.0), foreach=False)
    again.load_state_dict(blob["optimizer"])
    want, got = opt.state_dict(), again.state_dict()
    assert torch.equal(got["param_groups"][0]["lr"], want["param_groups"][0]["lr"])
    assert got["param_groups"][0]["betas"] == want["param_groups"][0]["betas"]
    assert all(torch.equal(got["state"][0][k], v) for k, v in want["state"][0].items())
    assert torch.equal(blob["rng_cpu"], torch.get_rng_state())


class _Payload:
    """Pickles to a call of os.system: what a booby-trapped checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_legacy_pickle_optimizer_file_is_never_executed(tmp_path, small_model):
    path = save(tmp_path / "run", 3, small_model)
    marker = tmp_path / "pwned"
    (path / ckpt.OPTIMIZER_FILE).unlink()
    torch.save({"optimizer": _Payload(marker)}, path / ckpt.LEGACY_OPTIMIZER_FILE,
               pickle_module=pickle)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    del manifest["files"][ckpt.OPTIMIZER_FILE]
    f = path / ckpt.LEGACY_OPTIMIZER_FILE
    manifest["files"][ckpt.LEGACY_OPTIMIZER_FILE] = {
        "bytes": f.stat().st_size, "sha256": fsutil.sha256_file(f)
    }
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(path).optimizer_blob()
    assert "unreadable (UnpicklingError)" in str(err.value)
    assert not marker.exists()


def test_a_built_directory_replaces_the_old_one_or_leaves_it_untouched(tmp_path):
    import errno

    from cptrain import fsutil
    from cptrain.errors import EnvironmentProblem

    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    with (pytest.raises(EnvironmentProblem) as err,
          fsutil.built_dir(out, what=f"exporting {out}", fix="free space") as tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == (f"disk full while exporting {out} (No space left on device); "
                              "free space")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    # any other error: cleaned up and passed on as it was
    with pytest.raises(ValueError), fsutil.built_dir(out, what="x", fix="y") as tmp:
        tmp.mkdir()
        raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / ".model.tmp-1-dead").mkdir()  # what a build killed mid-way leaves behind
    with fsutil.built_dir(out, what="x", fix="y") as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
