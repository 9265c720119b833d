"""The replay-mixing dataset for the Hugging Face ``Trainer``, and the callback that feeds its
buffer and checkpoints it.

A ``Trainer`` callback cannot change the batch, so replay enters through the dataset: each
item is one optimizer step's rows on this rank (fresh windows of the current task, then the
replayed ones), a pure function of (seed, step, rank) and the buffer as it stood
``visibility_lag`` steps earlier: exactly the rows ``cptrain train`` trains that step on.
The fresh rows of step s enter the buffer when step s is done (``on_step_end``), not when
the loader reads them, so a checkpoint-N holds the buffer of steps < N however far the loader
read ahead, and a resume continues the very same draws.

Accelerate shards an ``IterableDataset`` by reading it in every process and keeping item
``rank`` of each group of ``world_size`` (``dispatch_batches=False``): each rank's dataset
yields its own rows in its own slot and ``None`` in the others, which that rank never keeps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainerCallback

from cptrain import fsutil
from cptrain.config import RunConfig
from cptrain.errors import CheckpointError, ConfigError
from cptrain.integrations.data import StepIndex, StepRows
from cptrain.replay.buffer import ReplayBuffer
from cptrain.train.batches import BatchPlan
from cptrain.train.data import TrainingData

STATE_VERSION = 1


def checkpoint_dir(args: Any, state: Any, resume_dir: str | Path | None = None) -> Path:
    """Where the ``Trainer`` saves (or saved) step ``state.global_step``: ``checkpoint-N/``."""
    if resume_dir is not None:
        return Path(resume_dir)
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(
            f"{path.parent} has no readable {path.name} ({what}); it was not saved with this "
            "callback or was cut short: resume from an earlier checkpoint-N"
        ) from None
    if not isinstance(found, dict) or found.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a version-{STATE_VERSION} {what}; resume from "
                              "another checkpoint-N")
    return found


class ReplayDataset(torch.utils.data.IterableDataset):
    """One item per optimizer step from ``start_step`` on: ``{"input_ids": rows}`` with rows
    int64 [n_fresh_local + m, seq_len + 1] (m ≤ n_replay_local while the buffer fills).

    Use it with ``per_device_train_batch_size=1``, ``data_collator=dataset.collate``,
    ``dataloader_num_workers=0`` (the buffer lives in this process), ``ignore_data_skip=True``
    (the dataset starts at the resumed step itself), ``accelerator_config={"dispatch_batches":
    False}`` and ``trainer.add_callback(dataset.callback)``; ``ContinualTrainer`` does all of
    this. ``on_rows`` (tests, audits) sees every step's rows as they are read."""

    def __init__(self, cfg: RunConfig, data: TrainingData, *, rank: int, world_size: int,
                 run_dir: Path, run_id: str):
        if cfg.sampler != "sequential":
            raise ConfigError(f"method {cfg.method} mixes tasks in one step; the transformers "
                              "integration trains tasks in sequence: use `cptrain train` for it")
        self.cfg, self.data = cfg, data
        self.rank, self.world_size = rank, world_size
        self.plan = BatchPlan.build(cfg, world_size, rank)
        self.index = StepIndex(data.streams, self.plan)
        self.buffer: ReplayBuffer | None = None
        if self.plan.n_replay > 0:
            streams = data.streams
            self.buffer = ReplayBuffer(
                cfg.replay, Path(cfg.replay.dir) if cfg.replay.dir else run_dir / "replay",
                row_len=data.window_len, vocab_size=data.vocab_size, seed=cfg.seed,
                run_id=run_id, rank=rank, world_size=world_size,
                resolver=lambda task_id, idx: streams[task_id].rows(idx),
            )
        self.start_step = 0
        self.added_through = -1  # the last step whose fresh rows are in the buffer
        self.pending: dict[int, StepRows] = {}
        self.on_rows: Callable[[StepRows], None] | None = None
        self.callback = ReplayDataCallback(self)

    @property
    def total_steps(self) -> int:
        return self.index.total_steps

    def rows(self, step: int) -> StepRows:
        """This rank's rows of ``step`` (``cptrain train``'s: fresh, then replayed)."""
        task, fresh, idx = self.index.fresh(step)
        replay = None
        if self.buffer is not None and self.plan.n_replay_local > 0:
            lag = self.cfg.replay.visibility_lag
            if step - 1 - lag > self.added_through:
                raise ConfigError(
                    f"the data loader read step {step} while step {self.added_through + 1} "
                    f"trained, further ahead than replay.visibility_lag={lag} allows; raise "
                    "visibility_lag or read fewer batches ahead (dataloader_num_workers=0)"
                )
            replay = self.buffer.draw(step, self.plan.n_replay_local, current_task=task)
        return StepRows(step, task, fresh, idx, replay)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | None]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            raise ConfigError("ReplayDataset reads its buffer in the training process; set "
                              "dataloader_num_workers=0")
        for step in range(self.start_step, self.total_steps):
            rows = self.rows(step)
            self.pending[step] = rows
            if self.on_rows is not None:
                self.on_rows(rows)
            item = {"input_ids": torch.from_numpy(rows.rows)}
            for slot in range(self.world_size):
                yield item if slot == self.rank else None

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The one item of a batch (``per_device_train_batch_size=1``): rows are the batch;
        ``labels`` for a model's own loss (``ContinualTrainer`` reads ``input_ids`` only)."""
        if len(items) != 1:
            raise ConfigError("ReplayDataset items are whole steps; set "
                              "per_device_train_batch_size=1")
        rows = items[0]["input_ids"]
        return {"input_ids": rows, "labels": rows}

    def step_done(self, step: int) -> None:
        """Step ``step`` was taken: its fresh rows enter the buffer (``cptrain train``'s
        order: after the optimizer step)."""
        rows = self.pending.pop(step, None)
        for old in [s for s in self.pending if s < step]:
            del self.pending[old]
        if rows is None or self.buffer is None:
            return
        self.buffer.add(rows.fresh, task_id=rows.task, step=step, refs=rows.fresh_idx)
        self.added_through = step

    def start(self, step: int, model: torch.nn.Module | None = None,
              state: dict[str, Any] | None = None, run_dir: Path | None = None) -> None:
        """Begin at ``step``: restore the buffer (``state``), or seed a fresh one
        (``replay.seed``), then prefetch the draws to come."""
        self.start_step = step
        self.pending.clear()
        if self.buffer is None:
            return
        if state is not None:
            self.buffer.load_state_dict(state)
            self.added_through = step - 1
        elif step == 0 and self.cfg.replay.seed:
            self._seed(model, run_dir)
        if step < self.total_steps:
            task, task_step = self.index.locate(step)
            self.buffer.start_prefetch(self.plan.upcoming(step, task, task_step))

    def _seed(self, model: torch.nn.Module | None, run_dir: Path | None) -> None:
        from cptrain.distributed import DistEnv
        from cptrain.train.seed import seed_buffer

        env = DistEnv("ddp" if self.world_size > 1 else "none", rank=self.rank,
                      world_size=self.world_size,
                      device=next(model.parameters()).device if model else torch.device("cpu"))
        # seed_buffer reads these parts of a cptrain Trainer; the proxy and self-generated
        # seeds are the same rows `cptrain train` seeds
        host = SimpleNamespace(cfg=self.cfg, data=self.data, env=env, buffer=self.buffer,
                               model=model, autocast=None,
                               run_dir=SimpleNamespace(path=Path(run_dir or ".")),
                               objective=SimpleNamespace(write_topk=lambda *a: None))
        seed_buffer(host, progress=False)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()


