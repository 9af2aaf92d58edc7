"""Cross-products of ``[Z X y]``, computed once, in blocks.

Every later evaluation of the profiled deviance (and of the collapsed likelihood)
reads these blocks only, so its cost does not grow with the number of rows.

Layout.  The first random-effect block (the one with the most levels, lme4's
order) is kept *block diagonal*: ``A11[j] = Z_1jᵀ Z_1j``, a q₁×q₁ matrix per level.
Everything else — the effects of the other blocks, then the fixed-effect columns,
then the response — forms the *rest*, m columns in all, whose cross-product
``Arr`` is held dense.  The coupling ``B = [Z_rest X y]ᵀ Z_1`` is sparse.

For the Schur complement of the first block the profiled deviance needs
``S(θ) = Σ_j B_j W_j B_jᵀ`` for per-level q₁×q₁ weights ``W_j``.  Its sparsity is
fixed, so the products ``B_j[r,a] B_j[s,b]`` are laid out once in a sparse matrix
``P`` and each evaluation is a single sparse matrix–vector product ``P @ vec(W)``.
"""

from __future__ import annotations

import dataclasses
import weakref

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .errors import ModelError
from .spec import ModelSpec, RandomBlock

#: dense ``rest`` blocks above this many columns are refused (memory m² × 8 bytes)
MAX_REST_COLUMNS = 20_000


def block_Z(block: RandomBlock) -> sp.csc_matrix:
    """The sparse n × (levels·q) model matrix of one random-effect block.

    Columns are level-major: level j's q columns are ``j*q ... j*q + q - 1``.
    """
    n, q = block.Z.shape
    rows = np.repeat(np.arange(n), q)
    cols = (block.codes[:, None] * q + np.arange(q)[None, :]).ravel()
    return sp.csc_matrix((block.Z.ravel(), (rows, cols)), shape=(n, block.n_effects))


def per_level_products(codes: np.ndarray, left: np.ndarray, right: np.ndarray, n_levels: int) -> np.ndarray:
    """``out[j] = Σ_{i in level j} left[i]ᵀ right[i]`` as an (n_levels, a, b) array."""
    a, b = left.shape[1], right.shape[1]
    out = np.empty((n_levels, a, b))
    for i in range(a):
        for k in range(b):
            out[:, i, k] = np.bincount(codes, weights=left[:, i] * right[:, k], minlength=n_levels)
    return out


