"""Plain-text tables of loss matrices and metrics for the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def loss_matrix_table(
    tasks: Sequence[str],
    matrix: Sequence[Sequence[float]],
    *,
    eval_only: Sequence[str] = (),
    before: Mapping[str, float] | None = None,
) -> str:
    """Rows: ``before`` (the starting model, when given) then after each trained task;
    columns: the trained tasks, then the evaluation-only ones (marked ``*``)."""
    columns = [*tasks, *(f"{t}*" for t in eval_only)]
    width = max([8, *(len(t) + 2 for t in columns)])
    label_w = max([12, *(len(t) + 2 for t in tasks)])
    lines = ["after \\ on".ljust(label_w) + "".join(t.rjust(width) for t in columns)]
    if before:
        cells = [before.get(t) for t in (*tasks, *eval_only)]
        lines.append("before".ljust(label_w) + "".join(_fmt(v).rjust(width) for v in cells))
    for i, row in enumerate(matrix):
        lines.append(tasks[i].ljust(label_w) + "".join(_fmt(v).rjust(width) for v in row))
    if eval_only:
        lines.append("(* evaluation only: never trained)")
    return "\n".join(lines)


def metrics_line(summary: Mapping[str, Any]) -> str:
    line = (
        f"forgetting {_fmt(summary.get('forgetting'), signed=True)}  "
        f"retained {_fmt(summary.get('retained_loss'))}  "
        f"learned {_fmt(summary.get('learned_loss'))}"
    )
    for task, f in (summary.get("eval_only_forgetting") or {}).items():
        line += f"  {task} forgetting (final − before) {_fmt(f, signed=True)}"
    return line


def run_report(summary: Mapping[str, Any], title: str | None = None) -> str:
    parts = []
    if title:
        parts.append(title)
    parts.append(
        loss_matrix_table(
            summary["tasks"],
            summary["loss_matrix"],
            eval_only=summary.get("eval_only") or (),
            before=summary.get("loss_before") or None,
        )
    )
    parts.append(metrics_line(summary))
    if not summary.get("complete", True):
        parts.append("(incomplete run: rows so far)")
    return "\n".join(parts)


def comparison_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One line per method: forgetting, retained, learned, the first task's loss right after it
    and at the end, and the mean gradient-alignment cosine (when diagnostics ran)."""
    name_w = max([10, *(len(n) + 2 for n, _ in rows)])
    first = rows[0][1]["tasks"][0] if rows else "task0"
    head = (
        "method".ljust(name_w)
        + "forgetting".rjust(12)
        + "retained".rjust(10)
        + "learned".rjust(10)
        + f"{first} start→end".rjust(20)
        + "grad cos".rjust(10)
    )
    lines = [head]
    for name, s in rows:
        lm = s["loss_matrix"]
        trip = f"{lm[0][0]:.3f}→{lm[-1][0]:.3f}" if lm else "–"
        lines.append(
            name.ljust(name_w)
            + _fmt(s.get("forgetting"), signed=True).rjust(12)
            + _fmt(s.get("retained_loss")).rjust(10)
            + _fmt(s.get("learned_loss")).rjust(10)
            + trip.rjust(20)
            + _fmt(s.get("grad_cos_mean"), signed=True).rjust(10)
        )
    return "\n".join(lines)
