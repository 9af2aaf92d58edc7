"""Linear hypotheses about the fixed effects: per-term type II and III contrasts, marginal means.

Everything here is a matrix L over the fixed-effect columns; an engine then tests
Lβ = 0 (REML: F with Satterthwaite df) or summarises Lβ's draws (NUTS).

A term is a product of factors and covariates (``Product:Information``,
``sens2:Homesize``).  A term G *contains* F when G ≠ F, F's factors are among G's and
both have the same covariates: then G's columns span F's (``x:g`` spans ``x``, but
not ``g``'s indicators).

Type III (lmerTest's default; SAS's, for a full-rank design): F's hypothesis is the
F-interaction contrast of the model's mean, averaged with equal weights over the levels
of every other factor, with covariates at 0 (not centred) — and for F's own covariates,
the coefficient of their product (a mixed difference of unit steps).  ham's
Product, averaged over Information: F = 3.829 (naive treatment-coded rows: 4.234).

Type II: F adjusted for every term that does not contain it, and not for those that do
(Searle 1987, ch. 9; lmerTest's type II): the rows Xᴛ_F (I − P_U) X, U the columns of
the terms that neither are nor contain F; a term no other contains is tested by its own
coefficients.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BayesLMMError


@dataclass(frozen=True)
class FixedTerm:
    """One term of the fixed-effect formula and its columns in X.

    ``name`` as the formula writes it ("Product:Information"); ``factors`` and
    ``covariates`` the categorical and numeric variables it multiplies; ``columns`` its
    positions among the fixed-effect columns.  The intercept has neither.
    """

    name: str
    factors: tuple[str, ...]
    covariates: tuple[str, ...]
    columns: tuple[int, ...]

    @property
    def is_intercept(self) -> bool:
        return not self.factors and not self.covariates

    def contains(self, other: "FixedTerm") -> bool:
        """Whether this term's columns span ``other``'s (see the module docstring)."""
        return (self.name != other.name and not other.is_intercept and set(other.factors) <= set(self.factors)
                and set(other.covariates) == set(self.covariates))


def find_term(terms: Sequence[FixedTerm], name: str) -> FixedTerm:
    """The term called ``name`` (its variables in any order: ``Information:Product`` too)."""
    wanted = sorted(name.replace(" ", "").split(":"))
    for t in terms:
        if sorted(t.name.replace(" ", "").split(":")) == wanted and not t.is_intercept:
            return t
    tested = [t.name for t in terms if not t.is_intercept]
    raise BayesLMMError(f"{name!r} is not a term of the fixed effects; the terms are {tested}")


def type3_contrasts(term: FixedTerm, terms: Sequence[FixedTerm], levels: dict[str, list],
                    factor_part: Callable[[dict], np.ndarray]) -> np.ndarray:
    """Type III hypothesis rows of ``term``.

    ``levels`` gives every factor of the fixed effects its levels; ``factor_part(cell)``
    gives, for a cell (a level of every factor), each column's value with its covariates'
    product set to 1 (the indicator/contrast part: :func:`bayeslmm.formula.terms.factor_parts`).
    Covariates at 0 and the term's own covariates' product differenced from 0 to 1 leave
    exactly the columns whose term has the same covariates as ``term`` (inclusion–exclusion
    over the covariates: a column with covariates C contributes 1[C = V]), so a row is
    ``factor_part(cell)`` on those columns — for any transformation of the covariates
    (``I(age - 11)``, ``np.log(x)``), since the columns' values are read, not re-derived.
    """
    factors = sorted({f for t in terms for f in t.factors})
    others = [f for f in factors if f not in term.factors]
    same = np.zeros(max(c for t in terms for c in t.columns) + 1, dtype=bool)
    for t in terms:
        if set(t.covariates) == set(term.covariates):
            same[list(t.columns)] = True
    rows = []
    for cell in itertools.product(*(levels[f] for f in term.factors)):
        parts = [factor_part(dict(zip(term.factors, cell)) | dict(zip(others, o)))
                 for o in itertools.product(*(levels[f] for f in others))]
        rows.append(np.where(same, np.mean(parts, axis=0), 0.0))
    K = np.asarray(rows)
    C = np.ones((1, 1))
    for f in term.factors:
        C = np.kron(C, _successive_differences(len(levels[f])))
    return _independent_rows(C @ K)


def _successive_differences(k: int) -> np.ndarray:
    D = np.zeros((k - 1, k))
    D[np.arange(k - 1), np.arange(k - 1)] = -1.0
    D[np.arange(k - 1), np.arange(1, k)] = 1.0
    return D


def type2_contrasts(term: FixedTerm, terms: Sequence[FixedTerm], X: np.ndarray) -> np.ndarray:
    """Type II hypothesis rows of ``term`` from the fitted design ``X``."""
    p = X.shape[1]
    containing = [t for t in terms if t.contains(term)]
    if not containing:
        L = np.zeros((len(term.columns), p))
        L[np.arange(len(term.columns)), list(term.columns)] = 1.0
        return L
    skip = set(term.columns).union(*(t.columns for t in containing))
    U = X[:, [j for j in range(p) if j not in skip]]
    XF = X[:, list(term.columns)]
    if U.shape[1]:
        Q, _ = np.linalg.qr(U)
        XF = XF - Q @ (Q.T @ XF)
    return _independent_rows(XF.T @ X)


def _independent_rows(L: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """An orthonormal basis of L's row space (the F test depends on the space only)."""
    _, s, vt = np.linalg.svd(L, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        raise BayesLMMError("this term has no estimable hypothesis (its columns were all dropped as "
                            "rank deficient)")
    return vt[s > rtol * s[0]]


def check_matrix(L, fixed_names: Sequence[str]) -> np.ndarray:
    """A hypothesis matrix as a float array of rows over the fixed effects, or a clear error."""
    L = np.atleast_2d(np.asarray(L, dtype=float))
    p = len(fixed_names)
    if L.ndim != 2 or L.shape[1] != p or L.shape[0] < 1:
        raise BayesLMMError(f"a hypothesis matrix needs {p} columns (one per fixed effect: {list(fixed_names)}), "
                            f"got shape {np.shape(L)}")
    if not np.all(np.isfinite(L)):
        raise BayesLMMError("the hypothesis matrix has missing or infinite entries")
    return L
