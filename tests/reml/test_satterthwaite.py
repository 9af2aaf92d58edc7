"""Satterthwaite df, t and F tests per term (type III and II), marginal means and Tukey pairs.

Against lmerTest 3.1-3 / emmeans 1.8.4 (tests/data/lmertest_reference.json, a copy of
../shared/reference's; its README beside it).  Compared at lme4's θ and σ, which the
file holds (our carrots optimum is 1.1e-6 lower than lme4's).  lmerTest's df are
numerical too; ours agree to ≤ 7e-7 relative (reached), the tolerance is 1e-5; F and
t (functions of β, σ and θ alone) to 1e-9.
"""

import itertools
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import BayesLMMError
from bayeslmm.formula.terms import factor_levels, factor_parts, fixed_terms, grid_design
from bayeslmm.hypotheses import find_term, type2_contrasts, type3_contrasts
from bayeslmm.model import Model
from bayeslmm.reml.satterthwaite import Satterthwaite, combine_df

DATA = Path(__file__).resolve().parents[1] / "data"
REF = json.loads((DATA / "lmertest_reference.json").read_text())["models"]
FACTORS = ["Consumer", "Product", "Information", "Gender", "Homesize", "Subject"]


def _data(name: str) -> pd.DataFrame:
    d = pd.read_csv(DATA / f"{name}.csv") if name != "sleepstudy" else None
    if d is None:
        from bayeslmm.datasets import load_dataset

        return load_dataset("sleepstudy")
    for c in FACTORS:
        if c in d:
            d[c] = d[c].astype(str)
    return d


def _our_name(r_name: str) -> str:
    """R's coefficient name (``Product2:Information2``) as formulae writes it (``Product[2]:Information[2]``)."""
    return ":".join(re.sub(rf"^({'|'.join(FACTORS)})(.+)$", r"\1[\2]", part) for part in r_name.split(":"))


