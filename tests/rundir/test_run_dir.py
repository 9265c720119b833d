"""The run directory's one reader and writer (cptrain.rundir.run_dir), on run directories
built by hand: nothing here trains."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import tiny_run_config

from cptrain.errors import CheckpointError, ConfigError
from cptrain.rundir import layout
from cptrain.rundir import summary as sm
from cptrain.rundir.run_dir import (
    MetricsLog,
    RunDir,
    check_run_dirs,
    check_start,
    find_runs,
    require_finished,
    set_aside,
)
from cptrain.rundir.summary import FORMAT, VERSION

MAIN = SimpleNamespace(is_main=True, broadcast_object=lambda x: x)


def _summary(complete: bool = True, **extra) -> dict:
    return {"config": {"seed": 0}, "tasks": ["a", "b"], "loss_matrix": [[1.0, 2.0]],
            "complete": complete, **extra}


def make_run(path: Path, *, summary: dict | None = None, config: dict | None = None,
             checkpoints: tuple[int, ...] = (), models: tuple[str, ...] = ()) -> Path:
    """A run directory as a run leaves it, written by hand."""
    path.mkdir(parents=True, exist_ok=True)
    if summary is not None:
        (path / layout.SUMMARY).write_text(json.dumps(summary), encoding="utf-8")
    if config is not None:
        (path / layout.CONFIG).write_text(yaml.safe_dump(config), encoding="utf-8")
    for step in checkpoints:
        (path / layout.CHECKPOINTS / f"step_{step}").mkdir(parents=True)
        (path / layout.CHECKPOINTS / f"step_{step}" / "state.json").write_text("{}")
    for name in models:
        (path / layout.MODELS / name).mkdir(parents=True)
    return path


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> content)."""
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------------- reading
def test_open_refuses_what_is_not_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass the run_dir"):
        RunDir.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file does not exist"):
        RunDir.open(tmp_path / "file")
    assert not (tmp_path / "missing").exists()


def test_open_reads_without_creating_or_changing_anything(tmp_path):
    run = make_run(tmp_path / "run", summary=_summary(), config={"seed": 0},
                   checkpoints=(4,), models=("after_0_a",))
    (run / layout.METRICS).write_text('{"step": 1}\n{"step": 2')
    before = tree(run)
    r = RunDir.open(str(run))
    assert r.path == run and not r.is_main and not r.metrics.enabled
    r.summary(), r.finished(), r.config(), r.records(), r.task_models(), r.final_model()
    r.downstream_results(), r.checkpoints()
    r.metrics.write({"step": 3})  # a reader's metrics log writes nothing
    r.write_summary(_summary())
    assert tree(run) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [layout.SUMMARY, layout.CONFIG, layout.METRICS, layout.CHECKPOINTS, layout.MODELS])


def test_summary_is_migrated_and_finished_reads_complete(tmp_path):
    done = RunDir.open(make_run(tmp_path / "done", summary=_summary(complete=True)))
    assert done.summary()["version"] == VERSION and done.summary()["format"] == FORMAT
    assert done.summary()["tasks"] == ["a", "b"]
    assert done.finished()
    assert not RunDir.open(make_run(tmp_path / "stopped", summary=_summary(False))).finished()
    no_key = {k: v for k, v in _summary().items() if k != "complete"}
    assert not RunDir.open(make_run(tmp_path / "old", summary=no_key)).finished()


