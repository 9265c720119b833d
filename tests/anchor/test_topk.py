"""Stored top-k targets: written whole, read back by row, refused when they do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cptrain.anchor.topk import TopKStore, bytes_per_token
from cptrain.errors import CheckpointError


def test_round_trip_by_row(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (5, 7, 3))
    logp = -rng.random((5, 7, 3)).astype(np.float32)
    store = TopKStore(tmp_path, 3, vocab_size=1000)
    store.write(ids, logp)
    assert not list(tmp_path.glob("*.tmp*"))
    store.open(5, 7)
    got_ids, got_logp = store.read(np.array([4, 1]))
    assert torch.equal(got_ids, torch.from_numpy(ids[[4, 1]]))
    assert got_ids.dtype == torch.int64 and got_logp.dtype == torch.float16
    np.testing.assert_allclose(got_logp.float().numpy(), logp[[4, 1]], rtol=1e-3)


def test_missing_or_mismatched_targets_get_one_line_errors(tmp_path):
    store = TopKStore(tmp_path, 3, vocab_size=1000)
    with pytest.raises(CheckpointError, match="cannot be read.*start the run again"):
        store.open(5, 7)
    store.write(np.zeros((5, 7, 3), dtype=np.int64), np.zeros((5, 7, 3), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"need \(6, 7, 3\)"):
        store.open(6, 7)


def test_bytes_per_token():
    assert bytes_per_token(64, 49152) == 64 * 4  # uint16 ids + float16 log-probabilities
    assert bytes_per_token(64, 151936) == 64 * 6  # int32 ids above 65,536 tokens
