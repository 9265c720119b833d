"""Power-law fits of loss against compute or size, and the paper's replay-versus-size question.

``loss = a·x^(−b)`` is fitted as a straight line in log–log space (``log loss = log a − b·log x``)
by least squares, so every point weighs the same in relative error; ``loss = c + a·x^(−b)`` (an
irreducible loss ``c``) is fitted in linear space with bounds ``a > 0``, ``0 ≤ c < min(loss)``.
Both use ``scipy.optimize.curve_fit`` with ``x`` divided by its geometric mean for conditioning;
standard errors are the square roots of the covariance's diagonal (``nan`` when the fit has no
residual degrees of freedom).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


@dataclass(frozen=True)
class PowerLawFit:
    """``loss = c + a·x^(−b)`` (``c`` is None for the pure power law)."""

    a: float
    b: float
    c: float | None
    a_se: float
    b_se: float
    c_se: float | None
    n: int
    x_min: float
    x_max: float
    r2_log: float  # coefficient of determination of log(loss)

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return (self.c or 0.0) + self.a * np.power(x, -self.b)

    def inverse(self, loss: float) -> float | None:
        """The x at which the fit reaches ``loss``; None when it never does."""
        rest = loss - (self.c or 0.0)
        if rest <= 0 or self.b == 0 or self.a <= 0:
            return None
        return float((rest / self.a) ** (-1.0 / self.b))

    def formula(self, x_name: str = "x") -> str:
        """``c + a·x^−b`` with standard errors, e.g. ``(5.4 ± 0.1)·x^−(0.08 ± 0.01)``."""

        def pm(v: float, se: float) -> str:
            return f"{v:.3g} ± {se:.2g}" if math.isfinite(se) else f"{v:.3g}"

        head = f"({pm(self.c, self.c_se or math.nan)}) + " if self.c is not None else ""
        sign = "−" if self.b >= 0 else "+"  # a loss that grows with x shows a positive power
        return f"{head}({pm(self.a, self.a_se)})·{x_name}^{sign}({pm(abs(self.b), self.b_se)})"


def _clean(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    keep = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    return xa[keep], ya[keep]


def _se(pcov: np.ndarray, dof: int) -> np.ndarray:
    if dof <= 0 or not np.all(np.isfinite(pcov)):
        return np.full(pcov.shape[0], math.nan)
    return np.sqrt(np.clip(np.diag(pcov), 0.0, None))


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ly, lp = np.log(y), np.log(np.clip(pred, 1e-300, None))
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return 1.0 - float(((ly - lp) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan


def fit_power_law(x: Sequence[float], y: Sequence[float], *, constant: bool = False) -> PowerLawFit:
    """Fit ``y = a·x^(−b)`` (+ ``c`` when ``constant``); needs 2 distinct x values (3 with c)."""
    xa, ya = _clean(x, y)
    need = 3 if constant else 2
    if len(np.unique(xa)) < need:
        raise ValueError(f"need at least {need} distinct positive x values to fit, got {len(xa)}")
    ref = float(np.exp(np.log(xa).mean()))
    u = np.log(xa / ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        slope, intercept = np.polyfit(u, np.log(ya), 1)
        if not constant:
            p, pcov = curve_fit(lambda t, la, b: la - b * t, u, np.log(ya), p0=[intercept, -slope])
            se = _se(pcov, len(xa) - 2)
            log_a0, b = p
            # a = A·ref^b in the original units; its SE follows from the delta method on log a.
            log_a = log_a0 + b * math.log(ref)
            var_log_a = (
                pcov[0, 0] + math.log(ref) ** 2 * pcov[1, 1] + 2 * math.log(ref) * pcov[0, 1]
                if math.isfinite(se[0])
                else math.nan
            )
            a = math.exp(log_a)
            a_se = a * math.sqrt(var_log_a) if math.isfinite(var_log_a) else math.nan
            fit = PowerLawFit(a, float(b), None, a_se, float(se[1]), None, len(xa),
                              float(xa.min()), float(xa.max()), math.nan)
        else:
            fit = _fit_with_constant(xa, ya, ref, u)
    return _with_r2(fit, xa, ya)


def _fit_with_constant(xa: np.ndarray, ya: np.ndarray, ref: float, u: np.ndarray) -> PowerLawFit:
    def model(t: np.ndarray, amp: float, b: float, c: float) -> np.ndarray:
        return c + amp * np.exp(-b * t)

    c0 = 0.5 * float(ya.min())
    slope, intercept = np.polyfit(u, np.log(ya - c0), 1)
    p0 = [math.exp(intercept), max(-slope, 1e-3), c0]
    upper_c = float(ya.min()) * (1 - 1e-9)
    p, pcov = curve_fit(
        model, u, ya, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, upper_c]), maxfev=20000
    )
    se = _se(pcov, len(xa) - 3)
    amp, b, c = (float(v) for v in p)
    scale = ref**b  # a·x^−b = amp·(x/ref)^−b  ⇒  a = amp·ref^b
    a = amp * scale
    # Delta method: ∂a/∂amp = ref^b, ∂a/∂b = a·ln(ref).
    grad = np.array([scale, a * math.log(ref)])
    var_a = float(grad @ pcov[:2, :2] @ grad) if math.isfinite(se[0]) else math.nan
    a_se = math.sqrt(var_a) if var_a >= 0 else math.nan
    return PowerLawFit(a, b, c, a_se, float(se[1]), float(se[2]), len(xa),
                       float(xa.min()), float(xa.max()), math.nan)


def _with_r2(fit: PowerLawFit, xa: np.ndarray, ya: np.ndarray) -> PowerLawFit:
    pred = np.asarray(fit.predict(xa), dtype=np.float64)
    return PowerLawFit(**{**fit.__dict__, "r2_log": _r2(ya, pred)})


def fit_groups(
    points: Iterable[dict[str, Any]],
    x_key: str,
    y_key: str,
    group: Callable[[dict[str, Any]], Hashable],
    *,
    constant: bool = False,
) -> dict[Hashable, PowerLawFit]:
    """One fit per group of points that has enough distinct x values; others are skipped."""
    by: dict[Hashable, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        if p.get(x_key) is not None and p.get(y_key) is not None:
            by[group(p)].append(p)
    fits = {}
    for key, pts in by.items():
        try:
            fits[key] = fit_power_law(
                [p[x_key] for p in pts], [p[y_key] for p in pts], constant=constant
            )
        except (ValueError, RuntimeError):
            continue  # too few sizes, or no convergence: the report says there is no fit
    return fits


def _mean_by(points: Iterable[dict[str, Any]], keys: tuple[str, ...], y: str) -> dict[Any, float]:
    acc: dict[Any, list[float]] = defaultdict(list)
    for p in points:
        if p.get(y) is not None:
            acc[tuple(p.get(k, "") for k in keys)].append(float(p[y]))
    return {k: float(np.mean(v)) for k, v in acc.items()}


@dataclass(frozen=True)
class ReplayVsSize:
    """One replay setting at one size, set against the size-scaling fit of the baseline."""

    label: str
    alpha: float
    preset: str
    params: float
    loss: float
    baseline_loss: float | None  # the baseline at the same size
    flops_ratio: float  # replay's FLOPs per incoming token / the baseline's at the same size
    equivalent_params: float | None  # baseline size that the fit says reaches the same loss
    loss_2x: float | None  # the fit's loss for a baseline twice as large
    extrapolated: bool
    baseline_sizes: int = 2  # how many sizes of the baseline were trained
    variant: str = ""  # the settings that keep it apart from other runs of its label

    def sentence(self, metric: str, baseline: str) -> str:
        name = f"{self.label} α={self.alpha:g}{self.variant} on {self.preset}"
        cost = f"{self.flops_ratio:.2f}× the FLOPs per incoming token"
        if self.baseline_sizes < 2:
            # No larger model was trained: nothing is known about what size would buy.
            return (
                f"{name} reaches {metric} {self.loss:.3f} for {cost}; {baseline} was trained at "
                f"{self.baseline_sizes or 'no'} size(s) only, so this cannot say what a larger "
                "model would buy (train two sizes to ask)."
            )
        if self.loss_2x is None or self.equivalent_params is None:
            return (
                f"{name} reaches {metric} {self.loss:.3f} for {cost}; a larger {baseline} model "
                f"did not lower {metric} at this budget, so size cannot buy this gain here."
            )
        ratio = self.equivalent_params / self.params
        verdict = "beats" if self.loss < self.loss_2x else "loses to"
        extra = " (extrapolated beyond the sizes trained)" if self.extrapolated else ""
        return (
            f"At this budget, {name} ({cost}) {verdict} a 2× larger {baseline} model by "
            f"{abs(self.loss_2x - self.loss):.3f} in {metric} ({self.loss:.3f} vs "
            f"{self.loss_2x:.3f}); {baseline} training would need ≈{ratio:.2g}× the parameters "
            f"to match it{extra}."
        )


def replay_vs_size(
    points: Sequence[dict[str, Any]], y_key: str = "retained_loss", baseline: str = "sequential"
) -> list[ReplayVsSize]:
    """Is compute better spent on replay or on a bigger model?

    ``points`` are runs with keys label, alpha, preset, params, flops_per_incoming_token and
    ``y_key``. The baseline (α = 0 runs labelled ``baseline``) is fitted ``y = a·N^(−b)`` over
    its sizes; every replay run (α > 0) is placed against that fit.
    """
    base_pts = [p for p in points if p["label"] == baseline and not p["alpha"]]
    fits = fit_groups(base_pts, "params", y_key, lambda p: 0)
    size_fit = fits.get(0)
    # A fit whose loss grows with size cannot say how much size would buy.
    usable = size_fit is not None and size_fit.b > 0
    keys = ("label", "alpha", "preset", "variant")  # settings of one label are never pooled
    means = _mean_by(points, keys, y_key)
    params = _mean_by(points, keys, "params")
    flops = _mean_by(points, keys, "flops_per_incoming_token")
    base_variants = {p.get("variant", "") for p in base_pts}
    out = []
    for key, loss in sorted(means.items(), key=lambda kv: (params[kv[0]], str(kv[0]))):
        label, alpha, preset, variant = key
        if not alpha:
            continue
        base_key = (baseline, 0.0, preset, next(iter(base_variants)) if base_variants else "")
        n = params[key]
        base_flops = flops.get(base_key)
        ratio = flops[key] / base_flops if base_flops else 1 / (1 - alpha)
        eq = loss_2x = None
        extrapolated = False
        if usable and size_fit is not None:
            eq = size_fit.inverse(loss)
            loss_2x = float(size_fit.predict(2 * n))
            inside = [v is not None and size_fit.x_min <= v <= size_fit.x_max for v in (eq, 2 * n)]
            extrapolated = not all(inside)
        out.append(
            ReplayVsSize(label, alpha, preset, n, loss, means.get(base_key), ratio, eq, loss_2x,
                         extrapolated, len({p["params"] for p in base_pts}), variant)
        )
    return out
