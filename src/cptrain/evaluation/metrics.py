"""Continual-learning metrics over a loss matrix.

``L[i][j]`` is the validation loss on task ``j`` measured after training task ``i`` (row ``i``
= after task ``i``). Lower loss is better, so forgetting is positive when a loss went *up*.

Forgetting comes in two readings. The task-end one (``forgetting_per_task``) compares the final
row with the earlier rows of the matrix only. The history one (``forgetting_per_task_history``,
what summaries call ``forgetting``) also counts the periodic evaluations (``eval.every``) made
after a task was trained: a task whose loss dipped between two task ends would otherwise look
as if it had forgotten less than it did.

cptrain's forgetting and the paper's official code's, side by side (``n`` = rows of the
matrix, ``last = n − 1`` the final row; ``E_j`` the periodic evaluations of task ``j``)::

                     cptrain                             official code (Abbes et al.)
    key              forgetting_task_end                 forgetting_paper_code
                     (forgetting: + periodic evals)      (forgetting_paper_code_in_loop)
    per task j       L[last][j] − best_j                 best_j − L[last][j]
    sign             + = forgot (loss went up)           − = forgot (+ = loss went down)
    best_j           min L[k][j], j ≤ k < last           task-end: min L[k][j], j ≤ k < last
                     (+ E_j made while a later task      in-loop: the same, + E_j made while
                     trained, for ``forgetting``)        task j itself or any later one trained
    the last task    left out (nothing to forget)        counted, as 0 (task-end: its first
                                                         evaluation; in-loop: 0 unless E_j)
    averaged over    the n − 1 earlier tasks             all n tasks

So after n tasks, ``forgetting_paper_code = −(n − 1)/n · forgetting_task_end`` (−2/3 of it
after three tasks). ``forgetting_paper_code`` is the official code's task-end figure
(``training_new_replay.py``: after task i, for every j ≤ i, ``best[j] − loss`` with 0 the
first time task j is evaluated, right after its own training, then ``best[j]`` lowered to the
loss; logged as ``forgetting/average_forgetting``). Its in-loop figure (logged as
``average_forgetting`` at checkpoints every 500 iterations and at task ends) keeps a second
``best`` that evaluations made *during* task j's own training also lower (a dip below the
task-end loss while task j trained counts against it), and the task being trained at the end
enters with min(its evaluations during its training) − its final loss, usually > 0 (it was
still learning). ``forgetting_paper_code_in_loop`` computes it with cptrain's periodic
evaluations in place of the official checkpoints (without ``eval.every`` it equals
``forgetting_paper_code``). Both read cptrain's evaluation sets (held-out windows of each
task), where the official code evaluates each task's test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_matrix(loss_matrix: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(loss_matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[0] > m.shape[1]:
        raise ValueError(f"loss matrix must be [rows <= tasks] 2-D, got shape {m.shape}")
    return m


def forgetting_per_task(loss_matrix: Sequence[Sequence[float]]) -> list[float]:
    """F_j = L_j(now) − min over earlier evaluations of L_j, for every task j before the last row.

    "Earlier" means the rows from the one right after task j was trained up to (not including)
    the last row; a task trained in the last row has no earlier evaluation and is omitted.
    """
    m = _as_matrix(loss_matrix)
    last = m.shape[0] - 1
    return [float(m[last, j] - m[j:last, j].min()) for j in range(last)]


def average_forgetting(loss_matrix: Sequence[Sequence[float]]) -> float | None:
    """Mean forgetting over tasks before the last; None with a single row (nothing to forget)."""
    f = forgetting_per_task(loss_matrix)
    return float(np.mean(f)) if f else None


# A periodic evaluation: (tasks finished when it was measured, loss per loss-matrix column).
Evaluation = tuple[int, Sequence[float]]


def evaluations_from_history(history: Sequence[dict[str, Any]]) -> list[Evaluation]:
    """(tasks finished, losses) of each periodic evaluation in a trainer state's
    ``eval_history``, as the forgetting functions take them."""
    return [(int(e["tasks_done"]), list(e["losses"])) for e in history]


def forgetting_per_task_history(
    loss_matrix: Sequence[Sequence[float]], evaluations: Sequence[Evaluation]
) -> list[float]:
    """F_j = L_j(final) − the best L_j of every evaluation at or after the end of task j's
    training and before the final one, for every task j before the last row.

    "Final" is the last loss-matrix row. The evaluations counted for task j are the task-end
    rows j … last − 1 and each periodic evaluation made while a later task, up to the last
    row's, was being trained (``j < tasks finished ≤ last``); evaluations made during or before
    task j's own training, and those after the final row, are not. Without periodic
    evaluations this is ``forgetting_per_task``.
    """
    m = _as_matrix(loss_matrix)
    last = m.shape[0] - 1
    out = []
    for j in range(last):
        best = float(m[j:last, j].min())
        for done, losses in evaluations:
            if j < done <= last:
                best = min(best, float(losses[j]))
        out.append(float(m[last, j] - best))
    return out


def average_forgetting_history(
    loss_matrix: Sequence[Sequence[float]], evaluations: Sequence[Evaluation]
) -> float | None:
    """Mean of ``forgetting_per_task_history``; None with a single row."""
    f = forgetting_per_task_history(loss_matrix, evaluations)
    return float(np.mean(f)) if f else None


def forgetting_paper_code_per_task(loss_matrix: Sequence[Sequence[float]]) -> list[float]:
    """The official code's task-end forgetting of every task trained so far, after the last row:
    F_j = min over rows j … last − 1 of L_j − L_j(last row), and 0 for the task of the last
    row (evaluated there for the first time). Opposite sign to ``forgetting_per_task``:
    negative = forgot. The in-loop figure without periodic evaluations."""
    return forgetting_paper_code_in_loop_per_task(loss_matrix, ())


def forgetting_paper_code(loss_matrix: Sequence[Sequence[float]]) -> float:
    """Mean of ``forgetting_paper_code_per_task`` over all tasks trained so far, the last one's
    0 included: what the official code logs as ``forgetting/average_forgetting`` after the
    last row's task (0.0 after the first task, as it logs)."""
    return float(np.mean(forgetting_paper_code_per_task(loss_matrix)))


