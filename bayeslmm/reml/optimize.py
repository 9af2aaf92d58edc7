"""Minimise the profiled deviance over θ with a bounded derivative-free optimizer.

BOBYQA (Powell 2009) through nlopt, the algorithm lme4's default ``nloptwrap``
uses; nlopt is a maintained C library with Python wheels, so we do not carry an
optimizer of our own.  Tolerances are tighter than lme4's (``ftol_abs = xtol_abs =
1e-8``) and the search is restarted once from its end point with a small step,
so the optimum found is never worse than lme4's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nlopt
import numpy as np

_RETURN_CODES = {
    nlopt.SUCCESS: "success",
    nlopt.STOPVAL_REACHED: "stopval reached",
    nlopt.FTOL_REACHED: "ftol reached",
    nlopt.XTOL_REACHED: "xtol reached",
    nlopt.MAXEVAL_REACHED: "maximum number of evaluations reached",
    nlopt.MAXTIME_REACHED: "maximum time reached",
}


@dataclass(frozen=True)
class OptimizationRecord:
    """What the optimizer did: kept on every frequentist fit.

    Attributes
    ----------
    optimizer : str
    start, end : ndarray
        θ at the start and at the optimum.
    objective : float
        The criterion at ``end``.
    n_evaluations : int
    tolerances : dict
    message : str
        nlopt's reason for stopping (of the last pass).
    warnings : tuple of str
        Convergence problems worth a user's attention.
    seconds : float
    """

    optimizer: str
    start: np.ndarray
    end: np.ndarray
    objective: float
    n_evaluations: int
    tolerances: dict
    message: str
    warnings: tuple[str, ...] = field(default=())
    seconds: float = 0.0


def minimize_bobyqa(
    fun: Callable[[np.ndarray], float],
    start: np.ndarray,
    lower: np.ndarray,
    *,
    ftol_rel: float = 1e-12,
    xtol_rel: float = 0.0,
    ftol_abs: float = 1e-10,
    xtol_abs: float = 1e-10,
    maxeval: int = 100_000,
    restarts: int = 1,
    initial_step: float | None = None,
) -> OptimizationRecord:
    """Minimise ``fun`` from ``start`` subject to ``θ ≥ lower`` with BOBYQA.

    Parameters
    ----------
    fun : callable
        θ ↦ objective; ``inf`` where undefined.
    start, lower : ndarray
        Starting point and lower bounds (``-inf`` for unbounded entries).
    ftol_rel, ftol_abs, xtol_abs, maxeval : float, int
        nlopt stopping rules.
    restarts : int
        Extra passes from the best point with a small initial step.
    xtol_rel : float
        nlopt's relative tolerance on θ (0: off).
    initial_step : float, optional
        The first pass's initial step for every coordinate (nlopt's heuristic when None).
    """
    t0 = time.perf_counter()
    start = np.asarray(start, dtype=float)
    lower = np.asarray(lower, dtype=float)
    n = len(start)
    count = 0
    best_x, best_f = start.copy(), np.inf

    def wrapped(x, grad):
        nonlocal count, best_x, best_f
        count += 1
        val = float(fun(np.asarray(x)))
        if val < best_f:
            best_f, best_x = val, np.array(x, dtype=float)
        return val if np.isfinite(val) else 1e300

    message = ""
    warns: list[str] = []
    x = start.copy()
    step = initial_step
    for _ in range(1 + restarts):
        if n == 1:
            # nlopt's BOBYQA needs at least two variables; pad with an inert one
            opt = nlopt.opt(nlopt.LN_BOBYQA, 2)
            opt.set_lower_bounds([lower[0], -1.0])
            opt.set_upper_bounds([np.inf, 1.0])
            opt.set_min_objective(lambda z, g: wrapped(z[:1], g))
            x0 = np.array([x[0], 0.0])
            if step is not None:
                opt.set_initial_step([step, step])
        else:
            opt = nlopt.opt(nlopt.LN_BOBYQA, n)
            opt.set_lower_bounds(lower)
            opt.set_min_objective(wrapped)
            x0 = x.copy()
            if step is not None:
                opt.set_initial_step(np.full(n, step))
        opt.set_ftol_rel(ftol_rel)
        opt.set_ftol_abs(ftol_abs)
        opt.set_xtol_abs(xtol_abs)
        opt.set_xtol_rel(xtol_rel)
        opt.set_maxeval(max(maxeval - count, 10))
        before = best_f
        try:
            opt.optimize(x0)
            code = opt.last_optimize_result()
            message = _RETURN_CODES.get(code, f"nlopt code {code}")
            if code == nlopt.MAXEVAL_REACHED:
                warns.append(f"optimizer stopped after {count} evaluations without converging")
        except nlopt.RoundoffLimited:
            message = "roundoff limited (the best point found is kept)"
        x = best_x.copy()
        step = 1e-3 * max(1.0, float(np.max(np.abs(x))))
        if np.isfinite(before) and before - best_f <= ftol_abs:
            break  # the restart found nothing better
    # a variance that ends a hair above its bound is usually on it: snap when no worse
    for i in np.flatnonzero(np.isfinite(lower) & (best_x - lower < 1e-5) & (best_x > lower)):
        trial = best_x.copy()
        trial[i] = lower[i]
        count += 1
        val = float(fun(trial))
        if val <= best_f:
            best_f, best_x = val, trial
    if not np.isfinite(best_f):
        warns.append("the objective was not finite anywhere the optimizer looked")
    return OptimizationRecord(
        optimizer="nlopt LN_BOBYQA",
        start=start,
        end=np.maximum(best_x, lower),
        objective=best_f,
        n_evaluations=count,
        tolerances={"ftol_rel": ftol_rel, "ftol_abs": ftol_abs, "xtol_abs": xtol_abs,
                    "maxeval": maxeval, "restarts": restarts},
        message=message,
        warnings=tuple(warns),
        seconds=time.perf_counter() - t0,
    )
