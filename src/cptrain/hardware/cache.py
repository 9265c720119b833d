"""The cache of hardware measurements (``hardware.json``) and the evidence each one carries.

A measurement that decides (the bf16 speedup behind ``precision: auto``) or divides (the matmul
peak behind MFU) is only as good as the moment it was taken: one probed while other work ran
reads low, and once cached it would read low for good. So each cached value carries its
evidence: the torch build that measured it and when, the share of this process's CPUs that
*other* processes used meanwhile, the 1-minute load average, and how far apart its two best
timings were. A cached value is used as it is (``trusted``) only when it was measured by this
torch build after it was installed, on a quiet machine (others used at most ``BUSY_LOAD`` of
the CPUs), with steady timings (the two best within ``STEADY``). Any other is measured again
by the next run that needs it, and the new measurement replaces it; except that a value
doubted only for load or noise is kept while the machine is busy *now* (a look of 0.1 s):
measuring again then would be no better, and would cost every run of a busy sweep a probe.
A GPU's values are doubted for their build and spread only: its rate does not depend on what
the CPUs do.

Other work is counted from ``/proc/stat``: the busy clock ticks (steal included: a VM's
neighbours) of the CPUs this process may run on, minus this process's own CPU time, over the
measurement. It is not the load average, which counts cptrain's own recent work too (the
previous run of a demo or sweep) and lags by a minute; the load average is recorded beside
it, and decides only where ``/proc/stat`` is missing (macOS).

The file lives under ``$CPTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cptrain``, else
``~/.cache/cptrain``; one entry per machine key (``hardware.machine_key``). An unwritable or
damaged cache only means measuring again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from cptrain.fsutil import atomic_write_json

CACHE_ENV = "CPTRAIN_CACHE_DIR"
CACHE_FILE = "hardware.json"
# 2: every value carries its evidence. Values of format 1 had none: they are measured again.
CACHE_FORMAT = 2
# Others may use this share of our CPUs while we measure: beyond it, a rate reads that much low.
BUSY_LOAD = 0.1
# The two best timings of a probe agree within this (relative): else it is measured again.
STEADY = 0.03
PROC_STAT = Path("/proc/stat")


# ---------------------------------------------------------------------------- the file
def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cptrain" / CACHE_FILE


def read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("format") == CACHE_FORMAT
    return data if ok and isinstance(data.get("machines"), dict) else {}


def _record(machine: str, kind: str, name: str) -> dict[str, Any] | None:
    """The cached record ``kind``/``name`` of ``machine`` (None if there is none)."""
    entry = read_cache().get("machines", {}).get(machine, {})
    found = entry.get(kind, {}).get(name) if isinstance(entry.get(kind), dict) else None
    return found if isinstance(found, dict) else None


def remember(machine: str, kind: str, name: str, record: dict[str, Any]) -> None:
    data = read_cache() or {"format": CACHE_FORMAT, "machines": {}}
    entry = data["machines"].setdefault(machine, {})
    entry.setdefault(kind, {})[name] = record
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except OSError:
        pass  # a read-only home costs a measurement per run, nothing else


@dataclass(frozen=True)
class Lookup:
    record: dict[str, Any]
    found: Measurement | None
    measure: bool  # measure now
    note: str | None  # why it is measured now, or why a doubted value is kept


def look_up(machine: str, kind: str, name: str, fresh: bool = False) -> Lookup:
    """The cached record ``kind``/``name`` of ``machine`` and whether to measure it now: when
    there is none, on request (``fresh``), when it is stale, or when it is doubted and the
    machine is quiet now (busy now, measuring again would be no better)."""
    record = _record(machine, kind, name)
    found = Measurement.from_json(record)
    if fresh:
        return Lookup(record or {}, found, True, "measured again on request")
    if found is None or record is None:
        why = "nothing cached" if record is None else "cached without evidence"
        return Lookup({}, None, True, why)
    doubt = found.doubt()
    if doubt is None:
        return Lookup(record, found, False, None)
    if found.stale() is None and found.device == "cpu":
        now = others_now()
        if now is not None and now > BUSY_LOAD:
            kept = f"{doubt}; kept: other work uses {now:.0%} of the CPUs now"
            return Lookup(record, found, False, kept)
    return Lookup(record, found, True, doubt)


# ----------------------------------------------------------------------- torch build
def torch_build() -> str:
    """This torch: its version and the commit it was built from (a rebuild of the same
    version can compute at another speed)."""
    git = str(getattr(torch.version, "git_version", "") or "")[:12]
    return f"{torch.__version__} ({git})" if git else str(torch.__version__)


def torch_installed_at() -> float | None:
    """When this torch was installed (its files' time), as a Unix time; None if unknown."""
    try:
        return Path(torch.version.__file__).stat().st_mtime
    except (OSError, AttributeError, TypeError):
        return None


# ------------------------------------------------------------------------ other work
def read_proc_stat() -> str:
    """``/proc/stat`` ('' where there is none, e.g. macOS)."""
    try:
        return PROC_STAT.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def our_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _busy_ticks(text: str, cpus: set[int]) -> int | None:
    """Busy clock ticks of ``cpus`` since boot: user, nice, system, irq, softirq and steal
    (guest time is inside user); idle and iowait are not busy."""
    total, seen = 0, False
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        f = [int(x) for x in rest.split()[:8]] + [0] * 8
        total += f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
        seen = True
    return total if seen else None


def others_now(seconds: float = 0.1) -> float | None:
    """The share of our CPUs that other processes use now: a look of ``seconds`` while this
    thread sleeps (the load average ÷ CPUs where ``/proc/stat`` is missing)."""
    cpus = our_cpus()
    before = _sample(cpus)
    time.sleep(seconds)
    share = _others_share(before, _sample(cpus), len(cpus))
    if share is None:
        avg = _loadavg()
        return None if avg is None else avg / len(cpus)
    return share


def cpu_threads(requested: int | None, cap: int | None = None) -> int:
    """Training threads: ``train.threads`` when set, else ``OMP_NUM_THREADS`` (torchrun sets
    it per rank), else the CPUs of this process that other processes leave free now, at most
    ``cap`` (torch's default). Measured
    (benches/threads.py, 2 cores, AMD EPYC): quiet, 2 threads train 1.72× faster than 1; beside
    one busy core, 0.71× (OpenMP threads wait on the core they share), so counting the busy
    cores out is what pays. Results do not depend on it (same loss matrix at 1 and 2)."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(our_cpus())
    busy = others_now(0.2)
    free = cpus if busy is None else round(cpus * (1.0 - min(max(busy, 0.0), 1.0)))
    # cap: torch's own default (physical cores): hyperthreads do not add matmul throughput
    return max(1, min(free, cpus, cap or cpus))


@dataclass(frozen=True)
class _Sample:
    wall: float
    busy: int | None  # ticks
    own: float  # this process's CPU seconds, every thread


def _sample(cpus: set[int]) -> _Sample:
    t = os.times()  # the whole process: torch's worker threads are ours, not other work
    return _Sample(time.monotonic(), _busy_ticks(read_proc_stat(), cpus), t.user + t.system)


def _loadavg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _others_share(a: _Sample, b: _Sample, n: int) -> float | None:
    if a.busy is None or b.busy is None:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wall = b.wall - a.wall
    # Each CPU's counter and our own are whole ticks: up to one tick each is rounding, not work.
    ticks = (b.busy - a.busy) - (b.own - a.own) * hz - (n + 1)
    if wall <= 0 or ticks <= 0:
        return 0.0
    return min(1.0, ticks / hz / wall / n)


# ------------------------------------------------------------------------ measurements
@dataclass(frozen=True)
class Timed:
    """What a probe timed: its result (from the best timings), how far apart its two best
    timings were (relative; None with fewer than two) and how many rounds it took."""

    value: float
    spread: float | None
    rounds: int


def spread(times: list[float]) -> float | None:
    """(second best − best) ÷ best of ``times`` (durations): how far a best is from chance."""
    if len(times) < 2:
        return None
    a, b = sorted(times)[:2]
    return (b - a) / max(a, 1e-12)


@dataclass(frozen=True)
class Measurement:
    """A probe's result and its evidence, as cached."""

    value: float
    spread: float | None
    rounds: int
    load: float | None  # share of our CPUs other processes used while it ran
    load_source: str  # "/proc/stat", "loadavg" (our own work included) or "none"
    loadavg: float | None  # 1-minute load average ÷ our CPUs, at its end (our work included)
    cpus: int
    torch: str
    measured_at: str  # ISO 8601, UTC
    seconds: float
    device: str = "cpu"  # the device type it timed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any] | None) -> Measurement | None:
        if not isinstance(record, dict):
            return None
        try:
            m = cls(**{k: record[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None
        ok = isinstance(m.value, int | float) and m.value > 0
        return m if ok and isinstance(m.measured_at, str) else None

    def doubt(self) -> str | None:
        """Why this value must be measured again before it is used (None: it is trusted)."""
        stale = self.stale()
        if stale is not None:
            return stale
        # A GPU's rate does not depend on what the CPUs do (and others' kernels on the GPU
        # itself show up as an unsteady spread)
        if self.device == "cpu" and self.load is not None and self.load > BUSY_LOAD:
            return f"measured while other work used {self.load:.0%} of the CPUs"
        if self.spread is None or self.spread > STEADY:
            apart = "unknown" if self.spread is None else f"{self.spread:.1%}"
            return f"unsteady: its two best timings {apart} apart"
        return None

    def stale(self) -> str | None:
        """Why this value says nothing about this machine as it is now (another torch, or no
        evidence of the load): measured again even on a busy machine."""
        if self.torch != torch_build():
            return f"measured with torch {self.torch}, now {torch_build()}"
        installed = torch_installed_at()
        try:
            at = datetime.fromisoformat(self.measured_at).timestamp()
        except ValueError:
            return "no time of measurement"
        if installed is not None and at < installed:
            return "measured before this torch was installed"
        if self.load is None and self.load_source != "none":
            return "no reading of the machine's load"
        return None

    def evidence(self) -> dict[str, Any]:
        return {**self.to_json(), "doubt": self.doubt()}


def measure(probe: Callable[[], Timed], device: str = "cpu") -> Measurement:
    """Run ``probe`` (timing a ``device`` of this type) and record what else the machine did
    meanwhile."""
    cpus = our_cpus()
    t0, before = time.perf_counter(), _sample(cpus)
    timed = probe()
    after, seconds = _sample(cpus), time.perf_counter() - t0
    load, source = _others_share(before, after, len(cpus)), "/proc/stat"
    avg = _loadavg()
    avg = None if avg is None else avg / len(cpus)
    if load is None:
        load, source = (avg, "loadavg") if avg is not None else (None, "none")
    return Measurement(
        value=float(timed.value),
        spread=timed.spread,
        rounds=timed.rounds,
        load=load,
        load_source=source,
        loadavg=avg,
        cpus=len(cpus),
        torch=torch_build(),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=seconds,
        device=device,
    )
