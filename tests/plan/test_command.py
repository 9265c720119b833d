"""`cptrain plan` end to end on the small fixture corpus (a start run on one task, pilots on
another, the fit, the recommendation and --verify), its resume, and its one-line refusals of
bad plan files before anything trains."""

import json
from pathlib import Path

import pytest
import yaml

from cptrain import cli
from cptrain.plan.command import run_plan
from cptrain.rundir.run_dir import RunDir

TRAIN = {"seq_len": 32, "batch_size": 8, "lr": 3e-3, "log_every": 2, "precision": "fp32",
         "threads": 1}


def _plan(tmp_path: Path, data: Path, **changes) -> dict:
    plan = {
        "out_dir": str(tmp_path / "plan"),
        "start": {"run": {
            "seed": 0, "model": {"preset": "tiny"},
            "data": {"dir": str(data), "tasks": ["email"], "tokens_per_task": 8 * 32 * 12},
            "train": TRAIN, "eval": {"windows": 8, "batch_size": 8}}},
        "base": {
            "seed": 0, "model": {"preset": "tiny"},
            "data": {"dir": str(data), "tasks": ["xml"], "eval_only": ["email"],
                     "tokens_per_task": 1},
            "train": {**TRAIN, "min_lr": 1e-5}, "eval": {"windows": 8, "batch_size": 8}},
        "replay_seed": [{"source": "task", "task": "email", "tokens": 8 * 32 * 12}],
        "budget": {"tokens": 8 * 32 * 40},
        "forgetting": {"max_rise": 0.5},
        "vary": {"alpha": [0, 0.5], "lr": [1e-3, 6e-3]},
        "pilots": {"fraction": 0.5, "points": 10},
        "candidates": 3,
        "bootstrap": 10,
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            plan[section][field] = value
        else:
            plan[key] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan), encoding="utf-8")
    return plan


@pytest.mark.slow
def test_plan_trains_fits_recommends_and_verifies(prepared_dir, tmp_path, capsys):
    _plan(tmp_path, prepared_dir)
    out = run_plan(tmp_path / "plan.yaml", do_verify=True, progress=False)
    plan_dir = tmp_path / "plan"
    written = json.loads((plan_dir / "plan.json").read_text())
    assert (plan_dir / "plan.md").is_file() and (plan_dir / "plan.html").is_file()
    assert (plan_dir / "figures" / "frontier.png").is_file()
    assert (plan_dir / "figures" / "fits.png").is_file()
    # the start run's final model is what every pilot continued
    pilots = sorted((plan_dir / "pilots").glob("*_s0_xml"))
    assert len(pilots) == 9
    start_model = RunDir.open(plan_dir / "start").final_model()
    for p in pilots:
        assert RunDir.open(p).config()["model"]["init_from"] == str(start_model)
        steps = [r["step"] for r in RunDir.open(p).records() if r.get("type") == "eval"]
        assert len(steps) >= 8  # whole curves, not end points
    assert len(written["candidates"]) == 9 and written["cost"]["ratio"] < 1
    for law in written["laws"].values():
        assert set(law["loo"]) == {"wang", "no-shift", "mix"}
    # the recommendation meets its budget by the prediction and is the lowest new-task loss
    # among those that do
    best = written["recommended"]
    assert best is not None and best["budget_rise"][0] <= 0.5
    assert best["new"][0] == min(c["new"][0] for c in written["candidates"]
                                 if c["meets"] and not c["notes"])
    verify = out["verify"]
    assert set(verify["tasks"]) == {"email", "xml"} and isinstance(verify["held"], bool)
    assert json.loads((plan_dir / "verify.json").read_text())["rise"] == verify["rise"]
    text = capsys.readouterr().out
    assert "Recommended: α" in text and "forgetting budget" in text and "measured" in text
    # a second call trains nothing: every run is done
    before = {p: (p / "summary.json").stat().st_mtime for p in pilots}
    run_plan(tmp_path / "plan.yaml", progress=False)
    assert {p: (p / "summary.json").stat().st_mtime for p in pilots} == before


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"forgetting__tasks": ["asyncio"]}, "forgetting.tasks: unknown task 'asyncio'"),
        ({"vary__alpha": [0.5, 0.1]}, "min <= max"),
        ({"vary__alpha": []}, "range [min, max]"),
        ({"forgetting__max_rise": "0.05 bits"}, "is not a rise"),
        ({"pilots__fraction": 1.0}, "must be < 1"),
        ({"replay_seed": [{"source": "task", "task": "nope", "tokens": 100}]},
         "unknown task 'nope'"),
    ],
)
def test_bad_plan_files_fail_in_one_line_before_training(prepared_dir, tmp_path, capsys, changes,
                                                         message):
    _plan(tmp_path, prepared_dir, **changes)
    assert cli.main(["plan", str(tmp_path / "plan.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "plan").exists()  # nothing trained, nothing written


def test_a_base_with_two_new_tasks_is_refused(prepared_dir, tmp_path, capsys):
    plan = _plan(tmp_path, prepared_dir)
    plan["base"]["data"]["tasks"] = ["xml", "asyncio"]
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan), encoding="utf-8")
    assert cli.main(["plan", str(tmp_path / "plan.yaml")]) == 2
    assert "give one new task" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["plan-demo.yaml", "plan-released.yaml"])
def test_the_recipes_are_valid_plans(name):
    from cptrain.plan.command import prepare_plan
    from cptrain.plan.pilots import candidate_settings, pilot_settings

    recipe = Path(__file__).resolve().parents[2] / "recipes" / name
    cfg, base, start = prepare_plan(recipe)
    cands = candidate_settings(cfg, base)
    assert len(pilot_settings(cfg, base)) == 9 and len(cands) == 7 * len({c.alpha for c in cands})
    batch = base["train"]["batch_size"]
    for c in cands:  # every candidate replays whole rows, and at least one when α > 0
        assert (c.alpha * batch).is_integer() and (c.alpha == 0 or c.alpha * batch >= 1)
    assert (start is not None) == (name == "plan-demo.yaml")
