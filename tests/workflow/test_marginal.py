"""Estimated marginal means and contrasts (bayeslmm.marginal) against emmeans 1.8.4 and closed forms.

ham's Product means, SEs, df, intervals and Tukey pairs: tests/data/lmertest_reference.json
(emmeans 1.8.4 with lmerTest's Satterthwaite df).  At lme4's θ, σ and β (the file's) the
agreement reached is ≤ 6e-15 relative in means, SEs and t, ≤ 3e-11 in the intervals,
≤ 1.2e-7 in df and 1.3e-8 in Tukey's p; through the fit's own methods at our REML optimum
(θ equal to lme4's to ~1e-8) ≤ 7.5e-7 in everything.  Tolerances leave a factor ≥ 10.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import BayesLMMError, Model
from bayeslmm.errors import ModelError
from bayeslmm.marginal import adjusted, freq_contrasts, freq_means, reference_grid
from bayeslmm.reml.satterthwaite import Satterthwaite

DATA = Path(__file__).resolve().parents[1] / "data"
REF = json.loads((DATA / "lmertest_reference.json").read_text())["models"]["ham_product"]
EMMEANS = pd.DataFrame(REF["emmeans_satterthwaite"]).T
PAIRS = pd.DataFrame(REF["pairs_satterthwaite"]).T


def _ham() -> pd.DataFrame:
    d = pd.read_csv(DATA / "ham.csv")
    for c in ["Consumer", "Product", "Information", "Gender"]:
        d[c] = d[c].astype(str)
    return d


@pytest.fixture(scope="module")
def ham_fit():
    return Model(REF["formula"], _ham()).fit(method="reml")


@pytest.fixture(scope="module")
def age_fit():
    # a covariate beside the factors: Age's coefficient enters every mean at the mean age
    return Model("Informed.liking ~ Product*Information + Age + (1|Consumer)", _ham()).fit(method="reml")


def _tests_at_lme4(spec):
    """contrast_tests' layout with lme4's θ, σ and β: the reference's own point."""
    sat = Satterthwaite(spec, np.array(REF["theta"]), REF["sigma"])
    beta = np.array([row["Estimate"] for row in REF["coef_satterthwaite"].values()])

    def tests(L):
        est = L @ beta
        se = np.sqrt(np.einsum("ia,ab,ib->i", L, sat.vcov, L))
        df = np.array([sat.df(row) for row in L])
        return pd.DataFrame({"estimate": est, "std_error": se, "df": df, "t_value": est / se,
                             "p_value": 2 * stats.t.sf(np.abs(est / se), df)})
    return tests


def _col(frame, name):
    return frame[name].astype(float).to_numpy()


def test_means_and_tukey_pairs_match_emmeans_at_lme4s_theta(ham_fit):
    grid = reference_grid(ham_fit.spec, "Product")
    tests = _tests_at_lme4(ham_fit.spec)
    means = freq_means(grid, tests, 0.95)
    assert list(means["Product"]) == list(EMMEANS["Product"])
    for ours, theirs, rtol in [("estimate", "emmean", 1e-9), ("std_error", "SE", 1e-9), ("df", "df", 1e-5),
                               ("lower", "lower.CL", 1e-9), ("upper", "upper.CL", 1e-9)]:
        np.testing.assert_allclose(_col(means, ours), _col(EMMEANS, theirs), rtol=rtol, err_msg=ours)
    pairs = freq_contrasts(grid, "pairwise", tests, 0.95, None)
    assert pairs.attrs["adjust"] == "tukey"
    # emmeans 1.8 prefixes levels that look like numbers with the factor's name; we write the levels
    assert list(pairs["contrast"]) == [c.replace("Product", "") for c in PAIRS["contrast"]]
    for ours, theirs, rtol in [("estimate", "estimate", 1e-9), ("std_error", "SE", 1e-9), ("df", "df", 1e-5),
                               ("t_value", "t.ratio", 1e-9), ("p_value", "p.value", 1e-6)]:
        np.testing.assert_allclose(_col(pairs, ours), _col(PAIRS, theirs), rtol=rtol, err_msg=ours)


