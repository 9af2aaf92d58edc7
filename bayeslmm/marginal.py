"""Estimated marginal means and their contrasts, as emmeans computes them, for either engine.

The *reference grid* of one or more factors (``"Product"``, ``"Product:Information"``
or a list) holds one mean per combination of their levels: the model's mean averaged
with equal weights over every level combination of the other factors of the fixed
effects, covariates at their means over the fitted rows (emmeans' defaults: ``weights
= "equal"``, ``cov.reduce = mean``; a transformed covariate, ``np.log(z)``, is taken at
the mean of ``z``, as emmeans does).  ``at={"x": 2}`` fixes a covariate instead;
``by=`` gives the means within each level of other factors.  Each mean is a row ℓ over
the fixed effects, so an engine only has to summarise ℓβ:

* REML/ML (:func:`freq_table`): ℓβ̂, √(ℓCℓᵀ), a t test with the fit's denominator df;
* NUTS (:func:`posterior_table`): the draws of ℓβ — mean, sd, median, equal-tailed
  interval and the probability of direction, with no multiplicity adjustment.

Contrasts are weights over the means of one ``by`` group (:func:`contrast_weights`):
``"pairwise"`` (every mᵢ − mⱼ, i < j, named by the levels as written: ``"1 - 2"``;
emmeans 1.8 writes ``"Product1 - Product2"`` for levels that look like numbers),
``"trt.vs.ctrl"`` (each mean minus the first) or your own weights.  The frequentist
p-values and intervals are adjusted within each ``by`` group (emmeans' family), see
:func:`adjusted`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import BayesLMMError, ModelError, did_you_mean
from .formula.parse import referenced_names

#: multiplicity adjustments of frequentist contrasts, by name
ADJUSTMENTS = ("tukey", "bonferroni", "holm", "sidak", "none")
#: the named contrast families; a dict or matrix of weights is the third kind
CONTRAST_METHODS = ("pairwise", "trt.vs.ctrl")
#: each family's default adjustment: Tukey for pairs (emmeans'); emmeans' Dunnett approximation
#: for treatment-vs-control is not available, Šidák is its conservative stand-in; none for user weights
DEFAULT_ADJUST = {"pairwise": "tukey", "trt.vs.ctrl": "sidak", "custom": "none"}


@dataclass(frozen=True)
class ReferenceGrid:
    """The means asked for: row i of ``cells`` (``by`` factors first, then the factors) is ℓ = ``L[i]``.

    ``at`` holds the covariate values every mean is taken at.
    """

    cells: pd.DataFrame
    L: np.ndarray
    factors: tuple[str, ...]
    by: tuple[str, ...]
    at: dict[str, float]

    def groups(self) -> list[np.ndarray]:
        """The rows of each ``by`` group, in order (one group of every row when there is no ``by``)."""
        if not self.by:
            return [np.arange(len(self.cells))]
        keys = self.cells[list(self.by)].astype(str).agg("\x1f".join, axis=1)
        return [np.flatnonzero(keys.to_numpy() == k) for k in pd.unique(keys)]

    def labels(self) -> list[str]:
        """Each mean named by its levels of the factors, joined by a space (emmeans' way)."""
        return [" ".join(str(v) for v in row) for row in self.cells[list(self.factors)].itertuples(index=False)]


def _names(value, argument: str) -> tuple[str, ...]:
    """``"A:B"``, ``"A"`` or ``["A", "B"]`` as a tuple of variable names."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not items or not all(isinstance(v, str) for v in items):
        raise BayesLMMError(f"{argument} must name factors as 'A', 'A:B' or a list of names, got {value!r}")
    names = tuple(part.strip() for v in items for part in v.split(":"))
    if not all(names):
        raise BayesLMMError(f"{argument} must name factors as 'A', 'A:B' or a list of names, got {value!r}")
    if len(set(names)) != len(names):
        raise BayesLMMError(f"{argument} names a factor twice: {value!r}")
    return names


def _grid_covariates(spec, terms, levels: dict) -> dict[str, float]:
    """The data columns behind the covariates of the fixed effects, each at its mean."""
    names = {v for t in terms for c in t.covariates for v, _ in referenced_names(c)}
    return {v: float(np.mean(spec.data[v].to_numpy(dtype=float)))
            for v in sorted(names) if v in spec.data.columns and v not in levels}


def _check_factor(name: str, levels: dict, covariates: dict, spec, argument: str) -> None:
    if name in levels:
        return
    if name in covariates:
        raise BayesLMMError(f"{argument}: {name!r} is a numeric predictor; marginal means and contrasts are "
                            f"for factors (fix it with at={{{name!r}: value}}, or use predict() across its "
                            "values)")
    where = ("is a column of the data but not of the fixed effects" if name in spec.data.columns
             else "is not in the model")
    raise BayesLMMError(f"{argument}: {name!r} {where}; the factors of the fixed effects are "
                        f"{sorted(levels)}.{did_you_mean(name, levels)}")


def _check_at(at, levels: dict, covariates: dict) -> dict[str, float]:
    if at is None:
        return {}
    if not isinstance(at, Mapping):
        raise BayesLMMError(f"at must be a dict of covariate values such as {{'x': 2.0}}, got {at!r}")
    out = {}
    for name, value in at.items():
        if name not in covariates:
            what = ("is a factor: ask for its levels with spec= or by=" if name in levels
                    else f"is not a covariate of the fixed effects (those are {sorted(covariates)})")
            raise BayesLMMError(f"at: {name!r} {what}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise BayesLMMError(f"at: {name!r} must be one finite number, got {value!r}")
        out[name] = float(value)
    return out


def reference_grid(spec, factors, by=None, at=None) -> ReferenceGrid:
    """The marginal means of ``factors`` (within levels of ``by``) of the model ``spec``.

    emmeans' grid order: the ``by`` groups in turn, and within one the first factor's
    levels varying fastest.  Raises :class:`~bayeslmm.errors.BayesLMMError` naming a
    factor that is numeric or not in the fixed effects, or an ``at`` that is not a
    covariate; :class:`~bayeslmm.errors.ModelError` for a fit that dropped columns as
    rank deficient (its means would silently set those coefficients to 0).
    """
    from .formula.terms import factor_levels, fixed_terms, grid_design

    terms = fixed_terms(spec)
    if spec.dropped_fixed:
        raise ModelError(f"this fit dropped the rank-deficient columns {list(spec.dropped_fixed)}, so some "
                         "marginal means are not estimable; remove the empty cells or the redundant terms "
                         "and refit")
    levels = factor_levels(spec, terms)
    covariates = _grid_covariates(spec, terms, levels)
    wanted, by = _names(factors, "spec"), _names(by, "by")
    if not wanted:
        raise BayesLMMError("spec must name at least one factor, e.g. 'Product' or 'Product:Information'")
    if set(wanted) & set(by):
        raise BayesLMMError(f"{sorted(set(wanted) & set(by))} appear in both spec and by")
    for name, argument in [(n, "spec") for n in wanted] + [(n, "by") for n in by]:
        _check_factor(name, levels, covariates, spec, argument)
    covariates |= _check_at(at, levels, covariates)
    shown = wanted + by  # the first varies fastest, as R's expand.grid
    cells = pd.DataFrame([c[::-1] for c in itertools.product(*(levels[f] for f in shown[::-1]))],
                         columns=list(shown))[list(by + wanted)]
    others = [f for f in levels if f not in shown]
    rest = list(itertools.product(*(levels[f] for f in others)))
    frame = pd.DataFrame([dict(zip(shown, c)) | dict(zip(others, o)) | covariates
                          for c in cells[list(shown)].itertuples(index=False) for o in rest])
    X = np.asarray(grid_design(spec, frame), dtype=float)
    L = X.reshape(len(cells), len(rest), X.shape[1]).mean(axis=1)
    return ReferenceGrid(cells=cells, L=L, factors=wanted, by=by, at=covariates)


def contrast_weights(grid: ReferenceGrid, method="pairwise") -> tuple[pd.DataFrame, np.ndarray, str]:
    """Contrasts of the grid's means within each ``by`` group.

    ``method``: ``"pairwise"``, ``"trt.vs.ctrl"`` (each level minus the first), a dict
    ``{name: weights}`` or a matrix with one row of weights per contrast (named
    ``c1, c2, …``), each as long as the number of means in a ``by`` group.  Returns
    the contrasts' names (``by`` columns, then ``contrast``), their weights W over the
    grid's rows (so the contrasts' ℓ are ``W @ grid.L``) and the family ("pairwise",
    "trt.vs.ctrl" or "custom").
    """
    family, named = _contrast_family(method, len(grid.groups()[0]))
    labels = grid.labels()
    rows, weights = [], []
    for idx in grid.groups():
        for name, w in named(labels, idx):
            rows.append({b: grid.cells[b].iloc[idx[0]] for b in grid.by} | {"contrast": name})
            full = np.zeros(len(grid.cells))
            full[idx] = w
            weights.append(full)
    return pd.DataFrame(rows, columns=[*grid.by, "contrast"]), np.asarray(weights), family


def _contrast_family(method, k: int):
    """The family's name and a function (labels, rows of a group) → [(name, weights over the group)]."""
    if isinstance(method, str):
        if method == "pairwise":
            return method, lambda lab, idx: [(f"{lab[idx[i]]} - {lab[idx[j]]}", np.eye(k)[i] - np.eye(k)[j])
                                             for i, j in itertools.combinations(range(k), 2)]
        if method == "trt.vs.ctrl":
            return method, lambda lab, idx: [(f"{lab[idx[j]]} - {lab[idx[0]]}", np.eye(k)[j] - np.eye(k)[0])
                                             for j in range(1, k)]
        raise BayesLMMError(f"method must be one of {list(CONTRAST_METHODS)}, a dict of weights or a matrix of "
                            f"weights, got {method!r}")
    if isinstance(method, Mapping):
        names, W = [str(n) for n in method], [method[n] for n in method]
    else:
        W = method
        names = [f"c{i + 1}" for i in range(len(np.atleast_2d(np.asarray(W, dtype=object))))]
    try:
        W = np.atleast_2d(np.asarray(W, dtype=float))
    except (TypeError, ValueError) as exc:
        raise BayesLMMError(f"contrast weights must be numbers, got {method!r}") from exc
    if W.ndim != 2 or W.shape[1] != k or len(W) == 0 or not np.all(np.isfinite(W)):
        raise BayesLMMError(f"contrast weights need {k} finite numbers per contrast (one per mean of a by "
                            f"group), got shape {np.shape(W)}")
    return "custom", lambda lab, idx: list(zip(names, W))


