"""compare(): posterior beside REML, row by row; FreqFit.confint's profile intervals against lme4."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import BayesLMMError, Model, ModelError, compare


@pytest.fixture(scope="module")
def sleep_bayes(sleep_model):
    return sleep_model.fit(method="nuts", draws=300, tune=300, chains=2, random_seed=7, progressbar=False,
                           warn=False)


@pytest.fixture(scope="module")
def table(sleep_bayes, sleep_reml):
    return compare(sleep_bayes, sleep_reml, ci_prob=0.95)


# -- profile intervals (FreqFit.confint) against lme4 1.1-31 ---------------------------------

def test_confint_profile_matches_lme4_ml(sleep_model):
    # confint(lmer(Reaction ~ Days + (Days|Subject), sleepstudy, REML = FALSE), parm = 1:4, oldNames = FALSE)
    ci = sleep_model.fit(method="ml").confint(0.95)
    lme4 = pd.DataFrame({"lower": [14.3814811165, 3.8011647624, -0.4815004432, 22.8982662150],
                         "upper": [37.716018740, 8.753366659, 0.684986139, 28.857997323]},
                        index=["sd_(Intercept)|Subject", "sd_Days|Subject", "cor_Days.(Intercept)|Subject", "sigma"])
    # lme4 interpolates its profile with splines; ours are roots of the profile itself
    np.testing.assert_allclose(ci.loc[lme4.index, ["lower", "upper"]], lme4, rtol=1e-4, atol=5e-5)


def test_confint_of_a_reml_fit_profiles_the_ml_deviance_like_lme4(sleep_reml):
    # confint(lmer(Reaction ~ Days + (Days|Subject), sleepstudy), level = 0.89, oldNames = FALSE)
    ci = sleep_reml.confint(ci_prob=0.89)
    lme4 = {"sd_(Intercept)|Subject": (15.9630575236, 34.5729457642),
            "cor_Days.(Intercept)|Subject": (-0.3932287602, 0.5820035762),
            "sd_Days|Subject": (4.1061591787, 8.0601042607),
            "sigma": (23.3585695844, 28.2049775391)}
    # lme4's ends come from a spline through its profile: its correlation end -0.393229 is 7e-4 short of the
    # χ² cutoff on the profile itself, ours (-0.393287) is on it to 4e-8
    for name, (lo, hi) in lme4.items():
        assert ci.loc[name, "lower"] == pytest.approx(lo, rel=1e-4, abs=1e-4)
        assert ci.loc[name, "upper"] == pytest.approx(hi, rel=1e-4, abs=1e-4)
    # the estimates are the REML fit's; the fixed effects get Wald intervals
    np.testing.assert_allclose(ci["estimate"].iloc[:4], sleep_reml.varcorr["sdcor"], rtol=1e-12)
    z = stats.norm.ppf(0.945)
    np.testing.assert_allclose(ci.loc["Days", ["lower", "upper"]],
                               sleep_reml.fixef["Days"] + np.array([-z, z]) * sleep_reml.fixef_se["Days"])


def test_confint_boundary_fit_matches_lme4():
    # Dyestuff2 (lme4): the batch variance is estimated as 0; confint gives [0, 2.08404348901]
    yields = [7.298, 3.846, 2.434, 9.566, 7.99, 5.22, 6.556, 0.608, 11.788, -0.892, 0.11, 10.386, 13.434, 5.51,
              8.166, 2.212, 4.852, 7.092, 9.288, 4.98, 0.282, 9.014, 4.458, 9.446, 7.198, 1.722, 4.782, 8.106,
              0.758, 3.758]
    data = pd.DataFrame({"Batch": np.repeat(list("ABCDEF"), 5), "Yield": yields})
    fit = Model("Yield ~ 1 + (1 | Batch)", data).fit(method="reml")
    assert fit.singular
    ci = fit.confint()
    assert ci.loc["sd_(Intercept)|Batch", "lower"] == 0.0
    assert ci.loc["sd_(Intercept)|Batch", "upper"] == pytest.approx(2.08404348901, rel=1e-4)
    assert ci.loc["sigma", "lower"] == pytest.approx(2.8928310201, rel=1e-4)
    assert ci.loc["sigma", "upper"] == pytest.approx(4.81583255245, rel=1e-4)


def test_confint_wald_and_bad_arguments(sleep_reml):
    ci = sleep_reml.confint(method="wald")
    assert ci.iloc[:4][["lower", "upper"]].isna().all().all()
    assert np.isfinite(ci.loc["(Intercept)", "lower"])
    with pytest.raises(BayesLMMError, match="method"):
        sleep_reml.confint(method="boot")
    with pytest.raises(BayesLMMError, match="ci_prob"):
        sleep_reml.confint(ci_prob=95)


@pytest.mark.slow
def test_confint_exam_matches_lme4():
    # confint(lmer(normexam ~ standLRT + (standLRT|school), exam, REML = FALSE), parm = 1:4, oldNames = FALSE)
    ci = Model("normexam ~ standLRT + (standLRT | school)", "exam").fit(method="ml").confint()
    lme4 = {"sd_(Intercept)|school": (0.2481270298266, 0.369506493252),
            "cor_standLRT.(Intercept)|school": (0.1687806038517, 0.744306211963),
            "sd_standLRT|school": (0.0859397957067, 0.161802454569),
            "sigma": (0.7279261952538, 0.760843219036)}
    for name, (lo, hi) in lme4.items():
        assert ci.loc[name, "lower"] == pytest.approx(lo, rel=2e-4)
        assert ci.loc[name, "upper"] == pytest.approx(hi, rel=2e-4)


# -- compare() ------------------------------------------------------------------------------

def test_rows_equal_the_underlying_tables(table, sleep_bayes, sleep_reml):
    assert list(table.index) == ["beta[(Intercept)]", "beta[Days]", "sd[Subject|(Intercept)]", "sd[Subject|Days]",
                                 "corr[Subject|(Intercept),Days]", "sigma"]
    fe, vc = sleep_reml.fixef_table(), sleep_reml.varcorr
    np.testing.assert_array_equal(table["estimate"].to_numpy(),
                                  np.r_[fe["estimate"].to_numpy(), vc["sdcor"].to_numpy()])
    np.testing.assert_array_equal(table["se"].iloc[:2].to_numpy(), fe["std_error"].to_numpy())
    assert table["se"].iloc[2:].isna().all()
    pfe, pvc = sleep_bayes.fixef_table(0.95), sleep_bayes.varcorr_table(0.95)
    for target, col in [("post_mean", "estimate"), ("post_median", "median"), ("post_sd", "std_error"),
                        ("post_lower", "lower"), ("post_upper", "upper"), ("r_hat", "r_hat"),
                        ("ess_bulk", "ess_bulk")]:
        np.testing.assert_allclose(table[target].to_numpy(), np.r_[pfe[col].to_numpy(), pvc[col].to_numpy()],
                                   rtol=1e-12)
    assert list(table["group"]) == ["fixed", "fixed", "Subject", "Subject", "Subject", "Residual"]


def test_intervals_and_differences(table, sleep_reml):
    z = stats.norm.ppf(0.975)
    fe = sleep_reml.fixef_table()
    np.testing.assert_allclose(table["lower"].iloc[:2], fe["estimate"] - z * fe["std_error"])
    prof = sleep_reml.confint(0.95)
    np.testing.assert_allclose(table["lower"].iloc[2:], prof["lower"].iloc[:4], rtol=1e-12)
    np.testing.assert_allclose(table["upper"].iloc[2:], prof["upper"].iloc[:4], rtol=1e-12)
    np.testing.assert_allclose(table["diff_sd"], (table["post_mean"] - table["estimate"]) / table["post_sd"])
    # the posterior and REML agree on sleepstudy: fixed effects within a posterior sd; the sds' posterior
    # means lie right of the REML estimates (skewed posteriors), by less than a posterior sd
    assert (table["diff_sd"].abs() < 1).all()
    assert (table.loc[["sd[Subject|(Intercept)]", "sd[Subject|Days]"], "diff_sd"] > 0).all()
    # 95 % intervals of the two overlap almost entirely
    for name in table.index:
        row = table.loc[name]
        overlap = min(row["upper"], row["post_upper"]) - max(row["lower"], row["post_lower"])
        assert overlap > 0.7 * (row["post_upper"] - row["post_lower"])


def test_display(table):
    text = str(table)
    assert "Intervals at 95%" in text and "profile likelihood" in text
    assert "sd[Subject|Days]" in text and "diff_sd" in text
    assert "group" not in text.splitlines()[4]  # helper columns stay out of the print
    html = table._repr_html_()
    assert html.count("<tr") == 7 and "diff_sd" in html
    assert type(table.to_frame()) is pd.DataFrame


def test_options_and_errors(sleep_bayes, sleep_reml):
    swapped = compare(sleep_reml, sleep_bayes, intervals="wald")
    assert swapped.attrs["ci_prob"] == pytest.approx(0.89)
    assert swapped["lower"].iloc[2:].isna().all() and any("intervals='wald'" in n for n in swapped.notes)
    with pytest.raises(BayesLMMError, match="intervals must be one of 'auto', 'profile', 'wald', 'none'"):
        compare(sleep_bayes, sleep_reml, intervals="bootstrap")
    with pytest.raises(BayesLMMError, match="NUTS fit and a REML/ML fit"):
        compare(sleep_reml, sleep_reml)
    other = Model("Reaction ~ Days + (1 | Subject)", "sleepstudy").fit(method="reml")
    with pytest.raises(ModelError, match="not of the same model"):
        compare(sleep_bayes, other)


def test_intervals_none(sleep_bayes, sleep_reml):
    table = compare(sleep_bayes, sleep_reml, intervals="none")
    assert table[["lower", "upper"]].isna().all().all()
    assert table["post_lower"].notna().all() and table["se"].iloc[:2].notna().all()
    assert any("intervals='none'" in n for n in table.notes)


def test_auto_is_decided_by_size_not_time(sleep_bayes, sleep_reml, monkeypatch):
    """The rule reads the model's size only: the same table on any machine, under any load."""
    import importlib

    from bayeslmm.reml.profile import crossproducts, profile_work

    # 4 variance parameters × (18 levels × 2³ + the sparse product's nonzeros + 3³/3)
    cp = crossproducts(sleep_reml.spec)
    assert profile_work(sleep_reml) == 4 * (18 * 8 + cp.P.nnz + 9) == 2340
    auto = compare(sleep_bayes, sleep_reml, ci_prob=0.95)
    pd.testing.assert_frame_equal(auto.to_frame(), compare(sleep_bayes, sleep_reml, ci_prob=0.95,
                                                           intervals="profile").to_frame())
    cmp = importlib.import_module("bayeslmm.compare")  # the module, not the function of that name
    monkeypatch.setattr(cmp, "AUTO_PROFILE_MAX_WORK", 1000.0)  # now this model counts as large
    skipped = compare(sleep_bayes, sleep_reml, ci_prob=0.95)
    assert skipped["lower"].iloc[2:].isna().all() and np.isfinite(skipped["lower"].iloc[:2]).all()
    note = " ".join(skipped.notes)
    assert "profile work 2.3e+03 > 1e+03" in note
    assert "intervals='profile' (command line: --intervals profile)" in note


