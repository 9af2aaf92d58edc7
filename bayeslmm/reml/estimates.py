"""Everything that follows from the factorisation at the optimum θ.

β̂, σ̂, the conditional modes of the random effects, their conditional variances
(lme4's ``condVar``: σ² Λ (LᵀL)⁻¹ Λᵀ, diagonal blocks per level, the fixed effects
held at β̂) and the fixed effects' covariance σ² (R_X R_Xᵀ)⁻¹ all come from the
blocked factor.  Only the fitted values touch the rows again, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from ..errors import DataError
from .deviance import Factorization, ProfiledDeviance


@dataclass(frozen=True)
class Estimates:
    """Point estimates at θ̂ (arrays in θ/ModelSpec order)."""

    beta: np.ndarray
    sigma: float
    vcov_beta: np.ndarray
    b: list[np.ndarray]         # per block, shape (n_levels, q)
    b_condvar: list[np.ndarray]  # per block, shape (n_levels, q, q), on b's scale
    fitted_values: np.ndarray | None  # None when the spec keeps no rows (built out of memory)

    @property
    def fitted(self) -> np.ndarray:
        """Conditional fitted values Xβ̂ + Zb̂, one per row."""
        if self.fitted_values is None:
            raise DataError(
                "fitted values and residuals need the data's rows in memory, and this model was built "
                "out of memory (a Dask DataFrame or Parquet dataset: cross-products only). Build the "
                "model from a pandas DataFrame (ddf.compute(), or a sample of it) for per-row results"
            )
        return self.fitted_values


def _block_diag_sparse(mats: np.ndarray) -> sp.bsr_matrix:
    """A sparse block-diagonal matrix from a (k, q, q) stack."""
    k, q, _ = mats.shape
    return sp.bsr_matrix((mats, np.arange(k), np.arange(k + 1)), shape=(k * q, k * q))


def _rest_lambda(dev: ProfiledDeviance, f: Factorization) -> sp.csr_matrix:
    """Λ̃ for the rest columns: block diagonal of I⊗T_k, then the identity on [X y]."""
    parts = [sp.kron(sp.identity(b.n_levels), T, format="csr") for b, T in zip(dev.cp.rest_blocks, f.rest_T)]
    parts.append(sp.identity(dev.p + 1, format="csr"))
    return sp.block_diag(parts, format="csr")


def compute_estimates(dev: ProfiledDeviance, f: Factorization, condvar: bool = True) -> Estimates:
    """β̂, σ̂, conditional modes and variances, fitted values at the factorisation ``f``."""
    cp, spec = dev.cp, dev.spec
    n, p = dev.n, dev.p
    mR = cp.n_rest_effects
    m = cp.m
    Lr = np.tril(f.Lr)
    q1, n1 = cp.first.q, cp.first.n_levels

    # L_r1 = Λ̃ᵀ B (I⊗T1) blockdiag(L_j⁻ᵀ): the rest rows of the factor under block 1
    L1inv = np.linalg.inv(f.L1)                                      # (n1, q1, q1)
    G = np.einsum("ab,jcb->jac", f.T1, L1inv)                        # T1 L_j⁻ᵀ
    Lr1 = _rest_lambda(dev, f).T @ (cp.B @ _block_diag_sparse(G))
    Lr1 = sp.csr_matrix(Lr1)

    # spherical modes: rest part and β from the last row of Lr, then block 1
    Lp = Lr[: m - 1, : m - 1]
    ell = Lr[m - 1, : m - 1]
    z = sla.solve_triangular(Lp, ell, lower=True, trans="T", check_finite=False)
    beta = z[mR:].copy()
    if cp.y_shift:  # the cross-products are of y − c·1: the intercept takes c back
        beta[cp.intercept] += cp.y_shift
    u_rest = z[:mR]
    rhs = np.asarray(Lr1[m - 1, :].toarray()).ravel() - Lr1[: m - 1, :].T @ z
    rhs = rhs.reshape(n1, q1)
    u1 = np.einsum("jba,jb->ja", L1inv, rhs)                        # L_j⁻ᵀ rhs_j

    sigma2 = f.pwrss / (n - p if dev.reml else n)
    sigma = float(np.sqrt(sigma2))

    Lxx = Lr[mR : mR + p, mR : mR + p]
    Lxx_inv = sla.solve_triangular(Lxx, np.eye(p), lower=True, check_finite=False)
    vcov = sigma2 * (Lxx_inv.T @ Lxx_inv)

    # random effects b = Λ u, per block
    b = [u1 @ f.T1.T]
    for block, off, T in zip(cp.rest_blocks, cp.rest_offsets, f.rest_T):
        u = u_rest[off : off + block.n_effects].reshape(block.n_levels, block.q)
        b.append(u @ T.T)

    fitted = None
    if spec.rows_in_memory:
        fitted = spec.X @ beta
        for block, bk in zip(spec.blocks, b):
            fitted = fitted + np.einsum("ia,ia->i", block.Z, bk[block.codes])

    cv: list[np.ndarray] = []
    if condvar:
        cv = _conditional_variances(dev, f, Lr1, L1inv, sigma2)
    return Estimates(beta=beta, sigma=sigma, vcov_beta=vcov, b=b, b_condvar=cv, fitted_values=fitted)


def _conditional_variances(dev, f, Lr1, L1inv, sigma2) -> list[np.ndarray]:
    """Diagonal blocks of σ² Λ (L_Z L_Zᵀ)⁻¹ Λᵀ per level of each block (lme4's condVar)."""
    cp = dev.cp
    mR = cp.n_rest_effects
    n1, q1 = cp.first.n_levels, cp.first.q
    U1 = f.Minv.copy()  # (L11 L11ᵀ)⁻¹ per level
    out_rest = []
    if mR:
        LRR_inv = sla.solve_triangular(np.tril(f.Lr[:mR, :mR]), np.eye(mR), lower=True, check_finite=False)
        # K = L_RR⁻¹ L_R1 L11⁻¹ adds Kᵀ K to block 1's inverse blocks
        K = np.asarray(LRR_inv @ (Lr1[:mR, :] @ _block_diag_sparse(L1inv))).reshape(mR, n1, q1)
        U1 += np.einsum("ija,ijb->jab", K, K)
        for block, off in zip(cp.rest_blocks, cp.rest_offsets):
            cols = LRR_inv[:, off : off + block.n_effects].reshape(mR, block.n_levels, block.q)
            out_rest.append(np.einsum("ija,ijb->jab", cols, cols))
    out = [U1] + out_rest
    Ts = [f.T1] + list(f.rest_T)
    return [sigma2 * np.einsum("ab,jbc,dc->jad", T, U, T) for T, U in zip(Ts, out)]

