"""Residual structures (R = σ² Λ_R(ρ)) in the REML/ML engine, at nlme's numbers.

Reference: tests/data/nlme_reference.json (nlme 3.1-162; provenance in
tests/data/nlme_reference_README.md).  Tolerances as issue 11: REML logLik within 1e-6
relative (reached: ≤ 1e-11 relative), fixef, SEs, σ, sds and residual parameters within
1e-4 relative (reached: ≤ 2.5e-5, BodyWeight varPower's power, whose criterion is flat),
correlations 2e-3 absolute (nlme prints 3 digits).  The dense check builds V = σ²(ZΛΛᵀZᵀ + Λ_R)
from each structure's definition and compares −2 log-likelihoods to 1e-10.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bayeslmm
from bayeslmm import CorAR1, CorCAR1, CorCompSymm, DataError, Model, ModelError, VarExp, VarFixed, VarIdent, VarPower
from bayeslmm.reml.residual_fit import JointCriterion
from conftest import NLME_MODELS, nlme_reference_data as reference_data

DATA = Path(__file__).resolve().parents[1] / "data"
REF = NLME_MODELS

STRUCTURES = {
    "orthodont_varident": dict(variance=VarIdent("Sex")),
    "ovary_base": {},
    "ovary_ar1": dict(correlation=CorAR1("Mare")),
    "bodyweight_varpower_time": dict(variance=VarPower("Time")),
    "bodyweight_varfixed_time": dict(variance=VarFixed("Time")),
}


def plain(name: str) -> str:
    """A coefficient's name as nlme prints it (formulae's np.sin(2 * 3.14… * Time) → sin(2*pi*Time),
    Sex[Female] → SexFemale)."""
    name = name.replace("np.", "").replace("3.141592653589793", "pi").replace(" ", "")
    return name.replace("[", "").replace("]", "")


@pytest.fixture(scope="module")
def fits():
    return {k: Model(REF[k]["formula_py"], reference_data(REF[k]), **STRUCTURES[k]).fit() for k in REF}


def rel(got, want):
    return abs(got - want) / abs(want)


@pytest.mark.parametrize("key", list(STRUCTURES))
def test_nlme_reference(fits, key):
    ref, fit = REF[key], fits[key]
    assert set(STRUCTURES) == set(REF)
    # the log-likelihood: within 1e-6 relative, or higher than nlme's
    assert fit.loglik >= ref["logLik"] - 1e-6 * abs(ref["logLik"])
    assert rel(fit.loglik, ref["logLik"]) < 1e-6
    assert rel(fit.sigma, ref["sigma"]) < 1e-4
    fixef = {plain(k): v for k, v in fit.fixef.items()}
    se = {plain(k): v for k, v in fit.fixef_se.items()}
    for name, value in ref["fixef"].items():
        assert rel(fixef[plain(name)], value) < 1e-4, name
        assert rel(se[plain(name)], ref["fixef_se"][name]) < 1e-4, name
    vc = fit.varcorr
    sds = vc[vc["var2"].isna()]["sdcor"].to_numpy()
    np.testing.assert_allclose(sds, ref["varcorr"]["sd"], rtol=1e-4)
    corrs = [c for c in (ref["varcorr"]["corr"] or []) if c != "NA"]
    np.testing.assert_allclose(vc[vc["var2"].notna()]["sdcor"].to_numpy(), corrs, atol=2e-3)
    want = {**(ref["varStruct"] or {}), **(ref["corStruct"] or {})}
    assert set(fit.residual_params or {}) == set(want)
    for name, value in want.items():
        assert rel(fit.residual_params[name], value) < 1e-4, name


@pytest.mark.parametrize("key", list(STRUCTURES))
def test_information_criteria(fits, key):
    """AIC as nlme's; BIC by lme4's rule (log N), and nlme's (log(N − p) for REML) from the same count."""
    ref, fit = REF[key], fits[key]
    assert round((ref["AIC"] + 2 * ref["logLik"]) / 2) == fit.n_params
    assert abs(fit.aic - ref["AIC"]) < 1e-6 * abs(ref["AIC"])
    nlme_bic = -2 * fit.loglik + fit.n_params * np.log(fit.nobs - fit.spec.n_fixed)
    assert abs(nlme_bic - ref["BIC"]) < 1e-6 * abs(ref["BIC"])
    assert fit.bic == pytest.approx(fit.objective + fit.n_params * np.log(fit.nobs), rel=1e-12)


