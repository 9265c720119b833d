"""Background thread that computes replay draws ahead of the training loop.

The thread walks a plan of (step, n, task) requests in order, waits until a request's rows are
decided (is_ready) and there is room in the queue (a byte budget), computes it, and queues it.
Because each draw is a pure function of its request, taking a queued result or computing it on
the spot gives the same rows; the thread only moves the work off the critical path.

DrawCounters is the one record of what the draws did, prefetched or not: the buffer and its
Prefetcher write into the same object, so nothing is ever merged.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from cptrain.errors import CheckpointError

Request = tuple[int, int, int]  # (step, n, current_task)


class Prepared(Protocol):
    """What a draw computes (the buffer's rows, with what it knows about them): only its size
    matters here, for the byte budget."""

    @property
    def nbytes(self) -> int: ...
_JOIN_TIMEOUT_S = 60.0


@dataclass
class DrawCounters:
    """Per-run counters of a buffer's draws (ReplayBuffer.stats(), and its state_dict, so they
    continue across a resume). Updated only by the thread that calls draw()."""

    draws: int = 0
    rows_requested: int = 0
    rows_drawn: int = 0
    prefetch_waits: int = 0  # draws that waited for the thread to deliver
    prefetch_wait_s: float = 0.0
    prefetch_hits: int = 0  # draws served from the queue
    prefetch_misses: int = 0  # draws the running thread had not prepared

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_state(cls, saved: Any) -> DrawCounters:
        """Counters saved by as_dict() (in a checkpoint); CheckpointError when malformed."""
        names = [f.name for f in fields(cls)]
        if not isinstance(saved, dict) or set(saved) != set(names):
            raise CheckpointError(
                f"the checkpoint's replay counters are malformed (expected {', '.join(names)}); "
                "resume from another checkpoint"
            )
        values = {}
        for f in fields(cls):
            value, timed = saved[f.name], isinstance(f.default, float)
            kinds = (int, float) if timed else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or not value >= 0:
                raise CheckpointError(
                    f"the checkpoint's replay counter {f.name} is {value!r}, not a count; "
                    "resume from another checkpoint"
                )
            values[f.name] = float(value) if timed else value
        return cls(**values)


@dataclass
class _Item:
    request: Request
    rows: Prepared


class Prefetcher:
    def __init__(
        self,
        plan: Iterable[Request],
        compute: Callable[[int, int, int], Prepared],
        is_ready: Callable[[int], bool],
        *,
        counters: DrawCounters,
        budget_bytes: int,
        bytes_per_row: int,
        name: str,
    ) -> None:
        self._plan = iter(plan)
        self._compute = compute
        self._is_ready = is_ready
        self._budget = budget_bytes
        self._bytes_per_row = bytes_per_row
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._floor = -(1 << 62)  # the trainer has moved past steps below this
        self._current: int | None = None  # step the thread works on; None once finished
        self._stop = False
        self._error: BaseException | None = None
        self._counters = counters  # the buffer's: hits, misses and waits count there
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._current = self._floor
        self._thread.start()

    # ---- thread side ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            for request in self._plan:
                if not self._wait_turn(request):
                    break
                rows = self._compute(*request)
                with self._cond:
                    if request[0] >= self._floor and not self._stop:
                        self._queue.append(_Item(request, rows))
                        self._queued_bytes += rows.nbytes
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the training thread at its next take()
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._current = None
                self._cond.notify_all()

    def _wait_turn(self, request: Request) -> bool:
        """Block until the request may be computed; False when stopping."""
        step, n = request[0], request[1]
        need = n * self._bytes_per_row
        with self._cond:
            self._current = step
            self._cond.notify_all()
            while not self._stop and step >= self._floor:
                room = not self._queue or self._queued_bytes + need <= self._budget
                if room and self._is_ready(step):
                    break
                self._cond.wait()
            return not self._stop

    # ---- trainer side ---------------------------------------------------------------------
    def notify(self) -> None:
        """Wake the thread: more rows were decided."""
        with self._cond:
            self._cond.notify_all()

    def take(self, step: int, n: int, task: int) -> Prepared | None:
        """The queued result for this request, waiting if the thread is about to deliver it;
        None when the caller should compute it itself."""
        waited_since: float | None = None
        with self._cond:
            self._floor = step
            self._drop_before(step)
            self._cond.notify_all()
            try:
                while True:
                    if self._error is not None:
                        raise self._error
                    if self._queue:
                        item = self._queue[0]
                        if item.request[0] != step:
                            self._counters.prefetch_misses += 1
                            return None  # the plan skipped this step
                        self._queue.popleft()
                        self._queued_bytes -= item.rows.nbytes
                        self._cond.notify_all()
                        if item.request == (step, n, task):
                            self._counters.prefetch_hits += 1
                            return item.rows
                        self._counters.prefetch_misses += 1
                        return None
                    current = self._current
                    if current is None or current > step or self._stop:
                        self._counters.prefetch_misses += 1
                        return None
                    if current == step and not self._is_ready(step):
                        self._counters.prefetch_misses += 1
                        return None  # it would wait for rows the caller is not going to add
                    if waited_since is None:
                        waited_since = time.perf_counter()
                    self._cond.wait(timeout=1.0)
            finally:
                if waited_since is not None:
                    self._counters.prefetch_waits += 1
                    self._counters.prefetch_wait_s += time.perf_counter() - waited_since

    def _drop_before(self, step: int) -> None:
        while self._queue and self._queue[0].request[0] < step:
            self._queued_bytes -= self._queue.popleft().rows.nbytes

    def close(self) -> None:
        """Stop the thread and wait for it; idempotent. A draw in progress finishes first."""
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT_S)
