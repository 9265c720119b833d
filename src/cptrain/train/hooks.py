"""Hooks: what watches the loop without being the loop.

The trainer calls every hook, in the order given, at these moments, with a ``RunView`` (the
run's parts to read; the loop's actions, saving, evaluating, exporting, stay the loop's):
  on_run_start(run)                       before the first step of this process
  on_task_start(run, task)                before the first step of a task
  before_step(run, batch) -> dict         rows drawn, weights not yet stepped; fields it
                                          returns join the step's record
  on_step_end(run, record)                after each optimizer step, before eval.every's
                                          evaluation and checkpoint.every's checkpoint; a hook
                                          may add fields to the record for the hooks after it
  on_eval(run, losses, kind)              after each evaluation ("eval", "task_end", …)
  on_task_end(run, task, losses)          after a task's last step, evaluation and model
                                          export, before its checkpoint
  on_run_end(run)                         when the loop stops, also on an error
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from cptrain.errors import ConfigError
from cptrain.progress import Progress, progress_bar

if TYPE_CHECKING:
    from cptrain.train.run_view import RunView


@dataclass
class Batch:
    task: int
    fresh: np.ndarray  # this rank's fresh rows [n, T+1]
    replay: np.ndarray | None  # this rank's replayed rows, if any


class Hook:
    def on_run_start(self, run: RunView) -> None: ...

    def on_task_start(self, run: RunView, task: int) -> None: ...

    def before_step(self, run: RunView, batch: Batch) -> dict[str, Any]:
        return {}

    def on_step_end(self, run: RunView, record: dict[str, Any]) -> None: ...

    def on_eval(self, run: RunView, losses: dict[str, float], kind: str) -> None: ...

    def on_task_end(self, run: RunView, task: int, losses: dict[str, float]) -> None: ...

    def on_run_end(self, run: RunView) -> None: ...


def is_log_step(run: RunView, record: dict[str, Any]) -> bool:
    """Every ``train.log_every`` steps, at each task's last step, and with diagnostics."""
    return (
        run.state.step % run.cfg.train.log_every == 0
        or run.at_task_end
        or "grad_cos" in record
    )


