"""lm-eval runs of the local tasks on exported models, offline (``cptrain.evaluation.downstream``).

The lm-eval results are checked against log-likelihoods computed here with the model itself,
so the YAML wiring (choice field, delimiter, document text, context length) is what is tested.
The task rows, task files, targets and the before/after table have their own files:
test_task_items, test_local_tasks, test_targets, test_downstream_table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cptrain.data.prepare import load_prepared_tokenizer
from cptrain.errors import ConfigError, DataError, EnvironmentProblem
from cptrain.evaluation.downstream import offline_mode, run_downstream
from cptrain.evaluation.local_tasks import build_local_tasks, held_out_documents
from cptrain.evaluation.targets import token_counter
from cptrain.evaluation.task_items import make_choice_items
from evaluation.conftest import TASK
from evaluation.test_task_items import _longest

pytest.importorskip("lm_eval")


def _log_probs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_lm_eval_scores_match_the_models_own_likelihoods(fake_run, prepared_dir):
    from transformers import AutoModelForCausalLM

    rec = run_downstream(fake_run, limit=12, max_length=256, items=12, bpb_chars=300)
    assert Path(rec["path"]) == fake_run / "downstream" / f"after_0_{TASK}.json"
    saved = json.loads(Path(rec["path"]).read_text())
    choice, bpb = saved["tasks"][f"cptrain_choice_{TASK}"], saved["tasks"][f"cptrain_bpb_{TASK}"]

    model = AutoModelForCausalLM.from_pretrained(fake_run / "models" / f"after_0_{TASK}").eval()
    tok = load_prepared_tokenizer(prepared_dir)
    tasks = fake_run / "downstream" / "tasks"
    rows = [json.loads(x) for x in (tasks / f"cptrain_choice_{TASK}.jsonl").read_text().split(
        "\n")[:12]]
    correct = 0
    for r in rows:
        ctx = tok.encode(r["ctx"], add_special_tokens=False)
        scores = []
        for e in r["endings"]:
            whole = tok.encode(r["ctx"] + " " + e, add_special_tokens=False)
            n_cont = len(whole) - len(ctx)
            scores.append(float(_log_probs(model, whole)[-n_cont:].sum()))
        correct += int(max(range(4), key=scores.__getitem__) == r["label"])
    assert choice["acc"] == pytest.approx(correct / len(rows))

    docs = [json.loads(x)["text"] for x in (tasks / f"cptrain_bpb_{TASK}.jsonl").read_text()
            .splitlines()[:12]]
    nll = n_bytes = 0.0
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False)
        assert len(ids) <= 256  # one lm-eval window: the document after the EOS prefix
        nll -= float(_log_probs(model, [tok.eos_token_id, *ids]).sum())
        n_bytes += len(d.encode("utf-8"))
    assert bpb["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-3)


def test_results_of_later_calls_are_merged(fake_run, tmp_path):
    out = tmp_path / "res"
    run_downstream(fake_run, tasks=[f"cptrain_bpb_{TASK}"], out_dir=out, limit=2)
    rec = run_downstream(fake_run, tasks=[f"cptrain_choice_{TASK}"], out_dir=out, limit=2)
    assert set(rec["tasks"]) == {f"cptrain_bpb_{TASK}", f"cptrain_choice_{TASK}"}
    assert 0.0 <= rec["tasks"][f"cptrain_choice_{TASK}"]["acc_norm"] <= 1.0


@pytest.mark.slow  # lm-eval indexes its whole task registry first (~8 s)
def test_hub_tasks_offline_are_one_line_errors(fake_run, tmp_path):
    with pytest.raises(EnvironmentProblem, match="hellaswag needs its data from Rowan/hellaswag"
                       ) as e:
        run_downstream(fake_run, tasks=["hellaswag"], out_dir=tmp_path, limit=2)
    assert "\n" not in str(e.value) and "--online" in str(e.value)
    with pytest.raises(ConfigError, match="unknown task 'no_such_task'"):
        run_downstream(fake_run, tasks=["no_such_task"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="no local task 'cptrain_choice_xx'"):
        run_downstream(fake_run, tasks=["cptrain_choice_xx"], out_dir=tmp_path)


def test_evaluation_only_tasks_of_a_run_are_scored_too(fake_run, tmp_path):
    """An evaluation-only task is what a released model knew: downstream scores it as well."""
    run = tmp_path / "run"
    shutil.copytree(fake_run / "models", run / "models")
    cfg = yaml.safe_load((fake_run / "config.yaml").read_text())
    # email moves from the trained tasks to the evaluation-only ones (the other two tasks hold
    # too little validation text for choice items)
    cfg["data"]["tasks"], cfg["data"]["eval_only"] = [], [TASK]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rec = run_downstream(run, tasks=[f"cptrain_choice_{TASK}"], limit=4, items=8, bpb_chars=300)
    assert set(rec["tasks"]) == {f"cptrain_choice_{TASK}"}


def test_offline_mode_is_restored():
    before = os.environ.get("HF_DATASETS_OFFLINE")
    with offline_mode():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ.get("HF_DATASETS_OFFLINE") == before


@pytest.mark.slow  # a fresh lm_eval process indexes its ~200 built-in tasks: 15-40 s
def test_lm_eval_command_line_runs_the_local_tasks_offline(fake_run, prepared_dir, tmp_path):
    tasks = tmp_path / "tasks"
    build_local_tasks(prepared_dir, tasks, tasks=[TASK], items=8)
    model = fake_run / "models" / f"after_0_{TASK}"
    exe = shutil.which("lm_eval") or shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "lm_eval"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [*cmd, "--model", "hf", "--model_args", f"pretrained={model},max_length=64",
         "--tasks", "cptrain_local", "--include_path", str(tasks), "--limit", "4",
         "--device", "cpu", "--batch_size", "4"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (f"cptrain_choice_{TASK}", f"cptrain_bpb_{TASK}", "acc_norm", "bits_per_byte"):
        assert name in proc.stdout


# --------------------------------------------------------------------------- short contexts


@pytest.fixture(scope="module")
def short_context_run(fake_run, tmp_path_factory):
    """fake_run's model in a run trained at seq_len 96 on its Python-code task."""
    run = tmp_path_factory.mktemp("ds96") / "run"
    shutil.copytree(fake_run / "models", run / "models")
    cfg = yaml.safe_load((fake_run / "config.yaml").read_text())
    cfg["train"]["seq_len"] = 96
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    set_window(run / "models" / f"after_0_{TASK}", 96)  # what the trainer exports at seq_len 96
    return run


