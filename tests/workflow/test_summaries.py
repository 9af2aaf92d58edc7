"""Summaries, coef(), variance decomposition, ICC and R² of both fits, on real numbers."""

import numpy as np
import pytest

from bayeslmm import DataError, Model, ModelError
from bayeslmm.simulate import simulate_doctors


@pytest.fixture(scope="module")
def sleep_bayes(sleep_model):
    return sleep_model.fit(method="nuts", draws=300, tune=300, chains=2, random_seed=3, progressbar=False,
                           warn=False)


@pytest.fixture(scope="module")
def exam_intercept():
    return Model("normexam ~ standLRT + (1 | school)", "exam").fit(method="reml")


# -- BayesFit.summary ------------------------------------------------------------------------

def test_summary_shows_every_parameter(sleep_bayes):
    s = sleep_bayes.summary()
    t = s.tables()
    assert list(t["fixed"].index) == ["(Intercept)", "Days"]
    assert [n for _, n in t["random"].index] == ["sd (Intercept)", "sd Days", "corr (Intercept), Days"]
    assert list(t["residual"].index) == ["sd (sigma)"]
    fe, vc = sleep_bayes.fixef_table(), sleep_bayes.varcorr_table()
    np.testing.assert_array_equal(t["fixed"]["mean"], fe["estimate"])
    np.testing.assert_array_equal(t["random"]["ess_bulk"].to_numpy(), vc["ess_bulk"].iloc[:3].to_numpy())
    np.testing.assert_array_equal(t["residual"]["upper"].to_numpy(), vc["upper"].iloc[3:].to_numpy())
    text = str(s)
    for piece in ("Fixed effects:", "Random effects:", "Residual:", "corr (Intercept), Days", "sigma", "r_hat",
                  "ess_bulk", "ess_tail", "89 % equal-tailed", "Draws: 2 chains × 300", "Diagnostics"):
        assert piece in text
    # every number row has all eight columns, and the columns line up across sections
    rows = [line for line in text.splitlines() if line.startswith(("(Intercept)", "Days", "sigma"))]
    assert len(rows) == 3 and len({len(r) for r in rows}) == 1
    assert f"{fe.loc['Days', 'estimate']:.4g}" in text
    html = sleep_bayes._repr_html_()
    assert html.count("<table") == 3 and "<h4>Random effects</h4>" in html and "corr (Intercept), Days" in html


def test_summary_interval_is_configurable(sleep_bayes):
    t = sleep_bayes.summary(ci_prob=0.5).tables()["fixed"]
    days = sleep_bayes.posterior["beta"].sel(coef="Days").to_numpy().ravel()
    assert t.loc["Days", "lower"] == pytest.approx(np.quantile(days, 0.25), rel=1e-3)
    assert t.loc["Days", "upper"] == pytest.approx(np.quantile(days, 0.75), rel=1e-3)
    assert "50 % equal-tailed" in str(sleep_bayes.summary(ci_prob=0.5))
    with pytest.raises(ValueError, match="ci_prob"):
        sleep_bayes.summary(ci_prob=1.5)


# -- coef ---------------------------------------------------------------------------------------

def test_bayes_coef_is_fixed_plus_random(sleep_bayes, sleep_reml):
    coef = sleep_bayes.coef()["Subject"]
    beta = sleep_bayes.fixef
    re = sleep_bayes.ranef()["Subject"]
    np.testing.assert_allclose(coef["Days"], beta["Days"] + re["Days"], rtol=1e-12)
    np.testing.assert_allclose(coef["(Intercept)"], beta["(Intercept)"] + re["(Intercept)"], rtol=1e-12)
    # the per-subject lines agree with lme4-style REML coef() within posterior uncertainty
    reml = sleep_reml.coef()["Subject"]
    assert list(coef.index) == list(reml.index) and list(coef.columns) == list(reml.columns)
    sd = sleep_bayes.ranef_table().set_index(["term", "grp"])["sd"]
    z = (coef["Days"] - reml["Days"]) / sd.loc["Days"].reindex(coef.index)
    assert np.abs(z).max() < 0.5


# -- variance decomposition and ICC -----------------------------------------------------------------

