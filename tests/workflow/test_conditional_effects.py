"""Conditional-effects plots: what is drawn is the fit's own prediction on the same grid, for both engines."""

import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from bayeslmm import Model, conditional_effects_plot  # noqa: E402
from bayeslmm.errors import BayesLMMError  # noqa: E402

HAM = "Informed.liking ~ Product*Information + (1|Consumer)"
NUTS = dict(method="nuts", chains=2, draws=200, tune=200, progressbar=False, random_seed=11)


def _fit_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains may warn about ESS; not what is tested here
        return model.fit(**kw)


@pytest.fixture(scope="module")
def ham_model():
    d = pd.read_csv(Path(__file__).parents[1] / "data" / "ham.csv")
    for c in ("Consumer", "Product", "Information"):
        d[c] = d[c].astype(str)
    return Model(HAM, d)


@pytest.fixture(scope="module")
def ham_reml(ham_model):
    return ham_model.fit(method="reml")


@pytest.fixture(scope="module")
def ham_nuts(ham_model):
    return _fit_quietly(ham_model, **NUTS)


@pytest.fixture(scope="module")
def sleep_nuts(sleep_model):
    return _fit_quietly(sleep_model, **NUTS)


def render(fig):
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue()[:4] == b"\x89PNG"


def by_gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def band_edges(coll, xs):
    """(lower, upper) of a fill_between band at ``xs``, read from its polygon's vertices."""
    v = np.concatenate([p.vertices for p in coll.get_paths()])
    lo = np.array([v[np.isclose(v[:, 0], x, rtol=0, atol=1e-12), 1].min() for x in xs])
    hi = np.array([v[np.isclose(v[:, 0], x, rtol=0, atol=1e-12), 1].max() for x in xs])
    return lo, hi


def bar_ends(coll):
    """(x, lower, upper) of each vertical error bar of a vlines collection."""
    seg = np.array([s for s in coll.get_segments()])
    return seg[:, 0, 0], seg[:, :, 1].min(axis=1), seg[:, :, 1].max(axis=1)


def grid_of(table, columns):
    return table[columns].copy()


# ------------------------------------------------------------------ numeric x (sleepstudy)
def test_reml_numeric_x_is_predict_and_the_wald_band(sleep_reml, lme4_reference):
    fig = conditional_effects_plot(sleep_reml, "Days", n_points=25)
    render(fig)
    ax, table = fig.axes[0], fig.conditional_effects
    (line,) = by_gid(ax, "estimate")
    xs, ys = line.get_data()
    grid = grid_of(table, ["Days"])
    np.testing.assert_allclose(xs, np.linspace(0, 9, 25), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ys, sleep_reml.predict(grid, kind="marginal").to_numpy(), rtol=0, atol=1e-10)
    # closed form: x'β̂ ± z·sqrt(x'Cx), x = (1, Days)
    X = np.column_stack([np.ones(25), xs])
    se = np.sqrt(np.einsum("np,pq,nq->n", X, sleep_reml.vcov.to_numpy(), X))
    z = stats.norm.ppf(0.975)
    (band,) = by_gid(ax, "interval")
    lo, hi = band_edges(band, xs)
    np.testing.assert_allclose(lo, ys - z * se, rtol=0, atol=1e-9)
    np.testing.assert_allclose(hi, ys + z * se, rtol=0, atol=1e-9)
    np.testing.assert_allclose(table["lower"], ys - z * se, rtol=0, atol=1e-9)
    # and lme4's numbers at Days = 0: its intercept ± 1.96·SE (reached: 3.6e-7 relative)
    ref = lme4_reference["sleepstudy_corr_reml"]
    b0, se0 = ref["fixef"]["(Intercept)"], ref["fixef_se"]["(Intercept)"]
    np.testing.assert_allclose([ys[0], lo[0], hi[0]], [b0, b0 - z * se0, b0 + z * se0], rtol=1e-5)
    assert table.attrs["kind"] == "marginal" and table.attrs["ci_prob"] == 0.95
    # the data: 180 points, raw Reaction against Days
    (pts,) = by_gid(ax, "data")
    np.testing.assert_array_equal(pts.get_offsets()[:, 1], sleep_reml.spec.y)


