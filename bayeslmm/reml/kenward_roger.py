"""Kenward–Roger's adjusted covariance of β̂ and denominator df, without an N × N matrix.

Kenward & Roger (1997, Biometrics 53:983–997) in the form pbkrtest computes it
(Halekoh & Højsgaard 2014, JSS 59(9), sections 3–4).  The marginal covariance

    V = σ² I + Σ_b Z_b (I ⊗ Σ_b) Z_bᵀ

is linear in τ = (the free entries of each Σ_b — lower triangle, or diagonal for a
``||`` block — then σ²), so G_i = ∂V/∂τ_i is Z E_i Zᵀ (E_i: a unit pattern repeated
over the block's levels) or I, and the second derivatives vanish (R_ij = 0).  With
Φ = (XᵀV⁻¹X)⁻¹, P_i = −XᵀV⁻¹G_iV⁻¹X, Q_ij = XᵀV⁻¹G_iV⁻¹G_jV⁻¹X and REML's expected
information W⁻¹_ij = ½ tr(𝒫 G_i 𝒫 G_j), 𝒫 = V⁻¹ − V⁻¹XΦXᵀV⁻¹, which expands to

    ½ [tr(V⁻¹G_iV⁻¹G_j) − 2 tr(Φ Q_ij) + tr(Φ P_i Φ P_j)],

the adjusted covariance is Φ_A = Φ + 2 Φ {Σ_ij W_ij (Q_ij − P_i Φ P_j)} Φ.  For
H₀: Lβ = 0 with q rows, Θ = Lᵀ(LΦLᵀ)⁻¹L and u_i = ΘΦP_iΦ give A₁ = Σ W_ij tr(u_i)
tr(u_j), A₂ = Σ W_ij tr(u_i u_j), and from them E*, V*, the denominator df m and the
scale λ of F = λ (Lβ̂)ᵀ(LΦ_ALᵀ)⁻¹(Lβ̂)/q — pbkrtest's ``.KR_adjust`` formulas, its
guards included.  lmerTest's ``ddf = "Kenward-Roger"`` reports these: the t tests'
SEs from Φ_A, the F tests' "F value" λF and "Mean Sq" Fσ².

No N × N matrix.  By Woodbury, V⁻¹ = σ⁻²(I − ZΛM⁻¹ΛᵀZᵀ) with M = ΛᵀZᵀZΛ + I, so
V⁻¹[Z X] = [Z X]·C for a (q+p)² matrix C, and every quantity above is a product of
S = [Z X]ᵀ[Z X] (assembled from :class:`~bayeslmm.crossprod.CrossProducts`), Λ and
the Cholesky factor of M.  The one trace over the rows is closed-form:
tr(V⁻²) = σ⁻⁴ (N − 2 tr(HmS_zz) + tr((HmS_zz)²)), Hm = ΛM⁻¹Λᵀ.  The cost, whatever N,
is a Cholesky factor, two triangular solves and one product of size q_tot = random
effects + fixed effects — O(q_tot³) time — and a few dense q_tot × q_tot matrices:
InstEval's (q_tot = 4,116, N = 73,421) took 22 s on 2 busy cores and a 0.71 GB peak.
The memory estimate is :data:`N_DENSE` such matrices; models over :data:`MAX_BYTES`
(2 GB: q_tot ≈ 6,400) are refused, naming Satterthwaite's df, which need no dense
q_tot × q_tot matrix.  Defined for REML fits only.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import linalg as sla
from scipy.linalg import lapack

from ..crossprod import CrossProducts, crossproducts_of
from ..errors import BayesLMMError, ModelError
from ..hypotheses import check_matrix
from ..spec import ModelSpec

#: the largest dense working set allowed, in bytes
MAX_BYTES = 2e9
#: dense (q_tot × q_tot) float64 matrices held at once, for the memory estimate
N_DENSE = 6  # 5.2 measured on InstEval


def dense_bytes(n_columns: int) -> float:
    """Memory the computation needs for ``n_columns`` = random effects + fixed effects."""
    return N_DENSE * 8.0 * n_columns**2


class KenwardRoger:
    """Kenward–Roger's pieces at (θ, σ): Φ, Φ_A, P_i, Q_ij, W; and its t and F tests.

    Parameters
    ----------
    spec : ModelSpec
    theta : ndarray
        θ in the spec's order (a REML fit's).
    sigma : float
        The residual sd.
    crossprods : CrossProducts, optional

    Attributes
    ----------
    unadjusted_vcov : ndarray (p, p)
        Φ = (XᵀV⁻¹X)⁻¹, lme4's ``vcov``.
    vcov : ndarray (p, p)
        Φ_A, the adjusted covariance of β̂ (pbkrtest's ``vcovAdj``).
    labels : list of str
        The covariance parameters τ, in order: per block its Σ entries (``group.col``
        for a variance, ``group.col1.col2`` for a covariance), then ``sigma2``.
    P, Q : ndarray (k, p, p), (k, k, p, p)
    trace_vgvg : ndarray (k, k)
        tr(V⁻¹G_iV⁻¹G_j).
    information : ndarray (k, k)
        tr(𝒫G_i𝒫G_j) (twice REML's expected information; pbkrtest's ``IE2``).
    param_vcov : ndarray (k, k)
        W = 2 · information⁻¹, the asymptotic covariance of τ̂.
    """

    def __init__(self, spec: ModelSpec, theta, sigma: float, crossprods: CrossProducts | None = None):
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (spec.n_theta,):
            raise BayesLMMError(f"theta must have {spec.n_theta} entries, got shape {theta.shape}")
        if not (np.isfinite(sigma) and sigma > 0):
            raise BayesLMMError(f"sigma must be a positive number, got {sigma!r}")
        n_cols = sum(b.n_effects for b in spec.blocks) + spec.n_fixed
        if dense_bytes(n_cols) > MAX_BYTES:
            raise ModelError(
                f"Kenward-Roger df need dense {n_cols}×{n_cols} matrices (random effects + fixed effects), "
                f"about {dense_bytes(n_cols) / 1e9:.1f} GB, over bayeslmm's {MAX_BYTES / 1e9:.0f} GB limit; "
                "use ddf='satterthwaite', which needs no such matrix")
        self.spec, self.theta, self.sigma = spec, theta, float(sigma)
        cp = crossprods if crossprods is not None else crossproducts_of(spec, "Kenward–Roger's degrees of freedom")
        blocks = (cp.first, *cp.rest_blocks)
        units = _tau_units(blocks)
        self.labels = [u.label for u in units] + ["sigma2"]
        w = _Woodbury(_gram(cp), _relative_factor(blocks, spec.split_theta(theta)), self.sigma, spec.n_obs)
        self.unadjusted_vcov = phi = _inverse_pd(w.U[w.q:, w.q:], "XᵀV⁻¹X")
        self.P, self.Q, self.trace_vgvg = _derivatives(w, units)
        PphiP = np.einsum("iab,bc,jcd->ijad", self.P, phi, self.P)
        self.information = (self.trace_vgvg - 2.0 * np.einsum("ab,ijab->ij", phi, self.Q)
                            + np.einsum("ijaa->ij", np.einsum("ab,ijbc->ijac", phi, PphiP)))
        self.param_vcov = W = 2.0 * _inverse_information(self.information)
        adjust = np.einsum("ij,ijab->ab", W, self.Q - PphiP)
        adjusted = phi + 2.0 * phi @ adjust @ phi
        self.vcov = (adjusted + adjusted.T) / 2
        self._phi_p_phi = np.einsum("ab,ibc,cd->iad", phi, self.P, phi)

    # -- tests -------------------------------------------------------------------
    def df(self, contrast) -> float:
        """Kenward–Roger's denominator df for one contrast ℓ (a length-p vector)."""
        L = self._rows(contrast)
        if len(L) != 1:
            raise BayesLMMError(f"df takes one contrast (a vector), got {len(L)} rows: use f_test for several")
        return self._adjust(L)["den_df"]

    def f_test(self, L, beta) -> dict:
        """H₀: Lβ = 0: the scaled ``F`` (λ·F_u, pbkrtest's and lmerTest's "F value"), ``F_unscaled``
        (F_u, from Φ_A), ``scale`` λ, ``num_df`` and ``den_df``."""
        L = self._rows(L)
        beta = np.asarray(beta, dtype=float)
        out = self._adjust(L)
        lb = L @ beta
        F_u = float(lb @ np.linalg.solve(L @ self.vcov @ L.T, lb)) / len(L)
        return {"F": out["scale"] * F_u, "F_unscaled": F_u, "scale": out["scale"], "num_df": len(L),
                "den_df": out["den_df"]}

    def _adjust(self, L: np.ndarray) -> dict:
        """m and λ for the rows of L (Halekoh & Højsgaard 2014, section 3; pbkrtest's guards)."""
        phi, W, q = self.unadjusted_vcov, self.param_vcov, len(L)
        M = L @ phi @ L.T
        d = np.linalg.eigvalsh(M)
        if d.min() <= 1e-12 * max(d.max(), 0.0):
            raise BayesLMMError(f"the {q} hypotheses are not linearly independent (L Cov(β) Lᵀ is "
                                "singular): drop the redundant rows of L")
        theta = L.T @ np.linalg.solve(M, L)
        u = theta[None] @ self._phi_p_phi
        tr = np.einsum("iaa->i", u)
        A1 = float(tr @ W @ tr)
        A2 = float(np.einsum("ij,iab,jba->", W, u, u))
        if not A2 > 0:  # no uncertainty from the variance parameters reaches Lβ̂: the F test is exact
            return {"den_df": np.inf, "scale": 1.0}
        B = (A1 + 6.0 * A2) / (2.0 * q)
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3.0 * q + 2.0 * (1.0 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        v0, v1, v2 = 1.0 + c1 * B, 1.0 - c2 * B, 1.0 - c3 * B
        v0 = 0.0 if abs(v0) < 1e-10 else v0
        rho = (_div_zero(1.0 - A2 / q, v1)) ** 2 * v0 / v2 / q
        m = 4.0 + (q + 2.0) / (q * rho - 1.0)
        scale = 1.0 if abs(m - 2.0) < 1e-2 else m * (1.0 - A2 / q) / (m - 2.0)
        return {"den_df": float(m), "scale": float(scale)}

    def _rows(self, L) -> np.ndarray:
        return check_matrix(L, self.spec.fixed_names)


def _div_zero(x: float, y: float, tol: float = 1e-14) -> float:
    """x / y, and 1 where both are below ``tol`` (pbkrtest's ``.divZero``)."""
    return 1.0 if abs(x) < tol and abs(y) < tol else x / y


class _Unit:
    """One τ: the entries (a, b) and (b, a) of block Σ's, over rows offset … offset + levels·q."""

    def __init__(self, block, offset: int, a: int, b: int):
        self.offset, self.n_levels, self.q = offset, block.n_levels, block.q
        self.unit = np.zeros((block.q, block.q))
        self.unit[a, b] = self.unit[b, a] = 1.0
        names = block.columns
        self.label = f"{block.group}.{names[a]}" if a == b else f"{block.group}.{names[a]}.{names[b]}"

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.n_levels * self.q)

    def apply(self, A: np.ndarray) -> np.ndarray:
        """E_i A on this block's rows: (I_levels ⊗ unit) A[rows]."""
        parts = A[self.rows].reshape(self.n_levels, self.q, -1)
        return np.einsum("ab,lbp->lap", self.unit, parts).reshape(self.n_levels * self.q, -1)


def _tau_units(blocks) -> list[_Unit]:
    units, offset = [], 0
    for block in blocks:
        rows, cols = block.theta_index  # Σ has T Tᵀ's pattern: full lower triangle, or the diagonal
        units.extend(_Unit(block, offset, a, b) for a, b in zip(rows, cols))
        offset += block.n_effects
    return units


def _gram(cp: CrossProducts) -> np.ndarray:
    """[Z X]ᵀ[Z X], dense, columns in the blocks' order (first block, then the rest), then X."""
    n1, q1, mR, p = cp.first.n_levels, cp.first.q, cp.n_rest_effects, cp.n_fixed
    z1 = n1 * q1
    k = z1 + mR + p
    S = np.zeros((k, k))
    idx = np.arange(z1).reshape(n1, q1)
    S[idx[:, :, None], idx[:, None, :]] = cp.A11
    coupling = cp.B[: mR + p].toarray()  # [Z_rest X]ᵀ Z_1 (the y row left out)
    S[z1:, :z1] = coupling
    S[:z1, z1:] = coupling.T
    S[z1:, z1:] = cp.Arr[: mR + p, : mR + p]
    return S


def _relative_factor(blocks, pieces) -> sp.csr_matrix:
    """Λ = blockdiag(I_levels ⊗ T_b), sparse."""
    return sp.block_diag([sp.kron(sp.identity(b.n_levels), b.T(th)) for b, th in zip(blocks, pieces)],
                         format="csr")


class _Woodbury:
    """U = [Z X]ᵀV⁻¹[Z X] and what V⁻² and V⁻³ need, from the Gram matrix S alone.

    V⁻¹ = σ⁻²(I − Z Hm Zᵀ) with Hm = ΛM⁻¹Λᵀ, so V⁻¹Z = σ⁻² Z R (R = I − Hm S_zz) and
    V⁻¹X = [Z X]·C_x with C_x = σ⁻² [−Hm S_zx; I].
    """

    def __init__(self, S: np.ndarray, lam: sp.csr_matrix, sigma: float, n_obs: int):
        q = lam.shape[0]
        s2 = sigma**2
        G = np.asarray(lam.T @ S[:q, :])                   # ΛᵀS_z·, q × (q + p)
        M = np.asarray(lam.T @ G[:, :q].T)                 # ΛᵀS_zzΛ (S_zz symmetric)
        M[np.diag_indices(q)] += 1.0
        L = _cholesky(M)
        F = sla.solve_triangular(L, G, lower=True, overwrite_b=True, check_finite=False)  # L⁻¹ΛᵀS_z·
        del G, M
        self.q, self.n_obs, self.s2 = q, n_obs, s2
        self.U = (S - F.T @ F) / s2                        # S − S_·z Hm S_z·, Hm = ΛM⁻¹Λᵀ
        HmS = np.asarray(lam @ sla.solve_triangular(L, F, lower=True, trans="T", overwrite_b=True,
                                                    check_finite=False))  # Hm S_z·
        del L, F
        HS = HmS[:, :q]
        # tr(V⁻²) = σ⁻⁴ tr((I − H)²), H = Z Hm Zᵀ: tr H = tr(Hm S_zz), tr H² = tr((Hm S_zz)²)
        self.tr_V2 = (n_obs - 2.0 * float(np.trace(HS)) + float(np.sum(HS * HS.T))) / s2**2
        self.R = -HS
        self.R[np.diag_indices(q)] += 1.0
        Cx = np.vstack([-HmS[:, q:], np.eye(S.shape[0] - q)]) / s2
        del HmS, HS
        self.V2ZX = self.U[:q] @ Cx               # ZᵀV⁻²X
        self.V2XX = self.U[q:] @ Cx               # XᵀV⁻²X
        self.V3XX = Cx.T @ self.U @ Cx            # XᵀV⁻³X

    def diag_blocks_V2Z(self, unit: _Unit) -> float:
        """tr(E_i ZᵀV⁻²Z), with ZᵀV⁻²Z = σ⁻² RᵀU_zz read on the block's level-diagonal only."""
        rows = self.R[:, unit.rows].reshape(self.q, unit.n_levels, unit.q)
        U = self.U[: self.q, unit.rows].reshape(self.q, unit.n_levels, unit.q)
        per = np.einsum("mla,mlb->ab", rows, U)  # Σ_l (RᵀU)[la, lb]
        return float(np.sum(unit.unit * per)) / self.s2


def _derivatives(w: _Woodbury, units: list[_Unit]):
    """P_i, Q_ij and tr(V⁻¹G_iV⁻¹G_j) for the τ's of the random blocks, then σ² (G = I)."""
    k, q = len(units) + 1, w.q
    p = w.U.shape[0] - q
    Uzx = w.U[:q, q:]
    Y = [u.apply(Uzx) for u in units]                       # E_i ZᵀV⁻¹X, on the unit's rows
    P = np.empty((k, p, p))
    Q = np.empty((k, k, p, p))
    tr = np.empty((k, k))
    for i, (ui, yi) in enumerate(zip(units, Y)):
        P[i] = -Uzx[ui.rows].T @ yi
        for j in range(i, k - 1):
            uj, yj = units[j], Y[j]
            Q[i, j] = yi.T @ w.U[ui.rows, uj.rows] @ yj
            Q[j, i] = Q[i, j].T
            tr[i, j] = tr[j, i] = _trace_pair(w.U[ui.rows, uj.rows], ui, uj)
        Q[i, -1] = yi.T @ w.V2ZX[ui.rows]
        Q[-1, i] = Q[i, -1].T
        tr[i, -1] = tr[-1, i] = w.diag_blocks_V2Z(ui)
    P[-1] = -w.V2XX
    Q[-1, -1] = w.V3XX
    tr[-1, -1] = w.tr_V2
    return P, Q, tr


def _trace_pair(Ubc: np.ndarray, ui: _Unit, uj: _Unit) -> float:
    """tr(E_i U_bc E_j U_cb) = Σ S_i[a′,a] S_j[c,d] T[(a,c),(a′,d)],
    with T = Σ_{l,l′} U[la, l′c] U[la′, l′d] (S: the units' q×q patterns)."""
    X = Ubc.reshape(ui.n_levels, ui.q, uj.n_levels, uj.q).transpose(1, 3, 0, 2).reshape(ui.q * uj.q, -1)
    T = (X @ X.T).reshape(ui.q, uj.q, ui.q, uj.q)
    return float(np.einsum("ba,cd,acbd->", ui.unit, uj.unit, T))


def _cholesky(M: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor of M = ΛᵀZᵀZΛ + I, in place (LAPACK potrf, no copy)."""
    L, info = lapack.dpotrf(np.asfortranarray(M), lower=1, overwrite_a=1, clean=1)
    if info != 0:
        raise ModelError("ΛᵀZᵀZΛ + I is not positive definite at this θ: Kenward-Roger df are not available")
    return L


def _inverse_pd(A: np.ndarray, what: str) -> np.ndarray:
    try:
        chol = sla.cho_factor((A + A.T) / 2, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise ModelError(f"{what} is not positive definite: the fixed effects are not estimable") from None
    return sla.cho_solve(chol, np.eye(len(A)), check_finite=False)


def _inverse_information(info: np.ndarray) -> np.ndarray:
    """info⁻¹, or its pseudo-inverse where an eigenvalue is within 1e-10 of 0 (pbkrtest's rule)."""
    info = (info + info.T) / 2
    if np.min(np.abs(np.linalg.eigvalsh(info))) > 1e-10:
        return np.linalg.inv(info)
    return np.linalg.pinv(info, rcond=np.sqrt(np.finfo(float).eps), hermitian=True)
