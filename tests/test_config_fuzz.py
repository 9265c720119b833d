"""Config fuzzing: random YAML documents, mutations of valid configs, random `--set` overrides
and random bytes go into the run-config loader. The only outcomes allowed are a valid RunConfig
(which must survive the trip through config.yaml that resume relies on) or a one-line
ConfigError that starts with the file and names the key path at fault."""

from __future__ import annotations

import json
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from cptrain.config import RunConfig, load_run_config
from cptrain.errors import ConfigError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Messages about the document as a whole (no key to name).
ROOT_MESSAGES = ("the top level must be a mapping", "not valid YAML")

VALID = {
    "run_dir": "runs/x",
    "method": "mer",
    "data": {"dir": "data/prepared", "tasks": ["en", {"name": "fr", "tokens": 1000}]},
    "model": {"preset": "tiny"},
    "train": {"seq_len": 64, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-3,
              "betas": [0.9, 0.95], "schedule": "wsd"},
    "eval": {"every": 10, "windows": 8},
    "checkpoint": {"every": 5, "keep_last": 2},
    "replay": {"alpha": 0.25, "policy": "reservoir", "capacity": 1000, "storage": "copy"},
    "reptile": {"k": 3, "epsilon": 0.5},
}


def _models(cls: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    seen.add(cls)
    for f in cls.model_fields.values():
        stack = [f.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel) and t not in seen:
                _models(t, seen)
            stack.extend(typing.get_args(t))


def field_names() -> set[str]:
    seen: set[type[BaseModel]] = set()
    _models(RunConfig, seen)
    return {name for cls in seen for name in cls.model_fields}


FIELDS = field_names()

# Keys: real field names (to get past the first error) and words. Keys with line breaks or
# control characters are a known bug, tested on their own below.
keys = st.one_of(
    st.sampled_from(sorted(FIELDS)),
    st.text(st.characters(categories=("L", "N"), include_characters="_-"), min_size=1,
            max_size=10),
    st.integers(-3, 3),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["tiny", "mer", "joint", "reservoir", "cosine", "bf16", "en", "1e-3", ""]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)


def load_text(text: str | bytes) -> tuple[RunConfig | None, str | None, str]:
    """Load a config file with this content: (config, error message, source name)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        try:
            return load_run_config(path), None, str(path)
        except ConfigError as exc:
            return None, str(exc), str(path)


def all_keys(doc: Any) -> set[str]:
    found: set[str] = set()
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.update(str(k) for k in node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def check_error(msg: str, source: str, doc: Any) -> list[str] | None:
    """The error is one line, starts with the source and names a key path whose parts are
    keys of the document, list indices or config field names; returns that path."""
    assert len(msg.splitlines()) == 1 and "\n" not in msg, repr(msg)
    assert msg.startswith(f"{source}: "), msg
    rest = msg[len(source) + 2 :]
    if rest.startswith(ROOT_MESSAGES):
        return None
    path, sep, detail = rest.partition(": ")
    if " " in path or not sep:  # a check across sections: no key path, its message names them
        assert "<root>" not in msg and "Value error" not in msg, msg
        return []
    parts = path.split(".")
    known = FIELDS | all_keys(doc)
    for part in parts:
        assert part in known or part.lstrip("-").isdigit(), f"{part!r} of {path!r}: {msg}"
    return parts


def same_dump(a: RunConfig, b: RunConfig) -> bool:
    dump = lambda c: json.dumps(c.model_dump(mode="json"), sort_keys=True)  # noqa: E731
    return dump(a) == dump(b)


def check_round_trip(cfg: RunConfig) -> None:
    """What the trainer writes as config.yaml loads back to the same config (resume needs it)."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    again, err, _ = load_text(text)
    assert err is None, err
    assert again is not None and same_dump(again, cfg)


@FUZZ
@given(documents)
def test_random_documents(doc):
    cfg, err, source = load_text(yaml.safe_dump(doc))
    if err is not None:
        check_error(err, source, doc)
    else:
        check_round_trip(cfg)


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths_of(v, (*prefix, i))
    return out


PATHS = paths_of(VALID)


def mutate(doc: Any, path: tuple, how: str, value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "wrap":
        parent[last] = [parent[last]]
    elif how == "add_key" and isinstance(parent, dict):
        parent[f"{last}_extra"] = value
    return doc


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(PATHS),
            st.sampled_from(["replace", "delete", "wrap", "add_key"]),
            documents,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_valid_configs(mutations):
    doc = VALID
    for path, how, value in mutations:
        try:
            doc = mutate(doc, path, how, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    cfg, err, source = load_text(yaml.safe_dump(doc))
    if err is None:
        check_round_trip(cfg)
        return
    named = check_error(err, source, doc)
    if named and len(mutations) == 1:
        # a single change is reported in the section it was made in
        path, how, _ = mutations[0]
        section = f"{path[0]}_extra" if how == "add_key" and len(path) == 1 else path[0]
        assert named[0] == str(section), err


override_keys = st.lists(
    st.one_of(st.sampled_from(sorted(FIELDS)), st.text("abcxyz_", min_size=1, max_size=5)),
    min_size=1,
    max_size=4,
).map(".".join)
override_values = st.one_of(
    st.sampled_from(["1", "-1", "0.5", "1e309", ".nan", "[1, 2]", "{a: 1}", "true", "~", "''",
                     "[unclosed", "tiny", "mer"]),
    st.text(st.characters(categories=("L", "N", "P", "S", "Zs")), max_size=12),
)


@FUZZ
@given(st.lists(st.tuples(override_keys, override_values), min_size=1, max_size=3))
def test_random_overrides(items):
    overrides = [f"{k}={v}" for k, v in items]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.yaml"
        path.write_text(yaml.safe_dump(VALID))
        try:
            cfg = load_run_config(path, overrides)
        except ConfigError as exc:
            msg = str(exc)
            assert len(msg.splitlines()) == 1, repr(msg)
            assert msg.startswith((f"{path}: ", "--set ")), msg
            return
    check_round_trip(cfg)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200),
                 st.text("{}[]:,- \n\t'\"!&*#|>%@`?", max_size=60)))
def test_random_bytes(content):
    cfg, err, source = load_text(content)
    if err is not None:
        assert len(err.splitlines()) == 1 and err.startswith(f"{source}: "), repr(err)


# ------------------------------------------------- gaps found by fuzzing, now closed
@pytest.mark.parametrize("key", ["bad\nkey", "bad\rkey", "bad\u2028key", "bad\x85key"])
def test_keys_with_line_breaks_still_give_one_line(key):
    cfg, err, source = load_text(yaml.safe_dump({**VALID, "train": {key: 1}}))
    assert cfg is None and len(err.splitlines()) == 1, repr(err)


@pytest.mark.parametrize(
    "path", ["train.lr", "train.eps", "train.grad_clip", "replay.chunk_mb", "replay.prefetch_mb"]
)
def test_non_finite_numbers_are_refused(path):
    section, key = path.split(".")
    doc = json.loads(json.dumps(VALID))
    doc[section][key] = math.inf
    cfg, err, source = load_text(yaml.safe_dump(doc))
    assert err is not None and path in err, err


def test_seed_beyond_64_bits_is_refused():
    cfg, err, _ = load_text(yaml.safe_dump({**VALID, "seed": 2**64}))
    assert err is not None and "seed" in err, err