class ReplayDataCallback(TrainerCallback):
    """Feeds the dataset's buffer after each step and keeps it with every ``checkpoint-N/``
    (``cptrain-replay-rank<r>.json``: the buffer's committed length, policy and counters)."""

    def __init__(self, dataset: ReplayDataset):
        self.dataset = dataset
        self.resume_dir: str | Path | None = None  # ContinualTrainer sets it on resume

    def _file(self, folder: Path) -> Path:
        return folder / f"cptrain-replay-rank{self.dataset.rank}.json"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        check_loader(args, kw.get("train_dataloader"))
        saved = None
        if state.global_step > 0:
            found = read_json(self._file(checkpoint_dir(args, state, self.resume_dir)),
                              "replay buffer state")
            if found.get("step") != state.global_step:
                raise CheckpointError(f"the replay state was saved at step {found.get('step')}"
                                      f", the checkpoint at {state.global_step}; resume from "
                                      "another checkpoint-N")
            saved = found.get("buffer")
        self.dataset.start(state.global_step, kw.get("model"), saved,
                           Path(self.dataset.cfg.run_dir))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.dataset.step_done(state.global_step - 1)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        buffer = self.dataset.buffer
        saved = buffer.state_dict() if buffer is not None else None
        folder = checkpoint_dir(args, state)
        folder.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_json(self._file(folder), {
            "version": STATE_VERSION, "step": state.global_step, "buffer": saved})

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.dataset.close()


def check_loader(args: Any, loader: Any) -> None:
    """One line for each Trainer setting the replay dataset cannot work with."""
    if args.dataloader_num_workers:
        raise ConfigError("ReplayDataset reads its buffer in the training process; set "
                          "dataloader_num_workers=0")
    if not args.ignore_data_skip:
        raise ConfigError("ReplayDataset starts at the resumed step itself; set "
                          "ignore_data_skip=True (else the Trainer skips those steps again)")
    if args.gradient_accumulation_steps != 1:
        raise ConfigError("ReplayDataset items are whole optimizer steps; set "
                          "gradient_accumulation_steps=1 (train.micro_batch_size is not "
                          "supported here)")
    if loader is not None and type(loader).__name__ == "DataLoaderDispatcher":
        raise ConfigError("each rank draws from its own replay buffer; set "
                          "accelerator_config={'dispatch_batches': False}")
