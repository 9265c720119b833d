"""Progress that reads well both in a terminal and in a log file.

``progress_bar()`` is a tqdm bar when its stream is a terminal. Anywhere else (CI, nohup, a
pipe, a notebook) a redrawn bar is hundreds of carriage-return updates that a log file keeps
every one of, so there it is a ``LineProgress``: the same API, printing a plain line when it
starts, at each further tenth of its total, every ``interval`` seconds, and when it closes.
``CPTRAIN_PROGRESS=bar|lines|off`` (default ``auto``) overrides the choice.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from numbers import Number
from typing import Any, TextIO, TypeAlias

from tqdm import tqdm

from cptrain.errors import ConfigError

ENV = "CPTRAIN_PROGRESS"
MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL = 30.0
STEPS = 10  # a line per tenth of the total
# Seconds between tenths' lines, at least: a bar done in a blink, or one whose total keeps
# growing (work found on the way), would otherwise print a burst of them.
MIN_GAP = 1.0

# Module-level so tests can step time without sleeping.
_now = time.monotonic

# A typo'd keyword must fail in a log file as it does in a terminal (tqdm raises for it).
_TQDM_KWARGS = frozenset(inspect.signature(tqdm.__init__).parameters) - {"self", "kwargs"}


def progress_mode() -> str:
    """CPTRAIN_PROGRESS, checked: one of MODES (``auto`` when unset or empty)."""
    raw = os.environ.get(ENV, "")
    mode = raw.strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{ENV}={raw!r} is not one of {', '.join(MODES)}")
    return mode


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    file: TextIO | None = None,
    disable: bool | None = False,
    interval: float = DEFAULT_INTERVAL,
    **tqdm_kwargs: Any,
) -> Progress:
    """A tqdm bar on ``file`` (default: sys.stderr at call time) if it is a terminal, else a
    LineProgress printing at most a line per tenth of ``total`` or per ``interval`` seconds.

    tqdm_kwargs are tqdm's (desc, total, initial, unit, unit_scale, postfix, ...); those that
    only shape a redrawn bar (dynamic_ncols, mininterval, ...) do nothing to lines.
    ``disable=True`` gives a silent tqdm; ``None`` (tqdm's "off unless a terminal") is taken as
    False, since lines are what a non-terminal gets here. CPTRAIN_PROGRESS=bar|lines|off
    forces a bar, lines or silence."""
    unknown = set(tqdm_kwargs) - _TQDM_KWARGS
    if unknown:
        raise TypeError(f"progress_bar: unknown keyword(s) {', '.join(sorted(unknown))}")
    stream = sys.stderr if file is None else file
    mode = progress_mode()
    if disable or mode == "off":
        return tqdm(iterable, file=stream, disable=True, **tqdm_kwargs)
    if mode == "bar" or (mode == "auto" and _isatty(stream)):
        return tqdm(iterable, file=stream, **tqdm_kwargs)
    return LineProgress(iterable, file=stream, interval=interval, **tqdm_kwargs)


@contextlib.contextmanager
def foreign_bars() -> Iterator[None]:
    """Other libraries' tqdm bars (lm-eval's) on stderr, as lines where ours print lines: each
    redraw ('\r' + bar) is held back and only a bar's final state is written, as one line."""
    mode = progress_mode()
    if mode == "bar" or (mode == "auto" and _isatty(sys.stderr)):
        yield
        return
    with contextlib.redirect_stderr(_BarFilter(sys.stderr, keep=mode != "off")):
        yield


