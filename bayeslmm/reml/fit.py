"""Fit by REML or ML: lme4's ``mkLmerDevfun → optimizeLmer → mkMerMod`` in three calls."""

from __future__ import annotations

import warnings

import numpy as np

from ..crossprod import CrossProducts
from ..spec import ModelSpec
from .optimize import blas_thread_count
from .optimize import blas_threads as blas_limit  # the argument is called blas_threads
from .results import FreqFit
from .solve import (  # noqa: F401  (importable from here, as before the optimum moved below the results)
    CENTRE_RATIO,
    centring_shifts,
    estimates_at,
    optimum,
    theta_from_centred,
    theta_to_centred,
)


def fit_frequentist(
    spec: ModelSpec,
    reml: bool = True,
    crossprods: CrossProducts | None = None,
    start: np.ndarray | None = None,
    data_name: str | None = None,
    blas_threads: int | None = None,
    **optimizer_options,
) -> FreqFit:
    """Minimise the profiled deviance and assemble the fit.

    Parameters
    ----------
    spec : ModelSpec
    reml : bool
        REML (default) or maximum likelihood.
    crossprods : CrossProducts, optional
        Reuse cross-products already computed for ``spec``.
    start : array, optional
        Starting θ; lme4's (T = I) by default.
    blas_threads : int, optional
        BLAS threads while fitting; ``$BAYESLMM_BLAS_THREADS``, else 1, when omitted
        (see :func:`~bayeslmm.reml.optimize.blas_threads`: more threads stall when the
        cores are shared, and gain little on these small factorisations).
    **optimizer_options
        Passed to :func:`~bayeslmm.reml.optimize.minimize_bobyqa` (``ftol_rel``, ``maxeval``, ...).
    """
    blas_thread_count(blas_threads)  # a bad setting fails before any work
    if spec.residual is not None:  # R = σ² Λ_R(ρ): a joint optimum over (θ, ρ), bayeslmm.reml.residual_fit
        return _fit_residual(spec, reml, start, data_name, blas_threads, **optimizer_options)
    with blas_limit(blas_threads):
        opt = optimum(spec, reml, crossprods, start, **optimizer_options)
    return FreqFit(spec=spec, method="REML" if reml else "ML", theta=opt.theta, objective=opt.objective,
                   estimates=opt.estimates, optimization=opt.optimization, data_name=data_name)


def _fit_residual(spec, reml, start, data_name, blas_threads, **optimizer_options) -> FreqFit:
    from .residual_fit import residual_optimum

    with blas_limit(blas_threads):
        theta, u, objective, est, record = residual_optimum(spec, reml, start, **optimizer_options)
    for w in record.warnings:
        warnings.warn(w, stacklevel=4)  # _fit_residual ← fit_frequentist ← Model.fit ← the user
    return FreqFit(spec=spec, method="REML" if reml else "ML", theta=theta, objective=objective,
                   estimates=est, optimization=record, data_name=data_name,
                   residual_params=spec.residual.natural(u), residual_structure=spec.residual.describe())
