"""The frozen model specification both engines read.

``ModelSpec`` holds plain arrays: the response, the fixed-effect design with its
column names, and one :class:`RandomBlock` per random-effect term.  It imports no
PyMC, so a REML fit and a Bayesian fit of one formula are the same model by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import DataError


@dataclass(frozen=True, eq=False)
class RandomBlock:
    """One random-effect term: a grouping factor and the term's value columns.

    The effects of level ``j`` are a q-vector ``b_j ~ N(0, σ² T Tᵀ)``; an observation
    ``i`` in level ``codes[i]`` contributes ``Z[i] @ b_{codes[i]}`` to its mean.

    Attributes
    ----------
    group : str
        Name of the grouping factor (``"Subject"``, ``"a:b"``).
    codes : ndarray of int, shape (n,)
        Level index of each observation.
    levels : tuple of str
        Level labels, in the order of the codes.
    Z : ndarray, shape (n, q)
        The term's value columns (its left side): ``1`` for an intercept, ``x`` for a slope.
    columns : tuple of str
        Names of the columns of ``Z``.
    correlated : bool
        ``False`` for ``||`` terms: a diagonal covariance, no correlation parameters.
    """

    group: str
    codes: np.ndarray
    levels: tuple[str, ...]
    Z: np.ndarray
    columns: tuple[str, ...]
    correlated: bool = True

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def q(self) -> int:
        return self.Z.shape[1]

    @property
    def n_effects(self) -> int:
        """Number of random effects of the term: levels × columns."""
        return self.n_levels * self.q

    @property
    def theta_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column indices, in T, of this block's θ entries (lme4's order).

        lme4 stores the lower triangle of T column by column; a diagonal
        (``||``) block keeps the diagonal only.
        """
        if not self.correlated:
            idx = np.arange(self.q)
            return idx, idx
        rows, cols = [], []
        for j in range(self.q):
            for i in range(j, self.q):
                rows.append(i)
                cols.append(j)
        return np.array(rows), np.array(cols)

    @property
    def n_theta(self) -> int:
        return len(self.theta_index[0])

    @property
    def theta_lower(self) -> np.ndarray:
        """Lower bounds: 0 on the diagonal of T, unbounded below elsewhere."""
        rows, cols = self.theta_index
        return np.where(rows == cols, 0.0, -np.inf)

    @property
    def theta_start(self) -> np.ndarray:
        """lme4's starting value: T = I."""
        rows, cols = self.theta_index
        return np.where(rows == cols, 1.0, 0.0)

    def T(self, theta: np.ndarray) -> np.ndarray:
        """The q×q lower-triangular relative covariance factor for this block's θ."""
        out = np.zeros((self.q, self.q))
        rows, cols = self.theta_index
        out[rows, cols] = theta
        return out

    def labels(self) -> list[str]:
        """Names of θ entries, such as ``Subject.(Intercept)`` or ``Subject.Days.(Intercept)``."""
        rows, cols = self.theta_index
        out = []
        for i, j in zip(rows, cols):
            if i == j:
                out.append(f"{self.group}.{self.columns[i]}")
            else:
                out.append(f"{self.group}.{self.columns[i]}.{self.columns[j]}")
        return out


def nesting_map(inner_codes: np.ndarray, n_inner: int, outer_codes: np.ndarray) -> np.ndarray | None:
    """Each inner level's outer level (−1 for a level without rows) when the inner factor is nested in the
    outer one — every row's outer code is its inner level's — else None.  Both codes are per row."""
    out = np.full(n_inner, -1, dtype=np.int64)
    out[inner_codes] = outer_codes
    return out if np.array_equal(out[inner_codes], outer_codes) else None


@dataclass(frozen=True, eq=False)
class Moments:
    """Count, means, sums of squared deviations and largest |value| of some columns.

    What the default priors need from the rows (means and standard deviations),
    kept when the rows themselves are not (cross-products computed out of memory).
    Partial moments of row chunks combine exactly with :meth:`combine` (Chan, Golub
    & LeVeque 1979's pairwise update), which is stable where Σx² − n·mean² is not.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray       # Σ (x − mean)² per column
    max_abs: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        """Moments of the columns of a 2-d array (or of a 1-d array as one column)."""
        v = np.asarray(values, dtype=float)
        v = v[:, None] if v.ndim == 1 else v
        k = v.shape[1]
        if len(v) == 0:
            empty = np.zeros(k)
            return cls(0, empty, empty.copy(), empty.copy(), np.full(k, np.inf), np.full(k, -np.inf))
        cols = [np.ascontiguousarray(v[:, j]) for j in range(k)]  # column by column: 2× faster on (n, k)
        mean = np.array([c.mean() for c in cols])
        m2 = np.array([np.dot(c - m, c - m) for c, m in zip(cols, mean)])
        lo, hi = np.array([c.min() for c in cols]), np.array([c.max() for c in cols])
        return cls(len(v), mean, m2, np.maximum(np.abs(lo), np.abs(hi)), lo, hi)

    def combine(self, other: "Moments") -> "Moments":
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return Moments(n, mean, m2, np.maximum(self.max_abs, other.max_abs),
                       np.minimum(self.minimum, other.minimum), np.maximum(self.maximum, other.maximum))

    def take(self, columns) -> "Moments":
        """The moments of some of the columns."""
        c = np.asarray(columns, dtype=int)
        return Moments(self.n, self.mean[c], self.m2[c], self.max_abs[c], self.minimum[c], self.maximum[c])

    @property
    def std(self) -> np.ndarray:
        """Population standard deviations (``np.std``'s)."""
        return np.sqrt(self.m2 / self.n)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.mean**2 + self.m2 / self.n)


