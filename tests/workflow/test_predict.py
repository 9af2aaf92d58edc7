"""Predictions of both fits, on sleepstudy: training rows, new data, new groups, bad input."""

import numpy as np
import pandas as pd
import pytest

from bayeslmm import BayesLMMError, DataError, Model


@pytest.fixture(scope="module")
def sleep_model():
    return Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")


@pytest.fixture(scope="module")
def sleep_bayes(sleep_model):
    return sleep_model.fit(method="nuts", draws=300, tune=300, chains=2, random_seed=11, progressbar=False,
                           warn=False)


def test_posterior_predictive_training_rows(sleep_bayes, sleep_model):
    yrep = sleep_bayes.posterior_predictive()
    assert yrep.dims == ("chain", "draw", "obs")
    assert yrep.shape == (2, 300, sleep_model.spec.n_obs)
    # the default seed comes from the fit: the same draws twice; another seed differs
    np.testing.assert_array_equal(yrep.to_numpy(), sleep_bayes.posterior_predictive().to_numpy())
    assert not np.allclose(yrep.to_numpy(), sleep_bayes.posterior_predictive(random_seed=5).to_numpy())
    # replicated data reproduce the observed mean and spread (the model fits sleepstudy)
    y = sleep_model.spec.y
    assert abs(float(yrep.mean()) - y.mean()) < 3.0
    assert abs(float(yrep.std()) / y.std() - 1) < 0.05
    # the residual noise is there: per-row replicate sd is about σ (plus the uncertainty of the mean)
    sigma = float(sleep_bayes.posterior["sigma"].mean())
    per_row_sd = yrep.std(("chain", "draw")).to_numpy()
    assert sigma < np.median(per_row_sd) < 1.3 * sigma


# -- REML predictions ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sleep_reml(sleep_model):
    return sleep_model.fit(method="reml")


@pytest.fixture(scope="module")
def exam_reml():
    return Model("normexam ~ standLRT + sex + (standLRT | school)", "exam").fit(method="reml")