def test_a_missing_or_damaged_summary_is_a_config_error_and_not_finished(tmp_path):
    empty = RunDir.open(make_run(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no summary.json"):
        empty.summary()
    assert not empty.finished()
    torn = make_run(tmp_path / "torn")
    (torn / layout.SUMMARY).write_text('{"config": {}, "complete": tr')
    with pytest.raises(ConfigError, match="damaged summary.json"):
        RunDir.open(torn).summary()
    assert not RunDir.open(torn).finished()
    newer = make_run(tmp_path / "newer", summary=_summary(version=VERSION + 1))
    assert not RunDir.open(newer).finished()


def test_config_reads_the_yaml_and_refuses_a_missing_or_damaged_one(tmp_path):
    cfg = {"run_dir": "x", "seed": 3, "train": {"seq_len": 32, "lr": 0.003}}
    assert RunDir.open(make_run(tmp_path / "ok", config=cfg)).config() == cfg
    with pytest.raises(ConfigError, match=r"no readable config\.yaml"):
        RunDir.open(make_run(tmp_path / "none")).config()
    bad = make_run(tmp_path / "bad")
    (bad / layout.CONFIG).write_text("seed: [1, 2\n  train: {")
    with pytest.raises(ConfigError, match=r"no readable config\.yaml"):
        RunDir.open(bad).config()
    listed = make_run(tmp_path / "listed")
    (listed / layout.CONFIG).write_text("- 1\n- 2\n")
    assert RunDir.open(listed).config() == {}


def test_records_are_in_order_and_torn_lines_are_skipped(tmp_path):
    run = make_run(tmp_path / "run")
    assert RunDir.open(run).records() == []  # no metrics.jsonl yet
    lines = ['{"type": "train", "step": 1}', "", '{"type": "train", "st', "[1, 2]", "7",
             '{"type": "eval", "step": 2}', '{"type": "train", "step": 3}', '{"step": 4']
    (run / layout.METRICS).write_text("\n".join(lines), encoding="utf-8")
    assert RunDir.open(run).records() == [
        {"type": "train", "step": 1}, {"type": "eval", "step": 2}, {"type": "train", "step": 3}]


def test_task_models_are_in_task_index_order(tmp_path):
    names = [f"after_{i}_t{i}" for i in (10, 2, 9, 0, 1)]
    run = make_run(tmp_path / "run", models=(*names, "merged", "after_x_y", "tmp.after_3_z"))
    (run / layout.MODELS / "after_3_file").write_text("not a directory")
    got = RunDir.open(run).task_models()
    assert [p.name for p in got] == [f"after_{i}_t{i}" for i in (0, 1, 2, 9, 10)]
    assert got[0] == run / "models" / "after_0_t0"
    assert RunDir.open(run).final_model() == run / "models" / "after_10_t10"


def test_no_task_model_before_the_first_task_ends(tmp_path):
    run = RunDir.open(make_run(tmp_path / "run"))
    assert run.task_models() == [] and run.final_model() is None
    (run.path / layout.MODELS).mkdir()
    assert run.task_models() == [] and run.final_model() is None


def _downstream(run: Path, name: str, content) -> None:
    (run / layout.DOWNSTREAM).mkdir(exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (run / layout.DOWNSTREAM / f"{name}.json").write_text(text)


def test_downstream_results_are_the_newest_task_models(tmp_path):
    run = make_run(tmp_path / "run")
    assert RunDir.open(run).downstream_results() == {}
    _downstream(run, "after_9_a", {"tasks": {"hellaswag": {"acc": 0.9}}})
    _downstream(run, "after_10_b", {"tasks": {"hellaswag": {"acc": 0.1}}})
    _downstream(run, "after_2_c", {"tasks": {"hellaswag": {"acc": 0.2}}})
    _downstream(run, "summary", {"tasks": {"other": 1}})  # not a task model's results
    assert RunDir.open(run).downstream_results() == {"hellaswag": {"acc": 0.1}}


def test_an_unreadable_downstream_file_is_passed_over(tmp_path):
    run = make_run(tmp_path / "run")
    _downstream(run, "after_1_a", {"tasks": {"arc": {"acc": 0.5}}})
    _downstream(run, "after_3_c", "[1, 2]")  # not an object
    _downstream(run, "after_2_b", '{"tasks": {"arc"')  # torn
    assert RunDir.open(run).downstream_results() == {"arc": {"acc": 0.5}}
    _downstream(run, "after_4_d", {"other": 1})  # no scores: an empty result, not passed over
    assert RunDir.open(run).downstream_results() == {}


def test_a_downstream_file_whose_tasks_is_not_an_object_is_passed_over(tmp_path):
    run = make_run(tmp_path / "run")
    _downstream(run, "after_0_a", {"tasks": {"arc": {"acc": 0.5}}})
    _downstream(run, "after_1_b", {"tasks": None})
    assert RunDir.open(run).downstream_results() == {"arc": {"acc": 0.5}}


def test_checkpoints_are_oldest_first(tmp_path):
    run = make_run(tmp_path / "run", checkpoints=(12, 4, 100, 8))
    (run / layout.CHECKPOINTS / "step_16.tmp").mkdir()
    assert RunDir.open(run).checkpoints() == [
        (s, run / "checkpoints" / f"step_{s}") for s in (4, 8, 12, 100)]
    assert RunDir.open(make_run(tmp_path / "none")).checkpoints() == []


# ---------------------------------------------------------------------------- helpers
def test_check_start(tmp_path):
    empty = make_run(tmp_path / "empty")
    check_start(empty, False)  # a new run in an empty directory
    check_start(tmp_path / "missing", False)
    for mode in ("auto", "restart"):
        check_start(empty, mode)
    with pytest.raises(CheckpointError) as err:
        check_start(empty, True)
    assert str(err.value) == str(layout.no_checkpoint(empty / "checkpoints"))
    finished = make_run(tmp_path / "finished", summary=_summary())
    stopped = make_run(tmp_path / "stopped", checkpoints=(4,))
    for run in (finished, stopped):
        with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
            check_start(run, False)
    check_start(stopped, True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        check_start(finished, True)  # finished without a checkpoint left: nothing to resume


def test_set_aside_keeps_every_attempt(tmp_path):
    run = make_run(tmp_path / "run", summary=_summary(), checkpoints=(4,), models=("after_0_a",))
    (run / layout.RUN_ID).write_text("a" * 32 + "\n")
    first = tree(run)
    moved = set_aside(run)
    assert moved == run / "attempts" / "1"
    assert [p.name for p in run.iterdir()] == ["attempts"]
    assert tree(moved) == first
    (run / layout.SUMMARY).write_text("second")
    assert set_aside(run) == run / "attempts" / "2"
    assert tree(run) == {**{f"attempts/1/{k}": v for k, v in first.items()},
                         "attempts/2/summary.json": "second"}


def test_set_aside_numbers_after_the_highest_attempt(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "attempts" / "3").mkdir(parents=True)
    (run / "attempts" / "notes").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert set_aside(run) == run / "attempts" / "4"
    assert (run / "attempts" / "4" / "metrics.jsonl").read_text() == "{}\n"
    assert (run / "attempts" / "3").is_dir() and (run / "attempts" / "notes").is_dir()


def test_set_aside_with_nothing_to_move(tmp_path):
    assert set_aside(tmp_path / "missing") is None
    assert set_aside(make_run(tmp_path / "empty")) is None
    assert list((tmp_path / "empty").iterdir()) == []
    only = make_run(tmp_path / "only")
    (only / "attempts" / "1").mkdir(parents=True)
    assert set_aside(only) is None
    assert [p.name for p in (only / "attempts").iterdir()] == ["1"]


def test_check_run_dirs(tmp_path):
    (tmp_path / "a").mkdir()
    check_run_dirs([tmp_path / "a", str(tmp_path)])
    check_run_dirs([])
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "f", tmp_path / "missing"):
        with pytest.raises(ConfigError, match=f"^{re.escape(str(bad))} is not a directory"):
            check_run_dirs([tmp_path / "a", bad])


def test_require_finished(tmp_path):
    require_finished(make_run(tmp_path / "ok", summary=_summary(), config={"seed": 0}))
    for name, kw in (("no-config", {"summary": _summary()}), ("no-summary", {"config": {}}),
                     ("empty", {})):
        with pytest.raises(ConfigError, match="is not a finished cptrain run"):
            require_finished(make_run(tmp_path / name, **kw))
    odd = make_run(tmp_path / "dirs")
    (odd / layout.CONFIG).mkdir()
    (odd / layout.SUMMARY).mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(odd))):
        require_finished(odd)


def test_find_runs_walks_a_tree_in_sorted_order(tmp_path):
    root = tmp_path / "sweep"
    for name in ("b", "a/x", "a/w", "c/d/e"):
        make_run(root / name, summary=_summary())
    make_run(root / "empty")  # no summary: not a run, searched but nothing found
    found = list(find_runs(root))
    assert [r.path for r in found] == [root / n for n in ("a/w", "a/x", "b", "c/d/e")]
    assert all(isinstance(r, RunDir) and not r.is_main for r in found)
    assert list(find_runs(tmp_path / "missing")) == []


def test_find_runs_does_not_descend_into_a_run_or_into_attempts(tmp_path):
    run = make_run(tmp_path / "run", summary=_summary(), models=("after_0_a",))
    make_run(run / "models" / "after_0_a", summary=_summary())  # inside a run: not searched
    make_run(run / "attempts" / "1", summary=_summary())
    assert [r.path for r in find_runs(run)] == [run]  # a run is itself
    # a restarted run still training: no summary of its own yet, its earlier attempt has one
    live = make_run(tmp_path / "sweep" / "live", checkpoints=(2,))
    make_run(live / "attempts" / "1", summary=_summary())
    make_run(tmp_path / "sweep" / "attempts" / "x", summary=_summary())
    make_run(tmp_path / "sweep" / "done", summary=_summary())
    assert [r.path for r in find_runs(tmp_path / "sweep")] == [tmp_path / "sweep" / "done"]


# ---------------------------------------------------------------------------- writing
def test_start_a_new_run_creates_the_directory(tmp_path):
    path = tmp_path / "deep" / "run"
    run, resume = RunDir.start(path, MAIN, False)
    assert path.is_dir() and resume is False and run.is_main and run.path == path
    assert list(path.iterdir()) == []  # the write probe is removed
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir.start(make_run(tmp_path / "held", checkpoints=(2,)), MAIN, False)


def test_start_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="--restart"):
        RunDir.start(tmp_path / "new", MAIN, True)
    path = make_run(tmp_path / "run", checkpoints=(2,))
    run, resume = RunDir.start(path, MAIN, True)
    assert resume is True and not (path / "attempts").exists()


