"""Minimise the profiled deviance over θ with a bounded derivative-free optimizer.

BOBYQA (Powell 2009) through nlopt, the algorithm lme4's default ``nloptwrap``
uses; nlopt is a maintained C library with Python wheels, so we do not carry an
optimizer of our own.  Tolerances are tighter than lme4's (``ftol_abs = xtol_abs =
1e-8``) and the search is restarted once from its end point with a small step,
so the optimum found is never worse than lme4's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nlopt
import numpy as np

from ..errors import BayesLMMError

#: environment variable read for the number of BLAS threads in the deviance evaluations
BLAS_THREADS_ENV = "BAYESLMM_BLAS_THREADS"


def blas_threads(threads: int | None = None):
    """A context in which BLAS (OpenBLAS, MKL, ...) uses at most ``threads`` threads.

    The deviance's dense factorisations are small (InstEval's is 1,145 square), so a
    second thread gains little, and when other processes hold the cores OpenBLAS's
    threads wait on each other: on a shared two-core machine InstEval's REML fit took
    9–14 s with one thread and 87–169 s with two (16 s and 119 s in issue 14's
    measurement).  Hence one thread by default; ``threads`` or the environment
    variable ``BAYESLMM_BLAS_THREADS`` allow more.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=blas_thread_count(threads), user_api="blas")


