"""The configs both demos train and prepare, pinned: ``demo_configs.json`` holds their dumps as
`cptrain demo` and `cptrain demo --released` built them before the recipes became the one
place their settings live, so the demos' results in the README stay reproducible.

A deliberate change to a demo recipe changes these dumps: update the file from
``{"demo": {name: demo_run_config(name, Path("runs/demo"), Path("data"), []).model_dump(
mode="json")}, ...}`` (the keys below), and say in the README what changed."""

import json
from pathlib import Path

import pytest

from cptrain.demo import embedded as demo
from cptrain.demo import recipes
from cptrain.errors import ConfigError

PINNED = json.loads((Path(__file__).parent / "demo_configs.json").read_text(encoding="utf-8"))
REPO = Path(__file__).resolve().parents[2]


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


def test_recipes_are_found_in_the_checkout():
    assert recipes.RECIPES_DIR == REPO / "recipes"
    assert recipes.read_recipe("demo.yaml")["data"]["tasks"] == list(demo.TASKS)


def test_a_missing_recipe_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # as in an install without the checkout's recipes/ folder (a wheel)
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path / "recipes")
    with pytest.raises(ConfigError) as info:
        recipes.read_recipe("demo.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "recipes" / "demo.yaml") in message and "pip install -e" in message


def test_recipe_paths_move_under_the_data_dir():
    assert recipes.under_data_dir("data/prepared/demo", Path("/x/y"), recipe="r.yaml") == (
        "/x/y/prepared/demo"
    )
    assert recipes.under_data_dir("data/demo/en/val.jsonl", Path("d"), recipe="r.yaml") == (
        "d/demo/en/val.jsonl"
    )
    with pytest.raises(ConfigError, match=r"recipes/r\.yaml: elsewhere/x is not under data/"):
        recipes.under_data_dir("elsewhere/x", Path("d"), recipe="r.yaml")
