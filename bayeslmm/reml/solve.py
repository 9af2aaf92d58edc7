"""The REML / ML optimum of a model: θ̂, the criterion there and every estimate, before any result is made.

:func:`optimum` minimises the profiled deviance (lme4's ``mkLmerDevfun → optimizeLmer``);
:func:`estimates_at` evaluates a model at a given θ.  They return plain numbers and
:class:`~.estimates.Estimates`, so that the layers above use them without a cycle:
:func:`~.fit.fit_frequentist` wraps an optimum into a :class:`~.results.FreqFit`, the
profiler (:mod:`.profile`) refits a REML fit by ML here, and a loaded fit recomputes its
estimates at the stored θ.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from ..crossprod import CrossProducts
from ..errors import ModelError
from ..spec import ModelSpec
from .deviance import ProfiledDeviance
from .estimates import Estimates, compute_estimates
from .optimize import OptimizationRecord, minimize_bobyqa


@dataclass(frozen=True)
class Optimum:
    """θ̂ of a REML or ML criterion, the criterion there, the estimates and the optimizer's record."""

    reml: bool
    theta: np.ndarray
    objective: float
    estimates: Estimates
    optimization: OptimizationRecord

    @property
    def sigma(self) -> float:
        return self.estimates.sigma


def optimum(spec: ModelSpec, reml: bool = True, crossprods: CrossProducts | None = None,
            start: np.ndarray | None = None, **optimizer_options) -> Optimum:
    """Minimise the profiled deviance from ``start`` (lme4's T = I when omitted).

    The optimizer's warnings are issued for the caller of the caller's caller (the user
    of ``Model.fit``); BLAS threads are the caller's to limit.
    """
    dev = ProfiledDeviance(spec, crossprods, reml=reml)
    theta0 = spec.theta_start if start is None else np.asarray(start, dtype=float)
    if theta0.shape != (spec.n_theta,):
        raise ModelError(f"start must have {spec.n_theta} entries (one per θ), got shape {theta0.shape}")
    shifts = centring_shifts(spec) if start is None and spec.rows_in_memory else None
    if shifts is None:
        record = minimize_bobyqa(dev, theta0, spec.theta_lower, **optimizer_options)
    else:
        record, theta_c = _minimize_centred(spec, shifts, reml, **optimizer_options)
    if not np.isfinite(record.objective):
        raise ModelError(
            "the deviance could not be evaluated at any θ the optimizer tried; the data may be "
            "degenerate (a response that the fixed effects fit exactly?)"
        )
    for w in record.warnings:
        warnings.warn(w, stacklevel=4)  # optimum ← fit_frequentist ← Model.fit ← the user
    theta = record.end
    objective, est = estimates_at(spec, theta, reml, dev=dev if shifts is None else None, shifts=shifts,
                                  theta_centred=None if shifts is None else theta_c)
    return Optimum(reml=reml, theta=theta, objective=objective, estimates=est, optimization=record)


def estimates_at(spec: ModelSpec, theta: np.ndarray, reml: bool, crossprods: CrossProducts | None = None,
                 dev: ProfiledDeviance | None = None, shifts="auto", theta_centred: np.ndarray | None = None):
    """The criterion and every estimate at θ (of the model as written).

    Where :func:`centring_shifts` re-expresses a term, they are evaluated in the
    centred coordinates (the same model, better conditioned) and mapped back:
    b = C b', condVar = C V' Cᵀ; β, σ and the fitted values do not change.
    """
    if isinstance(shifts, str):
        shifts = centring_shifts(spec) if spec.rows_in_memory else None
    if shifts is None:
        dev = dev if dev is not None else ProfiledDeviance(spec, crossprods, reml=reml)
        f = dev.factor(theta)
        return float(dev.objective(f)), compute_estimates(dev, f)
    spec_c = _centred_spec(spec, shifts)
    dev_c = ProfiledDeviance(spec_c, None, reml=reml)
    # θ mapped to the centred coordinates (what load() recomputes, so a reloaded fit is identical);
    # for a degenerate, exactly fitted model the round trip can land a hair outside the
    # positive-definite region: then the optimizer's own point, then the raw coordinates
    f = None
    for point in (theta_to_centred(spec, theta, shifts), theta_centred):
        if point is None:
            continue
        try:
            f = dev_c.factor(point)
            break
        except np.linalg.LinAlgError:
            continue
    if f is None:
        return estimates_at(spec, theta, reml, crossprods, shifts=None)
    est = compute_estimates(dev_c, f)
    Cs = [None if m is None else _centring_matrix(b, m) for b, m in zip(spec.blocks, shifts)]
    b = [bk if C is None else bk @ C.T for bk, C in zip(est.b, Cs)]
    cv = [v if C is None else np.einsum("ab,jbc,dc->jad", C, v, C) for v, C in zip(est.b_condvar, Cs)]
    return float(dev_c.objective(f)), replace(est, b=b, b_condvar=cv)


