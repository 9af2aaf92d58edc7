"""Degenerate data: singular and boundary fits are fitted, flagged and finite, in both engines.

Where a boundary optimum has a closed form the tests hold the engine to it: at θ = 0 a
linear mixed model is a linear regression, so β̂ is OLS, σ̂² = RSS/(n − p) (REML) or
RSS/n (ML), and the criterion is the regression's; for a balanced one-way layout REML
is the ANOVA estimator (Searle, Casella & McCulloch 1992, *Variance Components*, §3.7
and §6.8).  The Bayesian engine runs on the same data with tiny draws: its draws are
finite and its diagnostics come as warnings, never exceptions.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model
from bayeslmm.errors import ModelError
from bayeslmm.reml.deviance import ProfiledDeviance

# Dyestuff2 (Box & Tiao 1973, Table 5.1.4; lme4's Dyestuff2): simulated yields whose
# between-batch variance is estimated as zero.  lme4: REML criterion 161.8, intercept
# 5.6656, residual sd 3.716, batch sd 0 (Bates, lme4 book, ch. 1).
DYESTUFF2 = pd.DataFrame({
    "Yield": [7.298, 3.846, 2.434, 9.566, 7.990, 5.220, 6.556, 0.608, 11.788, -0.892,
              0.110, 10.386, 13.434, 5.510, 8.166, 2.212, 4.852, 7.092, 9.288, 4.980,
              0.282, 9.014, 4.458, 9.446, 7.198, 1.722, 4.782, 8.106, 0.758, 3.758],
    "Batch": np.repeat(list("ABCDEF"), 5),
})

NUTS = dict(draws=200, tune=200, chains=2, random_seed=11, progressbar=False)


def regression_criteria(y: np.ndarray, X: np.ndarray) -> dict:
    """OLS and the REML / ML criteria of the linear regression (an LMM at θ = 0)."""
    n, p = X.shape
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    rss = float(np.sum((y - X @ beta) ** 2))
    logdet = float(np.linalg.slogdet(X.T @ X)[1])
    return {
        "beta": beta,
        "sigma_reml": np.sqrt(rss / (n - p)),
        "sigma_ml": np.sqrt(rss / n),
        "reml": logdet + (n - p) * (1 + np.log(2 * np.pi * rss / (n - p))),
        "ml": n * (1 + np.log(2 * np.pi * rss / n)),
    }


def orthogonal_noise(rng, g: np.ndarray, columns: list[np.ndarray], scale: float = 1.0) -> np.ndarray:
    """Noise orthogonal, within every group, to the given columns.

    Then the groups' own regressions of the noise on those columns are all zero, so no
    random effect on those columns can explain any of it: their variances are 0 at the
    optimum, exactly.
    """
    e = rng.normal(scale=scale, size=len(g))
    for j in np.unique(g):
        rows = g == j
        B = np.column_stack([c[rows] for c in columns])
        e[rows] -= B @ np.linalg.lstsq(B, e[rows], rcond=None)[0]
    return e


def finite_fit(fit) -> None:
    for value in (fit.objective, fit.sigma, fit.loglik, fit.aic):
        assert np.isfinite(value)
    assert np.all(np.isfinite(fit.theta))
    assert np.all(np.isfinite(fit.fixef.to_numpy())) and np.all(np.isfinite(fit.fixef_se.to_numpy()))
    assert np.all(np.isfinite(fit.varcorr["sdcor"].to_numpy(dtype=float)))
    for frame in fit.ranef().values():
        assert np.all(np.isfinite(frame.to_numpy()))
    assert "nan" not in str(fit.summary()).lower()


def finite_posterior(fit) -> None:
    post = fit.idata.posterior
    for name in post.data_vars:
        assert np.all(np.isfinite(post[name].to_numpy())), name


def fit_nuts(model, **kwargs):
    """A tiny NUTS run: only warnings may come out (diagnostics), never an exception."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit = model.fit(method="nuts", **{**NUTS, **kwargs})
    for w in record:
        assert issubclass(w.category, UserWarning), (w.category, w.message)
    return fit


# --------------------------------------------------------------------------------------
# a variance at zero: Dyestuff2
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dyestuff2() -> Model:
    return Model("Yield ~ 1 + (1 | Batch)", DYESTUFF2)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_dyestuff2_batch_variance_is_zero_and_flagged(dyestuff2, method):
    fit = dyestuff2.fit(method=method)
    ref = regression_criteria(DYESTUFF2["Yield"].to_numpy(), np.ones((30, 1)))
    assert fit.singular
    assert fit.theta[0] == 0.0  # on the bound, not a hair above it
    assert fit.objective == pytest.approx(ref[method], rel=1e-10)
    assert fit.sigma == pytest.approx(ref[f"sigma_{method}"], rel=1e-10)
    assert fit.fixef["(Intercept)"] == pytest.approx(5.6656, abs=1e-10)
    if method == "reml":
        assert fit.objective == pytest.approx(161.8, abs=0.05)     # lme4's printed value
        assert fit.sigma == pytest.approx(3.716, abs=5e-4)
    np.testing.assert_array_equal(fit.ranef()["Batch"].to_numpy(), 0.0)
    finite_fit(fit)


