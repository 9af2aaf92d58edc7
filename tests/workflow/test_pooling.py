"""pooling_table: complete, no and partial pooling checked against independent computations."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import Model
from bayeslmm.datasets import load_dataset
from bayeslmm.errors import BayesLMMError, ModelError
from bayeslmm.pooling import pooling_table
from bayeslmm.simulate import simulate_doctors, simulate_lmm

DOCTORS_FORMULA = "mobility ~ age + married + sex + rbc + wbc + (1 | doctor)"


@pytest.fixture(scope="module")
def sleep():
    df = load_dataset("sleepstudy")
    fit = Model("Reaction ~ Days + (Days | Subject)", df).fit(method="reml")
    return df, fit


@pytest.fixture(scope="module")
def doctors():
    df = simulate_doctors(random_seed=11)
    return df, Model(DOCTORS_FORMULA, df).fit(method="reml")


@pytest.fixture(scope="module")
def sleep_nuts(sleep):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Model("Reaction ~ Days + (Days | Subject)", sleep[0]).fit(
            method="nuts", draws=300, tune=300, chains=2, random_seed=3, progressbar=False)


def per_level_ols(df, group, y, xcols):
    """Each level's OLS by numpy.lstsq (intercept plus xcols), in the level order given by the data."""
    out = {}
    for level, rows in df.groupby(group, observed=True, sort=False):
        A = np.column_stack([np.ones(len(rows))] + [rows[c].to_numpy(float) for c in xcols])
        out[str(level)] = np.linalg.lstsq(A, rows[y].to_numpy(float), rcond=None)[0]
    return pd.DataFrame(out).T


# ------------------------------------------------------------------ sleepstudy
def test_sleepstudy_no_pooling_is_per_subject_ols(sleep):
    df, fit = sleep
    table = pooling_table(fit)
    expected = per_level_ols(df, "Subject", "Reaction", ["Days"]).loc[table.index]
    np.testing.assert_allclose(table["no_pooling"].to_numpy(), expected.to_numpy(), rtol=1e-10)
    # with no covariates besides the block's columns, lmList-style fitting is the same thing
    separate = pooling_table(fit, no_pooling="separate")
    np.testing.assert_allclose(separate["no_pooling"].to_numpy(), expected.to_numpy(), rtol=1e-10)
    assert (table["n"] == 10).all() and len(table) == 18
    assert (table["note"] == "").all()


def test_sleepstudy_partial_pooling_is_coef_and_complete_is_ols(sleep):
    df, fit = sleep
    table = pooling_table(fit)
    coef = fit.coef()["Subject"]
    np.testing.assert_allclose(table["partial"].to_numpy(), coef.loc[table.index, ["(Intercept)", "Days"]].to_numpy(),
                               rtol=1e-12)
    X = np.column_stack([np.ones(len(df)), df["Days"]])
    ols = np.linalg.lstsq(X, df["Reaction"].to_numpy(float), rcond=None)[0]
    np.testing.assert_allclose(table["complete"].to_numpy(), np.tile(ols, (18, 1)), rtol=1e-10)
    assert table.attrs["population"] == pytest.approx(fit.fixef.to_dict(), rel=1e-12)
    # no group-level predictors: every subject's population line is the fixed effects
    np.testing.assert_allclose(table["population"].to_numpy(), np.tile(fit.fixef.to_numpy(), (18, 1)), rtol=1e-12)
    assert table.attrs["group_level"] == [] and table.attrs["shared"] == {}
    assert table.attrs["method"] == "REML" and table.attrs["group"] == "Subject"
    # shrinkage is the fraction of the way from no pooling to the population value
    pop = fit.fixef.to_numpy()
    np_, pp = table["no_pooling"].to_numpy(), table["partial"].to_numpy()
    np.testing.assert_allclose(table["shrinkage"].to_numpy(), (np_ - pp) / (np_ - pop), rtol=1e-12)
    # the partial-pooling estimates are pulled together: less spread than no pooling
    assert (table["partial"].std() < table["no_pooling"].std()).all()


def test_model_is_fitted_by_reml(sleep):
    df, fit = sleep
    from_model = pooling_table(Model("Reaction ~ Days + (Days | Subject)", df))
    pd.testing.assert_frame_equal(from_model, pooling_table(fit))


def test_two_blocks_on_one_factor_are_gathered():
    fit = Model("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", "sleepstudy").fit()
    table = pooling_table(fit)
    assert table.attrs["columns"] == ["(Intercept)", "Days"]
    coef = fit.coef()["Subject"]
    np.testing.assert_allclose(table["partial"].to_numpy(), coef.loc[table.index, ["(Intercept)", "Days"]].to_numpy(),
                               rtol=1e-12)


