"""The collapsed log-posterior of every random-effect structure, compiled once.

Crossed, nested, several terms on one factor, ``||``, q ≥ 3: every random effect is
integrated out, and NUTS samples only β, σ and each block's sds and correlations.  The
algebra is the REML engine's (:mod:`bayeslmm.reml.deviance`), not profiled: with the
relative factor Λ = blockdiag(I ⊗ T_k), T_k = C_k/σ (C_k the absolute Cholesky factor of
block k's covariance), and the augmented matrix

    C = [ ΛᵀZᵀZΛ + I   ΛᵀZᵀ[X y] ]      factored blockwise as the deviance does: the first
        [ [X y]ᵀZΛ     [X y]ᵀ[X y]]      block level by level, the rest one dense Cholesky,

the log-likelihood with every effect integrated out is

    ℓ(β, σ, T) = −½[N log 2πσ² + log|ΛᵀZᵀZΛ + I| + bᵀS b/σ²],   b = [−β; 1],

S the Schur complement of the effects in C, i.e. L_xy L_xyᵀ from the Cholesky factor's
last p + 1 rows.  Nothing here touches the rows: the inputs are
:class:`~bayeslmm.crossprod.CrossProducts`.

Gradient, by reverse accumulation through the same stages.  With G_C = ∂ℓ/∂C (symmetric,
dℓ = tr(G_C dC)) on the dense part,

    G_C = −½ (C_RR⁻¹ ⊕ 0) − z zᵀ/(2σ²),    z = [−C_RR⁻¹C_R,xy b; b]

(d log|C_RR| = tr(C_RR⁻¹dC_RR); bᵀdS b = zᵀdC z).  The rest's C = ΛᵣᵀDΛᵣ + I gives
∂ℓ/∂Λᵣ = 2DΛᵣG_C (read on Λᵣ's diagonal blocks) and ∂ℓ/∂D = ΛᵣG_CΛᵣᵀ; D = Arr − Σ_j B_jW_jB_jᵀ
gives Ḡ_j = ∂ℓ/∂W_j = −B_jᵀ(∂ℓ/∂D)B_j; and per level of the first block, with
M_j = T₁ᵀA_jT₁ + I, P_j = M_j⁻¹, W_j = T₁P_jT₁ᵀ and −½log|M_j| in ℓ,

    ∂ℓ/∂T₁ = Σ_j 2Ḡ_jT₁P_j − 2A_jT₁(K_j + ½P_j),   K_j = P_jT₁ᵀḠ_jT₁P_j.

T_k = C_k/σ adds −Σ_k tr(∂ℓ/∂T_kᵀ T_k)/σ to ∂ℓ/∂σ; C_k = diag(sd_k)·L_k.

Coordinates (Stan's): x = [β_c (p), log σ, then per block log sd (q_k) and, for a
correlated block, its canonical partial correlations y (q_k(q_k−1)/2, row by row), z = tanh y].
Row i of L_k is (z_i0, z_i1 R_i1, …, z_i,i−1 R_i,i−1, R_ii) with R_ij = Π_{l<j} √(1 − z_il²).
LKJ(η) with every Jacobian is then Σ_{i>j} (q − j − 2 + 2η) log sech y_ij plus a constant:
the partial correlations are independent, (1 + z_ij)/2 ~ Beta(a_j, a_j), a_j = η + (q − j − 2)/2
(Lewandowski, Kurowicka & Joe 2009).  For one block with q ≤ 2 these are the coordinates of
:mod:`.kernel`.

After sampling, the effects are drawn exactly: the other blocks' jointly from their Gaussian
conditional given (β, θ, σ) (:func:`draw_rest_effects`, one dense solve per draw), then the
first block's given those, as for the partly collapsed route (:mod:`.collapsed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln

from ..crossprod import CrossProducts
from ..spec import ModelSpec
from .compiled import cached_njit
from .densities import (LOG_2PI, SCALE_FAMILIES, beta_prior, finite_or_rejected, log_sech2, prior_centre, scale_logp,
                        scale_params)
from .priors import PriorSet

#: coupling density (non-zeros of B over its size) above which B is kept dense and multiplied by BLAS
DENSE_COUPLING = 0.2


def unsupported_reason(spec: ModelSpec, priors: PriorSet) -> str | None:
    """Why the blocked kernel cannot sample this model (``None`` when it can)."""
    if spec.residual is not None:
        return "the blocked kernel samples R = σ²I"
    return unsupported_prior(priors)


def unsupported_prior(priors: PriorSet) -> str | None:
    """Why :class:`PriorArrays` cannot hold these priors on β, σ and the sds (``None`` when it can)."""
    if any(p.family != "Normal" for p in priors.beta):
        return "the blocked kernel handles Normal priors on the fixed effects"
    for prior in (priors.sigma,) + tuple(bp.sd for bp in priors.blocks):
        if prior.family not in SCALE_FAMILIES:
            return f"the blocked kernel does not implement a {prior.family} prior"
    return None


def lkj_log_constant(q: int, eta: float) -> float:
    """log of LKJ(η)'s normalising constant for a q×q correlation, in canonical partial correlations.

    Each z_ij (row i > column j) has density ∝ (1 − z²)^(a_j − 1) on (−1, 1), a_j = η + (q − j − 2)/2,
    whose integral is 2^(2a_j − 1) B(a_j, a_j).
    """
    out = 0.0
    for i in range(1, q):
        for j in range(i):
            a = eta + 0.5 * (q - j - 2)
            out -= (2.0 * a - 1.0) * math.log(2.0) + float(betaln(a, a))
    return out


@dataclass(frozen=True, eq=False)
class PriorArrays:
    """The priors and the coordinates' layout, as the compiled log-posteriors of any structure read them.

    x = [β_c (p), log σ, then per block k from ``blk_x0[k]``: log sd (q_k) and, when correlated,
    the partial correlations (q_k(q_k − 1)/2)]; a kernel may append coordinates of its own.
    """

    blk_q: np.ndarray      # (K,) columns of each block
    blk_corr: np.ndarray   # (K,) 1 when the block is correlated (q ≥ 2)
    blk_x0: np.ndarray     # (K,) where each block's coordinates start in x
    Cm: np.ndarray         # (p, p): β = Cm β_c
    mu_b: np.ndarray
    s_b: np.ndarray
    fam_sigma: int
    par_sigma: np.ndarray  # (2,)
    fam_sd: np.ndarray     # (K,)
    par_sd: np.ndarray     # (K, qmax, 2)
    eta: np.ndarray        # (K,)
    lkj_const: np.ndarray  # (K,)

    @classmethod
    def of(cls, spec: ModelSpec, priors: PriorSet, Cm: np.ndarray) -> "PriorArrays":
        blocks = spec.blocks
        K = len(blocks)
        blk_q = np.array([b.q for b in blocks], dtype=np.int64)
        blk_corr = np.array([int(b.correlated and b.q > 1) for b in blocks], dtype=np.int64)
        sizes = blk_q + blk_corr * blk_q * (blk_q - 1) // 2
        x0 = spec.n_fixed + 1 + np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
        fam_sd = np.zeros(K, dtype=np.int64)
        par_sd = np.zeros((K, int(blk_q.max()), 2))
        for k, (b, bp) in enumerate(zip(blocks, priors.blocks)):
            fam_sd[k], par_sd[k, : b.q] = scale_params(bp.sd, b.q)
        fam_sigma, par_sigma = scale_params(priors.sigma, 1)
        eta = np.array([bp.eta for bp in priors.blocks], dtype=float)
        return cls(blk_q=blk_q, blk_corr=blk_corr, blk_x0=x0, Cm=np.ascontiguousarray(Cm, dtype=float),
                   mu_b=np.array([pr.params.get("mu", 0.0) for pr in priors.beta], dtype=float),
                   s_b=np.array([pr.params["sigma"] for pr in priors.beta], dtype=float),
                   fam_sigma=fam_sigma, par_sigma=par_sigma[0].copy(), fam_sd=fam_sd, par_sd=par_sd, eta=eta,
                   lkj_const=np.array([lkj_log_constant(int(q), e) if c else 0.0
                                       for q, c, e in zip(blk_q, blk_corr, eta)]))

    @property
    def p(self) -> int:
        return self.Cm.shape[0]

    @property
    def size(self) -> int:
        """The coordinates these priors cover: β_c, log σ and every block's."""
        q = self.blk_q
        return self.p + 1 + int(np.sum(q + self.blk_corr * q * (q - 1) // 2))

    def args(self) -> tuple:
        """In the order the compiled functions take them, after their own arrays."""
        return (self.blk_q, self.blk_corr, self.blk_x0, self.Cm, self.mu_b, self.s_b, self.fam_sigma,
                self.par_sigma, self.fam_sd, self.par_sd, self.eta, self.lkj_const)

    def initial_point(self, rng: np.random.Generator, ndim: int) -> np.ndarray:
        """Prior centres, jittered by U(−1, 1) on the unconstrained scale (PyMC's ``jitter+adapt_diag``)."""
        x = np.zeros(ndim)
        p = self.p
        x[:p] = self.mu_b + rng.uniform(-1, 1, p) * np.minimum(self.s_b, 1.0)
        x[p] = math.log(prior_centre(self.fam_sigma, self.par_sigma))
        for k, q in enumerate(self.blk_q):
            for c in range(q):
                x[self.blk_x0[k] + c] = math.log(prior_centre(self.fam_sd[k], self.par_sd[k, c]))
        x[p:] += rng.uniform(-1, 1, ndim - p)
        return x

    def constrain(self, x: np.ndarray) -> dict:
        """Draws (..., ndim) → β, σ, and per block its sds, correlation matrix (None: uncorrelated) and
        absolute Cholesky factor C_k = diag(sd)·L_k."""
        p = self.p
        out = {"beta": x[..., :p] @ self.Cm.T, "sigma": np.exp(x[..., p]), "sd": [], "corr": [], "factor": []}
        for k, q in enumerate(self.blk_q):
            x0 = self.blk_x0[k]
            sd = np.exp(x[..., x0 : x0 + q])
            L = np.broadcast_to(np.eye(q), x.shape[:-1] + (q, q))
            corr = None
            if self.blk_corr[k]:
                L = cpc_cholesky(x[..., x0 + q : x0 + q + q * (q - 1) // 2], int(q))
                corr = L @ np.swapaxes(L, -1, -2)
            out["sd"].append(sd)
            out["corr"].append(corr)
            out["factor"].append(sd[..., :, None] * L)
        return out


class CompiledKernel:
    """What nutpie needs of a compiled log-posterior: its dimension, value and gradient, starting points.

    A subclass holds ``priors`` (:class:`PriorArrays`) and gives its compiled function
    ``(x, *own arrays, *priors.args(), grad) → log p`` and its own arrays.
    """

    priors: PriorArrays

    @property
    def p(self) -> int:
        return self.priors.p

    @property
    def ndim(self) -> int:
        raise NotImplementedError

    def compiled(self):
        """(the compiled log-posterior, its arguments between x and grad)."""
        raise NotImplementedError

    def logp_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        func, args = self.compiled()
        grad = np.empty(self.ndim)
        return func(np.ascontiguousarray(x, dtype=float), *args, grad), grad

    def logp_function(self):
        """``x -> (logp, gradient)`` for nutpie (one per chain; the arrays are only read)."""
        func, args = self.compiled()
        ndim = self.ndim

        def logp(x, **_shared):
            grad = np.empty(ndim)
            return func(x, *args, grad), grad

        return logp

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return self.priors.initial_point(rng, self.ndim)


@dataclass(frozen=True, eq=False)
class BlockedData(CompiledKernel):
    """Everything the compiled log-posterior reads: the cross-products, laid out per level, and the priors."""

    A11: np.ndarray        # (n1, q1, q1) first block, per level
    ptr: np.ndarray        # (n1 + 1,) level j's coupling rows are rows[ptr[j]:ptr[j+1]]
    rows: np.ndarray       # rest rows (random effects, then X, then y) coupled to each level
    vals: np.ndarray       # (nnz, q1) B[row, j·q1 + a]
    Bd: np.ndarray         # (m, n1·q1) B dense when dense_coupling, else (0, 0)
    Arr: np.ndarray        # (m, m) [Z_rest X y]ᵀ[Z_rest X y]
    rest_off: np.ndarray   # (K,) where each block's effects start among the rest columns (first: unused)
    rest_nlev: np.ndarray  # (K,) levels of each block
    n: int
    priors: PriorArrays

    @property
    def ndim(self) -> int:
        return self.priors.size

    @property
    def work(self) -> int:
        """Array elements one gradient touches, roughly (chooses threads for the chains)."""
        m = self.Arr.shape[0]
        return int(m * m * (m if self.Bd.size else 1) + self.vals.size * self.priors.blk_q[0])

    @classmethod
    def build(cls, spec: ModelSpec, cp: CrossProducts, priors: PriorSet, Cm: np.ndarray,
              scale: float = 1.0) -> "BlockedData":
        """The arrays of ``cp`` (its y column divided by ``scale``) under ``priors`` (already in those units)."""
        m = cp.m
        Arr = np.array(cp.Arr, dtype=float, order="C")
        Arr[m - 1, :] /= scale
        Arr[:, m - 1] /= scale
        B = cp.B.tocsr().copy()
        B = B.multiply(np.r_[np.ones(m - 1), 1.0 / scale][:, None]).tocsc()
        ptr, rows, vals = per_level_coupling(B, cp.first.n_levels, cp.first.q)
        dense = B.nnz > DENSE_COUPLING * B.shape[0] * B.shape[1]
        return cls(A11=np.ascontiguousarray(cp.A11), ptr=ptr, rows=rows, vals=vals,
                   Bd=np.ascontiguousarray(B.toarray()) if dense else np.zeros((0, 0)), Arr=Arr,
                   rest_off=np.array((0,) + tuple(cp.rest_offsets), dtype=np.int64),
                   rest_nlev=np.array([b.n_levels for b in spec.blocks], dtype=np.int64), n=int(cp.n_obs),
                   priors=PriorArrays.of(spec, priors, Cm))

    def compiled(self):
        return logp_grad, (self.A11, self.ptr, self.rows, self.vals, self.Bd, self.Arr, self.rest_off,
                           self.rest_nlev, self.n) + self.priors.args()

    def constrain(self, x: np.ndarray) -> dict:
        """Draws on the unconstrained scale (..., ndim) → β, σ, and per block its sds, correlation and factor."""
        return self.priors.constrain(x)

    def cholesky_factors(self, x: np.ndarray) -> list[np.ndarray]:
        """Each block's absolute Cholesky factor C_k = diag(sd)·L_k at the draws x (..., ndim)."""
        return self.priors.constrain(x)["factor"]


def cpc_cholesky(y: np.ndarray, q: int) -> np.ndarray:
    """The Cholesky factor of a correlation matrix from unconstrained partial correlations y (..., q(q−1)/2)."""
    z = np.tanh(y)
    L = np.zeros(y.shape[:-1] + (q, q))
    L[..., 0, 0] = 1.0
    k = 0
    for i in range(1, q):
        rem = np.ones(y.shape[:-1])      # R_ij²: what row i has left of its unit length
        for j in range(i):
            L[..., i, j] = z[..., k] * np.sqrt(rem)
            rem = rem * (1.0 - z[..., k] ** 2)
            k += 1
        L[..., i, i] = np.sqrt(rem)
    return L


def per_level_coupling(B, n1: int, q1: int):
    """B (m × n1·q1) as per-level row lists: (ptr, rows, vals) with vals[k, a] = B[rows[k], j·q1 + a]."""
    coo = B.tocoo()
    level, a = coo.col // q1, coo.col % q1
    order = np.lexsort((coo.row, level))
    level, row, a, v = level[order], coo.row[order].astype(np.int64), a[order], coo.data[order]
    new = np.ones(level.size, dtype=bool)
    new[1:] = (level[1:] != level[:-1]) | (row[1:] != row[:-1])
    slot = np.cumsum(new) - 1                      # each (level, row) pair's place in rows/vals
    rows = row[new]
    vals = np.zeros((rows.size, q1))
    vals[slot, a] = v
    ptr = np.zeros(n1 + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(level[new], minlength=n1))
    return ptr, rows, np.ascontiguousarray(vals)


# --------------------------------------------------------------------------- compiled stages

@cached_njit(error_model="numpy")
def block_factor(x, x0, q, corr, eta, lkj_const, fam, par, sd, Lc, grad):
    """Block k's sds (into ``sd``) and correlation factor (into ``Lc``) from x; returns its log prior.

    The prior's gradient is added to ``grad``: log sd_c carries its scale prior and Jacobian,
    each partial correlation y_ij the weight (q − j − 2 + 2η) of log sech y_ij.
    """
    lp = 0.0
    for c in range(q):
        lsd = x[x0 + c]
        sd[c] = math.exp(lsd)
        v, d = scale_logp(fam, par[c, 0], par[c, 1], sd[c])
        lp += v + lsd
        grad[x0 + c] += d * sd[c] + 1.0
    for a in range(q):
        for b in range(q):
            Lc[a, b] = 1.0 if a == b else 0.0
    if corr == 0:
        return lp
    lp += lkj_const
    k = x0 + q
    for i in range(1, q):
        rem = 1.0
        for j in range(i):
            y = x[k]
            z = math.tanh(y)
            Lc[i, j] = z * math.sqrt(rem)
            rem *= 1.0 - z * z
            w = q - j - 2 + 2.0 * eta
            lp += 0.5 * w * log_sech2(y)                 # w log sech y
            grad[k] -= w * z
            k += 1
        Lc[i, i] = math.sqrt(rem)
    return lp


@cached_njit(error_model="numpy")
def block_backprop(x, x0, q, corr, sd, Lc, gC, grad):
    """Add ∂ℓ/∂C_k (lower triangle of ``gC``, C_k = diag(sd)·Lc) to ``grad`` through block k's coordinates.

    ∂L_ij/∂y_im = sech²(y_ij) R_ij (m = j), −z_im L_ij (m < j ≤ i), 0 otherwise (R_ii = L_ii).
    """
    for i in range(q):
        acc = 0.0
        for b in range(i + 1):
            acc += gC[i, b] * Lc[i, b]
        grad[x0 + i] += acc * sd[i]           # ∂/∂log sd_i = sd_i Σ_b ∂ℓ/∂C_ib L_ib
    if corr == 0:
        return
    k = x0 + q
    for i in range(1, q):
        for m in range(i):
            z = math.tanh(x[k])
            if z != 0.0:
                rim = Lc[i, m] / z
            else:   # R_im = Π_{l<m} √(1 − z_il²), recomputed where L_im / z is 0/0
                rim = 1.0
                for l in range(m):
                    zl = math.tanh(x[k - m + l])
                    rim *= math.sqrt(1.0 - zl * zl)
            tail = 0.0
            for j in range(m + 1, i + 1):
                tail += sd[i] * gC[i, j] * Lc[i, j]
            grad[k] += sd[i] * gC[i, m] * (1.0 - z * z) * rim - z * tail
            k += 1


@cached_njit(error_model="numpy", inline="always")
def small_cholesky(M, q, L):
    """The lower Cholesky factor of the small q×q matrix M into L, by loops (no LAPACK call per level);
    returns log|M|, or −inf where M is not positive definite."""
    logdet = 0.0
    for i in range(q):
        for j in range(i + 1):
            acc = M[i, j]
            for k in range(j):
                acc -= L[i, k] * L[j, k]
            if i == j:
                if not acc > 0.0:
                    return -math.inf
                L[i, i] = math.sqrt(acc)
                logdet += math.log(acc)
            else:
                L[i, j] = acc / L[j, j]
    return logdet


@cached_njit(error_model="numpy")
def _small_cholesky_inverse(M, q, Lw, Li, P):
    """Cholesky factor Lw of the q×q SPD matrix M and P = M⁻¹ (Li: work space); returns log|M| (−inf when not PD)."""
    if q == 1:                      # the commonest block, (1 | g): no loops
        if not M[0, 0] > 0.0:
            return -math.inf
        Lw[0, 0] = math.sqrt(M[0, 0])
        P[0, 0] = 1.0 / M[0, 0]
        return math.log(M[0, 0])
    logdet = small_cholesky(M, q, Lw)
    if logdet == -math.inf:
        return logdet
    # P = Lw⁻ᵀ Lw⁻¹ through the inverse factor
    for i in range(q):
        Li[i, i] = 1.0 / Lw[i, i]
        for j in range(i):
            acc = 0.0
            for k in range(j, i):
                acc += Lw[i, k] * Li[k, j]
            Li[i, j] = -acc / Lw[i, i]
    for a in range(q):
        for b in range(q):
            acc = 0.0
            for k in range(max(a, b), q):
                acc += Li[k, a] * Li[k, b]
            P[a, b] = acc
    return logdet


@cached_njit(error_model="numpy")
def first_block_weights(A11, T1, q1, W, P):
    """Per level: P_j = (T₁ᵀA_jT₁ + I)⁻¹ and W_j = T₁P_jT₁ᵀ; returns Σ_j log|M_j| (−inf when not PD)."""
    if q1 == 2:
        return _weights_two_columns(A11, T1, W, P)
    n1 = A11.shape[0]
    M = np.empty((q1, q1))
    Lw = np.zeros((q1, q1))
    AT = np.empty((q1, q1))
    TP = np.empty((q1, q1))
    Li = np.zeros((q1, q1))
    logdet = 0.0
    for j in range(n1):
        for a in range(q1):
            for b in range(q1):
                acc = 0.0
                for c in range(q1):
                    acc += A11[j, a, c] * T1[c, b]
                AT[a, b] = acc
        for a in range(q1):
            for b in range(q1):
                acc = 1.0 if a == b else 0.0
                for c in range(q1):
                    acc += T1[c, a] * AT[c, b]
                M[a, b] = acc
        ld = _small_cholesky_inverse(M, q1, Lw, Li, P[j])
        if ld == -math.inf:
            return ld
        logdet += ld
        for a in range(q1):
            for b in range(q1):
                acc = 0.0
                for c in range(q1):
                    acc += T1[a, c] * P[j, c, b]
                TP[a, b] = acc
        for a in range(q1):
            for b in range(q1):
                acc = 0.0
                for c in range(q1):
                    acc += TP[a, c] * T1[b, c]
                W[j, a, b] = acc
    return logdet


@cached_njit(error_model="numpy")
def _weights_two_columns(A11, T1, W, P):
    """:func:`first_block_weights` for q₁ = 2 written out (the commonest correlated block, (1 + x | g)):
    M = TᵀAT + I by its three entries, P = M⁻¹ by the 2 × 2 adjugate, W = TPTᵀ (T lower triangular)."""
    t00, t10, t11 = T1[0, 0], T1[1, 0], T1[1, 1]
    logdet = 0.0
    for j in range(A11.shape[0]):
        a00, a01, a11 = A11[j, 0, 0], A11[j, 0, 1], A11[j, 1, 1]
        # AT's columns, then M = Tᵀ(AT) + I
        c00, c10 = a00 * t00 + a01 * t10, a01 * t00 + a11 * t10
        c01, c11 = a01 * t11, a11 * t11
        m00 = t00 * c00 + t10 * c10 + 1.0
        m01 = t00 * c01 + t10 * c11
        m11 = t11 * c11 + 1.0
        det = m00 * m11 - m01 * m01
        if not (m00 > 0.0 and det > 0.0):
            return -math.inf
        logdet += math.log(det)
        p00, p01, p11 = m11 / det, -m01 / det, m00 / det
        P[j, 0, 0], P[j, 0, 1], P[j, 1, 0], P[j, 1, 1] = p00, p01, p01, p11
        # W = T P Tᵀ with T = [[t00, 0], [t10, t11]]
        r0, r1 = t10 * p00 + t11 * p01, t10 * p01 + t11 * p11     # row 1 of T P
        w00 = t00 * t00 * p00
        w01 = t00 * (p00 * t10 + p01 * t11)
        w11 = r0 * t10 + r1 * t11
        W[j, 0, 0], W[j, 0, 1], W[j, 1, 0], W[j, 1, 1] = w00, w01, w01, w11
    return logdet


@cached_njit(error_model="numpy")
def _times_levels(Bd, W):
    """B·blockdiag(W_j) for a dense B (m, n1·q1): flat loops over the levels, one per (a, b), that vectorise."""
    n1, q1 = W.shape[0], W.shape[1]
    Wt = np.empty((q1, q1, n1))
    for j in range(n1):
        for a in range(q1):
            for b in range(q1):
                Wt[a, b, j] = W[j, a, b]
    out = np.zeros_like(Bd)
    for r in range(Bd.shape[0]):
        brow, orow = Bd[r], out[r]
        if q1 == 2:    # (1 + x | g): both columns of a level at once
            for j in range(n1):
                b0, b1 = brow[2 * j], brow[2 * j + 1]
                orow[2 * j] = b0 * Wt[0, 0, j] + b1 * Wt[1, 0, j]
                orow[2 * j + 1] = b0 * Wt[0, 1, j] + b1 * Wt[1, 1, j]
            continue
        for a in range(q1):
            for b in range(q1):
                w = Wt[a, b]
                for j in range(n1):
                    orow[j * q1 + b] += brow[j * q1 + a] * w[j]
    return out


@cached_njit(error_model="numpy")
def _level_inner_products(U, V, n1, q1, scale):
    """scale · U_jᵀV_j for each level's q1 columns of the dense U, V (m, n1·q1), as (n1, q1, q1): row by row,
    one flat loop over the levels per (a, b)."""
    acc = np.zeros((q1, q1, n1))
    for r in range(U.shape[0]):
        urow, vrow = U[r], V[r]
        for a in range(q1):
            for b in range(q1):
                out = acc[a, b]
                for j in range(n1):
                    out[j] += urow[j * q1 + a] * vrow[j * q1 + b]
    G = np.empty((n1, q1, q1))
    for j in range(n1):
        for a in range(q1):
            for b in range(q1):
                G[j, a, b] = scale * acc[a, b, j]
    return G


@cached_njit(error_model="numpy")
def _schur_first_block(Arr, ptr, rows, vals, Bd, W, q1):
    """D = Arr − Σ_j B_jW_jB_jᵀ (full, symmetric): by BLAS when B is dense, else level by level."""
    n1 = W.shape[0]
    if Bd.shape[0] > 0:
        return Arr - _times_levels(Bd, W) @ Bd.T
    D = Arr.copy()
    bw = np.empty(q1)
    for j in range(n1):
        for ia in range(ptr[j], ptr[j + 1]):
            for b in range(q1):
                acc = 0.0
                for a in range(q1):
                    acc += vals[ia, a] * W[j, a, b]
                bw[b] = acc
            ra = rows[ia]
            for ib in range(ptr[j], ia + 1):
                acc = 0.0
                for b in range(q1):
                    acc += bw[b] * vals[ib, b]
                D[ra, rows[ib]] -= acc
                if ib != ia:
                    D[rows[ib], ra] -= acc
    return D


@cached_njit(error_model="numpy")
def _left_rest_factor(D, T, rest_off, rest_nlev, blk_q, transpose):
    """Λᵣᵀ D (transpose) or Λᵣ D for Λᵣ = blockdiag over the rest blocks of I ⊗ T_k, then I on X and y.

    Only products from the left: each is a combination of a level's q rows, contiguous in
    the C-ordered D (a product from the right would stride down its columns).  A symmetric
    D's right products are the transposes: DΛᵣ = (Λᵣᵀ D)ᵀ.
    """
    m = D.shape[1]
    out = D.copy()
    for k in range(1, blk_q.shape[0]):
        q = blk_q[k]
        for lev in range(rest_nlev[k]):
            c0 = rest_off[k] + lev * q
            for i in range(q):
                for c in range(m):
                    out[c0 + i, c] = 0.0
                lo, hi = (i, q) if transpose else (0, i + 1)
                for j in range(lo, hi):    # T lower triangular: (Λᵀ)_ij = T_ji, j ≥ i; Λ_ij = T_ij, j ≤ i
                    t = T[k, j, i] if transpose else T[k, i, j]
                    for c in range(m):
                        out[c0 + i, c] += t * D[c0 + j, c]
    return out


@cached_njit(error_model="numpy")
def _lower_inverse(L, n):
    """The inverse of the leading n×n block of the lower-triangular L, row by row (contiguous updates)."""
    Li = np.zeros((n, n))
    for i in range(n):
        for k in range(i):
            t = L[i, k]
            if t != 0.0:
                for c in range(k + 1):
                    Li[i, c] -= t * Li[k, c]
        Li[i, i] += 1.0
        d = 1.0 / L[i, i]
        for c in range(i + 1):
            Li[i, c] *= d
    return Li


@cached_njit(error_model="numpy")
def _augmented_factor(T, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, blk_q, mR, W, P):
    """The blocked factorisation at T: the first block level by level (P_j, W_j into P, W), its Schur
    complement D = Arr − Σ_j B_jW_jB_jᵀ, then C = ΛᵣᵀDΛᵣ + I_R and its Cholesky factor L.

    Returns (ok, Σ_j log|M_j|, E = DΛᵣ, L); ok is False where a factor is not positive definite.
    """
    q1 = blk_q[0]
    T1 = np.ascontiguousarray(T[0, :q1, :q1])
    logdet1 = first_block_weights(A11, T1, q1, W, P)
    if logdet1 == -math.inf:
        return False, logdet1, Arr, Arr
    D = _schur_first_block(Arr, ptr, rows, vals, Bd, W, q1)
    E = np.ascontiguousarray(_left_rest_factor(D, T, rest_off, rest_nlev, blk_q, True).T)   # DΛᵣ, D symmetric
    C = _left_rest_factor(E, T, rest_off, rest_nlev, blk_q, True)
    for i in range(mR):
        C[i, i] += 1.0
    try:
        L = np.linalg.cholesky(C)
    except Exception:  # noqa: BLE001  (numba raises LinAlgError for a matrix that is not PD)
        return False, logdet1, E, C
    return True, logdet1, E, L


@cached_njit(error_model="numpy")
def _dense_part(L, mR, beta):
    """From the Cholesky factor L of C: log|C_RR|, the quadratic bᵀSb, S b and what G_C is made of.

    Returns (logdet_R, quad, Sb, C_RR⁻¹ (padded to m × m), z = [−C_RR⁻¹C_R,xy b; b]).
    """
    m = L.shape[0]
    p = m - mR - 1
    logdet = 0.0
    for i in range(mR):
        logdet += 2.0 * math.log(L[i, i])
    bvec = np.empty(p + 1)
    for i in range(p):
        bvec[i] = -beta[i]
    bvec[p] = 1.0
    t = np.zeros(p + 1)        # L_xyᵀ b
    for a in range(p + 1):
        acc = 0.0
        for i in range(a, p + 1):
            acc += L[mR + i, mR + a] * bvec[i]
        t[a] = acc
    quad = 0.0
    for a in range(p + 1):
        quad += t[a] * t[a]
    Sb = np.zeros(p)           # (L_xy t)[:p]
    for i in range(p):
        acc = 0.0
        for a in range(i + 1):
            acc += L[mR + i, mR + a] * t[a]
        Sb[i] = acc
    # z = [−C_RR⁻¹C_R,xy b; b] with C_RR⁻¹C_R,xy b = L_RR⁻ᵀ (L_xy,Rᵀ b)
    Li = _lower_inverse(L, mR)
    h = np.zeros(mR)
    for c in range(mR):
        acc = 0.0
        for i in range(p + 1):
            acc += L[mR + i, c] * bvec[i]
        h[c] = acc
    z = np.empty(m)
    for c in range(mR):
        acc = 0.0
        for r in range(c, mR):
            acc += Li[r, c] * h[r]
        z[c] = -acc
    for i in range(p + 1):
        z[mR + i] = bvec[i]
    Cinv = np.zeros((m, m))
    if mR > 0:
        Cinv[:mR, :mR] = Li.T @ Li
    return logdet, quad, Sb, Cinv, z


@cached_njit(error_model="numpy")
def _rest_gradients(E, GC, T, rest_off, rest_nlev, blk_q, gT):
    """∂ℓ/∂T_k for the rest blocks (into gT[k]) from ∂ℓ/∂Λᵣ = 2EG_C; returns G_D = ΛᵣG_CΛᵣᵀ."""
    m = E.shape[0]
    for k in range(1, blk_q.shape[0]):
        q = blk_q[k]
        for lev in range(rest_nlev[k]):
            c0 = rest_off[k] + lev * q
            for a in range(q):
                for b in range(a + 1):
                    acc = 0.0
                    for c in range(m):              # G_C is symmetric: its row, not its column
                        acc += E[c0 + a, c] * GC[c0 + b, c]
                    gT[k, a, b] += 2.0 * acc
    # Λᵣ G_C Λᵣᵀ = Λᵣ (Λᵣ G_C)ᵀ, G_C symmetric: two products from the left
    F = np.ascontiguousarray(_left_rest_factor(GC, T, rest_off, rest_nlev, blk_q, False).T)
    return _left_rest_factor(F, T, rest_off, rest_nlev, blk_q, False)


@cached_njit(error_model="numpy")
def _coupling_gradient(ptr, rows, vals, Bd, GD, n1, q1):
    """Ḡ_j = −B_jᵀ G_D B_j for every level j of the first block, (n1, q1, q1)."""
    if Bd.shape[0] > 0:
        return _level_inner_products(Bd, GD @ Bd, n1, q1, -1.0)
    Gb = np.zeros((n1, q1, q1))
    for j in range(n1):
        for ia in range(ptr[j], ptr[j + 1]):
            ra = rows[ia]
            for ib in range(ptr[j], ptr[j + 1]):
                g = GD[ra, rows[ib]]
                for a in range(q1):
                    for b in range(q1):
                        Gb[j, a, b] -= vals[ia, a] * g * vals[ib, b]
    return Gb


@cached_njit(error_model="numpy")
def small_product(A, B, q, out, ta):
    """out = A B (ta = 0) or Aᵀ B (ta = 1) for q×q matrices, without BLAS's per-call overhead."""
    for a in range(q):
        for b in range(q):
            acc = 0.0
            for c in range(q):
                acc += (A[c, a] if ta else A[a, c]) * B[c, b]
            out[a, b] = acc


@cached_njit(error_model="numpy", inline="always")
def level_weights_adjoint(T1, Pj, Gbj, q1, TP, GTP, K):
    """One level's TP = T₁P_j, GTP = Ḡ_jT₁P_j and K = P_jT₁ᵀḠ_jT₁P_j + ½P_j: what both ∂ℓ/∂T₁ and
    ∂ℓ/∂A_j are made of."""
    small_product(T1, Pj, q1, TP, 0)
    small_product(Gbj, TP, q1, GTP, 0)
    small_product(TP, GTP, q1, K, 1)
    for a in range(q1):
        for b in range(q1):
            K[a, b] += 0.5 * Pj[a, b]


@cached_njit(error_model="numpy", inline="always")
def _level_two_columns(T1, Pj, Gbj):
    """:func:`level_weights_adjoint` for q₁ = 2 written out: (Ḡ_jT₁P_j row-major, then T₁K row-major)."""
    t00, t10, t11 = T1[0, 0], T1[1, 0], T1[1, 1]
    p00, p01, p11 = Pj[0, 0], Pj[0, 1], Pj[1, 1]
    g00, g01, g11 = Gbj[0, 0], Gbj[0, 1], Gbj[1, 1]
    q00, q01 = t00 * p00, t00 * p01                                  # TP = T₁P_j
    q10, q11 = t10 * p00 + t11 * p01, t10 * p01 + t11 * p11
    r00, r01 = g00 * q00 + g01 * q10, g00 * q01 + g01 * q11          # GTP = Ḡ_j TP
    r10, r11 = g01 * q00 + g11 * q10, g01 * q01 + g11 * q11
    k00 = q00 * r00 + q10 * r10 + 0.5 * p00                          # K = TPᵀ GTP + ½P_j
    k01 = q00 * r01 + q10 * r11 + 0.5 * p01
    k11 = q01 * r01 + q11 * r11 + 0.5 * p11
    # T₁K (K symmetric)
    return r00, r01, r10, r11, t00 * k00, t00 * k01, t10 * k00 + t11 * k01, t10 * k01 + t11 * k11


@cached_njit(error_model="numpy")
def _first_block_gradient(A11, Gb, T1, q1, P, gT1):
    """∂ℓ/∂T₁ = Σ_j 2Ḡ_jT₁P_j − 2A_jT₁(K_j + ½P_j), K_j = P_jT₁ᵀḠ_jT₁P_j, into gT1."""
    if q1 == 2:
        for j in range(A11.shape[0]):
            g00, g01, g10, g11, k00, k01, k10, k11 = _level_two_columns(T1, P[j], Gb[j])
            a = A11[j]
            gT1[0, 0] += 2.0 * (g00 - a[0, 0] * k00 - a[0, 1] * k10)
            gT1[0, 1] += 2.0 * (g01 - a[0, 0] * k01 - a[0, 1] * k11)
            gT1[1, 0] += 2.0 * (g10 - a[1, 0] * k00 - a[1, 1] * k10)
            gT1[1, 1] += 2.0 * (g11 - a[1, 0] * k01 - a[1, 1] * k11)
        return
    TP = np.empty((q1, q1))
    GTP = np.empty((q1, q1))
    K = np.empty((q1, q1))
    TQ = np.empty((q1, q1))
    ATQ = np.empty((q1, q1))
    for j in range(A11.shape[0]):
        level_weights_adjoint(T1, P[j], Gb[j], q1, TP, GTP, K)
        small_product(T1, K, q1, TQ, 0)
        small_product(A11[j], TQ, q1, ATQ, 0)
        for a in range(q1):
            for b in range(q1):
                gT1[a, b] += 2.0 * GTP[a, b] - 2.0 * ATQ[a, b]


@cached_njit(error_model="numpy")
def prior_logp(x, blk_q, blk_corr, blk_x0, Cm, mu_b, s_b, fam_sigma, par_sigma, fam_sd, par_sd, eta, lkj_const,
               grad):
    """The priors of β_c, σ and every block at x, their gradient written into ``grad`` (zeroed first).

    Returns (log prior, σ, sds (K, qmax), correlation factors L_k, absolute factors C_k = diag(sd)·L_k).
    """
    p = Cm.shape[0]
    K = blk_q.shape[0]
    qmax = 1
    for k in range(K):
        qmax = max(qmax, blk_q[k])
    for i in range(x.shape[0]):
        grad[i] = 0.0
    lp = beta_prior(x, mu_b, s_b, grad)
    sigma = math.exp(x[p])
    v, d = scale_logp(fam_sigma, par_sigma[0], par_sigma[1], sigma)
    lp += v + x[p]
    grad[p] += d * sigma + 1.0
    sd = np.zeros((K, qmax))
    Lc = np.zeros((K, qmax, qmax))
    C = np.zeros((K, qmax, qmax))
    for k in range(K):
        q = blk_q[k]
        lp += block_factor(x, blk_x0[k], q, blk_corr[k], eta[k], lkj_const[k], fam_sd[k], par_sd[k], sd[k], Lc[k],
                           grad)
        for a in range(q):
            for b in range(a + 1):
                C[k, a, b] = sd[k, a] * Lc[k, a, b]
    return lp, sigma, sd, Lc, C


@cached_njit(nogil=True, error_model="numpy")
def loglik_stages(beta, sigma, T, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, blk_q, n, gT):
    """The log-likelihood with every effect integrated out, and what its reverse pass leaves behind.

    Fills gT (∂ℓ/∂T_k); returns (ℓ, ∂ℓ/∂β, ∂ℓ/∂σ at fixed T, G_D = ∂ℓ/∂D, Ḡ_j = ∂ℓ/∂W_j, W_j, P_j) — the
    last four are what the derivative in the cross-products themselves is made of
    (:func:`crossproduct_adjoint`); where a factor is not positive definite ℓ = −inf and they are empty.
    """
    p = beta.shape[0]
    m = Arr.shape[0]
    mR = m - p - 1
    q1 = blk_q[0]
    n1 = A11.shape[0]
    s2 = sigma * sigma
    W = np.empty((n1, q1, q1))
    P = np.empty((n1, q1, q1))
    gbeta = np.zeros(p)
    ok, logdet1, E, L = _augmented_factor(T, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, blk_q, mR, W, P)
    if not ok:
        return -math.inf, gbeta, 0.0, np.zeros((0, 0)), np.zeros((0, q1, q1)), W, P
    logdet_R, quad, Sb, Cinv, z = _dense_part(L, mR, beta)
    ll = -0.5 * (n * (LOG_2PI + math.log(s2)) + logdet1 + logdet_R + quad / s2)
    for i in range(p):
        gbeta[i] = Sb[i] / s2
    dsigma = -n / sigma + quad / (s2 * sigma)
    GC = -0.5 * Cinv
    for a in range(m):
        for b in range(m):
            GC[a, b] -= z[a] * z[b] / (2.0 * s2)
    GD = _rest_gradients(E, GC, T, rest_off, rest_nlev, blk_q, gT)
    Gb = _coupling_gradient(ptr, rows, vals, Bd, GD, n1, q1)
    gT1 = np.zeros((q1, q1))
    _first_block_gradient(A11, Gb, np.ascontiguousarray(T[0, :q1, :q1]), q1, P, gT1)
    for a in range(q1):
        for b in range(q1):
            gT[0, a, b] += gT1[a, b]
    return ll, gbeta, dsigma, GD, Gb, W, P


@cached_njit(nogil=True, error_model="numpy")
def loglik_grad(beta, sigma, T, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, blk_q, n, gT):
    """The log-likelihood with every effect integrated out; fills gT (∂ℓ/∂T_k) and returns (ℓ, ∂ℓ/∂β, ∂ℓ/∂σ at fixed T)."""
    ll, gbeta, dsigma, _, _, _, _ = loglik_stages(beta, sigma, T, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev,
                                                  blk_q, n, gT)
    return ll, gbeta, dsigma


@cached_njit(error_model="numpy")
def crossproduct_adjoint(GD, Gb, W, P, T1, ptr, rows, vals, Bd):
    """∂ℓ/∂(the cross-products) from what :func:`loglik_stages` leaves behind: (H, G_B) with

    H_j = ∂ℓ/∂A_j = −T₁(K_j + ½P_j)T₁ᵀ, K_j = P_jT₁ᵀḠ_jT₁P_j (symmetric: dℓ = Σ H_j ∘ dA_j), and
    G_B = ∂ℓ/∂B = −2 G_D B_j W_j per level (on B's pattern: (nnz, q1), or dense (m, n1·q1));
    ∂ℓ/∂Arr is G_D itself.  D = Arr − Σ_j B_jW_jB_jᵀ gives G_B; −½log|M_j| and W_j = T₁P_jT₁ᵀ give H_j.
    """
    n1, q1 = W.shape[0], W.shape[1]
    H = np.empty((n1, q1, q1))
    TP = np.empty((q1, q1))
    GTP = np.empty((q1, q1))
    K = np.empty((q1, q1))
    TK = np.empty((q1, q1))
    for j in range(n1):
        if q1 == 2:   # H = −(TK)Tᵀ written out
            _, _, _, _, k00, k01, k10, k11 = _level_two_columns(T1, P[j], Gb[j])
            h01 = -(k00 * T1[1, 0] + k01 * T1[1, 1])
            H[j, 0, 0] = -k00 * T1[0, 0]
            H[j, 0, 1] = h01
            H[j, 1, 0] = -k10 * T1[0, 0]
            H[j, 1, 1] = -(k10 * T1[1, 0] + k11 * T1[1, 1])
            continue
        level_weights_adjoint(T1, P[j], Gb[j], q1, TP, GTP, K)
        small_product(T1, K, q1, TK, 0)
        for a in range(q1):
            for b in range(q1):
                acc = 0.0
                for c in range(q1):
                    acc += TK[a, c] * T1[b, c]
                H[j, a, b] = -acc
    if Bd.shape[0] > 0:
        return H, -2.0 * _times_levels(GD @ Bd, W)
    out = np.zeros_like(vals)
    gb = np.empty(q1)
    for j in range(n1):
        for ia in range(ptr[j], ptr[j + 1]):
            ra = rows[ia]
            for a in range(q1):
                gb[a] = 0.0
            for ib in range(ptr[j], ptr[j + 1]):    # (G_D B_j)[ra, :] on the level's rows
                g = GD[ra, rows[ib]]
                for a in range(q1):
                    gb[a] += g * vals[ib, a]
            for b in range(q1):
                acc = 0.0
                for a in range(q1):
                    acc += gb[a] * W[j, a, b]
                out[ia, b] = -2.0 * acc
    return H, out


@cached_njit(nogil=True, error_model="numpy")
def logp_grad(x, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, n, blk_q, blk_corr, blk_x0, Cm, mu_b, s_b,
              fam_sigma, par_sigma, fam_sd, par_sd, eta, lkj_const, grad):
    """The log-posterior at the unconstrained point x; its gradient is written into ``grad``."""
    p = Cm.shape[0]
    lp, sigma, sd, Lc, C = prior_logp(x, blk_q, blk_corr, blk_x0, Cm, mu_b, s_b, fam_sigma, par_sigma, fam_sd,
                                      par_sd, eta, lkj_const, grad)
    T = C / sigma
    beta = Cm @ x[:p]
    gT = np.zeros_like(C)
    ll, gbeta, dsigma = loglik_grad(beta, sigma, T, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, blk_q, n,
                                    gT)
    lp += ll
    likelihood_backprop(x, Cm, gbeta, gT, dsigma, T, sigma, sd, Lc, blk_q, blk_corr, blk_x0, grad)
    return finite_or_rejected(lp, grad)


@cached_njit(error_model="numpy")
def likelihood_backprop(x, Cm, gbeta, gT, dsigma, T, sigma, sd, Lc, blk_q, blk_corr, blk_x0, grad):
    """Add the log-likelihood's gradient in (β, T_k, σ at fixed T) to ``grad`` through the coordinates:
    β = Cm β_c; T_k = C_k/σ, so σ also takes −Σ_k tr(∂ℓ/∂T_kᵀ T_k)/σ; C_k through its sds and correlations."""
    p = Cm.shape[0]
    gbc = Cm.T @ gbeta
    for i in range(p):
        grad[i] += gbc[i]
    for k in range(blk_q.shape[0]):
        q = blk_q[k]
        gC = np.zeros((q, q))
        for a in range(q):
            for b in range(a + 1):
                if blk_corr[k] == 0 and a != b:
                    continue
                dsigma -= gT[k, a, b] * T[k, a, b] / sigma
                gC[a, b] = gT[k, a, b] / sigma
        block_backprop(x, blk_x0[k], q, blk_corr[k], sd[k], Lc[k], gC, grad)
    grad[p] += dsigma * sigma


@cached_njit(nogil=True, error_model="numpy")
def rest_effect_draws(betas, sigmas, Ts, eps, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, blk_q, out):
    """Exact draws of the rest blocks' effects b_R | y, β, θ, σ (the first block integrated out), one per draw.

    With C the augmented matrix at draw s and u_R the rest's spherical effects (b = Λu),
    u_R ~ N(C_RR⁻¹c̃, σ²C_RR⁻¹): u_R = L_RR⁻ᵀ(h + σε) with h = L_xy,Rᵀ b (b = [−β; 1]), then b_R = Λᵣu_R.
    """
    S = betas.shape[0]
    p = betas.shape[1]
    m = Arr.shape[0]
    mR = m - p - 1
    q1 = blk_q[0]
    n1 = A11.shape[0]
    W = np.empty((n1, q1, q1))
    P = np.empty((n1, q1, q1))
    for s in range(S):
        T = Ts[s]
        ok, _, _, L = _augmented_factor(T, A11, ptr, rows, vals, Bd, Arr, rest_off, rest_nlev, blk_q, mR, W, P)
        if not ok:
            raise ValueError("the augmented matrix is not positive definite at a posterior draw")
        rhs = np.empty(mR)
        for c in range(mR):
            acc = L[m - 1, c]
            for i in range(p):
                acc -= L[mR + i, c] * betas[s, i]
            rhs[c] = acc + sigmas[s] * eps[s, c]
        u = np.empty(mR)
        for c in range(mR - 1, -1, -1):          # L_RRᵀ u = rhs
            acc = rhs[c]
            for r in range(c + 1, mR):
                acc -= L[r, c] * u[r]
            u[c] = acc / L[c, c]
        for k in range(1, blk_q.shape[0]):
            q = blk_q[k]
            for lev in range(rest_nlev[k]):
                c0 = rest_off[k] + lev * q
                for a in range(q):
                    acc = 0.0
                    for b in range(a + 1):
                        acc += T[k, a, b] * u[c0 + b]
                    out[s, c0 + a] = acc


def draw_rest_effects(bd: BlockedData, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exact draws of every block's effects but the first, given the draws x (S, ndim): (S, rest effects).

    In the units ``bd`` was built in; level-major within each block, blocks in order.
    """
    x = np.ascontiguousarray(x.reshape(-1, bd.ndim))
    S = x.shape[0]
    c = bd.constrain(x)
    blk_q = bd.priors.blk_q
    Ts = relative_factors(c, blk_q)
    mR = bd.Arr.shape[0] - bd.p - 1
    eps = rng.standard_normal((S, mR))
    out = np.zeros((S, mR))
    rest_effect_draws(np.ascontiguousarray(c["beta"]), np.ascontiguousarray(c["sigma"]), Ts, eps, bd.A11, bd.ptr,
                      bd.rows, bd.vals, bd.Bd, bd.Arr, bd.rest_off, bd.rest_nlev, blk_q, out)
    return out


def relative_factors(constrained: dict, blk_q: np.ndarray) -> np.ndarray:
    """T_k = C_k/σ of every block at every draw, (S, K, qmax, qmax), from :meth:`PriorArrays.constrain`'s output."""
    sigma = constrained["sigma"].reshape(-1)
    Ts = np.zeros((sigma.size, len(blk_q), int(blk_q.max()), int(blk_q.max())))
    for k, C in enumerate(constrained["factor"]):
        q = int(blk_q[k])
        Ts[:, k, :q, :q] = C.reshape(-1, q, q) / sigma[:, None, None]
    return Ts
