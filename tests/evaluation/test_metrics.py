import math

import pytest

from cptrain.evaluation import metrics

# After en, fr, de; columns en, fr, de. Hand-computed values below.
L = [
    [2.0, 5.0, 6.0],
    [3.0, 2.5, 5.5],
    [3.5, 2.2, 1.8],
]


def test_forgetting_per_task_hand_example():
    # en: 3.5 - min(2.0, 3.0) = 1.5 ; fr: 2.2 - min(2.5) = -0.3 (backward transfer)
    f = metrics.forgetting_per_task(L)
    assert f == pytest.approx([1.5, -0.3])
    assert metrics.average_forgetting(L) == pytest.approx(0.6)


def test_retained_and_learned_hand_example():
    assert metrics.retained_loss(L) == pytest.approx((3.5 + 2.2 + 1.8) / 3)
    assert metrics.learned_loss(L) == pytest.approx((2.0 + 2.5 + 1.8) / 3)


def test_partial_matrix_mid_run():
    # after two tasks only: forgetting of en uses row 0 as the only earlier evaluation
    part = L[:2]
    assert metrics.forgetting_per_task(part) == pytest.approx([1.0])
    assert metrics.retained_loss(part) == pytest.approx((3.0 + 2.5) / 2)
    assert metrics.learned_loss(part) == pytest.approx((2.0 + 2.5) / 2)


def test_single_task_has_no_forgetting():
    assert metrics.average_forgetting([[2.0, 4.0]]) is None
    assert metrics.forgetting_per_task([[2.0, 4.0]]) == []


def test_min_over_earlier_not_just_diagonal():
    # en improved after fr (backward transfer), then got worse: forgetting counts from the best
    m = [[3.0, 9.0, 9.0], [2.0, 3.0, 9.0], [2.6, 3.0, 3.0]]
    assert metrics.forgetting_per_task(m) == pytest.approx([0.6, 0.0])


def test_union_loss_weighted():
    assert metrics.union_loss([1.0, 3.0]) == pytest.approx(2.0)
    assert metrics.union_loss([1.0, 3.0], [3, 1]) == pytest.approx(1.5)
    # equal window counts give the plain mean to the last bit (older runs' numbers stand)
    losses = [5.123456789, 6.987654321, 7.1]
    assert metrics.union_loss(losses, [48, 48, 48]) == metrics.union_loss(losses)


def test_bad_shape_rejected():
    with pytest.raises(ValueError):
        metrics.retained_loss([[1.0], [2.0]])
    assert math.isfinite(metrics.learned_loss([[1.0]]))


def test_summary_forgetting_without_periodic_evaluations_is_the_task_end_figure():
    s = metrics.summarize(L)
    assert s["forgetting"] == pytest.approx(s["forgetting_task_end"]) == pytest.approx(0.6)
    assert s["forgetting_per_task"] == pytest.approx(s["forgetting_task_end_per_task"])


# ------------------------------------------- forgetting as the paper's official code computes it
# Periodic evaluations (tasks finished, losses of en, fr, de) around L: one while en trained, one
# while fr trained (fr at 2.05, below its task-end 2.5), one while de trained.
EVALS = [
    (0, [2.4, 5.1, 6.0]),
    (1, [2.8, 2.05, 5.7]),
    (2, [3.2, 2.1, 2.0]),
]


def test_paper_code_task_end_forgetting_hand_example():
    # The official code after task i, for j <= i: best[j] - loss, 0 when j is evaluated for the
    # first time (right after its own training); averaged over the i + 1 tasks.
    # en: min(2.0, 3.0) - 3.5 = -1.5 ; fr: 2.5 - 2.2 = +0.3 ; de: 0 (first evaluation)
    assert metrics.forgetting_paper_code_per_task(L) == pytest.approx([-1.5, 0.3, 0.0])
    assert metrics.forgetting_paper_code(L) == pytest.approx(-1.2 / 3)
    # cptrain's figure on the same matrix: +0.6 over two tasks; the paper code's is -2/3 of it
    assert metrics.forgetting_paper_code(L) == pytest.approx(-2 / 3 * metrics.average_forgetting(L))
    # after two tasks: en 2.0 - 3.0 = -1.0, fr 0 -> -0.5 ; after one: 0 (as the code logs)
    assert metrics.forgetting_paper_code(L[:2]) == pytest.approx(-0.5)
    assert metrics.forgetting_paper_code([[2.0, 4.0]]) == 0.0


def test_paper_code_in_loop_forgetting_counts_evaluations_during_the_tasks_own_training():
    # best over task-end rows and every evaluation made while task j or a later one trained:
    # en: min(2.0, 3.0 | 2.4, 2.8, 3.2) - 3.5 = -1.5
    # fr: min(2.5 | 2.05, 2.1) - 2.2 = -0.15   (2.05 was measured while fr itself trained)
    # de: min(- | 2.0) - 1.8 = +0.2            (still learning: its one evaluation was higher)
    per_task = metrics.forgetting_paper_code_in_loop_per_task(L, EVALS)
    assert per_task == pytest.approx([-1.5, -0.15, 0.2])
    assert metrics.forgetting_paper_code_in_loop(L, EVALS) == pytest.approx(-1.45 / 3)
    # cptrain's history figure leaves out evaluations during the task's own training:
    # en 3.5 - 2.0 = 1.5 ; fr 2.2 - min(2.5 | 2.1) = 0.1
    assert metrics.forgetting_per_task_history(L, EVALS) == pytest.approx([1.5, 0.1])
    # without periodic evaluations the two official figures agree
    assert metrics.forgetting_paper_code_in_loop(L, []) == pytest.approx(
        metrics.forgetting_paper_code(L)
    )
    # an evaluation made after the last row (the next task training) is not before "final"
    assert metrics.forgetting_paper_code_in_loop_per_task(L[:2], [(2, [0.1, 0.1, 0.1])]) == (
        pytest.approx([-1.0, 0.0])
    )


def test_summary_gives_both_definitions_side_by_side():
    s = metrics.summarize(L, EVALS)
    assert s["forgetting_task_end"] == pytest.approx(0.6)
    assert s["forgetting"] == pytest.approx(0.8)
    assert s["forgetting_paper_code"] == pytest.approx(-0.4)  # task-end: periodic evals ignored
    assert s["forgetting_paper_code_per_task"] == pytest.approx([-1.5, 0.3, 0.0])
    assert s["forgetting_paper_code_in_loop"] == pytest.approx(-1.45 / 3)
    assert s["forgetting_paper_code_in_loop_per_task"] == pytest.approx([-1.5, -0.15, 0.2])
