"""anova(): likelihood-ratio tests, AIC and BIC against lme4's anova on sleepstudy and exam."""

import numpy as np
import pandas as pd
import pytest

from bayeslmm import BayesLMMError, Model, ModelError, anova
from bayeslmm.datasets import load_dataset

COLUMNS = ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]


@pytest.fixture(scope="module")
def sleep_fits():
    return {
        "m1": Model("Reaction ~ Days + (1 | Subject)", "sleepstudy").fit(method="reml"),
        "m2": Model("Reaction ~ Days + (Days | Subject)", "sleepstudy").fit(method="reml"),
        "m0": Model("Reaction ~ 1 + (Days | Subject)", "sleepstudy").fit(method="reml"),
    }


def _check(table, expected, rtol=1e-6):
    assert list(table.columns) == COLUMNS
    for name, row in expected.items():
        got = table.loc[name]
        assert got["npar"] == row[0]
        np.testing.assert_allclose(got[["AIC", "BIC", "logLik", "deviance"]].to_numpy(float), row[1:5], rtol=rtol)
        if row[5] is None:
            assert np.isnan(got["Chisq"]) and np.isnan(got["Df"]) and np.isnan(got["Pr(>Chisq)"])
        else:
            assert got["Chisq"] == pytest.approx(row[5], abs=2e-4)
            assert got["Df"] == row[6]
            assert got["Pr(>Chisq)"] == pytest.approx(row[7], rel=2e-4)


def test_sleepstudy_matches_lme4(sleep_fits):
    # lme4 1.1-31: anova(lmer(Reaction ~ Days + (1|Subject)), lmer(Reaction ~ Days + (Days|Subject)))
    # "refitting model(s) with ML (instead of REML)"
    table = anova(sleep_fits["m1"], sleep_fits["m2"])
    _check(table, {
        "m1": (4, 1802.078643, 1814.850470, -897.0393215, 1794.078643, None),
        "m2": (6, 1763.939345, 1783.097086, -875.9696722, 1751.939345, 42.1393, 2, 7.0724e-10),
    })
    assert list(table.index) == ["m1", "m2"]
    assert all(f.method == "ML" for f in table.objects.values())
    assert any("refitted" in n for n in table.notes)
    text = str(table)
    assert "m2: Reaction ~ Days + (Days | Subject)" in text and "42.139" in text and "7.0724e-10" in text
    assert "<table" in table._repr_html_()


def test_three_models_ordered_by_parameters(sleep_fits):
    # lme4 orders by npar: anova(m1, m0, m2) with m0 = Reaction ~ 1 + (Days | Subject)
    table = anova(sleep_fits["m2"], sleep_fits["m0"], sleep_fits["m1"], names=["m2", "m0", "m1"])
    assert list(table.index) == ["m1", "m0", "m2"]
    _check(table, {
        "m1": (4, 1802.078643, 1814.850470, -897.0393215, 1794.078643, None),
        "m0": (5, 1785.475882, 1801.440666, -887.7379410, 1775.475882, 18.60276, 1, 1.6099e-05),
        "m2": (6, 1763.939345, 1783.097086, -875.9696722, 1751.939345, 23.53654, 1, 1.2256e-06),
    })


def test_exam_matches_lme4():
    fits = [Model(f, "exam").fit(method="reml") for f in (
        "normexam ~ standLRT + (1 | school)",
        "normexam ~ standLRT + (standLRT | school)",
        "normexam ~ standLRT + sex + (standLRT | school)")]
    table = anova(*fits, names=["a", "b", "c"])
    _check(table, {
        "a": (4, 9365.243201, 9390.477968, -4678.621600, 9357.243201, None),
        "b": (6, 9328.870965, 9366.723116, -4658.435482, 9316.870965, 40.37224, 2, 1.7111e-09),
        "c": (7, 9301.388094, 9345.548937, -4643.694047, 9287.388094, 29.48287, 1, 5.6413e-08),
    })


def test_refit_false_compares_reml_criteria(sleep_fits):
    # lme4: anova(m1, m2, refit = FALSE)
    table = anova(sleep_fits["m1"], sleep_fits["m2"], refit=False)
    _check(table, {
        "m1": (4, 1794.465085, 1807.236913, -893.2325427, 1786.465085, None),
        "m2": (6, 1755.628272, 1774.786013, -871.8141360, 1743.628272, 42.83681, 2, 4.99e-10),
    })
    assert table.objects["m2"] is sleep_fits["m2"]
    with pytest.raises(ModelError, match="different fixed effects"):
        anova(sleep_fits["m0"], sleep_fits["m2"], refit=False)


def test_ml_fits_are_used_as_they_are(sleep_fits):
    ml1 = Model("Reaction ~ Days + (1 | Subject)", "sleepstudy").fit(method="ml")
    ml2 = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy").fit(method="ml")
    table = anova(ml1, ml2)
    assert table.objects["m1"] is ml1 and not table.notes
    # the same numbers as refitting the REML fits
    np.testing.assert_allclose(table["logLik"], anova(sleep_fits["m1"], sleep_fits["m2"])["logLik"], rtol=1e-9)
    assert table.loc["m2", "Chisq"] == pytest.approx(2 * (ml2.loglik - ml1.loglik), rel=1e-12)
    with pytest.raises(ModelError, match="mix REML and ML"):
        anova(ml1, sleep_fits["m2"], refit=False)


def test_bad_arguments(sleep_fits):
    with pytest.raises(BayesLMMError, match="at least two"):
        anova()
    with pytest.raises(BayesLMMError, match="at least two"):
        anova("m1")
    with pytest.raises(BayesLMMError, match="argument 2"):
        anova(sleep_fits["m1"], "m2")
    with pytest.raises(BayesLMMError, match="distinct names"):
        anova(sleep_fits["m1"], sleep_fits["m2"], names=["a", "a"])
    other = Model("Reaction ~ Days + (1 | Subject)", load_dataset("sleepstudy").iloc[:150])
    with pytest.raises(ModelError, match="same rows"):
        anova(sleep_fits["m1"], other.fit())


def test_one_fit_gives_its_f_tests_per_term(sleep_fits):
    """lmerTest's anova(m): type III F tests with Satterthwaite's df (sleepstudy: Days, 17 df)."""
    one = anova(sleep_fits["m2"])
    pd.testing.assert_frame_equal(one, sleep_fits["m2"].anova())
    assert list(one.index) == ["Days"] and one.loc["Days", "den_df"] == pytest.approx(17, rel=1e-4)
