"""The prepare config: what it refuses, in one line, before any file is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from cptrain.config_base import load_config
from cptrain.data.prepare_config import PrepareConfig
from cptrain.errors import ConfigError
from data.test_prepare import config, corpus  # noqa: F401 - corpus is a fixture


@pytest.mark.parametrize("change,message", [
    ({"tasks": []}, "tasks"),
    ({"tasks": [{"name": "a", "train": ["x"]}, {"name": "A", "train": ["y"]}]}, "used twice"),
    ({"tasks": [{"name": "../up", "train": ["x"]}]}, "tasks.0.name"),
    ({"tasks": [{"name": "", "train": ["x"]}]}, "tasks.0.name"),
    ({"tasks": [{"name": "tokenizer", "train": ["x"]}]}, "reserved"),
    ({"tasks": [{"name": "a", "train": []}]}, "task 'a' has no inputs"),
    ({"tasks": [{"name": "a", "val": ["x"]}]}, "every task is evaluation-only"),
    ({"tokenizer": {"vocab_size": 256}}, "tokenizer.vocab_size"),
    ({"tokenizer": {"vocab_size": 2**32}}, "tokenizer.vocab_size"),
    ({"val_fraction": 0}, "val_fraction"),
    ({"shard_tokens": 0}, "shard_tokens"),
    ({"tokenizer": {"vocab": 300}}, "unknown key"),
])
def test_config_rejects(tmp_path: Path, corpus: Path, change: dict, message: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=message) as info:
        config(tmp_path, corpus, **change)
    assert "\n" not in str(info.value)


def test_config_from_yaml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prep.yaml"
    path.write_text("out_dir: o\ntokenizer: {vocab_size: 8192}\n"
                    "tasks:\n  - {name: en, train: [a.jsonl], val: [b.jsonl]}\n")
    cfg = load_config(PrepareConfig, path, ["tokenizer.vocab_size=512", "batch_size=10"])
    assert cfg.tokenizer.vocab_size == 512 and cfg.batch_size == 10
    assert cfg.tasks[0].val == [Path("b.jsonl")] and cfg.val_fraction == 0.01