def test_dyestuff2_nuts_runs_and_shrinks_the_batch_sd(dyestuff2):
    fit = fit_nuts(dyestuff2)
    finite_posterior(fit)
    post = fit.idata.posterior
    sd = post["Batch_sd"].to_numpy()
    sigma = post["sigma"].to_numpy()
    assert np.all(sd > 0) and np.all(sigma > 0)
    assert np.median(sd) < 0.5 * np.median(sigma)  # the batches barely differ
    assert abs(float(post["beta"].mean()) - 5.6656) < 1.5


# --------------------------------------------------------------------------------------
# every variance at zero: (x | g) on data the groups cannot explain
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_group_variation() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(8), 7)
    x = rng.normal(size=len(g))
    e = orthogonal_noise(rng, g, [np.ones(len(g)), x])
    return pd.DataFrame({"y": 1.0 + 2.0 * x + e, "x": x, "g": g})


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("formula", ["y ~ x + (x | g)", "y ~ x + (x || g)"])
def test_all_variances_zero_is_a_linear_regression(no_group_variation, method, formula):
    d = no_group_variation
    fit = Model(formula, d).fit(method=method)
    ref = regression_criteria(d["y"].to_numpy(), np.column_stack([np.ones(len(d)), d["x"]]))
    assert fit.singular
    np.testing.assert_allclose(fit.theta, 0.0, atol=1e-5)
    np.testing.assert_allclose(fit.fixef.to_numpy(), [1.0, 2.0], atol=1e-10)
    np.testing.assert_allclose(fit.fixef.to_numpy(), ref["beta"], atol=1e-10)
    assert fit.objective == pytest.approx(ref[method], rel=1e-9)
    assert fit.sigma == pytest.approx(ref[f"sigma_{method}"], rel=1e-6)
    finite_fit(fit)


def test_all_variances_zero_nuts(no_group_variation):
    fit = fit_nuts(Model("y ~ x + (x | g)", no_group_variation))
    finite_posterior(fit)
    corr = fit.idata.posterior["g_corr"].to_numpy()
    assert np.all(np.abs(corr) <= 1 + 1e-12)
    assert np.median(fit.idata.posterior["g_sd"].to_numpy()) < np.median(fit.idata.posterior["sigma"].to_numpy())


# --------------------------------------------------------------------------------------
# a correlation at ±1, and a random slope with no variance
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def perfect_correlation() -> pd.DataFrame:
    """Slopes that are exactly 0.8 × the intercepts: REML puts the correlation at +1."""
    rng = np.random.default_rng(1)
    k, m = 8, 6
    g = np.repeat(np.arange(k), m)
    x = np.tile(np.linspace(-1, 1, m), k)
    b0 = rng.normal(size=k)
    y = 1 + 0.5 * x + b0[g] + 0.8 * b0[g] * x + 0.3 * rng.normal(size=k * m)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def test_correlation_at_one_is_a_boundary_optimum(perfect_correlation):
    model = Model("y ~ x + (x | g)", perfect_correlation)
    fit = model.fit(method="reml")
    assert fit.singular
    assert fit.theta[2] == 0.0  # the slope's own direction of T collapsed
    corr = fit.varcorr["sdcor"].to_numpy(dtype=float)[2]
    assert corr == pytest.approx(1.0, abs=1e-12)
    finite_fit(fit)
    # no feasible step from θ̂ improves the criterion: a true boundary optimum
    dev = ProfiledDeviance(model.spec, model.crossprods, reml=True)
    rng = np.random.default_rng(0)
    for _ in range(40):
        step = rng.normal(size=3) * 1e-3
        trial = np.maximum(fit.theta + step, model.spec.theta_lower)
        assert dev(trial) >= fit.objective - 1e-9


def test_correlation_at_one_nuts(perfect_correlation):
    fit = fit_nuts(Model("y ~ x + (x | g)", perfect_correlation))
    finite_posterior(fit)
    corr = fit.idata.posterior["g_corr"].to_numpy()[..., 0]  # the one distinct correlation
    assert np.all(np.abs(corr) <= 1 + 1e-12)
    assert np.median(corr) > 0.5  # the posterior leans to the boundary REML found


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_random_slope_without_variance(method):
    """Group intercepts but identical slopes: the slope's variance is 0, the intercept's is not."""
    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(10), 8)
    x = rng.normal(size=len(g))
    b0 = rng.normal(scale=2.0, size=10)
    y = 3.0 - x + b0[g] + orthogonal_noise(rng, g, [np.ones(len(g)), x])
    d = pd.DataFrame({"y": y, "x": x, "g": g})
    fit = Model("y ~ x + (x || g)", d).fit(method=method)
    assert fit.singular
    theta = dict(zip(fit.spec.theta_labels(), fit.theta))
    assert theta["g.x"] < 1e-5 and theta["g.(Intercept)"] > 0.5
    ranef = fit.ranef()["g"]
    np.testing.assert_allclose(ranef["x"], 0.0, atol=1e-4)   # every group's own slope is the same
    assert ranef["(Intercept)"].std() > 0.5
    finite_fit(fit)


