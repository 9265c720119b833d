"""Replay rows on their way in and out of the chunk store: the checks an offered batch must pass
before anything is written, and reading drawn rows back, each checked against the CRC of the
tokens it was added with.

Copy mode reads the tokens from the records; reference mode resolves the recorded window
indices against the task shards, or against the seed store for seed rows. This lives apart
from buffer.py because it is the one place that turns stored records into tokens, and the one
that says, when they do not match, which file is to blame.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cptrain.errors import DataError
from cptrain.replay.seed_rows import SeedRows, seed_origin
from cptrain.replay.storage import ChunkStore, row_crcs

# Reference mode: (task id, window indices) → tokens [n, row_len] from the task's shards.
Resolver = Callable[[int, np.ndarray], np.ndarray]


def check_tokens(rows: np.ndarray, *, row_len: int, vocab_size: int) -> None:
    """DataError/ValueError unless `rows` are [n, row_len] token ids of the vocabulary."""
    if rows.ndim != 2 or rows.shape[1] != row_len:
        raise DataError(
            f"replay rows have shape {tuple(rows.shape)} but this run's rows are "
            f"[n, {row_len}] (seq_len + 1); check data.seq_len against the shards"
        )
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"replay rows must hold integer token ids, not {rows.dtype}")
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= vocab_size):
        bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
        raise DataError(
            f"token id {bad} is outside the vocabulary (size {vocab_size}); the shards "
            "and the tokenizer do not match: re-run `cptrain prepare`"
        )


def check_refs(rows: np.ndarray, refs: np.ndarray | None) -> np.ndarray:
    """The window indices of `rows` as int64 (reference mode); ValueError when unusable."""
    if refs is None:
        raise ValueError("storage=reference needs refs (the rows' window indices)")
    refs = np.asarray(refs, dtype=np.int64).reshape(-1)
    if len(refs) != len(rows) or (len(refs) and int(refs.min()) < 0):
        raise ValueError(f"refs must be {len(rows)} non-negative window indices")
    return refs


class RowReader:
    """Reads rows of one rank's store by id and checks them. Safe to call from the prefetch
    thread: it only reads rows already appended."""

    def __init__(
        self,
        store: ChunkStore,
        seeds: SeedRows,
        resolver: Resolver | None,
        *,
        row_len: int,
        dtype: np.dtype,
    ) -> None:
        self._store = store
        self._seeds = seeds
        self._resolver = resolver  # None: copy mode, the records are the tokens
        self._row_len = row_len
        self._dtype = dtype

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int64 tokens [len(ids), row_len], int64 task id of each row)."""
        records, meta = self._store.read(ids)
        tokens = records if self._resolver is None else self._resolve(ids, records[:, 0], meta)
        bad = np.flatnonzero(row_crcs(tokens) != meta["crc"])
        if len(bad):
            raise self._corrupt_row(int(ids[bad[0]]), meta[bad[0]], records[bad[0]])
        return tokens.astype(np.int64), meta["task"].astype(np.int64)

    def _resolve(self, ids: np.ndarray, windows: np.ndarray, meta: np.ndarray) -> np.ndarray:
        assert self._resolver is not None
        tokens = np.empty((len(ids), self._row_len), dtype=self._dtype)
        for task in np.unique(meta["task"]):
            sel = np.flatnonzero(meta["task"] == task)
            if seed_origin(int(task)) is not None:
                tokens[sel] = self._seed_tokens(ids[sel], windows[sel])
                continue
            try:
                got = np.asarray(self._resolver(int(task), windows[sel]))
            except (IndexError, ValueError) as exc:
                path, row = self._store.locate(int(ids[sel[0]]))
                raise DataError(
                    f"replay references in {path} (row {row}, task {int(task)}) do not resolve "
                    f"against the task shards ({exc}); restore the shards or use storage: copy"
                ) from None
            if got.shape != (len(sel), self._row_len):
                raise DataError(
                    f"the task {int(task)} shard reader returned rows of shape {got.shape}, "
                    f"expected {(len(sel), self._row_len)}; the shards do not match this buffer"
                )
            tokens[sel] = got  # out-of-range ids wrap here and then fail the checksum
        return tokens

    def _seed_tokens(self, ids: np.ndarray, index: np.ndarray) -> np.ndarray:
        try:
            return self._seeds.read_tokens(index)
        except IndexError:
            path, row = self._store.locate(int(ids[0]))
            raise DataError(
                f"replay row {row} of {path} refers to a seed row that {self._seeds.dir} does "
                "not hold; resume from an earlier checkpoint or start again with an empty "
                "replay.dir"
            ) from None

    def _corrupt_row(self, row: int, meta: np.ndarray, record: np.ndarray) -> DataError:
        path, local = self._store.locate(row)
        if self._resolver is None:
            return DataError(
                f"replay chunk file {path} row {local} fails its checksum (corrupt bytes); "
                "resume from an earlier checkpoint or start again with an empty replay.dir"
            )
        return DataError(
            f"replay row {local} of {path} (task {int(meta['task'])}, window {int(record[0])}) "
            "no longer matches the tokens it stored: the task shards changed or the file is "
            "corrupt; restore the shards or use storage: copy"
        )
