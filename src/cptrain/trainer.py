"""The one training loop: tasks in sequence, one optimizer, pluggable replay and Reptile.

Every optimizer step draws ``n_fresh`` windows of the current task (a pure function of the seed,
the task and the task's cursor) and, when replay is on, ``n_replay`` rows from the replay
buffer (a pure function of seed and step). After the step the fresh rows enter the buffer and
Reptile, registered as an optimizer post-step hook, may interpolate the weights. At each task
end every task's validation loss fills one row of the loss matrix.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from cptrain import checkpoint as ckpt
from cptrain import dist_checkpoint, metrics
from cptrain.config import RunConfig
from cptrain.data.prepare import load_prepared, load_prepared_tokenizer, open_split
from cptrain.data.shards import ShardSet
from cptrain.distributed import init_distributed, set_grad_sync, shutdown, wrap_model
from cptrain.errors import CheckpointError, ConfigError, DataError, EnvironmentProblem
from cptrain.evaluate import evaluate_tasks, token_loss
from cptrain.flops import run_flops
from cptrain.model import build_model, count_parameters, load_pretrained
from cptrain.replay.mixer import mix_counts, split_for_rank
from cptrain.schedule import Schedule

# save_pretrained's per-file progress bars would interleave with the training bar.
hf_logging.disable_progress_bar()

# Config keys that change nothing about the numbers a run produces; a resume may change them.
_RUN_CONTROL_KEYS = {
    "checkpoint",
    "eval.every",
    "train.log_every",
    "train.threads",
    "train.compile",
    "replay.prefetch_mb",
    "distributed",  # strategy/backend; the world size is checked on its own
    "run_dir",  # a moved run is the same run
    "replay.dir",
}


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed, over the whole run
    task_idx: int = 0  # task being trained (== number of tasks finished)
    task_step: int = 0  # steps completed inside the current task
    cursors: list[int] = field(default_factory=list)  # fresh windows consumed, per task
    loss_matrix: list[list[float]] = field(default_factory=list)
    fresh_tokens: int = 0
    replay_tokens: int = 0
    wall_s: float = 0.0
    run_id: str = ""
    diag_cos_sum: float = 0.0  # gradient-alignment cosines measured after the first task
    diag_cos_n: int = 0


class TaskStream:
    """Windows of one task in a seeded random order, reshuffled every epoch."""

    def __init__(self, shard: ShardSet, task_idx: int, seed: int, window_len: int, name: str):
        self.shard = shard
        self.window_len = window_len
        self.n = shard.num_windows(window_len)
        if self.n == 0:
            raise DataError(
                f"task {name} has {shard.num_tokens} training tokens, fewer than one window of "
                f"{window_len}; lower train.seq_len or add data"
            )
        self._key = (seed, task_idx)
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self._key[0], self._key[1], epoch, 0x5EED])
            self._perm = rng.permutation(self.n)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        pos = start
        filled = 0
        while filled < count:
            epoch, off = divmod(pos, self.n)
            take = min(count - filled, self.n - off)
            out[filled : filled + take] = self._permutation(epoch)[off : off + take]
            filled += take
            pos += take
        return out

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.shard.windows(idx, self.window_len)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Result-changing keys whose values differ between two resolved configs."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == c or key.startswith(c + ".") for c in _RUN_CONTROL_KEYS):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: checkpoint has {a.get(key)!r}, config has {b.get(key)!r}")
    return diffs


class MetricsLog:
    """Append-only JSON lines; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # only rank 0 writes
        self._f = None

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if rec.get("step", 0) <= step and not rec.get("after_checkpoint_only"):
                kept.append(line)
        ckpt.atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        allow_config_change: bool = False,
    ):
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        self.progress = progress
        self.run_dir = Path(cfg.run_dir)
        self.resume = resume
        if resume and cfg.model.init_from:
            raise ConfigError(
                "model.init_from and --resume cannot be combined: --resume restores the run's "
                "own checkpoint; drop init_from"
            )
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.env = init_distributed(cfg.distributed)
        self.progress = progress and self.env.is_main
        self._prepare_run_dir()
        self._open_data()
        self._build_model()
        self._build_optimizer()
        self.state = TrainerState(cursors=[0] * len(cfg.data.tasks))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.env.is_main)
        self.buffer = None
        self.reptile = None
        if resume:
            self._restore()
        else:
            self.state.run_id = self.env.broadcast_object(
                self._attempt_run_id() if self.env.is_main else None
            )
            if self.env.is_main:
                self._write_config()
                if self.metrics.path.exists():
                    self.metrics.path.unlink()
        self._build_components()

    # ----------------------------------------------------------------- set-up
    def _attempt_run_id(self) -> str:
        """The run id of an attempt that died before its first checkpoint, else a new one, so
        that its replay directory is recognised (and emptied) rather than refused."""
        path = self.run_dir / "run_id"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            old = path.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{32}", old):
                return old
        new = uuid.uuid4().hex
        ckpt.atomic_write_text(path, new + "\n")
        return new

    def _prepare_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"run_dir {self.run_dir} is not writable ({exc.strerror}); choose another run_dir"
            ) from None
        existing = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        if not self.resume and (existing or (self.run_dir / "summary.json").exists()):
            raise ConfigError(
                f"run_dir {self.run_dir} already holds a run; pass --resume to continue it, "
                "or choose a new run_dir"
            )

    def _open_data(self) -> None:
        cfg = self.cfg
        data_dir = Path(cfg.data.dir)
        self.prepared = load_prepared(data_dir)
        self.tokenizer_dir = data_dir / "tokenizer"
        self.task_names = [t.name for t in cfg.data.tasks]
        known = list(self.prepared.get("tasks", {}))
        missing = [n for n in self.task_names if n not in known]
        if missing:
            raise ConfigError(
                f"data.tasks: {', '.join(missing)} not in {data_dir} (prepared tasks: "
                f"{', '.join(known) or 'none'}); fix the task list or re-run `cptrain prepare`"
            )
        self.window_len = cfg.train.seq_len + 1
        self.train_sets = {n: open_split(data_dir, n, "train") for n in self.task_names}
        self.val_sets = {n: open_split(data_dir, n, "val") for n in self.task_names}
        # Full checksums once per start (~1 s per GB): a flipped byte that keeps token ids in
        # the vocabulary would otherwise train silently.
        for shard in (*self.train_sets.values(), *self.val_sets.values()):
            shard.verify(full=True)
        load_prepared_tokenizer(data_dir)
        self.streams = [
            TaskStream(self.train_sets[n], i, cfg.seed, self.window_len, n)
            for i, n in enumerate(self.task_names)
        ]
        for n, s in self.val_sets.items():
            if s.num_windows(self.window_len) == 0:
                raise DataError(
                    f"task {n}: validation split has {s.num_tokens} tokens, fewer than one "
                    f"window of {self.window_len}; lower train.seq_len or add validation text"
                )
        self.vocab_size = max(s.vocab_size for s in self.train_sets.values())

        b = cfg.train.batch_size
        if cfg.method == "joint":
            self.n_fresh, self.n_replay = b, 0
        else:
            self.n_fresh, self.n_replay = mix_counts(cfg.replay.alpha, b, cfg.replay.mode)
        # This rank's share of the global batch: contiguous slices, sizes differ by at most one.
        self.fresh_slice = split_for_rank(self.n_fresh, self.env.world_size, self.env.rank)
        self.n_replay_local = split_for_rank(self.n_replay, self.env.world_size, self.env.rank)[1]
        if self.n_fresh == 0:
            raise ConfigError(
                f"replay.alpha={cfg.replay.alpha} leaves no fresh sequence in a batch of {b}; "
                "raise train.batch_size or lower replay.alpha"
            )
        tokens_per_step = b * cfg.train.seq_len
        self.task_steps = [
            max(1, math.ceil(cfg.data.budget(t) / tokens_per_step)) for t in cfg.data.tasks
        ]
        self.total_steps = sum(self.task_steps)
        self.schedule = Schedule(
            kind=cfg.train.schedule,
            peak_lr=cfg.peak_lr,
            min_lr=cfg.train.min_lr,
            warmup=cfg.train.warmup,
            task_steps=self.task_steps,
            rewarm_each_task=cfg.train.rewarm_each_task,
            decay_fraction=cfg.train.decay_fraction,
        )
        if cfg.method == "joint":
            sizes = np.array([s.num_tokens for s in self.train_sets.values()], dtype=np.float64)
            w = np.array(cfg.data.joint_weights) if cfg.data.joint_weights else sizes
            self.joint_p = w / w.sum()

    def _build_model(self) -> None:
        cfg = self.cfg
        if cfg.model.init_from:
            model = load_pretrained(cfg.model.init_from)
        else:
            model = build_model(
                cfg.model.preset,
                self.vocab_size,
                seed=cfg.seed,
                max_positions=max(2048, cfg.train.seq_len),
            )
        if model.config.vocab_size < self.vocab_size:
            raise DataError(
                f"the shards use a vocabulary of {self.vocab_size} but the model's embedding has "
                f"{model.config.vocab_size} rows; prepare the data with the model's tokenizer"
            )
        self.model = model.to(self.env.device)
        self.model.train()
        wrapped = wrap_model(self.model, self.env, cfg.distributed)
        self.forward_model: torch.nn.Module = (
            torch.compile(wrapped) if cfg.train.compile else wrapped  # type: ignore[assignment]
        )
        self.autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
        self.n_params = count_parameters(model)

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Norm gains are not weight-decayed (standard practice for Llama pre-training).
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.schedule.lr(0),
            betas=t.betas,
            eps=t.eps,
            foreach=True,
        )

    def _build_components(self) -> None:
        cfg = self.cfg
        if self.n_replay > 0:
            from cptrain.replay.buffer import ReplayBuffer

            buf_dir = Path(cfg.replay.dir) if cfg.replay.dir else self.run_dir / "replay"
            self.buffer = ReplayBuffer(
                cfg.replay,
                buf_dir,
                row_len=self.window_len,
                vocab_size=self.vocab_size,
                seed=cfg.seed,
                run_id=self.state.run_id,
                rank=self.env.rank,
                world_size=self.env.world_size,
                resolver=lambda task_id, idx: self.streams[task_id].rows(idx),
            )
            if self._replay_state is not None:
                self.buffer.load_state_dict(self._replay_state)
        if cfg.reptile.enabled:
            from cptrain.reptile import Reptile

            self.reptile = self._reptile_pre or Reptile(self.model.named_parameters(), cfg.reptile)
            self.reptile.attach(self.optimizer)
            if self._reptile_state is not None:
                self.reptile.load_state_dict(self._reptile_state)
            elif self.resume and self.state.step > 0:
                raise CheckpointError(
                    "reptile.enabled is true but the checkpoint has no Reptile anchor; resume "
                    "with reptile.enabled=false or start a new run"
                )

    def _write_config(self) -> None:
        resolved = self.cfg.model_dump(mode="json")
        ckpt.atomic_write_text(
            self.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False)
        )

    # ---------------------------------------------------------------- resume
    _replay_state: dict[str, Any] | None = None
    _reptile_state: dict[str, Any] | None = None
    _reptile_pre: Any = None

    def _check_world_size(self, path: Path, state: dict[str, Any]) -> None:
        old = int(state.get("world_size", 1))
        if old != self.env.world_size:
            raise CheckpointError(
                f"checkpoint {path.name} was written by {old} process(es) but this run has "
                f"{self.env.world_size}; resume with the same count (torchrun "
                f"--nproc_per_node={old}), re-sharding on resume is not supported"
            )

    def _check_config(self, saved: dict[str, Any]) -> None:
        diffs = config_differences(saved, self.cfg.model_dump(mode="json"))
        if diffs and self.allow_config_change:
            for d in diffs:
                print(f"warning: resuming with a changed config: {d}")
        elif diffs:
            raise CheckpointError(
                f"--resume: the config changed in a way that changes results ({diffs[0]}"
                f"{f'; {len(diffs) - 1} more' if len(diffs) > 1 else ''}); restore the old value "
                "or start a new run_dir (or pass --allow-config-change to resume anyway)"
            )

    def _check_tokenizer(self, state: dict[str, Any]) -> None:
        old, new = state.get("tokenizer_sha256"), self.prepared["tokenizer"]["sha256"]
        if old is not None and old != new:
            raise DataError(
                f"the checkpoint was trained with tokenizer {old[:12]} but {self.cfg.data.dir} "
                f"holds tokenizer {new[:12]}; resume with the data the run was prepared with"
            )

    def _latest_checkpoint(self) -> Path:
        root = self.run_dir / "checkpoints"
        found = None
        if self.env.is_main:
            path, skipped = ckpt.latest_complete(root)
            for reason in skipped:
                print(f"skipping damaged or incomplete checkpoint {reason}")
            found = str(path) if path is not None else None
            if path is not None:
                # Temporary directories of saves that a kill interrupted go now; a resume of a
                # run that had already finished would otherwise never save (and prune) again.
                ckpt.prune(root, self.cfg.checkpoint.keep_last, protect=path)
        found = self.env.broadcast_object(found)
        if found is None:
            raise CheckpointError(
                f"--resume: no complete checkpoint under {root}; start the run without --resume"
            )
        return Path(found)

    def _restore_distributed(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        self._check_world_size(path, state)
        self._check_config(state["config"])
        self._check_tokenizer(state)
        template = None
        if self.cfg.reptile.enabled and state.get("reptile") is not None:
            from cptrain.reptile import Reptile

            self._reptile_pre = Reptile(self.model.named_parameters(), self.cfg.reptile)
            template = _split_tensors(self._reptile_pre.state_dict())[1]
        state, anchors = dist_checkpoint.load(
            path, self.env, model=self.model, optimizer=self.optimizer, anchors_template=template
        )
        self.state = TrainerState(**state["trainer"])
        mine = state["ranks"][self.env.rank]
        self._replay_state = mine.get("replay")
        if state.get("reptile") is not None:
            self._reptile_state = _unflatten_tensors(state["reptile"], anchors or {})

    def _restore(self) -> None:
        path = self._latest_checkpoint()
        if self.env.active:
            self._restore_distributed(path)
            self.metrics.truncate_after(self.state.step)
            if self.env.is_main:
                print(f"resuming from {path} (step {self.state.step} of {self.total_steps})")
            return
        c = ckpt.load_checkpoint(path)
        self._check_world_size(path, c.state)
        if c.state.get("sharded"):
            raise CheckpointError(
                f"{path} holds sharded (torchrun) state; resume it with torchrun"
            )
        self._check_config(c.state["config"])
        weights = c.model_state()
        rows = weights["model.embed_tokens.weight"].shape[0]
        if rows != self.model.config.vocab_size:
            raise DataError(
                f"the checkpoint's embedding has {rows} rows but the shards in "
                f"{self.cfg.data.dir} use a vocabulary of {self.model.config.vocab_size}; "
                "resume with the data the run was prepared with"
            )
        self._check_tokenizer(c.state)
        self.model.load_state_dict(weights, strict=True)
        blob = c.optimizer_blob()
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng_cpu"])
        st = c.state["trainer"]
        self.state = TrainerState(**st)
        self._replay_state = c.state.get("replay")
        rep = c.state.get("reptile")
        if rep is not None:
            tensors = c.tensors("reptile") or {}
            self._reptile_state = _unflatten_tensors(rep, tensors)
        self.metrics.truncate_after(self.state.step)
        print(f"resuming from {path} (step {self.state.step} of {self.total_steps})")

    def save(self) -> Path:
        state: dict[str, Any] = {
            "trainer": asdict(self.state),
            "config": self.cfg.model_dump(mode="json"),
            "world_size": self.env.world_size,
            "tokenizer_sha256": self.prepared["tokenizer"]["sha256"],
        }
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        if self.buffer is not None:
            self.buffer.commit()
            state["replay"] = self.buffer.state_dict()
        if self.reptile is not None:
            json_part, tensor_part = _split_tensors(self.reptile.state_dict())
            state["reptile"] = json_part
            tensors["reptile"] = tensor_part
        if self.env.active:
            rank_state = {"replay": state.pop("replay", None)}
            return dist_checkpoint.save(
                self.run_dir / "checkpoints",
                self.state.step,
                self.env,
                model=self.model,
                optimizer=self.optimizer,
                tokenizer_dir=self.tokenizer_dir,
                state=state,
                rank_state=rank_state,
                anchors=tensors.get("reptile"),
                keep_last=self.cfg.checkpoint.keep_last,
            )
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.state.step,
            model=self.model,
            tokenizer_dir=self.tokenizer_dir,
            optimizer=self.optimizer,
            state=state,
            tensors=tensors,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ------------------------------------------------------------------ loop
    def _fresh(self, task_idx: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """This rank's fresh rows for this step and, per source task, the window indices.

        The global batch's windows are a pure function of the cursors; each data-parallel rank
        takes its contiguous slice of them, so ranks read disjoint windows.
        """
        start, count = self.fresh_slice
        if self.cfg.method != "joint":
            idx = self.streams[task_idx].indices(self.state.cursors[task_idx], self.n_fresh)
            self.state.cursors[task_idx] += self.n_fresh
            mine = idx[start : start + count]
            return self.streams[task_idx].rows(mine), [(task_idx, mine)]
        rng = np.random.default_rng([self.cfg.seed, self.state.step, 0x701])
        picks = rng.choice(len(self.streams), size=self.n_fresh, p=self.joint_p)
        tasks, windows = [], []
        for t in range(len(self.streams)):
            k = int((picks == t).sum())
            if k:
                tasks.append(np.full(k, t))
                windows.append(self.streams[t].indices(self.state.cursors[t], k))
                self.state.cursors[t] += k
        task_of = np.concatenate(tasks)[start : start + count]
        window_of = np.concatenate(windows)[start : start + count]
        used = [(int(t), window_of[task_of == t]) for t in np.unique(task_of)]
        rows = np.concatenate([self.streams[t].rows(idx) for t, idx in used])
        return rows, used

    def _upcoming(self) -> Iterator[tuple[int, int, int]]:
        step = self.state.step
        for t in range(self.state.task_idx, len(self.task_steps)):
            first = self.state.task_step if t == self.state.task_idx else 0
            for _ in range(first, self.task_steps[t]):
                yield step, self.n_replay_local, t
                step += 1

    def _train_step(self, task_idx: int) -> dict[str, Any]:
        lr = self.schedule.lr(self.state.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        fresh, used = self._fresh(task_idx)
        replay = None
        if self.buffer is not None:
            replay = self.buffer.draw(self.state.step, self.n_replay_local, current_task=task_idx)
        rows_np = fresh if replay is None or len(replay) == 0 else np.concatenate([fresh, replay])
        top = int(rows_np.max())
        if top >= self.model.config.vocab_size:
            raise DataError(
                f"token id {top} in task {self.task_names[task_idx]} is >= the model's vocabulary "
                f"({self.model.config.vocab_size}); the shards do not match the model's tokenizer"
            )
        diag = self._diagnostics(task_idx, fresh, replay)
        rows = torch.from_numpy(rows_np).to(self.env.device)
        n_local = rows.shape[0]
        n_rep_local = 0 if replay is None else len(replay)
        n_rep = int(round(self.env.sum_scalar(n_rep_local))) if self.env.active else n_rep_local
        n_global = self.n_fresh + n_rep
        # Gradients are averaged over ranks, so each row weighs world/global: the result is the
        # mean loss over the whole global batch, whatever the split.
        scale = self.env.world_size / n_global
        mb = self.cfg.micro_batch_size
        loss_sum = 0.0
        starts = list(range(0, n_local, mb))
        for i, start in enumerate(starts):
            part = rows[start : start + mb]
            with set_grad_sync(self.forward_model, self.env, i == len(starts) - 1):
                loss = token_loss(self.forward_model, part, self.autocast)
                (loss * (part.shape[0] * scale)).backward()
            loss_sum += float(loss.detach()) * part.shape[0]
        total_loss = self.env.sum_scalar(loss_sum) / n_global
        if self.cfg.train.grad_clip > 0:
            gnorm = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            )
        else:
            gnorm = float("nan")
        self.optimizer.step()  # Reptile's post-step hook (if any) runs inside
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffer is not None:
            for t, idx in used:
                part_rows = self.streams[t].rows(idx) if len(used) > 1 else fresh
                self.buffer.add(part_rows, task_id=t, step=self.state.step, refs=idx)
        self.state.fresh_tokens += self.n_fresh * self.cfg.train.seq_len
        self.state.replay_tokens += n_rep * self.cfg.train.seq_len
        self.state.step += 1
        self.state.task_step += 1
        rec: dict[str, Any] = {
            "loss": total_loss,
            "lr": lr,
            "grad_norm": gnorm,
            "replay_rows": n_rep,
            "effective_alpha": n_rep / n_global,
        }
        rec.update(diag)
        cos = getattr(self.reptile, "last_displacement_cosine", None)
        if cos is not None:
            rec["reptile_displacement_cos"] = cos
        return rec

    def _diagnostics(
        self, task_idx: int, fresh: np.ndarray, replay: np.ndarray | None
    ) -> dict[str, Any]:
        """cos(∇ fresh rows, ∇ replay rows) on the weights this step starts from.

        Without replay rows (sequential, Reptile only) the reference is a probe batch of the
        same size from earlier tasks' training windows, so every method gets the same measure
        of interference between the current task and the past.
        """
        every = self.cfg.reptile.diagnostics_every
        if not every or (self.state.step + 1) % every or self.env.strategy == "fsdp2":
            return {}
        if replay is not None and len(replay):
            ref, kind = replay, "replay"
        elif task_idx > 0:
            n = max(1, round(0.25 * self.cfg.train.batch_size))
            rng = np.random.default_rng([self.cfg.seed, self.state.step, 0xD1A6])
            tasks = rng.integers(0, task_idx, n)
            ref = np.concatenate(
                [
                    self.streams[t].rows(rng.integers(0, self.streams[t].n, 1))
                    for t in tasks.tolist()
                ]
            )
            kind = "probe"
        else:
            return {}
        from cptrain.alignment import gradient_alignment

        out: dict[str, Any] = gradient_alignment(
            self.model,
            torch.from_numpy(fresh).to(self.env.device),
            torch.from_numpy(ref).to(self.env.device),
            autocast_dtype=self.autocast,
        )
        out["grad_ref"] = kind
        if task_idx > 0 and math.isfinite(out["grad_cos"]):
            self.state.diag_cos_sum += out["grad_cos"]
            self.state.diag_cos_n += 1
        return out

    def evaluate(self) -> dict[str, float]:
        return evaluate_tasks(
            self.model,
            self.val_sets,
            window_len=self.window_len,
            windows=self.cfg.eval.windows,
            batch_size=self.cfg.eval.batch_size,
            autocast=self.autocast,
            device=self.env.device,
        )

    def _log_eval(self, losses: dict[str, float], kind: str) -> None:
        self.metrics.write(
            {
                "type": kind,
                "step": self.state.step,
                "task": self.task_names[min(self.state.task_idx, len(self.task_names) - 1)],
                "val_loss": losses,
                "union_loss": metrics.union_loss(list(losses.values())),
            }
        )

    def step_once(self, task_idx: int) -> dict[str, Any]:
        """One optimizer step of the loop with its logging and progress (no eval, no save)."""
        rec = self._train_step(task_idx)
        self._steps_since_log += 1
        step = self.state.step
        if (
            step % self.cfg.train.log_every == 0
            or self.state.task_step == self.task_steps[task_idx]
            or "grad_cos" in rec
        ):
            now = time.perf_counter()
            rows = self.n_fresh + rec["replay_rows"]
            elapsed = max(now - self._last_log_t, 1e-9)
            tps = self._steps_since_log * rows * self.cfg.train.seq_len / elapsed
            self._last_log_t, self._steps_since_log = now, 0
            rec.update(type="train", step=step, task=self.task_names[task_idx], tokens_per_s=tps)
            if self.env.device.type == "cuda":
                rec["cuda_max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if self.buffer is not None:
                stats = self.buffer.stats()
                rec.update(
                    {f"buffer_{k}": v for k, v in stats.items() if not isinstance(v, dict)}
                )
            self.metrics.write(rec)
            if self._bar is not None:
                self._bar.set_postfix_str(
                    f"{self.task_names[task_idx]} loss {rec['loss']:.3f} {tps:,.0f} tok/s",
                    refresh=False,
                )
        if self._bar is not None:
            self._bar.update(1)
        return rec

    _bar: tqdm | None = None
    _steps_since_log = 0
    _last_log_t = 0.0

    def _finish_task(self, t: int) -> None:
        losses = self.evaluate()
        self.state.loss_matrix.append([losses[n] for n in self.task_names])
        self._log_eval(losses, "task_end")
        self._export_task_model(t)
        self.state.task_idx += 1
        self.state.task_step = 0
        self._sync_wall()
        self.save()
        self.write_summary(complete=self.state.task_idx == len(self.task_steps))
        if not self.progress and self.env.is_main:
            row = ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
            print(f"after {self.task_names[t]} (step {self.state.step}): val loss {row}")

    def _sync_wall(self) -> None:
        now = time.perf_counter()
        self.state.wall_s += now - self._wall_mark
        self._wall_mark = now

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.buffer is not None:
            self.buffer.start_prefetch(self._upcoming())
        self._bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        self._last_log_t = self._wall_mark = time.perf_counter()
        try:
            while self.state.task_idx < len(self.task_steps):
                t = self.state.task_idx
                if self.state.task_step == 0 and t > 0 and self.reptile is not None:
                    self.reptile.on_task_boundary(self.optimizer)
                while self.state.task_step < self.task_steps[t]:
                    self.step_once(t)
                    step = self.state.step
                    if self.state.task_step == self.task_steps[t]:
                        self._finish_task(t)
                        break
                    if cfg.eval.every and step % cfg.eval.every == 0:
                        self._log_eval(self.evaluate(), "eval")
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        self._sync_wall()
                        self.save()
            # A kill between the last checkpoint and its summary leaves an older summary.json;
            # a resume that finds the run finished rewrites it.
            self.write_summary(complete=True)
        finally:
            self._bar.close()
            self.close()
        return self.summary()

    def close(self) -> None:
        self.metrics.close()
        if self.buffer is not None:
            self.buffer.close()

    def _export_task_model(self, task_idx: int) -> None:
        """Weights after each task, loadable by ``from_pretrained`` and lm-eval."""
        out = self.run_dir / "models" / f"after_{task_idx}_{self.task_names[task_idx]}"
        if self.env.active:
            dist_checkpoint.export_hf(self.model, self.env, out, self.tokenizer_dir)
            return
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        for stale in out.parent.glob(out.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            for f in self.tokenizer_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            code = ckpt.disk_full_errno(exc)
            if code:
                raise EnvironmentProblem(
                    f"disk full while exporting {out} ({os.strerror(code)}); free space, then "
                    "resume with --resume"
                ) from None
            raise
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)

    def summary(self) -> dict[str, Any]:
        lm = self.state.loss_matrix
        out: dict[str, Any] = {
            "config": self.cfg.model_dump(mode="json"),
            "tasks": self.task_names,
            "loss_matrix": lm,
            "steps": self.state.step,
            "task_steps": self.task_steps,
            "fresh_tokens": self.state.fresh_tokens,
            "replay_tokens": self.state.replay_tokens,
            "params": self.n_params,
            "wall_s": self.state.wall_s,
            "complete": self.state.task_idx == len(self.task_steps),
        }
        if lm:
            out.update(metrics.summarize(lm))
            out["union_loss"] = metrics.union_loss(lm[-1])
        if self.buffer is not None:
            out["replay"] = self.buffer.stats()
        with contextlib.suppress(ConfigError):
            out["flops"] = run_flops(out, self.run_dir)
        if self.state.diag_cos_n:
            out["grad_cos_mean"] = self.state.diag_cos_sum / self.state.diag_cos_n
            out["grad_cos_count"] = self.state.diag_cos_n
        return out

    def write_summary(self, complete: bool) -> None:
        if not self.env.is_main:
            return
        s = self.summary()
        s["complete"] = complete
        ckpt.atomic_write_json(self.run_dir / "summary.json", s)


def _split_tensors(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """JSON-able part and flat tensors (``key/sub``) of a component's state_dict."""
    plain: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v
            plain[k] = {"__tensor__": k}
        elif isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v.values()):
            for sub, t in v.items():
                tensors[f"{k}/{sub}"] = t
            plain[k] = {"__tensors__": k}
        else:
            plain[k] = v
    return plain, tensors


def _unflatten_tensors(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in plain.items():
        if isinstance(v, dict) and "__tensor__" in v:
            if k not in tensors:
                raise CheckpointError(f"checkpoint lacks tensor {k!r}; it is damaged")
            out[k] = tensors[k]
        elif isinstance(v, dict) and "__tensors__" in v:
            prefix = k + "/"
            out[k] = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
        else:
            out[k] = v
    return out


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    trainer = Trainer(
        cfg, resume=resume, progress=progress, allow_config_change=allow_config_change
    )
    env = trainer.env
    try:
        return trainer.run()
    finally:
        # DDP's reducer holds the process group: free it while every rank is still up, or the
        # gloo group's destructor can wait forever on a peer that has already exited.
        del trainer
        gc.collect()
        shutdown(env)