@dataclass(frozen=True, eq=False)
class CrossProducts:
    """The blocks of ``[Z X y]ᵀ[Z X y]`` that both engines read.

    Attributes
    ----------
    n_obs, n_fixed : int
    first : RandomBlock
        The block kept block diagonal.
    A11 : ndarray, shape (n1, q1, q1)
        ``Z_1jᵀ Z_1j`` per level of the first block.
    rest_blocks : tuple of RandomBlock
        The other random-effect blocks, in θ order.
    rest_offsets : tuple of int
        Where each rest block's effects start among the rest columns.
    n_rest_effects : int
        Number of rest columns that are random effects (mR); then p fixed, then y.
    Arr : ndarray, shape (m, m)
        ``[Z_rest X y]ᵀ [Z_rest X y]``.
    B : scipy.sparse.csr_matrix, shape (m, n1 q1)
        ``[Z_rest X y]ᵀ Z_1``.
    P : scipy.sparse.csr_matrix
        Products laid out so that ``P @ W.ravel()`` gives the lower triangle of
        ``Σ_j B_j W_j B_jᵀ`` at ``(S_rows, S_cols)``.
    """

    n_obs: int
    n_fixed: int
    first: RandomBlock
    A11: np.ndarray
    rest_blocks: tuple[RandomBlock, ...]
    rest_offsets: tuple[int, ...]
    n_rest_effects: int
    Arr: np.ndarray
    B: sp.csr_matrix
    P: sp.csr_matrix
    S_rows: np.ndarray
    S_cols: np.ndarray
    y_shift: float = 0.0
    intercept: int = -1

    @property
    def m(self) -> int:
        return self.Arr.shape[0]

    @cached_property
    def S_flat_f(self) -> np.ndarray:
        """Positions of ``(S_rows, S_cols)`` in an m×m Fortran-ordered array, flattened."""
        return self.S_cols * self.m + self.S_rows

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "CrossProducts":
        """Compute every block in one pass over the rows."""
        first, rest = spec.blocks[0], spec.blocks[1:]
        n1, q1 = first.n_levels, first.q
        shift, i0 = response_shift(spec)
        Xy = np.column_stack([spec.X, spec.y - shift])
        n_rest_eff = sum(b.n_effects for b in rest)
        m = n_rest_eff + Xy.shape[1]
        if m > MAX_REST_COLUMNS:
            raise ModelError(
                f"the random-effect blocks after the one with the most levels have {n_rest_eff} "
                f"effects, so the dense part of the factorisation would be {m}×{m}; bayeslmm "
                f"handles up to {MAX_REST_COLUMNS}. Reduce the levels or slopes of the smaller "
                "grouping factors"
            )
        A11 = per_level_products(first.codes, first.Z, first.Z, n1)
        XyXy = Xy.T @ Xy
        B_xy = per_level_products(first.codes, Xy, first.Z, n1)  # (n1, p+1, q1)
        B_xy = B_xy.transpose(1, 0, 2).reshape(Xy.shape[1], n1 * q1)
        if rest:
            Zr = sp.hstack([block_Z(b) for b in rest], format="csc")
            Z1 = block_Z(first)
            ZrZr = (Zr.T @ Zr).toarray()
            ZrXy = np.asarray(Zr.T @ Xy)
            Arr = np.block([[ZrZr, ZrXy], [ZrXy.T, XyXy]])
            B = sp.vstack([sp.csr_matrix(Zr.T @ Z1), sp.csr_matrix(B_xy)], format="csr")
        else:
            Arr = XyXy
            B = sp.csr_matrix(B_xy)
        cp = cls.from_blocks(spec.n_obs, spec.n_fixed, first, tuple(rest), A11, Arr, B)
        return dataclasses.replace(cp, y_shift=shift, intercept=i0) if shift else cp

    @classmethod
    def from_blocks(cls, n_obs: int, n_fixed: int, first: RandomBlock, rest_blocks: tuple[RandomBlock, ...],
                    A11: np.ndarray, Arr: np.ndarray, B) -> "CrossProducts":
        """Assemble from the sums themselves, however they were computed.

        ``A11`` (n1, q1, q1), ``Arr`` (m, m) and ``B`` (m, n1·q1, any sparse or dense
        matrix) are the sums over rows described above — computed here by
        :meth:`from_spec`, or accumulated chunk by chunk by :mod:`bayeslmm.outofcore`.
        The blocks' ``codes`` and ``Z`` are not read (they may have no rows).
        """
        n1, q1 = first.n_levels, first.q
        offsets, k = [], 0
        for b in rest_blocks:
            offsets.append(k)
            k += b.n_effects
        m = k + n_fixed + 1
        if Arr.shape != (m, m) or B.shape != (m, n1 * q1) or A11.shape != (n1, q1, q1):
            raise ModelError(f"cross-product blocks of the wrong shape: A11 {A11.shape}, Arr {Arr.shape}, "
                             f"B {B.shape} for {n1} levels × {q1} and m = {m}")
        B = sp.csr_matrix(B)
        B.eliminate_zeros()
        P, S_rows, S_cols = _pair_products(B, n1, q1)
        return cls(
            n_obs=n_obs, n_fixed=n_fixed, first=first, A11=np.ascontiguousarray(A11, dtype=float),
            rest_blocks=tuple(rest_blocks), rest_offsets=tuple(offsets), n_rest_effects=k,
            Arr=np.asfortranarray(Arr, dtype=float), B=B, P=P, S_rows=S_rows, S_cols=S_cols,
        )


