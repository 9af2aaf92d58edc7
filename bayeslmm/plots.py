"""Figures of a fitted model: shrinkage, caterpillar, variance components, posterior predictive check,
conditional effects.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no
global figure registry, no ``plt.show()``), so it works under the Agg backend, in
scripts and in notebooks (a figure displays itself there) alike; save it with
``fig.savefig(path)``.  Pass ``ax=`` to draw into an axes of your own figure instead
(single-panel plots only).

The plotted artists carry a ``gid`` naming what they show (``"no_pooling"``,
``"partial_pooling"``, ``"shrinkage_arrow"``, ``"population"``, ``"ellipse"``,
``"interval"``, ``"estimate"``, ``"posterior"``, ``"reml"``, ``"y"``, ``"y_rep"``, ``"data"``), so a
figure's content can be read back.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

from .bayes.naming import correlation_matrices, pair_index, sd_var
from .deprecation import renamed_kwargs
from .errors import BayesLMMError, ModelError
from .group_frames import check_ci_prob
from .pooling import group_design, pooling_table, resolve_fit

__all__ = ["caterpillar_plot", "conditional_effects_plot", "ppc_plot", "shrinkage_plot", "variance_plot"]

_NO_POOL = "C0"
_PARTIAL = "C3"
_POP = "0.25"
_COMPLETE = "C2"
#: line styles of the ellipses, in the order of their probabilities: each gets its own legend entry
_ELLIPSE_STYLES = ("-", "--", ":", "-.")
#: at most this many distinct population lines get their own ellipses
_MAX_ELLIPSE_CENTRES = 8


def _new_axes(ax, n_panels: int = 1, *, ncols: int | None = None, panel_size=(4.2, 3.4), sharey=False):
    """A fresh Figure with ``n_panels`` axes, or the caller's ``ax`` (one panel only)."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    if ax is not None:
        if not isinstance(ax, Axes):
            raise BayesLMMError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}")
        if n_panels != 1:
            raise BayesLMMError(f"this figure has {n_panels} panels; `ax=` is only accepted for a single panel, "
                                "leave it out to get a new figure")
        return ax.figure, [ax]
    ncols = ncols or n_panels
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig, list(axes[:n_panels])


def _legend(ax, n_points: int, outside: bool = False):
    """Legend at the best place for a few points; outside the axes for many (placing it costs O(points))."""
    if n_points <= 200 and not outside:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0.0)


def _arrows(ax, start: np.ndarray, end: np.ndarray, color="0.45"):
    """One quiver of arrows from ``start`` to ``end`` (k, 2), exact in data units.

    A single collection: thousands of levels draw in a fraction of a second, where
    one annotation per level would take seconds.
    """
    start, end = np.asarray(start, dtype=float).reshape(-1, 2), np.asarray(end, dtype=float).reshape(-1, 2)
    d = end - start
    ax.quiver(start[:, 0], start[:, 1], d[:, 0], d[:, 1], angles="xy", scale_units="xy", scale=1, color=color,
              width=0.0025, headwidth=4.5, headlength=5, headaxislength=4.5, zorder=2, gid="shrinkage_arrow")


# -------------------------------------------------------------------- shrinkage
def shrinkage_plot(fit, group: str | None = None, columns=None, *, layout: str = "auto",
                   ellipse=(0.5, 0.95), no_pooling: str = "shared", ax=None):
    """Each level's estimate moving from no pooling to partial pooling.

    Parameters
    ----------
    fit : FreqFit, BayesFit or Model
        As for :func:`bayeslmm.pooling_table` (a Model is fitted by REML).
    group : str, optional
        The grouping factor (default: the first block's).
    columns : str or pair of str, optional
        The coefficient(s) to show.  Default: the factor's first two columns, or its
        one column for a random-intercept model.
    layout : {"auto", "n", "rows"}
        One column only.  ``"n"``: x = the level's number of observations, y = the
        estimate — arrows from the no-pooling to the partial-pooling value, the
        population (fixed effect) and the complete-pooling value as horizontal lines;
        levels with few observations travel furthest.  ``"rows"``: the estimates on one
        horizontal axis, no pooling in the top row, partial pooling in the bottom one,
        an arrow per level, the population as a vertical line.  ``"auto"`` takes
        ``"n"`` when the levels' sizes differ and ``"rows"`` when they are all equal.
    ellipse : sequence of float or None
        Two columns only: contours of the fitted random-effect distribution
        N(population, G) enclosing these probabilities (REML: G at the estimates;
        NUTS: the posterior mean of G).  ``None`` or ``()`` draws none.
    no_pooling : {"shared", "separate"}
        Passed to :func:`~bayeslmm.pooling_table`.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.pooling_table`` holds the table the figure was drawn from.

    Levels whose no-pooling estimate is missing (NaN, see the table's ``note``) are
    drawn at their partial-pooling value only, without an arrow.  The population and
    complete-pooling values are lines when they are the same for every level, and one
    mark per level when group-level predictors (``Sex``, ``Diet``) make them differ;
    the ellipses are then drawn around each distinct population value (up to 8;
    beyond that none, and the axes say so).
    Axes say ``intercept`` and ``slope of age`` for the columns ``(Intercept)`` and a
    numeric ``age``.
    """
    fit = resolve_fit(fit)
    table = pooling_table(fit, group, no_pooling=no_pooling)
    all_cols = table.attrs["columns"]
    if columns is None:
        columns = all_cols[:2]
    elif isinstance(columns, str):
        columns = [columns]
    else:
        columns = list(columns)
    unknown = [c for c in columns if c not in all_cols]
    if unknown or not 1 <= len(columns) <= 2 or len(set(columns)) != len(columns):
        raise BayesLMMError(f"`columns` must be one or two distinct columns of {table.attrs['group']!r}'s random "
                            f"effects {all_cols}, got {columns!r}")
    if layout not in ("auto", "n", "rows"):
        raise BayesLMMError(f"`layout` must be 'auto', 'n' or 'rows', got {layout!r}")
    labels = {c: coefficient_label(fit.spec, c) for c in columns}
    if len(columns) == 1:
        fig = _shrinkage_1d(table, columns[0], labels[columns[0]], layout, ax)
    else:
        fig = _shrinkage_2d(fit, table, columns, [labels[c] for c in columns], ellipse, ax)
    fig.pooling_table = table
    return fig