class Throughput(Hook):
    """Where a run's time goes, and how fast it trains. The trainer times its parts with
    ``timed(kind)``: ``step`` (one optimizer step: drawing rows, forward, backward, optimizer,
    buffer add), ``diagnostics`` (the hooks' ``before_step`` inside it: gradient alignment),
    ``eval`` (every evaluation), ``checkpoint`` (checkpoint writes) and ``export`` (the
    Hugging Face weights written after each task). Each log line gets, over the steps since
    the previous one:

    * ``tokens_per_s``: tokens processed ÷ training-step time (steps less diagnostics);
    * ``wall_tokens_per_s``: the same tokens ÷ all the wall time that passed;
    * ``eval_s``, ``checkpoint_s``, ``export_s``: seconds spent evaluating, writing
      checkpoints and exporting weights;
    * ``mfu``: model FLOPs/s (``flops.flops_per_token`` × tokens_per_s) ÷ the peak matmul
      FLOP/s of every process's device at the dtype the matmuls run in (measured per machine
      and cached while its evidence holds: ``cptrain.hardware.probe``; ``summary()`` gives that
      evidence as ``peak_evidence``); rank 0 only.

    Run totals survive a resume (a checkpointed component); ``summary()`` reports them."""

    KINDS = ("step", "diagnostics", "eval", "checkpoint", "export")
    LATER_KINDS = ("export",)  # absent from the state of older checkpoints: counted from 0
    VERSION = 1

    def __init__(self) -> None:
        self.totals = dict.fromkeys(self.KINDS, 0.0)  # whole run, across resumes
        self.counts = dict.fromkeys(self.KINDS, 0)
        self._since = dict.fromkeys(self.KINDS, 0.0)  # since the last log line
        self._process = dict.fromkeys(self.KINDS, 0.0)  # this process, for the ETA
        self.tokens = 0  # processed in the timed steps, whole run
        self.peak_flops: float | None = None
        self.peak_evidence: dict[str, Any] | None = None  # what the peak rests on
        self.peak_dtype = "fp32"
        self._start = self._t = time.perf_counter()
        self._tokens = self._process_steps = 0
        self._flops_per_token = 0
        self._device: torch.device | None = None
        self._rechecked = False

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            for acc in (self.totals, self._since, self._process):
                acc[kind] += dt
            self.counts[kind] += 1

    def on_run_start(self, run: RunView) -> None:
        from cptrain.hardware import probe as hardware
        from cptrain.models.flops import flops_per_token, shape_from_hf_config

        self._start = self._t = time.perf_counter()
        self._since = dict.fromkeys(self.KINDS, 0.0)
        self._process = dict.fromkeys(self.KINDS, 0.0)
        self._tokens = self._process_steps = 0
        shape = shape_from_hf_config(run.model.config.to_dict())
        self._flops_per_token = flops_per_token(shape, run.plan.seq_len)
        device = self._device = run.env.device
        self.peak_dtype = hardware.compute_precision(run.cfg, device, run.precision)
        if run.env.is_main:
            found = hardware.peak(device, self.peak_dtype)
            self.peak_flops, self.peak_evidence = found.value, found.evidence

    def on_step_end(self, run: RunView, record: dict[str, Any]) -> None:
        tokens = (run.plan.n_fresh + record["replay_rows"]) * run.plan.seq_len
        self._tokens += tokens
        self.tokens += tokens
        self._process_steps += 1
        if not is_log_step(run, record):
            return
        now = time.perf_counter()
        s = self._since
        train_s = max(s["step"] - s["diagnostics"], 1e-9)
        record["tokens_per_s"] = self._tokens / train_s
        record["wall_tokens_per_s"] = self._tokens / max(now - self._t, 1e-9)
        record["eval_s"], record["checkpoint_s"] = s["eval"], s["checkpoint"]
        record["export_s"] = s["export"]
        if self.peak_flops and self._device is not None:
            flops = self._flops_per_token * record["tokens_per_s"] / run.env.world_size
            if flops > self.peak_flops:  # a peak measured on a busy machine: measure again
                from cptrain.hardware import probe as hardware

                found = hardware.peak(
                    self._device, self.peak_dtype, at_least=flops, measure=not self._rechecked
                )
                self.peak_flops, self.peak_evidence = found.value, found.evidence
                self._rechecked = True
            record["mfu"] = flops / self.peak_flops
        self._t, self._tokens = now, 0
        self._since = dict.fromkeys(self.KINDS, 0.0)

    def eta(self, run: RunView) -> float | None:
        """Seconds left: remaining steps × this process's mean step time (everything but
        evaluations, checkpoints and exports), plus remaining evaluations, checkpoints and
        task-end exports × their mean times over the run."""
        if not self._process_steps:
            return None
        p = self._process
        elapsed = time.perf_counter() - self._start - p["eval"] - p["checkpoint"] - p["export"]
        step, total, cfg = run.state.step, run.plan.total_steps, run.cfg
        # Evaluations and checkpoints still to come, this step's included (they follow it).
        ends = [e for e in itertools.accumulate(run.plan.task_steps) if e >= step]
        evals = len(ends) + _multiples_left(step, total, cfg.eval.every, ends)
        saves = len(ends) + _multiples_left(step, total, cfg.checkpoint.every, ends)
        steps = (total - step) * elapsed / self._process_steps
        exports = len(ends) * self.mean("export")
        return steps + evals * self.mean("eval") + saves * self.mean("checkpoint") + exports

    def mean(self, kind: str) -> float:
        return self.totals[kind] / self.counts[kind] if self.counts[kind] else 0.0

    def summary(self, world_size: int) -> dict[str, Any]:
        """Run totals for the run's summary: seconds by kind, and training tokens/s and MFU over
        every timed step of the run (a resume of a checkpoint from before these were kept
        counts from the resume on)."""
        train_s = self.totals["step"] - self.totals["diagnostics"]
        out: dict[str, Any] = {
            "train_s": train_s,
            "tokens_per_s": self.tokens / train_s if train_s > 0 else None,
            "eval_s": self.totals["eval"],
            "checkpoint_s": self.totals["checkpoint"],
            "export_s": self.totals["export"],
            "diagnostics_s": self.totals["diagnostics"],
            "peak_dtype": self.peak_dtype,
        }
        if self.peak_flops and train_s > 0:
            out["peak_flops"] = self.peak_flops
            out["peak_evidence"] = self.peak_evidence
            flops = self._flops_per_token * self.tokens
            out["mfu"] = flops / train_s / (self.peak_flops * world_size)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "seconds": dict(self.totals),
            "counts": dict(self.counts),
            "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        try:
            assert state is not None and state["version"] == self.VERSION
            later = dict.fromkeys(self.LATER_KINDS, 0)
            saved_s, saved_n = {**later, **state["seconds"]}, {**later, **state["counts"]}
            seconds = {k: float(saved_s[k]) for k in self.KINDS}
            counts = {k: int(saved_n[k]) for k in self.KINDS}
            tokens = int(state["tokens"])
        except (AssertionError, KeyError, TypeError, ValueError):
            # Timings change no number a run produces: a damaged record restarts them.
            return
        self.totals, self.counts, self.tokens = seconds, counts, tokens


def _multiples_left(step: int, total: int, every: int, ends: list[int]) -> int:
    """Steps in [step, total] that are multiples of ``every`` and not a task end."""
    if not every or step > total:
        return 0
    # counted, not enumerated: the bar asks every step, and a run may have 10⁵ of them
    multiples = total // every - (step - 1) // every
    return multiples - sum(1 for e in ends if step <= e <= total and e % every == 0)