# --------------------------------------------------------------------------------------
# crossed factors, one of them without variance
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crossed_one_without_variance() -> Model:
    rng = np.random.default_rng(3)
    a = np.repeat(np.arange(12), 4)
    b = np.tile(np.arange(4), 12)
    y = 10 + rng.normal(scale=2.0, size=12)[a] + orthogonal_noise(rng, b, [np.ones(len(b))])
    return Model("y ~ 1 + (1 | a) + (1 | b)", pd.DataFrame({"y": y, "a": a, "b": b}))


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_crossed_factor_without_variance(crossed_one_without_variance, method):
    fit = crossed_one_without_variance.fit(method=method)
    theta = dict(zip(fit.spec.theta_labels(), fit.theta))
    assert fit.singular and theta["b.(Intercept)"] == 0.0 and theta["a.(Intercept)"] > 0.5
    finite_fit(fit)


@pytest.mark.slow  # the crossed model's PyTensor graph takes ~30 s to compile on this machine
def test_crossed_factor_without_variance_nuts(crossed_one_without_variance):
    finite_posterior(fit_nuts(crossed_one_without_variance))


def test_dyestuff2_explicit_parameterisation(dyestuff2):
    """The general PyMC graph (non-centred effects, likelihood over the rows) at a zero variance."""
    fit = fit_nuts(dyestuff2, route="graph-explicit")
    finite_posterior(fit)
    assert np.median(fit.idata.posterior["Batch_sd"].to_numpy()) < 0.5 * np.median(
        fit.idata.posterior["sigma"].to_numpy())


# --------------------------------------------------------------------------------------
# the other end: huge and exact fits, and the optimizer's budget (bugs found here)
# --------------------------------------------------------------------------------------


def test_huge_between_group_variance_matches_anova():
    """Regression: θ̂ above ~1000 made nlopt raise invalid_argument (the padded coordinate of a
    one-parameter BOBYQA got a restart step wider than its bounds).

    At θ ≈ 4000 the Schur complement loses about 8 digits to cancellation (W_j = θ²/(1 + mθ²)
    against 1/m), so the criterion's numerical minimum sits 2e-5 from the ANOVA value.
    """
    rng = np.random.default_rng(1)
    k, m = 8, 5
    g = np.repeat(np.arange(k), m)
    y = 5000 * rng.normal(size=k)[g] + rng.normal(size=k * m)
    fit = Model("y ~ 1 + (1 | g)", pd.DataFrame({"y": y, "g": g})).fit(method="reml")
    means = y.reshape(k, m).mean(axis=1)
    msw = np.sum((y.reshape(k, m) - means[:, None]) ** 2) / (k * (m - 1))
    msb = m * np.sum((means - y.mean()) ** 2) / (k - 1)
    assert fit.sigma == pytest.approx(np.sqrt(msw), rel=2e-5)
    assert fit.theta[0] == pytest.approx(np.sqrt((msb - msw) / m / msw), rel=1e-4)
    assert fit.theta[0] > 1000


def test_maxeval_bounds_every_pass():
    """Regression: each pass got max(maxeval - used, 10) evaluations, so maxeval=1 ran 20."""
    model = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    for maxeval in (1, 7, 25):
        with pytest.warns(UserWarning, match=rf"optimizer stopped after \d+ evaluations \(maxeval={maxeval}\)"):
            fit = model.fit(method="reml", maxeval=maxeval)
        assert fit.optimization.n_evaluations <= maxeval + model.spec.n_theta
        finite_fit(fit)
    full = model.fit(method="reml")
    assert full.optimization.n_evaluations < 1000 and not full.optimization.warnings


def test_response_reproduced_exactly_is_refused():
    # (an exact fit used to return σ and θ of rounding with a warning; now every method refuses it:
    # tests/bayes/test_scale_exact.py has the measurements)
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(6), 5)
    x = rng.normal(size=30)
    d = pd.DataFrame({"y": 1 + 0.5 * x + rng.normal(size=6)[g], "x": x, "g": g})
    for method in ("reml", "ml", "nuts"):
        with pytest.raises(ModelError, match=r"reproduce the response exactly.*no residual variation"):
            Model("y ~ x + (1 | g)", d).fit(method=method)


def test_ordinary_fits_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for formula, data in [("Reaction ~ Days + (Days | Subject)", "sleepstudy"),
                              ("normexam ~ standLRT + (standLRT | school)", "exam"),
                              ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin"),
                              ("Yield ~ 1 + (1 | Batch)", "Dyestuff")]:
            Model(formula, data).fit(method="reml")
