"""examples/hf_trainer_cpt.py on the suite's data (a tiny model instead of SmolLM2, the `xml`
task as the English proxy, `asyncio` evaluation-only): it trains, stops, resumes and leaves a
run directory `cptrain eval` prints. (examples/plain_loop.py: test_equal_to_cptrain_train.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from integrations.common import start_model

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_hf_trainer_example_trains_and_resumes(tmp_path, prepared_dir):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import hf_trainer_cpt
    finally:
        sys.path.remove(str(EXAMPLES))
    model = start_model(tmp_path, prepared_dir)
    argv = ["--model", str(model), "--data", str(prepared_dir), "--tasks", "email",
            "--eval-only", "asyncio", "--proxy", "xml", "--proxy-tokens", "320",
            "--run-dir", str(tmp_path / "run"), "--steps", "4", "--seq-len", "32",
            "--batch-size", "8", "--k", "2", "--eval-windows", "4", "--save-steps", "2"]
    summary = hf_trainer_cpt.main(argv)
    assert summary["complete"] and set(summary["loss_before"]) == {"email", "asyncio"}
    assert summary["replay"]["seed_rows"] == 10  # 320 tokens of xml, 32 a row
    assert summary["replay"]["rows_drawn_seed"] > 0
    # a finished run resumes from its last checkpoint and changes nothing
    again = hf_trainer_cpt.main([*argv, "--resume"])
    assert again["loss_matrix"] == summary["loss_matrix"]
    shown = subprocess.run([sys.executable, "-m", "cptrain.cli", "eval", str(tmp_path / "run")],
                           capture_output=True, text=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert shown.returncode == 0 and "asyncio" in shown.stdout, shown.stderr