#: a correlated term's slope column whose |mean| exceeds this many sds is centred while optimising
CENTRE_RATIO = 3.0


def centring_shifts(spec: ModelSpec) -> list[np.ndarray | None] | None:
    """Per block, the column means to subtract from its slopes (None: leave the block as it is).

    For a correlated term with an intercept, Z' = Z C with C = I − e₀mᵀ (each slope
    minus its mean m) is the same model re-expressed: b = C b', Σ = C Σ' Cᵀ.  When a
    slope's mean is far from zero relative to its spread (x around 2010 ± 5, Days + 200)
    the intercept's variance describes x = 0, far outside the data, the variance
    parameters are nearly collinear and BOBYQA stops short of the optimum (sleepstudy
    with Days + 200: REML criterion 2.3 above it; lme4 1.1-31 ends 38.8 above with a
    convergence warning).  Optimising in the centred coordinates and mapping θ back
    gives the optimum of the model as written.
    """
    out, any_shift = [], False
    for block in spec.blocks:
        shift = None
        if block.correlated and block.q > 1 and "(Intercept)" in block.columns:
            i0 = block.columns.index("(Intercept)")
            mean, sd = block.Z.mean(axis=0), block.Z.std(axis=0)
            m = np.where(np.abs(mean) > CENTRE_RATIO * np.maximum(sd, 1e-300), mean, 0.0)
            m[i0] = 0.0
            if np.any(m != 0) and np.allclose(block.Z[:, i0], 1.0):
                shift = m
                any_shift = True
        out.append(shift)
    return out if any_shift else None


def _centring_matrix(block, shift: np.ndarray) -> np.ndarray:
    C = np.eye(block.q)
    C[block.columns.index("(Intercept)"), :] -= shift
    return C


def theta_from_centred(spec: ModelSpec, theta_c: np.ndarray, shifts) -> np.ndarray:
    """θ of the model as written from θ' of the centred one: T Tᵀ = C T'T'ᵀ Cᵀ, T lower with T_ii ≥ 0."""
    return _map_theta(spec, theta_c, shifts, inverse=False)


def theta_to_centred(spec: ModelSpec, theta: np.ndarray, shifts) -> np.ndarray:
    """θ' of the centred model from θ: T'T'ᵀ = C⁻¹ T Tᵀ C⁻ᵀ."""
    return _map_theta(spec, theta, shifts, inverse=True)


def _map_theta(spec, theta, shifts, inverse: bool) -> np.ndarray:
    parts = []
    for block, piece, shift in zip(spec.blocks, spec.split_theta(theta), shifts):
        if shift is None:
            parts.append(piece)
            continue
        C = _centring_matrix(block, shift)
        F = (np.linalg.inv(C) if inverse else C) @ block.T(piece)   # any factor of Σ/σ²
        R = np.linalg.qr(F.T, mode="r")                             # Fᵀ = QR → F Fᵀ = RᵀR
        T = R.T * np.where(np.diag(R) < 0, -1.0, 1.0)[None, :]      # Rᵀ with a non-negative diagonal
        rows, cols = block.theta_index
        parts.append(T[rows, cols])
    return np.concatenate(parts)


def _centred_spec(spec: ModelSpec, shifts) -> ModelSpec:
    blocks = tuple(b if m is None else replace(b, Z=np.ascontiguousarray(b.Z @ _centring_matrix(b, m)))
                   for b, m in zip(spec.blocks, shifts))
    return replace(spec, blocks=blocks)


def _minimize_centred(spec: ModelSpec, shifts, reml: bool, **optimizer_options):
    """Optimise the centred model: the record with θ of the model as written, and the centred optimum θ'."""
    spec_c = _centred_spec(spec, shifts)
    dev_c = ProfiledDeviance(spec_c, None, reml=reml)
    rec = minimize_bobyqa(dev_c, spec_c.theta_start, spec_c.theta_lower, **optimizer_options)
    moved = ", ".join(f"{b.group}: {c} − {mv:.6g}" for b, m in zip(spec.blocks, shifts) if m is not None
                      for c, mv in zip(b.columns, m) if mv != 0)
    record = replace(rec, start=theta_from_centred(spec, rec.start, shifts),
                     end=theta_from_centred(spec, rec.end, shifts),
                     message=f"{rec.message} (optimised with centred slopes, {moved}; θ mapped back)")
    return record, rec.end
