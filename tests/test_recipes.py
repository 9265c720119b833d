"""The demos run what their recipes say: each method of `cptrain demo` is recipes/demo.yaml and
each of `cptrain demo --released` recipes/released-smollm2.yaml, with that method's settings,
its own run_dir, the shards under --data-dir (and the model's folder), nothing else; and both
prepare what their *-prepare.yaml recipes say, under --data-dir."""

import json
from pathlib import Path
from typing import Any

from cptrain.config import load_run_config
from cptrain.config_base import load_config
from cptrain.data.prepare import PrepareConfig
from cptrain.demo import embedded as demo

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def as_overrides(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """``--set`` items that put ``settings`` (nested sections) into a config."""
    items = []
    for key, value in settings.items():
        if isinstance(value, dict):
            items += as_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def test_every_demo_method_is_the_recipe_with_its_settings():
    for runs, data in ((Path("runs/demo"), Path("data")), (Path("/r"), Path("/elsewhere/d"))):
        for name, settings in demo.METHODS.items():
            built = demo.demo_run_config(name, runs, data, [])
            from_file = load_run_config(RECIPES / "demo.yaml", [
                f"run_dir={runs / name}", f"data.dir={data / 'prepared/demo'}",
                *as_overrides(settings),
            ])
            assert built == from_file, name
    assert [t.name for t in built.data.tasks] == list(demo.TASKS)


def test_demo_overrides_apply_last():
    cfg = demo.demo_run_config("replay-25", Path("r"), Path("d"),
                               ["replay.alpha=0.4", "train.lr=1e-4", "run_dir=elsewhere"])
    assert (cfg.replay.alpha, cfg.train.lr, cfg.run_dir) == (0.4, 1e-4, "elsewhere")


def test_demo_prepare_is_the_recipe_under_the_data_dir():
    from_file = load_config(PrepareConfig, RECIPES / "demo-prepare.yaml")
    assert demo.prepare_config(Path("data")) == from_file
    moved = demo.prepare_config(Path("/elsewhere"))
    assert moved.out_dir == Path("/elsewhere/prepared/demo")
    assert moved.tokenizer == from_file.tokenizer
    for task, original in zip(moved.tasks, from_file.tasks, strict=True):
        assert task.name == original.name
        assert task.train == [Path("/elsewhere") / p.relative_to("data") for p in original.train]
        assert task.val == [Path("/elsewhere") / p.relative_to("data") for p in original.val]


def test_the_demo_prepares_the_tasks_it_trains_where_it_reads_them():
    prep = demo.prepare_config(Path("d"))
    assert [t.name for t in prep.tasks] == list(demo.TASKS)
    for name in demo.METHODS:
        assert Path(demo.demo_run_config(name, Path("r"), Path("d"), []).data.dir) == prep.out_dir


def test_every_released_method_is_the_recipe_with_its_settings():
    cases = ((Path("runs"), Path("data"), Path("models/smollm2-135m")),
             (Path("/r"), Path("/elsewhere/d"), Path("/m/smollm2")))
    for runs, data, model in cases:
        for name, (_, settings) in demo.RELEASED_METHODS.items():
            built = demo.released_run_config(name, runs, data, [], model_dir=model)
            from_file = load_run_config(RECIPES / "released-smollm2.yaml", [
                f"run_dir={runs / name}", f"data.dir={data / 'prepared/demo-released'}",
                f"model.init_from={model}", *as_overrides(settings),
            ])
            assert built == from_file, name
    assert list(built.data.eval_only) == [demo.RELEASED_EVAL_ONLY]
    assert built.data.tokens_per_task == demo.RELEASED_TOKENS_PER_TASK


def test_released_prepare_is_the_recipe_under_the_data_and_model_dirs():
    from_file = load_config(PrepareConfig, RECIPES / "released-smollm2-prepare.yaml")
    built = demo.released_prepare_config(Path("data"), Path("models/smollm2-135m"))
    assert built == from_file
    moved = demo.released_prepare_config(Path("/elsewhere"), Path("/m/smollm2"))
    assert moved.tokenizer.path == Path("/m/smollm2")
    assert moved.out_dir == Path("/elsewhere/prepared/demo-released")
    for task, original in zip(moved.tasks, from_file.tasks, strict=True):
        assert task.name == original.name
        assert task.train == [Path("/elsewhere") / p.relative_to("data") for p in original.train]
        assert task.val == [Path("/elsewhere") / p.relative_to("data") for p in original.val]


def test_the_released_demo_prepares_what_it_fetches_where_its_runs_read_it():
    prep = demo.released_prepare_config(Path("d"), Path("m"))
    assert [t.name for t in prep.tasks] == list(demo.RELEASED_LANGUAGES)
    for name in demo.RELEASED_METHODS:
        cfg = demo.released_run_config(name, Path("r"), Path("d"), [], model_dir=Path("m"))
        assert Path(cfg.data.dir) == prep.out_dir
