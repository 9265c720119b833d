"""hardware/cache.py: the cache of measurements and the evidence each carries. A damaged or
unwritable cache only costs a measurement; a value measured while other work ran, with
unsteady timings, or by another torch build is measured again (kept while the machine is busy
now); other work is read from /proc/stat, the load average only where that is missing; and
training threads are the CPUs others leave free."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cptrain.hardware import probe as hardware
from hardware.test_probe import CPU, NATIVE, fake_machine, probe_of, quiet_machine


@contextlib.contextmanager
def busy_cpus() -> Iterator[None]:
    """Real other work: two spinning processes per CPU this process may run on (two, so that
    they hold most of each CPU whatever else the test run does at the time)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = 2 * (cpus or 1)
    spin = "import sys; print('go', flush=True)\nwhile True: pass"
    procs = [
        subprocess.Popen([sys.executable, "-S", "-c", spin], stdout=subprocess.PIPE)
        for _ in range(n)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_damaged_or_unwritable_cache_only_costs_a_measurement(monkeypatch, cache_dir):
    monkeypatch.setattr(hardware, "measure_peak_flops", lambda d, t: hardware.Timed(5e9, 0, 4))
    cache_dir.mkdir(parents=True)
    (cache_dir / hardware.CACHE_FILE).write_text("{not json")
    assert hardware.peak_flops(CPU, "bf16") == 5e9
    assert json.loads((cache_dir / hardware.CACHE_FILE).read_text())["format"] == 2
    monkeypatch.setenv(hardware.CACHE_ENV, "/proc/no-such-dir")
    assert hardware.peak_flops(CPU, "bf16") == 5e9


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="other work is read from /proc/stat")
def test_a_peak_probed_while_other_processes_run_is_measured_again(
    monkeypatch, cache_dir, request
):
    real, calls = hardware.measure_peak_flops, []

    def measure(device, dtype):
        calls.append(1)
        return real(device, dtype)

    monkeypatch.setattr(hardware, "measure_peak_flops", measure)
    monkeypatch.setattr(hardware, "_PEAK_N", {"cpu": 256, "cuda": 256})  # a fast probe
    # One thread: several, each preempted by a spinner at every barrier, crawl
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    with busy_cpus():
        busy = hardware.peak_flops(CPU, "fp32")
        assert busy > 0 and len(calls) == 1
        # flagged: the spinners' share of the CPUs is recorded with the value
        (entry,) = json.loads((cache_dir / hardware.CACHE_FILE).read_text())["machines"].values()
        record = entry["peak_flops"]["fp32"]
        assert isinstance(record, dict), "a bare number: no evidence of the load it was taken at"
        assert record["load_source"] == "/proc/stat", record
        assert record["load"] > hardware.cache.BUSY_LOAD, record
        # while the machine stays busy, measuring again would be no better: kept, and said so
        kept = hardware.peak(CPU, "fp32")
        assert len(calls) == 1 and kept.value == busy
        assert "kept: other work uses" in kept.evidence["note"]
    quiet_machine(monkeypatch)  # the other work is gone
    again = hardware.peak(CPU, "fp32")
    assert len(calls) == 2  # not trusted: measured again by the next run on a quiet machine
    assert again.evidence["note"].startswith("measured while other work used")
    steady = again.evidence["measurement"]["doubt"] is None
    assert hardware.peak(CPU, "fp32").evidence["cached"] == steady  # trusted if it was steady


def test_the_load_average_decides_only_without_proc_stat(monkeypatch, tiny_config):
    """The load average counts cptrain's own recent work (the demo's previous run): where
    /proc/stat can tell others' work from ours, it is recorded but does not doubt a value."""
    calls = fake_machine(monkeypatch, NATIVE, 1.5)
    quiet_machine(monkeypatch)
    n = len(hardware.cache.our_cpus())
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * n, 2.0 * n, 1.0 * n))
    m = hardware.auto_precision(CPU, probe_of(tiny_config)).evidence()["measurement"]
    assert (m["load"], m["loadavg"], m["doubt"]) == (0.0, 3.0, None)
    monkeypatch.setattr(hardware.cache, "read_proc_stat", lambda: "")  # e.g. macOS
    probe = hardware.PrecisionProbe.of(tiny_config, 4, 32, "cpu")
    m = hardware.auto_precision(CPU, probe).evidence()["measurement"]
    assert (m["load_source"], m["load"]) == ("loadavg", 3.0) and "300%" in m["doubt"]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.01 * n, 0.0, 0.0))
    hardware.auto_precision(CPU, probe)
    hardware.auto_precision(CPU, probe)
    assert len(calls) == 3


