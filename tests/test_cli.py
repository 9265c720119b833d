"""The command line as a user meets it: exit codes and one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import read_summary


def cptrain(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "cptrain.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def in_process(capsys, *args):
    """The CLI's main() in this process (no interpreter start and torch import per call):
    (exit code, stdout, stderr)."""
    from cptrain import cli

    code = cli.main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cptrain: error: ") and fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_config_file(tmp_path):
    assert_one_line_error(cptrain("train", str(tmp_path / "nope.yaml")), "does not exist")


def test_unknown_key_names_the_path(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"run_dir": "r", "data": {"dir": "d", "tasks": ["a"]}, "x": 1}))
    assert_one_line_error(cptrain("train", str(p)), "x: unknown key")


def test_prepare_with_missing_input(tmp_path):
    p = tmp_path / "prep.yaml"
    p.write_text(
        yaml.safe_dump(
            {"out_dir": str(tmp_path / "out"), "tasks": [{"name": "a", "train": ["missing.txt"]}]}
        )
    )
    proc = cptrain("prepare", str(p), "--no-progress")
    assert_one_line_error(proc, "missing.txt")
    assert not (tmp_path / "out" / "prepare.json").exists()


def test_prepare_train_eval_round_trip(prepared_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    p = tmp_path / "run.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "data": {
                    "dir": str(prepared_dir),
                    "tasks": ["email", "xml"],
                    "tokens_per_task": 512,
                },
                "train": {"seq_len": 32, "batch_size": 8},
                "eval": {"windows": 4},
            }
        )
    )
    proc = in_process(capsys, "train", str(p), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "forgetting" in proc.stdout and "retained" in proc.stdout
    summary = read_summary(run_dir)
    assert len(summary["loss_matrix"]) == 2
    shown = in_process(capsys, "eval", str(run_dir))
    assert shown.returncode == 0
    assert f"{summary['loss_matrix'][1][0]:.3f}" in shown.stdout
    assert "side by side" not in shown.stdout  # one run: nothing to compare
    twin = tmp_path / "twin"
    import shutil

    shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns("checkpoints", "replay"))
    both = in_process(capsys, "eval", str(run_dir), str(twin))
    table = both.stdout.split("side by side")[1].splitlines()
    assert table[1].split()[:4] == ["method", "forgetting", "retained", "learned"]
    assert [ln.split()[0] for ln in table[2:4]] == ["run", "twin"]
    again = in_process(capsys, "train", str(p), "--no-progress")
    assert_one_line_error(again, "already holds a run")
    # the real command line, as a user meets it
    assert_one_line_error(cptrain("eval", str(tmp_path)), "no summary.json")


@pytest.mark.parametrize("bad", ["train.seq_len=abc", "train.lr=-1", "replay.alpha=1.0"])
def test_bad_overrides(tmp_path, bad):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"run_dir": "r", "data": {"dir": "d", "tasks": ["a"]}}))
    key = bad.split("=")[0]
    assert_one_line_error(cptrain("train", str(p), "--set", bad), key)


def test_fetch_demo_without_apt(tmp_path):
    env_path = tmp_path / "bin"
    env_path.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "cptrain.cli", "data", "fetch-demo", "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env={"PATH": str(env_path), "HOME": str(tmp_path)},
        cwd=Path(__file__).parent,
    )
    assert_one_line_error(proc, "apt")


def test_export_newest_checkpoint(prepared_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    p = tmp_path / "run.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "data": {"dir": str(prepared_dir), "tasks": ["email"], "tokens_per_task": 512},
                "train": {"seq_len": 32, "batch_size": 8},
                "eval": {"windows": 4},
            }
        )
    )
    assert in_process(capsys, "train", str(p), "--no-progress").returncode == 0
    proc = in_process(capsys, "export", str(run_dir), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 512
    missing = in_process(capsys, "export", str(tmp_path / "nothing"))
    assert_one_line_error(missing, "no complete checkpoint")


def test_output_into_a_closed_pipe_stops_quietly():
    """`cptrain ... | head` closes the pipe early: exit 141 as other tools do, no traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "cptrain.cli", "models", "list"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


