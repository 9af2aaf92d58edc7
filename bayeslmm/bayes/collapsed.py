"""The collapsed (marginal) likelihood of a linear mixed model, and exact draws of the effects.

With the first random-effect block (the factor with the most levels) integrated
out and everything else — the fixed effects β and, for crossed or nested models,
the other blocks' effects b_R — in one coefficient vector γ over the columns
X̃ = [Z_R X], the shared DESIGN.md formula reads, per level j of the first block:

    M_j = I + LᵀG_jL/σ²,   w_j = Lᵀ(g_j − H_jγ)
    log p(y | γ, L, σ) = −½[N log 2πσ² + Σ_j log|M_j| + (rᵀr − Σ_j w_jᵀM_j⁻¹w_j/σ²)/σ²]
    rᵀr = yᵀy − 2γᵀX̃ᵀy + γᵀX̃ᵀX̃γ

with G_j = Z_1jᵀZ_1j, H_j = Z_1jᵀX̃_j, g_j = Z_1jᵀy_j and L the absolute Cholesky
factor of the first block's covariance.  Every array comes from
:class:`~bayeslmm.crossprod.CrossProducts`; a gradient costs O(J q³ + J q r + r²).
With one grouping factor X̃ = X and this is the fully collapsed model; with more,
the other factors are sampled non-centred (Lai, Domke & Sheldon 2024's partial
collapse) and the likelihood stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..crossprod import CrossProducts
from . import naming
from .priors import PriorSet


@dataclass(frozen=True, eq=False)
class CollapsedData:
    """The arrays the collapsed likelihood reads (levels of the first block: J)."""

    G: np.ndarray      # (J, q, q)
    H: np.ndarray      # (J, q, r)  r = effects of the other blocks + p
    g: np.ndarray      # (J, q)
    XtX: np.ndarray    # (r, r)
    Xty: np.ndarray    # (r,)
    yty: float
    n_obs: int

    def with_response(self, g, Xty, yty) -> "CollapsedData":
        """The same design with other response-dependent blocks (arrays or shared tensors)."""
        return CollapsedData(G=self.G, H=self.H, g=g, XtX=self.XtX, Xty=Xty, yty=yty, n_obs=self.n_obs)

    @classmethod
    def from_crossprods(cls, cp: CrossProducts, scale: "ResponseScale | None" = None) -> "CollapsedData":
        """The arrays of y itself, or with ``scale`` those of the standardised response (y − shift)/scale."""
        J, q = cp.first.n_levels, cp.first.q
        m = cp.m
        B = cp.B.toarray() if cp.B.shape[0] * cp.B.shape[1] <= 50_000_000 else None
        if B is None:
            raise MemoryError("the coupling between grouping factors is too large for the collapsed sampler")
        r = m - 1
        H = B[:r, :].T.reshape(J, q, r)
        g = B[r, :].reshape(J, q)
        Arr = np.ascontiguousarray(cp.Arr)
        XtX, Xty, yty = Arr[:r, :r].copy(), Arr[:r, r].copy(), float(Arr[r, r])
        if scale is not None:
            # the blocks are of y − cp.y_shift, which is the scale's shift: divide, nothing to undo
            s = scale.scale
            return cls(G=cp.A11, H=np.ascontiguousarray(H), g=np.ascontiguousarray(g / s), XtX=XtX, Xty=Xty / s,
                       yty=yty / s / s, n_obs=cp.n_obs)
        if cp.y_shift:
            # the blocks are of y' = y − c·1 (CrossProducts.response_shift); the likelihood here is
            # of y itself: 1 is the intercept column k, so Zᵀ1 = H[..., k], X̃ᵀ1 = X̃ᵀX̃[:, k]
            c, k = cp.y_shift, cp.n_rest_effects + cp.intercept
            yty = yty + 2.0 * c * Xty[k] + c * c * cp.n_obs
            g = g + c * H[:, :, k]
            Xty = Xty + c * XtX[:, k]
        return cls(G=cp.A11, H=np.ascontiguousarray(H), g=np.ascontiguousarray(g), XtX=XtX,
                   Xty=Xty, yty=yty, n_obs=cp.n_obs)


@dataclass(frozen=True)
class ResponseScale:
    """The units the Bayesian engines sample in: y' = (y − shift)/scale, scale = sd(y).

    A response of any magnitude (``Reaction * 1e15``, ``* 1e-10``) or far from zero
    then looks the same to the sampler: its coordinates, step sizes and initial
    points are O(1), and the collapsed likelihood's sums yᵀy, Xᵀy stay within a few
    digits of the residual sum of squares.  It is the same model: with β' = (β −
    shift·e_intercept)/scale, σ' = σ/scale, sd' = sd/scale (and the effects b/scale),
    the priors mapped by :meth:`PriorSet.standardised` are the densities of the
    primed variables, so the posterior maps back exactly (:meth:`to_data_units`).
    The shift is the cross-products' own (``CrossProducts.y_shift``, the mean of a
    response > 30 sds from zero in a model with an intercept), so no sum is undone.
    """

    shift: float
    scale: float
    intercept: int      # the intercept's index among the fixed effects (−1: none, then shift is 0)

    @classmethod
    def of(cls, spec, cp: CrossProducts) -> "ResponseScale":
        sd = float(np.std(spec.y)) if spec.rows_in_memory else float(spec.moments.y.std[0])
        if not (np.isfinite(sd) and sd > 0):
            sd = 1.0
        return cls(shift=float(cp.y_shift), scale=sd, intercept=int(cp.intercept) if cp.y_shift else -1)

    def standardise(self, y: np.ndarray) -> np.ndarray:
        return (y - self.shift) / self.scale

    def priors(self, priors: PriorSet) -> PriorSet:
        """``priors`` (on β, σ and the sds in the response's units) on the standardised scale."""
        return priors.standardised(self.shift, self.scale, self.intercept)

    def to_data_units(self, post, names: list[str]):
        """Posterior draws sampled on the standardised scale (an xarray Dataset) in the response's units.

        β, σ, every block's sds and sampled effects; correlations have no units.
        """
        known = ({"beta", "sigma"} | {naming.sd_var(n) for n in names} | {naming.corr_var(n) for n in names}
                 | set(names))
        unknown = sorted(set(post.data_vars) - known)
        if unknown:  # a variable whose units are not known here must not be returned half-mapped
            raise RuntimeError(f"ResponseScale.to_data_units: no rule for the variables {unknown}")
        out = post.copy()
        beta = post["beta"].to_numpy() * self.scale
        if self.shift:
            beta[..., self.intercept] += self.shift
        out["beta"] = post["beta"].copy(data=beta)
        for var in ["sigma"] + [naming.sd_var(n) for n in names] + list(names):
            if var in post:
                out[var] = post[var] * self.scale
        return out


def collapsed_loglik(data: CollapsedData, gamma, L, sigma):
    """The marginal log-likelihood as a PyTensor expression.

    Parameters
    ----------
    gamma : tensor (r,)
    L : tensor (q, q), lower triangular
    sigma : scalar tensor
    """
    import pytensor.tensor as pt

    q = data.G.shape[1]
    s2 = sigma**2
    r = data.H.shape[2]
    if r <= 8:  # few coefficients: unrolled, so the whole likelihood fuses into elementwise loops
        u = [data.g[:, i] - sum(data.H[:, i, k] * gamma[k] for k in range(r)) for i in range(q)]
    else:
        ug = data.g - pt.tensordot(data.H, gamma, axes=[[2], [0]])      # (J, q)
        u = [ug[:, i] for i in range(q)]
    if q == 1:
        a = L[0, 0]
        M = 1.0 + a**2 * data.G[:, 0, 0] / s2
        w = a * u[0]
        logdet = pt.sum(pt.log(M))
        quad = pt.sum(w**2 / M)
    else:
        # M_j = I + LᵀG_jL/σ² entry by entry, each a length-J vector, then its Cholesky
        # factor and a forward solve unrolled over the q×q entries: elementwise ops only,
        # which compile fast and vectorise over the levels
        GL = [[sum(data.G[:, i, k] * L[k, c] for k in range(q)) for c in range(q)] for i in range(q)]
        M = [[sum(L[i, a] * GL[i][b] for i in range(q)) / s2 + (1.0 if a == b else 0.0) for b in range(q)]
             for a in range(q)]
        w = [sum(L[i, a] * u[i] for i in range(q)) for a in range(q)]           # Lᵀu_j
        C = [[None] * q for _ in range(q)]
        v = [None] * q
        logdet = 0.0
        for i in range(q):
            for j in range(i + 1):
                acc = M[i][j] - sum(C[i][k] * C[j][k] for k in range(j))
                if i == j:
                    C[i][i] = pt.sqrt(acc)
                else:
                    C[i][j] = acc / C[j][j]
            logdet = logdet + 2.0 * pt.sum(pt.log(C[i][i]))
            v[i] = (w[i] - sum(C[i][k] * v[k] for k in range(i))) / C[i][i]     # C v = w
        quad = pt.sum(sum(vi**2 for vi in v))
    rtr = data.yty - 2.0 * pt.dot(gamma, data.Xty) + pt.dot(gamma, pt.dot(data.XtX, gamma))
    n = data.n_obs
    return -0.5 * (n * pt.log(2.0 * np.pi * s2) + logdet + (rtr - quad / s2) / s2)


def draw_first_block(data: CollapsedData, gamma: np.ndarray, L: np.ndarray, sigma: np.ndarray,
                     rng: np.random.Generator, chunk: int = 256) -> np.ndarray:
    """Exact draws of the first block's effects, one per posterior draw.

    b_j | y, γ, L, σ ~ N(m_j, S_j), S_j = L M_j⁻¹ Lᵀ, m_j = S_j (g_j − H_jγ)/σ²
    (written as b_j = L v_j, v_j ~ N(M_j⁻¹w_j/σ², M_j⁻¹)).

    Parameters
    ----------
    gamma : (S, r)   L : (S, q, q)   sigma : (S,)

    Returns
    -------
    ndarray (S, J, q)
    """
    S = gamma.shape[0]
    J, q = data.g.shape
    out = np.empty((S, J, q))
    for start in range(0, S, chunk):
        sl = slice(start, min(S, start + chunk))
        gm, Ls, s2 = gamma[sl], L[sl], sigma[sl] ** 2
        if q <= 2:
            from .compiled import draw_effects_small  # numba, imported when a draw needs it

            # closed form for q ≤ 2, fused over (draws, levels) in one compiled loop
            eps = rng.standard_normal((q,) + (gm.shape[0], J)) if q == 2 else rng.standard_normal((1, gm.shape[0], J))
            draw_effects_small(data.G, data.H, data.g, np.ascontiguousarray(gm), np.ascontiguousarray(Ls), s2, eps,
                               out[sl])
            continue
        u = data.g[None] - np.einsum("jqr,sr->sjq", data.H, gm)                    # (s, J, q)
        w = np.einsum("sba,sjb->sja", Ls, u)                                        # Lᵀu
        M = np.einsum("sba,jbc,scd->sjad", Ls, data.G, Ls) / s2[:, None, None, None]
        M += np.eye(q)
        C = np.linalg.cholesky(M)                                                   # M = C Cᵀ
        # v = M⁻¹ w/σ² + C⁻ᵀ ε
        rhs = w / s2[:, None, None]
        y1 = np.linalg.solve(C, rhs[..., None])
        mean = np.linalg.solve(np.swapaxes(C, -1, -2), y1)[..., 0]
        eps = rng.standard_normal(mean.shape)
        noise = np.linalg.solve(np.swapaxes(C, -1, -2), eps[..., None])[..., 0]
        v = mean + noise
        out[sl] = np.einsum("sab,sjb->sja", Ls, v)
    return out
