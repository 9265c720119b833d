"""The shipped recipes load, and the single-run demo recipe matches what `cptrain demo` runs."""

from pathlib import Path

from cptrain.config import load_run_config
from cptrain.config_base import load_config
from cptrain.data.prepare import PrepareConfig
from cptrain.demo import embedded as demo

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_demo_recipe_matches_the_demo():
    from_file = load_run_config(RECIPES / "demo.yaml")
    built = demo.demo_run_config("sequential", Path("runs/demo"), Path("data"), [])
    for section in ("model", "train", "eval", "replay", "reptile"):
        assert getattr(from_file, section) == getattr(built, section), section
    assert from_file.data.tokens_per_task == built.data.tokens_per_task
    assert [t.name for t in from_file.data.tasks] == list(demo.TASKS)


def test_demo_prepare_recipe_matches_the_demo():
    from_file = load_config(PrepareConfig, RECIPES / "demo-prepare.yaml")
    built = demo.prepare_config(Path("data"))
    assert from_file.tokenizer == built.tokenizer
    assert [t.name for t in from_file.tasks] == [t.name for t in built.tasks]