def test_start_refuses_an_unwritable_run_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not writable .*; choose another run_dir"):
        RunDir.start(tmp_path / "file" / "run", MAIN, False)


def test_start_auto_resumes_a_checkpoint_else_restarts(tmp_path, capsys):
    path = make_run(tmp_path / "ckpt", summary=_summary(False), checkpoints=(4,))
    before = tree(path)
    _, resume = RunDir.start(path, MAIN, "auto")
    assert resume is True and tree(path) == before
    # an attempt that died before its first checkpoint: kept aside, a new one starts
    path = make_run(tmp_path / "dead", config={"seed": 0})
    (path / layout.METRICS).write_text('{"step": 1}\n')
    _, resume = RunDir.start(path, MAIN, "auto")
    assert resume is False
    assert sorted(tree(path)) == ["attempts/1/config.yaml", "attempts/1/metrics.jsonl"]
    assert str(path / "attempts" / "1") in capsys.readouterr().out
    # nothing there at all: nothing to keep, nothing printed
    _, resume = RunDir.start(tmp_path / "fresh", MAIN, "auto")
    assert resume is False and not (tmp_path / "fresh" / "attempts").exists()
    assert capsys.readouterr().out == ""


def test_start_restart_sets_a_checkpointed_run_aside(tmp_path):
    path = make_run(tmp_path / "run", summary=_summary(), checkpoints=(4, 8))
    before = tree(path)
    run, resume = RunDir.start(path, MAIN, "restart")
    assert resume is False and run.checkpoints() == []
    assert tree(path / "attempts" / "1") == before
    RunDir.start(path, MAIN, "restart")  # nothing new to move: attempt 1 stays
    assert sorted(p.name for p in (path / "attempts").iterdir()) == ["1"]


