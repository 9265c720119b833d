"""The public Python API (``cptrain.ReplayBuffer``, ``cptrain.Reptile``, ``cptrain.LossMatrix``):
thin facades over the components ``cptrain train`` runs, with constructors that ask for what a
user's own loop has (a model, an optimizer, rows of token ids) instead of a run config."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml

from cptrain import fsutil
from cptrain.config import ReptileConfig, RunConfig
from cptrain.config_base import build_config
from cptrain.data.shards import ShardSet
from cptrain.errors import ConfigError
from cptrain.evaluation import metrics
from cptrain.evaluation.losses import eval_indices, evaluate_tasks
from cptrain.integrations.data import ArrayWindows
from cptrain.models.flops import run_flops
from cptrain.replay.buffer import ReplayBuffer as _Buffer
from cptrain.replay.config import ReplayConfig
from cptrain.replay.mixer import mix_counts, split_for_rank
from cptrain.rundir import layout
from cptrain.rundir.run_dir import MetricsLog
from cptrain.rundir.summary import stamp
from cptrain.train.reptile import Reptile as _Reptile

Rows = TypeVar("Rows", np.ndarray, torch.Tensor)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    live = dist.is_available() and dist.is_initialized()
    r = rank if rank is not None else (dist.get_rank() if live else 0)
    w = world_size if world_size is not None else (dist.get_world_size() if live else 1)
    return r, w


def _numpy(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    return rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)


class ReplayBuffer:
    """Experience replay for a loop of your own: a disk-backed buffer of every row it was given
    that replaces α of each batch with rows drawn uniformly from it.

    Contract: per optimizer step ``step`` (0, 1, 2, … over the whole run, all tasks) call
    ``mix(fresh, step=step, task=t)`` once with this rank's ``n_fresh_local`` fresh rows
    ([n, seq_len + 1] token ids); it returns them followed by up to ``n_replay_local`` replayed
    rows (fewer while the buffer fills) and admits the fresh rows. Which rows step s replays
    is a pure function of (seed, s, rank) and the rows added up to step s − 1 − visibility_lag,
    so a resumed loop that restores ``state_dict()`` (saved with its checkpoint, after the
    step) replays exactly what the uninterrupted one would have. Under torchrun each rank owns
    ``directory/rank_<r>/`` and draws from what it saw. ``batch_size`` is the global batch;
    ``mode`` substitute keeps it fixed (α of it replayed), additive adds round(α·B/(1−α))."""

    def __init__(
        self,
        directory: str | Path,
        *,
        alpha: float,
        batch_size: int,
        row_len: int,
        vocab_size: int,
        seed: int = 0,
        mode: str = "substitute",
        policy: str = "all",
        capacity: int | None = None,
        replay_from: str = "all",
        visibility_lag: int = 4,
        prefetch_mb: float = 0.0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        cfg = build_config(ReplayConfig, {
            "alpha": alpha, "mode": mode, "policy": policy, "capacity": capacity,
            "replay_from": replay_from, "visibility_lag": visibility_lag,
            "prefetch_mb": prefetch_mb,
        }, source="ReplayBuffer")
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.n_fresh, self.n_replay = mix_counts(alpha, batch_size, mode)
        if self.n_fresh == 0:
            raise ConfigError(f"alpha={alpha} leaves no fresh row in a batch of {batch_size}; "
                              "raise batch_size or lower alpha")
        self.n_fresh_local = split_for_rank(self.n_fresh, self.world_size, self.rank)[1]
        self.n_replay_local = split_for_rank(self.n_replay, self.world_size, self.rank)[1]
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._buffer = _Buffer(cfg, self.directory, row_len=row_len, vocab_size=vocab_size,
                               seed=seed, run_id=self._run_id(), rank=self.rank,
                               world_size=self.world_size)

    def _run_id(self) -> str:
        # One id per buffer directory: a restart over an old directory reuses (and empties)
        # it, a foreign one is refused by the buffer's manifest.
        path = self.directory / layout.RUN_ID
        if path.is_file():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex
        if self.rank == 0:
            fsutil.atomic_write_text(path, run_id + "\n")
        dist = torch.distributed
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            box = [run_id]
            dist.broadcast_object_list(box, src=0)
            run_id = box[0]
        return run_id

    def mix(self, fresh: Rows, *, step: int, task: int) -> Rows:
        """``fresh`` followed by this step's replayed rows (same type as ``fresh``, int64);
        the fresh rows then enter the buffer."""
        rows = _numpy(fresh)
        replay = self.draw(step, task=task)
        self.add(rows, step=step, task=task)
        both = np.concatenate([rows.astype(np.int64), replay]) if len(replay) else rows
        if isinstance(fresh, torch.Tensor):
            return torch.from_numpy(np.ascontiguousarray(both, dtype=np.int64)).to(fresh.device)
        return both.astype(np.int64)

    def draw(self, step: int, *, task: int) -> np.ndarray:
        """This rank's replayed rows of ``step`` (int64, [m, row_len], m ≤ n_replay_local)."""
        if self.n_replay_local == 0:
            return np.empty((0, self._buffer.row_len), dtype=np.int64)
        return self._buffer.draw(step, self.n_replay_local, current_task=task)

    def add(self, rows: np.ndarray | torch.Tensor, *, step: int, task: int) -> None:
        """Admit the fresh rows of ``step`` (``mix`` does it; steps must increase)."""
        self._buffer.add(_numpy(rows), task_id=task, step=step)

    def seed(self, rows: np.ndarray | torch.Tensor, *, name: str = "seed") -> None:
        """Rows in the buffer before the first step (a proxy of the old data), drawn like any
        row from step 0 on; call once, on a fresh start, before the first ``mix``."""
        self._buffer.add_seed(_numpy(rows), origin=0, name=name)

    def stats(self) -> dict[str, Any]:
        return self._buffer.stats()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; makes every row added so far durable first."""
        return self._buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to a ``state_dict()``: rows added after it are discarded (call first on resume)."""
        self._buffer.load_state_dict(state)

    def close(self) -> None:
        self._buffer.close()

    def __len__(self) -> int:
        return len(self._buffer)

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reptile(_Reptile):
    """Reptile's meta-update on your optimizer: every ``k`` optimizer steps the weights move
    back toward where they were k steps earlier, θ ← θ₀ + ε(θ − θ₀), and θ₀ ← θ.

    Contract: build it after the model is final and after its optimizer, from the same
    parameters. With ``optimizer`` given it attaches as a post-step hook of
    ``optimizer.step()``; without, call ``after_step(optimizer)`` right after every step (what
    a framework callback does). ``state_dict()`` holds the anchor tensors and counters: save it
    with the checkpoint, ``load_state_dict()`` on resume. It interpolates the very tensors the
    optimizer steps (fp32 masters; not DeepSpeed ZeRO, whose masters live in the optimizer)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        k: int = 500,
        epsilon: float = 0.1,
        anchor_dtype: str = "float32",
        anchor_device: str = "same",
        reset_at_task_boundary: bool = False,
        reset_optimizer_moments: bool = False,
    ) -> None:
        cfg = build_config(ReptileConfig, {
            "enabled": True, "k": k, "epsilon": epsilon, "anchor_dtype": anchor_dtype,
            "anchor_device": anchor_device, "reset_at_task_boundary": reset_at_task_boundary,
            "reset_optimizer_moments": reset_optimizer_moments,
        }, source="Reptile")
        super().__init__(model.named_parameters(), cfg)
        if optimizer is not None:
            self.attach(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count one optimizer step; the k-th of a period applies the meta-update."""
        self._post_step(optimizer, (), {})  # type: ignore[arg-type]

    def task_boundary(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """A new task starts (re-anchors with ``reset_at_task_boundary``)."""
        self.on_task_boundary(optimizer)


def _run_config(config: RunConfig | Mapping[str, Any] | None, run_dir: Path,
                tasks: Sequence[str], eval_only: Sequence[str]) -> dict[str, Any]:
    """The resolved config a run directory records (what `cptrain report` groups runs by)."""
    if isinstance(config, RunConfig):
        return config.model_dump(mode="json")
    raw = dict(config or {})
    data = {"dir": "", "tasks": list(tasks), "eval_only": list(eval_only), **raw.pop("data", {})}
    cfg = build_config(RunConfig, {"run_dir": str(run_dir), **raw, "data": data},
                       source="LossMatrix config")
    return cfg.model_dump(mode="json")


class LossMatrix:
    """The loss matrix L[after task i][on task j] of a continual run, and the run directory
    ``cptrain eval`` and ``cptrain report`` read.

    Contract: ``before(model)`` once before training (row ``before``), ``evaluate(model,
    step=…)`` whenever you like (periodic evaluations: forgetting counts them too),
    ``task_end(model, i, step=…)`` after the last step of task i (row i; writes
    ``summary.json``). Every call evaluates every column: the trained ``tasks`` in order, then
    the ``eval_only`` ones, on the same fixed windows of each validation set (``windows``
    evenly spaced windows of seq_len + 1 tokens: ``ShardSet``, ``ArrayWindows`` or an [n, T+1]
    integer array). ``state_dict()`` (JSON) resumes it. Only rank 0 writes (``is_main``)."""

    def __init__(
        self,
        run_dir: str | Path,
        val_sets: Mapping[str, ShardSet | ArrayWindows | np.ndarray],
        *,
        tasks: Sequence[str],
        eval_only: Sequence[str] = (),
        window_len: int,
        windows: int = 64,
        batch_size: int = 32,
        config: RunConfig | Mapping[str, Any] | None = None,
        autocast: torch.dtype | None = None,
        is_main: bool | None = None,
    ) -> None:
        self.columns = [*tasks, *eval_only]
        missing = [c for c in self.columns if c not in val_sets]
        if missing:
            raise ConfigError(f"LossMatrix: no validation set for {', '.join(missing)}; pass "
                              "val_sets with one entry per task and evaluation-only task")
        self.val_sets = {c: val_sets[c] if hasattr(val_sets[c], "windows")
                         else ArrayWindows(np.asarray(val_sets[c])) for c in self.columns}
        self.tasks, self.eval_only = list(tasks), list(eval_only)
        self.window_len, self.windows, self.batch_size = window_len, windows, batch_size
        self.autocast = autocast
        self.path = Path(run_dir)
        self.is_main = _rank_world(None, None)[0] == 0 if is_main is None else is_main
        self.config = _run_config(config, self.path, self.tasks, self.eval_only)
        self.loss_before: list[float] = []
        self.loss_matrix: list[list[float]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.step = 0
        self.extra: dict[str, Any] = {}  # more summary keys (tokens, replay stats, …)
        self.metrics = MetricsLog(self.path / layout.METRICS, enabled=self.is_main)
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            fsutil.atomic_write_text(self.path / layout.CONFIG,
                                     yaml.safe_dump(self.config, sort_keys=False))

    # ---------------------------------------------------------------- evaluations
    def _losses(self, model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        return evaluate_tasks(model, self.val_sets, window_len=self.window_len,
                              windows=self.windows, batch_size=self.batch_size,
                              autocast=self.autocast, device=device)

    def _record(self, kind: str, step: int, losses: dict[str, float]) -> None:
        self.step = step
        done = len(self.loss_matrix)
        task = self.tasks[min(done, len(self.tasks) - 1)]
        self.metrics.write({"type": kind, "step": step, "task": task, "val_loss": losses,
                            "union_loss": self.union_loss(losses)})

    def union_loss(self, losses: dict[str, float]) -> float:
        counts = [len(eval_indices(self.val_sets[n].num_windows(self.window_len), self.windows))
                  for n in losses]
        return metrics.union_loss(list(losses.values()), counts)

    def before(self, model: torch.nn.Module) -> dict[str, float]:
        """The starting model's losses (row ``before``): a fresh start, so the metrics an
        earlier attempt in ``run_dir`` logged are dropped."""
        self.metrics.close()
        self.metrics.clear()
        losses = self._losses(model)
        self.loss_before = [losses[c] for c in self.columns]
        self._record("before", 0, losses)
        return losses

    def evaluate(self, model: torch.nn.Module, *, step: int) -> dict[str, float]:
        """A periodic evaluation after ``step`` optimizer steps."""
        losses = self._losses(model)
        self.eval_history.append({"step": step, "tasks_done": len(self.loss_matrix),
                                  "losses": [losses[c] for c in self.columns]})
        self._record("eval", step, losses)
        return losses

    def task_end(self, model: torch.nn.Module, task: int, *, step: int) -> dict[str, float]:
        """Row ``task`` of the matrix, after its last step; writes summary.json."""
        if task != len(self.loss_matrix):
            raise ConfigError(f"LossMatrix.task_end({task}) after {len(self.loss_matrix)} task "
                              f"end(s); call it once per task, in order")
        losses = self._losses(model)
        self._record("task_end", step, losses)
        self.loss_matrix.append([losses[c] for c in self.columns])
        self.write()
        return losses

    # ---------------------------------------------------------------- the run directory
    @property
    def complete(self) -> bool:
        return len(self.loss_matrix) == len(self.tasks)

    def summary(self) -> dict[str, Any]:
        lm = self.loss_matrix
        out: dict[str, Any] = {
            "config": self.config, "tasks": self.tasks, "eval_only": self.eval_only,
            "loss_matrix": lm,
            "loss_before": dict(zip(self.columns, self.loss_before, strict=True))
            if self.loss_before else {},
            "steps": self.step, "complete": self.complete, **self.extra,
        }
        if lm:
            out.update(metrics.summarize(lm, metrics.evaluations_from_history(
                self.eval_history)))
            out["union_loss"] = self.union_loss(dict(zip(self.tasks, lm[-1], strict=False)))
            if self.loss_before and self.eval_only:
                out["eval_only_forgetting"] = metrics.forgetting_since_start(
                    lm, self.loss_before, self.tasks, self.eval_only)
        if "model_shape" in out and "rows_per_step" in out:
            # the compute accounting of `cptrain train`, from the facts ``extra`` recorded
            # (ContinualTrainer records them; a plain loop counts no tokens)
            out["flops"] = run_flops(out)
        return out

    def write(self) -> Path:
        """summary.json (atomically); returns its path."""
        path = self.path / layout.SUMMARY
        if self.is_main:
            fsutil.atomic_write_json(path, stamp(self.summary()))
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "loss_before": self.loss_before, "loss_matrix": self.loss_matrix,
                "eval_history": self.eval_history, "step": self.step, "extra": self.extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from cptrain.errors import CheckpointError

        keys = {"loss_before", "loss_matrix", "eval_history", "step"}
        if not isinstance(state, dict) or state.get("version") != 1 or not keys <= set(state):
            raise CheckpointError("the loss matrix state in the checkpoint is damaged; resume "
                                  "from another checkpoint")
        self.loss_before = list(state["loss_before"])
        self.loss_matrix = [list(r) for r in state["loss_matrix"]]
        self.eval_history = list(state["eval_history"])
        self.step = int(state["step"])
        self.extra = dict(state.get("extra") or {})
        self.metrics.truncate_after(self.step)

    def close(self) -> None:
        self.metrics.close()