# --------------------------------------------------------------------- doctors
def test_random_intercept_shrinkage_has_its_closed_form():
    """No covariates: no pooling is the level mean and shrinkage is σ²/(σ² + n_j σ_b²) exactly."""
    df = simulate_doctors(n_doctors=80, target_patients=None, random_seed=5)
    fit = Model("mobility ~ 1 + (1 | doctor)", df).fit()
    table = pooling_table(fit)
    means = df.groupby("doctor", observed=True)["mobility"].mean()
    means.index = means.index.astype(str)
    np.testing.assert_allclose(table[("no_pooling", "(Intercept)")], means.loc[table.index], rtol=1e-12)
    vc = fit.varcorr
    s2, sb2 = fit.sigma**2, vc.loc[vc.grp == "doctor", "vcov"].item()
    n = table["n"].to_numpy()
    np.testing.assert_allclose(table[("shrinkage", "(Intercept)")], s2 / (s2 + n * sb2), rtol=1e-6)
    assert table["n"].sum() == len(df)


def test_doctors_no_pooling_matches_indicator_regression(doctors):
    """'shared': per-doctor intercepts with common covariate slopes = one OLS on doctor indicators."""
    df, fit = doctors
    table = pooling_table(fit)
    covs = ["age", "married", "sex", "rbc", "wbc"]
    codes = df["doctor"].cat.codes.to_numpy()
    indicators = np.zeros((len(df), codes.max() + 1))
    indicators[np.arange(len(df)), codes] = 1.0
    A = np.column_stack([indicators, df[covs].to_numpy(float)])
    sol = np.linalg.lstsq(A, df["mobility"].to_numpy(float), rcond=None)[0]
    levels = [str(c) for c in df["doctor"].cat.categories]
    np.testing.assert_allclose(table.loc[levels, ("no_pooling", "(Intercept)")], sol[:-5], rtol=1e-8)
    np.testing.assert_allclose(list(table.attrs["shared"].values()), sol[-5:], rtol=1e-8)
    assert list(table.attrs["shared"]) == covs
    ols = np.linalg.lstsq(np.column_stack([np.ones(len(df)), df[covs]]), df["mobility"].to_numpy(float),
                          rcond=None)[0]
    assert table[("complete", "(Intercept)")].iloc[0] == pytest.approx(ols[0], rel=1e-10)


def test_doctors_with_fewer_patients_shrink_more(doctors):
    df, fit = doctors
    table = pooling_table(fit)
    n, s = table["n"], table[("shrinkage", "(Intercept)")]
    assert n.min() == 2 and n.max() == 40 and len(table) == 407
    rho = stats.spearmanr(n, s).statistic
    assert rho < -0.6  # a ratio: noisy for doctors whose own estimate happens to sit near the population
    small, large = s[n <= 5].median(), s[n >= 30].median()
    assert small > 0.3 and large < 0.1 and small > 3 * large
    # the distance moved is largest for small doctors too
    moved = (table[("no_pooling", "(Intercept)")] - table[("partial", "(Intercept)")]).abs()
    assert moved[n <= 5].mean() > 3 * moved[n >= 30].mean()


def test_separate_no_pooling_is_lmlist_with_nan_for_small_levels(doctors):
    df, fit = doctors
    table = pooling_table(fit, no_pooling="separate")
    covs = ["age", "married", "sex", "rbc", "wbc"]
    col = table[("no_pooling", "(Intercept)")]
    small = table["n"] < 6  # six coefficients: a doctor with fewer patients cannot estimate them
    X = np.column_stack([np.ones(len(df)), df[covs].to_numpy(float)])
    codes = df["doctor"].astype(str).to_numpy()
    rank = {lev: np.linalg.matrix_rank(X[codes == lev]) for lev in table.index}
    full_rank = pd.Series({lev: r == 6 for lev, r in rank.items()})
    # the intercept is estimable iff the unit vector e_0 lies in the row space of the doctor's X
    e0 = np.eye(6)[:1]
    estimable = pd.Series({lev: np.linalg.matrix_rank(np.vstack([X[codes == lev], e0])) == r
                           for lev, r in rank.items()})
    collinear = ~small & ~estimable  # e.g. all of a doctor's patients married
    assert small.sum() > 0 and collinear.sum() > 0 and (estimable & ~full_rank).sum() > 0
    assert col[~estimable].isna().all() and col[estimable].notna().all()
    assert table.loc[small & ~estimable, "note"].str.contains("fewer observations").all()
    assert table.loc[collinear, "note"].str.contains("collinear").all()
    assert (table.loc[estimable, "note"] == "").all()
    assert table[("shrinkage", "(Intercept)")][~estimable].isna().all()
    assert table[("partial", "(Intercept)")].notna().all()
    big = table.index[full_rank][:5]
    expected = per_level_ols(df[df["doctor"].astype(str).isin(big)], "doctor", "mobility", covs)
    np.testing.assert_allclose(col.loc[big], expected.loc[big, 0], rtol=1e-8)