def coefficient_label(spec, col: str) -> str:
    """What a random-effect column's coefficient is, for an axis: "intercept", "slope of age"."""
    if col == "(Intercept)":
        return "intercept"
    data = spec.data
    if data is not None and col in data.columns and np.issubdtype(np.asarray(data[col]).dtype, np.number):
        return f"slope of {col}"
    return f"coefficient of {col}"


def _reference_marks(ax, where, values, vertical: bool):
    """The population and complete-pooling values of one column: lines if one value, else a mark per level.

    Complete pooling is drawn dashed, in its own colour and above the population, so it
    stays visible where the two coincide.
    """
    styles = {"population": dict(color=_POP, lw=1.2, zorder=2, label="population (fixed effects)"),
              "complete_pooling": dict(color=_COMPLETE, lw=1.2, ls="--", zorder=2.5, label="complete pooling")}
    marker = "|" if vertical else "_"
    for gid, v in values.items():
        style = styles[gid]
        if np.allclose(v, v[0], rtol=1e-12, atol=0.0):
            (ax.axvline if vertical else ax.axhline)(v[0], gid=gid, **style)
            continue
        x, y = (v, np.full_like(v, where)) if vertical else (where, v)
        ax.scatter(x, y, marker=marker, s=110, color=style["color"], linewidths=1.5, zorder=style["zorder"] + 3,
                   label=style["label"] + ", per level", gid=gid)


def _shrinkage_1d(table, col, label, layout, ax):
    fig, (ax,) = _new_axes(ax, panel_size=(7.0, 4.5))
    n = table["n"].to_numpy()
    npool = table[("no_pooling", col)].to_numpy()
    part = table[("partial", col)].to_numpy()
    refs = {"population": table[("population", col)].to_numpy(),
            "complete_pooling": table[("complete", col)].to_numpy()}
    ok = np.isfinite(npool)
    if layout == "auto":
        layout = "rows" if np.all(n == n[0]) else "n"
    if layout == "n":
        ax.scatter(n[ok], npool[ok], s=22, facecolors="none", edgecolors=_NO_POOL, label="no pooling",
                   gid="no_pooling", zorder=3)
        ax.scatter(n, part, s=16, color=_PARTIAL, label="partial pooling", gid="partial_pooling", zorder=4)
        _arrows(ax, np.column_stack([n[ok], npool[ok]]), np.column_stack([n[ok], part[ok]]))
        _reference_marks(ax, n, refs, vertical=False)
        if n.min() > 0 and n.max() / n.min() >= 10:
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"observations in the level of {table.attrs['group']}")
        ax.set_ylabel(label)
    else:
        ax.scatter(npool[ok], np.ones(ok.sum()), s=22, facecolors="none", edgecolors=_NO_POOL,
                   label="no pooling", gid="no_pooling", zorder=3)
        ax.scatter(part, np.zeros_like(part), s=16, color=_PARTIAL, label="partial pooling",
                   gid="partial_pooling", zorder=4)
        _arrows(ax, np.column_stack([npool[ok], np.ones(ok.sum())]), np.column_stack([part[ok], np.zeros(ok.sum())]))
        _reference_marks(ax, 0.0, refs, vertical=True)
        ax.set_yticks([0, 1], ["partial pooling", "no pooling"])
        ax.set_ylim(-0.3, 1.45)
        ax.set_xlabel(label)
    ax.set_title(f"Shrinkage of {table.attrs['group']}'s {label} ({table.attrs['method']})")
    _legend(ax, len(table))
    return fig


def group_covariance(fit, gd) -> np.ndarray:
    """The q×q covariance of the factor's random effects: the fit's ``block_covariances()``
    (REML estimate, or posterior mean), blocks of the factor summed into their columns."""
    G = np.zeros((gd.q, gd.q))
    covs = fit.block_covariances()
    for k, pos in gd.blocks:
        G[np.ix_(pos, pos)] += covs[k]
    return G


