"""What the integration tests share: the start model both loops load, `cptrain train` with a
hook that records every step's rows (the oracle the other loops must equal), and the run
settings of the proofs (tiny model, two tasks, replay 25 %, MER, fp32, one process)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from cptrain.train.hooks import Batch, Hook

# MER: replay 25 % and Reptile k=3, ε=0.5 on two tasks of 6 steps of 8 × 32 tokens.
MER: dict[str, Any] = {
    "method": "mer",
    "data": {"tasks": ["email", "xml"]},
    "replay": {"alpha": 0.25},
    "reptile": {"k": 3, "epsilon": 0.5},
}


def start_model(root: Path, prepared: Path) -> Path:
    """The tiny preset at seed 0 as a Hugging Face directory with the data's tokenizer: what
    `model.init_from` loads for `cptrain train` and `from_pretrained` for the other loops."""
    from conftest import with_tokenizer

    from cptrain.data.prepare import load_prepared
    from cptrain.models.build import build_model

    out = root / "start_model"
    if not (out / "config.json").is_file():
        vocab = int(load_prepared(prepared)["tokenizer"]["vocab_size"])
        build_model("tiny", vocab, seed=0, max_positions=64).save_pretrained(out)
        with_tokenizer(out, prepared)
    return out


def digest(rows: np.ndarray | None) -> str:
    rows = np.zeros((0, 0), np.int64) if rows is None else np.ascontiguousarray(rows, np.int64)
    return hashlib.sha256(rows.tobytes() + str(rows.shape).encode()).hexdigest()[:16]


class RowRecorder(Hook):
    """Every step's rows as `cptrain train` trains them: step -> (task, fresh, replay)."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, np.ndarray, np.ndarray | None]] = {}

    def before_step(self, run: Any, batch: Batch) -> dict[str, Any]:
        self.rows[run.state.step] = (batch.task, batch.fresh.copy(),
                                     None if batch.replay is None else batch.replay.copy())
        return {}


def cptrain_train(cfg: Any) -> tuple[dict[str, Any], RowRecorder]:
    """`cptrain train`'s loop on ``cfg``: (summary, the rows of every step)."""
    from cptrain.train import Trainer

    rec = RowRecorder()
    trainer = Trainer(cfg, progress=False, hooks=[rec])
    return trainer.run(), rec


def read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """The rows log hf_job.py writes (step -> record; a later record of a step wins)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out