def test_fit_methods_agree_with_emmeans_at_our_optimum(ham_fit):
    means, pairs = ham_fit.marginal_means("Product"), ham_fit.contrasts("Product")
    assert list(means.columns) == ["Product", "estimate", "std_error", "lower", "upper", "t_value", "df", "p_value"]
    assert means.attrs["ci_prob"] == 0.95 and means.attrs["ddf"] == "satterthwaite"
    for ours, theirs in [("estimate", "emmean"), ("std_error", "SE"), ("df", "df"), ("lower", "lower.CL"),
                         ("upper", "upper.CL")]:
        np.testing.assert_allclose(_col(means, ours), _col(EMMEANS, theirs), rtol=1e-5, err_msg=ours)
    for ours, theirs in [("estimate", "estimate"), ("std_error", "SE"), ("df", "df"), ("t_value", "t.ratio"),
                         ("p_value", "p.value")]:
        np.testing.assert_allclose(_col(pairs, ours), _col(PAIRS, theirs), rtol=1e-5, err_msg=ours)


def test_tukey_intervals_are_simultaneous(ham_fit):
    pairs = ham_fit.contrasts("Product")
    half = (pairs["upper"] - pairs["estimate"]) / pairs["std_error"]
    q = stats.studentized_range.ppf(0.95, 4, pairs["df"].to_numpy()) / np.sqrt(2)
    np.testing.assert_allclose(half, q, rtol=1e-6)
    # the interval leaves out 0 exactly when Tukey's p < 5 % (2 - 3 and 2 - 4 on ham)
    excludes = (pairs["lower"] > 0) | (pairs["upper"] < 0)
    assert list(excludes) == list(pairs["p_value"] < 0.05) == [False, False, False, True, True, False]
    # Tukey's table (e.g. Montgomery, Design and Analysis of Experiments, Table VII): q_0.95(4, ∞) = 3.633
    wald = ham_fit.contrasts("Product", ddf="none")
    np.testing.assert_allclose((wald["upper"] - wald["estimate"]) / wald["std_error"], 3.633 / np.sqrt(2),
                               rtol=5e-4)
    # two means: the studentized range of two is |t|·√2, so Tukey is the plain t test and interval
    two = ham_fit.contrasts("Information")
    plain = ham_fit.contrasts("Information", adjust="none")
    np.testing.assert_allclose(two[["lower", "upper", "p_value"]], plain[["lower", "upper", "p_value"]], rtol=1e-6)


def test_bonferroni_holm_sidak_are_their_closed_forms(ham_fit):
    raw = ham_fit.contrasts("Product", adjust="none")
    p, m, df, se = raw["p_value"].to_numpy(), 6, raw["df"].to_numpy(), raw["std_error"].to_numpy()
    np.testing.assert_allclose(raw["p_value"], 2 * stats.t.sf(np.abs(raw["t_value"]), df), rtol=1e-12)
    np.testing.assert_allclose(raw["upper"] - raw["estimate"], stats.t.ppf(0.975, df) * se, rtol=1e-12)
    bonf = ham_fit.contrasts("Product", adjust="bonferroni")
    np.testing.assert_allclose(bonf["p_value"], np.minimum(1, m * p), rtol=1e-12)
    np.testing.assert_allclose(bonf["upper"] - bonf["estimate"], stats.t.ppf(1 - 0.05 / 12, df) * se, rtol=1e-12)
    sidak = ham_fit.contrasts("Product", adjust="sidak")
    np.testing.assert_allclose(sidak["p_value"], 1 - (1 - p) ** m, rtol=1e-10)
    np.testing.assert_allclose(sidak["upper"] - sidak["estimate"],
                               stats.t.ppf(0.5 + 0.5 * 0.95 ** (1 / m), df) * se, rtol=1e-12)
    holm = ham_fit.contrasts("Product", adjust="holm")
    # Holm: the i-th smallest p times m − i + 1, then the running maximum
    ranked = sorted(range(m), key=lambda i: p[i])
    want, running = np.empty(m), 0.0
    for r, i in enumerate(ranked):
        running = max(running, min(1.0, (m - r) * p[i]))
        want[i] = running
    np.testing.assert_allclose(holm["p_value"], want, rtol=1e-12)
    np.testing.assert_allclose(holm["upper"], bonf["upper"], rtol=1e-12)  # emmeans: Holm's CIs are Bonferroni's
    # a hand case: p = (0.01, 0.04, 0.03) → Holm (0.03, 0.06, 0.06)
    t = stats.t.isf(np.array([0.01, 0.04, 0.03]) / 2, 20.0)
    np.testing.assert_allclose(adjusted(t, np.full(3, 20.0), 0.95, "holm")[0], [0.03, 0.06, 0.06], rtol=1e-9)