def test_summary_prints_structures_as_nlme(fits):
    text = str(fits["orthodont_varident"].summary())
    assert "Variance function: varIdent(form = ~1 | Sex)" in text
    assert "0.408847" in text
    text = str(fits["ovary_ar1"].summary())
    assert "Correlation Structure: corAR1(form = ~1 | Mare)" in text and "Phi 0.57218" in text


def test_ovary_ar1_beats_sigma2_identity_by_the_books_lr(fits):
    """Pinheiro & Bates (2000) p. 242: the AR(1) model's REML LR over σ²I is 76.6 (same fixed effects)."""
    lr = 2 * (fits["ovary_ar1"].loglik - fits["ovary_base"].loglik)
    assert lr == pytest.approx(76.6, abs=0.05)


def test_anova_compares_structured_with_sigma2_identity(fits):
    """nlme's anova.lme of two REML fits with the same fixed effects (P&B p. 242: L.Ratio 76.6, 1 df);
    refit=True compares their ML refits, each with its own residual structure."""
    table = bayeslmm.anova(fits["ovary_base"], fits["ovary_ar1"], refit=False).to_frame()
    assert table["Chisq"].iloc[1] == pytest.approx(76.634, abs=1e-3) and table["Df"].iloc[1] == 1
    ml = bayeslmm.anova(fits["ovary_base"], fits["ovary_ar1"]).to_frame()
    assert ml["npar"].tolist() == [6, 7] and ml["Chisq"].iloc[1] > 25  # reached 75.6


def test_normalized_residuals_are_white_for_ar1(fits):
    """nlme's normalised residuals: L⁻¹r/σ per mare with LLᵀ = C (Cholesky), which is what the
    Prais–Winsten whitening gives; the raw residuals are autocorrelated."""
    fit = fits["ovary_ar1"]
    mare = fit.spec.data["Mare"].to_numpy()

    def lag1(r):
        same = mare[1:] == mare[:-1]
        return np.corrcoef(r[1:][same], r[:-1][same])[0, 1]

    raw, norm = fit.residuals.to_numpy(), fit.normalized_residuals.to_numpy()
    phi = fit.residual_params["Phi"]
    for m in np.unique(mare):
        rows = np.flatnonzero(mare == m)
        k = np.arange(len(rows))
        L = np.linalg.cholesky(phi ** np.abs(k[:, None] - k[None, :]))
        np.testing.assert_allclose(norm[rows], np.linalg.solve(L, raw[rows]) / fit.sigma, rtol=1e-9, atol=1e-12)
    assert lag1(raw) > 0.16  # the AR(1) the structure models (reached 0.48; the normalised ones' -0.12)
    base = fits["ovary_base"]
    np.testing.assert_allclose(base.normalized_residuals, base.residuals / base.sigma, rtol=1e-12)


def test_save_load_round_trip(fits, tmp_path):
    for key in ("orthodont_varident", "ovary_ar1"):
        fit = fits[key]
        path = fit.save(tmp_path / f"{key}.nc")
        back = bayeslmm.load(path)
        assert back.residual_params == fit.residual_params
        assert back.objective == fit.objective and back.aic == fit.aic
        np.testing.assert_allclose(back.fixef, fit.fixef, rtol=1e-10)
        np.testing.assert_allclose(back.fixef_se, fit.fixef_se, rtol=1e-10)
        np.testing.assert_allclose(back.normalized_residuals, fit.normalized_residuals, rtol=1e-8, atol=1e-12)
        assert str(back.summary()).count("Parameter estimate") == 1