# -- frequentist: t tests and their adjustments -----------------------------------------------------
def freq_table(labels: pd.DataFrame, tests: pd.DataFrame, ci_prob: float, adjust: str = "none",
               families: list[np.ndarray] | None = None, n_means: list[int] | None = None) -> pd.DataFrame:
    """``labels`` beside ``estimate, std_error, lower, upper, t_value, df, p_value``.

    ``tests`` is :func:`bayeslmm.reml.inference.contrast_tests`' layout (one
    unadjusted t test per row).  ``adjust`` applies within each family of rows
    (``families``; ``n_means`` the number of means compared in each, for Tukey), to
    the p-values and the intervals alike (:func:`adjusted`).
    """
    families = families if families is not None else [np.arange(len(tests))]
    n_means = n_means if n_means is not None else [0] * len(families)
    est, se, df = (tests[c].to_numpy(dtype=float) for c in ("estimate", "std_error", "df"))
    p, q = np.empty(len(tests)), np.empty(len(tests))
    for rows, k in zip(families, n_means):
        p[rows], q[rows] = adjusted(tests["t_value"].to_numpy(dtype=float)[rows], df[rows], ci_prob, adjust, k)
    out = labels.reset_index(drop=True).copy()
    for name, value in (("estimate", est), ("std_error", se), ("lower", est - q * se), ("upper", est + q * se),
                        ("t_value", tests["t_value"].to_numpy()), ("df", df), ("p_value", p)):
        out[name] = value
    out.attrs.update(ci_prob=ci_prob, adjust=adjust)
    return out


