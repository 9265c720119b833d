"""What this machine computes fast: the precision ``train.precision: auto`` picks, and the peak
FLOP/s that MFU divides by. Both are measured once per machine and remembered.

Precision (``auto``, the default): bf16 autocast where the hardware computes bf16 natively and a
probe confirms it is faster, else fp32.

* Native bf16: a CUDA device that reports it (``torch.cuda.is_bf16_supported()``); a CPU with
  AVX512-BF16 or AMX-BF16 (the ``avx512_bf16`` / ``amx_bf16`` flags of ``/proc/cpuinfo``, or,
  where that file is missing, a ``torch.backends.cpu.get_cpu_capability()`` naming them).
  Elsewhere bf16 is emulated and typically 2–3× slower than fp32 on a CPU.
* Precision probe: a training forward + backward (the loop's own ``token_loss``) of the run's
  architecture cut to one layer, with the vocabulary capped at 4096, on the run's batch (the
  step's, not the micro-batch: gradient accumulation must not change the precision a run
  trains in), cut so that one pass costs at most ~4 GFLOP on a CPU (``flops_per_token``) but
  keeps at least 512 tokens; fp32 and bf16 autocast alternate, two warm-up passes each (one
  when a pass is slow), then the best of up to 7 timed passes each within ~1 s (at least
  one). It is the model's own shape because that decides: at the tiny preset's widths bf16's
  casts, norms and small kernels cost more than its matmuls save, even with AMX, while a plain
  1024×1024 matmul runs several times faster in bf16 on such a CPU. A CPU trains in bf16 only
  when it is native *and* measured at least ``BF16_MARGIN`` (1.1×) faster (bf16 costs
  precision, so near a tie goes to fp32); a CUDA device with native bf16 always does (there
  the probe only reports the ratio).
* Peak probe: ``n×n @ n×n`` matmuls at the run's dtype (n = 1024 on a CPU, 4096 on CUDA),
  timed in blocks of ~0.1 s for ~0.5 s after a warm-up; the best block's rate (2n³ FLOPs per
  matmul) is the peak. It is the matmul rate this machine achieves with these threads, not a
  datasheet figure, so MFU here reads higher than against a vendor peak. A peak only rises:
  when a run's model FLOP rate exceeds it (it was measured while the machine was busy), the
  probe runs again, once a run, and the higher figure is kept, so MFU stays at most 1.

Results live in ``hardware.json`` under ``$CPTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cptrain``,
else ``~/.cache/cptrain``; one entry per machine key (CPU model, torch version, device and, on a
CPU, the thread count, since both probes scale with it). Delete the file to measure again. An
unwritable cache only means measuring again next time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cptrain.fsutil import atomic_write_json

if TYPE_CHECKING:
    from cptrain.config import RunConfig
    from cptrain.distributed import DistEnv

CACHE_ENV = "CPTRAIN_CACHE_DIR"
CACHE_FILE = "hardware.json"
CACHE_FORMAT = 1
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# bf16 speed ÷ fp32 speed a CPU must reach for auto to pick bf16: bf16 costs precision, and a
# tie is noise
BF16_MARGIN = 1.1
CPUINFO = Path("/proc/cpuinfo")

# The precision probe's limits: a bigger vocabulary or batch says nothing new about bf16 vs
# fp32; the FLOP budget (one pass, forward + backward) keeps the probe under a second.
_MAX_VOCAB, _MAX_TOKENS, _MIN_TOKENS = 4096, 4096, 512
_PROBE_SECONDS, _PROBE_ROUNDS, _SLOW_PASS = 1.0, 7, 0.1
_PROBE_FLOPS = {"cpu": 4e9, "cuda": 4e11}
_PEAK_N = {"cpu": 1024, "cuda": 4096}
_PEAK_SECONDS, _PEAK_BLOCK_SECONDS = 0.5, 0.1

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


# ---------------------------------------------------------------------------- cache
def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cptrain" / CACHE_FILE


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("format") == CACHE_FORMAT
    return data if ok and isinstance(data.get("machines"), dict) else {}


def _cached(device: torch.device, kind: str, name: str) -> Any:
    entry = _read_cache().get("machines", {}).get(machine_key(device), {})
    return entry.get(kind, {}).get(name) if isinstance(entry.get(kind), dict) else None


def _remember(device: torch.device, kind: str, name: str, value: Any) -> None:
    data = _read_cache() or {"format": CACHE_FORMAT, "machines": {}}
    entry = data["machines"].setdefault(machine_key(device), {})
    entry.setdefault(kind, {})[name] = value
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except OSError:
        pass  # a read-only home costs a measurement per run, nothing else


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
        from cptrain.flops import flops_per_token, shape_from_hf_config

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


def measure_bf16_speedup(device: torch.device, probe: PrecisionProbe) -> float:
    """bf16-autocast speed ÷ fp32 speed of one training forward + backward of ``probe``
    (> 1: bf16 is faster). The global RNG, and so training, is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cptrain.evaluate import token_loss

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

    start = clock()
    for _ in range(2):  # thread pools up, kernels chosen, caches warm
        if max(once(False), once(True)) > _SLOW_PASS:
            break  # a heavy pass warms up enough at once
    times: dict[bool, list[float]] = {False: [], True: []}
    # The best of up to _PROBE_ROUNDS: on a shared machine one pass in a few is slowed down.
    while len(times[False]) < _PROBE_ROUNDS and (
        not times[False] or clock() - start < _PROBE_SECONDS
    ):
        for bf16 in (False, True):  # alternating, so that machine noise hits both alike
            times[bf16].append(once(bf16))
    return min(times[False]) / max(min(times[True]), 1e-12)


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
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
    best, start, blocks = 0.0, clock(), 0
    while blocks < 2 or (clock() - start < _PEAK_SECONDS and blocks < 20):
        t0 = clock()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        _sync(device)
        best = max(best, 2 * n**3 * reps / max(clock() - t0, 1e-12))
        blocks += 1
    return best


