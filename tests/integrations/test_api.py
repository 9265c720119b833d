"""The public API: `import cptrain` stays light, the facades keep their contracts (a resumed
buffer replays what the uninterrupted one did, Reptile interpolates on the user's optimizer)
and a run directory written by `LossMatrix` is read by `cptrain eval` and `cptrain report`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import cptrain
from cptrain.errors import ConfigError


def test_import_cptrain_loads_no_torch():
    code = ("import sys, cptrain; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'numpy' not in sys.modules, 'numpy'; print(sorted(cptrain.__all__)); "
            # the data and run-directory readers stay torch-free too
            "cptrain.PreparedData, cptrain.ArrayWindows, cptrain.RunDir; "
            "assert 'torch' not in sys.modules, 'torch after the readers'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("ReplayBuffer", "Reptile", "LossMatrix", "RunDir", "PreparedData"):
        assert name in out.stdout
        assert getattr(cptrain, name).__doc__


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError):
        cptrain.Trainer  # noqa: B018 - not public


def _buffer(tmp_path, **kw):
    return cptrain.ReplayBuffer(tmp_path / "replay", alpha=0.25, batch_size=8, row_len=5,
                                vocab_size=50, seed=3, visibility_lag=1, **kw)


def _fresh(step: int, n: int = 6) -> np.ndarray:
    return np.random.default_rng(step).integers(0, 50, size=(n, 5))


def test_mix_replays_alpha_of_each_batch_and_resumes_exactly(tmp_path):
    buf = _buffer(tmp_path / "a")
    assert (buf.n_fresh, buf.n_replay) == (6, 2)
    seen, mixed = set(), {}
    for step in range(10):
        rows = buf.mix(torch.from_numpy(_fresh(step)), step=step, task=0)
        assert isinstance(rows, torch.Tensor) and rows.dtype == torch.int64
        replayed = rows[6:].numpy()
        # rows of steps ≤ s − 1 − lag only, as many as asked once there are enough
        assert len(replayed) == min(2, 6 * max(0, step - 1))
        assert all(tuple(r) in seen for r in replayed)
        mixed[step] = rows.numpy()
        if step >= 1:
            seen |= {tuple(r) for r in _fresh(step - 1)}
        if step == 5:
            saved = json.loads(json.dumps(buf.state_dict()))  # a checkpoint after step 5
    buf.close()
    again = _buffer(tmp_path / "a")
    again.load_state_dict(saved)
    for step in range(6, 10):
        np.testing.assert_array_equal(again.mix(_fresh(step), step=step, task=0), mixed[step])
    again.close()


def test_bad_alpha_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="alpha"):
        cptrain.ReplayBuffer(tmp_path, alpha=1.5, batch_size=8, row_len=5, vocab_size=50)


def test_reptile_interpolates_on_the_users_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reptile = cptrain.Reptile(model, opt, k=2, epsilon=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        model(torch.ones(1, 3)).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
    moved = [b - 0.1 * g for b, g in zip(before, [torch.ones(2, 3), torch.ones(2)],
                                        strict=True)]
    for p, s, m in zip(model.parameters(), start, moved, strict=True):
        torch.testing.assert_close(p.detach(), s + 0.5 * (m - s))
    assert reptile.updates == 1


def test_loss_matrix_writes_a_run_directory_cptrain_reads(tmp_path):
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    rng = np.random.default_rng(0)
    val = {n: rng.integers(0, 40, size=(6, 9)) for n in ("a", "b", "held")}
    run = tmp_path / "run"
    matrix = cptrain.LossMatrix(run, val, tasks=["a", "b"], eval_only=["held"], window_len=9,
                                windows=4, batch_size=2,
                                config={"method": "replay", "seed": 1})
    before = matrix.before(model)
    matrix.task_end(model, 0, step=3)
    matrix.evaluate(model, step=4)
    last = matrix.task_end(model, 1, step=6)
    assert last == pytest.approx(before)  # nothing trained in between
    summary = cptrain.RunDir.open(run).summary()
    assert summary["complete"] and summary["tasks"] == ["a", "b"]
    assert summary["config"]["replay"]["alpha"] == 0.25  # method replay's default
    assert [r["type"] for r in cptrain.RunDir.open(run).records()] == [
        "before", "task_end", "eval", "task_end"]
    env = {"PYTHONPATH": ":".join(sys.path)}
    shown = subprocess.run([sys.executable, "-m", "cptrain.cli", "eval", str(run)],
                           capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "before" in shown.stdout and "held" in shown.stdout
    report = subprocess.run([sys.executable, "-m", "cptrain.cli", "report", str(run)],
                            capture_output=True, text=True, env=env)
    assert report.returncode == 0, report.stderr
    assert (run / "report" / "report.md").is_file()
    with pytest.raises(ConfigError, match="once per task"):
        matrix.task_end(model, 0, step=7)


def test_transformers_version_outside_the_range_is_one_line():
    from cptrain.integrations.transformers import SUPPORTED, check_version

    check_version()  # the pinned one
    with pytest.raises(ConfigError, match=f"transformers>={SUPPORTED[0]}"):
        check_version("4.40.0")
    with pytest.raises(ConfigError, match="found 6.0.0"):
        check_version("6.0.0")


def test_the_readme_loop_is_the_example_the_suite_runs():
    import re
    from pathlib import Path

    def code(text: str) -> str:
        lines = (line.split("#")[0].strip() for line in text.splitlines())
        return "\n".join(line for line in lines if line)

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Inside your own training loop", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = (repo / "examples" / "plain_loop.py").read_text(encoding="utf-8")
    assert code(block) in code(example.split("def train(", 1)[1])
