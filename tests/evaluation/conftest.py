"""Shared by the downstream evaluation tests: a run directory with an exported model."""

from __future__ import annotations

import shutil

import pytest
import yaml

from cptrain.data.prepare import load_prepared_tokenizer
from cptrain.models.build import build_model

TASK = "email"


@pytest.fixture(scope="module")
def fake_run(prepared_dir, tmp_path_factory):
    """A run directory with an exported (untrained) model, as the trainer leaves it."""
    run = tmp_path_factory.mktemp("ds") / "run"
    tok = load_prepared_tokenizer(prepared_dir)
    model = build_model("tiny", len(tok), seed=0, max_positions=32)  # as trained at seq_len 32
    out = run / "models" / f"after_0_{TASK}"
    model.save_pretrained(out)
    for f in (prepared_dir / "tokenizer").iterdir():
        shutil.copy2(f, out / f.name)
    cfg = {"data": {"dir": str(prepared_dir), "tasks": [{"name": TASK}]},
           "train": {"seq_len": 32}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run