def test_reml_conditional_curve_of_one_subject(sleep_reml, lme4_reference):
    fig = conditional_effects_plot(sleep_reml, "Days", kind="conditional", at={"Subject": "308"}, n_points=10)
    ax, table = fig.axes[0], fig.conditional_effects
    xs, ys = by_gid(ax, "estimate")[0].get_data()
    grid = grid_of(table, ["Days", "Subject"])
    assert set(grid["Subject"].astype(str)) == {"308"}
    np.testing.assert_allclose(ys, sleep_reml.predict(grid, kind="conditional").to_numpy(), rtol=0, atol=1e-10)
    # lme4: fixef + ranef of 308
    ref = lme4_reference["sleepstudy_corr_reml"]
    r308 = ref["ranef_head"]["Subject"][0]
    expect = (ref["fixef"]["(Intercept)"] + r308["(Intercept)"]) + (ref["fixef"]["Days"] + r308["Days"]) * xs
    np.testing.assert_allclose(ys, expect, rtol=1e-5)  # reached: 1.2e-7
    # only 308's ten observations are drawn
    (pts,) = by_gid(ax, "data")
    assert len(pts.get_offsets()) == 10
    assert "Subject = 308" in ax.get_title()


def test_nuts_numeric_x_is_predict_and_the_draws_quantiles(sleep_nuts):
    fig = conditional_effects_plot(sleep_nuts, "Days", n_points=12, ci_prob=0.8)
    render(fig)
    ax, table = fig.axes[0], fig.conditional_effects
    xs, ys = by_gid(ax, "estimate")[0].get_data()
    grid = grid_of(table, ["Days"])
    np.testing.assert_allclose(ys, sleep_nuts.predict(grid, kind="marginal")["mean"].to_numpy(), rtol=0, atol=1e-10)
    draws = sleep_nuts.predict_draws(grid, kind="marginal").to_numpy().reshape(-1, len(grid))
    lo_q, hi_q = np.quantile(draws, [0.1, 0.9], axis=0)
    lo, hi = band_edges(by_gid(ax, "interval")[0], xs)
    np.testing.assert_allclose(lo, lo_q, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hi, hi_q, rtol=0, atol=1e-10)
    assert table.attrs["method"] == "NUTS" and table.attrs["ci_prob"] == 0.8


def test_numeric_by_draws_mean_and_one_sd_either_side(sleep_reml):
    d = sleep_reml.spec.data
    m = Model("Reaction ~ Days * x + (1 | Subject)", d.assign(x=np.sin(np.arange(len(d)))))
    fit = m.fit(method="reml")
    fig = conditional_effects_plot(fit, "Days", by="x", n_points=5, data=False)
    table = fig.conditional_effects
    x = np.sin(np.arange(len(d)))
    expect = [x.mean() - x.std(ddof=1), x.mean(), x.mean() + x.std(ddof=1)]
    np.testing.assert_allclose(table["x"].unique(), expect, rtol=1e-12)
    lines = by_gid(fig.axes[0], "estimate")
    assert len(lines) == 3
    for line, (_, rows) in zip(lines, table.groupby("x", sort=False)):
        grid = grid_of(rows, ["Days", "x"])
        np.testing.assert_allclose(line.get_ydata(), fit.predict(grid, kind="marginal").to_numpy(), rtol=0, atol=1e-10)


# ------------------------------------------------------------ factor x, factor by (ham)
def _check_factor_panel(fig, fit, table):
    ax = fig.axes[0]
    points, bars = by_gid(ax, "estimate"), by_gid(ax, "interval")
    assert len(points) == len(bars) == 2  # one per Information level
    drawn_y = np.concatenate([p.get_offsets()[:, 1] for p in points])
    drawn_x = np.concatenate([p.get_offsets()[:, 0] for p in points])
    np.testing.assert_allclose(drawn_x, table["position"], rtol=0, atol=1e-12)
    bar = [bar_ends(b) for b in bars]
    np.testing.assert_allclose(np.concatenate([b[0] for b in bar]), table["position"], rtol=0, atol=1e-12)
    # dodged: the two Information levels sit either side of each Product tick
    assert (table["position"].to_numpy()[4:] - table["position"].to_numpy()[:4] > 0.3).all()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
    return drawn_y, np.concatenate([b[1] for b in bar]), np.concatenate([b[2] for b in bar])


