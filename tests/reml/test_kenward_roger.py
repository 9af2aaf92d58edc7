"""Kenward–Roger df, adjusted SEs and F tests (``ddf="kenward-roger"``).

Against pbkrtest 0.5.2 through lmerTest 3.1-3 (tests/data/lmertest_reference.json:
``coef_kenward_roger`` and ``anova_type3_kenward_roger`` of sleepstudy, ham and
carrots), at lme4's θ and σ as the Satterthwaite tests.  KR is closed-form: ours agree
with pbkrtest's printed numbers to ≤ 1.3e-13 relative in df, SE, F, Mean Sq (reached);
the tolerance is 1e-10.  The Woodbury algebra is checked against V, 𝒫 and G_i built
densely on a 96-row model, every intermediate to 1e-10.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import BayesLMMError, ModelError
from bayeslmm.crossprod import block_Z
from bayeslmm.formula.terms import factor_levels, factor_parts, fixed_terms
from bayeslmm.hypotheses import find_term, type3_contrasts
from bayeslmm.model import Model
from bayeslmm.reml import kenward_roger
from bayeslmm.reml.kenward_roger import KenwardRoger

DATA = Path(__file__).resolve().parents[1] / "data"
REF = json.loads((DATA / "lmertest_reference.json").read_text())["models"]
RTOL = 1e-10


def _data(name: str) -> pd.DataFrame:
    if name == "sleepstudy":
        from bayeslmm.datasets import load_dataset

        return load_dataset("sleepstudy")
    d = pd.read_csv(DATA / f"{name}.csv")
    for c in ["Consumer", "Product", "Information", "Homesize"]:
        if c in d:
            d[c] = d[c].astype(str)
    return d


@pytest.fixture(scope="module", params=list(REF))
def case(request):
    ref = REF[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # carrots: 3 rows with no Preference are dropped
        fit = Model(ref["formula"], _data(ref["dataset"]), missing="drop").fit(method="reml")
    kr = KenwardRoger(fit.spec, np.array(ref["theta"]), ref["sigma"])
    beta = np.array([row["Estimate"] for row in ref["coef_kenward_roger"].values()])
    return request.param, ref, fit, kr, beta


def test_coefficient_se_df_t_and_p(case):
    name, ref, fit, kr, beta = case
    for j, row in enumerate(ref["coef_kenward_roger"].values()):
        ell = np.eye(len(beta))[j]
        se = np.sqrt(kr.vcov[j, j])
        df = kr.df(ell)
        t = beta[j] / se
        np.testing.assert_allclose(se, row["Std. Error"], rtol=RTOL)
        np.testing.assert_allclose(df, row["df"], rtol=RTOL)
        np.testing.assert_allclose(t, row["t value"], rtol=RTOL)
        np.testing.assert_allclose(np.log(2 * stats.t.sf(abs(t), df)), np.log(row["Pr(>|t|)"]), rtol=RTOL)


def test_adjustment_is_not_the_identity():
    """Carrots is unbalanced: Φ_A's SEs exceed lme4's by 2.4e-7 … 1.1e-6 relative, 2400× the parity
    tolerance, so the parity above fails if Φ is used (sleepstudy and ham are balanced: Φ_A = Φ)."""
    ref = REF["carrots_sens2"]
    kr_se = np.array([r["Std. Error"] for r in ref["coef_kenward_roger"].values()])
    sat_se = np.array([r["Std. Error"] for r in ref["coef_satterthwaite"].values()])
    assert np.all(kr_se / sat_se - 1 > 1e-7)


def test_anova_type3_rows(case):
    name, ref, fit, kr, beta = case
    spec = fit.spec
    terms = fixed_terms(spec)
    levels = factor_levels(spec, terms)
    table = ref["anova_type3_kenward_roger"]
    assert [t.name for t in terms if not t.is_intercept] == list(table)
    for term_name, row in table.items():
        L = type3_contrasts(find_term(terms, term_name), terms, levels, factor_parts(spec, terms))
        res = kr.f_test(L, beta)
        assert res["num_df"] == row["NumDF"]
        np.testing.assert_allclose(res["den_df"], row["DenDF"], rtol=RTOL)
        np.testing.assert_allclose(res["F"], row["F value"], rtol=RTOL)
        np.testing.assert_allclose(res["F_unscaled"] * ref["sigma"] ** 2, row["Mean Sq"], rtol=RTOL)
        p = stats.f.sf(res["F"], res["num_df"], res["den_df"])
        np.testing.assert_allclose(np.log(p), np.log(row["Pr(>F)"]), rtol=RTOL)


# -- the Woodbury algebra against dense N × N matrices ----------------------------------
def _small_model(formula: str):
    rng = np.random.default_rng(3)
    n = 96
    d = pd.DataFrame({"g": rng.integers(0, 8, n).astype(str), "h": rng.integers(0, 5, n).astype(str),
                      "f": rng.choice(["a", "b", "c"], n), "x": rng.normal(size=n)})
    d["y"] = 1 + 0.5 * d.x + rng.normal(size=n) + rng.normal(size=8)[d.g.astype(int)]
    return Model(formula, d).spec


def _dense(spec, theta, sigma):
    """V, G_i, Φ, P_i, Q_ij, tr(V⁻¹G_iV⁻¹G_j), tr(𝒫G_i𝒫G_j) with N × N matrices."""
    X, n = spec.X, spec.n_obs
    G, Vr = [], np.zeros((n, n))
    for block, th in zip(spec.blocks, spec.split_theta(theta)):
        Z = block_Z(block).toarray()
        T = block.T(th)
        Vr += Z @ np.kron(np.eye(block.n_levels), sigma**2 * T @ T.T) @ Z.T
        for a, b in zip(*block.theta_index):
            E = np.zeros((block.q, block.q))
            E[a, b] = E[b, a] = 1.0
            G.append(Z @ np.kron(np.eye(block.n_levels), E) @ Z.T)
    G.append(np.eye(n))
    Vi = np.linalg.inv(sigma**2 * np.eye(n) + Vr)
    phi = np.linalg.inv(X.T @ Vi @ X)
    Pm = Vi - Vi @ X @ phi @ X.T @ Vi
    P = np.array([-X.T @ Vi @ g @ Vi @ X for g in G])
    Q = np.array([[X.T @ Vi @ gi @ Vi @ gj @ Vi @ X for gj in G] for gi in G])
    tr = np.array([[np.trace(Vi @ gi @ Vi @ gj) for gj in G] for gi in G])
    info = np.array([[np.trace(Pm @ gi @ Pm @ gj) for gj in G] for gi in G])
    return phi, P, Q, tr, info


@pytest.mark.parametrize("formula, theta, labels", [
    ("y ~ x + f + (1 + x | g) + (1 | h)", [0.8, 0.3, 0.6, 0.5],
     ["g.(Intercept)", "g.x.(Intercept)", "g.x", "h.(Intercept)", "sigma2"]),
    ("y ~ x + f + (1 + x || g)", [0.8, 0.4], ["g.(Intercept)", "g.x", "sigma2"]),
])
def test_woodbury_pieces_equal_dense_matrices(formula, theta, labels):
    """96 rows: every intermediate within 1e-10 of V, 𝒫, G_i built densely (5e-15 reached)."""
    spec = _small_model(formula)
    theta, sigma = np.array(theta), 1.3
    kr = KenwardRoger(spec, theta, sigma)
    phi, P, Q, tr, info = _dense(spec, theta, sigma)
    assert kr.labels == labels

    def close(ours, dense):
        np.testing.assert_allclose(ours, dense, rtol=1e-10, atol=1e-10 * np.max(np.abs(dense)))

    close(kr.unadjusted_vcov, phi)
    close(kr.P, P)
    close(kr.Q, Q)
    close(kr.trace_vgvg, tr)
    close(kr.information, info)
    W = 2 * np.linalg.inv(info)
    adj = sum(W[i, j] * (Q[i, j] - P[i] @ phi @ P[j]) for i in range(len(W)) for j in range(len(W)))
    close(kr.vcov, phi + 2 * phi @ adj @ phi)


# -- wiring through the fit ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ham_fit():
    return Model(REF["ham_product"]["formula"], _data("ham")).fit(method="reml")


def test_fit_tables_use_kenward_roger(ham_fit):
    """At our own optimum (θ within ~1e-6 of lme4's), the fit's tables give pbkrtest's numbers to 1e-5."""
    ref = REF["ham_product"]
    tab = ham_fit.fixef_table(ddf="kenward-roger")
    assert tab.attrs["ddf"] == "kenward-roger"
    np.testing.assert_allclose(tab["df"], [r["df"] for r in ref["coef_kenward_roger"].values()], rtol=1e-5)
    np.testing.assert_allclose(tab["std_error"], [r["Std. Error"] for r in ref["coef_kenward_roger"].values()],
                               rtol=1e-5)
    np.testing.assert_allclose(tab["t_value"], tab["estimate"] / tab["std_error"], rtol=1e-12)
    aov = ham_fit.anova(ddf="kenward-roger")
    want = pd.DataFrame(ref["anova_type3_kenward_roger"]).T
    np.testing.assert_allclose(aov["den_df"], want["DenDF"], rtol=1e-5)
    np.testing.assert_allclose(aov["f_value"], want["F value"], rtol=1e-5)
    np.testing.assert_allclose(aov["mean_sq"], want["Mean Sq"], rtol=1e-5)
    np.testing.assert_allclose(aov["p_value"], want["Pr(>F)"], rtol=1e-4)
    one = ham_fit.f_test(np.eye(8)[[4]], ddf="kenward-roger")
    assert one["den_df"] == pytest.approx(tab["df"].iloc[4], rel=1e-12)
    assert one["F"] == pytest.approx(tab["t_value"].iloc[4] ** 2 * one["scale"], rel=1e-10)


def test_ml_fits_and_unknown_methods_are_refused(ham_fit):
    ml = Model(REF["ham_product"]["formula"], _data("ham")).fit(method="ml")
    with pytest.raises(ModelError, match="REML fits only.*satterthwaite"):
        ml.fixef_table(ddf="kenward-roger")
    with pytest.raises(BayesLMMError, match="kenward-roger"):
        ham_fit.anova(ddf="Kenward_Roger")


def test_too_many_random_effects_are_refused(ham_fit, monkeypatch):
    monkeypatch.setattr(kenward_roger, "MAX_BYTES", 1e5)
    with pytest.raises(ModelError, match="ddf='satterthwaite'"):
        KenwardRoger(ham_fit.spec, ham_fit.theta, ham_fit.sigma)


def test_dependent_rows_are_refused(case):
    name, ref, fit, kr, beta = case
    row = np.eye(len(beta))[1]
    with pytest.raises(BayesLMMError, match="not linearly independent"):
        kr.f_test(np.vstack([row, 2 * row]), beta)
    with pytest.raises(BayesLMMError, match=f"{len(beta)} columns"):
        kr.df(np.ones(len(beta) + 1))
    with pytest.raises(BayesLMMError, match="one contrast"):
        kr.df(np.eye(len(beta))[:2])
