"""Progress in a terminal is a tqdm bar; in a log file it is a few plain lines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tqdm import tqdm

from cptrain import progress
from cptrain.errors import ConfigError
from cptrain.progress import ENV, LineProgress, progress_bar

TESTS = Path(__file__).resolve().parent


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress, "_now", c)
    return c


def _percentages(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"\((\d+)%\)", text)]


def test_log_gets_a_line_per_tenth_and_no_carriage_return(clock):
    out = io.StringIO()
    with progress_bar(total=1000, desc="work", unit="tok", file=out) as bar:
        assert isinstance(bar, LineProgress)
        for i in range(1000):
            clock.t += 1 / 64  # 15.6 s in all: the tenths, not the 30 s clock, print
            bar.update()
            bar.set_postfix(loss=1 / (i + 1), task="email")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 11, text  # start, 10 % … 90 %, and the close
    assert _percentages(text) == list(range(0, 101, 10))
    assert lines[-1].startswith("work: 1000/1000 tok (100%) [00:15<00:00, 64.00tok/s")
    assert lines[-1].endswith("loss=0.001, task=email]")


def test_fast_bar_prints_start_and_end_only():
    out = io.StringIO()
    bar = progress_bar(total=1000, file=out)
    for _ in range(1000):
        bar.update()
    bar.close()
    bar.close()  # a second close prints nothing, as in tqdm
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "1000/1000" in lines[-1], lines


def test_without_total_lines_come_by_time(clock):
    out = io.StringIO()
    bar = progress_bar(desc="prepare email", unit="B", unit_scale=True, file=out)
    for _ in range(100):
        clock.t += 1.0
        bar.update(2048)
        bar.refresh()  # checks the clock; prints nothing by itself
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines  # start, 30 s, 60 s, 90 s, close
    assert all(line.startswith("prepare email: ") for line in lines)
    assert lines[-1].startswith("prepare email: 205k B [01:40, 2.05kB/s")


def test_interval_is_adjustable(clock):
    out = io.StringIO()
    bar = progress_bar(total=10_000, file=out, interval=5)
    for _ in range(20):
        clock.t += 1.0
        bar.update()
    bar.close()
    assert len(out.getvalue().splitlines()) == 6  # start, every 5 s (4), close


def test_growing_total_and_resume(clock):
    out = io.StringIO()
    bar = progress_bar(total=0, initial=0, unit="doc", file=out)
    bar.total += 50
    bar.refresh()
    clock.t += 2
    bar.update(25)  # half of the total found so far
    bar.close()
    assert _percentages(out.getvalue()) == [50, 50]
    out = io.StringIO()
    progress_bar(total=10, initial=4, unit="step", file=out).close()
    assert "4/10 step (40%)" in out.getvalue()


def test_terminal_gets_tqdm():
    out = FakeTTY()
    bar = progress_bar(total=100, desc="work", file=out, mininterval=0)
    assert isinstance(bar, tqdm)
    for _ in range(100):
        bar.update()
    bar.close()
    assert "\r" in out.getvalue()


def test_default_stream_is_stderr_at_call_time(monkeypatch):
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    assert isinstance(progress_bar(total=1), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=1), LineProgress)


@pytest.mark.parametrize("stream", [io.StringIO, FakeTTY])
def test_disable_is_silent(stream):
    out = stream()
    bar = progress_bar(total=10, file=out, disable=True)
    bar.docs = 0  # callers hang counters on the bar
    bar.update(5)
    bar.set_postfix(docs=3)
    bar.close()
    assert out.getvalue() == ""


def test_environment_override(monkeypatch):
    monkeypatch.setenv(ENV, "bar")
    assert isinstance(progress_bar(file=io.StringIO()), tqdm)
    monkeypatch.setenv(ENV, "lines")
    assert isinstance(progress_bar(file=FakeTTY()), LineProgress)
    monkeypatch.setenv(ENV, "OFF")
    out = FakeTTY()
    bar = progress_bar(total=3, file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
    monkeypatch.setenv(ENV, "auto")
    assert isinstance(progress_bar(file=FakeTTY()), tqdm)
    monkeypatch.setenv(ENV, "fancy")
    with pytest.raises(ConfigError, match="CPTRAIN_PROGRESS='fancy'"):
        progress_bar(file=io.StringIO())


def test_unknown_keyword_fails_as_tqdm_would():
    with pytest.raises(TypeError, match="totl"):
        progress_bar(totl=10, file=io.StringIO())


def test_rest_of_the_api(clock):
    out = io.StringIO()
    bar = progress_bar(total=4, desc="a", postfix={"k": 1}, file=out, dynamic_ncols=True)
    bar.set_description("b")
    bar.set_postfix_str("loss 1.234", refresh=False)
    bar.write("a message")
    assert (bar.n, bar.total, len(bar)) == (0, 4, 4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("a: 0/4 it (0%)") and lines[0].endswith(", k=1]")
    assert lines[1] == "a message"
    assert lines[2].startswith("b: 0/4 it") and lines[2].endswith("loss 1.234]")
    out = io.StringIO()
    assert list(progress_bar(range(3), desc="it", file=out)) == [0, 1, 2]
    assert out.getvalue().splitlines()[-1].startswith("it: 3/3 it (100%)")


def _piped(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run with stdout and stderr pipes. Bytes, decoded here: text=True would turn each '\r'
    into '\n' (universal newlines) and hide the very redraws looked for."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["OMP_NUM_THREADS"] = "1"  # the suite's workers already use every core
    proc = subprocess.run(args, capture_output=True, cwd=tmp_path, env=env, timeout=600)
    return subprocess.CompletedProcess(
        args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return _piped([sys.executable, "-c", textwrap.dedent(code)], tmp_path)


def _prepare_config(prepared_dir: Path, tmp_path: Path) -> Path:
    text = prepared_dir.parent / "text" / "email"
    cfg = {
        "out_dir": str(tmp_path / "prepared"),
        "tokenizer": {"vocab_size": 300},
        "tasks": [{"name": "email", "train": [str(text / "train.jsonl")],
                   "val": [str(text / "val.jsonl")]}],
    }  # fmt: skip
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prepare_with_progress_into_a_pipe(prepared_dir, tmp_path):
    """A real prepare, its progress on, its stderr a pipe (a log file): lines, no redraws."""
    cfg = _prepare_config(prepared_dir, tmp_path)
    proc = _run(
        f"""
        from pathlib import Path
        from cptrain.config_base import load_config
        from cptrain.data.prepare import PrepareConfig, prepare
        prepare(load_config(PrepareConfig, Path({str(cfg)!r}), []), progress=True)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    bar_lines = [x for x in proc.stderr.splitlines() if x.startswith("prepare email: ")]
    assert 2 <= len(bar_lines) <= 6, proc.stderr  # start, end, one per 30 s
    assert "docs=" in bar_lines[-1]