def test_by_groups_treatment_contrasts_and_custom_weights(ham_fit):
    cells = ham_fit.marginal_means("Product", by="Information")
    assert list(cells.columns[:2]) == ["Information", "Product"] and len(cells) == 8
    # the cell means are X's rows: (Intercept) + Product + Information + interaction
    beta = ham_fit.fixef
    np.testing.assert_allclose(cells["estimate"].iloc[5], beta.iloc[[0, 1, 4, 5]].sum(), rtol=1e-12)
    # with equal weights, the Product means average the cells over Information
    means = ham_fit.marginal_means("Product")
    np.testing.assert_allclose(means["estimate"], cells.groupby("Product")["estimate"].mean(), rtol=1e-12)
    both = ham_fit.marginal_means("Product:Information")
    assert list(both.columns[:2]) == ["Product", "Information"]
    np.testing.assert_allclose(both["estimate"], cells["estimate"], rtol=1e-12)  # Product varies fastest
    pd.testing.assert_frame_equal(ham_fit.marginal_means(["Product", "Information"]), both)
    trt = ham_fit.contrasts("Product", method="trt.vs.ctrl")
    assert list(trt["contrast"]) == ["2 - 1", "3 - 1", "4 - 1"] and trt.attrs["adjust"] == "sidak"
    np.testing.assert_allclose(trt["estimate"], means["estimate"].iloc[1:] - means["estimate"].iloc[0], rtol=1e-12)
    by = ham_fit.contrasts("Product", by="Information", adjust="bonferroni")
    assert len(by) == 12 and list(by.columns[:2]) == ["Information", "contrast"]
    raw = ham_fit.contrasts("Product", by="Information", adjust="none")
    np.testing.assert_allclose(by["p_value"], np.minimum(1, 6 * raw["p_value"]), rtol=1e-12)  # family: one by group
    own = ham_fit.contrasts("Product", method={"1 vs rest": [1, -1 / 3, -1 / 3, -1 / 3]})
    assert list(own["contrast"]) == ["1 vs rest"] and own.attrs["adjust"] == "none"
    m = means["estimate"].to_numpy()
    np.testing.assert_allclose(own["estimate"], m[0] - m[1:].mean(), rtol=1e-12)
    rows = ham_fit.contrasts("Product", method=[[1, -1, 0, 0], [0, 0, 1, -1]])
    assert list(rows["contrast"]) == ["c1", "c2"]
    np.testing.assert_allclose(rows["estimate"], [m[0] - m[1], m[2] - m[3]], rtol=1e-12)


