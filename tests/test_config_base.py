"""config_base.py: YAML configs read into strict models, dotted ``--set`` overrides, and every
mistake a one-line ConfigError naming the key."""

import pytest
from pydantic import Field, ValidationError

from cptrain.config import load_run_config
from cptrain.config_base import (
    StrictModel,
    apply_overrides,
    build_config,
    load_config,
    parse_override,
    read_yaml,
    without_unset,
)
from cptrain.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("run_dir: r\ndata: {dir: d, tasks: [en]}\ntrain: {lr: 0.001}\n")
    cfg = load_run_config(p, ["train.lr=3e-4", "train.seq_len=64", "model.preset=small"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.seq_len == 64 and cfg.model.preset == "small"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_run_config(p, ["train.lr"])
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_run_config(p, ["train.nope=1"])


def test_yaml_errors_are_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(p)



# ---- the parts, on a model of their own -------------------------------------------------------
class Inner(StrictModel):
    n: int = Field(1, ge=1)
    tags: list[str] = Field(default_factory=lambda: ["a"], min_length=1)


class Outer(StrictModel):
    inner: Inner = Field(default_factory=Inner)
    rate: float = 0.5
    note: str | None = None


def _message(data) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(Outer, data, source="t.yaml")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_validation_errors_name_the_key_in_cptrains_words():
    assert _message({"inner": {"n": 0}}) == "t.yaml: inner.n: must be >= 1 (got 0)"
    assert _message({"inner": {"tags": []}}) == (
        "t.yaml: inner.tags: must list at least 1 item(s) (got 0)")
    assert _message({"inner": {"m": 1}}).startswith("t.yaml: inner.m: unknown key (check spelling")
    assert _message({"rate": "x", "inner": {"n": 0}}).endswith("(1 more)")
    assert "rate" in _message({"rate": float("inf")})  # no inf or nan in a config
    assert _message([1]) == "t.yaml: the top level must be a mapping of keys to values"
    cfg = build_config(Outer, {"inner": {"n": 3}})
    with pytest.raises(ValidationError):
        cfg.inner.n = 0  # checked on assignment too


def test_overrides_are_dotted_paths_with_yaml_values():
    assert parse_override("inner.tags=[x, y]") == (["inner", "tags"], ["x", "y"])
    assert parse_override("note=") == (["note"], "")
    assert parse_override("note=a: [b") == (["note"], "a: [b")  # not YAML: the text itself
    for bad, words in (("inner", "expected KEY=VALUE"), ("inner..n=1", "empty key"),
                       ("=1", "empty key")):
        with pytest.raises(ConfigError, match=words):
            parse_override(bad)
    data = apply_overrides({"rate": 0.1}, ["inner.n=4", "rate=0.2"])
    assert data == {"rate": 0.2, "inner": {"n": 4}}
    assert build_config(Outer, data).inner.n == 4
    with pytest.raises(ConfigError, match=r"--set 'rate.x=1': rate is not a section"):
        apply_overrides(data, ["rate.x=1"])


def test_an_empty_yaml_file_is_an_empty_config_and_unset_keys_leave_the_dump(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty) == {}
    assert load_config(Outer, empty, ["inner.n=2"]).inner.n == 2
    assert without_unset({"note": None, "rate": 1}, "note") == {"rate": 1}
    assert without_unset({"note": "x"}, "note") == {"note": "x"}
