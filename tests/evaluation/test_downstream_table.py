"""Downstream scores of a starting model and the runs continued from it, side by side
(``cptrain.evaluation.downstream_table``); lm-eval runs them, offline."""

from __future__ import annotations

import shutil

import pytest

from evaluation.conftest import TASK

pytest.importorskip("lm_eval")

def test_before_after_scores_use_the_same_items_for_every_model(fake_run, prepared_dir, tmp_path):
    from cptrain.evaluation.downstream_table import before_after_scores, scores_table

    model = fake_run / "models" / f"after_0_{TASK}"
    run = tmp_path / "run"  # a copy, so its results land apart from the module's run
    shutil.copytree(fake_run, run, ignore=shutil.ignore_patterns("downstream"))
    rows = before_after_scores(model, {"after": run}, tasks=[TASK], data_dir=prepared_dir,
                               out_dir=tmp_path / "ds", items=8, max_length=64)
    assert [r["model"] for r in rows] == ["before", "after"]
    # the same weights scored on the same items: equal to the last digit
    strip = lambda r: {k: v for k, v in r.items() if k not in ("model", "model_dir")}  # noqa: E731
    assert strip(rows[0]) == strip(rows[1]) and 0.0 <= rows[0][f"{TASK} acc"] <= 1.0
    assert (tmp_path / "ds" / "before" / f"after_0_{TASK}.json").exists()
    assert (run / "downstream" / f"after_0_{TASK}.json").exists()
    lines = scores_table(rows, [TASK]).splitlines()
    assert len(lines) == 3 and f"{TASK} bpb" in lines[0]
    # the released demo's choice-only rows: no bpb requested, none shown
    quick = before_after_scores(model, {"after": run}, tasks=[TASK], data_dir=prepared_dir,
                                out_dir=tmp_path / "ds2", items=8, max_length=64, bpb=False)
    assert all(f"{TASK} bpb" not in r for r in quick)
    assert quick[0][f"{TASK} acc"] == rows[0][f"{TASK} acc"]
    assert "bpb" not in scores_table(quick, [TASK])
