"""The demos' recipes (``cptrain.demo.recipes``): found in the checkout, a missing one is a
one-line error naming it, and their ``data/`` paths move under the demo's data directory."""

from pathlib import Path

import pytest

from cptrain.demo import embedded as demo
from cptrain.demo import recipes
from cptrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_recipes_are_the_checkouts_and_ship_with_the_package():
    # demo/_recipes is the checkout's recipes/ (a link), which a wheel carries as package data
    assert recipes.RECIPES_DIR.resolve() == (REPO / "recipes").resolve()
    assert recipes.read_recipe("demo.yaml")["data"]["tasks"] == list(demo.TASKS)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"cptrain.demo" = ["_recipes/*.yaml"]' in pyproject


def test_a_missing_recipe_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # as in an install whose recipes went missing
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path / "recipes")
    with pytest.raises(ConfigError) as info:
        recipes.read_recipe("demo.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "recipes" / "demo.yaml") in message and "reinstall cptrain" in message


def test_recipe_paths_move_under_the_data_dir():
    assert recipes.under_data_dir("data/prepared/demo", Path("/x/y"), recipe="r.yaml") == (
        "/x/y/prepared/demo"
    )
    assert recipes.under_data_dir("data/demo/en/val.jsonl", Path("d"), recipe="r.yaml") == (
        "d/demo/en/val.jsonl"
    )
    with pytest.raises(ConfigError, match=r"recipes/r\.yaml: elsewhere/x is not under data/"):
        recipes.under_data_dir("elsewhere/x", Path("d"), recipe="r.yaml")
