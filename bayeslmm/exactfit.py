"""Is the response reproduced exactly by the fixed and random effects?

Then there is no residual variation: σ → 0, the likelihood is unbounded, and what an
optimizer or a sampler returns for σ, the variance parameters and even β depends on
where it stops (sleepstudy's design with y = 250 + 10·Days + per-subject offsets gave
the intercept 248.975 and σ = 1.8e-5 where every GLS fit gives 250).  The question is
answered from the data, not from a fit: the residual of y after projection on
span([X, Z]), compared with the rounding error of y itself.

Two steps, so that ordinary fits pay almost nothing:

1. A screen from the cross-products (the projection at θ → ∞ of the profiled
   deviance: the first block eliminated level by level, then the dense rest).  Sums
   of squares keep only about half the digits of the residual, so the screen can
   only say "clearly not exact" (residual rms ≥ ``SCREEN_RATIO`` × sd(y)).
2. Otherwise the residual from the rows by orthogonal projections (level by level
   for the first block, Frisch–Waugh–Lovell, then a least-squares solve for the
   rest), accurate to a few units of rounding of y.  The fit is exact when that
   residual is within ``EXACT_ULPS`` units of rounding of y and of the fitted values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .crossprod import CrossProducts, block_Z
from .spec import ModelSpec

#: residual rms (from the cross-products) above this fraction of sd(y): clearly not an exact fit
SCREEN_RATIO = 1e-4
#: exact when the residual rms is within this many units of rounding of y and the fitted values
#: (exact fits measure ~0.5; 1e-6·sd of noise on sleepstudy's response measures 4e8, and 1130
#: with the response moved 1e8 from zero)
EXACT_ULPS = 8.0
#: a residual rms below this fraction of sd(y), though above rounding, is more than the sums of squares
#: both engines work from resolve (σ̂ of sleepstudy-like data with 1e-8·sd of noise came out 1e-6·sd)
NEAR_EXACT_RATIO = 1e-7
#: rows × dense columns above which the rows are not projected (memory: 8 bytes each)
MAX_PROJECTION_VALUES = 20_000_000


@dataclass(frozen=True)
class ExactFitCheck:
    """What :func:`check_exact_fit` found.

    ``verdict`` is ``"no"`` (residual variation present), ``"exact"`` (the residual is
    rounding error of y), ``"near"`` (above rounding but below ``NEAR_EXACT_RATIO`` × sd(y))
    or ``"unresolved"`` (below the screen and the rows could not be projected:
    out-of-memory data or too many columns).
    """

    verdict: str
    residual_rms: float
    response_sd: float
    rounding: float = np.nan      # one unit of rounding of y and the fitted values (rms)

    @property
    def ratio(self) -> float:
        return self.residual_rms / self.response_sd if self.response_sd > 0 else np.inf


def check_exact_fit(spec: ModelSpec, cp: CrossProducts) -> ExactFitCheck:
    """Whether the response lies in span([X, Z]) up to its own rounding (see the module docstring)."""
    sd = float(np.std(spec.y)) if spec.rows_in_memory else float(spec.moments.y.std[0])
    screen = _screen_residual_rms(cp)
    if screen >= SCREEN_RATIO * sd:  # (a constant response is refused when the spec is built)
        return ExactFitCheck("no", screen, sd)
    n_dense = spec.n_fixed + sum(b.n_effects for b in spec.blocks[1:]) + 1
    if not spec.rows_in_memory or spec.n_obs * n_dense > MAX_PROJECTION_VALUES:
        return ExactFitCheck("unresolved", screen, sd)
    rms, rounding = _projection_residual(spec)
    if rms <= EXACT_ULPS * rounding:
        return ExactFitCheck("exact", rms, sd, rounding)
    return ExactFitCheck("near" if rms < NEAR_EXACT_RATIO * sd else "no", rms, sd, rounding)


def _screen_residual_rms(cp: CrossProducts) -> float:
    """rms of y's residual on [X Z] from the cross-products (accurate to ~√eps of y's size)."""
    A11 = cp.A11
    vals, vecs = np.linalg.eigh(A11)
    keep = vals > A11.shape[1] * np.finfo(float).eps * np.maximum(vals[:, -1:], 1e-300)
    inv = np.where(keep, 1.0 / np.where(keep, vals, 1.0), 0.0)
    W = np.einsum("jab,jb,jcb->jac", vecs, inv, vecs)               # per-level pseudo-inverse
    m = cp.m
    low = np.zeros((m, m))
    low[cp.S_rows, cp.S_cols] = cp.P @ W.ravel()
    S = np.asarray(cp.Arr) - (low + low.T - np.diag(np.diag(low)))
    Srr, s_ry, s_yy = S[:-1, :-1], S[:-1, -1], S[-1, -1]
    if Srr.size:
        # pivoted Cholesky, rank-revealing (columns the others span at θ → ∞ are left out)
        c, piv, rank, _ = sla.lapack.dpstrf(Srr, lower=1)
        Lk = np.tril(c[:rank, :rank])
        v = sla.solve_triangular(Lk, s_ry[piv[:rank] - 1], lower=True, check_finite=False)
        s_yy = s_yy - float(v @ v)
    return float(np.sqrt(max(s_yy, 0.0) / cp.n_obs))


def _projection_residual(spec: ModelSpec) -> tuple[float, float]:
    """(rms of y's residual on [X Z], rms of one unit of rounding), by orthogonal projections."""
    first, rest = spec.blocks[0], spec.blocks[1:]
    D = np.column_stack([spec.X] + [block_Z(b).toarray() for b in rest] + [spec.y])
    fitted_scale = np.zeros(spec.n_obs)            # Σ|terms| of the fitted values: their rounding scale
    order = np.argsort(first.codes, kind="stable")
    bounds = np.searchsorted(first.codes[order], np.arange(first.n_levels + 1))
    R = D.copy()
    for j in range(first.n_levels):
        rows = order[bounds[j]:bounds[j + 1]]
        U = _orthonormal_basis(first.Z[rows])
        if U.shape[1]:
            coef = U.T @ R[rows]
            R[rows] -= U @ coef
            fitted_scale[rows] += np.abs(U) @ np.abs(coef[:, -1])
    A, r = R[:, :-1], R[:, -1]
    if A.shape[1]:
        x, *_ = sla.lstsq(A, r, lapack_driver="gelsd")
        r = r - A @ x
        fitted_scale += np.abs(A) @ np.abs(x)
    rms = float(np.sqrt(np.mean(r**2)))
    rounding = float(np.finfo(float).eps) * float(np.sqrt(np.mean(spec.y**2 + fitted_scale**2)))
    return rms, rounding


def _orthonormal_basis(Zj: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of one level's rows (rank-revealing: SVD)."""
    U, s, _ = np.linalg.svd(Zj, full_matrices=False)
    if not s.size:
        return U
    return U[:, s > max(Zj.shape) * np.finfo(float).eps * s[0]]