def test_reml_training_predictions_are_fitted_and_xbeta(sleep_reml, sleep_model):
    spec = sleep_model.spec
    cond = sleep_reml.predict()
    np.testing.assert_allclose(cond.to_numpy(), sleep_reml.fitted.to_numpy(), rtol=0, atol=1e-10)
    assert list(cond.index) == list(sleep_reml.fitted.index)
    marg = sleep_reml.predict(kind="marginal")
    np.testing.assert_allclose(marg.to_numpy(), spec.X @ sleep_reml.fixef.to_numpy(), rtol=0, atol=1e-10)
    # the same rows given as new data go through the rebuilt design and agree
    np.testing.assert_allclose(sleep_reml.predict(spec.data).to_numpy(), cond.to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(sleep_reml.predict(spec.data, kind="marginal").to_numpy(), marg.to_numpy(),
                               rtol=0, atol=1e-9)


def test_reml_new_data_matches_lme4(sleep_reml):
    # lme4 1.1-31: predict(fm, newdata = data.frame(Days = c(0, 5, 2.5), Subject = c("308", "999", "335")),
    #                      allow.new.levels = TRUE)   and   re.form = NA
    nd = pd.DataFrame({"Days": [0, 5, 2.5], "Subject": ["308", "999", "335"]}, index=["a", "b", "c"])
    cond = sleep_reml.predict(nd)
    np.testing.assert_allclose(cond.to_numpy(), [253.663655798, 303.741534646, 250.359238391], rtol=2e-6)
    assert list(cond.index) == ["a", "b", "c"]
    assert cond.attrs["new_levels"] == {"Subject": ["999"]}
    marg = sleep_reml.predict(nd, kind="marginal")
    np.testing.assert_allclose(marg.to_numpy(), [251.405104848, 303.741534646, 277.573319747], rtol=2e-6)
    # an unseen subject is predicted at the population mean
    assert cond["b"] == pytest.approx(marg["b"], abs=1e-10)
    # integer subject labels work like strings
    again = sleep_reml.predict(pd.DataFrame({"Days": [0], "Subject": [308]}))
    assert again.iloc[0] == pytest.approx(cond["a"], abs=1e-10)


def test_reml_categorical_fixed_effect_matches_lme4(exam_reml):
    # lme4 1.1-31: lmer(normexam ~ standLRT + sex + (standLRT | school), exam);
    # predict(fe, newdata = data.frame(standLRT = c(-1, .5, 2), sex = c("F", "M", "M"),
    #                                  school = c("1", "20", "100")), allow.new.levels = TRUE)
    nd = pd.DataFrame({"standLRT": [-1, 0.5, 2], "sex": ["F", "M", "M"], "school": ["1", "20", "100"]})
    pred = exam_reml.predict(nd)
    np.testing.assert_allclose(pred.to_numpy(), [-0.216623685826, 0.406726441628, 0.993640202782], rtol=1e-4)
    # by hand from the estimates: the design uses sex's reference level F
    fe, re = exam_reml.fixef, exam_reml.ranef()["school"]
    hand = fe["(Intercept)"] + fe["standLRT"] * 0.5 + fe["sex[M]"] + re.loc["20", "(Intercept)"] + \
        re.loc["20", "standLRT"] * 0.5
    assert pred.iloc[1] == pytest.approx(hand, abs=1e-12)
    assert pred.iloc[2] == pytest.approx(fe["(Intercept)"] + 2 * fe["standLRT"] + fe["sex[M]"], abs=1e-12)


def test_stateful_transforms_use_the_training_data():
    m = Model("Reaction ~ center(Days) + I(Days**2) + (np.log(Days + 1) | Subject)", "sleepstudy")
    fit = m.fit(method="reml")
    rows = [3, 50, 120]
    pred = fit.predict(m.spec.data.iloc[rows])  # centring must use the training mean, not these rows'
    np.testing.assert_allclose(pred.to_numpy(), fit.fitted.to_numpy()[rows], rtol=0, atol=1e-9)


def test_bad_newdata_names_the_column(sleep_reml, exam_reml, sleep_bayes):
    nd = pd.DataFrame({"Days": [1.0, 2.0], "Subject": ["308", "309"]})
    with pytest.raises(DataError, match="'Days'"):
        sleep_reml.predict(nd.drop(columns="Days"))
    with pytest.raises(DataError, match="'Subject'"):
        sleep_reml.predict(nd.drop(columns="Subject"))
    # marginal predictions do not need the grouping column
    assert len(sleep_reml.predict(nd.drop(columns="Subject"), kind="marginal")) == 2
    with pytest.raises(DataError, match=r"'Days'.*1 missing"):
        sleep_reml.predict(nd.assign(Days=[1.0, np.nan]))
    with pytest.raises(DataError, match=r"'Days'.*missing"):
        sleep_bayes.predict(nd.assign(Days=[1.0, np.inf]))
    with pytest.raises(DataError, match="'Subject'.*missing"):
        sleep_reml.predict(nd.assign(Subject=["308", None]))
    with pytest.raises(DataError, match="'Days' is not numeric"):
        sleep_reml.predict(nd.assign(Days=["one", "two"]))
    with pytest.raises(DataError, match="must be a pandas DataFrame"):
        sleep_reml.predict([[1, 2]])
    with pytest.raises(DataError, match="no rows"):
        sleep_reml.predict(nd.iloc[:0])
    ex = pd.DataFrame({"standLRT": [0.0], "sex": ["X"], "school": ["1"]})
    with pytest.raises(DataError, match=r"'sex' has categories \['X'\]"):
        exam_reml.predict(ex)
    with pytest.raises(DataError, match=r"'sex' has categories \['X'\]"):
        exam_reml.predict(ex, kind="marginal")


def test_new_groups_options(sleep_reml, sleep_bayes):
    nd = pd.DataFrame({"Days": [1.0], "Subject": ["new"]})
    with pytest.raises(DataError, match=r"'Subject': \['new'\]"):
        sleep_reml.predict(nd, new_groups="error")
    with pytest.raises(DataError, match="not seen"):
        sleep_bayes.predict(nd, new_groups="error")
    with pytest.raises(BayesLMMError, match="Bayesian fit"):
        sleep_reml.predict(nd, new_groups="sample")
    with pytest.raises(BayesLMMError, match="kind must be"):
        sleep_reml.predict(nd, kind="population")
    with pytest.raises(BayesLMMError, match="new_groups must be"):
        sleep_bayes.predict(nd, new_groups="zero")


# -- Bayesian predictions ---------------------------------------------------------------------

def test_bayes_predictions_agree_with_reml(sleep_bayes, sleep_reml, sleep_model):
    spec = sleep_model.spec
    marg = sleep_bayes.predict(kind="marginal")
    z = (marg["mean"] - sleep_reml.predict(kind="marginal")) / marg["sd"]
    assert np.abs(z).max() < 1.0
    cond = sleep_bayes.predict(ci_prob=0.9)
    z = (cond["mean"] - sleep_reml.fitted) / cond["sd"]
    assert np.abs(z).max() < 1.0
    assert cond.attrs["interval"] == "eti90"
    assert (cond["lower"] < cond["mean"]).all() and (cond["mean"] < cond["upper"]).all()
    # the mean of the conditional draws is the posterior mean of Xβ + Zb, computed by hand
    post = sleep_bayes.posterior
    beta = post["beta"].to_numpy().reshape(-1, 2)
    b = post["Subject"].to_numpy().reshape(len(beta), -1, 2)
    blk = spec.blocks[0]
    mu = beta @ spec.X.T + np.einsum("snq,nq->sn", b[:, blk.codes, :], blk.Z)
    np.testing.assert_allclose(cond["mean"].to_numpy(), mu.mean(0), rtol=1e-12)


def test_bayes_new_data_and_new_groups(sleep_bayes, sleep_reml):
    nd = pd.DataFrame({"Days": [0.0, 0.0, 8.0, 0.0], "Subject": ["308", "new1", "new1", "new2"]})
    pop = sleep_bayes.predict(nd)
    marg = sleep_bayes.predict(nd, kind="marginal")
    # population: an unseen subject's mean is the marginal mean
    np.testing.assert_allclose(pop["mean"].iloc[1:], marg["mean"].iloc[1:], rtol=1e-12)
    assert pop.attrs["new_levels"] == {"Subject": ["new1", "new2"]}
    # a seen subject keeps its own effect: close to the REML conditional prediction
    assert abs(pop["mean"].iloc[0] - sleep_reml.predict(nd).iloc[0]) < pop["sd"].iloc[0]
    # sample: effects drawn from N(0, Σ); the spread at Days = 0 adds the intercept sd
    draws = sleep_bayes.predict_draws(nd, new_groups="sample", random_seed=3).to_numpy().reshape(-1, 4)
    mdraws = sleep_bayes.predict_draws(nd, kind="marginal").to_numpy().reshape(-1, 4)
    sd0 = sleep_bayes.posterior["Subject_sd"].sel(Subject_effect="(Intercept)").to_numpy().ravel()
    expected = np.sqrt(mdraws[:, 1].var() + np.mean(sd0**2))
    assert draws[:, 1].std() == pytest.approx(expected, rel=0.12)
    # rows of one new subject share its drawn effects: Days 0 and 8 of new1 differ by 8 × (β₁ + b₁)
    slope = (draws[:, 2] - draws[:, 1]) / 8
    beta1 = sleep_bayes.posterior["beta"].sel(coef="Days").to_numpy().ravel()
    sd1 = sleep_bayes.posterior["Subject_sd"].sel(Subject_effect="Days").to_numpy().ravel()
    assert np.std(slope - beta1) == pytest.approx(np.sqrt(np.mean(sd1**2)), rel=0.12)
    # two new subjects get independent effects
    assert abs(np.corrcoef(draws[:, 1] - mdraws[:, 1], draws[:, 3] - mdraws[:, 3])[0, 1]) < 0.12
    # reproducible with a seed
    again = sleep_bayes.predict_draws(nd, new_groups="sample", random_seed=3).to_numpy().reshape(-1, 4)
    np.testing.assert_array_equal(draws, again)


def test_bayes_predictive_draws_include_noise(sleep_bayes):
    nd = pd.DataFrame({"Days": [0.0, 9.0], "Subject": ["308", "309"]})
    mean = sleep_bayes.predict(nd)
    pred = sleep_bayes.predict(nd, predictive=True, random_seed=1)
    sigma2 = float((sleep_bayes.posterior["sigma"] ** 2).mean())
    np.testing.assert_allclose(pred["sd"], np.sqrt(mean["sd"] ** 2 + sigma2), rtol=0.1)
    np.testing.assert_allclose(pred["mean"], mean["mean"], atol=0.2 * np.sqrt(sigma2))
    yrep = sleep_bayes.posterior_predictive(newdata=nd, random_seed=1)
    assert yrep.dims == ("chain", "draw", "obs") and yrep.shape == (2, 300, 2)
    np.testing.assert_allclose(yrep.mean(("chain", "draw")).to_numpy(), pred["mean"].to_numpy(), rtol=1e-12)


def test_loo_and_posterior_predictive_group(sleep_bayes):
    import arviz as az

    with pytest.warns(UserWarning, match="Pareto"):  # a few influential sleepstudy rows at 600 draws
        loo = sleep_bayes.loo()
    assert loo.n_data_points == 180
    assert -900 < loo.elpd < -820
    idata = sleep_bayes.add_posterior_predictive()
    assert idata["posterior_predictive"]["y"].shape == (2, 300, 180)
    np.testing.assert_array_equal(idata["posterior_predictive"]["y"].to_numpy(),
                                  sleep_bayes.posterior_predictive().to_numpy())
    # ArviZ's own posterior predictive machinery reads it
    pit = az.loo_pit(idata)
    assert np.isfinite(np.asarray(pit["y"])).all()


def test_loo_without_log_likelihood_says_what_to_do(sleep_bayes):
    import dataclasses

    import xarray as xr

    groups = {k: v.to_dataset() for k, v in sleep_bayes.idata.children.items() if k != "log_likelihood"}
    fit = dataclasses.replace(sleep_bayes, idata=xr.DataTree.from_dict(groups))
    with pytest.raises(BayesLMMError, match="log_likelihood=True"):
        fit.loo()


def test_crossed_factors_match_lme4():
    # lme4 1.1-31: fm <- lmer(diameter ~ 1 + (1|plate) + (1|sample), Penicillin)
    # predict(fm, newdata = data.frame(plate = c("a", "zz", "a"), sample = c("A", "A", "Q")), allow.new.levels = TRUE)
    fit = Model("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin").fit(method="reml")
    np.testing.assert_allclose(fit.predict().to_numpy(), fit.fitted.to_numpy(), rtol=0, atol=1e-10)
    nd = pd.DataFrame({"plate": ["a", "zz", "a"], "sample": ["A", "A", "Q"]})
    pred = fit.predict(nd)
    np.testing.assert_allclose(pred.to_numpy(), [25.9638275299, 25.1592806241, 23.7767691280], rtol=1e-5)
    assert pred.attrs["new_levels"] == {"plate": ["zz"], "sample": ["Q"]}
    # each factor's share of the variance: vc$vcov / sum(vc$vcov)
    np.testing.assert_allclose(fit.icc().to_numpy(), [0.1509130394247, 0.7854267109638], rtol=1e-4)
