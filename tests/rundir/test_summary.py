"""summary.json, typed and versioned (cptrain.rundir.summary)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cptrain.errors import ConfigError
from cptrain.rundir import summary as sm

# What a cptrain before the version key wrote (version 1): no format, no version.
V1 = {
    "config": {"seed": 0, "method": "replay", "train": {"seq_len": 32}},
    "tasks": ["email", "xml"],
    "eval_only": [],
    "loss_matrix": [[3.5, 6.0], [4.0, 3.25]],
    "steps": 12,
    "complete": True,
    "custom_key": {"kept": [1, 2, 3]},
}


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def test_stamp_puts_format_and_version_first():
    body = {"config": {}, "tasks": ["a"], "complete": False}
    stamped = sm.stamp(body)
    assert list(stamped)[:2] == ["format", "version"]
    assert stamped["format"] == sm.FORMAT == "cptrain-summary"
    assert stamped["version"] == sm.VERSION
    assert list(stamped)[2:] == list(body) and all(stamped[k] == v for k, v in body.items())
    assert "format" not in body  # a new dict; the trainer's own is left alone


def test_a_version_1_summary_migrates_to_the_current_shape_keeping_its_keys():
    raw = copy.deepcopy(V1)
    out = sm.migrate(raw)
    assert out["format"] == sm.FORMAT and out["version"] == sm.VERSION
    assert {k: out[k] for k in V1} == V1  # nothing it had is changed
    assert raw == V1  # a copy: the input is left alone
    sm.Summary.model_validate(out)  # and it is the current shape


def test_a_version_1_forgetting_was_the_task_end_figure():
    out = sm.migrate({**V1, "forgetting": 0.5})
    assert out["forgetting"] == 0.5 and out["forgetting_task_end"] == 0.5
    kept = sm.migrate({**V1, "forgetting": 0.5, "forgetting_task_end": 0.25})
    assert kept["forgetting_task_end"] == 0.25
    assert "forgetting_task_end" not in sm.migrate(V1)
    current = sm.stamp({**V1, "forgetting": 0.5})  # only older summaries are rewritten
    assert "forgetting_task_end" not in sm.migrate(current)


def test_a_version_1_summary_gains_flops_from_the_facts_it_stored():
    from cptrain.models.flops import ModelShape, run_flops, summary_facts

    facts = summary_facts(ModelShape(layers=2, hidden=64, ffn=128, vocab=512, heads=4,
                                     kv_heads=4), 6, 2, 0)
    old = {**V1, "fresh_tokens": 12 * 6 * 32, "replay_tokens": 12 * 2 * 32, **facts}
    out = sm.migrate(old)
    assert out["flops"] == run_flops(old) and out["flops"]["tokens_processed"] == 12 * 8 * 32
    assert "flops" not in sm.migrate(V1)  # lacks the facts: nothing is guessed
    assert sm.migrate({**old, "flops": {"mine": 1}})["flops"] == {"mine": 1}


def test_an_explicit_version_1_is_migrated_too_and_its_format_kept():
    out = sm.migrate({**V1, "version": 1, "format": "cptrain-summary"})
    assert out["version"] == sm.VERSION and out["format"] == "cptrain-summary"


def test_a_current_summary_passes_unchanged():
    current = sm.stamp(copy.deepcopy(V1))
    assert sm.migrate(current) == current
    assert sm.migrate(current) is not current


@pytest.mark.parametrize("version", [sm.VERSION + 1, 99, "2", 2.0, None])
def test_a_newer_or_unreadable_version_is_refused_in_one_line(version):
    with pytest.raises(ConfigError) as err:
        sm.migrate({**V1, "format": sm.FORMAT, "version": version})
    msg = str(err.value)
    assert repr(version) in msg and "upgrade cptrain" in msg and "\n" not in msg


def test_read_summary_returns_the_migrated_summary(tmp_path):
    path = _write(tmp_path / "summary.json", V1)
    out = sm.read_summary(path)
    assert out["version"] == sm.VERSION and out["format"] == sm.FORMAT
    assert {k: out[k] for k in V1} == V1
    # keys the model does not name pass through; defaults are not written into the dict
    minimal = sm.read_summary(_write(tmp_path / "m.json", {"config": {}, "extra": 1}))
    assert minimal["extra"] == 1 and "tasks" not in minimal and "complete" not in minimal


def test_read_summary_refuses_a_newer_version(tmp_path):
    path = _write(tmp_path / "summary.json", {**V1, "version": sm.VERSION + 1})
    with pytest.raises(ConfigError, match="newer than this cptrain reads"):
        sm.read_summary(path)


def test_a_missing_summary_names_the_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        sm.read_summary(tmp_path / "summary.json")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: no summary.json") and "cptrain train" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"config": {}, "tasks": [', "not JSON"),
        ("", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"text"', "not a JSON object"),
        ("null", "not a JSON object"),
    ],
)
def test_damaged_json_names_the_file(tmp_path, content, says):
    path = tmp_path / "summary.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        sm.read_summary(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: damaged summary.json") and says in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"config": None}, "config"),  # version 1: migrated first, then refused
        ({"config": [1]}, "config"),
        ({"config": "x"}, "config"),
        ({"config": None, "version": sm.VERSION}, "config"),
        ({"config": [1], "version": sm.VERSION}, "config"),
        ({"tasks": "email"}, "tasks"),
        ({"tasks": ["email", 3]}, "tasks.1"),
        ({"loss_matrix": [[1.0, "high"]]}, "loss_matrix.0.1"),
        ({"loss_matrix": [1.0]}, "loss_matrix.0"),
        ({"complete": "perhaps"}, "complete"),
        ({"eval_only": {"a": 1}}, "eval_only"),
        ({"format": 3}, "format"),
    ],
)
def test_wrong_types_name_the_file_and_the_key_in_one_line(tmp_path, change, key):
    path = _write(tmp_path / "summary.json", {**V1, **change})
    with pytest.raises(ConfigError) as err:
        sm.read_summary(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}: ") and "\n" not in msg


def test_a_summary_without_config_is_refused(tmp_path):
    body = {k: v for k, v in V1.items() if k != "config"}
    with pytest.raises(ConfigError, match=r"summary\.json: config: Field required"):
        sm.read_summary(_write(tmp_path / "summary.json", body))


def test_the_model_types_the_keys_readers_rely_on():
    s = sm.Summary.model_validate({"config": {"seed": 1}, "anything": [1]})
    assert (s.format, s.version, s.tasks, s.loss_matrix, s.complete, s.eval_only) == (
        sm.FORMAT, sm.VERSION, [], [], False, [])
    assert s.model_extra == {"anything": [1]}


def test_a_version_1_summary_gets_the_precision_auto_resolved_to_inside_its_config():
    raw = {"config": {"train": {"precision": "auto", "lr": 0.1}}, "precision": "bf16",
           "tasks": [], "loss_matrix": []}
    out = sm.migrate(raw)
    assert out["config"]["train"] == {"precision": "bf16", "lr": 0.1}
    assert raw["config"]["train"]["precision"] == "auto"  # the input is left alone
    explicit = {**raw, "config": {"train": {"precision": "fp32"}}}
    assert sm.migrate(explicit)["config"]["train"]["precision"] == "fp32"
