"""REML / ML with a residual structure R = σ² Λ_R(ρ): a joint BOBYQA over (θ, ρ).

By :mod:`bayeslmm.residual`, REML(θ, ρ) = REML_σ²I(θ; Wy, WX, WZ) + log|Λ_R(ρ)| (ML
likewise) for a whitening W(ρ).  The whitened data are a :class:`ModelSpec` with the
same codes, so :class:`~.deviance.ProfiledDeviance` is reused unchanged; each new ρ
re-forms the cross-products (one pass over the rows), a θ-only move does not.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..crossprod import CrossProducts
from ..errors import ModelError
from ..spec import ModelSpec
from .deviance import ProfiledDeviance
from .optimize import minimize_bobyqa
from .solve import estimates_at


def whitened_spec(spec: ModelSpec, u: np.ndarray) -> ModelSpec:
    """The σ²I model of Wy, WX, WZ at the residual parameters ``u`` (unconstrained)."""
    res = spec.residual
    blocks = tuple(replace(b, Z=np.ascontiguousarray(res.whiten(b.Z, u))) for b in spec.blocks)
    return replace(spec, y=res.whiten(spec.y, u), X=np.ascontiguousarray(res.whiten(spec.X, u)),
                   blocks=blocks, residual=None)


class JointCriterion:
    """``(θ, u) ↦ REML_σ²I(θ; whitened data) + log|Λ_R(u)|`` (or ML), inf where undefined."""

    def __init__(self, spec: ModelSpec, reml: bool):
        self.spec, self.reml = spec, reml
        self.n_theta = spec.n_theta
        self._u, self._dev = None, None

    def deviance(self, u: np.ndarray) -> ProfiledDeviance:
        """The σ²I profiled deviance of the data whitened at ``u`` (kept while u does not move)."""
        if self._u is None or not np.array_equal(u, self._u):
            ws = whitened_spec(self.spec, u)
            self._dev = ProfiledDeviance(ws, CrossProducts.from_spec(ws), reml=self.reml)
            self._u = np.array(u, copy=True)
        return self._dev

    def __call__(self, x: np.ndarray) -> float:
        theta, u = x[: self.n_theta], x[self.n_theta:]
        with np.errstate(all="ignore"):
            try:
                logdet = self.spec.residual.log_det(u)
                if not np.isfinite(logdet):
                    return np.inf
                val = self.deviance(u)(theta) + logdet
            except (FloatingPointError, ValueError, np.linalg.LinAlgError, ModelError):
                return np.inf
        return float(val) if np.isfinite(val) else np.inf


def residual_optimum(spec: ModelSpec, reml: bool = True, start: np.ndarray | None = None, **optimizer_options):
    """θ̂, û (unconstrained), the criterion and the estimates there, and the optimizer's record."""
    res = spec.residual
    crit = JointCriterion(spec, reml)
    theta0 = _theta_start(spec, reml) if start is None else np.asarray(start, dtype=float)
    if theta0.shape != (spec.n_theta,):
        raise ModelError(f"start must have {spec.n_theta} entries (one per θ), got shape {theta0.shape}")
    # each θ entry in units of its size at the start: BOBYQA's one step size then suits all
    # (BodyWeight's θ runs from 6.8 to 0.006; unscaled, it stops 2e-7 short in the criterion)
    scale = np.concatenate([np.where(np.abs(theta0) > 1e-6, np.abs(theta0), 1.0), np.ones(res.n_params)])
    x0 = np.concatenate([theta0, res.start]) / scale
    lower = np.concatenate([spec.theta_lower, np.full(res.n_params, -np.inf)]) / scale
    record = minimize_bobyqa(lambda z: crit(z * scale), x0, lower, **optimizer_options)
    if not np.isfinite(record.objective):
        raise ModelError("the criterion could not be evaluated at any (θ, residual parameters) the optimizer "
                         "tried; the data may be degenerate")
    record = replace(record, start=record.start * scale, end=record.end * scale,
                     message=f"{record.message} (θ, scaled by its σ²I optimum, and the residual parameters "
                             f"{list(res.names)}, unconstrained, jointly)")
    theta, u = record.end[: spec.n_theta], record.end[spec.n_theta:]
    objective, est = residual_estimates_at(spec, theta, u, reml)
    return theta, u, objective, est, record


def _theta_start(spec: ModelSpec, reml: bool) -> np.ndarray:
    """θ̂ of the same model with R = σ²I: a start near the joint optimum, and its scale."""
    from .solve import optimum

    try:
        return optimum(replace(spec, residual=None), reml).theta
    except ModelError:
        return spec.theta_start


def residual_estimates_at(spec: ModelSpec, theta: np.ndarray, u: np.ndarray, reml: bool):
    """The criterion and the estimates at (θ, u): the σ²I fit's on the whitened data, the
    fitted values Xβ̂ + Zb̂ on the original rows."""
    ws = whitened_spec(spec, u)
    objective, est = estimates_at(ws, theta, reml, crossprods=CrossProducts.from_spec(ws), shifts=None)
    fitted = spec.X @ est.beta
    for block, bk in zip(spec.blocks, est.b):
        fitted = fitted + np.einsum("ia,ia->i", block.Z, bk[block.codes])
    return objective + spec.residual.log_det(u), replace(est, fitted_values=fitted)


def normalized_residuals(spec: ModelSpec, residual_params: dict, raw: np.ndarray, sigma: float) -> np.ndarray:
    """W (y − Xβ̂ − Zb̂) / σ̂: nlme's ``residuals(fit, type = "normalized")``."""
    u = spec.residual.unconstrained(residual_params)
    return spec.residual.whiten(raw, u) / sigma


def with_residual(spec: ModelSpec, structure: dict) -> ModelSpec:
    """``spec`` with the residual model a save describes (``ResidualModel.describe``)."""
    from ..residual import check_nested, from_record

    res = from_record(structure)
    if len(res.frame) != spec.n_obs:
        raise ModelError(f"the saved residual structure has {len(res.frame)} rows, the model {spec.n_obs}")
    check_nested(res, spec.blocks)
    return replace(spec, residual=res)