def test_a_value_from_another_torch_build_or_before_its_install_is_measured_again(
    monkeypatch, cache_dir
):
    quiet_machine(monkeypatch)
    measured = iter([1e9, 2e9, 3e9])
    monkeypatch.setattr(
        hardware, "measure_peak_flops", lambda d, t: hardware.Timed(next(measured), 0.01, 4)
    )
    assert hardware.peak_flops(CPU, "fp32") == 1e9
    path = cache_dir / hardware.CACHE_FILE

    def edit(**fields) -> None:
        data = json.loads(path.read_text())
        (entry,) = data["machines"].values()
        entry["peak_flops"]["fp32"].update(fields)
        path.write_text(json.dumps(data))

    edit(torch="2.0.0 (0123456789ab)", achieved=9e9)
    found = hardware.peak(CPU, "fp32")
    assert found.value == 2e9  # a floor from another torch build goes with it
    assert found.evidence["note"].startswith("measured with torch 2.0.0")
    edit(measured_at="2000-01-01T00:00:00+00:00")
    found = hardware.peak(CPU, "fp32")
    assert (found.value, found.evidence["note"]) == (
        3e9, "measured before this torch was installed"
    )
    assert hardware.peak(CPU, "fp32").evidence["cached"]


def test_a_busy_cpu_doubts_a_cpu_rate_but_not_a_gpus():
    now = hardware.cache.measure(lambda: hardware.Timed(1e9, 0.01, 4))
    busy = dataclasses.replace(now, load=0.9)
    assert now.doubt() is None and busy.doubt() is not None
    assert dataclasses.replace(busy, device="cuda").doubt() is None


def test_training_threads_default_to_the_cpus_others_leave_free(monkeypatch):
    from cptrain.hardware import cache as hc

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hc, "our_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(hc, "others_now", lambda seconds=0.1: 0.5)  # two cores busy
    assert hc.cpu_threads(None) == 2
    monkeypatch.setattr(hc, "others_now", lambda seconds=0.1: 1.0)
    assert hc.cpu_threads(None) == 1  # never none
    monkeypatch.setattr(hc, "others_now", lambda seconds=0.1: None)  # cannot tell: all
    assert hc.cpu_threads(None) == 4
    assert hc.cpu_threads(None, cap=2) == 2  # never above torch's own default
    assert hc.cpu_threads(3) == 3  # train.threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's per-rank setting
    assert hc.cpu_threads(None) == 1



def test_the_cache_lives_under_the_env_dir_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hardware.cache.cache_path() == tmp_path / "mine" / "hardware.json"
    monkeypatch.delenv(hardware.CACHE_ENV)
    assert hardware.cache.cache_path() == tmp_path / "xdg" / "cptrain" / "hardware.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hardware.cache.cache_path() == tmp_path / "home" / ".cache" / "cptrain" / "hardware.json"


def test_values_of_the_old_format_without_evidence_are_measured_again(cache_dir):
    cache = hardware.cache
    cache.remember("m", "peak_flops", "fp32", {"value": 1e9})  # a record without evidence
    assert cache.read_cache()["format"] == cache.CACHE_FORMAT
    found = cache.look_up("m", "peak_flops", "fp32")
    assert found.measure and found.found is None and found.note == "cached without evidence"
    old = {"format": 1, "machines": {"m": {"peak_flops": {"fp32": 1e9}}}}
    (cache_dir / cache.CACHE_FILE).write_text(json.dumps(old))
    assert cache.read_cache() == {}
    assert cache.look_up("m", "peak_flops", "fp32").note == "nothing cached"
