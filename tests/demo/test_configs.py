"""The configs both demos train and prepare, pinned: ``demo_configs.json`` holds their dumps as
`cptrain demo` and `cptrain demo --released` built them before the recipes became the one
place their settings live, so the demos' results in the README stay reproducible.

A deliberate change to a demo recipe changes these dumps: update the file from
``{"demo": {name: demo_run_config(name, Path("runs/demo"), Path("data"), []).model_dump(
mode="json")}, ...}`` (the keys below), and say in the README what changed."""

import json
from pathlib import Path

from cptrain.demo import embedded as demo

PINNED = json.loads((Path(__file__).parent / "demo_configs.json").read_text(encoding="utf-8"))


def test_demo_configs_are_the_pinned_ones():
    built = {
        name: demo.demo_run_config(name, Path("runs/demo"), Path("data"), []).model_dump(
            mode="json"
        )
        for name in demo.METHODS
    }
    assert built == PINNED["demo"]
    assert demo.prepare_config(Path("data")).model_dump(mode="json") == PINNED["demo_prepare"]


def test_released_demo_configs_are_the_pinned_ones():
    built = {
        name: demo.released_run_config(name, Path("runs/demo-released"), Path("data"), [])
        .model_dump(mode="json")
        for name in demo.RELEASED_METHODS
    }
    assert built == PINNED["released"]
    prep = demo.released_prepare_config(Path("data"), Path("models") / demo.RELEASED_MODEL)
    assert prep.model_dump(mode="json") == PINNED["released_prepare"]
