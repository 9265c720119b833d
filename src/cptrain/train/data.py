"""The prepared data a run trains and evaluates on, opened and checked once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cptrain.config import RunConfig
from cptrain.data.prepare import load_prepared, load_prepared_tokenizer, open_split
from cptrain.data.shards import ShardSet
from cptrain.errors import ConfigError, DataError
from cptrain.train.batches import TaskStream


class TrainingData:
    """Train streams and validation shards of the configured tasks, in training order."""

    def __init__(self, cfg: RunConfig):
        self.dir = Path(cfg.data.dir)
        self.prepared: dict[str, Any] = load_prepared(self.dir)
        self.tokenizer_dir = self.dir / "tokenizer"
        self.task_names = [t.name for t in cfg.data.tasks]
        known = list(self.prepared.get("tasks", {}))
        missing = [n for n in self.task_names if n not in known]
        if missing:
            raise ConfigError(
                f"data.tasks: {', '.join(missing)} not in {self.dir} (prepared tasks: "
                f"{', '.join(known) or 'none'}); fix the task list or re-run `cptrain prepare`"
            )
        self.window_len = cfg.train.seq_len + 1
        train_sets = {n: open_split(self.dir, n, "train") for n in self.task_names}
        self.val_sets: dict[str, ShardSet] = {
            n: open_split(self.dir, n, "val") for n in self.task_names
        }
        # Full checksums once per start (~1 s per GB): a flipped byte that keeps token ids in
        # the vocabulary would otherwise train silently.
        for shard in (*train_sets.values(), *self.val_sets.values()):
            shard.verify(full=True)
        load_prepared_tokenizer(self.dir)
        self.streams = [
            TaskStream(train_sets[n], i, cfg.seed, self.window_len, n)
            for i, n in enumerate(self.task_names)
        ]
        for n, s in self.val_sets.items():
            if s.num_windows(self.window_len) == 0:
                raise DataError(
                    f"task {n}: validation split has {s.num_tokens} tokens, fewer than one "
                    f"window of {self.window_len}; lower train.seq_len or add validation text"
                )
        self.vocab_size = max(s.vocab_size for s in train_sets.values())
        self.train_tokens = [s.num_tokens for s in train_sets.values()]

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.prepared["tokenizer"]["sha256"])
