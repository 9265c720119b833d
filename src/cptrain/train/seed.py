"""A run's replay buffer: opened where the run keeps it, and filled before the first task
(``replay.seed``) with rows that stand in for the starting model's pre-training data, from a
prepared proxy task or sampled from the model."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cptrain.data.prepare import load_prepared_tokenizer, open_split
from cptrain.errors import ConfigError
from cptrain.replay import seeding
from cptrain.replay.config import check_seed_tasks

if TYPE_CHECKING:
    from cptrain.replay.buffer import ReplayBuffer
    from cptrain.train.trainer import Trainer


def open_buffer(trainer: Trainer) -> ReplayBuffer:
    """The run's buffer (``replay.dir``, else ``<run_dir>/replay``; ``rank_<r>/`` per rank);
    replayed windows are read back through the task streams."""
    from cptrain.replay.buffer import ReplayBuffer

    cfg, streams = trainer.cfg, trainer.streams
    return ReplayBuffer(
        cfg.replay,
        Path(cfg.replay.dir) if cfg.replay.dir else trainer.run_dir.path / "replay",
        row_len=trainer.data.window_len,
        vocab_size=trainer.data.vocab_size,
        seed=cfg.seed,
        run_id=trainer.state.run_id,
        rank=trainer.env.rank,
        world_size=trainer.env.world_size,
        resolver=lambda task_id, idx: streams[task_id].rows(idx),
    )


def seed_buffer(trainer: Trainer, progress: bool) -> None:
    """On a fresh start only (a resumed buffer gets its seed rows from the checkpoint)."""
    cfg, data, env = trainer.cfg, trainer.data, trainer.env
    sources = cfg.replay.seed or []
    if not sources:
        return
    if trainer.buffer is None:
        print("warning: replay.seed is set but this run replays nothing (alpha 0); ignored")
        return
    if env.strategy == "fsdp2" and any(s.source == "self" for s in sources):
        raise ConfigError(
            "replay.seed source self needs the unsharded model; use distributed.strategy ddp "
            "or none for a self-seeded run"
        )
    check_seed_tasks(sources, list(data.prepared.get("tasks", {})))
    length = data.window_len
    tok = load_prepared_tokenizer(data.dir)
    info = data.prepared["tokenizer"]
    # A row of generated text starts where a document starts in the shards: after BOS when the
    # tokenizer uses one, else after the EOS that ends the previous document.
    start = info.get("bos_id") if info.get("bos_id") is not None else info.get("eos_id")
    root = trainer.buffer.directory.parent
    for i, src in enumerate(sources):
        if src.source == "task":
            shard = open_split(data.dir, src.task, "train")
            rows = seeding.proxy_rows(
                lambda idx, shard=shard: shard.windows(idx, length),
                shard.num_windows(length),
                tokens=src.tokens, row_len=length, seed=cfg.seed, origin=i,
                rank=env.rank, world_size=env.world_size,
            )
        else:
            prompts = None
            if src.prompt is not None:
                prompts = seeding.document_prefixes(
                    open_split(data.dir, src.prompt.task, "train"),
                    n=seeding.rows_for_tokens(src.tokens, length),
                    prefix_tokens=src.prompt.prefix_tokens, seed=cfg.seed, origin=i,
                )
            rows = seeding.generate_rows(
                trainer.model,
                tokens=src.tokens, row_len=length, batch_size=src.batch_size,
                temperature=src.temperature, top_p=src.top_p, seed=cfg.seed,
                prompts=prompts, bos_id=start,
                work_dir=root / "seed_work" / f"rank_{env.rank}" / f"origin_{i}",
                progress=progress, vocab_size=data.vocab_size, origin=i,
                rank=env.rank, world_size=env.world_size, autocast=trainer.autocast,
                decode=tok.decode, sample_path=trainer.run_dir.path / f"replay_seed_{i}.txt",
            )
        trainer.buffer.add_seed(rows, origin=i, name=src.label)
    trainer.objective.write_topk(trainer.buffer, cfg.eval.batch_size)
    # The generation's resumable scratch is in the buffer now: nothing reads it again.
    shutil.rmtree(root / "seed_work" / f"rank_{env.rank}", ignore_errors=True)
    with contextlib.suppress(OSError):
        (root / "seed_work").rmdir()  # the last rank to finish removes the folder