def blas_thread_count(threads: int | None = None) -> int:
    """``threads``, else ``$BAYESLMM_BLAS_THREADS``, else 1; a positive integer or a clear error."""
    source = "blas_threads"
    if threads is None:
        threads = os.environ.get(BLAS_THREADS_ENV, "1")
        source = f"the environment variable {BLAS_THREADS_ENV}"
        try:
            threads = int(threads)
        except ValueError:
            raise BayesLMMError(f"{source} must be a positive integer (BLAS threads), got {threads!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise BayesLMMError(f"{source} must be a positive integer (BLAS threads), got {threads!r}")
    return int(threads)

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
    ftol_rel, ftol_abs, xtol_abs : float
        nlopt stopping rules (≥ 0).
    maxeval : int
        Evaluations allowed over all passes together; at most ``len(start)`` more
        check whether a near-zero variance is on its bound.  Reaching it is warned
        about and the best point found is kept.
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
    _check_options(start, lower, ftol_rel=ftol_rel, xtol_rel=xtol_rel, ftol_abs=ftol_abs, xtol_abs=xtol_abs,
                   maxeval=maxeval, restarts=restarts, initial_step=initial_step)
    tolerances = {"ftol_rel": ftol_rel, "xtol_rel": xtol_rel, "ftol_abs": ftol_abs, "xtol_abs": xtol_abs}
    best = _Best(fun, start)
    message, warns = "", []
    step = initial_step
    for _ in range(1 + restarts):
        remaining = maxeval - best.count
        if remaining <= 0:  # nlopt reads maxeval <= 0 as "no limit": stop here instead
            break
        before = best.f
        message, failed = _one_pass(best, lower, step, tolerances, remaining, maxeval, warns)
        if failed:
            break
        step = 1e-3 * max(1.0, float(np.max(np.abs(best.x))))
        if np.isfinite(before) and before - best.f <= ftol_abs:
            break  # the restart found nothing better
    _snap_to_bounds(best, lower)
    if not np.isfinite(best.f):
        warns.append("the objective was not finite anywhere the optimizer looked")
    return OptimizationRecord(
        optimizer="nlopt LN_BOBYQA",
        start=start,
        end=np.maximum(best.x, lower),
        objective=best.f,
        n_evaluations=best.count,
        tolerances={"ftol_rel": ftol_rel, "ftol_abs": ftol_abs, "xtol_abs": xtol_abs,
                    "maxeval": maxeval, "restarts": restarts},
        message=message,
        warnings=tuple(warns),
        seconds=time.perf_counter() - t0,
    )


class _Best:
    """The objective as nlopt sees it, keeping count and the best point found so far."""

    def __init__(self, fun: Callable[[np.ndarray], float], start: np.ndarray):
        self.fun, self.count = fun, 0
        self.x, self.f = start.copy(), np.inf

    def __call__(self, x, grad=None) -> float:
        self.count += 1
        val = float(self.fun(np.asarray(x)))
        if val < self.f:
            self.f, self.x = val, np.array(x, dtype=float)
        return val if np.isfinite(val) else 1e300


def _bobyqa(best: _Best, lower: np.ndarray, step: float | None):
    """An nlopt BOBYQA object over θ and its starting point (padded when θ has one entry)."""
    n = len(lower)
    if n == 1:
        # nlopt's BOBYQA needs at least two variables; pad with an inert one.  Its
        # initial step must fit in its bounds [-1, 1] (BOBYQA refuses a step larger
        # than half the width), whatever the step of the real coordinate
        opt = nlopt.opt(nlopt.LN_BOBYQA, 2)
        opt.set_lower_bounds([lower[0], -1.0])
        opt.set_upper_bounds([np.inf, 1.0])
        opt.set_min_objective(lambda z, g: best(z[:1], g))
        if step is not None:
            opt.set_initial_step([step, 0.5])
        return opt, np.array([best.x[0], 0.0])
    opt = nlopt.opt(nlopt.LN_BOBYQA, n)
    opt.set_lower_bounds(lower)
    opt.set_min_objective(best)
    if step is not None:
        opt.set_initial_step(np.full(n, step))
    return opt, best.x.copy()


def _one_pass(best: _Best, lower, step, tolerances: dict, remaining: int, maxeval: int,
              warns: list[str]) -> tuple[str, bool]:
    """One BOBYQA pass from the best point: nlopt's message, and whether it failed."""
    opt, x0 = _bobyqa(best, lower, step)
    for name, value in tolerances.items():
        getattr(opt, f"set_{name}")(value)
    opt.set_maxeval(remaining)
    try:
        opt.optimize(x0)
    except nlopt.RoundoffLimited:
        return "roundoff limited (the best point found is kept)", False
    except (nlopt.exception, RuntimeError) as exc:  # nlopt's C++ errors, "nlopt failure"
        warns.append(f"the optimizer stopped with an error after {best.count} evaluations "
                     f"({type(exc).__name__}); the best point found is kept")
        return f"nlopt failed ({type(exc).__name__}: {exc}); the best point found is kept", True
    code = opt.last_optimize_result()
    if code == nlopt.MAXEVAL_REACHED:
        warns.append(f"optimizer stopped after {best.count} evaluations (maxeval={maxeval}) without "
                     "converging; the best point found is kept: raise maxeval, or check the model")
    return _RETURN_CODES.get(code, f"nlopt code {code}"), False


def _snap_to_bounds(best: _Best, lower: np.ndarray) -> None:
    """A variance that ends a hair above its bound is usually on it: snap when no worse."""
    for i in np.flatnonzero(np.isfinite(lower) & (best.x - lower < 1e-5) & (best.x > lower)):
        trial = best.x.copy()
        trial[i] = lower[i]
        best.count += 1
        val = float(best.fun(trial))
        if val <= best.f:
            best.f, best.x = val, trial


def _check_options(start, lower, *, ftol_rel, xtol_rel, ftol_abs, xtol_abs, maxeval, restarts, initial_step):
    """Reject settings nlopt would refuse (or silently reinterpret), naming the argument."""
    if start.ndim != 1 or start.shape != lower.shape:
        raise BayesLMMError(f"start must have {lower.size} entries (one per θ), got shape {start.shape}")
    if not np.all(np.isfinite(start)):
        raise BayesLMMError(f"start must be finite, got {start.tolist()}")
    below = np.flatnonzero(start < lower)
    if below.size:
        raise BayesLMMError(
            f"start: θ entries {below.tolist()} are below their lower bounds {lower[below].tolist()} "
            "(the diagonal of each relative covariance factor is ≥ 0); give values ≥ 0 there"
        )
    for name, value in (("ftol_rel", ftol_rel), ("xtol_rel", xtol_rel), ("ftol_abs", ftol_abs),
                        ("xtol_abs", xtol_abs)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value < 0:
            raise BayesLMMError(f"{name} must be a finite number ≥ 0, got {value!r}")
    for name, value, least in (("maxeval", maxeval, 1), ("restarts", restarts, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise BayesLMMError(f"{name} must be an integer ≥ {least}, got {value!r}")
    if initial_step is not None and (isinstance(initial_step, bool)
                                     or not isinstance(initial_step, (int, float, np.integer, np.floating))
                                     or not np.isfinite(initial_step) or initial_step <= 0):
        raise BayesLMMError(f"initial_step must be a positive finite number or None, got {initial_step!r}")
