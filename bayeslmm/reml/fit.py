"""Fit by REML or ML: lme4's ``mkLmerDevfun → optimizeLmer → mkMerMod`` in three calls."""

from __future__ import annotations

import warnings

import numpy as np

from ..crossprod import CrossProducts
from ..errors import ModelError
from ..spec import ModelSpec
from .deviance import ProfiledDeviance
from .estimates import compute_estimates
from .optimize import minimize_bobyqa
from .results import FreqFit


def fit_frequentist(
    spec: ModelSpec,
    reml: bool = True,
    crossprods: CrossProducts | None = None,
    start: np.ndarray | None = None,
    data_name: str | None = None,
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
    **optimizer_options
        Passed to :func:`~bayeslmm.reml.optimize.minimize_bobyqa` (``ftol_rel``, ``maxeval``, ...).
    """
    dev = ProfiledDeviance(spec, crossprods, reml=reml)
    theta0 = spec.theta_start if start is None else np.asarray(start, dtype=float)
    if theta0.shape != (spec.n_theta,):
        raise ModelError(f"start must have {spec.n_theta} entries (one per θ), got shape {theta0.shape}")
    record = minimize_bobyqa(dev, theta0, spec.theta_lower, **optimizer_options)
    if not np.isfinite(record.objective):
        raise ModelError(
            "the deviance could not be evaluated at any θ the optimizer tried; the data may be "
            "degenerate (a response that the fixed effects fit exactly?)"
        )
    for w in record.warnings:
        warnings.warn(w, stacklevel=3)
    theta = record.end
    f = dev.factor(theta)
    est = compute_estimates(dev, f)
    return FreqFit(spec=spec, method="REML" if reml else "ML", theta=theta,
                   objective=float(dev.objective(f)), estimates=est, optimization=record,
                   data_name=data_name)
