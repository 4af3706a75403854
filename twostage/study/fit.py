"""Fit the compute law L(C) = L_min + exp(lambda) * C^alpha (CRT arXiv:2412.16326; docs/methods.md (5.4), intervals §9) to one tokenizer's runs.

The fit is least squares on log L, i.e. on relative errors: the runs of a sweep span decades of
compute and the reducible part L - L_min shrinks by orders of magnitude, so absolute errors would let
the cheapest runs dominate. L_min is constrained to [0, min(L)): the law approaches L_min from above,
so a floor above an observed value contradicts that run, and a negative floor has no meaning for a
loss or an FD.

Compute is used as log C centred on the mean of the fitted points (the raw 1e12..1e20 FLOP values make
exp(lambda) * C^alpha badly conditioned); lambda is reported for C in FLOPs as the table records it.

Two 95% confidence intervals are computed for every parameter:
- "cov": Wald intervals from the Gauss-Newton covariance s^2 (J^T J)^-1 with Student-t quantiles
  (n - p degrees of freedom); the L_min interval is clipped to its feasible range [0, min L).
- "bootstrap": seeded residual bootstrap in log space (residuals rescaled by sqrt(n / (n - p)) so that
  small samples do not understate the noise), percentile intervals.
`FitResult.primary_ci` picks the one to show: "cov", unless L_min sits at its upper bound (there the
linearisation behind Wald intervals fails) or the covariance is degenerate; then "bootstrap".
Why cov first: on 40 synthetic 9-point sweeps with 1% noise, all three Wald intervals together
covered the truth 38 times, the bootstrap percentile intervals only 34 times (percentile intervals
are known to be too narrow for so few points).

Too few points yields a FitResult with status "insufficient" and a message, never an exception:
a 3-parameter law needs at least 4 distinct compute values (3 to pin it down plus one degree of
freedom for an error estimate), a law with fixed L_min needs 3.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import optimize, stats

__all__ = ["FitResult", "fit_law", "law", "PARAMS"]

PARAMS = ("alpha", "lambda", "l_min")
CI_LEVEL = 0.95
# L_min stays this far below min(L) so that log(L - L_min) of the best point stays finite.
_UPPER_MARGIN = 1e-6


def law(compute: np.ndarray | float, alpha: float, lam: float, l_min: float) -> np.ndarray:
    """L(C) = L_min + exp(lambda) * C^alpha, evaluated in log space to avoid overflow of C^alpha."""
    c = np.asarray(compute, dtype=np.float64)
    return l_min + np.exp(lam + alpha * np.log(c))


@dataclass
class FitResult:
    """One fit. `params`/`ci` hold alpha, lambda, l_min (ci: {"cov": {name: [lo, hi]}, "bootstrap": ...});
    both are empty unless status == "ok"."""

    key: dict[str, Any]
    status: str  # "ok" | "insufficient" | "failed"
    message: str
    n_points: int
    n_distinct: int
    l_min_free: bool
    compute: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    params: dict[str, float] = field(default_factory=dict)
    ci: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    rmse_log: float | None = None
    l_min_at_bound: bool = False
    n_boot: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        if not self.ok:
            raise ValueError(f"no fitted law ({self.status}: {self.message})")
        return law(compute, self.params["alpha"], self.params["lambda"], self.params["l_min"])

    @property
    def primary_ci(self) -> tuple[str, dict[str, list[float]]]:
        """(method, {param: [lo, hi]}) of the interval to report; see the module docstring."""
        cov = self.ci.get("cov", {})
        fitted = [p for p in PARAMS if p != "l_min" or self.l_min_free]
        usable = bool(cov) and all(np.isfinite(cov[p]).all() and cov[p][1] > cov[p][0] for p in fitted)
        if "bootstrap" in self.ci and (self.l_min_at_bound or not usable):
            return "bootstrap", self.ci["bootstrap"]
        return "cov", cov

    @property
    def compute_range(self) -> tuple[float, float]:
        return (min(self.compute), max(self.compute)) if self.compute else (math.nan, math.nan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "status": self.status, "message": self.message, "n_points": self.n_points,
            "n_distinct_compute": self.n_distinct, "l_min_free": self.l_min_free,
            "params": self.params, "ci": self.ci, "ci_level": CI_LEVEL, "rmse_log": self.rmse_log,
            "l_min_at_bound": self.l_min_at_bound, "bootstrap_resamples": self.n_boot, "notes": self.notes,
            "points": {"compute": self.compute, "value": self.values},
        }


def _model(theta: np.ndarray, x: np.ndarray, l_min: float | None) -> tuple[np.ndarray, np.ndarray]:
    """log L at centred log-compute x, and its Jacobian w.r.t. theta = ([l_min,] alpha, lam_c)."""
    if l_min is None:
        lm, alpha, lam_c = theta
    else:
        lm, (alpha, lam_c) = l_min, theta
    e = np.exp(lam_c + alpha * x)
    m = lm + e
    cols = [e * x / m, e / m]
    if l_min is None:
        cols.insert(0, 1.0 / m)
    return np.log(m), np.stack(cols, axis=1)


def _initial(x: np.ndarray, y: np.ndarray, l_min: float | None) -> np.ndarray:
    """Grid over L_min fractions of min(L); for each, log(L - L_min) is linear in x. Keep the best."""
    L = np.exp(y)
    candidates = [l_min] if l_min is not None else list(L.min() * np.linspace(0.0, 0.98, 50))
    best, best_sse = None, math.inf
    for lm in candidates:
        alpha, lam_c = np.polyfit(x, np.log(L - lm), 1)  # every candidate lies below min(L)
        pred = np.log(lm + np.exp(lam_c + alpha * x))
        sse = float(np.sum((pred - y) ** 2))
        if sse < best_sse:
            best, best_sse = (lm, alpha, lam_c), sse
    lm, alpha, lam_c = best
    return np.array([lm, alpha, lam_c] if l_min is None else [alpha, lam_c], dtype=np.float64)


def _solve(x: np.ndarray, y: np.ndarray, l_min: float | None, start: np.ndarray | None = None,
           max_nfev: int = 2000) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """Least squares for theta; returns (theta, jacobian at the optimum, l_min at its upper bound,
    converged). `start` skips the initial grid search (bootstrap resamples start from the estimate)."""
    theta0 = _initial(x, y, l_min) if start is None else start.copy()
    if l_min is None:
        upper = float(np.exp(y).min()) * (1.0 - _UPPER_MARGIN)
        lo, hi = np.array([0.0, -np.inf, -np.inf]), np.array([upper, np.inf, np.inf])
        theta0[0] = min(max(theta0[0], 0.0), upper * (1 - 1e-9))
    else:
        lo, hi = -np.inf, np.inf

    def resid(t):
        return _model(t, x, l_min)[0] - y

    def jac(t):
        return _model(t, x, l_min)[1]

    sol = optimize.least_squares(resid, theta0, jac=jac, bounds=(lo, hi), method="trf", x_scale="jac",
                                 xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=max_nfev)
    at_bound = l_min is None and sol.x[0] >= upper * (1 - 1e-4)
    return sol.x, sol.jac, bool(at_bound), sol.status > 0


def _to_params(theta: np.ndarray, x0: float, l_min: float | None) -> np.ndarray:
    """(alpha, lambda, l_min) for raw C from theta with centred x: lambda = lam_c - alpha * x0."""
    if l_min is None:
        lm, alpha, lam_c = theta
    else:
        lm, (alpha, lam_c) = l_min, theta
    return np.array([alpha, lam_c - alpha * x0, lm])


def fit_law(compute: Sequence[float], values: Sequence[float], *, key: dict[str, Any] | None = None,
            l_min: float | None = None, n_boot: int = 1000, seed: int = 0) -> FitResult:
    """Fit L(C) = L_min + exp(lambda) * C^alpha to points (C_i, L_i).

    l_min: None fits it (constrained to [0, min L)); a number fixes it (e.g. 0 for a pure power law).
    n_boot: bootstrap resamples (0 skips the bootstrap interval). The bootstrap generator is seeded
    from `seed` and the key, so a fit's interval does not depend on which other fits ran before it.
    """
    key = dict(key or {})
    c = np.asarray(compute, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if c.shape != v.shape:
        raise ValueError(f"compute and values differ in length: {c.shape} vs {v.shape}")
    keep = np.isfinite(c) & np.isfinite(v) & (c > 0) & (v > 0)
    notes = []
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} point(s) without a positive finite compute and value were left out")
    c, v = c[keep], v[keep]
    order = np.lexsort((v, c))
    c, v = c[order], v[order]
    n, distinct = len(c), len(np.unique(c))
    free = l_min is None
    n_params = 3 if free else 2
    result = FitResult(key=key, status="insufficient", message="", n_points=n, n_distinct=distinct,
                       l_min_free=free, compute=c.tolist(), values=v.tolist(), notes=notes)
    need = n_params + 1
    if distinct < need:
        result.message = (f"not enough points to fit: {distinct} distinct compute value(s), need {need} "
                          f"({'L_min free' if free else 'L_min fixed'})")
        return result
    if not free and not (0 <= l_min < v.min()):
        result.status = "failed"
        result.message = f"fixed L_min={l_min} must lie in [0, min(L)={v.min():.6g})"
        return result

    logc = np.log(c)
    x0 = float(logc.mean())
    x, y = logc - x0, np.log(v)
    try:
        theta, jac, at_bound, converged = _solve(x, y, l_min)
    except (ValueError, np.linalg.LinAlgError) as err:
        result.status, result.message = "failed", f"least squares failed: {err}"
        return result
    fitted = _model(theta, x, l_min)[0]
    resid = y - fitted
    dof = n - n_params
    s2 = float(resid @ resid) / dof
    est = _to_params(theta, x0, l_min)
    result.status, result.message = "ok", "fitted"
    result.params = {"alpha": float(est[0]), "lambda": float(est[1]), "l_min": float(est[2])}
    result.rmse_log = float(np.sqrt(np.mean(resid ** 2)))
    result.l_min_at_bound = at_bound
    if not converged:
        result.notes.append("the optimiser stopped at its evaluation limit: the law hardly constrains these points")
    if at_bound:
        result.notes.append("L_min reached its upper bound min(L): the points show no curvature toward a floor")
    if est[0] >= 0:
        result.notes.append("alpha >= 0: the metric does not fall with compute over these points")
    result.ci["cov"] = _wald(jac, s2, dof, x0, est, free)
    if free:
        lo, hi = result.ci["cov"]["l_min"]
        result.ci["cov"]["l_min"] = [max(lo, 0.0), min(hi, float(v.min()))]
    if n_boot > 0:
        rng = np.random.default_rng([seed, zlib.crc32(repr(sorted(key.items())).encode())])
        result.ci["bootstrap"], failed = _bootstrap(x, fitted, resid, theta, x0, l_min, n_boot, rng, n_params)
        result.n_boot = n_boot
        if failed:
            result.notes.append(f"{failed} of {n_boot} bootstrap resamples did not converge and were left out")
    return result


def _wald(jac: np.ndarray, s2: float, dof: int, x0: float, est: np.ndarray, free: bool) -> dict[str, list[float]]:
    """Covariance of theta mapped linearly to (alpha, lambda, l_min); t-quantile half widths."""
    cov_theta = s2 * np.linalg.pinv(jac.T @ jac)
    # d(alpha, lambda, l_min) / d theta, theta = ([l_min,] alpha, lam_c)
    if free:
        A = np.array([[0.0, 1.0, 0.0], [0.0, -x0, 1.0], [1.0, 0.0, 0.0]])
    else:
        A = np.array([[1.0, 0.0], [-x0, 1.0], [0.0, 0.0]])
    cov = A @ cov_theta @ A.T
    t = float(stats.t.ppf(0.5 + CI_LEVEL / 2, dof))
    half = t * np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return {name: [float(e - h), float(e + h)] for name, e, h in zip(PARAMS, est, half)}


def _bootstrap(x, fitted, resid, theta, x0, l_min, n_boot, rng, n_params) -> tuple[dict[str, list[float]], int]:
    """Percentile intervals and the number of resamples left out. Each resample starts from the point
    estimate, so a well-posed one converges in a few evaluations; one that needs more than 100 is
    wandering along a direction the data do not pin down, and is left out rather than waited for."""
    n = len(x)
    scaled = (resid - resid.mean()) * math.sqrt(n / (n - n_params))
    draws = []
    for _ in range(n_boot):
        y_star = fitted + rng.choice(scaled, size=n, replace=True)
        try:
            theta_star, _, _, converged = _solve(x, y_star, l_min, start=theta, max_nfev=100)
        except (ValueError, np.linalg.LinAlgError):
            continue  # a resample the solver cannot handle says nothing about the parameters
        if converged:
            draws.append(_to_params(theta_star, x0, l_min))
    if not draws:
        return {name: [math.nan, math.nan] for name in PARAMS}, n_boot
    d = np.array(draws)
    lo, hi = np.percentile(d, [50 * (1 - CI_LEVEL), 50 * (1 + CI_LEVEL)], axis=0)
    return {name: [float(a), float(b)] for name, a, b in zip(PARAMS, lo, hi)}, n_boot - len(draws)
