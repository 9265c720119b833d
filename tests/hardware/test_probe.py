"""``train.precision: auto``, the measured probes behind it and MFU, and honest throughput.
The cache of the measurements and their evidence is tested in test_cache.py, with the
machine fakes defined here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import model_after, read_metrics, tiny_run_config

from cptrain.cli import compute_line
from cptrain.config import config_differences
from cptrain.distributed import DistEnv
from cptrain.hardware import probe as hardware
from cptrain.models.build import build_model
from cptrain.models.flops import flops_per_token, shape_from_hf_config
from cptrain.train import Trainer, train
from cptrain.train.hooks import _multiples_left

CPU = torch.device("cpu")
NATIVE = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16\n"
EMULATED = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2\n"


def fake_machine(monkeypatch, cpuinfo: str, speedup: float) -> list[int]:
    """The hardware boundary: what /proc/cpuinfo says and what the probe measures (a new
    machine, so nothing cached); returns a list that grows by one per measurement."""
    hardware.cache_path().unlink(missing_ok=True)
    calls: list[int] = []

    def measure(device, probe):
        calls.append(1)
        return hardware.Timed(speedup, 0.0, 3)  # steady

    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: cpuinfo)
    monkeypatch.setattr(hardware, "measure_bf16_speedup", measure)
    return calls


def probe_of(model_config) -> hardware.PrecisionProbe:
    return hardware.PrecisionProbe.of(model_config, 8, 32, "cpu")


def plant_other_work(monkeypatch, ticks_per_read: int) -> None:
    """The machine boundary for other work: what ``/proc/stat`` says. Each reading finds every
    CPU of ours ``ticks_per_read`` busy ticks further (0: a quiet machine)."""
    cpus, busy = sorted(hardware.cache.our_cpus()), [0]

    def read() -> str:
        busy[0] += ticks_per_read
        lines = [f"cpu{c} {busy[0]} 0 0 100000 0 0 0 0 0 0" for c in cpus]
        return "cpu  0 0 0 0 0 0 0 0 0 0\n" + "\n".join(lines) + "\n"

    monkeypatch.setattr(hardware.cache, "read_proc_stat", read)


def quiet_machine(monkeypatch) -> None:
    plant_other_work(monkeypatch, 0)


# ------------------------------------------------------------------------- the choice
def test_auto_is_fp32_without_native_bf16_even_if_bf16_measured_fast(monkeypatch, tiny_config):
    fake_machine(monkeypatch, EMULATED, 1.5)
    choice = hardware.auto_precision(CPU, probe_of(tiny_config))
    assert (choice.precision, choice.native) == ("fp32", False)
    assert "no native bf16" in choice.line()
    fake_machine(monkeypatch, EMULATED, 1 / 2.6)
    line = hardware.auto_precision(CPU, probe_of(tiny_config)).line()
    assert line == "precision: fp32 (this CPU has no native bf16: bf16 would be ~2.6× slower)"


def test_auto_is_bf16_with_native_bf16_when_measured_faster(monkeypatch, tiny_config):
    fake_machine(monkeypatch, NATIVE, 1.4)
    choice = hardware.auto_precision(CPU, probe_of(tiny_config))
    assert choice.precision == "bf16"
    assert choice.line() == "precision: bf16 (native bf16 on this CPU: 1.4× faster than fp32)"


def test_native_bf16_that_measures_slower_at_this_shape_stays_fp32(monkeypatch, tiny_config):
    fake_machine(monkeypatch, NATIVE, 0.8)
    choice = hardware.auto_precision(CPU, probe_of(tiny_config))
    assert choice.precision == "fp32" and choice.native
    assert "at this model's widths bf16 would be ~1.2× slower" in choice.line()
    fake_machine(monkeypatch, NATIVE, 1.05)  # near a tie goes to fp32: bf16 costs precision
    assert hardware.auto_precision(CPU, probe_of(tiny_config)).precision == "fp32"


@pytest.mark.parametrize(
    ("cpuinfo", "capability", "native"),
    [
        (NATIVE, "AVX512", True),
        ("flags : fpu amx_bf16 amx_tile\n", "AVX512", True),
        (EMULATED, "AVX512", False),
        ("", "AVX512_BF16", True),  # no /proc/cpuinfo: torch's word for it
        ("", "DEFAULT", False),
    ],
)
def test_native_bf16_reads_cpu_flags_then_torch(monkeypatch, cpuinfo, capability, native):
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: cpuinfo)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    assert hardware.native_bf16(CPU) is native


def test_explicit_precision_wins_and_measures_nothing(monkeypatch, make_config, tiny_config):
    calls = fake_machine(monkeypatch, NATIVE, 3.0)
    env = DistEnv("none")
    model = build_model("tiny", 512, seed=0)
    cfg = make_config(train={"precision": "fp32"})
    pinned = {"precision": "fp32", "source": "train.precision"}
    assert hardware.run_precision(cfg, env, model, None) == ("fp32", None, pinned)
    cfg = make_config(train={"precision": "bf16"})
    fake_machine(monkeypatch, EMULATED, 0.3)
    assert hardware.run_precision(cfg, env, model, None)[:2] == ("bf16", torch.bfloat16)
    assert calls == []
    # auto on a resume keeps what the checkpoint says, whatever this machine would pick
    auto = make_config(train={"precision": "auto"})
    kept = hardware.run_precision(auto, env, model, "bf16")
    assert kept == ("bf16", torch.bfloat16, {"precision": "bf16", "source": "checkpoint"})
    assert hardware.run_precision(auto, env, model, None)[:2] == ("fp32", None)


def test_gradient_accumulation_does_not_change_the_choice(monkeypatch, make_config):
    seen = []

    def auto(device, probe):
        seen.append(probe.name)
        return hardware.PrecisionChoice("fp32", "auto", False, 0.5)

    monkeypatch.setattr(hardware, "auto_precision", auto)
    model = build_model("tiny", 512, seed=0)
    for micro in (None, 2):
        cfg = make_config(train={"micro_batch_size": micro, "precision": "auto"})
        hardware.run_precision(cfg, DistEnv("none"), model, None)
    assert len(seen) == 2 and seen[0] == seen[1]


# --------------------------------------------------------------------------- the probes
def test_probes_measure_once_per_machine_and_leave_the_rng_alone(
    monkeypatch, cache_dir, tiny_config
):
    quiet_machine(monkeypatch)
    monkeypatch.setattr(hardware.cache, "STEADY", float("inf"))  # about caching, not noise
    real_speedup, real_peak = hardware.measure_bf16_speedup, hardware.measure_peak_flops
    calls = {"speedup": 0, "peak": 0}

    def speedup(device, probe):
        calls["speedup"] += 1
        return real_speedup(device, probe)

    def peak(device, dtype):
        calls["peak"] += 1
        return real_peak(device, dtype)

    monkeypatch.setattr(hardware, "measure_bf16_speedup", speedup)
    monkeypatch.setattr(hardware, "measure_peak_flops", peak)
    rng = torch.get_rng_state()
    probe = probe_of(tiny_config)
    first = hardware.auto_precision(CPU, probe)
    assert torch.equal(rng, torch.get_rng_state())  # training draws what it would have
    assert first.speedup is not None and first.speedup > 0
    assert first.evidence()["note"] == "nothing cached"
    again = hardware.auto_precision(CPU, probe)
    assert again == first and again.evidence()["cached"]
    flops = hardware.peak_flops(CPU, "fp32")
    assert flops > 1e8 and hardware.peak_flops(CPU, "fp32") == flops
    assert calls == {"speedup": 1, "peak": 1}

    cached = json.loads((cache_dir / hardware.CACHE_FILE).read_text())
    (entry,) = cached["machines"].values()
    assert entry["bf16_speedup"][probe.name]["value"] == first.speedup
    assert entry["bf16_speedup"][probe.name]["probe"] == probe.to_json()
    assert entry["peak_flops"]["fp32"]["value"] == flops
    # another thread count is another machine key: measured anew
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        hardware.auto_precision(CPU, probe)
    finally:
        torch.set_num_threads(threads)
    assert calls["speedup"] == 2


def test_a_peak_below_an_achieved_rate_is_measured_again_and_only_rises(monkeypatch):
    quiet_machine(monkeypatch)
    measured = iter([1e9, 3e9])
    monkeypatch.setattr(
        hardware, "measure_peak_flops", lambda d, t: hardware.Timed(next(measured), 0.0, 4)
    )
    assert hardware.peak_flops(CPU, "fp32") == 1e9
    assert hardware.peak_flops(CPU, "fp32", at_least=0.5e9) == 1e9  # cached, not measured
    assert hardware.peak_flops(CPU, "fp32", at_least=2e9) == 3e9  # measured again
    assert hardware.peak_flops(CPU, "fp32", at_least=4e9, measure=False) == 4e9
    assert hardware.peak_flops(CPU, "fp32") == 4e9  # a run's achieved rate is a floor


# ------------------------------------------------------------ on a busy or noisy machine
def test_a_busy_or_unsteady_probe_is_flagged_and_measured_again(monkeypatch, tiny_config):
    calls = fake_machine(monkeypatch, NATIVE, 1.5)
    plant_other_work(monkeypatch, 10_000)  # others keep every CPU busy
    choice = hardware.auto_precision(CPU, probe_of(tiny_config))
    assert choice.precision == "bf16"  # used by this run: it is what there is ...
    evidence = choice.evidence()["measurement"]
    assert evidence["load"] > hardware.cache.BUSY_LOAD and evidence["load_source"] == "/proc/stat"
    assert evidence["doubt"].startswith("measured while other work used 100% of the CPUs")
    assert choice.line().endswith(": measured again by a run on a quiet machine]")
    assert hardware.peak(CPU, "fp32").evidence["measurement"]["doubt"] is not None
    quiet_machine(monkeypatch)
    again = hardware.auto_precision(CPU, probe_of(tiny_config))  # ... but never cached as final
    assert len(calls) == 2 and again.evidence()["note"] == evidence["doubt"]
    assert again.evidence()["measurement"]["doubt"] is None and "[" not in again.line()
    hardware.auto_precision(CPU, probe_of(tiny_config))
    assert len(calls) == 2  # measured on a quiet machine, steadily: trusted from now on

    def unsteady(device, probe):
        calls.append(1)
        return hardware.Timed(1.2, 0.08, 7)  # the two best passes 8 % apart

    monkeypatch.setattr(hardware, "measure_bf16_speedup", unsteady)
    other = hardware.PrecisionProbe.of(tiny_config, 4, 32, "cpu")
    first = hardware.auto_precision(CPU, other)
    # 1.2× would clear 1.15, but not the margin its own spread asks for (1.10 + 2 × 0.08)
    assert (first.precision, first.needed) == ("fp32", 1.26)
    assert "unsteady" in first.evidence()["measurement"]["doubt"]
    hardware.auto_precision(CPU, other)
    assert len(calls) == 4


@pytest.mark.parametrize(
    ("speedup", "precision"), [(1.05, "fp32"), (1.105, "fp32"), (1.149, "fp32"), (1.15, "bf16")]
)
def test_a_near_tie_keeps_fp32(monkeypatch, tiny_config, speedup, precision):
    """bf16 must clear the 1.10 cut-off by 0.05: 1.105× picked bf16 on one machine and a
    noisy 1.09× fp32 on the next, for the same config."""
    fake_machine(monkeypatch, NATIVE, speedup)
    choice = hardware.auto_precision(CPU, probe_of(tiny_config))
    assert choice.precision == precision
    evidence = choice.evidence()
    assert (evidence["cutoff"], evidence["band"], evidence["needed"]) == (1.1, 0.05, 1.15)
    assert evidence["speedup"] == speedup and evidence["native_bf16"] is True
    if precision == "fp32":
        assert choice.line().endswith(f"only {speedup:.3f}× faster, under the 1.15× it needs)")


def test_the_peak_probe_repeats_until_its_two_best_blocks_agree(monkeypatch):
    monkeypatch.setattr(hardware, "_PEAK_N", {"cpu": 128, "cuda": 128})
    monkeypatch.setattr(hardware, "_PEAK_BLOCK_SECONDS", 0.01)
    monkeypatch.setattr(hardware, "_PEAK_SECONDS", 60.0)  # only steadiness or 20 blocks end it
    timed = hardware.measure_peak_flops(CPU, torch.float32)
    assert timed.value > 0 and timed.spread is not None
    assert timed.rounds == 20 or (timed.rounds >= 4 and timed.spread <= hardware.cache.STEADY)


def test_the_probe_is_the_models_shape_within_budget():
    big = build_model("99m", 32000, seed=0).config
    probe = hardware.PrecisionProbe.of(big, 8, 2048, "cpu")
    assert probe.config["num_hidden_layers"] == 1 and probe.config["vocab_size"] == 4096
    assert probe.config["hidden_size"] == 512
    # over the FLOP budget at 512 tokens, but fewer would drown bf16's gain in weight casts
    assert (probe.seqs, probe.seq_len) == (1, 512)
    demo = hardware.PrecisionProbe.of(build_model("tiny", 4096, seed=0).config, 32, 128, "cpu")
    per_token = flops_per_token(shape_from_hf_config(demo.config), 128)
    assert demo.seq_len == 128 and 512 <= demo.seqs * 128 < 32 * 128
    assert per_token * demo.seqs * demo.seq_len <= hardware._PROBE_FLOPS["cpu"]
    small = hardware.PrecisionProbe.of(build_model("tiny", 512, seed=0).config, 8, 32, "cpu")
    assert (small.seqs, small.seq_len) == (8, 32)  # the run's own batch


def test_auto_in_a_checkpoint_never_reads_as_a_config_change():
    saved = {"train": {"precision": "bf16", "lr": 1.0}}
    assert config_differences(saved, {"train": {"precision": "auto", "lr": 1.0}}) == []
    assert config_differences(saved, {"train": {"precision": "bf16", "lr": 1.0}}) == []
    assert config_differences(saved, {"train": {"precision": "fp32", "lr": 1.0}}) == [
        "train.precision: checkpoint has 'bf16', config has 'fp32'"
    ]


def test_evaluations_and_checkpoints_still_to_come():
    ends = [6, 12]
    assert _multiples_left(1, 12, 4, ends) == 2  # 4 and 8; 12 is a task end
    assert _multiples_left(5, 12, 4, ends) == 1
    assert _multiples_left(5, 12, 0, ends) == 0


# ----------------------------------------------------------------- in a training run
@pytest.fixture(scope="module")
def auto_run(prepared_dir, tmp_path_factory):
    """A two-task run at precision auto (the default; measured for real here), with
    periodic evaluations and interval checkpoints: (config, summary)."""
    root = tmp_path_factory.mktemp("auto")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(hardware.CACHE_ENV, str(root / "cache"))
        cfg = tiny_run_config(
            root / "run",
            prepared_dir,
            data={"tasks": ["email", "xml"]},
            eval={"every": 3},
            checkpoint={"every": 4},
            train={"precision": "auto"},
        )
        return cfg, train(cfg, progress=False)


def test_throughput_counts_training_time_and_wall_time_apart(auto_run):
    cfg, summary = auto_run
    records = read_metrics(cfg.run_dir, "train")
    assert records
    for r in records:
        assert r["tokens_per_s"] >= r["wall_tokens_per_s"] > 0
        assert r["eval_s"] >= 0 and r["checkpoint_s"] >= 0
        assert 0 < r["mfu"] <= 1
        assert r["precision"] == summary["precision"] in ("fp32", "bf16")
    # the "before" evaluation lands in the first log line; the checkpoint at 4 in a later one
    assert records[0]["eval_s"] > 0
    assert sum(r["checkpoint_s"] for r in records) > 0
    assert all(r["export_s"] >= 0 for r in records)
    assert summary["export_s"] > 0  # the weights after each of the two tasks
    assert summary["eval_s"] >= sum(r["eval_s"] for r in records) * 0.999
    assert 0 < summary["mfu"] <= 1 and summary["peak_flops"] > 0 and summary["tokens_per_s"] > 0
    assert summary["peak_dtype"] == summary["precision"]
    # the decision and the peak, with what they rest on
    evidence = summary["precision_evidence"]
    assert evidence["precision"] == summary["precision"] and evidence["source"] == "auto"
    assert evidence["needed"] >= 1.15 and evidence["speedup"] > 0
    assert evidence["measurement"]["torch"] == hardware.cache.torch_build()
    peak = summary["peak_evidence"]
    assert peak["value"] == summary["peak_flops"] and "load" in peak["measurement"]
    assert 0 < summary["train_s"] < summary["wall_s"]
    line = compute_line(summary)
    assert line is not None and f"{summary['precision']}," in line and "MFU" in line
    assert f"exports {summary['export_s']:.0f} s, " in line and " s wall" in line
    assert compute_line({"steps": 3}) is None  # a summary from before these were measured
    # the parts add up to the wall time: diagnostics are named, the rest is "other"
    made = {"train_s": 10.0, "eval_s": 2.0, "checkpoint_s": 1.0, "export_s": 1.0,
            "diagnostics_s": 4.0, "wall_s": 20.0, "precision": "fp32", "tokens_per_s": 1.0}
    assert compute_line(made).endswith("exports 1 s, diagnostics 4 s, other 2 s of 20 s wall")


def test_the_checkpoint_records_what_auto_resolved_to(auto_run):
    cfg, summary = auto_run
    run = Path(cfg.run_dir)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "auto"
    # config.yaml keeps what the user wrote; the summary, like every checkpoint, what it became
    assert summary["config"]["train"]["precision"] == summary["precision"] != "auto"
    for step in sorted((run / "checkpoints").iterdir()):
        state = json.loads((step / "state.json").read_text())
        assert state["config"]["train"]["precision"] == summary["precision"]


def test_resume_with_auto_keeps_the_runs_precision_bit_for_bit(
    monkeypatch, prepared_dir, tmp_path
):
    def config(name):
        return tiny_run_config(
            tmp_path / name, prepared_dir, data={"tasks": ["email"]}, checkpoint={"every": 2},
            train={"precision": "auto"},
        )

    # This machine, as auto sees it: native bf16, 2× faster. The uninterrupted run and the
    # run that is killed after step 3 (checkpoint at 2) both train in bf16.
    fake_machine(monkeypatch, NATIVE, 2.0)
    whole = train(config("whole"), progress=False)
    assert whole["precision"] == "bf16"
    part = config("part")
    Trainer(part, progress=False, stop_after=3).run()
    # Resumed where auto would now say fp32: the run's bf16 must hold.
    calls = fake_machine(monkeypatch, EMULATED, 0.4)
    resumed = train(part, resume=True, progress=False)
    assert calls == [] and resumed["precision"] == "bf16"
    got, want = model_after(part.run_dir, 0), model_after(Path(tmp_path / "whole"), 0)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["loss_matrix"] == whole["loss_matrix"]
    assert {r["precision"] for r in read_metrics(part.run_dir, "train")} == {"bf16"}


def test_auto_is_the_default_precision():
    from cptrain.config import TrainConfig

    assert TrainConfig().precision == "auto"
