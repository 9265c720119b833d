"""The CPT law's fit: schedule areas by hand, planted parameters recovered from synthetic pilot
curves, and a curve drawn without the shift term not fitted as one with it."""

import math

import numpy as np
import pytest

from cptrain.plan.law import (
    FORMS,
    Curve,
    bootstrap_fits,
    fit_law,
    leave_one_out,
    schedule_areas,
)

PLANTED = {"L0": 2.0, "A": 1.5, "S0": 0.8, "a": 0.6, "C": 0.9, "B": 0.7, "kappa": 4.0,
           "E": 6.0, "b": 0.8}


def _cosine(steps: int, peak: float, warm: int = 3, floor: float = 0.0) -> list[float]:
    out = []
    for i in range(steps):
        if i < warm:
            out.append(peak * (i + 1) / warm)
        else:
            frac = (i - warm) / max(1, steps - warm)
            out.append(floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac)))
    return out


def _pilots(form: str, params: dict[str, float], noise: float = 0.0, seed: int = 0):
    """Six pilots: α ∈ {0, 0.25, 0.5} × (a cosine, a constant lr), dense evaluations."""
    rng = np.random.default_rng(seed)
    f = FORMS[form]
    p = np.array([params[k] for k in f.params])
    curves = []
    for alpha in (0.0, 0.25, 0.5):
        for kind, peak in (("cos", 4e-3), ("const", 1.5e-3)):
            steps = 200
            lrs = _cosine(steps, peak) if kind == "cos" else [peak] * steps
            at = list(range(0, steps + 1, 10))
            s1, s2 = schedule_areas(lrs, at)
            a = np.full(s1.size, alpha)
            loss = f.fn(p, s1, s2, a, a) + rng.normal(0, noise, s1.size)
            curves.append(Curve(f"{kind}-a{alpha}", alpha, np.array(at), s1, s2, loss))
    return curves


def test_areas_by_hand():
    lrs = [1.0, 2.0, 2.0, 1.0, 0.5]
    s1, s2 = schedule_areas(lrs, [0, 1, 3, 5], decay=0.5)
    assert s1.tolist() == [0.0, 1.0, 5.0, 6.5]
    # warm-up (1 → 2) is not annealing; drops of 1 then 0.5; m = 0, 0, 0, 1, 0.5·1 + 0.5 = 1
    assert s2.tolist() == [0.0, 0.0, 0.0, 2.0]
    s1c, s2c = schedule_areas([3.0] * 4, [4])
    assert s1c[0] == 12.0 and s2c[0] == 0.0  # a constant lr never anneals


def test_areas_refuse_steps_past_the_schedule():
    with pytest.raises(ValueError, match="outside"):
        schedule_areas([1.0, 1.0], [3])


def test_fit_recovers_planted_parameters():
    curves = _pilots("wang", PLANTED)
    fit = fit_law(curves, "wang")
    assert fit.rmse < 1e-4
    # The curves are what the law must get right; the parameters it must get right are the
    # ones the planner reads off them: the shift amplitude and how replay damps it.
    for key in ("B", "kappa", "C"):
        assert fit.params[key] == pytest.approx(PLANTED[key], rel=0.05), key
    # and it predicts a setting no pilot had: α 0.4, a cosine twice as long
    lrs = _cosine(400, 3e-3)
    s1, s2 = schedule_areas(lrs, [400])
    p = np.array([PLANTED[k] for k in FORMS["wang"].params])
    truth = FORMS["wang"].fn(p, s1, s2, np.array([0.4]), np.array([0.4]))
    assert fit.predict(s1, s2, 0.4) == pytest.approx(truth, abs=2e-3)


def test_fit_with_noise_stays_close_and_bootstrap_brackets_the_truth():
    curves = _pilots("wang", PLANTED, noise=0.005, seed=1)
    fit = fit_law(curves, "wang")
    assert 0.003 < fit.rmse < 0.008
    s1, s2 = schedule_areas(_cosine(200, 3e-3), [200])
    p = np.array([PLANTED[k] for k in FORMS["wang"].params])
    truth = float(FORMS["wang"].fn(p, s1, s2, np.array([0.4]), np.array([0.4]))[0])
    preds = [float(b.predict(s1, s2, 0.4)[0]) for b in bootstrap_fits(curves, fit, 20)]
    lo, hi = np.percentile(preds, [2.5, 97.5])
    assert lo - 0.01 <= truth <= hi + 0.01 and hi - lo < 0.1


def test_a_curve_without_the_shift_term_is_not_fitted_as_one_with_it():
    no_shift = {k: PLANTED[k] for k in FORMS["no-shift"].params}
    curves = _pilots("no-shift", no_shift, noise=0.002, seed=2)
    full = fit_law(curves, "wang")
    # the shift term the full form finds is no more than noise over the pilots' range, and
    # replay does nothing: the α = 0 and α = 0.5 predictions coincide
    s1 = np.linspace(0, full.s1_max, 50)
    shift = full.predict(s1, 0 * s1, 0.0) - full.predict(s1, 0 * s1, 0.5)
    assert np.abs(shift).max() < 0.01
    # leave-one-pilot-out prefers the simpler form that drew the curves...
    assert leave_one_out(curves, "no-shift").mean_abs <= leave_one_out(curves, "wang").mean_abs
    # ...and on curves with the shift, the no-shift form misses what replay does
    shifted = _pilots("wang", PLANTED, noise=0.002, seed=3)
    assert (leave_one_out(shifted, "wang").mean_abs
            < 0.5 * leave_one_out(shifted, "no-shift").mean_abs)


def test_too_few_points_is_a_clear_error():
    c = _pilots("wang", PLANTED)[0]
    short = Curve("x", 0.0, c.steps[:3], c.s1[:3], c.s2[:3], c.loss[:3])
    with pytest.raises(ValueError, match="eval.every"):
        fit_law([short], "wang")


def test_analytic_jacobians_match_finite_differences():
    rng = np.random.default_rng(0)
    s1, s2, alpha = rng.uniform(0, 2, 20), rng.uniform(0, 0.5, 20), rng.uniform(0, 0.5, 20)
    w = 1 - alpha
    for f in FORMS.values():
        p = np.array([PLANTED[k] for k in f.params])
        numeric = np.stack([(f.fn(p + d, s1, s2, alpha, w) - f.fn(p - d, s1, s2, alpha, w))
                            / 2e-6 for d in np.eye(p.size) * 1e-6], axis=1)
        assert np.abs(f.jac(p, s1, s2, alpha, w) - numeric).max() < 1e-6, f.name