def adjusted(t: np.ndarray, df: np.ndarray, ci_prob: float, adjust: str, n_means: int = 0):
    """Two-sided p-values of a family of t statistics and the half-widths (in SEs) of its intervals.

    ``"none"``: t's.  ``"bonferroni"``: m·p, t quantile at 1 − α/(2m).  ``"sidak"``:
    1 − (1 − p)^m, level ``ci_prob``^(1/m).  ``"holm"``: Holm's step-down p-values and
    Bonferroni's intervals (as emmeans: Holm has no simultaneous interval).
    ``"tukey"``: the studentized range of ``n_means`` means, P(Q > |t|√2) and
    q_{ci_prob}/√2 — pairwise differences only.  Infinite df give the normal limits.
    """
    from scipy import stats

    m, alpha = len(t), 1 - ci_prob
    raw = 2 * stats.t.sf(np.abs(t), df)
    if adjust == "none":
        return raw, stats.t.ppf(1 - alpha / 2, df)
    if adjust in ("bonferroni", "holm"):
        p = np.minimum(1.0, m * raw) if adjust == "bonferroni" else _holm(raw)
        return p, stats.t.ppf(1 - alpha / (2 * m), df)
    if adjust == "sidak":
        return -np.expm1(m * np.log1p(-raw)), stats.t.ppf((1 + ci_prob ** (1 / m)) / 2, df)
    if adjust == "tukey":
        p = stats.studentized_range.sf(np.abs(t) * np.sqrt(2), n_means, df)
        return np.minimum(1.0, p), _range_quantile(ci_prob, n_means, df) / np.sqrt(2)
    raise BayesLMMError(f"adjust must be one of {list(ADJUSTMENTS)}, got {adjust!r}")


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down: the i-th smallest p times (m − i), made monotone, capped at 1."""
    m = len(p)
    order = np.argsort(p)
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out


def _range_quantile(ci_prob: float, k: int, df: np.ndarray) -> np.ndarray:
    """The studentized range's ``ci_prob`` quantile per df.  Each costs ~0.2 s (a root of a numerical
    integral), so df equal to 6 significant digits share one: Satterthwaite's are numerical to ~1e-7."""
    from scipy import stats

    key = np.array([float(f"{d:.6g}") if np.isfinite(d) else d for d in df])
    out = np.full(len(df), np.nan)
    for d in pd.unique(key[~np.isnan(key)]):
        out[key == d] = stats.studentized_range.ppf(ci_prob, k, d)
    return out


