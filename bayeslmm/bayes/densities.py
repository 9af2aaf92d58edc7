"""Prior densities on the unconstrained scale, compiled by numba, shared by the compiled log-posteriors.

:mod:`.kernel` (one grouping factor, q ≤ 2) and :mod:`.blocked` (every structure) read the
same priors the same way: Normal priors on the centred fixed effects, a scale family on σ
and on each sd (sampled as log s, so each adds its Jacobian), and the prior centres where
the chains start.
"""

from __future__ import annotations

import math

import numpy as np

from .compiled import cached_njit

#: scale-prior families the kernel implements, with their parameter names in order
SCALE_FAMILIES = {"HalfNormal": ("sigma",), "Exponential": ("lam",), "HalfStudentT": ("nu", "sigma"),
                  "HalfCauchy": ("beta",)}
FAMILY_CODE = {name: i for i, name in enumerate(SCALE_FAMILIES)}
LOG_2PI = math.log(2.0 * math.pi)


def scale_params(prior, size: int) -> tuple[int, np.ndarray]:
    """(family code, (size, 2) parameters in SCALE_FAMILIES order) of a scale prior, broadcast over size values."""
    names = SCALE_FAMILIES[prior.family]
    out = np.zeros((size, 2))
    for k, name in enumerate(names):
        out[:, k] = np.broadcast_to(np.asarray(prior.params[name], dtype=float), (size,))
    return FAMILY_CODE[prior.family], out


def prior_centre(fam: int, par: np.ndarray) -> float:
    """A typical value of a scale prior, where the chains start (before jitter)."""
    if fam == 1:            # Exponential(lam)
        return 1.0 / par[0]
    if fam == 2:            # HalfStudentT(nu, sigma)
        return par[1]
    return par[0]           # HalfNormal(sigma), HalfCauchy(beta)


@cached_njit(error_model="numpy")
def scale_logp(fam, a, b, s):
    """log density of a positive scale s and its derivative in s."""
    if fam == 0:    # HalfNormal(sigma=a)
        t = s / a
        return 0.5 * math.log(2.0 / math.pi) - math.log(a) - 0.5 * t * t, -t / a
    if fam == 1:    # Exponential(lam=a)
        return math.log(a) - a * s, -a
    if fam == 2:    # HalfStudentT(nu=a, sigma=b)
        t = s / b
        lp = (math.log(2.0) + math.lgamma(0.5 * (a + 1.0)) - math.lgamma(0.5 * a) - 0.5 * math.log(a * math.pi)
              - math.log(b) - 0.5 * (a + 1.0) * math.log1p(t * t / a))
        return lp, -(a + 1.0) * t / (b * a * (1.0 + t * t / a))
    # HalfCauchy(beta=a)
    t = s / a
    return math.log(2.0 / math.pi) - math.log(a) - math.log1p(t * t), -2.0 * t / (a * (1.0 + t * t))


@cached_njit(error_model="numpy")
def log_sech2(z):
    """log(1 − tanh²z) = −2 log cosh z, without overflow."""
    az = abs(z)
    return -2.0 * (az + math.log1p(math.exp(-2.0 * az)) - math.log(2.0))


@cached_njit(error_model="numpy", inline="always")
def beta_prior(x, mu_b, s_b, grad):
    """Normal priors on the centred coefficients: Σ_k log N(x_k | μ_k, s_k); sets ∂/∂x_k = −(x_k − μ_k)/s_k²."""
    lp = 0.0
    for k in range(mu_b.shape[0]):
        d = (x[k] - mu_b[k]) / s_b[k]
        lp += -0.5 * d * d - math.log(s_b[k]) - 0.5 * LOG_2PI
        grad[k] = -d / s_b[k]
    return lp


@cached_njit(error_model="numpy", inline="always")
def finite_or_rejected(lp, grad):
    """lp, or −inf with a zero gradient where the value or the gradient is not finite.

    Far in the tails (σ or an sd under- or overflowing) the value or gradient is not
    finite: a point NUTS must reject, reported as a divergence, never as NaN.
    """
    finite = math.isfinite(lp)
    for k in range(grad.shape[0]):
        finite = finite and math.isfinite(grad[k])
    if finite:
        return lp
    for k in range(grad.shape[0]):
        grad[k] = 0.0
    return -math.inf
