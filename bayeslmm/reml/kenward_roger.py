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

With a residual structure, V = Σ_b Z_b(I ⊗ Σ_b)Z_bᵀ + V_R(τ_R), V_R = σ²Λ_R(ρ), and τ = (Σ entries,
τ_R) with τ_R the structure's parameters, σ² last (:class:`_ResidualUnits` says which scale each
takes: V is linear in them where a structure allows).  Where V is not linear (AR(1)'s φ,
VarPower's δ) the second derivatives R_ij = XᵀV⁻¹(∂²V/∂τ_i∂τ_j)V⁻¹X enter Kenward & Roger's
(1997) adjustment, Φ_A = Φ + 2Φ{Σ W_ij (Q_ij − P_iΦP_j − ¼R_ij)}Φ; the expected information
and the df's formulas are unchanged.  Everything is computed on the data whitened at ρ̂
(W V_R Wᵀ = σ²I, :func:`~bayeslmm.reml.residual_fit.whitened_spec`): the Σ entries as above,
and W(∂V/∂τ_R)Wᵀ, block diagonal by the correlation structure's groups (diagonal for a
variance function alone), as sparse matrices; still no n × n dense matrix.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp
from scipy import linalg as sla
from scipy.linalg import lapack

from ..crossprod import CrossProducts, block_Z, crossproducts_of
from ..errors import BayesLMMError, ModelError
from ..hypotheses import check_matrix
from ..residual import CorCompSymm, VarIdent, relative_covariance
from ..spec import ModelSpec
from .residual_fit import whitened_spec

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
        σ²I models only (a residual structure's are formed on its whitened data).
    residual : ndarray, optional
        The residual structure's parameters ρ, unconstrained (``spec.residual.unconstrained``);
        required when ``spec`` has a residual structure.

    Attributes
    ----------
    unadjusted_vcov : ndarray (p, p)
        Φ = (XᵀV⁻¹X)⁻¹, lme4's ``vcov``.
    vcov : ndarray (p, p)
        Φ_A, the adjusted covariance of β̂ (pbkrtest's ``vcovAdj``).
    labels : list of str
        The covariance parameters τ, in order: per block its Σ entries (``group.col``
        for a variance, ``group.col1.col2`` for a covariance), then a residual structure's
        (``variance.<level>``, ``power``, ``expon``, ``Phi``, ``sigma2*Rho``), then ``sigma2``.
    P, Q, R : ndarray (k, p, p), (k, k, p, p), (k, k, p, p)
        R_ij is 0 where V is linear in τ (every σ²I model).
    trace_vgvg : ndarray (k, k)
        tr(V⁻¹G_iV⁻¹G_j).
    information : ndarray (k, k)
        tr(𝒫G_i𝒫G_j) (twice REML's expected information; pbkrtest's ``IE2``).
    param_vcov : ndarray (k, k)
        W = 2 · information⁻¹, the asymptotic covariance of τ̂.
    """

    def __init__(self, spec: ModelSpec, theta, sigma: float, crossprods: CrossProducts | None = None,
                 residual=None):
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (spec.n_theta,):
            raise BayesLMMError(f"theta must have {spec.n_theta} entries, got shape {theta.shape}")
        if not (np.isfinite(sigma) and sigma > 0):
            raise BayesLMMError(f"sigma must be a positive number, got {sigma!r}")
        n_cols = sum(b.n_effects for b in spec.blocks) + spec.n_fixed
        # a residual structure adds Hm, RᵀM_kR and, per residual τ, M_k and HmM_k
        n_dense = N_DENSE + (0 if spec.residual is None else 2 + 2 * (spec.residual.n_params + 1))
        if dense_bytes(n_cols) * n_dense / N_DENSE > MAX_BYTES:
            raise ModelError(
                f"Kenward-Roger df need dense {n_cols}×{n_cols} matrices (random effects + fixed effects), "
                f"about {dense_bytes(n_cols) * n_dense / N_DENSE / 1e9:.1f} GB, over bayeslmm's "
                f"{MAX_BYTES / 1e9:.0f} GB limit; use ddf='satterthwaite', which needs no such matrix")
        self.spec, self.theta, self.sigma = spec, theta, float(sigma)
        if spec.residual is None:
            if residual is not None and np.size(residual):
                raise BayesLMMError("residual parameters were given for a model without a residual structure")
            cp = crossprods if crossprods is not None else crossproducts_of(spec, "Kenward–Roger's degrees of freedom")
            blocks = (cp.first, *cp.rest_blocks)
            units = _tau_units(blocks)
            self.labels = [u.label for u in units] + ["sigma2"]
            w = _Woodbury(_gram(cp), _relative_factor(blocks, spec.split_theta(theta)), self.sigma, spec.n_obs)
            self.P, self.Q, self.trace_vgvg = _derivatives(w, units)
            self.R = np.zeros_like(self.Q)  # V is linear in τ
        else:
            w = self._structured(spec, np.asarray([] if residual is None else residual, dtype=float).ravel())
        self.unadjusted_vcov = phi = _inverse_pd(w.U[w.q:, w.q:], "XᵀV⁻¹X")
        PphiP = np.einsum("iab,bc,jcd->ijad", self.P, phi, self.P)
        self.information = (self.trace_vgvg - 2.0 * np.einsum("ab,ijab->ij", phi, self.Q)
                            + np.einsum("ijaa->ij", np.einsum("ab,ijbc->ijac", phi, PphiP)))
        self.param_vcov = W = 2.0 * _inverse_information(self.information)
        adjust = np.einsum("ij,ijab->ab", W, self.Q - PphiP - 0.25 * self.R)
        adjusted = phi + 2.0 * phi @ adjust @ phi
        self.vcov = (adjusted + adjusted.T) / 2
        self._phi_p_phi = np.einsum("ab,ibc,cd->iad", phi, self.P, phi)

    def _structured(self, spec: ModelSpec, u: np.ndarray) -> "_Woodbury":
        """P, Q, R and the traces for R = σ²Λ_R(ρ), on the data whitened at the fit's ρ (see
        :class:`_ResidualUnits`); τ = (Σ entries, the residual parameters, σ²).  Returns the
        whitened model's Woodbury pieces (Φ comes from them)."""
        res = spec.residual
        if u.shape != (res.n_params,):
            raise BayesLMMError(f"the residual structure has {res.n_params} parameters {list(res.names)}; "
                                f"got residual with shape {u.shape}")
        ws = whitened_spec(spec, u)
        cp = CrossProducts.from_spec(ws)
        blocks = (cp.first, *cp.rest_blocks)
        units = _tau_units(blocks)
        w = _Woodbury(_gram(cp), _relative_factor(blocks, spec.split_theta(self.theta)),
                                       self.sigma, spec.n_obs, keep_hm=True)
        Z = sp.hstack([block_Z(b) for b in blocks], format="csr") if blocks else sp.csr_matrix((spec.n_obs, 0))
        resid = _ResidualUnits(res, u, self.sigma)
        self.labels = [x.label for x in units] + resid.labels
        P, Q, tr = _derivatives(w, units)  # its last τ (G = I) is not one of this V's: dropped below
        k = len(units)
        A = Z @ w.Cx[: w.q] + ws.X @ w.Cx[w.q:]  # Ṽ⁻¹X̃, n × p
        self.P, self.Q, self.trace_vgvg, self.R = _with_residual_units(w, units, Z, A, resid, P[:k], Q[:k, :k],
                                                                       tr[:k, :k])
        return w

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

    def __init__(self, S: np.ndarray, lam: sp.csr_matrix, sigma: float, n_obs: int, keep_hm: bool = False):
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
        if keep_hm:  # a residual structure's derivatives are not in span(Z): they need Hm itself
            half = sla.solve_triangular(L, np.asarray(lam.T.todense()), lower=True, check_finite=False)
            self.Hm = half.T @ half
        del L, F
        HS = HmS[:, :q]
        # tr(V⁻²) = σ⁻⁴ tr((I − H)²), H = Z Hm Zᵀ: tr H = tr(Hm S_zz), tr H² = tr((Hm S_zz)²)
        self.tr_V2 = (n_obs - 2.0 * float(np.trace(HS)) + float(np.sum(HS * HS.T))) / s2**2
        self.R = -HS
        self.R[np.diag_indices(q)] += 1.0
        self.Cx = Cx = np.vstack([-HmS[:, q:], np.eye(S.shape[0] - q)]) / s2
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


# -- a residual structure R = σ²Λ_R(ρ) ------------------------------------------------------------------
class _ResidualUnits:
    """The residual part of τ and the derivatives of V in it, whitened: W(∂V/∂τ_k)Wᵀ and W(∂²V/∂τ_k∂τ_l)Wᵀ.

    The parameters are chosen so that V is linear in them wherever a structure allows, since
    Kenward–Roger's adjustment is invariant only under linear changes of τ: σ² (the reference
    level's variance), a variance per further level of VarIdent (σ²δ²), the covariance σ²ρ of
    compound symmetry (so V = (σ² − c)I + cJ: the random-intercept model's, reparameterised
    linearly); VarPower's and VarExp's δ and AR(1)'s and CAR(1)'s φ as they are (no scale makes
    those linear; their second derivatives enter through R_ij).

    V_R = σ²Λ_R is block diagonal, one block per group of the correlation structure (one row per
    block without one), so each derivative is kept compactly, ``n × m`` for the largest block m,
    and differentiated numerically from :func:`~bayeslmm.residual.relative_covariance` (central
    differences with Richardson's extrapolation over h and h/2); no n × n matrix is formed.
    """

    #: relative finite-difference step in τ_R
    STEP = 1e-3

    def __init__(self, residual, u: np.ndarray, sigma: float):
        self.res, self.u, self.n = residual, u, len(residual.frame)
        self._layout()
        k = residual.n_params + 1
        n_compact = 2 * (k + k * (k + 1) // 2 + 2)  # the derivatives, compact and sparse, and work space
        if 8.0 * self.n * self.width * n_compact > MAX_BYTES:
            raise ModelError(f"Kenward-Roger df need the residual structure's blocks densely: {self.n} rows × "
                             f"{self.width} (the largest correlation group) is over bayeslmm's "
                             f"{MAX_BYTES / 1e9:.0f} GB limit; use ddf='satterthwaite'")
        self.tau, self.labels = self._tau_of(u, sigma**2)
        first, second = self._derivatives()
        self.first = [self._whitened(d) for d in first]
        self.second = {kl: self._whitened(d) for kl, d in second.items()}

    def _layout(self) -> None:
        corr = self.res.correlation
        group = corr.group if corr is not None else np.arange(self.n)
        order = np.argsort(group, kind="stable")
        sizes = np.bincount(group)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.group = group
        self._correlation_only = None if corr is None else replace(self.res, variance=None, weights=None)
        self.pos = np.empty(self.n, dtype=np.intp)
        self.pos[order] = np.arange(self.n) - np.repeat(starts, sizes)
        self.width = int(sizes.max())
        self.members = np.full((len(sizes), self.width), -1, dtype=np.intp)
        self.members[group[order], self.pos[order]] = order
        self.blocks = [m[m >= 0] for m in self.members] if corr is not None else None

    def _tau_of(self, u: np.ndarray, s2: float) -> tuple[np.ndarray, list[str]]:
        res, nat = self.res, self.res.natural(u)
        tau, labels = [], []
        if res.variance is not None:
            ident = isinstance(res.variance.structure, VarIdent)
            for name in res.variance.names:
                tau.append(s2 * nat[name] ** 2 if ident else nat[name])
                labels.append(f"variance.{name}" if ident else name)
        if res.correlation is not None:
            name = res.correlation.names[0]
            cs = isinstance(res.correlation.structure, CorCompSymm)
            tau.append(s2 * nat[name] if cs else nat[name])
            labels.append(f"sigma2*{name}" if cs else name)
        return np.array(tau + [s2]), labels + ["sigma2"]

    def _point(self, tau: np.ndarray):
        """(u, σ²) of τ_R; None outside the structure's range."""
        res, s2, nat, k = self.res, tau[-1], {}, 0
        if not s2 > 0:
            return None
        if res.variance is not None:
            ident = isinstance(res.variance.structure, VarIdent)
            for name in res.variance.names:
                if ident and not tau[k] > 0:
                    return None
                nat[name] = np.sqrt(tau[k] / s2) if ident else tau[k]
                k += 1
        if res.correlation is not None:
            name = res.correlation.names[0]
            nat[name] = tau[k] / s2 if isinstance(res.correlation.structure, CorCompSymm) else tau[k]
        with np.errstate(all="ignore"):
            u = res.unconstrained(nat)
            ok = np.all(np.isfinite(u)) and np.isfinite(res.log_det(u))
        return (u, s2) if ok else None

    def covariance(self, tau: np.ndarray) -> np.ndarray | None:
        """V_R = σ²Λ_R at τ_R, compact: row i holds its block's row, in the block's member order."""
        got = self._point(tau)
        if got is None:
            return None
        u, s2 = got
        s = self.res.sd(u)
        s = np.ones(self.n) if s is None else s
        if self.blocks is None:
            return (s2 * s * s)[:, None]
        # the correlation blocks alone (sds 1): each costs its own size, not a pass over all rows
        u_corr = u[len(u) - len(self.res.correlation.names):]
        out = np.zeros((self.n, self.width))
        for rows in self.blocks:
            out[rows, : len(rows)] = relative_covariance(self._correlation_only, u_corr, rows)
        return s2 * s[:, None] * out * s[self.members[self.group]]

    def _steps(self) -> np.ndarray:
        """h per τ_R, halved (at most 3 times) until every point the differences visit is in range.

        A parameter closer to its bound than that (CAR(1)'s φ estimated as 1e-9, say) is refused:
        the central differences would need steps whose rounding error swamps R_ij, and the
        expansion Kenward–Roger rest on assumes an interior τ̂ anyway."""
        h = self.STEP * np.maximum(np.abs(self.tau), 0.1)
        k = len(h)
        for i in range(k):
            for _ in range(4):
                e = np.zeros(k)
                e[i] = h[i]
                if all(self._point(self.tau + s * e + t * h[j] * np.eye(k)[j]) is not None
                       for s in (-1, 1) for j in range(k) for t in (-1, 0, 1)):
                    break
                h[i] /= 2
            else:
                estimates = ", ".join(f"{k} {v:.6g}" for k, v in self.res.natural(self.u).items())
                raise ModelError(f"Kenward-Roger df are not available: a residual parameter ({estimates}) is "
                                 "estimated at the bound of its range, where V(τ) cannot be differentiated on "
                                 "both sides; use ddf='satterthwaite'")
        return h

    def _derivatives(self):
        """∂V_R/∂τ_k and ∂²V_R/∂τ_k∂τ_l (k ≤ l), compact, by Richardson-extrapolated central differences."""
        k, h0 = len(self.tau), self._steps()
        f0 = self.covariance(self.tau)

        def at(scale):
            h = h0 * scale
            E = np.diag(h)
            plus = [self.covariance(self.tau + E[i]) for i in range(k)]
            minus = [self.covariance(self.tau - E[i]) for i in range(k)]
            first = [(plus[i] - minus[i]) / (2 * h[i]) for i in range(k)]
            second = {(i, i): (plus[i] - 2 * f0 + minus[i]) / h[i] ** 2 for i in range(k)}
            for i in range(k):
                for j in range(i + 1, k):
                    pp, mm = self.covariance(self.tau + E[i] + E[j]), self.covariance(self.tau - E[i] - E[j])
                    pm, mp = self.covariance(self.tau + E[i] - E[j]), self.covariance(self.tau - E[i] + E[j])
                    second[i, j] = (pp - pm - mp + mm) / (4 * h[i] * h[j])
            return first, second

        coarse, fine = at(1.0), at(0.5)
        first = [(4 * b - a) / 3 for a, b in zip(coarse[0], fine[0])]
        second = {kl: (4 * fine[1][kl] - coarse[1][kl]) / 3 for kl in coarse[1]}
        return first, second

    def _whitened(self, compact: np.ndarray) -> sp.csr_matrix:
        """W D Wᵀ, sparse n × n, for D compact: W applied to the rows, the blocks transposed, W again."""
        half = self.res.whiten(compact, self.u)                   # W D, compact
        cols = self.members[self.group]                           # row i's block members, −1 padded
        valid = cols >= 0
        flipped = np.where(valid, half[np.where(valid, cols, 0), self.pos[:, None]], 0.0)  # (W D)ᵀ = D Wᵀ
        full = self.res.whiten(flipped, self.u)                   # W D Wᵀ
        rows = np.repeat(np.arange(self.n), self.width).reshape(self.n, self.width)
        return sp.csr_matrix((full[valid], (rows[valid], cols[valid])), shape=(self.n, self.n))


def _with_residual_units(w: _Woodbury, units: list[_Unit], Z: sp.csr_matrix, A: np.ndarray,
                         resid: _ResidualUnits, P0, Q0, tr0):
    """P, Q, R and tr(Ṽ⁻¹G̃_iṼ⁻¹G̃_j) over τ = (Σ entries, τ_R), from the Σ entries' (P0, Q0, tr0).

    On the whitened data Ṽ = Z̃GZ̃ᵀ + σ²I with Ṽ⁻¹ = σ⁻²(I − Z̃HmZ̃ᵀ) and Ṽ⁻¹Z̃ = σ⁻²Z̃R (see
    :class:`_Woodbury`); with D_k = W(∂V/∂τ_k)Wᵀ (sparse) and A = Ṽ⁻¹X̃:
    P_k = −AᵀD_kA, Q_kl = (D_kA)ᵀṼ⁻¹(D_lA), R_kl = AᵀW(∂²V/∂τ_k∂τ_l)WᵀA,
    tr(Ṽ⁻¹D_kṼ⁻¹D_l) = σ⁻⁴[tr(D_kD_l) − 2 tr(Hm Z̃ᵀD_kD_lZ̃) + tr(Hm M_k Hm M_l)], M_k = Z̃ᵀD_kZ̃,
    and for a Σ entry's G̃_i = Z̃E_iZ̃ᵀ: tr(Ṽ⁻¹G̃_iṼ⁻¹D_k) = σ⁻⁴ tr(E_i RᵀM_kR).
    """
    s2, Hm, q = w.s2, w.Hm, w.q
    m, r = len(units), len(resid.first)
    k = m + r
    p = A.shape[1]
    P, Q, tr, R = np.zeros((k, p, p)), np.zeros((k, k, p, p)), np.zeros((k, k)), np.zeros((k, k, p, p))
    P[:m], Q[:m, :m], tr[:m, :m] = P0, Q0, tr0
    D = resid.first
    B = [d @ A for d in D]                                           # D_k A
    VB = [(b - Z @ (Hm @ (Z.T @ b))) / s2 for b in B]                # Ṽ⁻¹ D_k A
    M = [np.asarray((Z.T @ (d @ Z)).todense()) for d in D]
    HM = [Hm @ mk for mk in M]
    Y = [u.apply(w.U[:q, q:]) for u in units]                        # E_i Z̃ᵀṼ⁻¹X̃, on the unit's rows
    for a in range(r):
        P[m + a] = -A.T @ B[a]
        ZVB = Z.T @ VB[a]                                            # Z̃ᵀṼ⁻¹D_kA
        RMR = w.R.T @ M[a] @ w.R
        for i, (ui, yi) in enumerate(zip(units, Y)):
            Q[i, m + a] = yi.T @ ZVB[ui.rows]
            Q[m + a, i] = Q[i, m + a].T
            tr[i, m + a] = tr[m + a, i] = _level_diagonal_trace(RMR[ui.rows, ui.rows], ui) / s2**2
        for b in range(a, r):
            Q[m + a, m + b] = B[a].T @ VB[b]
            Q[m + b, m + a] = Q[m + a, m + b].T
            DD = D[a] @ D[b]
            cross = np.asarray((Z.T @ (DD @ Z)).todense())
            tr[m + a, m + b] = tr[m + b, m + a] = (DD.diagonal().sum() - 2.0 * np.sum(Hm * cross.T)
                                                   + np.sum(HM[a] * HM[b].T)) / s2**2
            R[m + a, m + b] = R[m + b, m + a] = A.T @ (resid.second[a, b] @ A)
    return P, Q, tr, R


def _level_diagonal_trace(block: np.ndarray, unit: _Unit) -> float:
    """tr(E_i X) for X on the unit's rows: Σ_levels Σ_ab unit[a, b] X[(l, b), (l, a)]."""
    X = block.reshape(unit.n_levels, unit.q, unit.n_levels, unit.q)
    per = np.einsum("lalb->ab", X)
    return float(np.sum(unit.unit * per.T))
