"""Validation loss (``cptrain.evaluation.losses``): a fixed set of evenly spaced windows of
every task's held-out split, scored by mean next-token cross-entropy, in eval mode."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cptrain.data.shards import ShardSet, ShardWriter
from cptrain.evaluation.losses import eval_indices, evaluate_tasks, token_loss

VOCAB = 16


class Bigram(torch.nn.Module):
    """Logits of the next token from the current one alone; records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB))
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.modes.append(self.training)
        return SimpleNamespace(logits=self.table[input_ids])


def _split(path: Path, seed: int, docs: int = 12) -> ShardSet:
    rng = np.random.default_rng(seed)
    with ShardWriter(path, VOCAB, VOCAB - 1, "test") as writer:
        for _ in range(docs):
            writer.append(rng.integers(0, VOCAB - 1, size=int(rng.integers(5, 30))))
    return ShardSet(path)


@torch.no_grad()
def _reference_loss(model: Bigram, rows: torch.Tensor) -> float:
    logp = torch.log_softmax(model.table[rows[:, :-1]], -1)
    return float(-logp.gather(-1, rows[:, 1:, None]).mean())


def test_eval_indices_are_evenly_spaced_fixed_and_capped() -> None:
    assert eval_indices(100, 5).tolist() == [0, 25, 50, 74, 99]  # first and last included
    assert eval_indices(100, 5).tolist() == eval_indices(100, 5).tolist()
    assert eval_indices(3, 8).tolist() == [0, 1, 2]  # no more windows than the split has
    assert eval_indices(10, 1).tolist() == [0]


def test_token_loss_is_the_mean_next_token_cross_entropy() -> None:
    model = Bigram()
    rows = torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [0, 0, 7, 7, 9]])
    with torch.no_grad():
        got = float(token_loss(model, rows, None))
    assert got == pytest.approx(_reference_loss(model, rows), rel=1e-6)
    uniform = torch.zeros(VOCAB, VOCAB)
    with torch.no_grad():
        model.table.copy_(uniform)
        assert float(token_loss(model, rows, None)) == pytest.approx(np.log(VOCAB), rel=1e-6)


def test_evaluate_tasks_scores_every_task_on_its_fixed_windows(tmp_path: Path) -> None:
    sets = {"a": _split(tmp_path / "a", 0), "b": _split(tmp_path / "b", 1, docs=20)}
    model = Bigram()
    model.train()
    got = evaluate_tasks(model, sets, window_len=9, windows=5, batch_size=2)
    assert set(got) == {"a", "b"}
    assert model.training and model.modes and not any(model.modes)  # eval mode, then restored
    for name, shard in sets.items():
        idx = eval_indices(shard.num_windows(9), 5)
        rows = torch.from_numpy(shard.windows(idx, 9))
        assert got[name] == pytest.approx(_reference_loss(model, rows), rel=1e-5)
    assert got["a"] != got["b"]
    # the batch size changes nothing but the grouping
    again = evaluate_tasks(model, sets, window_len=9, windows=5, batch_size=3)
    assert again == pytest.approx(got, rel=1e-5)
    model.eval()
    evaluate_tasks(model, sets, window_len=9, windows=5, batch_size=2)
    assert not model.training