def test_covariates_sit_at_their_means_or_at(age_fit):
    beta, age = age_fit.fixef, age_fit.spec.data["Age"].mean()
    means = age_fit.marginal_means("Information")
    assert means.attrs["at"] == {"Age": pytest.approx(age)}
    # Information 1: the intercept, the Product effects averaged, Age at its mean
    want = beta["(Intercept)"] + beta.iloc[1:4].sum() / 4 + beta["Age"] * age
    np.testing.assert_allclose(means["estimate"].iloc[0], want, rtol=1e-12)
    at30 = age_fit.marginal_means("Information", at={"Age": 30})
    np.testing.assert_allclose(at30["estimate"] - means["estimate"], beta["Age"] * (30 - age), rtol=1e-10)
    # contrasts between levels do not move with the covariate (no interaction with it)
    np.testing.assert_allclose(age_fit.contrasts("Product", at={"Age": 30})["estimate"],
                               age_fit.contrasts("Product")["estimate"], rtol=1e-10)
    # a transformed covariate is taken at the mean of its variable (emmeans' way): log(mean Age)
    logged = Model("Informed.liking ~ Product + np.log(Age) + (1|Consumer)", _ham()).fit(method="reml")
    b = logged.fixef
    np.testing.assert_allclose(logged.marginal_means("Product")["estimate"].iloc[0],
                               b["(Intercept)"] + b["np.log(Age)"] * np.log(age), rtol=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda f: f.marginal_means("Age"), "'Age' is a numeric predictor"),
    (lambda f: f.contrasts("Age"), "'Age' is a numeric predictor"),
    (lambda f: f.marginal_means("Gender"), "'Gender' is not in the model"),
    (lambda f: f.marginal_means("Product:Gender"), "'Gender' is not in the model"),
    (lambda f: f.marginal_means("Consumer"), "'Consumer' is a column of the data but not of the fixed effects"),
    (lambda f: f.marginal_means("Product", by="Product"), "both spec and by"),
    (lambda f: f.marginal_means("Product", by="Prodcut"), "by: 'Prodcut' is not in the model.*'Product'"),
    (lambda f: f.marginal_means(""), "spec must name factors"),
    (lambda f: f.contrasts("Product", method=[[1, -1, 0]]), "4 finite numbers per contrast"),
    (lambda f: f.contrasts("Product", method={"a": [1, -1]}), "4 finite numbers per contrast"),
    (lambda f: f.contrasts("Product", method="poly"), "method must be one of"),
    (lambda f: f.contrasts("Product", adjust="fdr"), "adjust must be one of"),
    (lambda f: f.contrasts("Product", method="trt.vs.ctrl", adjust="tukey"), "Tukey's adjustment is for pairwise"),
    (lambda f: f.marginal_means("Product", at={"Information": "1"}), "'Information' is a factor"),
    (lambda f: f.marginal_means("Product", at={"Gender": 1}), "'Gender' is not a covariate"),
    (lambda f: f.marginal_means("Product", at={"Age": [20, 30]}), "'Age' must be one finite number"),
    (lambda f: f.marginal_means("Product", ci_prob=95), "ci_prob"),
])
def test_bad_input_names_what_is_wrong(age_fit, call, match):
    with pytest.raises(BayesLMMError, match=match):
        call(age_fit)


def test_pairs_cover_every_combination_once(ham_fit):
    pairs = ham_fit.contrasts("Product:Information")
    names = [f"{a} - {b}" for a, b in itertools.combinations(["1 1", "2 1", "3 1", "4 1", "1 2", "2 2", "3 2", "4 2"],
                                                             2)]
    assert list(pairs["contrast"]) == names
    q = stats.studentized_range.ppf(0.95, 8, pairs["df"].iloc[0]) / np.sqrt(2)  # Tukey over 8 means
    assert (pairs["upper"].iloc[0] - pairs["estimate"].iloc[0]) / pairs["std_error"].iloc[0] == pytest.approx(q)


def test_a_fit_with_dropped_columns_refuses():
    # no Product 4 with Information 2: the interaction's column is dropped, Product 4's mean is not estimable
    data = _ham()
    data = data[~((data.Product == "4") & (data.Information == "2"))]
    with pytest.warns(UserWarning, match="rank deficient"):
        fit = Model("Informed.liking ~ Product*Information + (1|Consumer)", data).fit(method="reml")
    with pytest.raises(ModelError, match=r"dropped the rank-deficient columns \['Product\[4\]:Information\[2\]'\]"):
        fit.marginal_means("Product")


def test_kenward_roger_df_pass_through(ham_fit):
    # ham is balanced: a within-consumer difference has exactly (81 − 1)(4 − 1) = 240 df (reached 8e-14)
    kr = ham_fit.contrasts("Product", ddf="kenward-roger")
    assert kr.attrs["ddf"] == "kenward-roger"
    np.testing.assert_allclose(kr["df"], 240.0, rtol=1e-9)
    with pytest.raises(BayesLMMError, match="ddf must be one of"):
        ham_fit.marginal_means("Product", ddf="kr")
