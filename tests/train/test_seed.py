"""A run's replay buffer: where the run keeps it (train.seed.open_buffer), and its seed rows,
put in before the first task (train.seed.seed_buffer). Generating rows from the model is
replay/test_seeding.py's; a seeded run end to end is test_trainer.py's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cptrain.data.prepare import open_split
from cptrain.distributed import DistEnv
from cptrain.errors import ConfigError
from cptrain.train import Trainer
from cptrain.train.seed import seed_buffer

REPLAY = {"alpha": 0.25, "visibility_lag": 1}


def test_the_buffer_is_kept_under_the_run_or_replay_dir_one_folder_per_rank(make_config,
                                                                            tmp_path):
    inside = Trainer(make_config("inside", method="replay", replay=REPLAY), progress=False)
    inside.close()
    assert inside.buffer.directory == Path(inside.cfg.run_dir) / "replay" / "rank_0"
    cfg = make_config("outside", method="replay",
                      replay={**REPLAY, "dir": str(tmp_path / "elsewhere")})
    outside = Trainer(cfg, progress=False)
    outside.close()
    assert outside.buffer.directory == tmp_path / "elsewhere" / "rank_0"
    assert not (Path(cfg.run_dir) / "replay").exists()


def test_task_seed_rows_are_windows_of_that_tasks_training_split(make_config, prepared_dir):
    seed = [{"source": "task", "task": "asyncio", "tokens": 32 * 5}]
    cfg = make_config("seeded", method="replay", replay={**REPLAY, "seed": seed},
                      data={"tasks": ["email", "xml"]})
    trainer = Trainer(cfg, progress=False)
    try:
        assert trainer.buffer.stats()["seed_rows"] == 5  # tokens count seq_len per row
        drawn = trainer.buffer.draw(0, 100, current_task=0)
    finally:
        trainer.close()
    shard = open_split(prepared_dir, "asyncio", "train")
    n = shard.num_windows(33)
    windows = {r.tobytes() for r in shard.windows(np.arange(n), 33).astype(np.int64)}
    assert len(drawn) == 5 and all(r.tobytes() in windows for r in drawn)
    assert len({r.tobytes() for r in drawn}) == 5
    assert not (Path(cfg.run_dir) / "replay" / "seed_work").exists()


def test_a_seed_without_replay_is_ignored_with_a_warning(make_config, capsys):
    seed = [{"source": "task", "task": "asyncio", "tokens": 32 * 5}]
    trainer = Trainer(make_config("unseeded", replay={"seed": seed}), progress=False)
    trainer.close()
    assert trainer.buffer is None
    assert "warning: replay.seed is set but this run replays nothing (alpha 0); ignored" in (
        capsys.readouterr().out)


def fake_trainer(cfg, prepared_tasks, strategy="none"):
    """A trainer as far as seed_buffer reads it before it seeds anything."""
    return SimpleNamespace(cfg=cfg, env=DistEnv(strategy), buffer=object(),
                           data=SimpleNamespace(prepared={"tasks": dict.fromkeys(prepared_tasks)},
                                                window_len=33))


def test_self_seed_needs_the_unsharded_model(make_config):
    cfg = make_config("sharded", method="replay",
                      replay={**REPLAY, "seed": {"source": "self", "tokens": 32 * 4}})
    with pytest.raises(ConfigError, match="replay.seed source self needs the unsharded model"):
        seed_buffer(fake_trainer(cfg, ["email"], strategy="fsdp2"), progress=False)


def test_a_seed_task_that_is_not_prepared_is_refused(make_config):
    seed = [{"source": "task", "task": "asyncio", "tokens": 32 * 5}]
    cfg = make_config("missing", method="replay", replay={**REPLAY, "seed": seed})
    with pytest.raises(ConfigError, match=r"replay.seed.0.task: asyncio is not prepared"):
        seed_buffer(fake_trainer(cfg, ["email", "xml"]), progress=False)
