"""The one training loop: tasks in sequence, one optimizer, pluggable replay and Reptile.

Each step trains on ``n_fresh`` windows of the current task (a pure function of seed, task and
cursor) plus, with replay, ``n_replay`` rows drawn from the buffer (a pure function of seed and
step); the fresh rows then enter the buffer, and Reptile (an optimizer post-step hook) may
interpolate the weights. Each task end fills one row of the loss matrix. Every part is built
first; on ``--resume`` one ``CheckpointManager.restore`` loads state into the live objects.
Logging, progress, periodic evaluation, interval checkpoints and exports are hooks (hooks.py).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from cptrain.checkpoint.export import export_model, model_card
from cptrain.checkpoint.manager import CheckpointManager
from cptrain.config import RunConfig
from cptrain.distributed import init_distributed, set_grad_sync, shutdown, wrap_model
from cptrain.evaluation.losses import evaluate_tasks
from cptrain.hardware.cache import cpu_threads
from cptrain.hardware.probe import resolved_config, run_precision
from cptrain.models.build import count_parameters, model_for_config
from cptrain.rundir.run_dir import RunDir, StartMode
from cptrain.train import hooks as H
from cptrain.train.batches import BatchPlan, make_sampler
from cptrain.train.data import TrainingData
from cptrain.train.diagnostics import GradientDiagnostics
from cptrain.train.objective import Objective
from cptrain.train.optim import build_optimizer
from cptrain.train.run_view import RunView
from cptrain.train.schedule import Schedule
from cptrain.train.seed import open_buffer, seed_buffer
from cptrain.train.state import TrainerState
from cptrain.train.stop import StopRequest
from cptrain.train.summary import run_summary

# save_pretrained's per-file progress bars would interleave with the training bar.
hf_logging.disable_progress_bar()
_TORCH_THREADS = torch.get_num_threads()  # torch's default, before any run sets its own


class Trainer:
    """``Trainer(cfg).run()``. ``stop_after=N`` returns after step N (as a kill would, minus
    the kill); ``hooks`` run after the built-in ones."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: StartMode = False,
        progress: bool = True,
        allow_config_change: bool = False,
        stop_after: int | None = None,
        hooks: Sequence[H.Hook] = (),
        data: TrainingData | None = None,  # already checked before torch (train.preflight)
    ):
        torch.set_num_threads(cpu_threads(cfg.train.threads, _TORCH_THREADS))
        self.cfg = cfg
        self.stop_after = stop_after
        self.stop_request = StopRequest()
        self.env = init_distributed(cfg.distributed)
        self._open_data(data)  # data and model first: their errors leave no run directory
        self._build_model()
        self.run_dir, resume = RunDir.start(Path(cfg.run_dir), self.env, resume)
        self.optimizer = build_optimizer(self.model, cfg.train, self.schedule.lr(0))
        self.checkpoints = CheckpointManager(
            self.run_dir.checkpoint_root,
            self.env,
            model=self.model,
            optimizer=self.optimizer,
            tokenizer_dir=self.data.tokenizer_dir,
            keep_last=cfg.checkpoint.keep_last,
            every=cfg.checkpoint.every,
        )
        resume_from = self._check_resumable(allow_config_change) if resume else None
        run_id = resume_from[1] if resume_from else self._start_fresh()
        saved = resume_from[2] if resume_from else None  # a resume keeps the run's precision
        found = run_precision(cfg, self.env, self.model, saved)
        self.precision, self.autocast, self.precision_evidence = found
        self.state = TrainerState(run_id=run_id)
        self._build_components()
        self.hooks: list[H.Hook] = [*self._builtin_hooks(progress and self.env.is_main), *hooks]
        self.view = RunView(self)  # what hooks get: the run's parts, none of its actions
        if resume_from:
            self._restore(resume_from[0])
        else:
            seed_buffer(self, progress and self.env.is_main)

    # ----------------------------------------------------------------- set-up
    def _open_data(self, data: TrainingData | None) -> None:
        cfg = self.cfg
        self.data = data if data is not None else TrainingData(cfg)
        if cfg.model.init_from and data is None:  # preflight checked a given one
            self.data.check_model_tokenizer(cfg.model.init_from)
        self.task_names = self.data.task_names
        self.streams = self.data.streams
        self.plan = BatchPlan.build(cfg, self.env.world_size, self.env.rank)
        self.warnings = self.plan.warnings(cfg, self.data, show=self.env.is_main)
        self.sampler = make_sampler(cfg, self.streams, self.plan, self.data.train_tokens)
        self.schedule = Schedule.for_run(cfg.train, cfg.peak_lr, self.plan.task_steps)

    def _build_model(self) -> None:
        cfg = self.cfg
        model = model_for_config(cfg, self.data.vocab_size, self.data.separators)
        self.model = model.to(self.env.device)
        self.model.train()
        wrapped = wrap_model(self.model, self.env, cfg.distributed)
        self.forward_model: torch.nn.Module = (
            torch.compile(wrapped) if cfg.train.compile else wrapped  # type: ignore[assignment]
        )
        self.n_params = count_parameters(self.model)

    def _build_components(self) -> None:
        cfg = self.cfg
        self.buffer = None
        self.reptile = None
        self.clock = H.Throughput()
        if self.plan.n_replay > 0:
            self.buffer = open_buffer(self)
        self.objective = Objective(self)  # attaches L2-to-start before Reptile attaches
        if cfg.reptile.enabled:
            from cptrain.train.reptile import Reptile

            self.reptile = Reptile(
                self.model.named_parameters(),
                cfg.reptile,
                track_displacement=cfg.diagnostics.every > 0,
            )
            self.reptile.attach(self.optimizer)
        self.diagnostics = GradientDiagnostics(
            cfg.diagnostics.every, cfg.seed, max(1, round(0.25 * cfg.train.batch_size))
        )
        ck = self.checkpoints
        ck.meta = {
            "config": resolved_config(cfg, self.precision),
            **self.data.identity,  # tokenizer_sha256, data_sha256
        }
        ck.register("trainer", self.state, required=True)
        ck.register("sampler", self.sampler, required=True)
        ck.register("diagnostics", self.diagnostics)
        ck.register("throughput", self.clock)
        if self.reptile is not None:
            ck.register("reptile", self.reptile, required=True)
        if self.buffer is not None:
            ck.register("replay", self.buffer, per_rank=True)

    def _builtin_hooks(self, progress: bool) -> list[H.Hook]:
        # Observers only: what changes the run (evaluations, checkpoints, exports, Reptile's
        # task boundary) the loop calls by name, so hooks in any order give the same run.
        return [self.diagnostics, self.clock, H.MetricsLogger(),
                H.TensorBoard(self.cfg.logging.tensorboard, self.env.is_main),
                H.ProgressBar(progress)]

    # ---------------------------------------------------------------- resume
    def _start_fresh(self) -> str:
        run_id = self.env.broadcast_object(
            self.run_dir.attempt_run_id() if self.env.is_main else None
        )
        self.run_dir.write_config(self.cfg)
        self.run_dir.metrics.clear()
        return run_id

    def _check_resumable(self, allow_config_change: bool) -> tuple[Path, str, str]:
        """The checkpoint to resume, its run id and precision, after every compatibility check."""
        path, state = self.checkpoints.resume_point(
            config=self.cfg.model_dump(mode="json"),
            model_vocab=self.model.config.vocab_size,
            identity=self.data.identity,
            data_dir=self.data.dir,
            allow_config_change=allow_config_change,
        )
        return path, str(state["trainer"]["run_id"]), state["config"]["train"]["precision"]

    def _restore(self, path: Path) -> None:
        self.checkpoints.restore(path)
        self.run_dir.metrics.truncate_after(self.state.step)
        if self.env.is_main:
            print(f"resuming from {path} (step {self.state.step} of {self.plan.total_steps})")

    # ------------------------------------------------------------------ loop
    @property
    def finished(self) -> bool:
        return self.state.task_idx >= len(self.plan.task_steps)

    @property
    def at_task_end(self) -> bool:
        """The step just taken was the current task's last."""
        t = self.state.task_idx
        return not self.finished and self.state.task_step == self.plan.task_steps[t]

    @property
    def task_name(self) -> str:
        return self.task_names[min(self.state.task_idx, len(self.task_names) - 1)]

    def _stopped(self) -> bool:
        cut = self.stop_after is not None and self.state.step >= self.stop_after
        return cut or self.stop_request.requested(self.env)

    def _fire(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self.view, *args)

    def run(self) -> dict[str, Any]:
        self.start()
        try:
            if self.state.step == 0 and not self.state.loss_before:
                losses = self.evaluate("before")
                self.state.loss_before = [losses[n] for n in self.data.columns]
            while not self.finished and not self._stopped():
                t = self.state.task_idx
                if self.state.task_step == 0:
                    self.start_task(t)
                while self.state.task_step < self.plan.task_steps[t] and not self._stopped():
                    self.step(t)
                if self.at_task_end:
                    self.finish_task(t)
            if self.finished:
                # A kill between the last checkpoint and its summary leaves an older
                # summary; a resume that finds the run finished rewrites it.
                self.write_summary()
            elif self.stop_request.signalled:
                self.stop_request.save_and_stop(self)
        finally:
            self.stop()
        return self.summary()

    def start(self) -> None:
        """Start the prefetcher and hooks (``run()`` does; a bench driving ``step()`` must)."""
        if self.buffer is not None:
            self.buffer.start_prefetch(
                self.plan.upcoming(self.state.step, self.state.task_idx, self.state.task_step)
            )
        self._wall_mark = time.perf_counter()
        self.stop_request.install()
        self._fire("on_run_start")

    def stop(self) -> None:
        self.stop_request.uninstall()
        self._fire("on_run_end")
        self.close()

    def start_task(self, t: int) -> None:
        if t > 0 and self.reptile is not None:  # reset_at_task_boundary, variant official
            self.reptile.on_task_boundary(self.optimizer)
        self._fire("on_task_start", t)

    def step(self, task_idx: int) -> dict[str, Any]:
        """One optimizer step; hooks see it; then eval.every and checkpoint.every inside tasks
        (task ends always evaluate and save: ``finish_task``)."""
        with self.clock.timed("step"):
            record = self.train_step(task_idx)
        self._fire("on_step_end", record)
        step, every = self.state.step, self.cfg.eval.every
        if not self.at_task_end:
            if every and step % every == 0:
                losses = self.evaluate("eval")  # kept in eval_history, which forgetting counts
                self.state.record_eval([losses[n] for n in self.data.columns])
            if self.checkpoints.should_save(step):
                self.save()
        return record

    def train_step(self, task_idx: int) -> dict[str, Any]:
        """One optimizer step on the current task's fresh rows and the replayed rows."""
        lr = self.schedule.lr(self.state.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        fresh, used = self.sampler.draw(task_idx, self.state.step)
        replay = None
        if self.buffer is not None:
            replay = self.buffer.draw(
                self.state.step, self.plan.n_replay_local, current_task=task_idx
            )
        rows_np = fresh if replay is None or len(replay) == 0 else np.concatenate([fresh, replay])
        self.data.check_token_ids(rows_np, task_idx, self.model.config.vocab_size)
        extra: dict[str, Any] = {}
        with self.clock.timed("diagnostics"):  # measurements, not training: timed apart
            for hook in self.hooks:
                extra.update(hook.before_step(self.view, H.Batch(task_idx, fresh, replay)))
        n_rep_local = 0 if replay is None else len(replay)
        n_rep = int(round(self.env.sum_scalar(n_rep_local))) if self.env.active else n_rep_local
        self.objective.begin_step(len(fresh), self.buffer, self.state.step, len(rows_np),
                                  self.plan.n_fresh + n_rep)
        loss, gnorm = self._forward_backward_step(torch.from_numpy(rows_np), n_rep)
        extra.update(self.objective.end_step())
        if self.buffer is not None:
            for t, idx in used:
                part_rows = self.streams[t].rows(idx) if len(used) > 1 else fresh
                self.buffer.add(part_rows, task_id=t, step=self.state.step, refs=idx)
        n_global = self.plan.n_fresh + n_rep
        self.state.fresh_tokens += self.plan.n_fresh * self.plan.seq_len
        self.state.replay_tokens += n_rep * self.plan.seq_len
        self.state.step += 1
        self.state.task_step += 1
        rec: dict[str, Any] = {"loss": loss, "lr": lr, "grad_norm": gnorm, "replay_rows": n_rep,
                               "effective_alpha": n_rep / n_global, **extra}
        if (cos := getattr(self.reptile, "last_displacement_cosine", None)) is not None:
            rec["reptile_displacement_cos"] = cos
        return rec

    def _forward_backward_step(self, rows: torch.Tensor, n_rep: int) -> tuple[float, float]:
        """Micro-batches, gradient sync on the last, clip, step (Reptile's hook inside), zero."""
        rows = rows.to(self.env.device)
        n_global = self.plan.n_fresh + n_rep
        # Gradients are averaged over ranks, so each row weighs world/global: the result is the
        # mean loss over the whole global batch, whatever the split.
        scale = self.env.world_size / n_global
        mb = self.cfg.micro_batch_size
        loss_sum = 0.0
        starts = list(range(0, rows.shape[0], mb))
        for i, start in enumerate(starts):
            part = rows[start : start + mb]
            with set_grad_sync(self.forward_model, self.env, i == len(starts) - 1):
                loss, anchor = self.objective.loss(self.forward_model, part, start)
                total = loss * (part.shape[0] * scale)
                (total if anchor is None else total + anchor * scale).backward()
            loss_sum += float(loss.detach()) * part.shape[0]
        total_loss = self.env.sum_scalar(loss_sum) / n_global
        gnorm, clip = float("nan"), self.cfg.train.grad_clip
        if clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, gnorm

    def evaluate(self, kind: str | None = None) -> dict[str, float]:
        """Every task's validation loss (evaluation-only ones too); ``kind``: hooks log it."""
        with self.clock.timed("eval"), self._weights_shown():
            losses = evaluate_tasks(
                self.model, self.data.val_sets, window_len=self.data.window_len,
                windows=self.cfg.eval.windows, batch_size=self.cfg.eval.batch_size,
                autocast=self.autocast, device=self.env.device,
            )
        if kind is not None:
            self._fire("on_eval", losses, kind)
        return losses

    def _weights_shown(self) -> AbstractContextManager[None]:
        return self.reptile.evaluated_weights() if self.reptile else nullcontext()

    def finish_task(self, t: int) -> None:
        """Evaluate, fill the loss matrix row, export the task's model, then checkpoint."""
        losses = self.evaluate("task_end")
        self.state.loss_matrix.append([losses[n] for n in self.data.columns])
        card = model_card(self.cfg.model_dump(mode="json"), self.state.state_dict())
        self.export(self.run_dir.task_model_dir(t, self.task_names[t]), card)
        self._fire("on_task_end", t, losses)
        self.state.task_idx += 1
        self.state.task_step = 0
        self.save()
        self.write_summary()

    def save(self) -> Path:
        now = time.perf_counter()
        self.state.wall_s += now - self._wall_mark
        self._wall_mark = now
        with self.clock.timed("checkpoint"):
            return self.checkpoints.save(self.state.step)

    def export(self, out: Path, card: str | None = None) -> None:
        with self.clock.timed("export"), self._weights_shown():
            export_model(self.model, self.env, out, self.data.tokenizer_dir, card=card,
                         base=self.cfg.model.init_from)

    def close(self) -> None:
        self.run_dir.metrics.close()
        if self.buffer is not None:
            self.buffer.close()

    def summary(self) -> dict[str, Any]:
        return run_summary(self)

    def write_summary(self) -> None:
        self.run_dir.write_summary(self.summary())


def train(cfg: RunConfig, *, resume: StartMode = False, progress: bool = True,
          allow_config_change: bool = False, data: TrainingData | None = None) -> dict[str, Any]:
    trainer = Trainer(cfg, resume=resume, progress=progress,
                      allow_config_change=allow_config_change, data=data)
    env = trainer.env
    try:
        return trainer.run()
    finally:
        # DDP's reducer holds the process group: free it while every rank is still up, or the
        # gloo group's destructor can wait forever on a peer that has already exited.
        del trainer
        gc.collect()
        shutdown(env)