def test_compare_a_residual_structure():
    """Ovary with AR(1) within mares: a residual[Phi] row, the REML estimate nlme's, its profile interval
    the fit's own confint; fits of different residual structures are refused, saying so."""
    from bayeslmm import CorAR1

    f = "follicles ~ np.sin(2*3.141592653589793*Time) + np.cos(2*3.141592653589793*Time) + (1 | Mare)"
    m = Model(f, "Ovary", correlation=CorAR1("Mare"))
    reml = m.fit()
    bayes = m.fit(method="nuts", draws=300, tune=300, chains=2, random_seed=3, progressbar=False, warn=False)
    t = compare(bayes, reml, ci_prob=0.95)
    assert list(t.index[-2:]) == ["sigma", "residual[Phi]"]
    row = t.loc["residual[Phi]"]
    assert row["group"] == "residual" and row["estimate"] == reml.residual_params["Phi"]
    ci = reml.confint(0.95)
    assert (row["lower"], row["upper"]) == (ci.loc["Phi", "lower"], ci.loc["Phi", "upper"])
    assert row["post_mean"] == pytest.approx(bayes.residual_table()["estimate"]["residual_Phi"], rel=1e-12)
    assert abs(row["diff_sd"]) < 2
    with pytest.raises(ModelError, match="residual structures differ"):
        compare(bayes, Model(f, "Ovary").fit())
