"""What ``cptrain train`` checks before it imports torch (seconds on a busy machine): the run
directory against the start mode, and the data (prepared tasks, a window per split, shard
checksums, the tokenizer). A mistake in either is reported at once; the checked data is handed
to the trainer, so it is not read twice."""

from __future__ import annotations

from pathlib import Path

from cptrain.config import RunConfig
from cptrain.data.tokenizer import require_model_dir
from cptrain.rundir.run_dir import StartMode, check_start
from cptrain.train.data import TrainingData


def preflight(cfg: RunConfig, mode: StartMode) -> TrainingData:
    check_start(Path(cfg.run_dir), mode)
    init = cfg.model.init_from
    if init and not Path(init).is_file():  # a .gguf is a file; anything else a directory
        require_model_dir(init)
    data = TrainingData(cfg)
    if cfg.model.init_from:
        data.check_model_tokenizer(cfg.model.init_from)
    return data
