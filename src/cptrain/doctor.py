"""``cptrain doctor RUN``: check a run directory and say how to resume it.

Reads only; changes nothing. Checks the run's config, every checkpoint (manifest, sizes,
sha256), the replay buffer of each rank against the newest good checkpoint (row counts and
CRCs), the token shards and tokenizer the run uses, and that the checkpoint's model still
matches the data. Prints what is intact, what is damaged, and the command that resumes.

``cptrain doctor --hardware``: measures this machine's probes again, ignoring the cache (the
matmul peak MFU divides by, and the bf16 speedup of every model shape ``precision: auto`` has
probed here), prints the cached and the new values with their evidence side by side, and
caches the new ones (``cptrain.hardware.probe``).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cptrain import checkpoint as ckpt
from cptrain.checkpoint import compat
from cptrain.config import RunConfig, config_differences, load_run_config
from cptrain.errors import ConfigError, CptrainError
from cptrain.rundir.run_dir import RunDir

Status = Literal["ok", "damaged", "note"]
_LABEL = {"ok": "ok", "damaged": "DAMAGED", "note": "note"}


@dataclass(frozen=True)
class Item:
    status: Status
    subject: str
    detail: str
    blocks: bool = False  # a resume would fail because of it


@dataclass
class Report:
    run_dir: Path
    items: list[Item] = field(default_factory=list)
    resume_from: Path | None = None
    resume_step: int | None = None
    command: str | None = None
    blocking: str | None = None  # why the run cannot be resumed as it is
    complete: bool = False  # finished: nothing to resume

    @property
    def resumable(self) -> bool:
        return self.blocking is None and self.command is not None

    @property
    def damaged(self) -> list[Item]:
        return [i for i in self.items if i.status == "damaged"]

    def add(self, status: Status, subject: str, detail: str, blocks: bool | None = None) -> None:
        blocking = status == "damaged" if blocks is None else blocks
        self.items.append(Item(status, subject, detail, blocking))

    def render(self) -> str:
        lines = [f"cptrain doctor: {self.run_dir}"]
        lines += [f"  {_LABEL[i.status]:<8} {i.subject}: {i.detail}" for i in self.items]
        if self.complete:
            lines.append(f"complete: the run finished (step {self.resume_step}); nothing to "
                         "resume")
        elif self.resumable:
            lines.append(f"resumable from {self.resume_from} (step {self.resume_step}):")
            lines.append(f"  {self.command}")
        else:
            lines.append(f"NOT resumable: {self.blocking}")
            if self.command:
                lines.append(f"  {self.command}")
        return "\n".join(lines)


def diagnose(run_dir: Path) -> Report:
    """Check everything a resume of ``run_dir`` depends on (read-only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; pass a run_dir of a run")
    config_path = run_dir / "config.yaml"
    root = run_dir / "checkpoints"
    if not config_path.is_file() and not ckpt.list_checkpoints(root):
        raise ConfigError(
            f"{run_dir} is not a cptrain run directory (no config.yaml, no checkpoints/); "
            "pass the run_dir of a `cptrain train` run"
        )
    report = Report(run_dir)
    cfg = _check_config(report, config_path)
    good = _check_checkpoints(report, root)
    state = _checkpoint_state(report, good)
    if cfg is not None and state is not None:
        _check_config_matches(report, cfg, state)
    if state is not None:
        _check_buffers(report, cfg, state, run_dir)
    if cfg is not None:
        _check_data(report, cfg, good)
    _check_metrics(report, run_dir)
    _conclude(report, config_path, good, state, cfg)
    return report


def main_doctor(run_dir: Path | str) -> int:
    """The ``cptrain doctor RUN`` command: print the report; 0 when resumable or complete,
    else 2."""
    report = diagnose(Path(run_dir))
    print(report.render())
    return 0 if report.resumable or report.complete else 2


# -------------------------------------------------------------------------- hardware
def main_hardware() -> int:
    """The ``cptrain doctor --hardware`` command (see the module docstring); 0."""
    import torch

    from cptrain.hardware import cache
    from cptrain.hardware import probe as hardware

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    key = hardware.machine_key(device)
    machines = cache.read_cache().get("machines", {})
    entry = machines.get(key, {})
    print(f"cptrain doctor --hardware: {cache.cache_path()}")
    print(f"machine: {key}")
    peaks = entry.get("peak_flops") or {}
    doubted = False
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not (hardware.native_bf16(device) or "bf16" in peaks):
            continue  # emulated bf16: no run's matmuls run in it
        new = hardware.peak(device, precision, fresh=True)
        m = new.evidence["measurement"]
        doubted |= _show(f"peak {precision}", peaks.get(precision), m, _flops)
    speedups = entry.get("bf16_speedup") or {}
    if not speedups:
        print("  bf16 speedup: none cached yet (a run with precision: auto probes its model)")
    for name, old in speedups.items():
        probe = hardware.PrecisionProbe.from_json(old.get("probe"))
        if probe is None:
            print(f"  bf16 speedup {name}: cached without its probe; a run measures it again")
            continue
        found, _, _ = hardware.bf16_speedup(device, probe, fresh=True)
        doubted |= _show(f"bf16 speedup {name}", old, found.evidence(), lambda v: f"{v:.3f}×")
        needs = hardware.bf16_needs(found.spread)
        pick = "bf16" if hardware.native_bf16(device) and found.value >= needs else "fp32"
        print(f"    auto: {pick} (bf16 needs {needs:.2f}×; native bf16: "
              f"{'yes' if hardware.native_bf16(device) else 'no'})")
    for other in sorted(set(machines) - {key}):
        print(f"also cached, not measured now (another thread count or torch): {other}")
    if doubted:
        print("DOUBTED values are measured again by the next run that needs them; run "
              "`cptrain doctor --hardware` again when the machine is quiet")
    return 0


def _flops(value: float) -> str:
    return f"{value / 1e9:,.1f} GFLOP/s"


def _show(what: str, old: Any, new: dict[str, Any], fmt: Any) -> bool:
    """Print a cached and a new measurement; whether the new one is doubted."""
    print(f"  {what}")
    before = _cached_evidence(old)
    print(f"    cached: {_evidence_lines(before, fmt) if before else 'none'}")
    print(f"    now:    {_evidence_lines(new, fmt)}")
    return bool(new["doubt"])


def _cached_evidence(record: Any) -> dict[str, Any] | None:
    """A cached record as evidence (with its doubt), None when there is none to show."""
    from cptrain.hardware.cache import Measurement

    found = Measurement.from_json(record)
    return found.evidence() if found is not None else None


def _evidence_lines(m: dict[str, Any], fmt: Any) -> str:
    verdict = f"DOUBTED, {m['doubt']}" if m["doubt"] else "trusted"
    load = "load unknown" if m["load"] is None else f"others used {m['load']:.0%} of the CPUs"
    avg = "" if m["loadavg"] is None else f" (load average {m['loadavg']:.2f} per CPU)"
    spread = "?" if m["spread"] is None else f"{m['spread']:.1%}"
    return (f"{fmt(m['value'])} at {m['measured_at']}: {verdict}\n"
            f"            {load}{avg}; two best {spread} apart in {m['rounds']} rounds; "
            f"torch {m['torch']}")


# --------------------------------------------------------------------------- config
def _check_config(report: Report, path: Path) -> RunConfig | None:
    if not path.is_file():
        report.add("damaged", "config.yaml", "missing; resume with the run's own YAML file")
        return None
    try:
        cfg = load_run_config(path)
    except ConfigError as exc:
        report.add("damaged", "config.yaml", str(exc))
        return None
    report.add("ok", "config.yaml", "valid")
    return cfg


def _check_config_matches(report: Report, cfg: RunConfig, state: dict[str, Any]) -> None:
    saved = state.get("config")
    if not isinstance(saved, dict):
        return
    diffs = config_differences(saved, cfg.model_dump(mode="json"))
    if diffs:
        more = f" ({len(diffs) - 1} more)" if len(diffs) > 1 else ""
        report.add(
            "damaged",
            "config.yaml vs checkpoint",
            f"{diffs[0]}{more}; restore the old value (--resume refuses a result-changing "
            "change unless --allow-config-change)",
        )


# ----------------------------------------------------------------------- checkpoints
def _check_checkpoints(report: Report, root: Path) -> Path | None:
    """Verify every checkpoint in full; return the newest intact one. Damaged checkpoints do
    not block a resume: it skips them, as this report says."""
    newest_good: Path | None = None
    for _, path in reversed(ckpt.list_checkpoints(root)):
        reason = ckpt.verify(path, full=True)
        if reason is None:
            n = len(json.loads((path / "MANIFEST.json").read_text())["files"])
            report.add("ok", f"checkpoint {path.name}", f"complete; sha256 of {n} files match")
            newest_good = newest_good or path
        else:
            report.add("damaged", f"checkpoint {path.name}", f"{reason}; resume skips it",
                       blocks=False)
    moved = ckpt.interrupted_resaves(root)
    for step, old in reversed(moved):
        reason = ckpt.verify(old, full=True)
        if reason is not None:
            report.add("damaged", f"checkpoint {old.name}", reason, blocks=False)
            continue
        report.add("note", f"checkpoint {old.name}",
                   f"complete copy of step {step} moved aside by an interrupted re-save; "
                   f"--resume puts it back as step_{step:09d}")
        if newest_good is None or step > _step_of(newest_good):
            newest_good = old
    for stale in ckpt.leftovers(root):
        if stale not in {p for _, p in moved}:
            report.add("note", f"checkpoints/{stale.name}",
                       "left by an interrupted save; deleted at the next checkpoint")
    if newest_good is None and not ckpt.list_checkpoints(root):
        report.add("note", "checkpoints", "none yet")
    return newest_good


def _step_of(path: Path) -> int:
    return int(json.loads((path / "MANIFEST.json").read_text())["step"])


def _checkpoint_state(report: Report, path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report.add("damaged", f"checkpoint {path.name}", "state.json is unreadable")
        return None
    if state.get("format") != ckpt.FORMAT:
        report.add("damaged", f"checkpoint {path.name}", f"unknown format {state.get('format')!r}")
        return None
    report.resume_from, report.resume_step = path, int(state.get("step", -1))
    return state


# --------------------------------------------------------------------- replay buffer
def _buffer_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(state.get("replay"), dict):
        return [state["replay"]]
    ranks = state.get("ranks") or []
    return [r["replay"] for r in ranks if isinstance(r, dict) and isinstance(r.get("replay"), dict)]


def _check_buffers(
    report: Report, cfg: RunConfig | None, state: dict[str, Any], run_dir: Path
) -> None:
    saved_cfg = state.get("config") or {}
    replay_dir = (cfg.replay.dir if cfg is not None else None) or (
        (saved_cfg.get("replay") or {}).get("dir")
    )
    base = Path(replay_dir) if replay_dir else run_dir / "replay"
    for buf in _buffer_states(state):
        rank = buf.get("rank", 0)
        subject = f"replay buffer rank {rank}"
        problem = check_buffer(base / f"rank_{rank}", buf)
        if problem is None:
            rows = buf["store"]["rows"]
            report.add("ok", subject, f"{rows} rows match the checkpoint's row count and CRCs")
        else:
            report.add("damaged", subject, problem)


def check_buffer(directory: Path, buf: dict[str, Any]) -> str | None:
    """Read-only check of one rank's replay files against a checkpoint's buffer state, the one
    a resume makes before it changes anything (replay.storage.check_store): the manifest
    belongs to the run, the rows the checkpoint counts exist, sealed chunks match the
    manifest's CRCs, the open chunk's prefix the checkpoint's running CRCs. None when intact,
    else a one-line reason."""
    from cptrain.replay import storage

    try:
        layout = storage.Layout(buf["storage"], buf["token_dtype"], int(buf["row_len"]))
        store, run_id, rank = buf["store"], buf["run_id"], buf.get("rank", 0)
    except (KeyError, TypeError, ValueError):
        return "the checkpoint's replay state is incomplete"
    try:
        storage.check_store(directory, layout, store, run_id=run_id, rank=rank)
    except CptrainError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------- data, tokenizer
def _check_data(report: Report, cfg: RunConfig, good: Path | None) -> None:
    from cptrain.data.prepare import load_prepared, load_prepared_tokenizer, open_split

    data_dir = Path(cfg.data.dir)
    try:
        info = load_prepared(data_dir)
        load_prepared_tokenizer(data_dir)
    except CptrainError as exc:
        report.add("damaged", f"data {data_dir}", str(exc))
        return
    report.add("ok", f"tokenizer {data_dir / 'tokenizer'}", "matches prepare.json")
    vocab = 0
    for task in (t.name for t in cfg.data.tasks):
        for split in ("train", "val"):
            subject = f"shards {task}/{split}"
            try:
                shards = open_split(data_dir, task, split)
                shards.verify(full=True)
            except CptrainError as exc:
                report.add("damaged", subject, str(exc))
                continue
            vocab = max(vocab, shards.vocab_size)
            report.add(
                "ok", subject, f"{shards.num_tokens} tokens in {len(shards.files)} file(s); "
                "sha256 match"
            )
    if good is not None:
        _check_model_matches_data(report, cfg, good, info, vocab)


def _check_model_matches_data(
    report: Report, cfg: RunConfig, good: Path, info: dict[str, Any], vocab: int
) -> None:
    from cptrain.checkpoint.manager import CheckpointManager

    subject = f"checkpoint {good.name} vs data"
    try:
        rows = CheckpointManager.model_vocab(good)
    except CptrainError:
        rows = None
    # A pretrained model (init_from) may have more embedding rows than the data uses.
    if rows is not None and vocab > rows:
        problem = compat.vocab_problem(rows, vocab, cfg.data.dir)
        report.add("damaged", subject, f"{problem} (the data was re-prepared with another "
                   "tokenizer)")
        return
    try:
        trained = json.loads((good / "state.json").read_text()).get("tokenizer_sha256")
    except (OSError, ValueError):
        return
    problem = compat.tokenizer_problem(trained, info["tokenizer"]["sha256"], cfg.data.dir)
    if problem:
        report.add("damaged", subject, problem)


# --------------------------------------------------------------------------- metrics
def _check_metrics(report: Report, run_dir: Path) -> None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    good, torn, last = 0, 0, None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line).get("step")
            good += 1
        except (json.JSONDecodeError, AttributeError):
            torn += 1
            continue
        if isinstance(step, int):
            last = step if last is None else max(last, step)
    detail = f"{good} records, last step {last}"
    notes = []
    if torn:
        notes.append(f"{torn} torn line(s)")
    if report.resume_step is not None and isinstance(last, int) and last > report.resume_step:
        notes.append(f"records after step {report.resume_step}")
    if notes:
        detail += f"; {' and '.join(notes)} are dropped on resume"
    report.add("note" if notes else "ok", "metrics.jsonl", detail)


# -------------------------------------------------------------------------- verdict
def _train_command(config_path: Path, cfg: RunConfig | None, world: int) -> str:
    """The command that really continues this run where it lies now: torchrun with the world
    size the checkpoints were written with, and the run's current directory when it moved."""
    launch = "cptrain train"
    if world > 1:
        launch = f"torchrun --nproc_per_node={world} -m cptrain.cli train"
    cmd = f"{launch} {shlex.quote(str(config_path))}"
    here = config_path.parent
    if cfg is not None and Path(cfg.run_dir).resolve() != here.resolve():
        cmd += f" --set run_dir={shlex.quote(str(here))}"  # moved or copied since it ran
    return cmd


def _conclude(
    report: Report,
    config_path: Path,
    good: Path | None,
    state: dict[str, Any] | None,
    cfg: RunConfig | None,
) -> None:
    world = int(state.get("world_size", 1)) if state is not None else 1
    cmd = _train_command(config_path, cfg, world)
    blocking = [i for i in report.items if i.blocks]
    if good is None or state is None:
        report.blocking = "no complete checkpoint"
        if config_path.is_file():
            report.blocking += "; start the run again (the old attempt is kept under attempts/)"
            report.command = f"{cmd} --restart"
        return
    if blocking:
        first = blocking[0]
        report.blocking = f"{first.subject}: {first.detail}"
        return
    if _finished(config_path.parent):
        report.complete = True
        return
    report.command = f"{cmd} --resume"


def _finished(run_dir: Path) -> bool:
    return RunDir(run_dir).finished()
