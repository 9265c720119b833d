"""The prepared data a run trains and evaluates on, opened and checked once at start."""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.config import RunConfig
from cptrain.data.prepare import load_prepared, load_prepared_tokenizer, open_split
from cptrain.data.shards import ShardSet
from cptrain.errors import ConfigError, DataError
from cptrain.evaluation import metrics
from cptrain.train.batches import TaskStream


class TrainingData:
    """Train streams and validation shards of the configured tasks, in training order."""

    def __init__(self, cfg: RunConfig):
        self.dir = Path(cfg.data.dir)
        self.prepared: dict[str, Any] = load_prepared(self.dir)
        self.tokenizer_dir = self.dir / "tokenizer"
        self.task_names = [t.name for t in cfg.data.tasks]
        self.eval_only = list(cfg.data.eval_only)
        # The loss matrix's columns: trained tasks in order, then evaluation-only tasks.
        self.columns = [*self.task_names, *self.eval_only]
        known = list(self.prepared.get("tasks", {}))
        for key, names in (("data.tasks", self.task_names), ("data.eval_only", self.eval_only)):
            missing = [n for n in names if n not in known]
            if missing:
                raise ConfigError(
                    f"{key}: {', '.join(missing)} not in {self.dir} (prepared tasks: "
                    f"{', '.join(known) or 'none'}); fix the task list or re-run `cptrain prepare`"
                )
        self.window_len = cfg.train.seq_len + 1
        train_sets = {n: open_split(self.dir, n, "train") for n in self.task_names}
        self.train_sets: dict[str, ShardSet] = train_sets
        self.val_sets: dict[str, ShardSet] = {
            n: open_split(self.dir, n, "val") for n in self.columns
        }
        for shard in (*train_sets.values(), *self.val_sets.values()):
            shard.num_windows(self.window_len)  # DataError naming the task and split if none fits
        # Full checksums once per start (~1 s per GB): a flipped byte that keeps token ids in
        # the vocabulary would otherwise train silently. After the cheap checks above, so a
        # mistake in the config is reported before the data is read.
        for shard in (*train_sets.values(), *self.val_sets.values()):
            shard.verify(full=True)
        load_prepared_tokenizer(self.dir)
        pools = [
            None if t.unique_tokens is None else math.ceil(t.unique_tokens / cfg.train.seq_len)
            for t in cfg.data.tasks
        ]
        self.streams = [
            TaskStream(train_sets[n], i, cfg.seed, self.window_len, n, unique_windows=pools[i])
            for i, n in enumerate(self.task_names)
        ]
        self.vocab_size = max(s.vocab_size for s in (*train_sets.values(), *self.val_sets.values()))
        self.train_tokens = [s.num_tokens for s in train_sets.values()]

    def union_loss(self, losses: dict[str, float], windows: int) -> float:
        """The loss on these columns' validation windows together: a task whose val split
        holds fewer than ``windows`` (eval.windows) windows weighs less."""
        from cptrain.evaluation.losses import eval_indices  # torch: this module is read before it

        counts = [len(eval_indices(self.val_sets[n].num_windows(self.window_len), windows))
                  for n in losses]
        return metrics.union_loss(list(losses.values()), counts)

    def check_token_ids(self, rows: np.ndarray, task_idx: int, vocab_size: int) -> None:
        """DataError when a row holds an id the model cannot embed (shards of another
        tokenizer than the model's)."""
        top = int(rows.max())
        if top >= vocab_size:
            raise DataError(
                f"token id {top} in task {self.task_names[task_idx]} is >= the model's vocabulary "
                f"({vocab_size}); the shards do not match the model's tokenizer"
            )

    @property
    def separators(self) -> tuple[int | None, int | None]:
        """The (eos, bos) ids that frame every document of the shards."""
        tok = self.prepared["tokenizer"]
        return tok.get("eos_id"), tok.get("bos_id")

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.prepared["tokenizer"]["sha256"])

    @cached_property
    def identity(self) -> dict[str, str]:
        """What the data is, wherever it lies: the tokenizer's sha256 and one over the sha256s
        of every shard file the run reads (a byte-identical copy elsewhere has the same)."""
        files = {
            f"{n}/{split}": [f["sha256"] for f in shard.files]
            for split, sets in (("train", self.train_sets), ("val", self.val_sets))
            for n, shard in sets.items()
        }
        blob = json.dumps(files, sort_keys=True).encode()
        return {"tokenizer_sha256": self.tokenizer_sha256,
                "data_sha256": hashlib.sha256(blob).hexdigest()}

    def _check_gguf_vocabulary(self, path: Path, tokens: list[str] | None) -> None:
        fix = "prepare the data with the model's own tokenizer (tokenizer.path)"
        if tokens is None:
            raise DataError(
                f"model.init_from {path} carries no vocabulary (tokenizer.ggml.tokens), so "
                f"nothing shows that {self.dir} was tokenized with its tokenizer; {fix}"
            )
        ours = load_prepared_tokenizer(self.dir)
        vocab = ours.convert_ids_to_tokens(list(range(len(ours))))
        differ = sum(a != b for a, b in zip(tokens, vocab, strict=False))
        differ += abs(len(tokens) - len(vocab))
        if differ:
            raise DataError(
                f"model.init_from {path} has another vocabulary than the tokenizer {self.dir} "
                f"was prepared with ({differ} of {max(len(tokens), len(vocab))} token ids "
                f"differ); {fix}"
            )

    def check_model_tokenizer(self, model_dir: str) -> None:
        """Refuse shards tokenized with another tokenizer than the ``init_from`` model's, and
        a model whose tokenizer cannot be compared (trained on, its losses would mean
        nothing)."""
        from cptrain.data.tokenizer import gguf_tokens, model_tokenizer_sha256

        if Path(model_dir).is_file():  # a .gguf: its vocabulary, id by id
            self._check_gguf_vocabulary(Path(model_dir), gguf_tokens(model_dir))
            return
        found = model_tokenizer_sha256(model_dir)
        if found is None:
            raise DataError(
                f"model.init_from {model_dir} has no tokenizer.json, so nothing shows that "
                f"{self.dir} was tokenized with its tokenizer; save the model's tokenizer there "
                "(save_pretrained) and prepare the data with it"
            )
        if found != self.tokenizer_sha256:
            raise DataError(
                f"{self.dir} was tokenized with tokenizer {self.tokenizer_sha256[:12]} but the "
                f"model.init_from model {model_dir} uses tokenizer {found[:12]}; prepare the "
                f"data with `tokenizer: {{path: {model_dir}}}`"
            )
