"""The continual pre-training law: validation loss as a function of the learning-rate schedule
and the replay ratio, fitted on whole pilot loss curves (pure numpy / scipy).

Wang et al., *Learning Dynamics in Continual Pre-Training for LLMs* (arXiv 2505.07796) predict
a domain's validation loss during continued training from the schedule's forward area
``S1 = Σ η`` and annealing area ``S2`` (``m_i = λ·m_{i−1} + (η_{i−1} − η_i)``, ``S2 = Σ m``,
λ = 0.999), plus a distribution-shift term:

    L = L0 + A·(S0 + S1)^(−a) − C·S2 + B(α)·(1 − (1 + E·S1)^(−b))

``S1`` and ``S2`` count the continued training only. A released model's pre-training schedule is
unknown, so its forward area is the fitted constant ``S0`` and its annealing area is folded into
``L0`` (a constant over the continued training); a start trained here is treated the same way,
so both starts share one fit. Replay enters through the shift amplitude ``B(α) = B·e^(−κα)``
(the form ``wang``); ``no-shift`` drops the shift term (for the test that a curve without one is
not fitted as one with it, and as the simpler candidate the planner compares by leave-one-pilot-
out error). ``mix`` extends ``wang`` where the measurements asked for it (README, "How much
replay do I need?"): the power term counts only the forward area spent on the task's own
domain, ``A·(S0 + w·S1)^(−a)`` with ``w`` its share of each batch (α for an old domain that
replay draws from, 1 − α for the new one), so replaying a start that is still learning its
old domain trains it further. Each task (old or new) gets its own parameters; ``B`` is free in
sign (the old domain's loss rises, the new one's falls).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

ANNEAL_DECAY = 0.999  # λ of the annealing area's momentum (Tissue et al.; Wang et al.)


def schedule_areas(
    lrs: Sequence[float], at: Sequence[int], decay: float = ANNEAL_DECAY
) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after ``t`` optimizer steps for each ``t`` in ``at`` (step ``i`` used
    ``lrs[i]``). The warm-up ramp is no annealing: before the first peak the lr counts as that
    peak in S2 (a rising lr would otherwise read as negative annealing)."""
    eta = np.asarray(lrs, dtype=np.float64)
    if eta.size == 0:
        z = np.zeros(len(at))
        return z, z.copy()
    peak = int(np.argmax(eta >= eta.max() * (1 - 1e-9)))  # first step at the peak
    flat = eta.copy()
    flat[:peak] = eta[peak]
    s1 = np.concatenate([[0.0], np.cumsum(eta)])
    drops = np.concatenate([[0.0], flat[:-1] - flat[1:]])  # η_{i−1} − η_i
    m = np.zeros_like(flat)
    acc = 0.0
    for i, d in enumerate(drops):
        acc = decay * acc + d
        m[i] = acc
    s2 = np.concatenate([[0.0], np.cumsum(m)])
    idx = np.asarray(at, dtype=int)
    if idx.size and (idx.min() < 0 or idx.max() > eta.size):
        raise ValueError(f"steps {idx.min()}..{idx.max()} outside a {eta.size}-step schedule")
    return s1[idx], s2[idx]


@dataclass(frozen=True)
class Curve:
    """One run's measured losses on one task, after ``steps`` optimizer steps of continued
    training at replay ratio ``alpha`` (``s1``, ``s2``: the schedule's areas there)."""

    name: str
    alpha: float
    steps: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    loss: np.ndarray
    share: float | None = None  # of each batch from this task's domain (default: α, an old one)

    @property
    def w(self) -> float:
        return self.alpha if self.share is None else self.share


# (params, S1, S2, α, the task's share w of each batch) → loss (or its Jacobian)
Fn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LawForm:
    name: str
    params: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    fn: Fn
    jac: Fn  # ∂fn/∂params, one column per parameter (a tenth of finite differences' cost)