#: the response is shifted by its mean inside the cross-products when |mean| exceeds this many sds
SHIFT_RATIO = 30.0


def response_shift(spec: ModelSpec) -> tuple[float, int]:
    """(c, intercept column) when y's cross-products should be taken of y − c, else (0, −1).

    yᵀy and the pivots after it are sums of squares of y: with y = 1e8 + noise of sd 25
    they are ~1e16 per row and the penalised residual sum of squares, ~600 per row, keeps
    only a few digits (sleepstudy + 1e8: σ 25.38 instead of 25.59).  With an intercept
    column in X, y − c·1 is the same model with the intercept moved by c (the profiled
    deviance, σ, the effects are unchanged), so the sums are taken of y − mean(y) and
    consumers add c back (``reml.estimates``, ``CollapsedData.from_crossprods``).
    """
    if "(Intercept)" not in spec.fixed_names:
        return 0.0, -1
    i0 = list(spec.fixed_names).index("(Intercept)")
    mean, sd = float(np.mean(spec.y)), float(np.std(spec.y))
    if abs(mean) > SHIFT_RATIO * sd and np.all(spec.X[:, i0] == 1.0):
        return mean, i0
    return 0.0, -1


def _pair_products(B: sp.csr_matrix, n1: int, q1: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Lay out ``B_j[r,a] B_j[s,b]`` (r ≥ s) for every level j, without a loop over levels."""
    coo = B.tocoo()
    level = coo.col // q1
    a = coo.col % q1
    order = np.lexsort((coo.row, level))
    rows, a, v, level = coo.row[order].astype(np.int64), a[order], coo.data[order], level[order]
    counts = np.bincount(level, minlength=n1)
    starts = np.cumsum(counts) - counts
    rep = counts[level]
    e1 = np.repeat(np.arange(len(rows)), rep)
    offs = np.arange(len(e1)) - np.repeat(np.cumsum(rep) - rep, rep)
    e2 = starts[level[e1]] + offs
    keep = rows[e1] >= rows[e2]
    e1, e2 = e1[keep], e2[keep]
    m = B.shape[0]
    flat = rows[e1] * m + rows[e2]
    uniq, out_row = np.unique(flat, return_inverse=True)
    w_col = level[e1] * q1 * q1 + a[e1] * q1 + a[e2]
    P = sp.csr_matrix((v[e1] * v[e2], (out_row, w_col)), shape=(len(uniq), n1 * q1 * q1))
    P.sum_duplicates()
    return P, uniq // m, uniq % m


#: each spec's cross-products, kept while the spec lives (fits do not keep them: files stay small)
_BY_SPEC: "weakref.WeakKeyDictionary[ModelSpec, CrossProducts]" = weakref.WeakKeyDictionary()


def remember(spec: ModelSpec, crossprods: CrossProducts) -> None:
    """Keep ``crossprods`` as ``spec``'s, for the computations after a fit (profiles, df)."""
    _BY_SPEC[spec] = crossprods


def crossproducts_of(spec: ModelSpec, what: str = "this computation") -> CrossProducts:
    """The spec's cross-products: remembered, or computed once from its rows.

    A spec built out of memory has no rows: its cross-products are those its ``Model``
    computed, remembered while that spec lives; a fit reloaded from a file in another
    session has none, and ``what`` is refused with a clear error.
    """
    try:
        return _BY_SPEC[spec]
    except KeyError:
        pass
    if not getattr(spec, "rows_in_memory", True):
        raise ModelError(f"this model was built out of memory and its cross-products are not at hand (a fit "
                         f"loaded from a file keeps none); {what} needs them: rebuild the Model from the "
                         "data and fit it again")
    cp = _BY_SPEC[spec] = CrossProducts.from_spec(spec)
    return cp
