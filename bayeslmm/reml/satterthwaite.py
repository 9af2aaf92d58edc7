"""Satterthwaite's denominator degrees of freedom for t and F tests of fixed effects.

The covariance of β̂ is C(φ) = σ² (R_X R_Xᵀ)⁻¹, a function of the variance parameters
φ = (θ, σ).  For a contrast ℓ, the variance v = ℓ C ℓᵀ is estimated; Satterthwaite's
approximation (Satterthwaite 1946; for mixed models Giesbrecht & Burns 1985, Fai &
Cornelius 1996, and lmerTest: Kuznetsova, Brockhoff & Christensen 2017, JSS 82(13))
matches its first two moments to a scaled χ²:

    ν = 2 v² / (gᵀ A g),   gᵢ = ℓ (∂C/∂φᵢ) ℓᵀ,   A = 2 H⁻¹,

where H is the Hessian of the deviance (−2 log-likelihood, REML or ML as fitted) in
φ, so that A is the asymptotic covariance of φ̂.  These are the parameters lmerTest
uses, (θ, σ); ν does not depend on the choice to first order.

For an F test of q contrasts L (full row rank), L C Lᵀ = P D Pᵀ; the rows of PᵀL
are independent t tests with ν₁ … ν_q, F = Σ tᵢ² / q, and the denominator df is
2E/(E − q) with E = Σ νᵢ/(νᵢ − 2) (Fai & Cornelius 1996), as lmerTest computes it:
the mean of the νᵢ when they are all equal, 2 when E ≤ q or some νᵢ ≤ 2.

Derivatives: σ enters in closed form; θ by central differences of the blocked
factorisation with Richardson's extrapolation over steps h = 4e-3 and h/2 (error
O(h⁴); θ is on σ's scale).  That is 1 + 2·(2k + k(k−1)) factorisations for k θ's
(InstEval's three variances: 25), and nothing touches the rows.  On ham, a balanced design whose exact ν is 240, a single
step of 1e-4 gave 239.990 (rounding), 1e-2 gave 240.003 (truncation).

With a residual structure R = σ² Λ_R(ρ) (:mod:`bayeslmm.residual`) the variance parameters
are φ = (θ, ρ, σ), ρ on the unconstrained scale the fit optimises (ν is invariant to the
parameterisation to first order).  At (θ, ρ) the deviance and C are the σ²I model's on the
data whitened at ρ, plus log|Λ_R(ρ)| in the deviance, so ρ is differenced with θ (same
steps, Richardson likewise); each new ρ re-forms the whitened cross-products, one pass over
the rows: 1 + 2·(2k + k(k−1)) points for k = dim θ + dim ρ, of which those that move ρ
(all but the θ-only ones) touch the rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg as sla

from ..crossprod import CrossProducts, crossproducts_of
from ..errors import BayesLMMError, ModelError
from ..hypotheses import check_matrix
from ..spec import ModelSpec
from .deviance import ProfiledDeviance
from .residual_fit import whitened_spec

#: finite-difference step in θ
THETA_STEP = 4e-3


@dataclass(frozen=True)
class _Point:
    """What the deviance and C need at one θ: log-determinants, r², (R_X R_Xᵀ)⁻¹."""

    logdet: float
    pwrss: float
    unscaled_vcov: np.ndarray


def _at(dev: ProfiledDeviance, theta: np.ndarray, logdet_r: float = 0.0) -> _Point:
    """The point at θ of ``dev``; ``logdet_r`` = log|Λ_R(ρ)| where ``dev`` is on data whitened at ρ."""
    try:
        f = dev.factor(theta)
    except np.linalg.LinAlgError as exc:
        raise ModelError(f"the model cannot be factored near θ = {np.round(theta, 6).tolist()} ({exc}); "
                         "degrees of freedom are not available") from None
    mR, p = dev.cp.n_rest_effects, dev.p
    Lxx = np.tril(f.Lr)[mR : mR + p, mR : mR + p]
    inv = sla.solve_triangular(Lxx, np.eye(p), lower=True, check_finite=False)
    logdet = f.logdet_Z + (f.logdet_X if dev.reml else 0.0) + logdet_r
    return _Point(logdet=logdet, pwrss=f.pwrss, unscaled_vcov=inv.T @ inv)


class Satterthwaite:
    """The variance parameters' covariance A and the derivatives of C = vcov(β̂) at (θ, ρ, σ).

    Parameters
    ----------
    spec : ModelSpec
    theta : ndarray
        θ in the spec's order.
    sigma : float
        The residual sd.
    reml : bool
        Whether the fit is REML (the deviance whose Hessian is used).
    crossprods : CrossProducts, optional
        σ²I fits only (a residual structure's are re-formed at each ρ).
    residual : ndarray, optional
        The residual structure's parameters ρ, unconstrained (``spec.residual.unconstrained``);
        required when ``spec`` has a residual structure.  The variance parameters, in the order
        of ``hessian``, ``param_vcov`` and ``jacobian``, are then (θ, ρ, σ).
    """

    def __init__(self, spec: ModelSpec, theta, sigma: float, reml: bool = True,
                 crossprods: CrossProducts | None = None, residual=None):
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (spec.n_theta,):
            raise BayesLMMError(f"theta must have {spec.n_theta} entries, got shape {theta.shape}")
        if not (np.isfinite(sigma) and sigma > 0):
            raise BayesLMMError(f"sigma must be a positive number, got {sigma!r}")
        self.spec, self.theta, self.sigma = spec, theta, float(sigma)
        point, x = self._point_function(spec, theta, reml, crossprods, residual)
        self._k = (spec.n_obs - spec.n_fixed) if reml else spec.n_obs
        centre = point(x)
        coarse = _differences(point, x, THETA_STEP, centre)
        fine = _differences(point, x, THETA_STEP / 2, centre)
        d_r, dd_a, dd_r, d_vcov = ((4 * b - a) / 3 for a, b in zip(coarse, fine))  # Richardson: O(h⁴)
        s, k = self.sigma, len(x)
        # deviance = a(x) + K log(2πσ²) + r²(x)/σ², with K = n − p (REML) or n (ML), x = θ or (θ, ρ)
        hess = np.empty((k + 1, k + 1))
        hess[:k, :k] = dd_a + dd_r / s**2
        hess[:k, k] = hess[k, :k] = -2.0 * d_r / s**3
        hess[k, k] = -2.0 * self._k / s**2 + 6.0 * centre.pwrss / s**4
        self.vcov = s**2 * centre.unscaled_vcov
        self.jacobian = np.concatenate([s**2 * d_vcov, [2.0 * s * centre.unscaled_vcov]])  # ∂C/∂xᵢ, ∂C/∂σ
        self.hessian = hess                                                               # of the deviance
        self.param_vcov = 2.0 * _inverse(hess)

    @staticmethod
    def _point_function(spec: ModelSpec, theta, reml: bool, crossprods, residual):
        """``x ↦ _Point`` and the x of the fit: x = θ for R = σ²I, x = (θ, ρ) with a residual structure."""
        if spec.residual is None:
            if residual is not None and np.size(residual):
                raise BayesLMMError("residual parameters were given for a model without a residual structure")
            if crossprods is None:
                crossprods = crossproducts_of(spec, "Satterthwaite's degrees of freedom")
            dev = ProfiledDeviance(spec, crossprods, reml=reml)
            return (lambda th: _at(dev, th)), theta
        rho = np.asarray([] if residual is None else residual, dtype=float).ravel()
        if rho.shape != (spec.residual.n_params,):
            raise BayesLMMError(f"the residual structure has {spec.residual.n_params} parameters "
                                f"{list(spec.residual.names)}; got residual with shape {np.shape(residual)}")
        n_theta, devs = spec.n_theta, {}

        def point(x: np.ndarray) -> _Point:
            u = x[n_theta:]
            key = u.tobytes()
            if key not in devs:  # the whitened cross-products at this ρ: one pass over the rows
                while len(devs) > 1:  # keep the fit's ρ (the first) and the last: two copies of the data
                    del devs[list(devs)[-1]]
                ws = whitened_spec(spec, u)
                logdet_r = spec.residual.log_det(u)
                if not np.isfinite(logdet_r):
                    raise ModelError(f"the residual structure is degenerate near its estimates "
                                     f"({list(spec.residual.names)} at a bound); degrees of freedom are not available")
                devs[key] = ProfiledDeviance(ws, CrossProducts.from_spec(ws), reml=reml), logdet_r
            dev, logdet_r = devs[key]
            return _at(dev, x[:n_theta], logdet_r)

        return point, np.concatenate([theta, rho])

    # -- tests -------------------------------------------------------------------
    def df(self, contrast) -> float:
        """Satterthwaite's ν for one contrast ℓ (a length-p vector)."""
        ell = self._rows(contrast)[0]
        return self._df_row(ell)

    def _df_row(self, ell: np.ndarray) -> float:
        v = float(ell @ self.vcov @ ell)
        g = np.einsum("a,kab,b->k", ell, self.jacobian, ell)
        denom = float(g @ self.param_vcov @ g)
        return 2.0 * v**2 / denom if denom > 0 else np.inf

    def f_test(self, L, beta) -> dict:
        """F statistic, numerator and denominator df of H₀: Lβ = 0 (Fai & Cornelius's rule)."""
        L = self._rows(L)
        beta = np.asarray(beta, dtype=float)
        M = L @ self.vcov @ L.T
        d, P = np.linalg.eigh(M)
        if d.min() <= 1e-12 * max(d.max(), 0.0):
            raise BayesLMMError(f"the {len(L)} hypotheses are not linearly independent (L Cov(β) Lᵀ is "
                                "singular): drop the redundant rows of L")
        PL = P.T @ L
        t2 = (PL @ beta) ** 2 / d
        nu = np.array([self._df_row(row) for row in PL])
        return {"F": float(t2.sum() / len(L)), "num_df": len(L), "den_df": combine_df(nu)}

    def _rows(self, L) -> np.ndarray:
        return check_matrix(L, self.spec.fixed_names)


def _differences(point, theta: np.ndarray, h: float, centre: _Point):
    """Central differences of ``point`` (x ↦ _Point) in x = θ, or (θ, ρ): ∂r², ∂²a, ∂²r² and
    ∂(R_X R_Xᵀ)⁻¹ (a = the log-determinants), with step hᵢ = h·max(1, |xᵢ|) in coordinate i.

    The step grows with |xᵢ| because the criterion's curvature in a large θᵢ is small
    (∝ 1/θᵢ²) while its rounding noise is not: on BodyWeight's ``(Time | Rat)`` (θ₁ = 8.3)
    an absolute step gave ν = 13.010 where the exact value is 13.
    A mixed second derivative reuses the axis points and adds two, x ± (hᵢeᵢ + hⱼeⱼ):
    f(++) + f(−−) − f(+ᵢ) − f(−ᵢ) − f(+ⱼ) − f(−ⱼ) + 2f = 2hᵢhⱼ ∂ᵢⱼf + O(h⁴), even in h like
    the other differences, so Richardson's step halving applies to it too.
    """
    k = len(theta)
    steps = h * np.maximum(1.0, np.abs(theta))
    e = np.diag(steps)
    plus = [point(theta + e[i]) for i in range(k)]
    minus = [point(theta - e[i]) for i in range(k)]
    d_r = np.array([(plus[i].pwrss - minus[i].pwrss) / (2 * steps[i]) for i in range(k)])
    dd = np.zeros((2, k, k))
    for which, name in enumerate(("logdet", "pwrss")):
        f0 = getattr(centre, name)
        fp = np.array([getattr(pt, name) for pt in plus])
        fm = np.array([getattr(pt, name) for pt in minus])
        dd[which][np.diag_indices(k)] = (fp - 2 * f0 + fm) / steps**2
    for i in range(k):
        for j in range(i):
            both = point(theta + e[i] + e[j]), point(theta - e[i] - e[j])
            for which, name in enumerate(("logdet", "pwrss")):
                f0 = getattr(centre, name)
                axis = sum(getattr(pt, name) for pt in (plus[i], minus[i], plus[j], minus[j]))
                dd[which, i, j] = dd[which, j, i] = (sum(getattr(pt, name) for pt in both) - axis
                                                     + 2 * f0) / (2 * steps[i] * steps[j])
    d_vcov = np.array([(plus[i].unscaled_vcov - minus[i].unscaled_vcov) / (2 * steps[i]) for i in range(k)])
    return d_r, dd[0], dd[1], d_vcov


def combine_df(nu: np.ndarray, tol: float = 1e-8) -> float:
    """The F test's denominator df from the νᵢ of its independent t tests (Fai & Cornelius 1996)."""
    nu = np.asarray(nu, dtype=float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(nu.mean())
    if np.any(nu <= 2):
        return 2.0
    E = float(np.sum(nu / (nu - 2)))
    return 2.0 * E / (E - nu.size) if E > nu.size else 2.0


def _inverse(h: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """2·H⁻¹'s inverse part: H⁻¹ over H's positive eigenvalues (lmerTest's rule).

    A negative eigenvalue means the point is not a minimum: no df there.  Eigenvalues
    within ``tol`` of 0 (a variance parameter the data do not inform, e.g. at its
    boundary) are left out of the inverse, with a warning.
    """
    values, vectors = np.linalg.eigh((h + h.T) / 2)
    scale = max(1.0, float(np.max(np.abs(values))))
    if np.any(values < -tol * scale):
        raise ModelError("the deviance's Hessian in the variance parameters has a negative eigenvalue: the "
                         "fit is not at a minimum, so Satterthwaite degrees of freedom are not defined; "
                         "check the fit's convergence")
    keep = values > tol * scale
    if not keep.all():
        warnings.warn(f"{int((~keep).sum())} variance-parameter direction(s) with no curvature in the deviance "
                      "(a variance at its boundary?): left out of the degrees of freedom", RuntimeWarning,
                      stacklevel=3)
    v = vectors[:, keep]
    return (v / values[keep]) @ v.T