# ----------------------------------------------------------- unestimable levels
def test_levels_that_cannot_be_estimated_get_nan_and_a_note():
    df = simulate_lmm(n_groups=12, n_per_group=8, random_seed=2)
    g = df["g"].astype(str)
    df = df[(g != "1") | (df.groupby("g", observed=True).cumcount() == 0)].copy()  # level 1: one row
    df.loc[df["g"].astype(str) == "2", "x"] = 0.7  # level 2: x constant
    df.loc[df["g"].astype(str) == "3", "x"] = 0.0  # level 3: x constant at 0, intercept still estimable
    fit = Model("y ~ x + (1 + x | g)", df).fit()
    table = pooling_table(fit)
    npool = table["no_pooling"]
    assert npool.loc["1"].isna().all() and "fewer observations (1)" in table.loc["1", "note"]
    assert npool.loc["2"].isna().all() and "collinear" in table.loc["2", "note"]
    assert np.isnan(npool.loc["3", "x"]) and "x not estimable" in table.loc["3", "note"]
    y3 = df.loc[df["g"].astype(str) == "3", "y"]
    assert npool.loc["3", "(Intercept)"] == pytest.approx(y3.mean(), rel=1e-10)
    rest = [lev for lev in table.index if lev not in ("1", "2", "3")]
    assert npool.loc[rest].notna().all().all() and (table.loc[rest, "note"] == "").all()
    assert table["partial"].notna().all().all()
    expected = per_level_ols(df[df["g"].astype(str).isin(rest)], "g", "y", ["x"]).loc[rest]
    np.testing.assert_allclose(npool.loc[rest].to_numpy(), expected.to_numpy(), rtol=1e-10)


# --------------------------------------------------------- other model shapes
def test_other_factor_and_random_only_column():
    fit = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin").fit()
    table = pooling_table(fit, group="sample")
    df = load_dataset("Penicillin")
    means = df.groupby("sample", observed=True)["diameter"].mean()
    np.testing.assert_allclose(table[("no_pooling", "(Intercept)")], means.loc[table.index], rtol=1e-12)
    assert len(table) == 6 and (table["n"] == 24).all()
    np.testing.assert_allclose(table[("partial", "(Intercept)")],
                               fit.coef()["sample"].loc[table.index, "(Intercept)"], rtol=1e-12)

    # a random slope without a fixed slope: population and complete pooling of Days are 0
    sleep = load_dataset("sleepstudy")
    fit = Model("Reaction ~ 1 + (0 + Days | Subject)", sleep).fit()
    table = pooling_table(fit)
    assert table.attrs["population"]["Days"] == 0.0 and (table[("complete", "Days")] == 0).all()
    codes = sleep["Subject"].astype(str)
    levels = list(table.index)
    A = np.column_stack([np.ones(len(sleep))] + [sleep["Days"].to_numpy(float) * (codes == lev) for lev in levels])
    sol = np.linalg.lstsq(A, sleep["Reaction"].to_numpy(float), rcond=None)[0]
    np.testing.assert_allclose(table[("no_pooling", "Days")], sol[1:], rtol=1e-8)
    assert table.attrs["shared"]["(Intercept)"] == pytest.approx(sol[0], rel=1e-8)
    np.testing.assert_allclose(table[("partial", "Days")], fit.coef()["Subject"].loc[levels, "Days"], rtol=1e-12)


# ------------------------------------------------------------------- Bayesian
def test_bayes_partial_pooling_is_posterior_mean(sleep, sleep_nuts):
    fit = sleep_nuts
    table = pooling_table(fit)
    post = fit.posterior
    draws = post["beta"].to_numpy()[:, :, None, :] + post[fit.names[0]].to_numpy()
    np.testing.assert_allclose(table["partial"].to_numpy(), draws.mean(axis=(0, 1)), rtol=1e-12)
    assert table.attrs["method"] == "NUTS"
    coef = fit.coef()["Subject"]  # BayesFit's own coef(): the same posterior means
    np.testing.assert_allclose(table["partial"].to_numpy(), coef.loc[table.index, ["(Intercept)", "Days"]].to_numpy(),
                               rtol=1e-12)
    assert table.attrs["population"]["Days"] == pytest.approx(post["beta"].sel(coef="Days").mean().item())
    reml = pooling_table(sleep[1])
    pd.testing.assert_frame_equal(table["no_pooling"], reml["no_pooling"])
    # the posterior means sit near lme4's conditional modes (posterior sd of a subject's slope is ~2.5)
    assert np.abs(table[("partial", "Days")] - reml[("partial", "Days")]).max() < 1.5
    assert np.corrcoef(table[("partial", "(Intercept)")], reml[("partial", "(Intercept)")])[0, 1] > 0.98


# ---------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors(sleep):
    _, fit = sleep
    with pytest.raises(ModelError, match=r"`group`.*'Subject'.*Did you mean 'Subject'"):
        pooling_table(fit, group="subject")
    with pytest.raises(ModelError, match="no_pooling"):
        pooling_table(fit, no_pooling="lmlist")
    with pytest.raises(ModelError, match="FreqFit"):
        pooling_table(pd.DataFrame())
    assert issubclass(ModelError, BayesLMMError)

# a group-level covariate (exam's schavg) is part of each level's line: tests/workflow/test_pooling_real_data.py