def check_adjust(adjust, family: str) -> str:
    """``adjust`` checked against the family (Tukey is for pairwise differences), or its default."""
    if adjust is None:
        return DEFAULT_ADJUST[family]
    if adjust not in ADJUSTMENTS:
        raise BayesLMMError(f"adjust must be one of {list(ADJUSTMENTS)}, got {adjust!r}")
    if adjust == "tukey" and family != "pairwise":
        raise BayesLMMError(f"Tukey's adjustment is for pairwise differences, not {family!r} contrasts; use "
                            "'sidak', 'bonferroni' or 'holm'")
    return adjust


def freq_means(grid: ReferenceGrid, tests, ci_prob: float) -> pd.DataFrame:
    """The grid's means with unadjusted t intervals; ``tests(L)`` gives contrast_tests' layout."""
    out = freq_table(grid.cells, tests(grid.L), ci_prob)
    out.attrs.update(at=dict(grid.at))
    return out


def freq_contrasts(grid: ReferenceGrid, method, tests, ci_prob: float, adjust) -> pd.DataFrame:
    """The grid's contrasts, adjusted within each ``by`` group."""
    labels, W, family = contrast_weights(grid, method)
    adjust = check_adjust(adjust, family)
    per_group = len(labels) // len(grid.groups())
    families = [np.arange(g * per_group, (g + 1) * per_group) for g in range(len(grid.groups()))]
    k = len(grid.groups()[0])
    out = freq_table(labels, tests(W @ grid.L), ci_prob, adjust, families, [k] * len(families))
    out.attrs.update(at=dict(grid.at))
    return out


# -- Bayesian: the posterior of each mean and contrast ----------------------------------------------
def posterior_table(labels: pd.DataFrame, draws: np.ndarray, ci_prob: float) -> pd.DataFrame:
    """``labels`` beside ``estimate`` (posterior mean), ``std_error`` (sd), ``lower, upper`` (equal-tailed
    ``ci_prob`` interval), ``median`` and ``pd`` (probability of direction, max(P(> 0), P(< 0))) of each
    column of ``draws`` (one row per draw)."""
    out = labels.reset_index(drop=True).copy()
    lo, hi = np.quantile(draws, [(1 - ci_prob) / 2, (1 + ci_prob) / 2], axis=0)
    for name, value in (("estimate", draws.mean(axis=0)), ("std_error", draws.std(axis=0, ddof=1)),
                        ("lower", lo), ("upper", hi), ("median", np.median(draws, axis=0)),
                        ("pd", np.maximum((draws > 0).mean(axis=0), (draws < 0).mean(axis=0)))):
        out[name] = value
    out.attrs.update(ci_prob=ci_prob, adjust="none")
    return out


def posterior_means(grid: ReferenceGrid, beta_draws: np.ndarray, ci_prob: float) -> pd.DataFrame:
    """The posterior of the grid's means from β's draws (one row per draw)."""
    out = posterior_table(grid.cells, beta_draws @ grid.L.T, ci_prob)
    out.attrs.update(at=dict(grid.at))
    return out


def posterior_contrasts(grid: ReferenceGrid, method, beta_draws: np.ndarray, ci_prob: float,
                        adjust) -> pd.DataFrame:
    """The posterior of the grid's contrasts; no multiplicity adjustment (``adjust`` must be None or "none")."""
    if adjust not in (None, "none"):
        raise BayesLMMError(f"a posterior has no multiplicity adjustment (adjust={adjust!r}): each contrast's "
                            "posterior is reported as is; leave adjust=None")
    labels, W, _ = contrast_weights(grid, method)
    out = posterior_table(labels, beta_draws @ (W @ grid.L).T, ci_prob)
    out.attrs.update(at=dict(grid.at))
    return out
