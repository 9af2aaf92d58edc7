"""Complete, no and partial pooling side by side: what a mixed model does to each group.

For one grouping factor, :func:`pooling_table` puts three estimates of each level's
coefficients next to each other (Gelman & Hill 2007, *Data Analysis Using Regression
and Multilevel/Hierarchical Models*, ch. 12):

* **complete pooling** — one ordinary least-squares fit of the fixed-effect design for
  every observation, the groups ignored: the same line for every level;
* **no pooling** — a separate estimate for each level from its own observations only
  (by default with the other covariates' coefficients shared, as in Gelman & Hill's
  level-indicator regression; ``no_pooling="separate"`` fits everything per level,
  like lme4's ``lmList``);
* **partial pooling** — the mixed model's own level coefficients, fixed plus random
  effect (``coef()`` of a REML/ML fit; for a Bayesian fit the posterior mean of
  β + b_j).

and the **shrinkage**: the fraction of the way from the no-pooling estimate to the
population value (the fixed effect) that partial pooling went,
``(no_pooling − partial) / (no_pooling − population)``: 0 when the level's own data
are kept as they are, 1 when the level is pulled all the way to the population.  For a
random-intercept model without covariates fitted by REML it is exactly
``σ² / (σ² + n_j σ_b²)``: levels with fewer observations shrink more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import ModelError, did_you_mean

__all__ = ["NO_POOLING", "pooling_table"]

#: the two definitions of the no-pooling estimate
NO_POOLING = ("shared", "separate")

_KINDS = ("complete", "no_pooling", "partial", "shrinkage")


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


def is_bayes(fit) -> bool:
    from .bayes.results import BayesFit

    return isinstance(fit, BayesFit)


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
def _svd_solve(A: np.ndarray, b: np.ndarray):
    """Minimum-norm least squares with the estimable coefficients marked.

    Returns ``(coef, estimable)``: coefficient ``c`` is estimable (unique whatever
    solution is taken) when the unit vector ``e_c`` lies in the row space of ``A``.
    """
    if A.shape[0] == 0:
        return np.full(A.shape[1], np.nan), np.zeros(A.shape[1], dtype=bool)
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(A.shape) * np.finfo(float).eps
    r = int(np.sum(s > tol))
    coef = Vt[:r].T @ ((U[:, :r].T @ b) / s[:r])
    in_row_space = np.sum(Vt[:r] ** 2, axis=0)
    estimable = in_row_space > 1 - 1e-8
    return coef, estimable


def _residualize(A: np.ndarray, M: np.ndarray) -> np.ndarray:
    """M minus its projection on the column space of A."""
    if A.shape[0] == 0:
        return M
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(A.shape) * np.finfo(float).eps
    Ur = U[:, s > tol]
    return M - Ur @ (Ur.T @ M)


def _reason(n_rows: int, n_coef: int) -> str:
    if n_rows < n_coef:
        return f"fewer observations ({n_rows}) than coefficients ({n_coef})"
    return "its columns are collinear within the level (e.g. a predictor constant in it)"


def complete_pooling(spec) -> np.ndarray:
    """OLS of y on the fixed-effect design, every row alike."""
    coef, _ = _svd_solve(spec.X, spec.y)
    return coef


def no_pooling_estimates(spec, gd: GroupDesign, mode: str = "shared"):
    """Each level's own estimate of the factor's columns.

    Returns ``(estimates (J, q), notes list of str, shared coefficients Series)``.

    ``"shared"``: one least-squares fit with the factor's columns separate for every
    level (level indicators and their interactions) and the remaining fixed-effect
    columns common to all levels, solved by Frisch–Waugh–Lovell: the common
    coefficients from the rows with each level's own columns projected out, then
    each level's coefficients from its rows.  ``"separate"``: every fixed-effect
    column (and any random-only column) fitted level by level, as ``lmList``.
    """
    if mode not in NO_POOLING:
        raise ModelError(f"`no_pooling` must be one of {list(NO_POOLING)}, got {mode!r}")
    J, q = len(gd.levels), gd.q
    rows = level_rows(gd.codes, J)
    y = spec.y
    est = np.full((J, q), np.nan)
    notes = [""] * J
    fixed = list(spec.fixed_names)
    matched = {i for i in gd.fixed_index if i is not None}
    if mode == "shared":
        shared_idx = [i for i in range(spec.X.shape[1]) if i not in matched]
        W = spec.X[:, shared_idx]
        gamma = np.zeros(0)
        if shared_idx:
            Wy = np.column_stack([W, y])
            Wyt = np.empty_like(Wy)
            for r in rows:
                Wyt[r] = _residualize(gd.Z[r], Wy[r])
            Wt, yt = Wyt[:, :-1], Wyt[:, -1]
            gamma, ok = _svd_solve(Wt, yt)
            if not ok.all():
                bad = [fixed[shared_idx[i]] for i in np.flatnonzero(~ok)]
                raise ModelError(
                    f"the fixed-effect column(s) {bad} cannot be separated from the per-level "
                    f"{list(gd.columns)} of {gd.group!r} (constant within every level, or a combination of "
                    f"level-wise columns): a no-pooling fit with shared covariates is not identified. Use "
                    f"no_pooling='separate' or a model without {bad} for the comparison.")
            y_adj = y - W @ gamma
        else:
            y_adj = y
        for j, r in enumerate(rows):
            coef, ok = _svd_solve(gd.Z[r], y_adj[r])
            est[j, ok] = coef[ok]
            if not ok.all():
                notes[j] = (f"{', '.join(c for c, e in zip(gd.columns, ok) if not e)} not estimable from this "
                            f"level alone: {_reason(len(r), q)}")
        shared = pd.Series(gamma, index=[fixed[i] for i in shared_idx], name="shared", dtype=float)
        return est, notes, shared
    # "separate": the whole fixed design, plus random-only columns, per level
    extra = [a for a, i in enumerate(gd.fixed_index) if i is None]
    D = np.column_stack([spec.X] + [gd.Z[:, [a]] for a in extra]) if extra else spec.X
    where = [i if i is not None else spec.X.shape[1] + extra.index(a) for a, i in enumerate(gd.fixed_index)]
    for j, r in enumerate(rows):
        coef, ok = _svd_solve(D[r], y[r])
        est[j] = np.where(ok[where], coef[where], np.nan)
        if not ok[where].all():
            notes[j] = (f"{', '.join(c for c, w in zip(gd.columns, where) if not ok[w])} not estimable from this "
                        f"level alone: {_reason(len(r), D.shape[1])}")
    return est, notes, pd.Series(dtype=float, name="shared")


def population(fit, gd: GroupDesign) -> np.ndarray:
    """The population value of each column: its fixed effect (REML estimate or posterior mean), 0 if none."""
    if is_bayes(fit):
        beta = fit.posterior["beta"].mean(("chain", "draw")).to_numpy()
    else:
        beta = fit.fixef.to_numpy()
    return np.array([beta[i] if i is not None else 0.0 for i in gd.fixed_index])


def partial_pooling(fit, gd: GroupDesign) -> np.ndarray:
    """β + b_j per level: REML conditional modes, or posterior means of the sum."""
    J = len(gd.levels)
    out = np.tile(population(fit, gd), (J, 1))
    if is_bayes(fit):
        for k, pos in gd.blocks:
            out[:, list(pos)] += fit.effect_means(k)
    else:
        for k, pos in gd.blocks:
            out[:, list(pos)] += fit.estimates.b[k]
    return out


def shrinkage(no_pool: np.ndarray, partial: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """(no pooling − partial) / (no pooling − population); NaN where undefined."""
    gap = no_pool - pop
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (no_pool - partial) / gap
    return np.where(gap == 0, np.nan, out)


# ---------------------------------------------------------------------- the table
def pooling_table(fit, group: str | None = None, no_pooling: str = "shared") -> pd.DataFrame:
    """Complete, no and partial pooling of one grouping factor's coefficients, level by level.

    Parameters
    ----------
    fit : FreqFit, BayesFit or Model
        A REML/ML fit, a NUTS fit, or a :class:`~bayeslmm.Model` (fitted by REML here).
    group : str, optional
        The grouping factor (default: the first block's, the factor with the most
        levels).  All of its random-effect terms are gathered: ``(1 | g) + (0 + x | g)``
        gives the columns ``(Intercept)`` and ``x``.
    no_pooling : {"shared", "separate"}
        How the no-pooling estimate is made.  ``"shared"`` (default): one least-squares
        fit in which every level has its own coefficients for the factor's columns and
        the other fixed-effect columns (covariates) are common to all levels — Gelman &
        Hill's no-pooling regression with level indicators, comparable with the mixed
        model's coefficients when there are covariates.  ``"separate"``: every
        fixed-effect column fitted level by level from that level's rows only, like
        lme4's ``lmList``.  With no covariates besides the factor's columns
        (``Reaction ~ Days + (Days | Subject)``) the two are the same: one OLS per level.
        Other grouping factors are ignored by both.

    Returns
    -------
    pandas.DataFrame
        Indexed by the factor's levels; two-level columns:

        * ``("n", "")`` — observations in the level;
        * ``("complete", c)`` — complete pooling (OLS for everybody) of column ``c``;
        * ``("no_pooling", c)`` — the level's own estimate, NaN where its rows cannot
          estimate it (too few observations, or ``x`` constant within the level);
        * ``("partial", c)`` — the mixed model's coefficient β_c + b_jc (REML/ML: lme4's
          ``coef()``; NUTS: the posterior mean);
        * ``("shrinkage", c)`` — ``(no_pooling − partial) / (no_pooling − population)``,
          the fraction of the way to the population value, with the population value
          the fixed effect β_c (0 for a column without a fixed effect).  Correlated
          columns shrink jointly, so one column's fraction can fall outside [0, 1]
          (sleepstudy's subject 308: intercept 1.31);
        * ``("note", "")`` — why a no-pooling estimate is missing, else empty.

        ``table["partial"]`` is a levels × columns frame, ``table["n"]`` a Series.
        ``table.attrs`` holds ``group``, ``columns``, ``method`` (``"REML"``, ``"ML"``
        or ``"NUTS"``), ``no_pooling``, ``population`` (dict of β_c) and ``shared``
        (the common covariate coefficients of the ``"shared"`` no-pooling fit).

    Raises
    ------
    ModelError
        For an unknown ``group`` or ``no_pooling``, a ``fit`` of another type, or (with
        ``"shared"``) a covariate that is constant within every level and so cannot be
        separated from the per-level intercepts.

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
    cp_all = complete_pooling(spec)
    cp = np.array([cp_all[i] if i is not None else 0.0 for i in gd.fixed_index])
    npool, notes, shared = no_pooling_estimates(spec, gd, no_pooling)
    pp = partial_pooling(fit, gd)
    pop = population(fit, gd)
    counts = np.bincount(gd.codes, minlength=J)
    cols = list(gd.columns)
    parts = {("n", ""): counts}
    for kind, values in zip(_KINDS, (np.tile(cp, (J, 1)), npool, pp, shrinkage(npool, pp, pop))):
        for a, c in enumerate(cols):
            parts[(kind, c)] = values[:, a]
    parts[("note", "")] = notes
    table = pd.DataFrame(parts, index=pd.Index(list(gd.levels), name=gd.group))
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    table.attrs.update({"group": gd.group, "columns": cols, "method": fit.method, "no_pooling": no_pooling,
                        "population": dict(zip(cols, pop.tolist())), "shared": shared.to_dict()})
    return table
