"""Stored top-k targets: the start model's k most likely next tokens (ids and log-probabilities)
at every position of each seed row, written once when the buffer is seeded, so that the KL
anchor on replayed seed rows needs no second model at step time.

Cost on disk and in RAM (memory-mapped): k · (2 + 2) bytes per token with a vocabulary under
65,536 (uint16 ids, float16 log-probabilities), k · (4 + 2) above it; k = 64 is 256 bytes per
token against 2 for the token itself. Rows are indexed by their id in the buffer, where seed
rows come first (0 … n_seed − 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cptrain.errors import CheckpointError
from cptrain.fsutil import atomic_writer


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def bytes_per_token(k: int, vocab_size: int) -> int:
    return k * (id_dtype(vocab_size).itemsize + 2)


class TopKStore:
    def __init__(self, directory: Path, k: int, vocab_size: int) -> None:
        self.k = k
        self.vocab_size = vocab_size
        self.ids_path = directory / f"seed_top{k}_ids.npy"
        self.logp_path = directory / f"seed_top{k}_logp.npy"
        self._ids: np.ndarray | None = None
        self._logp: np.ndarray | None = None

    def write(self, ids: np.ndarray, logp: np.ndarray) -> None:
        """Both arrays, each atomically (temp file + rename), the log-probabilities last: a
        store whose logp file exists is whole."""
        self.ids_path.parent.mkdir(parents=True, exist_ok=True)
        for path, arr in ((self.ids_path, ids.astype(id_dtype(self.vocab_size))),
                          (self.logp_path, logp.astype(np.float16))):
            with atomic_writer(path) as f:
                np.save(f, arr)

    def open(self, rows: int, positions: int) -> None:
        """Map the stored targets; they must cover ``rows`` seed rows of ``positions`` tokens."""
        want = (rows, positions, self.k)
        try:
            self._ids = np.load(self.ids_path, mmap_mode="r")
            self._logp = np.load(self.logp_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"the stored top-{self.k} targets of the seed rows cannot be read ({exc}); "
                "start the run again (they are written when the buffer is seeded)"
            ) from None
        if self._ids.shape != want or self._logp.shape != want:
            raise CheckpointError(
                f"{self.ids_path} holds targets of shape {self._ids.shape}, the buffer's seed "
                f"rows need {want}; start the run again with an empty replay.dir"
            )

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 ids, float16 log-probabilities) [len(rows), positions, k] of seed rows."""
        if self._ids is None or self._logp is None:
            raise RuntimeError("TopKStore.read before open")
        ids = torch.from_numpy(np.asarray(self._ids[rows]).astype(np.int64))
        return ids, torch.from_numpy(np.array(self._logp[rows]))
