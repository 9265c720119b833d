import math

import pytest

from cptrain import metrics

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


def test_bad_shape_rejected():
    with pytest.raises(ValueError):
        metrics.retained_loss([[1.0], [2.0]])
    assert math.isfinite(metrics.learned_loss([[1.0]]))


def test_summary_forgetting_without_periodic_evaluations_is_the_task_end_figure():
    s = metrics.summarize(L)
    assert s["forgetting"] == pytest.approx(s["forgetting_task_end"]) == pytest.approx(0.6)
    assert s["forgetting_per_task"] == pytest.approx(s["forgetting_task_end_per_task"])