# --------------------------------------------------------------------------- choices
@dataclass(frozen=True)
class PrecisionChoice:
    """A run's precision and why: ``source`` is ``auto`` (measured here), ``train.precision``
    (set explicitly) or ``checkpoint`` (a resume keeps what the run started with)."""

    precision: str  # fp32 | bf16
    source: str
    native: bool | None = None
    speedup: float | None = None  # bf16 speed ÷ fp32 speed, measured
    device: str = "CPU"

    def line(self) -> str:
        if self.source == "train.precision":
            return f"precision: {self.precision} (train.precision)"
        if self.source == "checkpoint":
            return f"precision: {self.precision} (auto: the run's own, from its checkpoint)"
        where = f"this {self.device}"
        s = self.speedup
        if s is None:
            return f"precision: {self.precision} ({where} has no native bf16)"
        if self.precision == "bf16":
            speed = f"{s:.1f}× faster than fp32" if s >= 1 else f"{s:.2f}× fp32's speed"
            return f"precision: bf16 (native bf16 on {where}: {speed})"
        ratio = (
            f"bf16 would be ~{1 / s:.1f}× slower" if s < 1 else f"bf16 only {s:.2f}× faster"
        )
        if not self.native:
            return f"precision: fp32 ({where} has no native bf16: {ratio})"
        return f"precision: fp32 (native bf16 on {where}, but at this model's widths {ratio})"


def auto_precision(device: torch.device, probe: PrecisionProbe) -> PrecisionChoice:
    """What ``auto`` means on this machine for a model of ``shape`` (measured once, cached)."""
    native = native_bf16(device)
    if device.type not in _PROBE_FLOPS:
        return PrecisionChoice("fp32", "auto", native, None, device_name(device))
    speedup = _cached(device, "bf16_speedup", probe.name)
    if not isinstance(speedup, int | float):
        speedup = measure_bf16_speedup(device, probe)
        _remember(device, "bf16_speedup", probe.name, speedup)
    fast = device.type == "cuda" or speedup >= BF16_MARGIN
    return PrecisionChoice(
        "bf16" if native and fast else "fp32", "auto", native, float(speedup), device_name(device)
    )


def peak_flops(
    device: torch.device, precision: str, *, at_least: float = 0.0, measure: bool = True
) -> float:
    """The peak matmul FLOP/s of ``device`` at ``precision`` (measured once, cached).

    ``at_least``: a rate a run achieved. A cached peak below it was measured while the machine
    was busy: it is measured again (with ``measure``) and the highest of the old peak, the new
    one and ``at_least`` is kept, so a peak only rises and MFU never exceeds 1."""
    found = _cached(device, "peak_flops", precision)
    found = float(found) if isinstance(found, int | float) and found > 0 else 0.0
    if found and found >= at_least:
        return found
    peak = max(found, at_least)
    if measure or not peak:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = max(peak, measure_peak_flops(device, dtype))
    _remember(device, "peak_flops", precision, peak)
    return peak


def compute_precision(cfg: RunConfig, device: torch.device, precision: str) -> str:
    """The dtype a run's matmuls run in at the resolved ``precision``: FSDP2's mixed precision
    casts parameters to bf16 on a GPU whatever autocast does."""
    d = cfg.distributed
    mixed = d.strategy == "fsdp2" and d.mixed_precision and device.type == "cuda"
    return "bf16" if precision == "bf16" or mixed else "fp32"


def run_precision(
    cfg: RunConfig, env: DistEnv, model: torch.nn.Module, saved: str | None
) -> tuple[str, torch.dtype | None]:
    """The precision a run trains in, and its autocast dtype: an explicit ``train.precision``;
    for ``auto`` on a resume the checkpoint's (``saved``), else this machine's measured choice.
    Rank 0 decides and tells the others; it prints the choice once."""
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
    return choice.precision, torch.bfloat16 if choice.precision == "bf16" else None


def resolved_config(cfg: RunConfig, precision: str) -> dict[str, Any]:
    """``cfg`` as JSON with ``train.precision`` resolved: what a checkpoint records, so that a
    resume with ``auto`` keeps the precision the run started with."""
    out = cfg.model_dump(mode="json")
    out["train"]["precision"] = precision
    return out
