"""The names inside a run directory (cptrain.rundir.layout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cptrain.errors import CheckpointError
from cptrain.rundir import layout


def test_file_names_are_the_documented_ones():
    assert (layout.CONFIG, layout.SUMMARY, layout.METRICS) == (
        "config.yaml", "summary.json", "metrics.jsonl")
    assert (layout.CHECKPOINTS, layout.MODELS, layout.DOWNSTREAM) == (
        "checkpoints", "models", "downstream")
    assert (layout.RUN_ID, layout.ATTEMPTS) == ("run_id", "attempts")


@pytest.mark.parametrize(
    ("index", "task"), [(0, "email"), (9, "xml"), (10, "a_b-c.d"), (3, "after_1_x"), (2, "7")]
)
def test_task_model_name_round_trips(index, task):
    name = layout.task_model_name(index, task)
    assert name == f"after_{index}_{task}"
    assert layout.parse_task_model_name(name) == (index, task)


@pytest.mark.parametrize(
    "name", ["after_x_email", "after_1_", "after_1", "before_1_email", "xafter_1_email",
             "after__email", "step_3", "", "after_-1_email"]
)
def test_other_names_parse_to_none(name):
    assert layout.parse_task_model_name(name) is None


def test_task_model_dir_is_under_models(tmp_path):
    assert layout.task_model_dir(tmp_path, 2, "xml") == tmp_path / "models" / "after_2_xml"
    assert layout.task_model_dir(str(tmp_path), 0, "a") == tmp_path / "models" / "after_0_a"


def test_list_checkpoints_sorts_by_step_number_not_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    for n in (10, 2, 100, 9):
        (root / f"step_{n}").mkdir(parents=True)
    (root / "step_5").write_text("a file, not a checkpoint")
    for other in ("step_x", "step_", "tmp_step_3", "step_4.partial"):
        (root / other).mkdir()
    assert layout.list_checkpoints(root) == [(n, root / f"step_{n}") for n in (2, 9, 10, 100)]
    assert layout.list_checkpoints(str(root))[0] == (2, root / "step_2")


def test_list_checkpoints_of_a_missing_or_non_directory_root_is_empty(tmp_path):
    assert layout.list_checkpoints(tmp_path / "missing") == []
    (tmp_path / "file").write_text("x")
    assert layout.list_checkpoints(tmp_path / "file") == []
    assert layout.list_checkpoints(tmp_path) == []


def test_no_checkpoint_names_the_root_and_the_way_out(tmp_path):
    err = layout.no_checkpoint(tmp_path / "checkpoints")
    assert isinstance(err, CheckpointError)
    msg = str(err)
    assert str(Path(tmp_path / "checkpoints")) in msg
    assert "--resume" in msg and "--restart" in msg and "attempts/" in msg
    assert "\n" not in msg