@renamed_kwargs(prob="ci_prob")
def ellipse_points(center, cov, ci_prob: float, n: int = 200) -> np.ndarray:
    """Points (n, 2) of the contour of N(center, cov) that encloses probability ``ci_prob``.

    (``ci_prob`` was ``prob``, still accepted with a ``FutureWarning``.)
    """
    from scipy import stats

    radius = np.sqrt(stats.chi2.ppf(ci_prob, df=2))
    w, V = np.linalg.eigh(np.asarray(cov, dtype=float))
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.vstack([np.cos(t), np.sin(t)])
    return (np.asarray(center)[:, None] + radius * (V * np.sqrt(np.maximum(w, 0.0))) @ circle).T


def _ellipses(ax, fit, table, cols, centres, probs):
    """Contours of N(population, G) around each distinct population value, one line style per probability."""
    bad = [p for p in probs if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1]
    if bad:
        raise BayesLMMError(f"`ellipse` must be probabilities strictly between 0 and 1, got {probs!r}")
    if len(centres) > _MAX_ELLIPSE_CENTRES:
        ax.text(0.01, 0.01, f"no ellipses: {len(centres)} different population values (group-level predictors)",
                transform=ax.transAxes, fontsize="small", color="0.4", gid="note")
        return
    gd = group_design(fit.spec, table.attrs["group"])
    idx = [gd.columns.index(c) for c in cols]
    G = group_covariance(fit, gd)[np.ix_(idx, idx)]
    for k, p in enumerate(probs):
        for m, centre in enumerate(centres):
            pts = ellipse_points(centre, G, p)
            ax.plot(pts[:, 0], pts[:, 1], color="0.55", lw=0.9, ls=_ELLIPSE_STYLES[k % len(_ELLIPSE_STYLES)],
                    gid="ellipse", label=f"{p:.0%} of N(population, G)" if m == 0 else None)


def _shrinkage_2d(fit, table, cols, labels, ellipse, ax):
    fig, (ax,) = _new_axes(ax, panel_size=(8.0, 5.5))
    npool = table["no_pooling"][cols].to_numpy()
    part = table["partial"][cols].to_numpy()
    ok = np.isfinite(npool).all(axis=1)
    pop = np.unique(table["population"][cols].to_numpy(), axis=0)
    comp = np.unique(table["complete"][cols].to_numpy(), axis=0)
    if ellipse:
        _ellipses(ax, fit, table, cols, pop, list(ellipse) if np.ndim(ellipse) else [ellipse])
    ax.scatter(npool[ok, 0], npool[ok, 1], s=26, facecolors="none", edgecolors=_NO_POOL, label="no pooling",
               gid="no_pooling", zorder=3)
    ax.scatter(part[:, 0], part[:, 1], s=18, color=_PARTIAL, label="partial pooling", gid="partial_pooling",
               zorder=4)
    _arrows(ax, npool[ok], part[ok])
    ax.scatter(pop[:, 0], pop[:, 1], marker="X", s=90, color="k", label="population (fixed effects)",
               gid="population", zorder=5)
    # hollow and on top: visible where complete pooling coincides with the population value
    ax.scatter(comp[:, 0], comp[:, 1], marker="D", s=80, facecolors="none", edgecolors=_COMPLETE, linewidths=1.6,
               label="complete pooling", gid="complete_pooling", zorder=6)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"Shrinkage of {table.attrs['group']}'s lines ({table.attrs['method']})")
    _legend(ax, len(table), outside=True)
    return fig


# ------------------------------------------------------------------- caterpillar
@renamed_kwargs(prob="ci_prob")
def effect_intervals(fit, group: str | None = None, ci_prob: float | None = None):
    """Per level and column: estimate, lower and upper bound of the random effect b_j.

    The fit's ``ranef(ci_prob)[group]``: REML/ML, conditional mode ± z·conditional sd
    (z = 1.96 for ``ci_prob=0.95``, the default); NUTS, posterior mean and the
    equal-tailed posterior interval (default ArviZ's ``stats.ci_prob``; a fit that kept
    its effects as summaries has the 50, 90 and 95 % ones).  Returns ``(design, est,
    lower, upper, prob)`` with the arrays shaped (levels, columns), the columns those of
    ``ranef()[group]`` (a column two blocks of the factor share comes once per block,
    the later one named ``name.1``).  (``ci_prob`` was ``prob``, still accepted with a
    ``FutureWarning``.)
    """
    gd, est, lo, hi, prob = _group_intervals(resolve_fit(fit), group, ci_prob)
    return gd, est.to_numpy(), lo.to_numpy(), hi.to_numpy(), prob


def _group_intervals(fit, group, ci_prob):
    """``(design, estimate, lower, upper, prob)`` of one factor, the three as frames (levels × columns)."""
    gd = group_design(fit.spec, group)
    prob = check_ci_prob(ci_prob, fit.default_ci_prob)
    frame = fit.ranef(ci_prob=prob)[gd.group]
    est = frame["estimate"]  # the point values: conditional modes or posterior means
    return gd, est, frame["lower"], frame["upper"], prob