def test_icc_of_a_random_intercept_fit_is_the_hand_formula(exam_intercept):
    vc = exam_intercept.varcorr
    s2u, s2 = vc["vcov"].iloc[0], vc["vcov"].iloc[1]
    assert exam_intercept.icc()["school"] == pytest.approx(s2u / (s2u + s2), rel=1e-12)
    # lme4 1.1-31: vc <- as.data.frame(VarCorr(lmer(normexam ~ standLRT + (1|school), exam)))
    #              vc$vcov[1] / sum(vc$vcov)
    assert exam_intercept.icc()["school"] == pytest.approx(0.142244015366, rel=1e-5)
    comp = exam_intercept.variance_components()
    assert list(comp.index) == ["school", "Residual", "Total"]
    assert comp.loc["Total", "variance"] == pytest.approx(s2u + s2, rel=1e-12)
    np.testing.assert_allclose(comp["sd"] ** 2, comp["variance"])
    assert comp["proportion"].iloc[:2].sum() == pytest.approx(1.0)


def test_random_slope_decomposition_follows_the_seed_formula(sleep_reml):
    vc = sleep_reml.varcorr
    s2u0, s2u1, s01, s2 = vc["vcov"].to_numpy()[[0, 1, 2, 3]]
    # lme4 1.1-31: z' VarCorr(fm)$Subject z at z = (1, x), and its share with sigma(fm)^2
    lme4 = {0: (612.100158025, 0.48309451769), 3: (985.37204179, 0.600722308758), 9: (3625.78838967, 0.847002671654)}
    for x, (v, icc) in lme4.items():
        comp = sleep_reml.variance_components(at={"Days": x})
        hand = s2u0 + 2 * s01 * x + s2u1 * x**2
        assert comp.loc["Subject", "variance"] == pytest.approx(hand, rel=1e-12)
        assert comp.loc["Total", "variance"] == pytest.approx(hand + s2, rel=1e-12)
        assert comp.loc["Subject", "variance"] == pytest.approx(v, rel=1e-4)
        assert sleep_reml.icc(at={"Days": x})["Subject"] == pytest.approx(icc, rel=1e-4)


def test_icc_needs_a_point_for_random_slopes(sleep_reml, sleep_bayes):
    with pytest.raises(ModelError, match=r"at=\{'Days': 4\.5\}"):  # the data's mean, not 0
        sleep_reml.icc()
    with pytest.raises(ModelError, match="random slopes"):
        sleep_bayes.variance_components()
    with pytest.raises(DataError, match="'days'"):
        sleep_reml.icc(at={"days": 3})
    with pytest.raises(DataError, match="single value"):
        sleep_reml.icc(at={"Days": [1, 2]})
    with pytest.raises(DataError, match="at must be a dict"):
        sleep_reml.icc(at=3)


def test_bayes_icc_per_draw(sleep_bayes, sleep_reml):
    post = sleep_bayes.posterior
    sd = post["Subject_sd"].to_numpy().reshape(-1, 2)
    corr = post["Subject_corr"].to_numpy().reshape(-1)  # the one distinct correlation
    sigma = post["sigma"].to_numpy().ravel()
    x = 5.0
    v = sd[:, 0] ** 2 + 2 * corr * sd[:, 0] * sd[:, 1] * x + sd[:, 1] ** 2 * x**2
    icc = v / (v + sigma**2)
    table = sleep_bayes.icc(at={"Days": x}, ci_prob=0.9)
    assert table.loc["Subject", "mean"] == pytest.approx(icc.mean(), rel=1e-10)
    assert table.loc["Subject", "lower"] == pytest.approx(np.quantile(icc, 0.05), rel=1e-3)
    comp = sleep_bayes.variance_components(at={"Days": x})
    assert comp.loc["Subject", "mean"] == pytest.approx(v.mean(), rel=1e-10)
    assert comp.loc["Residual", "mean"] == pytest.approx((sigma**2).mean(), rel=1e-10)
    assert comp.loc["Subject", "proportion"] == pytest.approx(icc.mean(), rel=1e-10)
    # and it agrees with REML's point value within the posterior's spread
    reml = sleep_reml.icc(at={"Days": x})["Subject"]
    assert abs(icc.mean() - reml) < 1.5 * icc.std()