def test_cli_prepare_into_a_pipe(prepared_dir, tmp_path):
    cfg = _prepare_config(prepared_dir, tmp_path)
    proc = _piped([sys.executable, "-m", "cptrain.cli", "prepare", str(cfg)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) <= 12, proc.stderr


@pytest.mark.slow  # a fresh interpreter imports torch and trains 18 steps
def test_cptrain_train_into_a_pipe_prints_lines(prepared_dir, tmp_path):
    sys.path.insert(0, str(TESTS))
    from conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path / "run", prepared_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = _piped([sys.executable, "-m", "cptrain.cli", "train", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    bar_lines = [x for x in proc.stderr.splitlines() if " step " in x]
    assert 2 <= len(bar_lines) <= 14, proc.stderr  # start, tenths, end (+ one per 30 s)


def test_foreign_bars_print_one_line_each_where_ours_print_lines(monkeypatch) -> None:
    import contextlib
    import io

    from tqdm import tqdm

    from cptrain.progress import foreign_bars

    monkeypatch.delenv("CPTRAIN_PROGRESS", raising=False)
    log = io.StringIO()  # stderr of a job writing to a log file
    with contextlib.redirect_stderr(log), foreign_bars():
        for _ in tqdm(range(500), desc="Running requests", mininterval=0):
            pass
        print("a warning", file=sys.stderr)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2 and "Running requests" in lines[0] and "500/500" in lines[0]
    assert lines[1] == "a warning"


def test_a_bar_with_its_own_eta_prints_one_remaining_time_as_lines(clock):
    """The training bar's format has no {remaining}: its ETA is in the postfix. Piped, the
    lines keep to that: one remaining time, not tqdm's beside it."""
    from cptrain.train.hooks import ProgressBar

    out = io.StringIO()
    with progress_bar(total=10, unit="step", file=out, bar_format=ProgressBar.FORMAT) as bar:
        bar.set_postfix_str("ETA 00:05, en loss 5.0", refresh=False)
        clock.t += 1.0
        bar.update(5)
    last = out.getvalue().splitlines()[-1]
    assert "<" not in last and last.count("ETA") == 1, last


def test_a_pty_of_zero_columns_gets_lines_not_an_invisible_bar():
    import fcntl
    import os
    import pty
    import struct
    import termios

    from cptrain.progress import _isatty

    leader, follower = pty.openpty()
    try:
        stream = os.fdopen(follower, "w")
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))
        assert stream.isatty() and not _isatty(stream)
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert _isatty(stream)
        bar = progress_bar(total=3, file=stream)
        assert not isinstance(bar, LineProgress)
        bar.close()
        stream.close()
    finally:
        os.close(leader)