@pytest.fixture(scope="module", params=list(REF))
def case(request):
    ref = REF[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # carrots: 3 rows with no Preference are dropped
        fit = Model(ref["formula"], _data(ref["dataset"]), missing="drop").fit(method="reml")
    # β at lme4's θ: generalised least squares given θ (no refit)
    sat = Satterthwaite(fit.spec, np.array(ref["theta"]), ref["sigma"])
    beta = np.array([row["Estimate"] for row in ref["coef_satterthwaite"].values()])
    return request.param, ref, fit, sat, beta


def test_coefficient_df_t_and_p(case):
    name, ref, fit, sat, beta = case
    assert list(fit.spec.fixed_names) == [_our_name(n) for n in ref["coef_satterthwaite"]]
    for j, row in enumerate(ref["coef_satterthwaite"].values()):
        ell = np.eye(len(beta))[j]
        se = np.sqrt(sat.vcov[j, j])
        df = sat.df(ell)
        t = beta[j] / se
        p = 2 * stats.t.sf(abs(t), df)
        np.testing.assert_allclose(se, row["Std. Error"], rtol=1e-9)
        np.testing.assert_allclose(df, row["df"], rtol=1e-5)
        np.testing.assert_allclose(t, row["t value"], rtol=1e-9)
        np.testing.assert_allclose(np.log(p), np.log(row["Pr(>|t|)"]), rtol=1e-5)


@pytest.mark.parametrize("kind", [3, 2])
def test_f_tests_per_term(case, kind):
    name, ref, fit, sat, beta = case
    spec = fit.spec
    terms = fixed_terms(spec)
    levels = factor_levels(spec, terms)
    table = ref[f"anova_type{kind}_satterthwaite"]
    assert [t.name for t in terms if not t.is_intercept] == list(table)
    for term_name, row in table.items():
        term = find_term(terms, term_name)
        L = (type3_contrasts(term, terms, levels, factor_parts(spec, terms)) if kind == 3
             else type2_contrasts(term, terms, spec.X))
        res = sat.f_test(L, beta)
        assert res["num_df"] == row["NumDF"]
        np.testing.assert_allclose(res["F"], row["F value"], rtol=1e-9)
        np.testing.assert_allclose(res["den_df"], row["DenDF"], rtol=1e-5)
        np.testing.assert_allclose(res["F"] * ref["sigma"] ** 2, row["Mean Sq"], rtol=1e-9)
        p = stats.f.sf(res["F"], res["num_df"], res["den_df"])
        np.testing.assert_allclose(np.log(p), np.log(row["Pr(>F)"]), rtol=1e-5)


def test_naive_treatment_rows_are_not_type_iii():
    """ham's Product: the treatment-coded coefficients alone give F = 4.234, not lmerTest's 3.829."""
    ref = REF["ham_product"]
    fit = Model(ref["formula"], _data("ham")).fit(method="reml")
    sat = Satterthwaite(fit.spec, np.array(ref["theta"]), ref["sigma"])
    naive = np.eye(8)[1:4]
    assert sat.f_test(naive, fit.fixef.to_numpy())["F"] == pytest.approx(4.234, abs=5e-4)


def test_marginal_means_and_tukey_pairs():
    ref = REF["ham_product"]
    fit = Model(ref["formula"], _data("ham")).fit(method="reml")
    spec = fit.spec
    sat = Satterthwaite(spec, np.array(ref["theta"]), ref["sigma"])
    levels = factor_levels(spec, fixed_terms(spec))
    beta = np.array([row["Estimate"] for row in ref["coef_satterthwaite"].values()])
    rows = []
    for p in levels["Product"]:
        grid = pd.DataFrame({"Product": p, "Information": levels["Information"]})
        rows.append(grid_design(spec, grid).mean(axis=0))
    L = np.array(rows)
    for ell, (p, row) in zip(L, ref["emmeans_satterthwaite"].items()):
        np.testing.assert_allclose(ell @ beta, row["emmean"], rtol=1e-9)
        np.testing.assert_allclose(np.sqrt(ell @ sat.vcov @ ell), row["SE"], rtol=1e-9)
        np.testing.assert_allclose(sat.df(ell), row["df"], rtol=1e-5)
    k = len(L)
    for (i, j), row in zip(itertools.combinations(range(k), 2), ref["pairs_satterthwaite"].values()):
        c = L[i] - L[j]
        t = c @ beta / np.sqrt(c @ sat.vcov @ c)
        df = sat.df(c)
        p_tukey = stats.studentized_range.sf(abs(t) * np.sqrt(2), k, df)
        np.testing.assert_allclose(t, row["t.ratio"], rtol=1e-9)
        np.testing.assert_allclose(df, row["df"], rtol=1e-5)
        np.testing.assert_allclose(p_tukey, row["p.value"], rtol=1e-4)


def test_fai_cornelius_combination():
    assert combine_df(np.array([7.0])) == 7.0
    assert combine_df(np.array([10.0, 10.0, 10.0])) == 10.0
    nu = np.array([10.0, 20.0])
    E = 10 / 8 + 20 / 18
    assert combine_df(nu) == pytest.approx(2 * E / (E - 2))
    assert combine_df(np.array([1.5, 30.0])) == 2.0


def test_bad_hypotheses_name_what_is_wrong():
    ref = REF["ham_product"]
    fit = Model(ref["formula"], _data("ham")).fit(method="reml")
    sat = Satterthwaite(fit.spec, fit.theta, fit.sigma)
    with pytest.raises(BayesLMMError, match="8 columns"):
        sat.f_test(np.ones((1, 5)), fit.fixef.to_numpy())
    with pytest.raises(BayesLMMError, match="not linearly independent"):
        sat.f_test(np.vstack([np.eye(8)[1], 2 * np.eye(8)[1]]), fit.fixef.to_numpy())
    with pytest.raises(BayesLMMError, match="'Gender' is not a term"):
        find_term(fixed_terms(fit.spec), "Gender")
    assert find_term(fixed_terms(fit.spec), "Information:Product").name == "Product:Information"


def test_a_reloaded_fit_tests_the_same(tmp_path):
    """Tests per term, coefficient df and f_test answer the same after save and load."""
    from bayeslmm.io import load

    ref = REF["carrots_sens2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fit = Model(ref["formula"], _data("carrots"), missing="drop").fit(method="reml")
    fit.save(tmp_path / "carrots.nc")
    back = load(tmp_path / "carrots.nc")
    for kind in (3, 2):
        pd.testing.assert_frame_equal(back.anova(type=kind), fit.anova(type=kind), rtol=1e-10)
    pd.testing.assert_frame_equal(back.fixef_table(), fit.fixef_table(), rtol=1e-10)
    L = np.eye(4)[2:]
    assert back.f_test(L) == pytest.approx(fit.f_test(L), rel=1e-10)
    # at our own optimum (1.1e-6 lower than lme4's) F and df move by ≤ 1.4e-4 relative (reached)
    table = fit.anova()
    for term, row in ref["anova_type3_satterthwaite"].items():
        assert table.loc[term, "f_value"] == pytest.approx(row["F value"], rel=1e-3)
        assert table.loc[term, "den_df"] == pytest.approx(row["DenDF"], rel=1e-3)


def test_a_model_built_out_of_memory_has_the_same_df():
    """The Model's cross-products serve its fits' df: no rows are needed (dask, 3 partitions)."""
    dd = pytest.importorskip("dask.dataframe")
    ref = REF["sleepstudy_corr"]
    df = _data("sleepstudy")
    df["Subject"] = df["Subject"].astype(str)
    mem = Model(ref["formula"], df).fit(method="reml").fixef_table()
    ooc = Model(ref["formula"], dd.from_pandas(df, npartitions=3)).fit(method="reml").fixef_table()
    np.testing.assert_allclose(ooc["df"], mem["df"], rtol=1e-6)
    np.testing.assert_allclose(ooc["p_value"], mem["p_value"], rtol=1e-5)


# lmerTest 3.1-3 (lme4 1.1-31), run on this machine on tests/data/Orthodont.csv with Sex's levels
# Male, Female:  m <- lmer(distance ~ Sex*I(age-11) + (I(age-11)|Subject), d); anova(m); anova(m, type=2)
#                m2 <- lmer(distance ~ Sex*log(age) + (1|Subject), d); anova(m2)
ORTHODONT_TRANSFORMED = {
    ("distance ~ Sex*I(age-11) + (I(age-11)|Subject)", 3): {
        "Sex": (9.29210, 25.00001871), "I(age - 11)": (87.99893, 25.00000530),
        "Sex:I(age - 11)": (5.11861, 25.00000530)},
    ("distance ~ Sex*I(age-11) + (I(age-11)|Subject)", 2): {
        "Sex": (9.29210, 25.00001871), "I(age - 11)": (99.44531, 25.00000530),
        "Sex:I(age - 11)": (5.11861, 25.00000530)},
    ("distance ~ Sex*np.log(age) + (1|Subject)", 3): {
        "Sex": (2.57735, 87.57793579), "np.log(age)": (102.63133, 78.99999992),
        "Sex:np.log(age)": (5.71019, 78.99999990)},
}


@pytest.mark.parametrize("formula, kind", list(ORTHODONT_TRANSFORMED))
def test_type_iii_with_transformed_covariates(formula, kind):
    """Covariates at 0 means the design column at 0 (I(age - 11) = 0, not age = 0), as lmerTest.

    At our optimum (θ within 1e-6 of lme4's): F and df within 1e-4 relative (reached 2.3e-6).
    """
    d = pd.read_csv(DATA / "Orthodont.csv")
    d["Subject"] = d["Subject"].astype(str)
    d["Sex"] = pd.Categorical(d["Sex"], categories=["Male", "Female"])
    table = Model(formula, d).fit(method="reml").anova(type=kind)
    expected = ORTHODONT_TRANSFORMED[(formula, kind)]
    assert list(table.index) == list(expected)
    for term, (F, den) in expected.items():
        assert table.loc[term, "f_value"] == pytest.approx(F, rel=1e-4)
        assert table.loc[term, "den_df"] == pytest.approx(den, rel=1e-4)


def test_summary_prints_the_df_asked_for():
    """summary() shows lmerTest's table (Satterthwaite); ddf= switches it as fixef_table's does."""
    ref = REF["carrots_sens2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fit = Model(ref["formula"], _data("carrots"), missing="drop").fit(method="reml")
    default, kr, wald = str(fit.summary()), str(fit.summary(ddf="kenward-roger")), str(fit.summary(ddf="none"))
    sat_df, kr_df = fit.fixef_table()["df"], fit.fixef_table(ddf="kenward-roger")["df"]
    assert f"{sat_df['sens2']:.2f}" in default and "Fixed effects:\n" in default
    assert "Kenward–Roger" in kr and f"{kr_df['sens2']:.2f}" in kr
    assert "Wald" in wald and " Inf " in wald
    with pytest.raises(BayesLMMError, match="ddf must be one of"):
        fit.summary(ddf="Kenward-Roger")