def test_doctors_icc_recovers_the_simulation():
    data = simulate_doctors(random_seed=1)
    truth = data.attrs["truth"]
    fit = Model(truth["formula"], data).fit(method="reml")
    true_icc = truth["sd_intercept"] ** 2 / (truth["sd_intercept"] ** 2 + truth["sigma"] ** 2)  # 16 / 52
    assert fit.icc()["doctor"] == pytest.approx(true_icc, abs=0.04)
    r2 = fit.r2()
    assert r2["conditional"] > r2["marginal"] > 0


# -- R² ---------------------------------------------------------------------------------------------

def test_reml_r2_matches_hand_computation_in_r(sleep_reml):
    # lme4 1.1-31, by hand: vf <- var(X %*% fixef(fm)); vr <- mean(rowSums((Z %*% G) * Z)), Z = cbind(1, Days)
    r2 = sleep_reml.r2()
    assert r2["marginal"] == pytest.approx(0.278651058162, rel=1e-5)
    assert r2["conditional"] == pytest.approx(0.799219922783, rel=1e-5)
    # var(mu) / (var(mu) + var(y - mu)) with mu = predict(fm, re.form = NA) and fitted(fm)
    g = sleep_reml.r2(method="gelman")
    assert g["marginal"] == pytest.approx(0.286471395108, rel=1e-5)
    assert g["conditional"] == pytest.approx(0.814327403375, rel=1e-5)
    with pytest.raises(ModelError, match="method"):
        sleep_reml.r2(method="adjusted")


def test_bayes_r2_per_draw(sleep_bayes, sleep_reml, sleep_model):
    spec = sleep_model.spec
    post = sleep_bayes.posterior
    beta = post["beta"].to_numpy().reshape(-1, 2)
    sd = post["Subject_sd"].to_numpy().reshape(-1, 2)
    corr = post["Subject_corr"].to_numpy().reshape(-1)
    s2 = post["sigma"].to_numpy().ravel() ** 2
    vf = np.var(beta @ spec.X.T, axis=1, ddof=1)
    x = spec.blocks[0].Z[:, 1]
    vr = sd[:, 0] ** 2 + 2 * corr * sd[:, 0] * sd[:, 1] * x.mean() + sd[:, 1] ** 2 * np.mean(x**2)
    marg = vf / (vf + vr + s2)
    table = sleep_bayes.r2()
    assert table.loc["marginal", "mean"] == pytest.approx(marg.mean(), rel=1e-10)
    assert table.loc["conditional", "mean"] == pytest.approx(((vf + vr) / (vf + vr + s2)).mean(), rel=1e-10)
    reml = sleep_reml.r2()
    for kind in ("marginal", "conditional"):
        assert abs(table.loc[kind, "mean"] - reml[kind]) < 1.5 * table.loc[kind, "sd"]
    g = sleep_bayes.r2(method="gelman")
    assert 0 < g.loc["marginal", "mean"] < g.loc["conditional", "mean"] < 1
    assert abs(g.loc["conditional", "mean"] - sleep_reml.r2("gelman")["conditional"]) < 2 * g.loc["conditional", "sd"]


def test_out_of_core_model_decomposes_but_refuses_per_row_results(sleep_reml):
    dd = pytest.importorskip("dask.dataframe")
    from bayeslmm import anova
    from bayeslmm.datasets import load_dataset

    data = load_dataset("sleepstudy")
    model = Model("Reaction ~ Days + (Days | Subject)", dd.from_pandas(data, npartitions=3))
    assert not model.spec.rows_in_memory
    fit = model.fit(method="reml")
    # the decomposition needs only the estimates and the point
    np.testing.assert_allclose(fit.variance_components(at={"Days": 3})["variance"],
                               sleep_reml.variance_components(at={"Days": 3})["variance"], rtol=1e-5)
    with pytest.raises(DataError, match="out of memory"):
        fit.r2()
    with pytest.raises(DataError, match="out of memory"):
        fit.predict()
    with pytest.raises(ModelError, match="did not keep its data"):
        fit.predict(data.iloc[:3])
    with pytest.raises(ModelError, match="method='ml'"):
        anova(fit, Model("Reaction ~ Days + (1 | Subject)", dd.from_pandas(data, npartitions=3)).fit())
