"""Which model a downstream evaluation means (``cptrain.evaluation.targets``): a run, one of its
exports or checkpoints, or any model directory; and the errors for what is none of these."""

from __future__ import annotations

import shutil

import pytest

from cptrain.errors import CheckpointError, ConfigError
from cptrain.evaluation.targets import resolve_target
from evaluation.conftest import TASK


def test_targets_resolve_to_model_directories(fake_run, tmp_path):
    model = fake_run / "models" / f"after_0_{TASK}"
    assert resolve_target(fake_run).model_dir == model
    t = resolve_target(model)
    assert t.model_dir == model and t.run_dir == fake_run and t.config is not None
    ckpt = tmp_path / "checkpoints" / "step_4"
    shutil.copytree(model, ckpt / "model")
    assert resolve_target(ckpt).model_dir == ckpt / "model"
    empty = tmp_path / "empty_run"
    (empty / "models").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no exported model"):
        resolve_target(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_target(tmp_path / "missing")
