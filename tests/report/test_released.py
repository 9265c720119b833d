"""The released-model section: old domain kept against new tasks learned, paired against the
baseline with Holm, the Pareto figure with the baseline's merge curve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cptrain.report.document import write_report
from report.test_studies import _manifest, _write_run

# method → (old-domain rise, new tasks' final loss) around which its seeds scatter
TRUTH = {"sequential": (0.30, 3.00), "kl": (0.05, 3.02), "l2": (0.30, 3.00)}


def write_study(root: Path, *, merge: bool = True, seeds: int = 4) -> None:
    coords: list = []
    rng = np.random.default_rng(0)
    for seed in range(seeds):
        shared = float(rng.normal(0, 0.05))  # seed effects the pairing removes
        for method, (rise, new) in TRUTH.items():
            name = f"{method}_s{seed}"
            final = new + shared + float(rng.normal(0, 0.005))
            _write_run(root, name, method=method, alpha=0.0, seed=seed,
                       lm=[[final - 0.2, 4.0], [final + 0.1, final - 0.1]], coords=coords)
            path = root / name / "summary.json"
            s = json.loads(path.read_text())
            r = rise + shared + float(rng.normal(0, 0.005))
            s.update(eval_only=["en-wiki"], eval_only_forgetting={"en-wiki": r},
                     loss_before={"en": 4.0, "de": 4.0, "en-wiki": 2.9})
            path.write_text(json.dumps(s))
            if merge and method == "sequential":
                rows = [{"lambda": lam, "old_loss": 2.9 + lam * r, "new_loss": 4.0 - lam}
                        for lam in (0.0, 0.5, 1.0)]
                (root / name / "merge").mkdir()
                (root / name / "merge" / "merge.json").write_text(json.dumps({"rows": rows}))
    _manifest(root, coords, "sequential")


def section(md: str) -> str:
    return md.split("## Old domain kept against new tasks learned")[1].split("\n## ")[0]


def test_the_anchor_that_keeps_the_old_domain_is_found_and_corrected(tmp_path):
    write_study(tmp_path / "study")
    write_report([tmp_path / "study"], tmp_path / "out")
    sec = section((tmp_path / "out" / "report.md").read_text())
    kl = next(line for line in sec.splitlines() if line.startswith("| kl |"))
    cells = [c.strip() for c in kl.strip("|").split("|")]
    assert cells[1] == "4" and float(cells[2].split()[0]) == pytest.approx(0.05, abs=0.05)
    paired = next(line for line in sec.splitlines()
                  if line.startswith("| kl | 4 |") and "Holm" in line)
    assert "significantly lower" in paired.split("|")[3]  # the old-domain rise column
    l2 = next(line for line in sec.splitlines()
              if line.startswith("| l2 | 4 |") and "Holm" in line)
    assert "no significant difference" in l2.split("|")[3]
    assert "across the 2 methods" in sec
    assert "Lowest old-domain rise: kl; every other method significantly higher" in sec
    assert (tmp_path / "out" / "figures" / "released_pareto.png").stat().st_size > 10_000
    assert "the baseline's merge curve" in sec


def test_one_seed_says_it_cannot_rank_and_no_merge_no_line(tmp_path):
    write_study(tmp_path / "study", merge=False, seeds=1)
    write_report([tmp_path / "study"], tmp_path / "out")
    sec = section((tmp_path / "out" / "report.md").read_text())
    assert "Lowest old-domain rise: cannot tell, a method has a single seed." in sec
    assert "merge curve" not in sec


def test_runs_without_evaluation_only_tasks_get_no_such_section(tmp_path):
    root, coords = tmp_path / "plain", []
    for method in ("sequential", "replay"):
        _write_run(root, method, method=method, alpha=0.25 if method == "replay" else 0.0,
                   seed=0, lm=[[5.0, 9.0], [6.0, 5.5]], coords=coords)
    _manifest(root, coords, "sequential")
    write_report([root], tmp_path / "out")
    assert "Old domain kept" not in (tmp_path / "out" / "report.md").read_text()