@dataclass(frozen=True, eq=False)
class RowMoments:
    """Moments of the response, of each fixed-effect column and of each block's columns."""

    y: Moments
    X: Moments
    Z: tuple[Moments, ...]   # one per block, in ``ModelSpec.blocks`` order


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """Everything the engines need, and nothing about how they sample or optimise.

    Attributes
    ----------
    formula : str
        The formula as the user wrote it (bar terms included).
    response : str
        Name of the response expression.
    y : ndarray, shape (n,)
    X : ndarray, shape (n, p)
    fixed_names : tuple of str
        Column names of ``X``; the intercept is ``"(Intercept)"`` as in lme4.
    blocks : tuple of RandomBlock
        Sorted by decreasing number of levels (lme4's order, which is θ's order).
    row_index : pandas.Index-like ndarray
        The data's index labels of the rows used.
    notes : tuple of str
        What was done to the input and reported (rows dropped for missing values,
        rank-deficient columns dropped).
    dropped_fixed : tuple of str
        Fixed-effect columns dropped because ``X`` was rank deficient.
    data : pandas.DataFrame or None
        The rows and columns the model used (after any dropping of missing values):
        what prediction needs to rebuild contrasts and levels for new data, and what
        ``save`` stores so a fit can be rebuilt.  ``None`` when the cross-products
        were computed out of memory.
    missing, rank_deficient : str
        The options ``build_spec`` was called with.
    n_rows : int or None
        The number of observations when the per-row arrays are not kept
        (cross-products computed out of memory, :mod:`bayeslmm.outofcore`): then ``y``,
        ``X`` and each block's ``codes`` and ``Z`` have no rows, and ``moments``
        holds what the default priors need.  ``None`` for an in-memory spec.
    moments : RowMoments or None
        Means and standard deviations of y and of the design columns (out of memory only).
    residual : bayeslmm.residual.ResidualModel or None
        The residual structure R = σ² Λ_R(ρ) on these rows; None for σ² I (see
        :mod:`bayeslmm.residual`).
    """

    formula: str
    response: str
    y: np.ndarray
    X: np.ndarray
    fixed_names: tuple[str, ...]
    blocks: tuple[RandomBlock, ...]
    row_index: np.ndarray
    notes: tuple[str, ...] = field(default=())
    dropped_fixed: tuple[str, ...] = field(default=())
    fixed_formula: str = ""
    data: "pd.DataFrame | None" = field(default=None, repr=False)
    missing: str = "raise"
    rank_deficient: str = "drop"
    n_rows: int | None = None
    moments: RowMoments | None = field(default=None, repr=False)
    residual: "ResidualModel | None" = field(default=None, repr=False)  # noqa: F821 (bayeslmm.residual)

    @property
    def n_obs(self) -> int:
        return len(self.y) if self.n_rows is None else self.n_rows

    @property
    def rows_in_memory(self) -> bool:
        """False when the model was built out of memory and keeps no per-row arrays."""
        return self.n_rows is None

    def require_rows(self, what: str) -> None:
        """Raise a DataError saying that ``what`` needs the rows in memory."""
        if not self.rows_in_memory:
            raise DataError(
                f"{what} needs the data's rows in memory, and this model was built out of memory "
                f"(a Dask DataFrame or Parquet dataset: {self.n_obs} rows, cross-products only). "
                "Build the model from a pandas DataFrame (ddf.compute(), or a sample of it) for per-row results"
            )

    @property
    def n_fixed(self) -> int:
        return self.X.shape[1]

    @property
    def n_theta(self) -> int:
        return sum(b.n_theta for b in self.blocks)

    @property
    def theta_lower(self) -> np.ndarray:
        return np.concatenate([b.theta_lower for b in self.blocks])

    @property
    def theta_start(self) -> np.ndarray:
        return np.concatenate([b.theta_start for b in self.blocks])

    def split_theta(self, theta: np.ndarray) -> list[np.ndarray]:
        """Cut a full θ vector into one piece per block."""
        theta = np.asarray(theta, dtype=float)
        out, k = [], 0
        for b in self.blocks:
            out.append(theta[k : k + b.n_theta])
            k += b.n_theta
        return out

    def theta_labels(self) -> list[str]:
        return [lab for b in self.blocks for lab in b.labels()]

    def group_names(self) -> list[str]:
        """Distinct grouping factors, in block order."""
        return list(self.group_levels())

    def group_levels(self) -> dict[str, int]:
        """Number of levels of each distinct grouping factor, in block order."""
        out: dict[str, int] = {}
        for b in self.blocks:
            out.setdefault(b.group, b.n_levels)
        return out

    def counts_line(self) -> str:
        """lme4's ``Number of obs: 180, groups:  Subject, 18`` line."""
        groups = ", ".join(f"{g}, {n}" for g, n in self.group_levels().items())
        return f"Number of obs: {self.n_obs}, groups:  {groups}"
