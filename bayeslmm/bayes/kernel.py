"""A compiled log-posterior for the commonest model, so NUTS starts in a second.

For one grouping factor with one or two random-effect columns — ``y ~ x + (1 | g)``,
``y ~ x + (1 + x | g)``, ``(x || g)`` — the collapsed log-posterior and its gradient
are written out by hand here and compiled once by numba with ``cache=True``: the
machine code is written next to this file (or, where that and the user's cache folder
are read-only, into a private temporary folder: :func:`.compiled.cached_njit`) and loaded (in
~0.1 s) by every later process.  nutpie's NUTS calls it as a C function (:mod:`.native`), one
thread per chain, never entering Python.
The general path (PyMC's graph compiled by PyTensor, or by numba through
``nutpie.compile_pymc_model``) compiles a new function for every model, which cost
about 10 s per fit on sleepstudy; that is what this module avoids.

The model is the one :func:`bayeslmm.bayes.model.build_pymc_model` builds — the same
priors and the same collapsed likelihood (see :mod:`.collapsed` for the formula) —
only the unconstrained coordinates differ (Stan's, for a 2×2 correlation):

    x = [β_c (p),  log σ,  log sd_1 … log sd_q,  atanh ρ (correlated q = 2 only)]

Gradient of the collapsed log-likelihood (per level j, with u_j = g_j − H_jβ,
A_j = LᵀG_jL, M_j = I + A_j/σ², P_j = M_j⁻¹, w_j = Lᵀu_j, v_j = P_jw_j, s = σ²):

    ∂ℓ/∂β = (Xᵀy − XᵀXβ)/s − Σ_j H_jᵀLv_j / s²
    ∂ℓ/∂s = −½[N/s − Σ tr(P_jA_j)/s² − rᵀr/s² − Σ v_jᵀA_jv_j/s⁴ + 2Σ w_jᵀv_j/s³]
    ∂ℓ/∂L = −Σ G_jLP_j/s + Σ (u_jv_jᵀ − G_jLv_jv_jᵀ/s)/s²

(derived from d log|M| = tr(P dM) and d(wᵀPw) = 2vᵀdw − vᵀdM v).  The tests check
the value against the PyTensor likelihood and the gradient against finite differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import prange

from ..spec import ModelSpec
from .collapsed import CollapsedData
from .compiled import cached_njit
from .densities import (LOG_2PI, SCALE_FAMILIES, beta_prior, finite_or_rejected, log_sech2, prior_centre, scale_logp,
                        scale_params)
from .priors import PriorSet

def unsupported_reason(spec: ModelSpec, priors: PriorSet, parameterization: str) -> str | None:
    """Why the compiled kernel cannot fit this model (``None`` when it can)."""
    if parameterization != "collapsed":
        return "the kernel is for the collapsed parameterisation"
    if len(spec.blocks) != 1:
        return "the kernel handles one random-effect term"
    if spec.blocks[0].q > 2:
        return "the kernel handles at most two random-effect columns"
    if any(p.family != "Normal" for p in priors.beta):
        return "the kernel handles Normal priors on the fixed effects"
    for prior in (priors.sigma, priors.blocks[0].sd):
        if prior.family not in SCALE_FAMILIES:
            return f"the kernel does not implement a {prior.family} prior"
    return None


@dataclass(frozen=True, eq=False)
class KernelData:
    """Everything the compiled log-posterior reads, as contiguous float arrays."""

    G: np.ndarray        # (J, q, q)
    H: np.ndarray        # (J, q, p)
    g: np.ndarray        # (J, q)
    XtX: np.ndarray      # (p, p)
    Xty: np.ndarray      # (p,)
    yty: float
    n: int
    Cm: np.ndarray       # (p, p): β = Cm β_c
    mu_b: np.ndarray     # (p,)
    s_b: np.ndarray      # (p,)
    fam_sigma: int
    par_sigma: np.ndarray   # (2,)
    fam_sd: int
    par_sd: np.ndarray      # (q, 2)
    eta: float
    correlated: bool

    @property
    def p(self) -> int:
        return self.XtX.shape[0]

    @property
    def q(self) -> int:
        return self.G.shape[1]

    @property
    def ndim(self) -> int:
        return self.p + 1 + self.q + (1 if self.correlated and self.q == 2 else 0)

    @property
    def work(self) -> int:
        """Levels × columns: what one gradient loops over (chooses threads for the chains)."""
        return self.G.shape[0] * self.q

    @classmethod
    def build(cls, spec: ModelSpec, data: CollapsedData, priors: PriorSet, Cm: np.ndarray) -> "KernelData":
        block = spec.blocks[0]
        fam_sigma, par_sigma = scale_params(priors.sigma, 1)
        fam_sd, par_sd = scale_params(priors.blocks[0].sd, block.q)
        return cls(G=np.ascontiguousarray(data.G, dtype=float), H=np.ascontiguousarray(data.H, dtype=float),
                   g=np.ascontiguousarray(data.g, dtype=float), XtX=np.ascontiguousarray(data.XtX),
                   Xty=np.ascontiguousarray(data.Xty), yty=float(data.yty), n=int(data.n_obs),
                   Cm=np.ascontiguousarray(Cm, dtype=float),
                   mu_b=np.array([pr.params.get("mu", 0.0) for pr in priors.beta], dtype=float),
                   s_b=np.array([pr.params["sigma"] for pr in priors.beta], dtype=float),
                   fam_sigma=fam_sigma, par_sigma=par_sigma[0].copy(), fam_sd=fam_sd, par_sd=par_sd,
                   eta=float(priors.blocks[0].eta), correlated=bool(block.correlated and block.q == 2))

    def logp_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        func, args = self.compiled()
        grad = np.empty(self.ndim)
        return func(np.ascontiguousarray(x, dtype=float), *args, grad), grad

    def compiled(self):
        """(the compiled log-posterior, its arguments between x and grad), as the other kernels give them."""
        return logp_grad, (self.G, self.H, self.g, self.XtX, self.Xty, self.yty, self.n, self.Cm, self.mu_b,
                            self.s_b, self.fam_sigma, self.par_sigma, self.fam_sd, self.par_sd, self.eta,
                            self.correlated)

    def logp_function(self):
        """``x -> (logp, gradient)`` for nutpie (one per chain; the arrays are only read)."""
        func, args = self.compiled()
        ndim = self.ndim

        def logp(x, **_shared):
            grad = np.empty(ndim)
            return func(x, *args, grad), grad

        return logp

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        """Prior centres, jittered by U(−1, 1) on the unconstrained scale (PyMC's ``jitter+adapt_diag``)."""
        x = np.zeros(self.ndim)
        p, q = self.p, self.q
        x[:p] = self.mu_b + rng.uniform(-1, 1, p) * np.minimum(self.s_b, 1.0)
        x[p] = math.log(prior_centre(self.fam_sigma, self.par_sigma))
        for c in range(q):
            x[p + 1 + c] = math.log(prior_centre(self.fam_sd, self.par_sd[c]))
        x[p:] += rng.uniform(-1, 1, self.ndim - p)
        return x

    def constrain(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Draws on the unconstrained scale (..., ndim) → β, σ, sds and the correlation matrix."""
        p, q = self.p, self.q
        out = {"beta": x[..., :p] @ self.Cm.T, "sigma": np.exp(x[..., p]), "sd": np.exp(x[..., p + 1 : p + 1 + q])}
        if self.correlated:
            rho = np.tanh(x[..., p + 1 + q])
            corr = np.zeros(x.shape[:-1] + (2, 2))
            corr[..., 0, 0] = corr[..., 1, 1] = 1.0
            corr[..., 0, 1] = corr[..., 1, 0] = rho
            out["corr"] = corr
        return out


# The log-posterior in stages, each inlined into logp_grad by numba (inline="always", in
# numba's IR): called as separate functions they cost ~20 % of an evaluation on sleepstudy.
@cached_njit(error_model="numpy", inline="always")
def _scale_priors(x, p, fam_sigma, par_sigma, fam_sd, par_sd, lp, grad, sd):
    """σ = exp x_p and sd_c = exp x_(p+1+c) (written into ``sd``): lp plus their priors and Jacobians; returns (lp, σ).

    On the log scale t = log s a scale prior's density is f(s)·s, so each adds
    log f(s) + t to lp and f′(s)/f(s)·s + 1 to ∂/∂t.
    """
    ls = x[p]
    sigma = math.exp(ls)
    v0, d0 = scale_logp(fam_sigma, par_sigma[0], par_sigma[1], sigma)
    lp += v0 + ls
    grad[p] += d0 * sigma + 1.0
    for c in range(sd.shape[0]):
        lsd = x[p + 1 + c]
        sd[c] = math.exp(lsd)
        v0, d0 = scale_logp(fam_sd, par_sd[c, 0], par_sd[c, 1], sd[c])
        lp += v0 + lsd
        grad[p + 1 + c] += d0 * sd[c] + 1.0
    return lp, sigma


@cached_njit(error_model="numpy", inline="always")
def _lkj_prior(z, eta):
    """The correlation ρ = tanh z of a 2×2 block: (log density, ρ, √(1 − ρ²)).

    LKJ(η) is (1 − ρ²)^(η−1) / (2^(2η−1) B(η, η)); with the Jacobian 1 − ρ² of tanh the
    log density in z is η log(1 − ρ²) − (2η − 1) log 2 − log B(η, η), whose derivative is −2ηρ.
    """
    rho = math.tanh(z)
    lsech2 = log_sech2(z)
    cc = math.exp(0.5 * lsech2)          # √(1 − ρ²)
    lbeta = 2.0 * math.lgamma(eta) - math.lgamma(2.0 * eta)
    return eta * lsech2 - (2.0 * eta - 1.0) * math.log(2.0) - lbeta, rho, cc


@cached_njit(error_model="numpy", inline="always")
def _fixed_part(x, Cm, XtX, Xty, yty):
    """β = Cm β_c (β_c the first p coordinates), XᵀXβ and rᵀr = yᵀy − 2βᵀXᵀy + βᵀXᵀXβ."""
    p = XtX.shape[0]
    beta = np.zeros(p)
    for i in range(p):
        acc = 0.0
        for k in range(p):
            acc += Cm[i, k] * x[k]
        beta[i] = acc
    XtXb = np.zeros(p)
    rtr = yty
    for i in range(p):
        acc = 0.0
        for k in range(p):
            acc += XtX[i, k] * beta[k]
        XtXb[i] = acc
        rtr += -2.0 * beta[i] * Xty[i] + beta[i] * acc
    return beta, XtXb, rtr


@cached_njit(error_model="numpy", inline="always")
def _levels_one_column(G, H, g, beta, L00, s2, gH):
    """The per-level sums for q = 1 (L = [L00]): (Σ log M_j, Σ w_jv_j, Σ P_jA_j, Σ v_jA_jv_j, ∂ℓ/∂L00).

    With u_j = g_j − H_jβ, A_j = L00²G_j, M_j = 1 + A_j/s, P_j = 1/M_j, w_j = L00u_j,
    v_j = P_jw_j (s = σ²); ∂ℓ/∂L00 = Σ_j [−G_jL00P_j/s + (u_jv_j − G_jL00v_j²/s)/s²],
    and ``gH`` (zeros on entry) receives Σ_j H_jᵀL00v_j.
    """
    p = beta.shape[0]
    logdet = 0.0
    quad = 0.0
    trPA = 0.0
    vAv = 0.0
    a00 = 0.0
    for j in range(G.shape[0]):
        u = g[j, 0]
        for k in range(p):
            u -= H[j, 0, k] * beta[k]
        Gj = G[j, 0, 0]
        A = L00 * L00 * Gj
        M = 1.0 + A / s2
        P = 1.0 / M
        w = L00 * u
        v = P * w
        logdet += math.log(M)
        quad += w * v
        trPA += P * A
        vAv += v * A * v
        GL = Gj * L00
        a00 += -GL * P / s2 + (u * v - GL * v * v / s2) / (s2 * s2)
        Lv = L00 * v
        for k in range(p):
            gH[k] += H[j, 0, k] * Lv
    return logdet, quad, trPA, vAv, a00


@cached_njit(error_model="numpy", inline="always")
def _levels_two_columns(G, H, g, beta, L00, L10, L11, s2, gH):
    """The per-level sums for q = 2: (Σ log|M_j|, Σ w_jᵀv_j, Σ tr P_jA_j, Σ v_jᵀA_jv_j, and the
    lower triangle (0,0), (1,0), (1,1) of ∂ℓ/∂L = −Σ G_jLP_j/s + Σ (u_jv_jᵀ − G_jLv_jv_jᵀ/s)/s²).

    L = [[L00, 0], [L10, L11]]; u_j, A_j = LᵀG_jL, M_j, P_j = M_j⁻¹, w_j = Lᵀu_j and
    v_j = P_jw_j are as in the module's formulas, written out entry by entry.  ``gH``
    (zeros on entry) receives Σ_j H_jᵀLv_j.  The determinants are multiplied over eight
    levels before one log (each det M_j ≥ 1, so the product cannot underflow).
    """
    p = beta.shape[0]
    logdet = 0.0
    quad = 0.0
    trPA = 0.0
    vAv = 0.0
    a00 = a10 = a11 = 0.0
    inv_s2 = 1.0 / s2
    inv_s4 = inv_s2 * inv_s2
    detprod = 1.0
    for j in range(G.shape[0]):
        u0 = g[j, 0]
        u1 = g[j, 1]
        for k in range(p):
            u0 -= H[j, 0, k] * beta[k]
            u1 -= H[j, 1, k] * beta[k]
        g00 = G[j, 0, 0]
        g01 = G[j, 0, 1]
        g11 = G[j, 1, 1]
        # GL = G_j L (L lower: columns (L00, L10) and (0, L11))
        GL00 = g00 * L00 + g01 * L10
        GL01 = g01 * L11
        GL10 = g01 * L00 + g11 * L10
        GL11 = g11 * L11
        # A = Lᵀ G L
        A00 = L00 * GL00 + L10 * GL10
        A01 = L11 * GL10
        A11 = L11 * GL11
        M00 = 1.0 + A00 * inv_s2
        M01 = A01 * inv_s2
        M11 = 1.0 + A11 * inv_s2
        det = M00 * M11 - M01 * M01
        inv_det = 1.0 / det
        P00 = M11 * inv_det
        P01 = -M01 * inv_det
        P11 = M00 * inv_det
        w0 = L00 * u0 + L10 * u1
        w1 = L11 * u1
        v0 = P00 * w0 + P01 * w1
        v1 = P01 * w0 + P11 * w1
        detprod *= det
        if (j & 7) == 7:
            logdet += math.log(detprod)
            detprod = 1.0
        quad += w0 * v0 + w1 * v1
        trPA += P00 * A00 + 2.0 * P01 * A01 + P11 * A11
        vAv += v0 * (A00 * v0 + A01 * v1) + v1 * (A01 * v0 + A11 * v1)
        # (GL P) entries (0,0), (1,0), (1,1)
        GLP00 = GL00 * P00 + GL01 * P01
        GLP10 = GL10 * P00 + GL11 * P01
        GLP11 = GL10 * P01 + GL11 * P11
        GLv0 = GL00 * v0 + GL01 * v1
        GLv1 = GL10 * v0 + GL11 * v1
        a00 += (u0 * v0 - GLv0 * v0 * inv_s2) * inv_s4 - GLP00 * inv_s2
        a10 += (u1 * v0 - GLv1 * v0 * inv_s2) * inv_s4 - GLP10 * inv_s2
        a11 += (u1 * v1 - GLv1 * v1 * inv_s2) * inv_s4 - GLP11 * inv_s2
        Lv0 = L00 * v0
        Lv1 = L10 * v0 + L11 * v1
        for k in range(p):
            gH[k] += H[j, 0, k] * Lv0 + H[j, 1, k] * Lv1
    logdet += math.log(detprod)
    return logdet, quad, trPA, vAv, a00, a10, a11


@cached_njit(error_model="numpy", inline="always")
def _fixed_and_sigma_gradient(Cm, Xty, XtXb, gH, n, s2, rtr, quad, trPA, vAv, grad):
    """Add ∂ℓ/∂β (through β = Cm β_c) and ∂ℓ/∂log σ = 2s ∂ℓ/∂s (s = σ²) to ``grad``.

    ∂ℓ/∂β = (Xᵀy − XᵀXβ)/s − Σ_j H_jᵀLv_j/s²  and
    ∂ℓ/∂s = −½[N/s − Σ tr(P_jA_j)/s² − rᵀr/s² − Σ v_jᵀA_jv_j/s⁴ + 2Σ w_jᵀv_j/s³].
    """
    p = Cm.shape[0]
    s4 = s2 * s2
    for i in range(p):
        gb = (Xty[i] - XtXb[i]) / s2 - gH[i] / s4
        for k in range(p):
            grad[k] += Cm[i, k] * gb
    dls = -0.5 * (n / s2 - trPA / s4 - rtr / s4 - vAv / (s4 * s4) + 2.0 * quad / (s4 * s2))
    grad[p] += 2.0 * s2 * dls


@cached_njit(error_model="numpy", inline="always")
def _cholesky_gradient(a00, a10, a11, sd, rho, cc, correlated, p, grad):
    """Add ∂ℓ/∂L (lower triangle a00, a10, a11) to ``grad`` through L's coordinates.

    L00 = sd_0, L10 = sd_1ρ, L11 = sd_1√(1 − ρ²) with sd_c = exp x and ρ = tanh z:
    ∂/∂log sd_c = sd_c ∂ℓ/∂sd_c and ∂/∂z = (1 − ρ²) ∂ℓ/∂ρ.
    """
    grad[p + 1] += a00 * sd[0]
    if sd.shape[0] == 2:
        dsd1 = a10 * rho + a11 * cc
        grad[p + 2] += dsd1 * sd[1]
        if correlated:
            drho = a10 * sd[1] - a11 * sd[1] * rho / cc
            grad[p + 3] += drho * cc * cc


@cached_njit(nogil=True, error_model="numpy")
def logp_grad(x, G, H, g, XtX, Xty, yty, n, Cm, mu_b, s_b, fam_sigma, par_sigma, fam_sd, par_sd, eta,
               correlated, grad):
    """The log-posterior at the unconstrained point x; its gradient is written into ``grad``.

    Priors (each stage adds its own gradient), then the collapsed log-likelihood
    −½[N log 2πσ² + Σ_j log|M_j| + (rᵀr − Σ_j w_jᵀv_j/σ²)/σ²] from the per-level
    sums, then the likelihood's gradient by the chain rule (module docstring).
    """
    p = XtX.shape[0]
    q = G.shape[1]
    for k in range(x.shape[0]):
        grad[k] = 0.0
    lp = beta_prior(x, mu_b, s_b, grad)
    sd = np.empty(q)
    lp, sigma = _scale_priors(x, p, fam_sigma, par_sigma, fam_sd, par_sd, lp, grad, sd)
    rho = 0.0
    cc = 1.0
    if correlated:
        lkj, rho, cc = _lkj_prior(x[p + 1 + q], eta)
        lp += lkj
        grad[p + 1 + q] += -2.0 * eta * rho
    # L, the absolute Cholesky factor of the effects' covariance
    L00 = sd[0]
    L10 = 0.0
    L11 = 0.0
    if q == 2:
        L10 = sd[1] * rho
        L11 = sd[1] * cc
    s2 = sigma * sigma
    beta, XtXb, rtr = _fixed_part(x, Cm, XtX, Xty, yty)
    gH = np.zeros(p)
    a10 = a11 = 0.0
    if q == 1:
        logdet, quad, trPA, vAv, a00 = _levels_one_column(G, H, g, beta, L00, s2, gH)
    else:
        logdet, quad, trPA, vAv, a00, a10, a11 = _levels_two_columns(G, H, g, beta, L00, L10, L11, s2, gH)
    lp += -0.5 * (n * (LOG_2PI + math.log(s2)) + logdet + (rtr - quad / s2) / s2)
    _fixed_and_sigma_gradient(Cm, Xty, XtXb, gH, n, s2, rtr, quad, trPA, vAv, grad)
    _cholesky_gradient(a00, a10, a11, sd, rho, cc, correlated, p, grad)
    return finite_or_rejected(lp, grad)


@cached_njit(nogil=True, parallel=True, error_model="numpy")
def summarise_columns(d, probs, out):
    """Mean, sd (ddof 1) and quantiles (numpy's linear method) of every column of d (S, K) → out (K, 2 + len(probs)).

    Columns are independent, so they are spread over the cores (numba ``prange``).
    """
    S = d.shape[0]
    K = d.shape[1]
    for k in prange(K):
        col = np.empty(S)
        acc = 0.0
        for s in range(S):
            col[s] = d[s, k]
            acc += col[s]
        mean = acc / S
        ss = 0.0
        for s in range(S):
            ss += (col[s] - mean) ** 2
        out[k, 0] = mean
        out[k, 1] = math.sqrt(ss / (S - 1)) if S > 1 else np.nan
        col.sort()
        for i in range(probs.shape[0]):
            h = (S - 1) * probs[i]
            lo = int(math.floor(h))
            hi = min(lo + 1, S - 1)
            t = h - lo
            out[k, 2 + i] = col[lo] + t * (col[hi] - col[lo])