def test_reml_factor_x_by_factor_is_predict_and_the_wald_bars(ham_reml):
    fig = conditional_effects_plot(ham_reml, "Product", by="Information")
    render(fig)
    table = fig.conditional_effects
    assert list(table["Product"]) == ["1", "2", "3", "4"] * 2 and list(table["Information"]) == ["1"] * 4 + ["2"] * 4
    y, lo, hi = _check_factor_panel(fig, ham_reml, table)
    grid = grid_of(table, ["Product", "Information"])
    np.testing.assert_allclose(y, ham_reml.predict(grid, kind="marginal").to_numpy(), rtol=0, atol=1e-10)
    # the cell means of a treatment-coded Product*Information: β0 + β_P + β_I + β_PI
    b = ham_reml.fixef
    assert y[5] == pytest.approx(b["(Intercept)"] + b["Product[2]"] + b["Information[2]"]
                                 + b["Product[2]:Information[2]"], abs=1e-10)
    C = ham_reml.vcov.to_numpy()
    X = np.zeros((8, 8))
    X[:, 0] = 1
    for i in range(8):
        p, info = i % 4, i // 4
        if p:
            X[i, p] = 1
        if info:
            X[i, 4] = 1
            if p:
                X[i, 4 + p] = 1
    se = np.sqrt(np.einsum("np,pq,nq->n", X, C, X))
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(lo, y - z * se, rtol=0, atol=1e-9)
    np.testing.assert_allclose(hi, y + z * se, rtol=0, atol=1e-9)


def test_nuts_factor_x_by_factor_is_predict_and_the_draws_quantiles(ham_nuts):
    fig = conditional_effects_plot(ham_nuts, "Product", by="Information")
    render(fig)
    table = fig.conditional_effects
    y, lo, hi = _check_factor_panel(fig, ham_nuts, table)
    grid = grid_of(table, ["Product", "Information"])
    np.testing.assert_allclose(y, ham_nuts.predict(grid, kind="marginal")["mean"].to_numpy(), rtol=0, atol=1e-10)
    draws = ham_nuts.predict_draws(grid, kind="marginal").to_numpy().reshape(-1, 8)
    prob = ham_nuts.default_ci_prob
    lo_q, hi_q = np.quantile(draws, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    np.testing.assert_allclose(lo, lo_q, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hi, hi_q, rtol=0, atol=1e-10)


def test_nuts_prediction_interval_is_wider_and_holds_sigma(ham_nuts):
    mean = conditional_effects_plot(ham_nuts, "Product", data=False).conditional_effects
    pred = conditional_effects_plot(ham_nuts, "Product", interval="prediction", random_seed=5,
                                    data=False).conditional_effects
    np.testing.assert_allclose(pred["estimate"], mean["estimate"], rtol=0, atol=1e-12)
    width = (pred["upper"] - pred["lower"]).to_numpy()
    # σε dominates: the 89 % interval of N(·, σ²) is 2·1.598·σ wide (reached: within 2.6 %, seed 11)
    sigma = ham_nuts.sigma
    np.testing.assert_allclose(width, 2 * stats.norm.ppf(0.945) * sigma, rtol=0.15)
    assert (width > 2 * (mean["upper"] - mean["lower"]).to_numpy()).all()  # reached: ≥ 7.9 times


def test_at_overrides_the_held_values(ham_reml):
    table = conditional_effects_plot(ham_reml, "Product", at={"Information": "2"}, data=False).conditional_effects
    assert set(table["Information"]) == {"2"} and table.attrs["held"] == {"Information": "2"}
    default = conditional_effects_plot(ham_reml, "Product", data=False).conditional_effects
    assert set(default["Information"]) == {"1"}  # the reference level, as brms


def test_ax_draws_into_the_given_axes(sleep_reml):
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    out = conditional_effects_plot(sleep_reml, "Days", ax=ax)
    assert out is fig and len(by_gid(ax, "estimate")) == 1
    with pytest.raises(BayesLMMError, match="Axes"):
        conditional_effects_plot(sleep_reml, "Days", ax="not an axes")


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(x="Age"), "'Age' is not a predictor of the fixed effects"),
    (dict(x="Informed.liking"), "is the response"),
    (dict(x="Consumer"), "grouping factor.*kind='conditional'"),
    (dict(x="Product", by="Product"), "`by` must differ"),
    (dict(x="Product", by="Gender"), "'Gender' is not a predictor"),
    (dict(x="Product", at={"Information": "7"}), r"'7' is not a level of 'Information'.*levels: 1, 2"),
    (dict(x="Product", at={"Product": "1"}), "which the plot varies"),
    (dict(x="Product", at={"Age": 30}), "'Age', which this prediction does not use"),
    (dict(x="Product", at={"Consumer": "1"}), "grouping factors need kind='conditional'"),
    (dict(x="Product", kind="conditional"), r"name its level of 'Consumer' in `at`"),
    (dict(x="Product", kind="conditional", at={"Consumer": "999"}), "not a level of 'Consumer'"),
    (dict(x="Product", kind="population"), "`kind` must be"),
    (dict(x="Product", interval="prediction"), "needs posterior predictive draws"),
    (dict(x="Product", interval="credible"), "`interval` must be"),
    (dict(x="Product", ci_prob=1.5), "ci_prob"),
    (dict(x="Product", n_points=1), "n_points"),
    (dict(x="Product", at=["Information"]), "`at` must be a dict"),
])
def test_bad_input_says_what_is_wrong(ham_reml, kwargs, message):
    with pytest.raises(BayesLMMError, match=message):
        conditional_effects_plot(ham_reml, **kwargs)