@renamed_kwargs(prob="ci_prob")
def caterpillar_plot(fit, group: str | None = None, ci_prob: float | None = None, *, max_labels: int = 60, ax=None):
    """The random effects of one grouping factor, sorted, with intervals.

    One panel per column of the factor's effects (``(Intercept)``, ``Days``, ...); the
    levels are sorted by the first column's estimate and keep that order in every
    panel, as lme4's ``dotplot(ranef(fit, condVar = TRUE))``.

    Parameters
    ----------
    fit : FreqFit, BayesFit or Model
    group : str, optional
        The grouping factor (default: the first block's).
    ci_prob : float, optional
        Interval probability (was ``prob``, still accepted with a ``FutureWarning``).
        REML/ML: conditional mode ± z·conditional sd, default
        0.95 (z = 1.96, from the fit's ``ranef_table``); NUTS: equal-tailed posterior
        interval, default ArviZ's ``stats.ci_prob`` (0.89).
    max_labels : int
        Level names are written on the y axis up to this many levels.
    ax : matplotlib Axes, optional
        Only for a factor with one column.

    Returns
    -------
    matplotlib.figure.Figure
        Per panel, the ``"estimate"`` points and ``"interval"`` segments, bottom to top in
        the sorted order; ``fig.levels_order`` lists the levels bottom to top.
    """
    fit = resolve_fit(fit)
    gd, est, lo, hi, prob = _group_intervals(fit, group, ci_prob)
    columns = list(est.columns)
    est, lo, hi = est.to_numpy(), lo.to_numpy(), hi.to_numpy()
    J = len(gd.levels)
    order = np.argsort(est[:, 0], kind="stable")
    fig, axes = _new_axes(ax, len(columns), panel_size=(4.0, min(2.0 + 0.16 * J, 12.0)), sharey=True)
    pos = np.arange(J)
    kind = fit.point_estimate
    for a, (axis, col) in enumerate(zip(axes, columns)):
        axis.axvline(0.0, color="0.6", lw=0.8, ls="--")
        axis.hlines(pos, lo[order, a], hi[order, a], color="0.35", lw=1.2, gid="interval")
        axis.scatter(est[order, a], pos, s=14, color=_PARTIAL, zorder=3, gid="estimate")
        axis.set_title(col)
        axis.set_xlabel(f"{kind}, {prob:.0%} interval")
    if J <= max_labels:
        axes[0].set_yticks(pos, [gd.levels[i] for i in order], fontsize="small")
    else:
        axes[0].set_yticks([])
    axes[0].set_ylabel(gd.group)
    axes[0].set_ylim(-1, J)
    fig.suptitle(f"Random effects of {gd.group} ({fit.method})")
    fig.levels_order = [gd.levels[i] for i in order]
    return fig


# -------------------------------------------------------------- variance components
def _bayes_fit(fit, name="bayes_fit"):
    from .bayes.results import BayesFit  # these figures show posterior draws: only a BayesFit has them

    if not isinstance(fit, BayesFit):
        raise ModelError(f"`{name}` must be a BayesFit (Model.fit(method='nuts')), got {type(fit).__name__}")
    return fit


def _density(x: np.ndarray):
    from arviz_stats.base import array_stats

    grid, pdf, _ = array_stats.kde(np.asarray(x, dtype=float).ravel())
    return np.asarray(grid), np.asarray(pdf)


def variance_draws(fit) -> tuple[list[str], list[np.ndarray]]:
    """Labels and (chain, draw) draws of every sd, correlation and σ, in ``varcorr``'s row order."""
    post = fit.posterior
    labels, draws = [], []
    for name, block in zip(fit.names, fit.spec.blocks):
        sd = post[sd_var(name)].to_numpy()
        for i, col in enumerate(block.columns):
            labels.append(_vc_label(block.group, col, None))
            draws.append(sd[..., i])
        if block.correlated and block.q > 1:
            corr = correlation_matrices(post, name, block.q)
            for i, j in zip(*pair_index(block.q)):
                labels.append(_vc_label(block.group, block.columns[i], block.columns[j]))
                draws.append(corr[..., j, i])
    labels.append("sigma")
    draws.append(post["sigma"].to_numpy())
    return labels, draws


def _vc_label(grp, v1, v2) -> str:
    if grp == "Residual":
        return "sigma"
    if v2 is None or (isinstance(v2, float) and np.isnan(v2)):
        return f"sd[{grp}|{v1}]"
    return f"corr[{grp}|{v1},{v2}]"