def _shift(p: np.ndarray, s1: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    b_, kappa, e, b = p[5:]
    return b_ * np.exp(-kappa * alpha) * (1 - np.power(1 + e * s1, -b))


def _power(p: np.ndarray, x: np.ndarray, s2: np.ndarray) -> np.ndarray:
    l0, a_, s0, a, c = p[:5]
    return l0 + a_ * np.power(s0 + x, -a) - c * s2


def _no_shift(p: np.ndarray, s1: np.ndarray, s2: np.ndarray, alpha: np.ndarray,
              w: np.ndarray) -> np.ndarray:
    return _power(p, s1, s2)


def _wang(p: np.ndarray, s1: np.ndarray, s2: np.ndarray, alpha: np.ndarray,
          w: np.ndarray) -> np.ndarray:
    return _power(p, s1, s2) + _shift(p, s1, alpha)


def _mix(p: np.ndarray, s1: np.ndarray, s2: np.ndarray, alpha: np.ndarray,
         w: np.ndarray) -> np.ndarray:
    return _power(p, w * s1, s2) + _shift(p, s1, alpha)


def _power_jac(p: np.ndarray, x: np.ndarray, s2: np.ndarray) -> np.ndarray:
    _, a_, s0, a, _ = p[:5]
    y = s0 + x
    pw = np.power(y, -a)
    return np.stack([np.ones_like(x), pw, -a * a_ * pw / y, -a_ * pw * np.log(y), -s2], axis=1)


def _shift_jac(p: np.ndarray, s1: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    b_, kappa, e, b = p[5:]
    damp = np.exp(-kappa * alpha)
    y = 1 + e * s1
    u = np.power(y, -b)
    return np.stack([damp * (1 - u), -alpha * b_ * damp * (1 - u),
                     b_ * damp * b * s1 * u / y, b_ * damp * u * np.log(y)], axis=1)


def _no_shift_jac(p: np.ndarray, s1: np.ndarray, s2: np.ndarray, alpha: np.ndarray,
                  w: np.ndarray) -> np.ndarray:
    return _power_jac(p, s1, s2)


def _wang_jac(p: np.ndarray, s1: np.ndarray, s2: np.ndarray, alpha: np.ndarray,
              w: np.ndarray) -> np.ndarray:
    return np.concatenate([_power_jac(p, s1, s2), _shift_jac(p, s1, alpha)], axis=1)


def _mix_jac(p: np.ndarray, s1: np.ndarray, s2: np.ndarray, alpha: np.ndarray,
             w: np.ndarray) -> np.ndarray:
    return np.concatenate([_power_jac(p, w * s1, s2), _shift_jac(p, s1, alpha)], axis=1)


_INF = math.inf
# (name, lower, upper) of the power part, then of the shift part
_POWER = (("L0", -_INF, _INF), ("A", 0.0, _INF), ("S0", 1e-6, 1e6), ("a", 1e-3, 4.0),
          ("C", -_INF, _INF))
_SHIFT = (("B", -_INF, _INF), ("kappa", -20.0, 20.0), ("E", 1e-4, 1e4), ("b", 0.05, 4.0))


def _form(name: str, parts: tuple[tuple[str, float, float], ...], fn: Fn, jac: Fn) -> LawForm:
    names, lower, upper = zip(*parts, strict=True)
    return LawForm(name, names, lower, upper, fn, jac)


FORMS: dict[str, LawForm] = {
    "wang": _form("wang", _POWER + _SHIFT, _wang, _wang_jac),
    "mix": _form("mix", _POWER + _SHIFT, _mix, _mix_jac),
    "no-shift": _form("no-shift", _POWER, _no_shift, _no_shift_jac),
}


@dataclass(frozen=True)
class LawFit:
    """Fitted parameters of one form on one task's curves."""

    form: str
    params: dict[str, float]
    rmse: float
    points: int
    s1_max: float  # the largest forward area the fit saw (beyond it: extrapolation)
    alphas: tuple[float, ...] = field(default=())

    def predict(
        self, s1: np.ndarray | float, s2: np.ndarray | float, alpha: np.ndarray | float,
        share: np.ndarray | float | None = None,
    ) -> np.ndarray:
        """The loss at these areas and replay ratio; ``share``: the task's share of each batch
        (default α: an old domain's)."""
        f = FORMS[self.form]
        p = np.array([self.params[k] for k in f.params])
        w = alpha if share is None else share
        return f.fn(p, *np.broadcast_arrays(np.asarray(s1, float), np.asarray(s2, float),
                                            np.asarray(alpha, float), np.asarray(w, float)))


def _stack(curves: Sequence[Curve]) -> tuple[np.ndarray, ...]:
    s1 = np.concatenate([c.s1 for c in curves])
    s2 = np.concatenate([c.s2 for c in curves])
    alpha = np.concatenate([np.full(c.loss.size, c.alpha) for c in curves])
    w = np.concatenate([np.full(c.loss.size, c.w) for c in curves])
    loss = np.concatenate([c.loss for c in curves])
    return s1, s2, alpha, w, loss


def _starts(form: LawForm, loss: np.ndarray, s1_max: float) -> list[np.ndarray]:
    """A few starting points across the exponents' plausible range: the power terms make the
    least-squares surface multimodal, and one start lands in the wrong basin often enough."""
    lo = float(loss.min())
    span = max(float(loss.max() - lo), 1e-3)
    scale = max(s1_max, 1e-6)
    out = []
    for a, s0 in ((0.5, scale), (1.0, 0.1 * scale), (0.3, 10 * scale)):
        base = [lo - 0.1 * span, span * s0**a, s0, a, 0.0]
        if len(form.params) == 5:
            out.append(np.array(base))
            continue
        for sign in (1.0, -1.0):
            out.append(np.array([*base, sign * 0.5 * span, 0.0, 1.0 / scale, 1.0]))
    return out


def fit_law(
    curves: Sequence[Curve], form: str = "wang", start: LawFit | None = None
) -> LawFit:
    """Least squares over every point of every curve (scipy ``least_squares``, trust-region
    reflective within the form's bounds), the best of several starts (or one, ``start``:
    a previous fit, for bootstrap refits)."""
    f = FORMS[form]
    s1, s2, alpha, w, loss = _stack(curves)
    if loss.size < len(f.params) + 1:
        raise ValueError(f"{loss.size} points cannot fit the {len(f.params)} parameters of "
                         f"the {form} law; evaluate the pilots more often (eval.every)")
    s1_max = float(s1.max())
    lower, upper = np.array(f.lower), np.array(f.upper)
    starts = ([np.array([start.params[k] for k in f.params])] if start is not None
              else _starts(f, loss, s1_max))
    best = None
    for p0 in starts:
        p0 = np.clip(p0, lower, upper)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = least_squares(
                lambda p: f.fn(p, s1, s2, alpha, w) - loss, p0,
                jac=lambda p: f.jac(p, s1, s2, alpha, w), bounds=(lower, upper),
                x_scale="jac", max_nfev=2000,
            )
        if np.all(np.isfinite(res.fun)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise ValueError(f"the {form} law could not be fitted (no finite solution)")
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    return LawFit(form, dict(zip(f.params, map(float, best.x), strict=True)), rmse, int(loss.size),
                  s1_max, tuple(sorted({c.alpha for c in curves})))


@dataclass(frozen=True)
class LeaveOneOut:
    """Each pilot predicted by a fit on the others: mean absolute error over its points and the
    absolute error of its last point."""

    form: str
    per_curve: dict[str, tuple[float, float]]

    @property
    def mean_abs(self) -> float:
        return float(np.mean([v[0] for v in self.per_curve.values()]))

    @property
    def final_abs(self) -> float:
        return float(np.mean([v[1] for v in self.per_curve.values()]))


def leave_one_out(curves: Sequence[Curve], form: str, full: LawFit | None = None) -> LeaveOneOut:
    """Each refit starts from the fit on all curves (``full``, fitted here when not given):
    a refit from several cold starts would cost ten times as much, and the start only picks
    the basin; the held-out points never enter the refit itself."""
    full = full or fit_law(curves, form)
    out = {}
    for i, held in enumerate(curves):
        rest = [c for j, c in enumerate(curves) if j != i]
        try:
            fit = fit_law(rest, form, start=full)
        except ValueError:
            out[held.name] = (math.nan, math.nan)
            continue
        err = np.abs(fit.predict(held.s1, held.s2, held.alpha, held.w) - held.loss)
        out[held.name] = (float(err.mean()), float(err[-1]))
    return LeaveOneOut(form, out)


def bootstrap_fits(
    curves: Sequence[Curve], fit: LawFit, n: int, seed: int = 0
) -> list[LawFit]:
    """Refits on pilots resampled with replacement (a case bootstrap over whole curves: the
    points of one curve are not independent), each started from ``fit``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pick = rng.integers(0, len(curves), len(curves))
        try:
            out.append(fit_law([curves[i] for i in pick], fit.form, start=fit))
        except ValueError:
            continue
    return out
