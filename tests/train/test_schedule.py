import pytest

from cptrain.train.schedule import Schedule


def test_cosine_whole_run_no_rewarm():
    s = Schedule("cosine", peak_lr=1.0, min_lr=0.1, warmup=0.1, task_steps=[50, 50])
    assert s.lr(0) == pytest.approx(0.1)  # 10 warm-up steps, linear
    assert s.lr(9) == pytest.approx(1.0)
    # the cosine spans both tasks: no jump back up at the task boundary
    lrs = [s.lr(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_rewarm_each_task_restarts():
    s = Schedule("cosine", 1.0, 0.0, 0.1, [40, 60], rewarm_each_task=True)
    assert s.lr(39) < 0.05
    assert s.lr(40) == pytest.approx(1.0 / 6)  # first warm-up step of task 2 (6 warm-up steps)
    assert s.lr(45) == pytest.approx(1.0)


def test_wsd_holds_then_decays():
    s = Schedule("wsd", 1.0, 0.0, 0.0, [100], decay_fraction=0.2)
    assert s.lr(0) == 1.0 and s.lr(79) == 1.0
    assert s.lr(80) < 1.0
    assert s.lr(99) == pytest.approx(0.0)


def test_constant():
    s = Schedule("constant", 0.5, 0.0, 0.0, [10])
    assert {s.lr(i) for i in range(10)} == {0.5}
