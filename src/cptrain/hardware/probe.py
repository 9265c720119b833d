"""What this machine computes fast: the precision ``train.precision: auto`` picks, and the peak
FLOP/s that MFU divides by. Both are measured, cached per machine with their evidence, and
measured again when that evidence is doubtful (``cptrain.hardware.cache``).

Precision (``auto``, the default): bf16 autocast where the hardware computes bf16 natively and a
probe confirms it is clearly faster, else fp32.

* Native bf16: a CUDA device that reports it (``torch.cuda.is_bf16_supported()``); a CPU with
  AVX512-BF16 or AMX-BF16 (the ``avx512_bf16`` / ``amx_bf16`` flags of ``/proc/cpuinfo``, or,
  where that file is missing, a ``torch.backends.cpu.get_cpu_capability()`` naming them).
  Elsewhere bf16 is emulated and typically 2–3× slower than fp32 on a CPU.
* Precision probe: a training forward + backward (the loop's own ``token_loss``) of the run's
  architecture cut to one layer, with the vocabulary capped at 4096, on the run's batch (the
  step's, not the micro-batch: gradient accumulation must not change the precision a run
  trains in), cut so that one pass costs at most ~4 GFLOP on a CPU (``flops_per_token``) but
  keeps at least 512 tokens; fp32 and bf16 autocast alternate, warm-up passes until a round
  is no longer clearly faster than the one before (at most 4 rounds, ~0.5 s), then timed
  passes until each precision's two best agree within 3 % (at least 2, at most 7 each, within
  ~1 s); the ratio of the bests is the speedup. It is the model's own shape because that
  decides: at the tiny preset's widths bf16's casts, norms and small kernels cost more than
  its matmuls save, even with AMX, while a plain 1024×1024 matmul runs several times faster
  in bf16 on such a CPU.
* The decision: a CPU trains in bf16 only when it is native *and* measured faster than the
  cut-off ``BF16_CUTOFF`` (1.10×) by a margin: ``BF16_BAND`` (0.05), or twice the probe's
  spread where that is wider; so bf16 needs at least 1.15×. bf16 costs precision, and inside
  the margin the measurement cannot tell machines apart: a near-tie keeps fp32, so the same
  config trains in the same precision on machines that measure 1.09 and 1.11. A CUDA device
  with native bf16 always trains in bf16 (there the probe only reports the ratio). An explicit
  ``train.precision`` is never overridden, and a resume keeps the checkpoint's.
* Peak probe: ``n×n @ n×n`` matmuls at the run's dtype (n = 1024 on a CPU, 4096 on CUDA), timed
  in blocks of ~0.05 s after a warm-up until the two best blocks agree within 3 % (4 to 20
  blocks within ~0.6 s, 2 at least); the best block's rate (2n³ FLOPs per matmul) is the peak.
  It is the matmul rate this machine achieves with these threads, not a datasheet figure, so
  MFU here reads higher than against a vendor peak. When a run's model FLOP rate exceeds it,
  the probe runs again, once a run, and the run's rate stays a floor, so MFU stays at most 1.

Both are cached in ``hardware.json`` (``hardware_cache.cache_path``), one entry per machine key
(CPU model, torch version, device and, on a CPU, the thread count, since both probes scale with
it), each value with the torch build, time, load and spread it was measured at. A value taken
on a busy machine, with unsteady timings or by another torch build is measured again by the
next run (``hardware_cache.Measurement.doubt``). ``cptrain doctor --hardware`` measures every
cached probe of this machine again and shows old and new. Each run's summary holds the
decision and its evidence (``precision_evidence``, ``peak_evidence``).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cptrain.hardware import cache
from cptrain.hardware.cache import CACHE_ENV, CACHE_FILE, Measurement, Timed, cache_path, spread

if TYPE_CHECKING:
    from cptrain.config import RunConfig
    from cptrain.distributed import DistEnv

__all__ = ["CACHE_ENV", "CACHE_FILE", "cache_path"]  # where tests and doctor find the cache

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# bf16 speed ÷ fp32 speed a CPU must clear for auto to pick bf16 (bf16 costs precision) ...
BF16_CUTOFF = 1.1
# ... by this much at least (or twice the probe's spread): a near-tie is noise, and noise must
# not pick a run's precision
BF16_BAND = 0.05
CPUINFO = Path("/proc/cpuinfo")

# The precision probe's limits: a bigger vocabulary or batch says nothing new about bf16 vs
# fp32; the FLOP budget (one pass, forward + backward) keeps the probe under a second.
_MAX_VOCAB, _MAX_TOKENS, _MIN_TOKENS = 4096, 4096, 512
_PROBE_SECONDS, _PROBE_ROUNDS, _PROBE_MIN_ROUNDS, _WARMUP_ROUNDS = 1.0, 7, 2, 4
_PROBE_FLOPS = {"cpu": 4e9, "cuda": 4e11}
_PEAK_N = {"cpu": 1024, "cuda": 4096}
_PEAK_SECONDS, _PEAK_BLOCK_SECONDS, _PEAK_MIN_BLOCKS, _PEAK_MAX_BLOCKS = 0.6, 0.05, 4, 20

# The probes' timer, a module attribute so that a test can replace it.
clock = time.perf_counter


# ---------------------------------------------------------------- what the machine says
def read_cpuinfo() -> str:
    """``/proc/cpuinfo`` ('' where there is none, e.g. macOS)."""
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags(text: str | None = None) -> set[str]:
    """The first processor's feature flags (``flags`` on x86, ``Features`` on ARM)."""
    text = read_cpuinfo() if text is None else text
    return set((_cpuinfo_field(text, "flags") or _cpuinfo_field(text, "Features") or "").split())


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


