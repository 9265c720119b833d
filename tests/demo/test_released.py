"""`cptrain demo --released`: its configs build and validate, and its table reads summaries
(tests/test_recipes.py: the configs are its recipes). Nothing here loads SmolLM2 or trains."""

from pathlib import Path

import pytest

from cptrain import cli
from cptrain.demo import embedded as demo
from cptrain.replay.config import check_seed_tasks


def _configs(precision: str = "fp32"):
    return {
        name: demo.released_run_config(
            name, Path("runs/demo-released"), Path("data"), [], precision=precision
        )
        for name in demo.RELEASED_METHODS
    }


def test_every_released_method_builds_a_valid_config():
    prep = demo.released_prepare_config(Path("data"), Path("models/smollm2-135m"))
    prepared = {t.name: t for t in prep.tasks}
    assert prep.tokenizer.path == Path("models/smollm2-135m")
    assert prep.out_dir == Path("data/prepared/demo-released")
    # en-wiki is evaluation-only (val alone); the trained tasks and the proxy have train text
    assert prepared[demo.RELEASED_EVAL_ONLY].splits == ("val",)
    for name in (*demo.RELEASED_TASKS, demo.RELEASED_PROXY):
        assert prepared[name].train
    configs = _configs()
    assert list(configs) == [
        "sequential", "sequential-lr-matched", "replay-25-proxy", "mer-25-self"
    ]
    for name, cfg in configs.items():
        assert cfg.run_dir == f"runs/demo-released/{name}"
        assert cfg.model.init_from == "models/smollm2-135m"
        assert cfg.data.dir == "data/prepared/demo-released"
        assert [t.name for t in cfg.data.tasks] == list(demo.RELEASED_TASKS)
        assert cfg.data.eval_only == [demo.RELEASED_EVAL_ONLY]
        assert demo.RELEASED_PROXY not in [t.name for t in cfg.data.tasks]
        check_seed_tasks(cfg.replay.seed, list(prepared))  # raises on an unprepared task
    assert configs["sequential"].replay.alpha == 0 and configs["sequential"].replay.seed is None
    proxy = configs["replay-25-proxy"].replay
    assert proxy.alpha == 0.25 and [s.label for s in proxy.seed] == ["task:en"]
    replay = configs["mer-25-self"].replay
    assert replay.alpha == 0.25 and [s.label for s in replay.seed] == ["self"]
    assert replay.seed[0].tokens == demo.RELEASED_SEED_TOKENS
    assert replay.seed[0].prompt.task == demo.RELEASED_PROXY
    mer = configs["mer-25-self"].reptile
    assert mer.enabled and (mer.k, mer.epsilon) == (
        demo.RELEASED_REPTILE_K,
        demo.RELEASED_REPTILE_EPSILON,
    )
    assert not configs["replay-25-proxy"].reptile.enabled
    # the control: sequential at the lr that matches MER's effective step (ε of each move)
    control = configs["sequential-lr-matched"]
    assert control.replay.alpha == 0 and not control.reptile.enabled
    assert control.train.lr == pytest.approx(configs["sequential"].train.lr * mer.epsilon)
    assert control.model_dump(exclude={"run_dir", "train"}) == configs["sequential"].model_dump(
        exclude={"run_dir", "train"}
    )
    # Reptile fires a few times per task at this step count
    steps_per_task = demo.RELEASED_TOKENS_PER_TASK // (256 * 4)
    assert 2 <= steps_per_task // mer.k <= 6


def test_released_overrides_apply():
    cfg = demo.released_run_config(
        "sequential", Path("r"), Path("d"), ["train.lr=1e-4", "data.tokens_per_task=2048"]
    )
    assert cfg.train.lr == 1e-4 and cfg.data.tokens_per_task == 2048


def test_released_precision_is_auto_unless_given():
    def precision(given: str | None = None) -> str:
        cfg = demo.released_run_config("sequential", Path("r"), Path("d"), [], precision=given)
        return cfg.train.precision

    # the trainer resolves auto on the machine it runs on (tests/test_hardware.py)
    assert precision() == "auto" and precision("fp32") == "fp32"


def _summary(before_en: float, final: list[float]) -> dict:
    return {
        "tasks": ["fr", "de"],
        "eval_only": ["en-wiki"],
        "loss_before": {"fr": 2.0, "de": 2.2, "en-wiki": before_en},
        "loss_matrix": [[1.5, 2.1, before_en + 0.1], final],
        "eval_only_forgetting": {"en-wiki": final[2] - before_en},
        "forgetting": final[0] - 1.5,
        "retained_loss": (final[0] + final[1]) / 2,
        "steps": 48,
        "complete": True,
    }


def test_released_table_rows_and_merge_points():
    results = {
        "sequential": _summary(3.0, [1.7, 1.6, 3.4]),
        "replay-25-proxy": _summary(3.0, [1.6, 1.65, 3.1]),
    }
    merge = {
        "rows": [
            {"lambda": lam, "val_loss": {"fr": 1.8, "de": 1.9, "en-wiki": 3.2}}
            for lam in (0.0, 0.5, 1.0)
        ]
    }
    rows = demo.released_rows(results, merge)
    assert [r["method"] for r in rows] == [
        "sequential",
        "replay, English proxy seed α=0.25",
        "merge sequential λ=0.5",
    ]
    assert rows[0]["en_forgetting"] == pytest.approx(0.4)
    assert rows[0]["de_learned"] == 1.6
    assert rows[2]["en_forgetting"] == pytest.approx(0.2) and rows[2]["fr_learned"] is None
    table = demo.released_table(rows)
    assert "3.000→3.400" in table and "+0.400" in table and "–" in table
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned columns


def test_demo_released_flag_dispatches(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_released_demo", lambda **kw: seen.update(released=kw))
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(plain=kw))
    assert cli.main(["demo", "--released", "--no-progress"]) == 0
    assert seen["released"]["runs_dir"] == Path("runs/demo-released")
    assert cli.main(["demo", "--no-progress"]) == 0
    assert seen["plain"]["runs_dir"] == Path("runs/demo")
    seen.clear()
    assert cli.main(["demo", "--released", "--runs-dir", "elsewhere", "--no-progress"]) == 0
    assert seen["released"]["runs_dir"] == Path("elsewhere")
