"""Power-law fits recover known exponents from synthetic data, with calibrated standard errors;
the replay-versus-size comparison reads the fits correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cptrain.report.scaling import fit_groups, fit_power_law, replay_vs_size


def _noisy_power_law(rng, a, b, c=0.0, n=10, noise=0.01, lo=1e6, hi=1e10):
    x = np.geomspace(lo, hi, n)
    return x, (c + a * x**-b) * np.exp(rng.normal(0.0, noise, n))


@pytest.mark.parametrize("a,b", [(3.0, 0.12), (40.0, 0.35), (0.9, 0.05)])
def test_pure_power_law_recovers_the_exponent(a, b):
    rng = np.random.default_rng(7)
    x, y = _noisy_power_law(rng, a, b)
    fit = fit_power_law(x, y)
    assert fit.c is None
    assert fit.b == pytest.approx(b, abs=0.01)
    assert fit.a == pytest.approx(a, rel=0.2)
    assert abs(fit.b - b) < 4 * fit.b_se
    assert fit.r2_log > 0.9


def test_standard_errors_are_calibrated():
    """About 95% of ±1.96·s.e. intervals over repeated noisy data sets contain the true b."""
    rng = np.random.default_rng(0)
    hits = 0
    trials = 300
    for _ in range(trials):
        x, y = _noisy_power_law(rng, 5.0, 0.2, n=8, noise=0.05)
        fit = fit_power_law(x, y)
        hits += abs(fit.b - 0.2) < 1.96 * fit.b_se
    # t with 6 dof has heavier tails than the normal: expect ≈ 0.90; bounds leave 4σ of room.
    assert 0.84 < hits / trials < 0.98


def test_a_standard_error_is_in_original_units():
    rng = np.random.default_rng(1)
    errors, ses = [], []
    for _ in range(200):
        x, y = _noisy_power_law(rng, 5.0, 0.2, n=8, noise=0.05)
        fit = fit_power_law(x, y)
        errors.append(fit.a - 5.0)
        ses.append(fit.a_se)
    assert np.std(errors) == pytest.approx(np.mean(ses), rel=0.35)


def test_power_law_with_constant_recovers_all_three_parameters():
    rng = np.random.default_rng(3)
    x, y = _noisy_power_law(rng, 40.0, 0.25, c=1.7, n=14, noise=0.003)
    fit = fit_power_law(x, y, constant=True)
    assert fit.c == pytest.approx(1.7, abs=0.05)
    assert fit.b == pytest.approx(0.25, abs=0.03)
    assert abs(fit.b - 0.25) < 4 * fit.b_se
    assert fit.c_se is not None and fit.c_se > 0


def test_two_points_fit_exactly_without_uncertainty():
    fit = fit_power_law([1e6, 4e6], [4.0, 2.0])
    assert fit.b == pytest.approx(0.5)
    assert fit.predict(1e6) == pytest.approx(4.0)
    assert math.isnan(fit.b_se)


def test_inverse_undoes_predict():
    fit = fit_power_law([1e6, 1e7, 1e8], [5.0, 4.1, 3.3])
    for x in (3e6, 2e7):
        assert fit.inverse(float(fit.predict(x))) == pytest.approx(x, rel=1e-9)
    with_c = fit_power_law([1, 2, 4, 8, 16], [3.0, 2.5, 2.2, 2.05, 1.98], constant=True)
    assert with_c.inverse(with_c.c - 0.01) is None  # below the irreducible loss


def test_a_single_x_value_cannot_be_fitted():
    with pytest.raises(ValueError, match="distinct"):
        fit_power_law([5.0, 5.0, 5.0], [1.0, 1.1, 0.9])


def test_fit_groups_fits_only_groups_with_two_sizes():
    pts = [{"g": "a", "x": x, "y": 2 * x**-0.3} for x in (1e6, 1e7, 1e8)]
    pts += [{"g": "b", "x": 1e6, "y": 3.0}]
    fits = fit_groups(pts, "x", "y", lambda p: p["g"])
    assert set(fits) == {"a"}
    assert fits["a"].b == pytest.approx(0.3)


def _points(replay_loss):
    """Baseline loss 10·N^−0.1 at three sizes; replay α=0.25 at the smallest size."""
    pts = []
    for preset, n in (("tiny", 1e6), ("small", 4e6), ("big", 16e6)):
        for seed in (0, 1):
            pts.append({"label": "sequential", "method": "sequential", "alpha": 0.0,
                        "preset": preset, "params": n, "seed": seed,
                        "flops_per_incoming_token": 6 * n, "retained_loss": 10 * n**-0.1})
    pts.append({"label": "replay", "method": "replay", "alpha": 0.25, "preset": "tiny",
                "params": 1e6, "seed": 0, "flops_per_incoming_token": 8e6,
                "retained_loss": replay_loss})
    return pts


def test_replay_vs_size_finds_the_equivalent_model_size():
    target = 10 * (3e6) ** -0.1  # what a 3× larger baseline reaches
    (item,) = replay_vs_size(_points(target))
    assert item.equivalent_params == pytest.approx(3e6, rel=1e-6)
    assert item.loss_2x == pytest.approx(10 * (2e6) ** -0.1)
    assert item.flops_ratio == pytest.approx(8 / 6)
    assert not item.extrapolated
    text = item.sentence("retained loss", "sequential")
    assert "beats a 2× larger sequential model" in text and "≈3×" in text


def test_replay_worse_than_a_bigger_model_says_so():
    worse = 10 * (1.5e6) ** -0.1
    (item,) = replay_vs_size(_points(worse))
    assert item.equivalent_params == pytest.approx(1.5e6, rel=1e-6)
    assert "loses to a 2× larger" in item.sentence("retained loss", "sequential")


def test_with_one_size_no_claim_about_a_larger_model():
    pts = [p for p in _points(2.0) if p["preset"] in ("tiny",)]
    (item,) = replay_vs_size(pts)
    text = item.sentence("retained loss", "sequential")
    assert "did not lower" not in text and "cannot buy" not in text
    assert "trained at 1 size(s) only" in text and "cannot say what a larger model" in text


def test_when_size_does_not_help_no_equivalent_is_claimed():
    pts = _points(2.0)
    for p in pts:
        if p["label"] == "sequential":
            p["retained_loss"] = 3.0 + 1e-3 * math.log(p["params"])  # bigger is worse
    (item,) = replay_vs_size(pts)
    assert item.equivalent_params is None and item.loss_2x is None
    assert "size cannot buy this gain" in item.sentence("retained loss", "sequential")
