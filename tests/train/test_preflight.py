"""What ``cptrain train`` checks before it imports torch: the run directory against the start
mode, and the data (with the init_from model's tokenizer); the checked data is handed on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cptrain.errors import CheckpointError, ConfigError, DataError
from cptrain.train.data import TrainingData
from cptrain.train.preflight import preflight


def test_a_sound_run_gets_its_checked_data_and_leaves_no_run_directory(make_config):
    cfg = make_config("fresh", data={"tasks": ["xml", "email"]})
    data = preflight(cfg, False)
    assert isinstance(data, TrainingData)
    assert data.task_names == ["xml", "email"] and data.dir == Path(cfg.data.dir)
    assert not Path(cfg.run_dir).exists()


def test_the_run_directory_is_checked_against_the_start_mode(make_config):
    cfg = make_config("held")
    run = Path(cfg.run_dir)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        preflight(cfg, True)  # nothing to resume
    run.mkdir()
    (run / "summary.json").write_text("{}")  # a finished run is there
    with pytest.raises(ConfigError, match="already holds a run"):
        preflight(cfg, False)
    for mode in ("restart", "auto"):  # these set the old attempt aside: nothing to refuse
        assert isinstance(preflight(cfg, mode), TrainingData)


def test_data_mistakes_are_reported(make_config, tmp_path):
    with pytest.raises(ConfigError, match="klingon not in"):
        preflight(make_config("a", data={"tasks": ["email", "klingon"]}), False)
    with pytest.raises(DataError, match="fewer than one window"):
        preflight(make_config("b", train={"seq_len": 100_000}), False)
    with pytest.raises(DataError, match="cptrain prepare"):
        preflight(make_config("c", data={"dir": str(tmp_path / "nowhere")}), False)


def test_the_init_from_models_tokenizer_must_be_the_datas(make_config, prepared_dir, tmp_path):
    same = tmp_path / "same"
    shutil.copytree(prepared_dir / "tokenizer", same)
    assert isinstance(preflight(make_config("same", model={"init_from": str(same)}), False),
                      TrainingData)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json"):
        preflight(make_config("bare", model={"init_from": str(bare)}), False)
    other = tmp_path / "other"
    shutil.copytree(same, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 10_000, "content": "<x>"})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DataError, match="was tokenized with tokenizer"):
        preflight(make_config("other", model={"init_from": str(other)}), False)


def test_the_checks_import_no_torch(make_config):
    raw = json.dumps(make_config("light").model_dump(mode="json"))
    code = (
        "import sys, json\n"
        "from cptrain.config import RunConfig\n"
        "from cptrain.config_base import build_config\n"
        "from cptrain.train.preflight import preflight\n"
        f"preflight(build_config(RunConfig, json.loads({raw!r})), False)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_a_mistyped_init_from_is_reported_before_the_data_is_opened(make_config, tmp_path):
    """Checked before the data (whose tokenizer load imports transformers): with both wrong,
    the model path is what the user hears of first."""
    cfg = make_config("typo", data={"dir": str(tmp_path / "no-data")},
                      model={"init_from": str(tmp_path / "no-model")})
    with pytest.raises(DataError, match="no-model does not exist; fix the path"):
        preflight(cfg, False)