def variance_plot(bayes_fit, reml_fit=None, *, ncols: int = 3):
    """Posterior density of every sd, correlation and σ, with the REML/ML estimate as a line.

    Parameters
    ----------
    bayes_fit : BayesFit
    reml_fit : FreqFit, optional
        A REML or ML fit of the same model; its ``varcorr`` estimates are drawn as
        vertical lines (``gid="reml"``).
    ncols : int
        Panels per row.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per variance parameter, titled as in ``BayesFit.summary_table``
        (``sd[Subject|Days]``, ``corr[Subject|(Intercept),Days]``, ``sigma``).  Densities
        are ArviZ's boundary-corrected KDE of the draws (arviz-stats).
    """
    from .reml.results import FreqFit

    fit = _bayes_fit(bayes_fit)
    if isinstance(ncols, bool) or not isinstance(ncols, Integral) or ncols < 1:
        raise BayesLMMError(f"`ncols` must be a positive integer, got {ncols!r}")
    labels, draws = variance_draws(fit)
    ref = None
    if reml_fit is not None:
        if not isinstance(reml_fit, FreqFit):
            raise ModelError(f"`reml_fit` must be a FreqFit (Model.fit(method='reml'|'ml')), "
                             f"got {type(reml_fit).__name__}")
        vc = reml_fit.varcorr
        ref_labels = [_vc_label(g, v1, v2) for g, v1, v2 in zip(vc.grp, vc.var1, vc.var2)]
        if (reml_fit.spec.formula != fit.spec.formula or reml_fit.spec.n_obs != fit.spec.n_obs
                or sorted(ref_labels) != sorted(labels)):
            raise ModelError(f"`reml_fit` is not a fit of the same model: {reml_fit.spec.formula!r} on "
                             f"{reml_fit.spec.n_obs} rows vs {fit.spec.formula!r} on {fit.spec.n_obs} rows")
        ref = _match_rows(ref_labels, vc.sdcor.to_numpy(), labels)
    fig, axes = _new_axes(None, len(labels), ncols=min(ncols, len(labels)), panel_size=(3.8, 2.9))
    for i, (axis, label, d) in enumerate(zip(axes, labels, draws)):
        grid, pdf = _density(d)
        axis.plot(grid, pdf, color="C0", lw=1.5, gid="posterior", label="posterior")
        axis.fill_between(grid, pdf, color="C0", alpha=0.15)
        if ref is not None:
            axis.axvline(ref[i], color="k", lw=1.2, ls="--", gid="reml", label=f"{reml_fit.method} estimate")
        axis.set_title(label, fontsize="medium")
        axis.set_yticks([])
        axis.set_ylim(bottom=0)
    axes[0].legend(fontsize="small")
    fig.suptitle("Variance components: posterior" + (f" and {reml_fit.method} estimate" if ref is not None else ""))
    fig.parameter_labels = labels
    return fig


def _match_rows(ref_labels, values, labels) -> np.ndarray:
    """Values of ``ref_labels`` in the order of ``labels``; repeated labels matched in order."""
    pools: dict[str, list] = {}
    for lab, v in zip(ref_labels, values):
        pools.setdefault(lab, []).append(float(v))
    return np.array([pools[lab].pop(0) for lab in labels])


# ------------------------------------------------------- posterior predictive check
def ppc_plot(bayes_fit, n_draws: int = 50, random_seed: int | None = None, *, ax=None):
    """Density of the observed response against densities of posterior predictive replicates.

    Each replicate is one posterior draw's y_rep = Xβ + Zb + σε for the training rows
    (``BayesFit.posterior_predictive``); ``n_draws`` of them, evenly spaced through the
    chains, are drawn thin, the observed ``y`` thick (ArviZ's KDE, arviz-stats).

    Parameters
    ----------
    bayes_fit : BayesFit
    n_draws : int
        Replicates to draw, at most the number of posterior draws.
    random_seed : int, optional
        Seed of the replicates' noise (``None``: derived from the fit's seed).
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        Lines with ``gid="y_rep"`` (one per replicate) and ``gid="y"``;
        ``fig.draw_index`` holds the flat (chain × draw) index of each replicate.
    """
    fit = _bayes_fit(bayes_fit)
    total = fit.n_draws
    if isinstance(n_draws, bool) or not isinstance(n_draws, Integral) or not 1 <= n_draws <= total:
        raise BayesLMMError(f"`n_draws` must be an integer from 1 to the {total} posterior draws, got {n_draws!r}")
    # the same draws as fit.posterior_predictive(), which would also store them in fit.idata
    y_rep = fit.predict_draws(predictive=True, random_seed=random_seed)
    flat = y_rep.to_numpy().reshape(total, -1)
    index = np.unique(np.linspace(0, total - 1, n_draws).round().astype(int))
    fig, (ax,) = _new_axes(ax, panel_size=(6.5, 4.2))
    for k, i in enumerate(index):
        grid, pdf = _density(flat[i])
        ax.plot(grid, pdf, color="C0", alpha=0.3, lw=0.8, gid="y_rep",
                label="posterior predictive" if k == 0 else None)
    grid, pdf = _density(fit.spec.y)
    ax.plot(grid, pdf, color="k", lw=2.0, gid="y", label=f"observed {fit.spec.response}")
    ax.set_xlabel(fit.spec.response)
    ax.set_yticks([])
    ax.set_ylim(bottom=0)
    ax.set_title(f"Posterior predictive check ({len(index)} replicates)")
    ax.legend(fontsize="small")
    fig.draw_index = index
    return fig


# ------------------------------------------------------------- conditional effects
#: what ``interval=`` may ask for: the uncertainty of the mean, or of a new observation (NUTS only)
_INTERVALS = ("mean", "prediction")