def set_window(model_dir: Path, positions: int) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "max_position_embeddings": positions}))


def test_downstream_of_a_short_context_run_sizes_items_in_the_models_tokens(
    short_context_run, prepared_dir
):
    model = short_context_run / "models" / f"after_0_{TASK}"
    count = token_counter(model)
    docs = held_out_documents(prepared_dir, TASK)
    by_words, _ = make_choice_items(docs, n_items=40)
    # Sized in words, Python code overflows 96 tokens: a longest ending alone can exceed it
    # (lm-eval's `assert len(continuation_enc) <= self.max_length`).
    assert max(_longest(it, count=count) for it in by_words) > 96

    rec = run_downstream(short_context_run, tasks=[f"cptrain_choice_{TASK}"], items=40)
    assert rec["max_length"] == 96 and "max_length=96" in rec["command"]
    assert 0.0 <= rec["tasks"][f"cptrain_choice_{TASK}"]["acc"] <= 1.0
    # the same model copied out of the run: the same window, the same items
    out = short_context_run.parent / "copied"
    shutil.copytree(model, out)
    again = run_downstream(out, tasks=[f"cptrain_choice_{TASK}"], items=40,
                           data_dir=prepared_dir, out_dir=out.parent / "copied_ds")
    copied = out.parent / "copied_ds" / "tasks" / f"cptrain_choice_{TASK}.jsonl"
    assert again["max_length"] == 96
    assert copied.read_text() == (short_context_run / "downstream" / "tasks" /
                                  f"cptrain_choice_{TASK}.jsonl").read_text()
    assert again["tasks"] == rec["tasks"]
    path = short_context_run / "downstream" / "tasks" / f"cptrain_choice_{TASK}.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) >= 20
    assert max(_longest(r, count=count) for r in rows) <= 96  # every item fits the window
    for r in rows:  # passages are still whole words of the document
        assert f"{r['ctx']} {r['endings'][r['label']]}" in " ".join(docs[r["doc"]].split())


ZH_PHRASES = [
    "今天的天气很好", "我们在图书馆里读书", "这个城市有很多古老的建筑",
    "火车站离这里不远", "他每天早上喝一杯茶", "学生们正在准备考试",
    "公园里有很多人在散步", "这本书讲的是历史", "妈妈在厨房里做饭",
    "我想去山上看日出", "电脑的程序需要更新", "朋友们一起吃晚饭",
]


@pytest.fixture(scope="module")
def code_and_chinese_run(fake_run, tmp_path_factory):
    """A run whose tasks are Python code (email) and Chinese text, prepared with the model's
    own tokenizer (byte-level BPE learnt on code, so a Chinese character costs several tokens)."""
    import numpy as np

    from cptrain.config_base import build_config
    from cptrain.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("dszh")
    model = fake_run / "models" / f"after_0_{TASK}"
    rng = np.random.default_rng(0)
    docs = ["，".join(rng.choice(ZH_PHRASES, 30).tolist()) + "。" for _ in range(60)]
    code = held_out_documents(Path(yaml.safe_load((fake_run / "config.yaml").read_text())
                                   ["data"]["dir"]), TASK)
    tasks = []
    for name, texts in (("code", code), ("zh", docs)):
        for split in ("train", "val"):
            f = root / "text" / name / f"{split}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                         encoding="utf-8")
        tasks.append({"name": name, "train": [str(root / "text" / name / "train.jsonl")],
                      "val": [str(root / "text" / name / "val.jsonl")]})
    prepared = prepare(build_config(PrepareConfig, {
        "out_dir": str(root / "prepared"), "tokenizer": {"path": str(model)}, "tasks": tasks,
    }), progress=False)
    run = root / "run"
    shutil.copytree(fake_run / "models", run / "models")
    cfg = {"data": {"dir": str(prepared), "tasks": [{"name": "code"}, {"name": "zh"}]},
           "train": {"seq_len": 64}}
    return run, cfg