def forgetting_paper_code_in_loop_per_task(
    loss_matrix: Sequence[Sequence[float]], evaluations: Sequence[Evaluation]
) -> list[float]:
    """The official code's in-loop forgetting at the last row, every task trained so far:
    F_j = best_j − L_j(last row), where best_j is the lowest L_j of the task-end rows
    j … last − 1 and of every periodic evaluation made while task j itself or a later task,
    up to the last row's, trained (``j ≤ tasks finished ≤ last``); 0 when there is none (the
    last row's task without periodic evaluations). Negative = forgot."""
    m = _as_matrix(loss_matrix)
    last = m.shape[0] - 1
    out = []
    for j in range(last + 1):
        seen = [float(x) for x in m[j:last, j]]
        seen += [float(losses[j]) for done, losses in evaluations if j <= done <= last]
        out.append(min(seen) - float(m[last, j]) if seen else 0.0)
    return out


def forgetting_paper_code_in_loop(
    loss_matrix: Sequence[Sequence[float]], evaluations: Sequence[Evaluation]
) -> float:
    """Mean of ``forgetting_paper_code_in_loop_per_task`` over all tasks trained so far: the
    official code's ``average_forgetting`` at its checkpoint on the last row's step."""
    return float(np.mean(forgetting_paper_code_in_loop_per_task(loss_matrix, evaluations)))


def retained_loss(loss_matrix: Sequence[Sequence[float]]) -> float:
    """Mean final loss over all tasks trained so far (last row, columns up to the row index)."""
    m = _as_matrix(loss_matrix)
    last = m.shape[0] - 1
    return float(m[last, : last + 1].mean())


def learned_loss(loss_matrix: Sequence[Sequence[float]]) -> float:
    """Mean loss on task j right after training task j (the diagonal)."""
    m = _as_matrix(loss_matrix)
    return float(np.mean([m[j, j] for j in range(m.shape[0])]))


def union_loss(task_losses: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Loss on the union of all tasks' validation sets: a token-weighted mean of per-task losses
    (``weights``: the windows each loss averages; equal or none, the plain mean)."""
    losses = np.asarray(task_losses, dtype=np.float64)
    equal = weights is None or len(set(weights)) <= 1  # the plain mean, to the last bit
    w = np.ones_like(losses) if equal else np.asarray(weights, dtype=np.float64)
    return float((losses * w).sum() / w.sum())


def forgetting_since_start(
    loss_matrix: Sequence[Sequence[float]],
    before: Sequence[float],
    tasks: Sequence[str],
    eval_only: Sequence[str],
) -> dict[str, float]:
    """Forgetting of each evaluation-only task: final loss − loss of the starting model
    (positive = forgot). Its columns follow the trained tasks' in the matrix and in ``before``."""
    m = _as_matrix(loss_matrix)
    first = len(tasks)
    return {name: float(m[-1, first + k] - before[first + k]) for k, name in enumerate(eval_only)}


def summarize(
    loss_matrix: Sequence[Sequence[float]], evaluations: Sequence[Evaluation] = ()
) -> dict[str, object]:
    """The summary's metrics: ``forgetting`` over every evaluation (the loss matrix and
    ``evaluations``), ``forgetting_task_end`` over the loss matrix alone, and the official
    code's two forgetting figures (opposite sign, all tasks averaged: module docstring)."""
    return {
        "forgetting": average_forgetting_history(loss_matrix, evaluations),
        "forgetting_per_task": forgetting_per_task_history(loss_matrix, evaluations),
        "forgetting_task_end": average_forgetting(loss_matrix),
        "forgetting_task_end_per_task": forgetting_per_task(loss_matrix),
        "forgetting_paper_code": forgetting_paper_code(loss_matrix),
        "forgetting_paper_code_per_task": forgetting_paper_code_per_task(loss_matrix),
        "forgetting_paper_code_in_loop": forgetting_paper_code_in_loop(loss_matrix, evaluations),
        "forgetting_paper_code_in_loop_per_task": forgetting_paper_code_in_loop_per_task(
            loss_matrix, evaluations
        ),
        "retained_loss": retained_loss(loss_matrix),
        "learned_loss": learned_loss(loss_matrix),
    }
