"""Plots rendered with Agg and read back: what is drawn is the fit's numbers."""

import io
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from arviz_stats.base import array_stats  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from bayeslmm import Model  # noqa: E402
from bayeslmm.errors import BayesLMMError, ModelError  # noqa: E402
from bayeslmm.plots import caterpillar_plot, ppc_plot, shrinkage_plot, variance_plot  # noqa: E402
from bayeslmm.pooling import pooling_table  # noqa: E402
from bayeslmm.simulate import simulate_doctors, simulate_lmm  # noqa: E402

SLEEP = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleep_model():
    return Model(SLEEP, "sleepstudy")


@pytest.fixture(scope="module")
def reml(sleep_model):
    return sleep_model.fit(method="reml")


@pytest.fixture(scope="module")
def nuts(sleep_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sleep_model.fit(method="nuts", draws=300, tune=300, chains=2, random_seed=7, progressbar=False)


def render(fig) -> bytes:
    """Draw the figure to PNG in memory (every artist must render)."""
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    data = buf.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    return data


def by_gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def offsets(ax, gid):
    (coll,) = by_gid(ax, gid)
    return np.asarray(coll.get_offsets())


def arrows(ax):
    """(start, end) of every shrinkage arrow (one quiver, drawn in data units)."""
    (q,) = by_gid(ax, "shrinkage_arrow")
    assert q.angles == "xy" and q.scale_units == "xy" and q.scale == 1
    start = np.column_stack([q.X, q.Y])
    return start, start + np.column_stack([q.U, q.V])


# ------------------------------------------------------------------- shrinkage
def test_shrinkage_plot_2d_draws_the_pooling_table(reml):
    fig = shrinkage_plot(reml)
    render(fig)
    ax = fig.axes[0]
    table = pooling_table(reml)
    pd_table = fig.pooling_table
    assert pd_table.equals(table)
    np.testing.assert_allclose(offsets(ax, "no_pooling"), table["no_pooling"].to_numpy())
    np.testing.assert_allclose(offsets(ax, "partial_pooling"), table["partial"].to_numpy())
    start, end = arrows(ax)
    assert len(start) == 18
    np.testing.assert_allclose(start, table["no_pooling"].to_numpy())
    np.testing.assert_allclose(end, table["partial"].to_numpy())
    np.testing.assert_allclose(offsets(ax, "population"), [reml.fixef.to_numpy()])
    assert ax.get_xlabel() == "intercept" and ax.get_ylabel() == "slope of Days"
    # complete pooling: a hollow marker of its own drawn above the population's
    (comp,) = by_gid(ax, "complete_pooling")
    (pop,) = by_gid(ax, "population")
    assert comp.get_zorder() > pop.get_zorder()
    assert (comp.get_edgecolor()[0] != pop.get_facecolor()[0]).any()


def test_shrinkage_plot_with_group_level_predictors():
    """Orthodont: boys and girls have their own population line, ellipse and complete-pooling line."""
    from pathlib import Path

    import pandas as pd

    d = pd.read_csv(Path(__file__).parents[1] / "data" / "Orthodont.csv")
    d["Sex"] = d["Sex"].astype("category")
    fit = Model("distance ~ age + Sex + (age | Subject)", d).fit()
    fig = shrinkage_plot(fit, ellipse=(0.5, 0.95))
    render(fig)
    ax = fig.axes[0]
    table = fig.pooling_table
    beta = fit.fixef
    girls, boys = [beta["(Intercept)"], beta["age"]], [beta["(Intercept)"] + beta["Sex[Male]"], beta["age"]]
    np.testing.assert_allclose(offsets(ax, "population"), [girls, boys], rtol=1e-12)
    assert len(offsets(ax, "complete_pooling")) == 2
    np.testing.assert_allclose(offsets(ax, "no_pooling"), table["no_pooling"].to_numpy())
    assert np.abs(offsets(ax, "no_pooling")).max() < 40  # was 2e14 for every child of one sex
    assert ax.get_xlabel() == "intercept" and ax.get_ylabel() == "slope of age"
    # two probabilities around two centres; one legend entry per probability, each its own line style
    ellipses = by_gid(ax, "ellipse")
    assert len(ellipses) == 4
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert legend["50% of N(population, G)"].get_linestyle() != legend["95% of N(population, G)"].get_linestyle()
    # one column: a population mark per child, at the child's own population value
    ax = shrinkage_plot(fit, columns="(Intercept)").axes[0]
    np.testing.assert_allclose(offsets(ax, "population")[:, 0], table[("population", "(Intercept)")])
    assert ax.get_xlabel() == "intercept"


def test_a_continuous_group_level_predictor_gets_no_ellipses_and_says_so():
    fit = Model("normexam ~ standLRT + schavg + (standLRT | school)", "exam").fit()
    fig = shrinkage_plot(fit)
    render(fig)
    ax = fig.axes[0]
    assert by_gid(ax, "ellipse") == []
    (note,) = by_gid(ax, "note")
    assert "65 different population values" in note.get_text()
    assert len(offsets(ax, "population")) == 65
    assert ax.get_ylabel() == "slope of standLRT"


def test_shrinkage_ellipses_are_contours_of_the_fitted_covariance(reml):
    fig = shrinkage_plot(reml, ellipse=(0.5, 0.95))
    ax = fig.axes[0]
    lines = by_gid(ax, "ellipse")
    assert len(lines) == 2
    vc = reml.varcorr  # G built independently from lme4's sd / correlation layout
    sd0, sd1, rho = vc.sdcor[:3]
    G = np.array([[sd0**2, rho * sd0 * sd1], [rho * sd0 * sd1, sd1**2]])
    mu = reml.fixef.to_numpy()
    for line, p in zip(lines, (0.5, 0.95)):
        pts = np.column_stack(line.get_data()) - mu
        d2 = np.einsum("ni,ij,nj->n", pts, np.linalg.inv(G), pts)
        np.testing.assert_allclose(d2, stats.chi2.ppf(p, 2), rtol=1e-8)
    assert by_gid(shrinkage_plot(reml, ellipse=None).axes[0], "ellipse") == []


def test_shrinkage_plot_1d_by_group_size_on_doctors():
    df = simulate_doctors(n_doctors=60, target_patients=None, random_seed=4)
    fit = Model("mobility ~ age + married + sex + rbc + wbc + (1 | doctor)", df).fit()
    fig = shrinkage_plot(fit)
    render(fig)
    ax = fig.axes[0]
    table = pooling_table(fit)
    n = table["n"].to_numpy()
    col = "(Intercept)"
    np.testing.assert_allclose(offsets(ax, "partial_pooling"), np.column_stack([n, table[("partial", col)]]))
    np.testing.assert_allclose(offsets(ax, "no_pooling"), np.column_stack([n, table[("no_pooling", col)]]))
    start, end = arrows(ax)
    assert len(start) == 60
    np.testing.assert_allclose(start[:, 1], table[("no_pooling", col)])
    np.testing.assert_allclose(end[:, 1], table[("partial", col)])
    np.testing.assert_array_equal(start[:, 0], n)
    (pop,) = by_gid(ax, "population")
    np.testing.assert_allclose(pop.get_ydata(), fit.fixef["(Intercept)"])
    assert ax.get_xscale() == "log"  # 2 to 40 patients


def test_shrinkage_plot_rows_layout_and_missing_levels():
    df = simulate_lmm(n_groups=10, n_per_group=6, random_seed=8)
    df.loc[df["g"].astype(str) == "4", "x"] = 1.5  # level 4: slope and intercept not estimable
    fit = Model("y ~ x + (1 + x | g)", df).fit()
    table = pooling_table(fit)
    assert table.loc["4", "no_pooling"].isna().all()
    # 2-D: no point and no arrow for level 4, its partial-pooling point still drawn
    ax = shrinkage_plot(fit).axes[0]
    assert len(offsets(ax, "no_pooling")) == 9 and len(offsets(ax, "partial_pooling")) == 10
    assert len(arrows(ax)[0]) == 9
    # intercept only, equal group sizes: "rows" layout, no pooling at y = 1, partial pooling at y = 0
    fig = shrinkage_plot(fit, columns="x")
    render(fig)
    ax = fig.axes[0]
    ok = table[("no_pooling", "x")].notna()
    np.testing.assert_allclose(offsets(ax, "no_pooling"), np.column_stack([table[("no_pooling", "x")][ok],
                                                                          np.ones(9)]))
    np.testing.assert_allclose(offsets(ax, "partial_pooling")[:, 0], table[("partial", "x")])
    start, end = arrows(ax)
    np.testing.assert_allclose(end, np.column_stack([table[("partial", "x")][ok], np.zeros(9)]))
    (pop,) = by_gid(ax, "population")
    np.testing.assert_allclose(pop.get_xdata(), fit.fixef["x"])


def test_shrinkage_plot_of_a_bayes_fit(nuts):
    fig = shrinkage_plot(nuts)
    render(fig)
    ax = fig.axes[0]
    table = pooling_table(nuts)
    np.testing.assert_allclose(offsets(ax, "partial_pooling"), table["partial"].to_numpy())
    post = nuts.posterior
    np.testing.assert_allclose(offsets(ax, "population"), [post["beta"].mean(("chain", "draw")).to_numpy()])
    # the ellipse is the posterior mean of G = D R D
    sd, r = post["Subject_sd"].to_numpy(), post["Subject_corr"].to_numpy()[..., 0]
    corr = np.stack([np.stack([np.ones_like(r), r], -1), np.stack([r, np.ones_like(r)], -1)], -2)
    G = (sd[..., :, None] * corr * sd[..., None, :]).mean(axis=(0, 1))
    pts = np.column_stack(by_gid(ax, "ellipse")[1].get_data()) - offsets(ax, "population")[0]
    np.testing.assert_allclose(np.einsum("ni,ij,nj->n", pts, np.linalg.inv(G), pts), stats.chi2.ppf(0.95, 2),
                               rtol=1e-8)


# ----------------------------------------------------------------- caterpillar
def test_caterpillar_reml_intervals_are_condval_plus_minus_1_96_condsd(reml):
    fig = caterpillar_plot(reml)
    render(fig)
    assert len(fig.axes) == 2
    rt = reml.ranef_table()
    first = rt[rt.term == "(Intercept)"].set_index("grp")
    order = first.sort_values("condval").index.tolist()
    assert fig.levels_order == order
    for ax, term in zip(fig.axes, ["(Intercept)", "Days"]):
        tab = rt[rt.term == term].set_index("grp").loc[order]
        (segments,) = by_gid(ax, "interval")
        seg = np.array(segments.get_segments())
        z = stats.norm.ppf(0.975)  # 1.95996...
        np.testing.assert_allclose(seg[:, 0, 0], tab.condval - z * tab.condsd, rtol=1e-10)
        np.testing.assert_allclose(seg[:, 1, 0], tab.condval + z * tab.condsd, rtol=1e-10)
        np.testing.assert_allclose(seg[:, 1, 0] - seg[:, 0, 0], 2 * 1.96 * tab.condsd, rtol=1e-4)
        np.testing.assert_allclose(offsets(ax, "estimate"), np.column_stack([tab.condval, np.arange(18)]))
        assert ax.get_title() == term
    # sorted by the first column: the intercepts increase bottom to top
    assert np.all(np.diff(offsets(fig.axes[0], "estimate")[:, 0]) >= 0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == order


def test_caterpillar_bayes_intervals_are_posterior_quantiles(nuts):
    fig = caterpillar_plot(nuts, ci_prob=0.9)
    render(fig)
    d = nuts.posterior["Subject"].to_numpy().reshape(-1, 18, 2)
    order = np.argsort(d[:, :, 0].mean(0))
    seg = np.array(by_gid(fig.axes[1], "interval")[0].get_segments())
    np.testing.assert_allclose(seg[:, 0, 0], np.quantile(d[:, order, 1], 0.05, axis=0))
    np.testing.assert_allclose(seg[:, 1, 0], np.quantile(d[:, order, 1], 0.95, axis=0))
    assert "90% interval" in fig.axes[0].get_xlabel()


def test_caterpillar_for_a_second_factor():
    fit = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin").fit()
    fig = caterpillar_plot(fit, group="sample")
    render(fig)
    est = offsets(fig.axes[0], "estimate")[:, 0]
    np.testing.assert_allclose(np.sort(est), np.sort(fit.ranef()["sample"]["(Intercept)"].to_numpy()))


# --------------------------------------------------------- variance components
def test_variance_plot_reml_lines_sit_at_varcorr(nuts, reml):
    fig = variance_plot(nuts, reml)
    render(fig)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["sd[Subject|(Intercept)]", "sd[Subject|Days]", "corr[Subject|(Intercept),Days]", "sigma"]
    vc = reml.varcorr
    for ax, expected, key in zip(axes, vc.sdcor, ["Subject_sd", "Subject_sd", "Subject_corr", "sigma"]):
        (line,) = by_gid(ax, "reml")
        np.testing.assert_allclose(line.get_xdata(), expected, rtol=1e-12)
        (dens,) = by_gid(ax, "posterior")
        x, y = dens.get_data()
        assert np.trapezoid(y, x) == pytest.approx(1.0, abs=0.03)  # a density
    # each density is over its own draws: the σ panel spans the σ draws
    sig = nuts.posterior["sigma"].to_numpy().ravel()
    x = by_gid(axes[3], "posterior")[0].get_xdata()
    span = sig.max() - sig.min()  # the KDE grid covers the draws' range (bin centres)
    assert 0 <= x.min() - sig.min() < 0.01 * span and 0 <= sig.max() - x.max() < 0.01 * span
    # without a REML fit: densities only
    assert all(by_gid(ax, "reml") == [] for ax in variance_plot(nuts).axes)


def test_variance_plot_rejects_mismatched_fits(nuts, reml):
    with pytest.raises(ModelError, match="BayesFit"):
        variance_plot(reml)
    other = Model("Reaction ~ Days + (1 | Subject)", "sleepstudy").fit()
    with pytest.raises(ModelError, match="not a fit of the same model"):
        variance_plot(nuts, other)
    with pytest.raises(ModelError, match="FreqFit"):
        variance_plot(nuts, nuts)


# ------------------------------------------------------------------------- PPC
def test_ppc_plot_draws_replicates_from_posterior_predictive(nuts):
    fig = ppc_plot(nuts, n_draws=50, random_seed=3)
    render(fig)
    ax = fig.axes[0]
    reps, (obs,) = by_gid(ax, "y_rep"), by_gid(ax, "y")
    assert len(reps) == 50 and len(fig.draw_index) == 50
    y = nuts.spec.y
    grid, pdf, _ = array_stats.kde(y)
    np.testing.assert_allclose(obs.get_xdata(), grid)
    np.testing.assert_allclose(obs.get_ydata(), pdf)
    span = y.max() - y.min()
    assert 0 <= obs.get_xdata().min() - y.min() < 0.01 * span and 0 <= y.max() - obs.get_xdata().max() < 0.01 * span
    flat = nuts.posterior_predictive(random_seed=3).to_numpy().reshape(600, -1)
    for line, i in zip(reps[::10], fig.draw_index[::10]):
        g, p, _ = array_stats.kde(flat[i])
        np.testing.assert_allclose(line.get_ydata(), p)
    assert fig.draw_index[0] == 0 and fig.draw_index[-1] == 599


def test_plot_arguments_are_checked(nuts, reml):
    with pytest.raises(BayesLMMError, match="n_draws"):
        ppc_plot(nuts, n_draws=0)
    with pytest.raises(BayesLMMError, match="n_draws"):
        ppc_plot(nuts, n_draws=601)
    with pytest.raises(ModelError, match="BayesFit"):
        ppc_plot(reml)
    with pytest.raises(BayesLMMError, match="columns"):
        shrinkage_plot(reml, columns=["Days", "day"])
    with pytest.raises(BayesLMMError, match="layout"):
        shrinkage_plot(reml, columns="Days", layout="size")
    with pytest.raises(BayesLMMError, match="prob"):
        caterpillar_plot(reml, ci_prob=95)
    with pytest.raises(BayesLMMError, match="single panel"):
        caterpillar_plot(reml, ax=Figure().subplots())
    with pytest.raises(ModelError, match="group"):
        caterpillar_plot(reml, group="Days")


def test_plots_draw_into_a_given_axes(reml):
    fig = Figure()
    ax = fig.subplots()
    assert shrinkage_plot(reml, ax=ax) is fig
    assert len(offsets(ax, "partial_pooling")) == 18
    render(fig)


def test_many_levels_draw_as_one_arrow_collection_with_the_legend_outside():
    fit = Model("y ~ x + (1 | g)", simulate_lmm(n_groups=400, n_per_group=3, sd_slope=0.0, random_seed=9)).fit()
    fig = shrinkage_plot(fit)
    render(fig)
    ax = fig.axes[0]
    start, end = arrows(ax)
    assert len(start) == 400 and len(by_gid(ax, "shrinkage_arrow")) == 1
    table = fig.pooling_table
    np.testing.assert_allclose(end[:, 0], table[("partial", "(Intercept)")])
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0  # placed right of the axes, not searched for among 800 points


def test_variance_plot_of_an_uncorrelated_block():
    model = Model("Reaction ~ Days + (Days || Subject)", "sleepstudy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nuts = model.fit(method="nuts", draws=300, tune=300, chains=2, random_seed=2, progressbar=False)
    reml = model.fit()
    fig = variance_plot(nuts, reml, ncols=2)
    render(fig)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["sd[Subject|(Intercept)]", "sd[Subject|Days]", "sigma"]
    for ax, expected in zip(axes, reml.varcorr.sdcor):
        np.testing.assert_allclose(by_gid(ax, "reml")[0].get_xdata(), expected, rtol=1e-12)
    sd = nuts.posterior["Subject_sd"].to_numpy()[..., 1].ravel()
    x = by_gid(axes[1], "posterior")[0].get_xdata()
    assert sd.min() <= x.min() and x.max() <= sd.max()
    assert len(fig.axes) == 4 and not fig.axes[3].get_visible()  # 3 panels on a 2 x 2 grid


def test_caterpillar_needs_conditional_variances(reml):
    from dataclasses import replace

    bare = replace(reml, estimates=replace(reml.estimates, b_condvar=[]))
    with pytest.raises(ModelError, match="conditional variances"):
        caterpillar_plot(bare)