def conditional_effects_plot(fit, x: str, by: str | None = None, *, kind: str = "marginal",
                             ci_prob: float | None = None, at: dict | None = None, n_points: int = 100,
                             interval: str = "mean", data: bool = True, random_seed: int | None = None, ax=None):
    """The predicted response across one predictor, one curve per level of another, with intervals.

    What brms's ``conditional_effects(fit, "x:by")`` and bambi's
    ``interpret.plot_predictions(model, idata, conditional=["x", "by"])`` draw, for both
    engines (bambi's band is the HDI by default; this one is equal-tailed).

    Parameters
    ----------
    fit : FreqFit, BayesFit or Model
        As for :func:`bayeslmm.pooling_table` (a Model is fitted by REML).
    x : str
        A predictor of the fixed effects (a column of the data).  Numeric: ``n_points``
        values from its smallest to its largest value in the data, drawn as a line with
        a band.  A factor: its levels, drawn as points with error bars.
    by : str, optional
        A second predictor: one curve per level of a factor (dodged sideways when ``x``
        is a factor), or, for a numeric ``by``, three curves at its mean − 1 sd, mean
        and mean + 1 sd in the data (brms's choice).  With ``kind="conditional"`` a
        grouping factor (``"Subject"``) too: one curve per group.
    kind : {"marginal", "conditional"}
        ``"marginal"``: the population-level prediction Xβ (random effects at 0).
        ``"conditional"``: one group's prediction Xβ + Zb; name the group in ``at``
        (``at={"Subject": "308"}``) or use the grouping factor as ``by``.
    ci_prob : float, optional
        Interval probability (the fit's ``default_ci_prob``: REML/ML 0.95, NUTS 0.89).
    at : dict, optional
        Values of the other predictors (and, for ``kind="conditional"``, of the
        grouping factors).  The predictors not named are held as brms holds them: a
        numeric one at its mean over the rows fitted, a factor at its reference (first)
        level — not averaged over its levels (for that, see marginal means).
    n_points : int
        Grid size of a numeric ``x`` (at least 2).
    interval : {"mean", "prediction"}
        ``"mean"``: the interval of the predicted mean.  REML/ML: the Wald confidence
        interval x'β̂ ± z·√(x'Cx) with C = ``fit.vcov`` and z the normal quantile; for
        ``kind="conditional"`` it holds the uncertainty of β̂ only, not that of the
        group's b̂.  NUTS: the equal-tailed posterior interval of the draws of the mean
        (``fit.predict(grid, kind, ci_prob=...)``).  ``"prediction"`` (NUTS only): the
        equal-tailed interval of posterior predictive draws (σε added; with
        ``kind="marginal"`` not the groups' spread), brms's ``method = "posterior_predict"``.
    data : bool
        Also draw the observed responses against ``x``, coloured by a factor ``by``
        (with ``kind="conditional"``, the rows of the groups in ``at`` only).
    random_seed : int, optional
        Seed of the predictive noise for ``interval="prediction"``.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.conditional_effects`` is the DataFrame plotted: the grid's columns
        (``x``, ``by`` and every held value), ``estimate`` (REML/ML: ``fit.predict``;
        NUTS: the posterior mean of ``fit.predict``), ``lower``, ``upper`` and, for a
        factor ``x``, ``position`` (the horizontal place drawn); its ``attrs`` say
        the kind, ``ci_prob``, interval, method and held values.  Artists: lines or
        points ``gid="estimate"``, bands or bars ``gid="interval"``, data
        ``gid="data"``, one per curve in the table's order.
    """
    fit = resolve_fit(fit)
    if kind not in ("marginal", "conditional"):
        raise BayesLMMError(f"`kind` must be 'marginal' (population level) or 'conditional' (one group's), "
                            f"got {kind!r}")
    if interval not in _INTERVALS:
        raise BayesLMMError(f"`interval` must be one of {list(_INTERVALS)}, got {interval!r}")
    if isinstance(n_points, bool) or not isinstance(n_points, Integral) or n_points < 2:
        raise BayesLMMError(f"`n_points` must be an integer of at least 2, got {n_points!r}")
    prob = check_ci_prob(ci_prob, fit.default_ci_prob)
    spec = fit.spec
    roles = _effect_roles(spec, kind)
    _check_varied(spec, roles, x, by, kind)
    held = _held_values(spec, roles, at, {x, by})
    xs, bys = _axis_values(spec, roles, x, n_points), _by_values(spec, roles, by)
    grid = _effects_grid(spec, x, xs, by, bys, held)
    table = _effects_table(fit, grid, kind, prob, interval, random_seed)
    table.attrs.update(kind=kind, ci_prob=prob, interval=interval, method=fit.method, held=held)
    fig, (axis,) = _new_axes(ax, panel_size=(6.5, 4.3))
    if roles[x]:
        offsets = _dodge(len(bys))
        table["position"] = np.concatenate([np.arange(len(xs)) + off for off in offsets])
        _effects_points(axis, table, xs, by, bys)
    else:
        _effects_lines(axis, table, x, by, bys)
    if data:
        _effects_data(axis, spec, roles, x, xs, by, bys, held, kind)
    _effects_labels(axis, fit, x, by, kind, prob, interval, held)
    fig.conditional_effects = table
    return fig


