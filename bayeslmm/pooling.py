"""Complete, no and partial pooling side by side: what a mixed model does to each group.

For one grouping factor, :func:`pooling_table` puts each level's own line under three
kinds of pooling next to each other (Gelman & Hill 2007, *Data Analysis Using
Regression and Multilevel/Hierarchical Models*, ch. 12).

**A level's own line.**  The factor's random-effect columns ``Z`` (``1`` and ``age`` for
``(age | Subject)``) span, on a level's rows, the lines that level can have.  A level's
own line under a set of values ``v`` (one per row) is the least-squares fit of ``v`` on
the level's rows by its columns ``Z_j``.  The fixed-effect columns fall in three roles:

* *the factor's own columns* (``(Intercept)``, ``age``): they are columns of ``Z``;
* *group-level columns*, in the span of ``Z_j`` on every level: a predictor constant
  within each level (``Sex`` of a child, ``Diet`` of a rat, the parent factor of a
  nested cell) or its interaction with a ``Z`` column (``Time:Diet``).  They are part
  of each level's line: a boy's population line has the boys' intercept;
* *covariates*, varying within some level outside the span of ``Z_j`` (a doctor's
  patients' ages).  Every line is drawn with them at 0; the no-pooling fit estimates
  their coefficients once for all levels (``"shared"``, Gelman & Hill's indicator
  regression) or per level (``"separate"``, lme4's ``lmList``).

Then, with ``W γ`` the covariates' part of the fitted values:

* **no pooling** — the fit of ``y − W γ̂`` (``γ̂`` of the no-pooling fit): the level's
  own data only (per-child OLS of ``distance ~ age`` on Orthodont);
* **complete pooling** — the fit of ``X β_OLS − W β_OLS``, β_OLS one ordinary
  least-squares fit of every row, the groups ignored;
* **population** — the fit of ``X β̂ − W β̂`` plus the effects of the grouping factors
  the level is nested in: the mixed model's line for a new level with this level's
  group-level predictors (and, for a nested cell, its parent's effect): the line
  partial pooling pulls the level towards;
* **partial pooling** — the fit of the conditional fitted values ``X β̂ + Z b̂ − W β̂``
  over *all* grouping factors: the level's line as the mixed model fits it (a nested
  cell's line includes its parent's effect; a crossed factor's effects enter as their
  mean over the level's rows).  Without group-level columns and other factors this is
  lme4's ``coef()``, β + b_j.  For a Bayesian fit the posterior means of β and b are
  used: the fit is linear in them, so this is the posterior mean of the line;
* **shrinkage** — ``(no pooling − partial) / (no pooling − population)``: the fraction
  of the way from the level's own estimate to its population line that partial pooling
  went; 0 when the level's data are kept as they are, 1 when it is pulled all the way.
  For a random-intercept model without covariates fitted by REML it is exactly
  ``σ² / (σ² + n_j σ_b²)``: levels with fewer observations shrink more.

Ranks are decided on columns scaled to unit length, a singular value counting when it
exceeds ``s_max · max(n, p) · eps · 100`` (:func:`least_squares`): a column that is
constant within levels up to rounding is recognised as such, not fitted as a 1e-16
signal into a 1e13 coefficient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import ModelError, did_you_mean
from .spec import nesting_map

__all__ = ["NO_POOLING", "least_squares", "pooling_table"]

#: the two definitions of the no-pooling estimate
NO_POOLING = ("shared", "separate")

#: the rank tolerance's safety factor over rounding (s_max · max(n, p) · eps is LAPACK's own scale)
RANK_FACTOR = 100.0

_KINDS = ("complete", "no_pooling", "partial", "population", "shrinkage")


# ------------------------------------------------------------------------ the fit
def resolve_fit(fit):
    """A FreqFit or BayesFit; a :class:`~bayeslmm.Model` is fitted by REML."""
    from .bayes.results import BayesFit
    from .model import Model
    from .reml.results import FreqFit

    if isinstance(fit, Model):
        return fit.fit(method="reml")
    if isinstance(fit, (FreqFit, BayesFit)):
        return fit
    raise ModelError(f"`fit` must be a FreqFit (fit(method='reml'|'ml')), a BayesFit (fit(method='nuts')) "
                     f"or a Model (fitted by REML here); got {type(fit).__name__}")


@dataclass(frozen=True)
class GroupDesign:
    """The random-effect columns of one grouping factor, gathered over its blocks.

    Attributes
    ----------
    group : str
    levels : tuple of str
    codes : ndarray of int
        Level of each observation.
    Z : ndarray (n, q)
        The factor's distinct value columns (a column repeated in two blocks once).
    columns : tuple of str
    fixed_index : tuple of (int or None)
        Position of each column in the fixed-effect design, or ``None`` when the
        column has no fixed effect (``(0 + x | g)`` without ``x`` in the fixed part).
    blocks : tuple of (int, tuple of int)
        For each of the factor's blocks: its position in ``spec.blocks`` and the
        position in ``columns`` of each of its columns.
    """

    group: str
    levels: tuple
    codes: np.ndarray
    Z: np.ndarray
    columns: tuple
    fixed_index: tuple
    blocks: tuple

    @property
    def q(self) -> int:
        return len(self.columns)

    @property
    def intercept(self) -> int | None:
        """Position of the all-ones column, if the factor has one."""
        ones = np.flatnonzero(np.all(self.Z == 1.0, axis=0))
        return int(ones[0]) if ones.size else None


def group_design(spec, group: str | None) -> GroupDesign:
    """Collect the blocks of ``group`` (default: the first block's factor)."""
    groups = spec.group_names()
    if group is None:
        group = spec.blocks[0].group
    if not isinstance(group, str) or group not in groups:
        hint = did_you_mean(str(group), groups) if isinstance(group, str) else ""
        raise ModelError(f"`group` must be one of the model's grouping factors {groups}, got {group!r}.{hint}")
    members = [(k, b) for k, b in enumerate(spec.blocks) if b.group == group]
    first = members[0][1]
    columns: list[str] = []
    zcols: list[np.ndarray] = []
    blocks = []
    for k, b in members:
        if tuple(b.levels) != tuple(first.levels) or not np.array_equal(b.codes, first.codes):
            raise ModelError(f"the blocks of grouping factor {group!r} do not share one set of levels")
        pos = []
        for a, name in enumerate(b.columns):
            if name not in columns:
                columns.append(name)
                zcols.append(np.asarray(b.Z[:, a], dtype=float))
            pos.append(columns.index(name))
        blocks.append((k, tuple(pos)))
    Z = np.column_stack(zcols)
    fixed = list(spec.fixed_names)
    fixed_index = []
    for name, z in zip(columns, Z.T):
        if name in fixed:
            fixed_index.append(fixed.index(name))
            continue
        # a column named differently in the two parts but holding the same numbers
        same = [i for i in range(spec.X.shape[1]) if np.array_equal(spec.X[:, i], z)]
        fixed_index.append(same[0] if same else None)
    return GroupDesign(group=group, levels=tuple(first.levels), codes=np.asarray(first.codes), Z=Z,
                       columns=tuple(columns), fixed_index=tuple(fixed_index), blocks=tuple(blocks))


def level_rows(codes: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Row positions of each level, in level order."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=n_levels)
    return np.split(order, np.cumsum(counts)[:-1])


# ------------------------------------------------------------------ least squares
def least_squares(A: np.ndarray, b: np.ndarray, norms: np.ndarray | None = None):
    """Minimum-norm least squares with a rank decided on scaled columns.

    The columns are divided by ``norms`` (default: their own lengths) before the SVD,
    so that the rank does not depend on the units of the columns, and a singular value
    counts when it exceeds ``s_ref · max(n, p) · eps · RANK_FACTOR``, ``s_ref`` the
    largest singular value (at least 1 when ``norms`` are given: the lengths of the
    columns before they were residualized, so that a column reduced to rounding noise
    counts as nothing rather than as the only, full-size, signal).

    Returns ``(coef, estimable, rank)``: coefficient ``c`` is estimable (the same for
    every least-squares solution) when the unit vector ``e_c`` lies in the row space of
    ``A``; ``coef`` has ``b``'s trailing shape.
    """
    svd = ScaledSVD.of(A, norms)
    return svd.solve(b), svd.estimable, svd.rank


@dataclass(frozen=True)
class ScaledSVD:
    """The SVD of ``A`` with scaled columns, truncated at its numerical rank (see :func:`least_squares`)."""

    U: np.ndarray
    s: np.ndarray
    Vt: np.ndarray
    scale: np.ndarray

    @classmethod
    def of(cls, A: np.ndarray, norms: np.ndarray | None = None) -> "ScaledSVD":
        A = np.asarray(A, dtype=float)
        n, p = A.shape
        scale = np.sqrt(np.sum(A**2, axis=0)) if norms is None else np.asarray(norms, dtype=float)
        scale = np.where(scale > 0, scale, 1.0)
        if n == 0 or p == 0:
            return cls(np.zeros((n, 0)), np.zeros(0), np.zeros((0, p)), scale)
        U, s, Vt = np.linalg.svd(A / scale, full_matrices=False)
        s_ref = max(s[0], 0.0 if norms is None else 1.0)
        tol = s_ref * max(n, p) * np.finfo(float).eps * RANK_FACTOR
        r = int(np.sum(s > tol))
        return cls(U[:, :r], s[:r], Vt[:r], scale)

    @property
    def rank(self) -> int:
        return self.s.size

    @property
    def estimable(self) -> np.ndarray:
        return np.sum(self.Vt**2, axis=0) > 1 - 1e-8

    def solve(self, b: np.ndarray) -> np.ndarray:
        """Minimum-norm coefficients (NaN for a matrix without rows)."""
        b = np.asarray(b, dtype=float)
        trail = (1,) * (b.ndim - 1)
        if self.U.shape[0] == 0:
            return np.full((self.Vt.shape[1],) + b.shape[1:], np.nan)
        coef = self.Vt.T @ ((self.U.T @ b) / self.s.reshape((-1,) + trail))
        return coef / self.scale.reshape((-1,) + trail)

    def in_span(self, M: np.ndarray) -> np.ndarray:
        """Whether each column of ``M`` lies in the column space: appending it would add no singular value."""
        M = np.asarray(M, dtype=float)
        length = np.sqrt(np.sum(M**2, axis=0))
        residual = np.sqrt(np.sum((M - self.U @ (self.U.T @ M)) ** 2, axis=0))
        n, p = self.U.shape[0], self.Vt.shape[1] + 1
        tol = max(self.s[0] if self.rank else 0.0, 1.0) * max(n, p) * np.finfo(float).eps * RANK_FACTOR
        return residual <= tol * length


def _reason(n_rows: int, n_coef: int) -> str:
    if n_rows < n_coef:
        return f"fewer observations ({n_rows}) than coefficients ({n_coef})"
    return "its columns are collinear within the level (e.g. a predictor constant in it)"


# -------------------------------------------------------------- column roles
@dataclass(frozen=True)
class Roles:
    """How the fixed-effect columns relate to one factor's lines.

    Attributes
    ----------
    own : dict
        Fixed column → position in the factor's columns (``(Intercept)``, ``age``).
    group_level : tuple of int
        Fixed columns in the span of every level's ``Z_j`` (``Sex``, ``Time:Diet``).
    covariates : tuple of int
        The other fixed columns: they vary within some level outside that span.
    loadings : ndarray (J, len(group_level), q)
        Each group-level column written in the level's columns, NaN where the level's
        rows do not determine it.
    """

    own: dict
    group_level: tuple
    covariates: tuple
    loadings: np.ndarray


def level_loadings(svd: ScaledSVD, M: np.ndarray, intercept: int | None):
    """Write each column of ``M`` in one level's columns ``Zj`` (``svd`` is theirs): ``(L (k, q), in_span (k,))``.

    A column that is zero, or constant with an intercept among ``Zj``, is written
    exactly, even when ``Zj`` is rank-deficient (a one-row level); any other gets the
    least-squares coefficients, NaN where they are not determined, and is in the span
    when appending it to ``Zj`` does not raise the rank.
    """
    L = np.full((M.shape[1], svd.Vt.shape[1]), np.nan)
    in_span = np.zeros(M.shape[1], dtype=bool)
    exact = ~np.any(M, axis=0) | ((intercept is not None) & np.all(M == M[:1], axis=0))
    L[exact] = 0.0
    if intercept is not None:
        L[exact, intercept] = M[0, exact] if len(M) else 0.0
    in_span[exact] = True
    rest = np.flatnonzero(~exact)
    if rest.size:
        L[np.ix_(rest, svd.estimable)] = svd.solve(M[:, rest])[svd.estimable].T
        in_span[rest] = svd.in_span(M[:, rest])
    return L, in_span


def column_roles(spec, gd: GroupDesign, rows: list[np.ndarray], svds: list[ScaledSVD]) -> Roles:
    """Sort the fixed columns into the factor's own, group-level and covariates."""
    own = {i: a for a, i in enumerate(gd.fixed_index) if i is not None}
    others = [i for i in range(spec.X.shape[1]) if i not in own]
    J = len(rows)
    loads = np.zeros((J, len(others), gd.q))
    spanned = np.ones(len(others), dtype=bool)
    intercept = gd.intercept
    for j, r in enumerate(rows):
        loads[j], in_span = level_loadings(svds[j], spec.X[np.ix_(r, others)], intercept)
        spanned &= in_span
    group_level = tuple(i for i, s in zip(others, spanned) if s)
    covariates = tuple(i for i, s in zip(others, spanned) if not s)
    return Roles(own=own, group_level=group_level, covariates=covariates, loadings=loads[:, spanned])


# -------------------------------------------------------------------- the lines
def no_pooling_estimates(spec, gd: GroupDesign, roles: Roles, rows, svds, mode: str = "shared"):
    """Each level's own line from its own rows.

    Returns ``(estimates (J, q), notes list of str, covariate coefficients Series)``.

    ``"shared"``: one least-squares fit with the factor's columns separate for every
    level and the covariates common to all levels, solved by Frisch–Waugh–Lovell: the
    common coefficients from the rows with each level's own columns projected out,
    then each level's line from its rows.  ``"separate"``: the factor's columns and the
    covariates fitted level by level, as ``lmList`` (group-level columns are in each
    level's line already).
    """
    J, q = len(gd.levels), gd.q
    y = spec.y
    est = np.full((J, q), np.nan)
    notes = [""] * J
    fixed = list(spec.fixed_names)
    cov = list(roles.covariates)
    W = spec.X[:, cov]
    if mode == "separate":
        for j, r in enumerate(rows):
            coef, ok, _ = least_squares(np.column_stack([gd.Z[r], W[r]]), y[r])
            est[j, ok[:q]] = coef[:q][ok[:q]]
            if not ok[:q].all():
                notes[j] = _note(gd, ok[:q], len(r), q + len(cov))
        return est, notes, pd.Series(dtype=float, name="shared")
    gamma = np.zeros(0)
    y_adj = y
    if cov:
        Wy = np.column_stack([W, y])
        Wyt = np.empty_like(Wy)
        for r, svd in zip(rows, svds):
            Wyt[r] = Wy[r] - svd.U @ (svd.U.T @ Wy[r])
        gamma, ok, _ = least_squares(Wyt[:, :-1], Wyt[:, -1], norms=np.sqrt(np.sum(W**2, axis=0)))
        if not ok.all():
            bad = [fixed[cov[i]] for i in np.flatnonzero(~ok)]
            raise ModelError(
                f"a combination of the covariates {bad} lies in the span of the per-level {list(gd.columns)} of "
                f"{gd.group!r} on every level, although no single one does: a no-pooling fit with shared covariates "
                f"is not identified. Use no_pooling='separate' or a model without one of {bad}.")
        y_adj = y - W @ gamma
    for j, (r, svd) in enumerate(zip(rows, svds)):
        coef, ok = svd.solve(y_adj[r]), svd.estimable
        est[j, ok] = coef[ok]
        if not ok.all():
            notes[j] = _note(gd, ok, len(r), q)
    return est, notes, pd.Series(gamma, index=[fixed[i] for i in cov], name="shared", dtype=float)


def _note(gd: GroupDesign, ok: np.ndarray, n_rows: int, n_coef: int) -> str:
    missing = ", ".join(c for c, e in zip(gd.columns, ok) if not e)
    return f"{missing} not estimable from this level alone: {_reason(n_rows, n_coef)}"


def model_lines(beta: np.ndarray, gd: GroupDesign, roles: Roles) -> np.ndarray:
    """Each level's line (J, q) of the fixed part ``X β`` with the covariates at 0."""
    own = np.zeros(gd.q)
    for i, a in roles.own.items():
        own[a] = beta[i]
    return own + np.einsum("k,jkq->jq", beta[list(roles.group_level)], roles.loadings)


def fixed_effects(fit) -> np.ndarray:
    """The fit's ``fixef`` (β̂, or its posterior mean), in the order of the fixed columns."""
    return fit.fixef.to_numpy(dtype=float)


def block_effects(fit) -> list[np.ndarray]:
    """Each block's effects (levels × columns), cut from the fit's ``ranef()`` (modes, or posterior means).

    ``ranef()`` puts a factor's blocks side by side in ``spec.blocks`` order, so block
    ``k``'s columns follow those of the factor's earlier blocks.
    """
    frames = {g: f.to_numpy(dtype=float) for g, f in fit.ranef().items()}
    used: dict[str, int] = {}
    out = []
    for block in fit.spec.blocks:
        start = used.get(block.group, 0)
        out.append(frames[block.group][:, start:start + block.q])
        used[block.group] = start + block.q
    return out


def nesting_factors(spec, gd: GroupDesign, own: set) -> set:
    """The other blocks whose factor is constant within every level of ``gd``: ``gd`` is nested in them."""
    parents = set()
    for k, block in enumerate(spec.blocks):
        if k in own:
            continue
        if nesting_map(gd.codes, len(gd.levels), np.asarray(block.codes)) is not None:
            parents.add(k)
    return parents


def random_lines(fit, gd: GroupDesign, rows, svds) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The random parts of each level's lines, over all grouping factors.

    Returns ``(partial, parent, notes)``: ``partial`` is the random part of the
    partial-pooling line — the factor's own effects as they are, and the other
    factors' part of the fitted values, ``Z_k b_k``, as its least-squares fit on the
    level's rows; ``parent`` is the part of that from the factors the level is nested
    in (a cell's worker), which belongs to the level's population line too: it is
    where partial pooling pulls a nested cell.  ``notes`` says where a fit is not
    determined.
    """
    J = len(gd.levels)
    own = {k for k, _ in gd.blocks}
    partial = np.zeros((J, gd.q))
    effects = block_effects(fit)
    for k, pos in gd.blocks:
        partial[:, list(pos)] += effects[k]
    parents = nesting_factors(fit.spec, gd, own)
    parent_part, crossed_part = np.zeros(len(gd.codes)), np.zeros(len(gd.codes))
    for k, block in enumerate(fit.spec.blocks):
        if k not in own:
            part = np.einsum("nq,nq->n", block.Z, effects[k][block.codes])
            if k in parents:
                parent_part += part
            else:
                crossed_part += part
    notes = [""] * J
    parent = np.zeros((J, gd.q))
    if not (np.any(parent_part) or np.any(crossed_part)):
        return partial, parent, notes
    intercept = gd.intercept
    for j, r in enumerate(rows):
        L, _ = level_loadings(svds[j], np.column_stack([parent_part[r], crossed_part[r]]), intercept)
        parent[j] = L[0]
        partial[j] += L[0] + L[1]
        if np.isnan(L).any():
            notes[j] = "the other grouping factors' effects are not determined on this level's rows"
    return partial, parent, notes


def shrinkage(no_pool: np.ndarray, partial: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """(no pooling − partial) / (no pooling − population); NaN where undefined."""
    gap = no_pool - pop
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (no_pool - partial) / gap
    return np.where(gap == 0, np.nan, out)


# ---------------------------------------------------------------------- the table
def pooling_table(fit, group: str | None = None, no_pooling: str = "shared") -> pd.DataFrame:
    """Each level's own line under complete, no and partial pooling, and its shrinkage.

    The definitions (a level's line is a least-squares fit by the factor's columns on
    the level's rows) are in :mod:`bayeslmm.pooling`'s docstring and the user guide.

    Parameters
    ----------
    fit : FreqFit, BayesFit or Model
        A REML/ML fit, a NUTS fit, or a :class:`~bayeslmm.Model` (fitted by REML here).
    group : str, optional
        The grouping factor (default: the first block's, the factor with the most
        levels).  All of its random-effect terms are gathered: ``(1 | g) + (0 + x | g)``
        gives the columns ``(Intercept)`` and ``x``.
    no_pooling : {"shared", "separate"}
        How the no-pooling line is estimated when the model has covariates (fixed
        columns that vary within levels and are not the factor's own columns).
        ``"shared"`` (default): the covariates' coefficients common to all levels —
        Gelman & Hill's no-pooling regression with level indicators.  ``"separate"``:
        fitted level by level, like lme4's ``lmList``.  Without covariates
        (``distance ~ age + Sex + (age | Subject)``: ``Sex`` is constant within a child)
        the two are the same: one OLS of the factor's columns per level.

    Returns
    -------
    pandas.DataFrame
        Indexed by the factor's levels; two-level columns:

        * ``("n", "")`` — observations in the level;
        * ``("complete", c)`` — the level's line from one OLS fit of every row (it
          differs between levels only through group-level predictors such as ``Sex``);
        * ``("no_pooling", c)`` — the level's own line, NaN where its rows cannot
          estimate it (too few observations, or ``x`` constant within the level);
        * ``("partial", c)`` — the level's line as the mixed model fits it (REML/ML:
          conditional modes; NUTS: posterior means); lme4's ``coef()`` when the model
          has no group-level predictors and no other factor varies within the level;
        * ``("population", c)`` — the mixed model's line for the level with its own
          random effects at 0: the fixed effects plus those of its group-level
          predictors and, for a nested factor, the effects of the levels it is nested in
          (a cell's worker): where partial pooling pulls the level;
        * ``("shrinkage", c)`` — ``(no_pooling − partial) / (no_pooling − population)``,
          the fraction of the way to the level's population line.  Correlated columns
          shrink jointly, so one column's fraction can fall outside [0, 1]
          (sleepstudy's subject 308: intercept 1.31);
        * ``("note", "")`` — why a value is missing, else empty.

        ``table["partial"]`` is a levels × columns frame, ``table["n"]`` a Series.
        ``table.attrs`` holds ``group``, ``columns``, ``method`` (``"REML"``, ``"ML"``
        or ``"NUTS"``), ``no_pooling``, ``population`` (dict of each column's fixed
        effect β_c, 0 without one), ``group_level`` (the fixed columns taken as
        group-level predictors) and ``shared`` (the covariates' coefficients of the
        ``"shared"`` no-pooling fit).

    Raises
    ------
    ModelError
        For an unknown ``group`` or ``no_pooling``, a ``fit`` of another type, or (with
        ``"shared"``) covariates a combination of which lies in every level's span, so
        that they cannot be separated from the per-level lines.

    Examples
    --------
    >>> from bayeslmm import Model, pooling_table
    >>> t = pooling_table(Model("Reaction ~ Days + (Days | Subject)", "sleepstudy").fit())
    >>> t["partial"].loc["308"].round(2).tolist()
    [253.66, 19.67]
    """
    if no_pooling not in NO_POOLING:
        raise ModelError(f"`no_pooling` must be one of {list(NO_POOLING)}, got {no_pooling!r}")
    fit = resolve_fit(fit)
    spec = fit.spec
    spec.require_rows("the pooling table (no-pooling fits per level)")
    gd = group_design(spec, group)
    J = len(gd.levels)
    rows = level_rows(gd.codes, J)
    svds = [ScaledSVD.of(gd.Z[r]) for r in rows]  # each level's columns, decomposed once
    roles = column_roles(spec, gd, rows, svds)
    beta = fixed_effects(fit)
    complete = model_lines(least_squares(spec.X, spec.y)[0], gd, roles)
    npool, notes, shared = no_pooling_estimates(spec, gd, roles, rows, svds, no_pooling)
    random, parent, random_notes = random_lines(fit, gd, rows, svds)
    pop = model_lines(beta, gd, roles) + parent
    partial = model_lines(beta, gd, roles) + random
    lines_notes = ["group-level columns not determined on this level's rows" if np.isnan(L).any() else ""
                   for L in roles.loadings]
    notes = ["; ".join(n for n in triple if n) for triple in zip(notes, lines_notes, random_notes)]
    cols = list(gd.columns)
    parts = {("n", ""): np.bincount(gd.codes, minlength=J)}
    for kind, values in zip(_KINDS, (complete, npool, partial, pop, shrinkage(npool, partial, pop))):
        for a, c in enumerate(cols):
            parts[(kind, c)] = values[:, a]
    parts[("note", "")] = notes
    table = pd.DataFrame(parts, index=pd.Index(list(gd.levels), name=gd.group))
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    fixed = list(spec.fixed_names)
    table.attrs.update({"group": gd.group, "columns": cols, "method": fit.method, "no_pooling": no_pooling,
                        "population": {c: (float(beta[i]) if i is not None else 0.0)
                                       for c, i in zip(cols, gd.fixed_index)},
                        "group_level": [fixed[i] for i in roles.group_level], "shared": shared.to_dict()})
    return table