def test_start_on_another_rank_follows_rank_0(tmp_path):
    """Only rank 0 moves an attempt aside; the others take its answer and write nothing."""
    told = []
    other = SimpleNamespace(is_main=False, broadcast_object=lambda x: told.append(x) or True)
    path = make_run(tmp_path / "run", checkpoints=(4,))
    before = tree(path)
    run, resume = RunDir.start(path, other, "restart")
    assert told == [None] and resume is True and tree(path) == before
    assert not run.is_main and not run.metrics.enabled


def test_written_summary_and_config_read_back(tmp_path, prepared_dir_free_config):
    run, _ = RunDir.start(tmp_path / "run", MAIN, False)
    run.write_summary(_summary(steps=12))
    raw = json.loads(run.summary_path.read_text())
    assert (raw["format"], raw["version"], raw["steps"]) == (FORMAT, VERSION, 12)
    assert run.summary() == raw and run.finished()
    cfg = prepared_dir_free_config(run.path)
    run.write_config(cfg)
    assert RunDir.open(run.path).config() == cfg.model_dump(mode="json")
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir.start(run.path, MAIN, False)


def test_not_main_writes_no_summary_or_config(tmp_path, prepared_dir_free_config):
    run = RunDir(make_run(tmp_path / "run"), is_main=False)
    run.write_summary(_summary())
    run.write_config(prepared_dir_free_config(run.path))
    assert list(run.path.iterdir()) == []