# -- the criterion against a dense computation -------------------------------------------------------
def small_data(seed=3) -> pd.DataFrame:
    """6 groups of 5 rows, shuffled (a group's rows not adjacent), with gaps in the integer time."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(6), 5)
    t = np.concatenate([np.sort(rng.choice(9, 5, replace=False)) for _ in range(6)]).astype(float)
    x = rng.normal(size=30)
    d = pd.DataFrame({"g": [f"g{i}" for i in g], "t": t, "tc": t + rng.uniform(0, 0.5, 30), "x": x,
                      "v": rng.uniform(0.5, 3.0, 30), "s": np.where(rng.uniform(size=30) < 0.5, "a", "b"),
                      "w": rng.uniform(0.5, 2.0, 30)})
    d["y"] = 1 + 0.5 * x + rng.normal(size=6)[g] + rng.normal(size=30)
    return d.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def dense_lambda(d: pd.DataFrame, case: str, nat: dict) -> np.ndarray:
    """Λ_R = S C S from the structures' definitions (nlme's), row by row."""
    n, case = len(d), case.split("+")
    s = np.ones(n)
    if "ident" in case:
        s = np.where(d["s"] == "a", 1.0, nat["b"])
    if "power" in case:
        s = np.abs(d["v"].to_numpy()) ** nat["power"]
    if "exp" in case:
        s = np.exp(nat["expon"] * d["v"].to_numpy())
    if "fixed" in case:
        s = np.sqrt(d["v"].to_numpy())
    if "weights" in case:
        s = s / np.sqrt(d["w"].to_numpy())
    same = d["g"].to_numpy()[:, None] == d["g"].to_numpy()[None, :]
    C = np.eye(n)
    if "ar1" in case:
        C = np.where(same, nat["Phi"] ** np.abs(d["t"].to_numpy()[:, None] - d["t"].to_numpy()[None, :]), 0.0)
    if "car1" in case:
        C = np.where(same, nat["Phi"] ** np.abs(d["tc"].to_numpy()[:, None] - d["tc"].to_numpy()[None, :]), 0.0)
    if "cs" in case:
        C = np.where(same, nat["Rho"], 0.0) + (1 - nat["Rho"]) * np.eye(n)
    return s[:, None] * C * s[None, :]


def dense_criterion(spec, theta, lam_R, reml: bool) -> float:
    """−2 REML (or ML) log-likelihood profiled over σ, from H = ZΛΛᵀZᵀ + Λ_R densely."""
    n, p = spec.X.shape
    Zs = []
    for block, th in zip(spec.blocks, spec.split_theta(theta)):
        Zfull = np.zeros((n, block.n_effects))
        for a in range(block.q):
            Zfull[np.arange(n), block.codes * block.q + a] = block.Z[:, a]
        Zs.append(Zfull @ np.kron(np.eye(block.n_levels), block.T(th)))
    ZL = np.hstack(Zs)
    H = ZL @ ZL.T + lam_R
    Hi = np.linalg.inv(H)
    XtHiX = spec.X.T @ Hi @ spec.X
    beta = np.linalg.solve(XtHiX, spec.X.T @ Hi @ spec.y)
    r = spec.y - spec.X @ beta
    rss = r @ Hi @ r
    logdet = np.linalg.slogdet(H)[1]
    if reml:
        return logdet + np.linalg.slogdet(XtHiX)[1] + (n - p) * (1 + np.log(2 * np.pi * rss / (n - p)))
    return logdet + n * (1 + np.log(2 * np.pi * rss / n))


CASES = {
    "ident": dict(variance=VarIdent("s")), "power": dict(variance=VarPower("v")),
    "exp": dict(variance=VarExp("v")), "fixed": dict(variance=VarFixed("v")), "weights": dict(weights="w"),
    "ar1": dict(correlation=CorAR1("g", "t")), "car1": dict(correlation=CorCAR1("g", "tc")),
    "cs": dict(correlation=CorCompSymm("g")),
    "power+ar1+weights": dict(variance=VarPower("v"), correlation=CorAR1("g", "t"), weights="w"),
    "ident+cs": dict(variance=VarIdent("s"), correlation=CorCompSymm("g")),
}
VALUES = {"b": 1.7, "power": 0.6, "expon": -0.4, "Phi": 0.45, "Rho": 0.3}


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_criterion_equals_dense(case, reml):
    d = small_data()
    spec = Model("y ~ x + (1 + x | g)", d, **CASES[case]).spec
    res = spec.residual
    nat = {k: (-0.2 if k == "Phi" and case == "ar1" else VALUES[k]) for k in res.names}  # a negative φ too
    u = res.unconstrained(nat)
    assert res.natural(u) == pytest.approx(nat, rel=1e-12)
    theta = np.array([0.8, 0.3, 0.5])
    got = JointCriterion(spec, reml)(np.concatenate([theta, u]))
    want = dense_criterion(spec, theta, dense_lambda(d, case, nat), reml)
    assert got == pytest.approx(want, rel=1e-10)


def test_array_weights_equal_column_weights_and_round_trip(tmp_path):
    d = small_data()
    a = Model("y ~ x + (1 | g)", d, weights="w").fit()
    b = Model("y ~ x + (1 | g)", d, weights=d["w"].to_numpy()).fit()
    assert a.objective == b.objective and a.n_params == 4
    back = bayeslmm.load(b.save(tmp_path / "w.nc"))
    assert back.objective == b.objective


def test_ml_fit_with_structure_is_at_least_the_sigma2_identity_fit():
    d = small_data()
    base = Model("y ~ x + (1 | g)", d).fit("ml")
    ar1 = Model("y ~ x + (1 | g)", d, correlation=CorAR1("g", "t")).fit("ml")
    assert ar1.loglik >= base.loglik - 1e-8 and ar1.method == "ML"


# -- bad input -----------------------------------------------------------------------------------
def test_unknown_column():
    with pytest.raises(DataError, match="'nope'"):
        Model("y ~ x + (1 | g)", small_data(), variance=VarPower("nope"))
    # the data's columns are listed (the engine once listed an empty frame)
    with pytest.raises(DataError, match=r"not a column of the data; columns: \['g', 't'"):
        Model("y ~ x + (1 | g)", small_data(), correlation=CorAR1("G"))


def test_varpower_zero_covariate():
    d = small_data()
    d.loc[0, "v"] = 0.0
    with pytest.raises(DataError, match="0 in 1 rows"):
        Model("y ~ x + (1 | g)", d, variance=VarPower("v"))


def test_correlation_group_not_nested():
    data = reference_data(REF["orthodont_varident"])
    with pytest.raises(ModelError, match="not nested in the random-effect grouping factor 'Subject'"):
        Model("distance ~ age + (1 | Subject)", data, correlation=CorCompSymm("Sex"))


def duplicate_time(d: pd.DataFrame) -> pd.DataFrame:
    """Give row 0 the time of another row of its group."""
    other = d.index[(d["g"] == d.loc[0, "g"]) & (d.index != 0)][0]
    return d.assign(t=np.where(d.index == 0, d.loc[other, "t"], d["t"]))


@pytest.mark.parametrize("change, error", [
    (duplicate_time, "repeats a time"),
    (lambda d: d.assign(t=d["t"].astype(str)), "must be numeric"),
    (lambda d: d.assign(t=d["t"] + 0.5), "must hold integers"),
    (lambda d: d.assign(t=d["t"].where(d.index != 3, np.nan)), "missing or infinite"),
])
def test_bad_time_column(change, error):
    with pytest.raises(DataError, match=error):
        Model("y ~ x + (1 | g)", change(small_data()), correlation=CorAR1("g", "t"))


def test_varident_level_with_one_observation():
    d = small_data()
    d.loc[0, "s"] = "c"
    with pytest.raises(DataError, match="single observation"):
        Model("y ~ x + (1 | g)", d, variance=VarIdent("s"))


def test_nonpositive_weights():
    d = small_data()
    d.loc[2, "w"] = 0.0
    with pytest.raises(DataError, match="positive"):
        Model("y ~ x + (1 | g)", d, weights="w")


def test_what_assumes_sigma2_identity_is_refused(fits):
    """NUTS samples these models (tests/bayes/test_residual_nuts.py); the public PyMC model does not
    carry the structure yet.  Profile intervals and Kenward–Roger cover residual structures
    (tests/reml/test_residual_kr_profile.py)."""
    model = Model("y ~ x + (1 | g)", small_data(), correlation=CorAR1("g"))
    with pytest.raises(ModelError, match="residual structure"):
        model.pymc_model()
    fit = fits["ovary_ar1"]
    assert np.all(np.isfinite(fit.fixef_table(ddf="kenward-roger")["df"]))
    assert np.all(np.isfinite(fit.fixef_table(ddf="none")["p_value"]))