@pytest.mark.slow  # six lm-eval runs
@pytest.mark.parametrize("seq_len", [64, 96, 256])
def test_downstream_fits_code_and_chinese_items_at_any_context(code_and_chinese_run, seq_len):
    run, cfg = code_and_chinese_run
    cfg = {**cfg, "train": {"seq_len": seq_len}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    set_window(run / "models" / f"after_0_{TASK}", seq_len)
    rec = run_downstream(run, out_dir=run / f"downstream_{seq_len}", items=20, bpb_chars=300,
                         limit=8)
    assert rec["max_length"] == seq_len
    count = token_counter(run / "models" / f"after_0_{TASK}")
    for name in ("code", "zh"):
        assert 0.0 <= rec["tasks"][f"cptrain_choice_{name}"]["acc"] <= 1.0
        assert rec["tasks"][f"cptrain_bpb_{name}"]["bits_per_byte"] > 0
        path = run / f"downstream_{seq_len}" / "tasks" / f"cptrain_choice_{name}.jsonl"
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        delim = "" if name == "zh" else " "
        assert max(_longest(r, delim=delim, count=count) for r in rows) <= seq_len


def test_a_failure_inside_lm_eval_is_one_line_naming_the_tasks():
    from cptrain.evaluation.downstream import _one_line

    wanted = r"lm-eval failed on cptrain_bpb_zh: OverflowError: math range error"
    with pytest.raises(EnvironmentProblem, match=wanted) as e, _one_line(["cptrain_bpb_zh"]):
        raise OverflowError("math range error\nsecond line")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def one_task_too_small(fake_run, tmp_path_factory):
    """The fake run's model over data with a usable task (code) and one whose held-out split
    is a single short document (tiny)."""
    from cptrain.config_base import build_config
    from cptrain.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("small")
    model = root / "model"  # outside any run: its data is the one passed
    shutil.copytree(fake_run / "models" / f"after_0_{TASK}", model)
    code = held_out_documents(Path(yaml.safe_load((fake_run / "config.yaml").read_text())
                                   ["data"]["dir"]), TASK)
    tasks = []
    for name, val in (("code", code), ("tiny", ["def f(): return 1"])):
        for split, texts in (("train", code), ("val", val)):
            f = root / "text" / name / f"{split}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tasks.append({"name": name, "train": [str(root / "text" / name / "train.jsonl")],
                      "val": [str(root / "text" / name / "val.jsonl")]})
    prepared = prepare(build_config(PrepareConfig, {
        "out_dir": str(root / "prepared"), "tokenizer": {"path": str(model)}, "tasks": tasks,
    }), progress=False)
    return model, prepared


def test_a_task_too_small_for_items_is_named_and_spares_the_others(one_task_too_small,
                                                                   tmp_path, capsys):
    model, prepared = one_task_too_small
    common = {"data_dir": prepared, "items": 8, "limit": 4, "bpb_chars": 200}
    # asked for by name: an error that names it, and nothing half-written
    with pytest.raises(DataError, match=r"^task tiny: only \d+ of \d+ held-out document"):
        run_downstream(model, tasks=["cptrain_choice_tiny"], out_dir=tmp_path / "a", **common)
    assert not (tmp_path / "a" / "tasks").exists()
    # another task asked for: the small one is never built
    rec = run_downstream(model, tasks=["cptrain_choice_code"], out_dir=tmp_path / "b", **common)
    assert list(rec["tasks"]) == ["cptrain_choice_code"]
    # all local tasks: the small one is left out with a warning naming it
    rec = run_downstream(model, tasks=["local"], out_dir=tmp_path / "c", **common)
    assert {"cptrain_choice_code", "cptrain_bpb_code"} <= set(rec["tasks"])
    assert not any("tiny" in t for t in rec["tasks"])
    assert "warning: task tiny: only" in capsys.readouterr().err


def test_no_git_noise_outside_a_repository(fake_run, tmp_path, monkeypatch, capfd):
    """lm-eval asks git for the current directory's commit; outside a repository git's
    "fatal: not a git repository" must not reach the user."""
    monkeypatch.chdir(tmp_path)  # not a git repository
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    run_downstream(fake_run, tasks=[f"cptrain_choice_{TASK}"], out_dir=tmp_path / "ds",
                   items=8, limit=4)
    assert "not a git repository" not in capfd.readouterr().err