def test_the_written_summary_carries_format_and_version(tmp_path):
    run, _ = RunDir.start(tmp_path / "run", MAIN, False)
    run.write_summary(_summary())
    on_disk = json.loads(run.summary_path.read_text())
    assert (on_disk["format"], on_disk["version"]) == (sm.FORMAT, sm.VERSION)


@pytest.fixture
def prepared_dir_free_config(tmp_path):
    """A run config (validated, never trained): the data directory need not exist."""
    return lambda run_dir: tiny_run_config(run_dir, tmp_path / "no-data")


def test_names_inside_the_run(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint_root == tmp_path / "checkpoints"
    assert run.summary_path == tmp_path / "summary.json"
    assert run.task_model_dir(3, "xml") == tmp_path / "models" / "after_3_xml"


def test_attempt_run_id_is_kept_until_it_is_replaced(tmp_path):
    run = RunDir(make_run(tmp_path / "run"))
    first = run.attempt_run_id()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert (run.path / layout.RUN_ID).read_text() == first + "\n"
    assert run.attempt_run_id() == first  # an attempt that died before its first checkpoint
    (run.path / layout.RUN_ID).write_text("not-an-id\n")
    second = run.attempt_run_id()
    assert second != first and re.fullmatch(r"[0-9a-f]{32}", second)
    assert (run.path / layout.RUN_ID).read_text() == second + "\n"


def test_metrics_log_appends_and_truncates_after_a_step(tmp_path):
    run = RunDir(make_run(tmp_path / "run"))
    for step in (1, 2, 3, 4):
        run.metrics.write({"type": "train", "step": step})
    run.metrics.write({"type": "checkpoint", "step": 2, "after_checkpoint_only": True})
    run.metrics.close()
    with open(run.path / layout.METRICS, "a") as f:
        f.write('{"type": "train", "st')  # torn by a kill
    assert [r["step"] for r in run.records()] == [1, 2, 3, 4, 2]
    run.metrics.truncate_after(2)
    assert run.records() == [{"type": "train", "step": 1}, {"type": "train", "step": 2}]
    assert (run.path / layout.METRICS).read_text().endswith("}\n")
    run.metrics.write({"type": "train", "step": 3})  # appends after a truncation
    run.metrics.close()
    assert [r["step"] for r in run.records()] == [1, 2, 3]
    run.metrics.clear()
    assert not (run.path / layout.METRICS).exists() and run.records() == []


def test_a_disabled_metrics_log_touches_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5}\n')
    log = MetricsLog(path, enabled=False)
    log.write({"step": 6})
    log.truncate_after(0)
    log.clear()
    log.close()
    assert path.read_text() == '{"step": 5}\n'
    MetricsLog(tmp_path / "absent.jsonl").truncate_after(3)  # nothing to truncate
    assert not (tmp_path / "absent.jsonl").exists()