def cpu_model() -> str:
    found = _cpuinfo_field(read_cpuinfo(), "model name")
    return found or platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (see the module docstring)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if flags:
        return bool(flags & NATIVE_BF16_FLAGS)
    capability = cpu_capability().upper()
    return "BF16" in capability or "AMX" in capability


def device_name(device: torch.device) -> str:
    return "GPU" if device.type == "cuda" else device.type.upper()


def machine_key(device: torch.device) -> str:
    """What the cached measurements of this machine are filed under."""
    parts = [cpu_model(), f"torch {torch.__version__}", device.type]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    else:
        parts.append(f"{torch.get_num_threads()} threads")
    return " | ".join(parts)


# --------------------------------------------------------------------------- probes
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class PrecisionProbe:
    """What the precision probe trains: the run's own architecture (its Hugging Face config)
    cut to one layer and a vocabulary of at most ``_MAX_VOCAB``, on ``seqs`` sequences of
    ``seq_len`` tokens: the run's batch, cut to the FLOP budget."""

    config: dict[str, Any]
    seqs: int
    seq_len: int

    @classmethod
    def of(
        cls, model_config: Any, batch: int, seq_len: int, device_type: str
    ) -> PrecisionProbe:
        from cptrain.models.flops import flops_per_token, shape_from_hf_config

        cfg = model_config.to_dict()
        cfg.update(num_hidden_layers=1, vocab_size=min(int(cfg["vocab_size"]), _MAX_VOCAB))
        for key in ("quantization_config", "architectures", "transformers_version"):
            cfg.pop(key, None)  # weights are random here: nothing to dequantize or name
        if isinstance(cfg.get("layer_types"), list):  # per-layer settings (Gemma 3, Qwen3)
            cfg["layer_types"] = cfg["layer_types"][:1]
        per_token = flops_per_token(shape_from_hf_config(cfg), seq_len)
        budget = int(_PROBE_FLOPS.get(device_type, _PROBE_FLOPS["cpu"]) // per_token)
        # Never below _MIN_TOKENS (unless the run's batch is smaller): autocast casts every
        # weight once per pass, and with few tokens those casts hide what bf16's matmuls gain.
        tokens = max(1, min(batch * seq_len, _MAX_TOKENS, max(budget, _MIN_TOKENS)))
        seq = min(seq_len, tokens)
        return cls(cfg, max(1, tokens // seq), seq)

    @property
    def name(self) -> str:
        """The probe's cache key: what bf16's gain depends on."""
        c = self.config
        keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings")
        return " ".join(str(c.get(k)) for k in keys) + f" {self.seqs}x{self.seq_len}"

    def to_json(self) -> dict[str, Any]:
        """What ``cptrain doctor --hardware`` needs to run this probe again (as JSON: a value
        JSON cannot hold, should a config carry one, as its string)."""
        data = {"config": self.config, "seqs": self.seqs, "seq_len": self.seq_len}
        return json.loads(json.dumps(data, default=str))

    @classmethod
    def from_json(cls, data: Any) -> PrecisionProbe | None:
        try:
            return cls(dict(data["config"]), int(data["seqs"]), int(data["seq_len"]))
        except (KeyError, TypeError, ValueError):
            return None


def measure_bf16_speedup(device: torch.device, probe: PrecisionProbe) -> Timed:
    """bf16-autocast speed ÷ fp32 speed of one training forward + backward of ``probe``
    (> 1: bf16 is faster), with the larger of the two precisions' spreads. The global RNG, and
    so training, is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cptrain.evaluation.losses import token_loss

    cfg = dict(probe.config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).float()  # fp32 masters, as trained
        rows = torch.randint(0, config.vocab_size, (probe.seqs, probe.seq_len + 1), device=device)
    model.train()

    def once(bf16: bool) -> float:
        t0 = clock()
        token_loss(model, rows, torch.bfloat16 if bf16 else None).backward()
        _sync(device)
        dt = clock() - t0
        model.zero_grad(set_to_none=True)
        return dt

    # Thread pools up, kernels generated and chosen, caches warm: in a fresh process (every
    # run's probe) the first passes cost several times a warm one, however large the model,
    # so warm up until a round is no longer clearly faster than the one before.
    previous, warm_start = None, clock()
    for _ in range(_WARMUP_ROUNDS):
        took = once(False) + once(True)
        if previous is not None and took > 0.8 * previous or clock() - warm_start > 0.5:
            break  # warm, or heavy (or slowed down) enough that one more round says nothing
        previous = took
    start = clock()
    times: dict[bool, list[float]] = {False: [], True: []}

    def unsteady() -> bool:
        return any((spread(t) or 1.0) > cache.STEADY for t in times.values())

    # Best of several: on a shared machine one pass in a few is slowed down. Until both bests
    # are confirmed by a second pass, while time and rounds last.
    while len(times[False]) < _PROBE_MIN_ROUNDS or (
        unsteady() and len(times[False]) < _PROBE_ROUNDS and clock() - start < _PROBE_SECONDS
    ):
        for bf16 in (False, True):  # alternating, so that machine noise hits both alike
            times[bf16].append(once(bf16))
    spreads = [spread(t) for t in times.values()]
    worst = None if None in spreads else max(s for s in spreads if s is not None)
    speedup = min(times[False]) / max(min(times[True]), 1e-12)
    return Timed(speedup, worst, len(times[False]))


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> Timed:
    """The best matmul FLOP/s of ``device`` at ``dtype`` (see the module docstring)."""
    n = _PEAK_N.get(device.type, _PEAK_N["cpu"])
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    t0 = clock()
    torch.mm(a, b, out=out)
    _sync(device)
    reps = max(1, int(_PEAK_BLOCK_SECONDS / max(clock() - t0, 1e-9)))
    times: list[float] = []
    start = clock()
    # The best block, once a second block comes within STEADY of it: one block alone may have
    # been lucky, or (the first, with thread pools still waking) unlucky. On a busy machine
    # blocks stretch far past their planned length: the time limit then wins after two.
    while len(times) < 2 or (
        clock() - start < _PEAK_SECONDS
        and len(times) < _PEAK_MAX_BLOCKS
        and (len(times) < _PEAK_MIN_BLOCKS or (spread(times) or 1.0) > cache.STEADY)
    ):
        t0 = clock()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        _sync(device)
        times.append(max(clock() - t0, 1e-12))
    return Timed(2 * n**3 * reps / min(times), spread(times), len(times))


# --------------------------------------------------------------------------- choices
def bf16_needs(spread: float | None) -> float:
    """The speedup bf16 must reach for ``auto`` to pick it: the cut-off, cleared by
    ``BF16_BAND`` or by twice the probe's spread (each of its two timings may be off by
    that much) where that is wider."""
    return round(BF16_CUTOFF + max(BF16_BAND, 2 * (spread or 0.0)), 4)


@dataclass(frozen=True)
class PrecisionChoice:
    """A run's precision and why: ``source`` is ``auto`` (measured here), ``train.precision``
    (set explicitly) or ``checkpoint`` (a resume keeps what the run started with). For ``auto``:
    the speedup bf16 needed (``needed``), the probe's evidence (``measured``), whether it came
    from the cache, and why it was measured now or a doubted value kept (``note``)."""

    precision: str  # fp32 | bf16
    source: str
    native: bool | None = None
    speedup: float | None = None  # bf16 speed ÷ fp32 speed, measured
    device: str = "CPU"
    needed: float | None = None
    measured: dict[str, Any] | None = field(default=None, compare=False)
    cached: bool = field(default=False, compare=False)
    note: str | None = field(default=None, compare=False)

    @property
    def autocast(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def evidence(self) -> dict[str, Any]:
        """The decision and what it rests on, for the run's summary."""
        out: dict[str, Any] = {"precision": self.precision, "source": self.source}
        if self.source == "auto":
            out.update(
                device=self.device, native_bf16=self.native, speedup=self.speedup,
                cutoff=BF16_CUTOFF, band=BF16_BAND, needed=self.needed,
                cached=self.cached, note=self.note, measurement=self.measured,
            )
        return out

    def line(self) -> str:
        if self.source == "train.precision":
            return f"precision: {self.precision} (train.precision)"
        if self.source == "checkpoint":
            return f"precision: {self.precision} (auto: the run's own, from its checkpoint)"
        doubt = (self.measured or {}).get("doubt")
        note = f" [{doubt}: measured again by a run on a quiet machine]" if doubt else ""
        return self._reason() + note

    def _reason(self) -> str:
        where = f"this {self.device}"
        s = self.speedup
        if s is None:
            return f"precision: {self.precision} ({where} has no native bf16)"
        if self.precision == "bf16":
            speed = f"{s:.1f}× faster than fp32" if s >= 1 else f"{s:.2f}× fp32's speed"
            return f"precision: bf16 (native bf16 on {where}: {speed})"
        ratio = f"bf16 would be ~{1 / s:.1f}× slower" if s < 1 else f"bf16 only {s:.3f}× faster"
        if not self.native:
            return f"precision: fp32 ({where} has no native bf16: {ratio})"
        if s >= 1 and self.needed is not None:
            ratio += f", under the {self.needed:.2f}× it needs"
        return f"precision: fp32 (native bf16 on {where}, but at this model's widths {ratio})"


def auto_precision(device: torch.device, probe: PrecisionProbe) -> PrecisionChoice:
    """What ``auto`` means on this machine for a model of ``probe``'s shape: the cached
    speedup where it is trusted, else measured now (and cached)."""
    native = native_bf16(device)
    if device.type not in _PROBE_FLOPS:
        return PrecisionChoice("fp32", "auto", native, None, device_name(device))
    found, cached, note = bf16_speedup(device, probe)
    needed = bf16_needs(found.spread)
    fast = device.type == "cuda" or found.value >= needed
    return PrecisionChoice(
        "bf16" if native and fast else "fp32", "auto", native, found.value,
        device_name(device), needed, found.evidence(), cached, note,
    )


def bf16_speedup(
    device: torch.device, probe: PrecisionProbe, *, fresh: bool = False
) -> tuple[Measurement, bool, str | None]:
    """The bf16 speedup of ``probe`` on ``device`` (cached where trusted, unless ``fresh``;
    else measured now and cached), whether it came from the cache, and the note of
    ``hardware_cache.look_up``."""
    look = cache.look_up(machine_key(device), "bf16_speedup", probe.name, fresh)
    if look.found is not None and not look.measure:
        return look.found, True, look.note
    found = cache.measure(lambda: measure_bf16_speedup(device, probe), device.type)
    record = {**found.to_json(), "probe": probe.to_json()}
    cache.remember(machine_key(device), "bf16_speedup", probe.name, record)
    return found, False, look.note


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s MFU divides by, and what it rests on (for the run's summary)."""

    value: float
    evidence: dict[str, Any]


def peak(
    device: torch.device,
    precision: str,
    *,
    at_least: float = 0.0,
    measure: bool = True,
    fresh: bool = False,
) -> Peak:
    """The peak matmul FLOP/s of ``device`` at ``precision``: cached where trusted, else
    measured now (and cached).

    ``at_least``: a rate a run achieved. A trusted peak below it is measured again (with
    ``measure``), and the rate stays a floor of this machine's peak (while the torch build is
    the same), so MFU never exceeds 1. ``fresh``: measure, whatever the cache holds."""
    look = cache.look_up(machine_key(device), "peak_flops", precision, fresh)
    found, achieved = look.found, look.record.get("achieved")
    same_build = found is not None and found.torch == cache.torch_build()
    floor = float(achieved) if same_build and isinstance(achieved, int | float) else 0.0
    value = max(found.value, floor) if found is not None else 0.0
    if found is not None and not look.measure and value >= at_least:
        return Peak(value, _peak_evidence(found, floor, True, look.note))
    note = look.note if look.measure else f"below a run's rate of {at_least:.3g} FLOP/s"
    cached = found is not None and not measure  # once a run: a run's rate only raises the floor
    if not cached:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        found = cache.measure(lambda: measure_peak_flops(device, dtype), device.type)
    assert found is not None
    floor = max(floor, at_least)
    record = {**found.to_json(), "achieved": floor or None}
    cache.remember(machine_key(device), "peak_flops", precision, record)
    return Peak(max(found.value, floor), _peak_evidence(found, floor, cached, note))


def _peak_evidence(
    found: Measurement, floor: float, cached: bool, note: str | None
) -> dict[str, Any]:
    return {
        "value": max(found.value, floor),
        "measured": found.value,
        "achieved_floor": floor or None,  # a run's model FLOP rate above the measured peak
        "cached": cached,
        "note": note,
        "measurement": found.evidence(),
    }


def peak_flops(
    device: torch.device, precision: str, *, at_least: float = 0.0, measure: bool = True
) -> float:
    """``peak(...).value``."""
    return peak(device, precision, at_least=at_least, measure=measure).value


def compute_precision(cfg: RunConfig, device: torch.device, precision: str) -> str:
    """The dtype a run's matmuls run in at the resolved ``precision``: FSDP2's mixed precision
    casts parameters to bf16 on a GPU whatever autocast does."""
    d = cfg.distributed
    mixed = d.strategy == "fsdp2" and d.mixed_precision and device.type == "cuda"
    return "bf16" if precision == "bf16" or mixed else "fp32"


def run_precision(
    cfg: RunConfig, env: DistEnv, model: torch.nn.Module, saved: str | None
) -> tuple[str, torch.dtype | None, dict[str, Any]]:
    """The precision a run trains in, its autocast dtype and the decision's evidence (for the
    run's summary): an explicit ``train.precision``; for ``auto`` on a resume the
    checkpoint's (``saved``), else this machine's measured choice. Rank 0 decides and tells
    the others; it prints the choice once."""
    requested = cfg.train.precision
    choice: PrecisionChoice | None = None
    if requested != "auto":
        choice = PrecisionChoice(requested, "train.precision")
    elif saved in ("fp32", "bf16"):
        choice = PrecisionChoice(str(saved), "checkpoint")
    elif env.is_main:
        probe = PrecisionProbe.of(
            model.config, cfg.train.batch_size, cfg.train.seq_len, env.device.type
        )
        choice = auto_precision(env.device, probe)
    choice = env.broadcast_object(choice)
    assert choice is not None
    if env.is_main:
        print(choice.line())
    return choice.precision, choice.autocast, choice.evidence()


def resolved_config(cfg: RunConfig, precision: str) -> dict[str, Any]:
    """``cfg`` as JSON with ``train.precision`` resolved: what a checkpoint records, so that a
    resume with ``auto`` keeps the precision the run started with."""
    out = cfg.model_dump(mode="json")
    out["train"]["precision"] = precision
    return out
