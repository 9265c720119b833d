"""`cptrain doctor RUN`: what it finds intact or damaged, that it changes nothing, and that the
command it prints really resumes the run (and the trainer agrees with its verdict)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import flip, tiny_run_config

from cptrain import checkpoint as ckpt
from cptrain import cli
from cptrain.doctor import diagnose, main_doctor
from cptrain.errors import ConfigError
from cptrain.train import train

LAST, PREVIOUS, OLDEST = "step_000000008", "step_000000006", "step_000000004"


@pytest.fixture(scope="module")
def pristine(prepared_dir, tmp_path_factory) -> Path:
    """A finished two-task MER run (checkpoints 4, 6, 8) on its own copy of the data."""
    root = tmp_path_factory.mktemp("doctor")
    shutil.copytree(prepared_dir, root / "data")
    cfg = tiny_run_config(
        root / "run",
        root / "data",
        method="mer",
        data={"tasks": ["email", "xml"], "tokens_per_task": 8 * 32 * 4},
        eval={"windows": 4, "batch_size": 8},
        checkpoint={"every": 2, "keep_last": 3},
        replay={"alpha": 0.25, "visibility_lag": 1},
        reptile={"k": 3, "epsilon": 0.5},
    )
    train(cfg, progress=False)
    shutil.copytree(root, root.with_name(root.name + "-pristine"))
    return root.with_name(root.name + "-pristine")


@pytest.fixture
def finished(pristine, tmp_path) -> Path:
    """A fresh copy of the run and its data at the paths its config names."""
    live = pristine.with_name(pristine.name.removesuffix("-pristine"))
    shutil.rmtree(live)
    shutil.copytree(pristine, live)
    return live / "run"


@pytest.fixture
def run(finished) -> Path:
    """The copy as a run stopped before it finished (its summary not complete)."""
    summary = json.loads((finished / "summary.json").read_text())
    (finished / "summary.json").write_text(json.dumps({**summary, "complete": False}))
    return finished


def data_dir(run: Path) -> Path:
    return run.parent / "data"


def item(report, subject: str):
    found = [i for i in report.items if i.subject == subject]
    assert len(found) == 1, [i.subject for i in report.items]
    return found[0]




def follow(command: str) -> int:
    """Run the command the doctor printed, through the real CLI."""
    argv = shlex.split(command)
    assert argv[0] == "cptrain"
    return cli.main([*argv[1:], "--no-progress"])


def test_healthy_run_is_resumable_and_the_command_works(run, capsys):
    assert main_doctor(run) == 0
    out = capsys.readouterr().out
    for subject in (f"checkpoint {LAST}", f"checkpoint {PREVIOUS}", f"checkpoint {OLDEST}",
                    "replay buffer rank 0", "shards email/train", "shards xml/val",
                    "config.yaml", "metrics.jsonl"):
        assert f"  ok       {subject}: " in out, subject
    report = diagnose(run)
    assert report.resumable and not report.damaged
    assert report.resume_from == run / "checkpoints" / LAST and report.resume_step == 8
    assert report.command == f"cptrain train {run / 'config.yaml'} --resume"
    assert follow(report.command) == 0
    assert f"resuming from {run / 'checkpoints' / LAST}" in capsys.readouterr().out


def test_damaged_newest_checkpoint_points_to_the_previous_one(run, capsys):
    flip(run / "checkpoints" / LAST / ckpt.OPTIMIZER_FILE)
    report = diagnose(run)
    bad = item(report, f"checkpoint {LAST}")
    assert bad.status == "damaged" and "optimizer.safetensors fails its sha256 check" in bad.detail
    assert report.resumable and report.resume_from == run / "checkpoints" / PREVIOUS
    assert "records after step 6 are dropped on resume" in item(report, "metrics.jsonl").detail
    assert follow(report.command) == 0
    assert f"resuming from {run / 'checkpoints' / PREVIOUS}" in capsys.readouterr().out


def test_no_good_checkpoint_is_not_resumable(run, capsys):
    for _, path in ckpt.list_checkpoints(run / "checkpoints"):
        (path / "MANIFEST.json").unlink()
    assert main_doctor(run) == 2
    out = capsys.readouterr().out
    assert f"DAMAGED  checkpoint {LAST}: no MANIFEST.json (incomplete write)" in out
    assert "NOT resumable: no complete checkpoint" in out
    # no dead end: --resume names --restart, and the command the doctor prints works, keeping
    # the damaged attempt
    assert cli.main(["train", str(run / "config.yaml"), "--resume", "--no-progress"]) == 2
    assert "start the run again with --restart" in capsys.readouterr().err
    report = diagnose(run)
    assert report.command == f"cptrain train {run / 'config.yaml'} --restart"
    kept = sorted(p.name for p in run.iterdir() if p.name != "attempts")
    assert follow(report.command) == 0
    assert sorted(p.name for p in (run / "attempts" / "1").iterdir()) == kept
    assert json.loads((run / "summary.json").read_text())["complete"]


def test_a_finished_run_is_complete_not_resumable(finished, capsys):
    assert main_doctor(finished) == 0
    out = capsys.readouterr().out
    assert "complete: the run finished (step 8); nothing to resume" in out
    assert "resumable" not in out.replace("NOT resumable", "")
    assert diagnose(finished).command is None


def test_the_command_follows_a_moved_run_and_names_torchrun(run, capsys):
    moved = run.with_name("moved")
    run.rename(moved)
    report = diagnose(moved)
    assert report.command == (f"cptrain train {moved / 'config.yaml'} --set run_dir={moved} "
                              "--resume")
    assert follow(report.command) == 0
    assert f"resuming from {moved / 'checkpoints' / LAST}" in capsys.readouterr().out
    assert not run.exists()  # it trained where it lies, not at the old run_dir
    from cptrain.config import load_run_config
    from cptrain.doctor import _train_command

    cfg = load_run_config(moved / "config.yaml")
    assert _train_command(moved / "config.yaml", cfg, 2).startswith(
        "torchrun --nproc_per_node=2 -m cptrain.cli train ")  # the checkpoints' world size


@pytest.mark.parametrize(
    ("plant", "fragment"),
    [
        (lambda d: flip(d / "chunk_000000.rows", 40), "chunk_000000.rows fails its checksum"),
        (lambda d: os.truncate(d / "chunk_000000.meta", 64), "chunk_000000.meta is truncated"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    ],
    ids=["chunk bit-flipped", "chunk truncated", "manifest missing"],
)
def test_damaged_buffer_blocks_and_the_trainer_agrees(run, capsys, plant, fragment):
    plant(run / "replay" / "rank_0")
    report = diagnose(run)
    bad = item(report, "replay buffer rank 0")
    assert bad.status == "damaged" and fragment in bad.detail
    assert not report.resumable and report.blocking.startswith("replay buffer rank 0")
    rc = cli.main(["train", str(run / "config.yaml"), "--resume", "--no-progress"])
    assert rc == 2 and "replay" in capsys.readouterr().err


def test_bit_flipped_shard_is_found(run):
    shard = data_dir(run) / "xml" / "train" / "shard_00000.bin"
    flip(shard, 1000, mask=0x01)  # a token id that stays inside the vocabulary
    report = diagnose(run)
    bad = item(report, "shards xml/train")
    assert bad.status == "damaged"
    assert f"shard file {shard} is corrupt (sha256 mismatch)" in bad.detail
    assert not report.resumable


def retokenize(data: Path) -> str:
    """Swap two tokens of the prepared tokenizer and record it as prepare would: same vocab
    size, different tokenizer. Returns the new sha256."""
    from cptrain.data.tokenizer import load_tokenizer, tokenizer_sha256

    path = data / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))
    return tokenizer_sha256(load_tokenizer(data / "tokenizer"))


def test_tokenizer_swapped_under_the_shards(run):
    retokenize(data_dir(run))
    report = diagnose(run)
    bad = item(report, f"data {data_dir(run)}")
    assert bad.status == "damaged" and "re-run `cptrain prepare`" in bad.detail
    assert not report.resumable


def test_data_re_prepared_with_another_tokenizer_of_the_same_size(run):
    data = data_dir(run)
    sha = retokenize(data)
    for f in [data / "prepare.json", *data.glob("*/*/manifest.json")]:
        text = f.read_text()
        old = json.loads((data / "prepare.json").read_text())["tokenizer"]["sha256"]
        f.write_text(text.replace(old, sha))
    report = diagnose(run)
    bad = item(report, f"checkpoint {LAST} vs data")
    assert bad.status == "damaged" and "the data was re-prepared" in bad.detail
    assert sha[:12] in bad.detail and not report.resumable


def test_data_with_a_larger_vocabulary_than_the_checkpoint(run):
    for f in data_dir(run).glob("*/*/manifest.json"):
        m = json.loads(f.read_text())
        m["vocab_size"] = 600
        f.write_text(json.dumps(m))
    report = diagnose(run)
    bad = item(report, f"checkpoint {LAST} vs data")
    assert "vocabulary of 600" in bad.detail and "512 rows" in bad.detail
    assert not report.resumable


def test_config_changed_since_the_checkpoint_blocks(run):
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("seed: 0", "seed: 1"))
    report = diagnose(run)
    bad = item(report, "config.yaml vs checkpoint")
    assert "seed: checkpoint has 0, config has 1" in bad.detail and not report.resumable


def test_leftovers_and_an_interrupted_resave(run, capsys):
    root = run / "checkpoints"
    (root / ".tmp-step_000000010-4242").mkdir()
    os.replace(root / LAST, root / ".old-step_000000008-4242")
    report = diagnose(run)
    assert "interrupted save" in item(report, "checkpoints/.tmp-step_000000010-4242").detail
    moved = item(report, "checkpoint .old-step_000000008-4242")
    assert moved.status == "note" and "puts it back as step_000000008" in moved.detail
    assert report.resumable and report.resume_step == 8
    assert follow(report.command) == 0
    assert f"resuming from {root / LAST}" in capsys.readouterr().out


def test_torn_metrics_line_is_noted(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    report = diagnose(run)
    assert "1 torn line(s) are dropped on resume" in item(report, "metrics.jsonl").detail
    assert report.resumable


def tree_fingerprint(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[str(p)] = (0, 0, "dir")
    return out


def test_doctor_changes_nothing(run):
    root = run / "checkpoints"
    flip(root / LAST / "state.json", 3, mask=0x01)
    (root / ".tmp-step_000000010-4242").mkdir()
    os.replace(root / PREVIOUS, root / ".old-step_000000006-4242")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{torn")
    before = tree_fingerprint(run.parent)
    diagnose(run)
    assert tree_fingerprint(run.parent) == before


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        diagnose(tmp_path / "nowhere")
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        diagnose(tmp_path)
    assert "not a cptrain run directory" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- hardware
def test_doctor_hardware_measures_again_and_shows_old_and_new(tmp_path, monkeypatch, capsys):
    import torch

    from cptrain.hardware import cache
    from cptrain.hardware import probe as hardware
    from cptrain.models.build import build_model

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_PEAK_N", {"cpu": 128, "cuda": 128})  # fast probes
    monkeypatch.setattr(hardware, "_PEAK_BLOCK_SECONDS", 0.01)
    monkeypatch.setattr(hardware, "_PROBE_SECONDS", 0.2)
    cpu = torch.device("cpu")
    key = hardware.machine_key(cpu)
    probe = hardware.PrecisionProbe.of(build_model("tiny", 512, seed=0).config, 8, 32, "cpu")
    # What a busy machine left in the cache: a low peak and a near-tie speedup
    busy = cache.Measurement(
        value=67e9, spread=0.01, rounds=5, load=0.6, load_source="/proc/stat", loadavg=1.5,
        cpus=2, torch=cache.torch_build(), measured_at="2099-01-01T00:00:00+00:00", seconds=0.5,
    )
    cache.remember(key, "peak_flops", "fp32", busy.to_json())
    speedup = {**busy.to_json(), "value": 1.105, "probe": probe.to_json()}
    cache.remember(key, "bf16_speedup", probe.name, speedup)
    cache.remember("another machine | 7 threads", "peak_flops", "fp32", busy.to_json())

    assert cli.main(["doctor", "--hardware"]) == 0
    out = capsys.readouterr().out
    assert f"machine: {key}" in out and str(cache.cache_path()) in out
    assert "cached: 67.0 GFLOP/s at 2099-01-01" in out
    # the two cached values are doubted for their load (a busy machine may doubt the new too)
    cached = [line for line in out.splitlines() if line.strip().startswith("cached:")]
    assert sum("DOUBTED, measured while other work used 60% of the CPUs" in line
               for line in cached) == 2
    assert "cached: 1.105×" in out and out.count("now:") >= 2
    assert "auto: " in out and "bf16 needs" in out
    assert "also cached, not measured now (another thread count or torch): another" in out
    entry = cache.read_cache()["machines"][key]
    assert entry["peak_flops"]["fp32"]["measured_at"] < "2099"  # the new ones are cached
    assert entry["bf16_speedup"][probe.name]["measured_at"] < "2099"
    assert entry["bf16_speedup"][probe.name]["probe"] == probe.to_json()

    assert cli.main(["doctor"]) == 2  # neither a run nor --hardware
    assert "--hardware" in capsys.readouterr().err