def test_numeric_at_value_must_be_a_number(sleep_reml):
    d = sleep_reml.spec.data
    fit = Model("Reaction ~ Days + x + (1 | Subject)", d.assign(x=np.cos(np.arange(len(d))))).fit()
    with pytest.raises(BayesLMMError, match=r"`at\['x'\]` must be a finite number"):
        conditional_effects_plot(fit, "Days", at={"x": "high"})
    table = conditional_effects_plot(fit, "Days", at={"x": 0.5}, n_points=3).conditional_effects
    np.testing.assert_allclose(table["estimate"], fit.predict(table[["Days", "x"]], kind="marginal"), atol=1e-10)


def test_a_fit_loaded_from_a_file_plots_the_same(sleep_reml, tmp_path):
    from bayeslmm import load

    path = tmp_path / "sleep.nc"
    sleep_reml.save(path)
    cols = ["estimate", "lower", "upper"]
    before = conditional_effects_plot(sleep_reml, "Days", n_points=7).conditional_effects[cols]
    after = conditional_effects_plot(load(path), "Days", n_points=7).conditional_effects[cols]
    np.testing.assert_allclose(after.to_numpy(), before.to_numpy(), rtol=0, atol=1e-10)


def test_nuts_conditional_points_of_one_consumer(ham_nuts):
    fig = conditional_effects_plot(ham_nuts, "Product", kind="conditional", at={"Consumer": "5"})
    table = fig.conditional_effects
    grid = grid_of(table, ["Product", "Information", "Consumer"])
    (points,) = by_gid(fig.axes[0], "estimate")
    expect = ham_nuts.predict(grid, kind="conditional")["mean"].to_numpy()
    np.testing.assert_allclose(points.get_offsets()[:, 1], expect, rtol=0, atol=1e-10)
    # consumer 5's effect moves every point by the same amount away from the population's
    population = ham_nuts.predict(grid, kind="marginal")["mean"].to_numpy()
    shift = expect - population
    np.testing.assert_allclose(shift, shift[0], rtol=0, atol=1e-10)
    assert abs(shift[0]) > 0.05  # reached: 0.48 (seed 11)
    (pts,) = by_gid(fig.axes[0], "data")
    assert len(pts.get_offsets()) == 8  # consumer 5's rows only