def _effect_roles(spec, kind: str) -> dict[str, bool | None]:
    """The data's columns a prediction uses: ``True`` a factor, ``False`` numeric, ``None`` a grouping factor.

    A numeric column the formula wraps in ``C()`` counts as a factor.  Grouping
    factors are listed for ``kind="conditional"`` only: the marginal prediction
    does not use them.
    """
    from .formula.parse import parse_formula, referenced_names
    from .formula.terms import fixed_terms

    if spec.data is None:
        raise ModelError("this model did not keep its data (cross-products computed out of memory), so its "
                         "predictions cannot be put on a grid: refit from a DataFrame to plot conditional effects")
    parsed = parse_formula(spec.formula)
    columns = set(map(str, spec.data.columns))
    response = {n for n, _ in referenced_names(spec.response)}
    exprs = [parsed.fixed] + ([b.lhs for b in parsed.bars] if kind == "conditional" else [])
    used = [n for e in exprs for n, _ in referenced_names(e) if n in columns and n not in response]
    categoric = {n for t in fixed_terms(spec) for f in t.factors for n, _ in referenced_names(f)}
    roles: dict[str, bool | None] = {n: n in categoric or not _is_numeric(spec.data[n]) for n in dict.fromkeys(used)}
    if kind == "conditional":
        for block in spec.blocks:
            for g in block.group.split(":"):
                roles.setdefault(g, None)
    return roles


def _is_numeric(s) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _check_varied(spec, roles, x, by, kind) -> None:
    """``x`` a fixed-effect predictor, ``by`` another (or a grouping factor when conditional), or clear errors."""
    from .formula.parse import referenced_names

    predictors = [n for n, r in roles.items() if r is not None]
    groups = [n for b in spec.blocks for n in b.group.split(":")]
    response = {spec.response, *(n for n, _ in referenced_names(spec.response))}

    def what(name):
        if not isinstance(name, str):
            return f"must be a column name, got {type(name).__name__}"
        if name in response:
            return f"{name!r} is the response, which the plot shows on the y axis"
        if name in groups and kind == "marginal":
            return (f"{name!r} is a grouping factor, which the marginal (population) prediction does not use; "
                    "pass kind='conditional' to draw the groups' curves")
        return f"{name!r} is not a predictor of the fixed effects ({predictors})"

    if x not in predictors:
        raise BayesLMMError(f"`x`: {what(x)}")
    if by is not None and (by not in roles or by == x):
        raise BayesLMMError("`by` must differ from `x`" if by == x else f"`by`: {what(by)}")


def _levels(s) -> list:
    """A factor's levels as formulae orders them (the fit's coding: reference first)."""
    from .formula.terms import level_order

    return level_order(s)


def _held_values(spec, roles, at, varied) -> dict:
    """Every other column's value: ``at``'s, else a numeric one's mean and a factor's reference level."""
    from collections.abc import Mapping

    if at is None:
        at = {}
    if not isinstance(at, Mapping):
        raise BayesLMMError(f"`at` must be a dict of column → value, got {type(at).__name__}")
    for key in at:
        if key in varied:
            raise BayesLMMError(f"`at` names {key!r}, which the plot varies (`x` or `by`); leave it out of `at`")
        if key not in roles:
            raise BayesLMMError(f"`at` names {key!r}, which this prediction does not use; it uses {list(roles)}"
                                + (" (grouping factors need kind='conditional')"
                                   if any(key in b.group.split(":") for b in spec.blocks) else ""))
    held = {}
    for name, role in roles.items():
        if name in varied:
            continue
        if name in at:
            held[name] = _at_value(spec.data[name], name, at[name], numeric=role is False)
        elif role is None:
            raise BayesLMMError(f"kind='conditional' predicts one group's curve: name its level of {name!r} in "
                                f"`at` (at={{{name!r}: {str(_levels(spec.data[name])[0])!r}}}) or pass by={name!r}")
        else:
            held[name] = _levels(spec.data[name])[0] if role else float(spec.data[name].mean())
    return held


def _at_value(column, name, value, numeric: bool):
    """``value`` checked against the data: a finite number for a numeric column, a known level otherwise."""
    if numeric:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise BayesLMMError(f"`at[{name!r}]` must be a finite number ({name!r} is numeric), got {value!r}")
        return float(value)
    levels = _levels(column)
    match = [lv for lv in levels if str(lv) == str(value)]
    if not match:
        shown = ", ".join(map(str, levels[:10])) + (" ..." if len(levels) > 10 else "")
        raise BayesLMMError(f"`at[{name!r}]` = {value!r} is not a level of {name!r} in the data (levels: {shown})")
    return match[0]


def _axis_values(spec, roles, x, n_points) -> list:
    """The grid of ``x``: its levels, or ``n_points`` values from its minimum to its maximum."""
    s = spec.data[x]
    if roles[x]:
        return _levels(s)
    return list(np.linspace(float(s.min()), float(s.max()), n_points))


def _by_values(spec, roles, by) -> list:
    """The curves: ``[None]`` without ``by``, a factor's levels, a numeric one's mean − sd, mean, mean + sd."""
    if by is None:
        return [None]
    s = spec.data[by]
    if roles[by] is not False:
        return _levels(s)
    mean, sd = float(s.mean()), float(s.std(ddof=1))
    return [mean - sd, mean, mean + sd]


def _effects_grid(spec, x, xs, by, bys, held):
    """One row per (by, x) pair, ``by`` outermost, with every held value."""
    import pandas as pd

    rows = {x: [v for _ in bys for v in xs]}
    if by is not None:
        rows[by] = [b for b in bys for _ in xs]
    n = len(rows[x])
    rows.update({name: [value] * n for name, value in held.items()})
    grid = pd.DataFrame(rows)
    for name in grid.columns:  # a categorical column keeps its categories, so predict matches them
        if isinstance(spec.data[name].dtype, pd.CategoricalDtype):
            grid[name] = pd.Categorical(grid[name], categories=spec.data[name].cat.categories)
    return grid


