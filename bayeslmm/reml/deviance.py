"""The profiled deviance of a linear mixed model, as a function of θ alone.

With Λ(θ) the relative covariance factor (b = Λu, u ~ N(0, σ²I)), factor

    L Lᵀ = [ ΛᵀZᵀZΛ + I   ΛᵀZᵀ[X y] ]
           [ [X y]ᵀZΛ     [X y]ᵀ[X y]]

blockwise.  The Z-part's log-determinant, the fixed-effect block R_X and the
penalised residual sum of squares r² (the last diagonal entry, squared) give

    ML:   d(θ) = log|L_Z|² + n (1 + log(2π r²/n))
    REML: d(θ) = log|L_Z|² + log|R_X|² + (n−p)(1 + log(2π r²/(n−p)))

(Bates, Mächler, Bolker & Walker 2015, JSS 67(1), eqs. 34 and 41).  The first
random-effect block is factored level by level (q₁×q₁ Cholesky factors); its
Schur complement on the rest is one sparse product with ``CrossProducts.P``; the
rest — other random-effect blocks, X and y — is one dense Cholesky.  Nothing here
touches the n rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from ..crossprod import CrossProducts
from ..errors import ModelError
from ..spec import ModelSpec


@dataclass
class Factorization:
    """The pieces of the blocked Cholesky factor at one θ."""

    theta: np.ndarray
    T1: np.ndarray            # q1×q1 relative factor of the first block
    L1: np.ndarray            # (n1, q1, q1) per-level Cholesky factors of M_j = T1ᵀA11_jT1 + I
    Minv: np.ndarray          # (n1, q1, q1) M_j⁻¹
    Lr: np.ndarray            # (m, m) Cholesky factor of the rest's Schur complement (lower
                              # triangle only: the upper holds leftovers, read it through np.tril)
    rest_T: list[np.ndarray]  # relative factors of the rest blocks
    logdet_Z: float
    logdet_X: float
    pwrss: float


class ProfiledDeviance:
    """Callable ``θ ↦ d(θ)`` on lme4's scale (REML criterion or −2 log-likelihood).

    Parameters
    ----------
    spec : ModelSpec
    crossprods : CrossProducts, optional
        Computed from ``spec`` when not given.
    reml : bool
        REML criterion (default) or ML deviance.
    """

    def __init__(self, spec: ModelSpec, crossprods: CrossProducts | None = None, reml: bool = True):
        self.spec = spec
        self.cp = crossprods if crossprods is not None else CrossProducts.from_spec(spec)
        self.reml = reml
        self.n = spec.n_obs
        self.p = spec.n_fixed
        self.n_evaluations = 0
        if self.p >= self.n:  # build_spec refuses such a model; a spec made by hand is checked here
            raise ModelError(f"{self.p} fixed-effect columns for {self.n} observations: need fewer columns "
                             "than observations")

    # -- the factorisation -------------------------------------------------
    def factor(self, theta: np.ndarray) -> Factorization:
        """Blocked Cholesky factorisation at ``theta``; raises LinAlgError if not PD."""
        cp, spec = self.cp, self.spec
        pieces = spec.split_theta(theta)
        first = cp.first
        q1 = first.q
        T1 = first.T(pieces[0])
        if q1 == 1:
            t2 = T1[0, 0] ** 2
            M = t2 * cp.A11[:, 0, 0] + 1.0
            L1 = np.sqrt(M)[:, None, None]
            Minv = (1.0 / M)[:, None, None]
            W = (t2 / M)[:, None, None]
            logdet1 = float(np.sum(np.log(M)))
        else:
            M = np.einsum("ba,jbc,cd->jad", T1, cp.A11, T1)
            M[:, np.arange(q1), np.arange(q1)] += 1.0
            L1 = np.linalg.cholesky(M)
            eye = np.broadcast_to(np.eye(q1), M.shape)
            Linv = np.linalg.solve(L1, eye)
            Minv = np.einsum("jba,jbc->jac", Linv, Linv)
            W = np.einsum("ab,jbc,dc->jad", T1, Minv, T1)
            logdet1 = 2.0 * float(np.sum(np.log(np.diagonal(L1, axis1=1, axis2=2))))
        # C = Λ̃ᵀ (Arr − Σ_j B_j W_j B_jᵀ) Λ̃ + I on the rest's effects, Fortran order for LAPACK
        C = cp.Arr.copy(order="F")
        flat = C.reshape(-1, order="F")  # a view: C is Fortran-ordered
        flat[cp.S_flat_f] -= cp.P @ W.ravel()
        rest_T = [block.T(th) for block, th in zip(cp.rest_blocks, pieces[1:])]
        if all(T.shape == (1, 1) for T in rest_T):
            if rest_T:  # scalar blocks: one pass over the lower triangle's rows and columns
                scale = np.ones(cp.m)
                for block, off, T in zip(cp.rest_blocks, cp.rest_offsets, rest_T):
                    scale[off : off + block.n_levels] = T[0, 0]
                C *= scale[:, None]
                C *= scale[None, :]
        else:
            C[cp.S_cols, cp.S_rows] = C[cp.S_rows, cp.S_cols]  # T mixes rows: keep C symmetric
            for block, off, T in zip(cp.rest_blocks, cp.rest_offsets, rest_T):
                _scale_rows_cols(C, off, block.n_levels, T)
        mR = cp.n_rest_effects
        idx = np.arange(mR)
        C[idx, idx] += 1.0
        Lr, info = lapack.dpotrf(C, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"dpotrf info {info}")
        d = np.diagonal(Lr)
        logdet_Z = logdet1 + 2.0 * float(np.sum(np.log(d[:mR])))
        logdet_X = 2.0 * float(np.sum(np.log(d[mR : mR + self.p])))
        pwrss = float(d[-1] ** 2)
        return Factorization(theta=np.asarray(theta, float).copy(), T1=T1, L1=L1, Minv=Minv, Lr=Lr,
                             rest_T=rest_T, logdet_Z=logdet_Z, logdet_X=logdet_X, pwrss=pwrss)

    def objective(self, f: Factorization) -> float:
        """The deviance (ML) or REML criterion from a factorisation."""
        n, p = self.n, self.p
        if not (f.pwrss > 0 and np.isfinite(f.pwrss)):
            return np.inf
        if self.reml:
            nmp = n - p
            return f.logdet_Z + f.logdet_X + nmp * (1.0 + np.log(2.0 * np.pi * f.pwrss / nmp))
        return f.logdet_Z + n * (1.0 + np.log(2.0 * np.pi * f.pwrss / n))

    def __call__(self, theta: np.ndarray) -> float:
        self.n_evaluations += 1
        try:
            f = self.factor(theta)
        except (np.linalg.LinAlgError, ValueError):
            return np.inf
        val = self.objective(f)
        return float(val) if np.isfinite(val) else np.inf


def _scale_rows_cols(C: np.ndarray, off: int, n_levels: int, T: np.ndarray) -> None:
    """In place: C ← Λᵀ C Λ on the rows/columns of one rest block, Λ = I_levels ⊗ T."""
    q = T.shape[0]
    sl = slice(off, off + n_levels * q)
    if q == 1:
        t = T[0, 0]
        C[sl, :] *= t
        C[:, sl] *= t
        return
    m = C.shape[0]
    rows = C[sl, :].reshape(n_levels, q, m)
    C[sl, :] = np.einsum("ba,jbm->jam", T, rows).reshape(n_levels * q, m)
    cols = C[:, sl].reshape(m, n_levels, q)
    C[:, sl] = np.einsum("mjb,ba->mja", cols, T).reshape(m, n_levels * q)