CHECK_BEFORE_TORCH = """
import sys
from cptrain import cli
codes = [cli.main(argv) for argv in ARGVS]
print(codes, "torch" in sys.modules)
"""


def test_data_and_run_directory_mistakes_are_reported_before_torch_loads(
    prepared_dir, tmp_path, make_config
):
    """Point 10's errors need no torch, so they come without its seconds of import."""
    from cptrain.train import train

    done = make_config("done")
    train(done, progress=False)
    base = yaml.safe_load(Path(done.run_dir, "config.yaml").read_text())
    cfgs = {
        "not prepared": {"data": {**base["data"], "tasks": [{"name": "klingon"}]}},
        "no prepare.json": {"data": {**base["data"], "dir": str(tmp_path / "nowhere")}},
        "holds a run": {},
        "seq_len": {"train": {**base["train"], "seq_len": 100_000}},
    }
    argvs = []
    for name, change in cfgs.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        run_dir = base["run_dir"] if name == "holds a run" else str(path.with_suffix(""))
        path.write_text(yaml.safe_dump({**base, **change, "run_dir": run_dir}))
        argvs.append(["train", str(path), "--no-progress"])
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump({**base, "run_dir": str(tmp_path / "never-trained")}))
    argvs.append(["train", str(fresh), "--resume", "--no-progress"])
    proc = subprocess.run([sys.executable, "-c", f"ARGVS = {argvs!r}\n" + CHECK_BEFORE_TORCH],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "[2, 2, 2, 2, 2] False", proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cptrain: error:")]
    assert len(errors) == 5, proc.stderr
    for fragment, line in zip(("klingon not in", "prepare", "already holds a run",
                               "train split has", "no complete checkpoint"), errors, strict=True):
        assert fragment in line, line


def test_every_flag_has_help_and_there_is_a_version(capsys):
    import argparse

    from cptrain import cli

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])
            elif action.dest != "help":
                yield path, action

    found = list(walk(cli.build_parser(), []))
    assert len(found) > 40
    assert [(p, a.dest) for p, a in found if not a.help] == []
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("cptrain ")


def test_only_rank_zero_prints_the_run_report(prepared_dir, make_config, tmp_path, capsys,
                                              monkeypatch):
    cfg = make_config("ranked", data={"tasks": ["email"]})
    path = tmp_path / "ranked.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second rank
    from cptrain import cli

    assert cli.cmd_train(cli.build_parser().parse_args(["train", str(path), "--no-progress"])) == 0
    assert "validation loss" not in capsys.readouterr().out


def test_prepare_prints_only_its_own_line_to_stdout(tmp_path):
    """The tokenizer trainer's progress (native code) goes to stderr, not into stdout."""
    import json

    text = tmp_path / "a.jsonl"
    text.write_text("".join(json.dumps({"text": f"doc {i} " + "words here " * 50}) + "\n"
                            for i in range(40)))
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"),
                                   "tokenizer": {"vocab_size": 300},
                                   "tasks": [{"name": "a", "train": [str(text)],
                                              "val": [str(text)]}]}))
    proc = cptrain("prepare", str(cfg))
    assert proc.returncode == 0, proc.stderr
    n = json.loads((tmp_path / "out" / "prepare.json").read_text())["tasks"]["a"]["train"]
    assert n["num_documents"] == 40
    tokens = f"{n['num_tokens']:,} tokens (40 documents)"
    assert proc.stdout.splitlines() == [f"prepared data in {tmp_path / 'out'}",
                                        f"  a: train {tokens}, val {tokens}"]
    assert "\n\n" not in proc.stderr  # the tokenizer trainer's bar draws nothing off a terminal