class _BarFilter:
    """A stderr stand-in: text passes, tqdm redraws are held until the bar's closing newline."""

    def __init__(self, stream: TextIO, keep: bool):
        self.stream, self.keep, self.held = stream, keep, ""

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            self.held = text[1:].rstrip()
        elif text == "\n" and self.held:
            if self.keep:
                self.stream.write(self.held + "\n")
            self.held = ""
        else:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _isatty(stream: Any) -> bool:
    """A terminal a bar can be drawn on: a tty with a width (a pty of 0 columns, as some job
    runners open, would show nothing of a bar; it gets lines)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # a terminal whose size cannot be read
        return True


class LineProgress:
    """The part of tqdm's API that progress bars here use (update, set_postfix[_str],
    set_description[_str], refresh, write, close, ``with``, iteration; n, total, desc,
    postfix), printing whole lines and never a carriage return.

    A line is printed when it starts, when ``n`` enters a further tenth of ``total`` (once
    MIN_GAP seconds have passed since the last line), when ``interval`` seconds have passed
    since the last line (the only trigger without a total), and at close. refresh() and
    refresh=True only check those triggers: a log has no screen to keep current. ``total``
    may change on the way (tenths are of the current total)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        desc: str | None = None,
        total: float | None = None,
        *,
        file: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL,
        initial: float = 0,
        unit: str = "it",
        unit_scale: bool | float = False,
        unit_divisor: float = 1000,
        postfix: Any = None,
        **_bar_only: Any,
    ):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.desc = desc or ""
        self.total = total
        self.n = initial
        self.initial = initial
        self.unit, self.unit_scale, self.unit_divisor = unit, unit_scale, unit_divisor
        self.postfix = ""
        self.disable = False
        self.fp: TextIO = sys.stderr if file is None else file
        self.interval = interval
        # A bar whose format leaves tqdm's remaining time out (it shows its own ETA in the
        # postfix) must not print two remaining times as lines either.
        fmt = _bar_only.get("bar_format")
        self.show_remaining = fmt is None or "{remaining" in fmt
        self.start_t = _now()
        self._closed = False
        if isinstance(postfix, Mapping):
            self.set_postfix(refresh=False, **postfix)
        elif postfix is not None:
            self.set_postfix_str(str(postfix), refresh=False)
        self._print(self.start_t)

    def update(self, n: float = 1) -> bool:
        """Add n to the count; True if that printed a line."""
        self.n += n
        return self._maybe_print()

    def refresh(self) -> None:
        self._maybe_print()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc + ": " if desc else ""
        if refresh:
            self._maybe_print()

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""
        if refresh:
            self._maybe_print()

    def set_postfix(
        self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        """tqdm's formatting: key=value pairs, numbers shortened, keywords sorted."""
        items = dict(ordered_dict or {})
        items.update(sorted(kwargs.items()))
        self.postfix = ", ".join(f"{k}={_fmt_value(v)}" for k, v in items.items())
        if refresh:
            self._maybe_print()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        if refresh:
            self._maybe_print()

    def write(self, s: str, file: TextIO | None = None, end: str = "\n") -> None:
        out = self.fp if file is None else file
        out.write(s + end)
        out.flush()

    def close(self) -> None:
        """The final line (once; a second close does nothing, as in tqdm)."""
        if self._closed:
            return
        self._closed = True
        self._print(_now())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable is not iterable")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def _new_tenth(self) -> bool:
        # Reaching the total is the close's line, not one more line before it.
        if not self.total or self.n >= self.total:
            return False
        return int(self.n * STEPS / self.total) > int(self._last_n * STEPS / self.total)

    def _maybe_print(self) -> bool:
        if self._closed:
            return False
        now = _now()
        gap = now - self._last_t
        if gap < self.interval and (gap < MIN_GAP or not self._new_tenth()):
            return False
        self._print(now)
        return True

    def _print(self, now: float) -> None:
        self._last_t, self._last_n = now, self.n
        self.fp.write(self.line(now) + "\n")
        self.fp.flush()

    def line(self, now: float | None = None) -> str:
        """The line as it would print now: desc, n/total unit (%), [elapsed<left, rate,
        postfix]."""
        now = _now() if now is None else now
        total = self.total if self.total and self.n < self.total + 0.5 else None
        fmt = (
            "{n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}"
            + ("<{remaining}" if self.show_remaining else "") + ", {rate_fmt}"
            if total
            else "{n_fmt} {unit} [{elapsed}, {rate_fmt}"
        ) + "{postfix}]"
        body = tqdm.format_meter(
            self.n, total, now - self.start_t, unit=self.unit, unit_scale=self.unit_scale,
            unit_divisor=self.unit_divisor, postfix=self.postfix or None, bar_format=fmt,
            initial=self.initial,
        )  # fmt: skip
        prefix = self.desc if not self.desc or self.desc.endswith(": ") else self.desc + ": "
        return prefix + body


def _fmt_value(v: Any) -> str:
    return tqdm.format_num(v) if isinstance(v, Number) else str(v).strip()


Progress: TypeAlias = tqdm | LineProgress