def _effects_table(fit, grid, kind, prob, interval, random_seed):
    """The grid with ``estimate, lower, upper`` from the fit's own predictions."""
    from .formula.terms import grid_design
    from .group_frames import normal_quantile

    table = grid.copy()
    if fit.point_estimate == "posterior mean":  # the fit has draws: their mean and equal-tailed interval
        pred = fit.predict(grid, kind=kind, new_groups="error", ci_prob=prob)
        table["estimate"] = pred["mean"].to_numpy()
        if interval == "prediction":
            pred = fit.predict(grid, kind=kind, new_groups="error", predictive=True, ci_prob=prob,
                               random_seed=random_seed)
        table["lower"], table["upper"] = pred["lower"].to_numpy(), pred["upper"].to_numpy()
        return table
    if interval == "prediction":
        raise BayesLMMError(f"interval='prediction' needs posterior predictive draws (a NUTS fit); a {fit.method} fit "
                            "gives the confidence interval of the mean (interval='mean')")
    est = fit.predict(grid, kind=kind, new_groups="error").to_numpy()
    X = grid_design(fit.spec, grid)
    se = np.sqrt(np.einsum("np,pq,nq->n", X, fit.vcov.to_numpy(), X))
    z = normal_quantile(prob)
    table["estimate"], table["lower"], table["upper"] = est, est - z * se, est + z * se
    return table


def _curve_label(by, value) -> str | None:
    if by is None:
        return None
    return f"{by} = {value:.3g}" if isinstance(value, float) else f"{by} = {value}"


def _dodge(n_curves: int) -> np.ndarray:
    """Sideways offsets of the curves at a factor's level, centred, within ±0.2."""
    if n_curves == 1:
        return np.zeros(1)
    return np.linspace(-0.2, 0.2, n_curves)


def _curves(table, by, bys):
    """``(k, value, rows)`` of each curve, in ``bys`` order (the grid's)."""
    n = len(table) // len(bys)
    return [(k, b, table.iloc[k * n:(k + 1) * n]) for k, b in enumerate(bys)]


def _effects_lines(ax, table, x, by, bys):
    for k, b, rows in _curves(table, by, bys):
        xs = rows[x].to_numpy(dtype=float)
        ax.fill_between(xs, rows["lower"].to_numpy(), rows["upper"].to_numpy(), color=f"C{k}", alpha=0.2,
                        lw=0, gid="interval")
        ax.plot(xs, rows["estimate"].to_numpy(), color=f"C{k}", lw=1.8, gid="estimate", label=_curve_label(by, b))


def _effects_points(ax, table, xs, by, bys):
    for k, b, rows in _curves(table, by, bys):
        pos = rows["position"].to_numpy()
        ax.vlines(pos, rows["lower"].to_numpy(), rows["upper"].to_numpy(), color=f"C{k}", lw=1.6, gid="interval")
        ax.scatter(pos, rows["estimate"].to_numpy(), s=36, color=f"C{k}", zorder=3, gid="estimate",
                   label=_curve_label(by, b))
    ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
    ax.set_xlim(-0.6, len(xs) - 0.4)


def _effects_data(ax, spec, roles, x, xs, by, bys, held, kind):
    """The observed responses against ``x``: a factor ``by``'s colours; only the groups in ``at`` when conditional."""
    d = spec.data
    keep = np.ones(len(d), dtype=bool)
    if kind == "conditional":
        for name, role in roles.items():
            if role is None and name in held:
                keep &= (d[name].astype(str) == str(held[name])).to_numpy()
    y = np.asarray(spec.y, dtype=float)
    coloured = by is not None and roles[by] is not False
    offsets = _dodge(len(bys)) if roles[x] else np.zeros(len(bys))
    position = {str(v): i for i, v in enumerate(xs)}
    for k, b in enumerate(bys if coloured else [None]):
        rows = keep & ((d[by].astype(str) == str(b)).to_numpy() if coloured else True)
        if roles[x]:
            xv = np.array([position[str(v)] for v in d[x][rows]], dtype=float) + offsets[k]
        else:
            xv = d[x].to_numpy(dtype=float)[rows]
        ax.scatter(xv, y[rows], s=9, color=f"C{k}" if coloured else "0.45", alpha=0.35, zorder=1, gid="data",
                   label=("data" if k == 0 else None) if not coloured else None)


def _effects_labels(ax, fit, x, by, kind, prob, interval, held):
    what = {"mean": "interval of the mean", "prediction": "prediction interval"}[interval]
    level = "population" if kind == "marginal" else "conditional"
    ax.set_xlabel(x)
    ax.set_ylabel(f"{fit.spec.response} ({level} prediction)")
    title = f"Conditional effect of {x}" + (f" by {by}" if by is not None else "")
    title += f" ({fit.method}, {prob:.0%} {what})"
    if held:  # what the curves are conditional on belongs with them, not hidden in the docs
        title += "\nat " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                     for k, v in held.items())
    ax.set_title(title, fontsize="medium")
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        _legend(ax, len(handles), outside=len(handles) > 8)