class MetricsLogger(Hook):
    """Train records at log steps and every evaluation into ``metrics.jsonl``."""

    def on_step_end(self, run: RunView, record: dict[str, Any]) -> None:
        if not is_log_step(run, record):
            return
        record.update(type="train", step=run.state.step, task=run.task_name)
        record["precision"] = run.precision
        if run.env.device.type == "cuda":
            record["cuda_max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if run.buffer is not None:
            stats = run.buffer.stats()
            record.update({f"buffer_{k}": v for k, v in stats.items() if not isinstance(v, dict)})
        run.run_dir.metrics.write(record)

    def on_eval(self, run: RunView, losses: dict[str, float], kind: str) -> None:
        run.run_dir.metrics.write(
            {
                "type": kind,
                "step": run.state.step,
                "task": run.task_name,
                "val_loss": losses,
                "union_loss": run.data.union_loss(losses, run.cfg.eval.windows),
            }
        )


class ProgressBar(Hook):
    """A tqdm bar of steps showing training tokens/s (``Throughput``'s) and an ETA that counts
    the evaluations and checkpoints still to come (tqdm's own would spread their pauses over
    the steps); without a bar (``progress=False``), a line per finished task."""

    FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Progress | None = None
        self._text = ""

    def on_run_start(self, run: RunView) -> None:
        self._bar = progress_bar(
            total=run.plan.total_steps,
            initial=run.state.step,
            unit="step",
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=1.0,
            bar_format=self.FORMAT,
        )

    def on_step_end(self, run: RunView, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        if "tokens_per_s" in record:
            self._text = (
                f"{run.task_name} loss {record['loss']:.3f} "
                f"{record['tokens_per_s']:,.0f} tok/s"
            )
        if self.enabled:
            eta = run.clock.eta(run)
            left = f"ETA {tqdm.format_interval(eta)}" if eta is not None else ""
            postfix = ", ".join(x for x in (left, self._text) if x)
            self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(1)

    def on_eval(self, run: RunView, losses: dict[str, float], kind: str) -> None:
        if kind == "before" and not self.enabled and run.env.is_main:
            print(f"before training: val loss {_losses(losses)}")

    def on_task_end(self, run: RunView, task: int, losses: dict[str, float]) -> None:
        if not self.enabled and run.env.is_main:
            name, step = run.task_names[task], run.state.step
            print(f"after {name} (step {step}): val loss {_losses(losses)}")

    def on_run_end(self, run: RunView) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in losses.items())


def after_the_newest_event_file(log_dir: Path, max_wait_s: float = 1.5) -> None:
    """Waits, if need be, until a new event file's name sorts after every one in ``log_dir``.

    TensorBoard reads a folder's event files in name order, and a name starts with the second
    its writer opened, then host, pid and a per-process counter. A resume in the same second as
    the attempt before it (in one process: counter 10 sorts before 9) would be read first, and
    the older file's step-0 events would then purge it as out of order. A newest name more than
    ``max_wait_s`` ahead of the clock is clock skew, not a same-second start: no wait then."""
    stamps = [
        int(parts[3])
        for f in log_dir.glob("events.out.tfevents.*")
        if len(parts := f.name.split(".")) > 3 and parts[3].isdigit()
    ]
    if not stamps:
        return
    wait = max(stamps) + 1 - time.time()
    if 0 < wait <= max_wait_s:
        time.sleep(wait)


class TensorBoard(Hook):
    """``logging.tensorboard``: what ``metrics.jsonl`` gets, as TensorBoard scalars under
    ``<run_dir>/tensorboard/`` (rank 0): each numeric field of a logged train record as
    ``train/<field>``, each evaluation as ``val_loss/<task>`` and ``union_loss``. ``auto``: on
    when the ``tensorboard`` package is installed. A resume purges the events after its
    checkpoint's step (``purge_step``), as ``metrics.jsonl`` drops those records; a fresh start
    purges those of an attempt that died before its first checkpoint."""

    def __init__(self, setting: bool | str, is_main: bool = True):
        import importlib.util

        installed = importlib.util.find_spec("tensorboard") is not None
        if setting is True and not installed:
            raise ConfigError(
                "logging.tensorboard is true but the tensorboard package is not installed; "
                "pip install tensorboard (or set logging.tensorboard: auto)"
            )
        self.enabled = is_main and installed and setting is not False
        self._writer: Any = None

    def on_run_start(self, run: RunView) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        step = run.state.step
        log_dir = run.run_dir.path / "tensorboard"
        after_the_newest_event_file(log_dir)
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1 if step else 0)

    def on_step_end(self, run: RunView, record: dict[str, Any]) -> None:
        if self._writer is None or not is_log_step(run, record):
            return
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self._writer.add_scalar(f"train/{key}", value, run.state.step)

    def on_eval(self, run: RunView, losses: dict[str, float], kind: str) -> None:
        if self._writer is None:
            return
        step = run.state.step
        for task, loss in losses.items():
            self._writer.add_scalar(f"val_loss/{task}", loss, step)
        union = run.data.union_loss(losses, run.cfg.eval.windows)
        self._writer.add_scalar("union_loss", union, step)
        self._writer.flush()

    def on_run_end(self, run: RunView) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
