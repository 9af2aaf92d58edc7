"""Inference and variance decomposition on fits with a residual structure R = σ² Λ_R(ρ).

Satterthwaite: the deviance's Hessian in (θ, ρ, σ), ∂C/∂(θ, ρ, σ) and ν are checked against a
dense build, V = Z G Zᵀ + σ² Λ_R(ρ) written from each structure's definition (nlme's, Pinheiro &
Bates 2000 ch. 5) with ρ mapped by hand to nlme's scale, differentiated by plain central
differences with Richardson's extrapolation.  lmerTest does not take nlme fits, so beyond the
dense check: a structure that is σ²I in disguise (unit weights) must give the σ²I fit's df,
which on ham (balanced) is the exact 240.

marginal_covariance: nlme 3.1-162's ``getVarCov(fit, type = "marginal")`` on the reference fits
(tests/data/nlme_reference.json), printed to 15 digits (the R call beside the numbers).

Variance components, ICC and R²: closed forms by hand from the fits' σ, sds and residual
parameters.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm import CorAR1, CorCAR1, CorCompSymm, DataError, Model, ModelError, VarExp, VarIdent, VarPower
from conftest import NLME_MODELS, nlme_reference_data as reference_data

DATA = Path(__file__).resolve().parents[1] / "data"
REF = NLME_MODELS


def orthodont():
    d = reference_data("orthodont_varident")
    d["age_c"] = d["age"] - 11.0
    return d


def ovary():
    d = reference_data("ovary_ar1")
    d["s"], d["c"] = np.sin(2 * np.pi * d["Time"]), np.cos(2 * np.pi * d["Time"])
    return d


def bodyweight():
    d = reference_data("bodyweight_varpower_time")
    d["t"] = d["Time"] / 10.0
    return d


def logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


# -- the dense model --------------------------------------------------------------------------
def structure_matrix(structure, data: pd.DataFrame, u: np.ndarray) -> np.ndarray:
    """Λ_R(ρ) from nlme's definitions, ρ on the fit's unconstrained scale mapped by hand; a pair
    (variance, correlation) is S C S, the variance function's parameters first."""
    n = len(data)
    if isinstance(structure, tuple):
        variance, correlation = structure
        k = len(u) - 1
        S = np.sqrt(np.diag(structure_matrix(variance, data, u[:k])))
        return S[:, None] * structure_matrix(correlation, data, u[k:]) * S[None, :]
    if isinstance(structure, VarIdent):
        col = data[structure.by]
        ratio = dict(zip(col.cat.categories, np.exp(np.concatenate([[0.0], u]))))
        s = col.map(ratio).to_numpy(dtype=float)
        return np.diag(s * s)
    if isinstance(structure, VarPower):
        return np.diag(np.abs(data[structure.covariate].to_numpy(dtype=float)) ** (2 * u[0]))
    if isinstance(structure, VarExp):
        return np.diag(np.exp(2 * u[0] * data[structure.covariate].to_numpy(dtype=float)))
    g = data[structure.group].astype(str).to_numpy()
    same = g[:, None] == g[None, :]
    if isinstance(structure, CorCompSymm):
        m = pd.Series(g).value_counts().max()
        lower = -1.0 / (m - 1)
        rho = lower + (1 - lower) * logistic(u[0])
        return np.where(same, rho, 0.0) + (1 - rho) * np.eye(n)
    if isinstance(structure, CorAR1):  # row order within the group (rows of a group are contiguous here)
        t, phi = pd.Series(np.arange(n)).groupby(g).cumcount().to_numpy(dtype=float), np.tanh(u[0])
    else:
        t, phi = data[structure.time].to_numpy(dtype=float), logistic(u[0])
    return np.where(same, phi ** np.abs(t[:, None] - t[None, :]), 0.0)


class Dense:
    """−2 REML (or ML) log-likelihood and C = (Xᵀ V⁻¹ X)⁻¹ at φ = (θ, ρ, σ), V built densely."""

    def __init__(self, fit, structure, data):
        self.spec, self.structure, self.data = fit.spec, structure, data
        self.reml = fit.method == "REML"
        self.k = fit.spec.n_theta

    def V(self, phi):
        theta, u, sigma = phi[: self.k], phi[self.k:-1], phi[-1]
        spec = self.spec
        V = structure_matrix(self.structure, self.data, u)
        for block, th in zip(spec.blocks, spec.split_theta(theta)):
            M = block.Z @ block.T(th)
            V = V + (block.codes[:, None] == block.codes[None, :]) * (M @ M.T)
        return sigma**2 * V

    def parts(self, phi):
        X, y = self.spec.X, self.spec.y
        V = self.V(phi)
        Vi_X = np.linalg.solve(V, X)
        XtViX = X.T @ Vi_X
        beta = np.linalg.solve(XtViX, Vi_X.T @ y)
        r = y - X @ beta
        n, p = X.shape
        if not self.reml:
            return np.linalg.slogdet(V)[1] + r @ np.linalg.solve(V, r) + n * np.log(2 * np.pi), np.linalg.inv(XtViX)
        dev = (np.linalg.slogdet(V)[1] + np.linalg.slogdet(XtViX)[1] + r @ np.linalg.solve(V, r)
               + (n - p) * np.log(2 * np.pi))
        return dev, np.linalg.inv(XtViX)

    def deviance(self, phi):
        return self.parts(phi)[0]

    def vcov(self, phi):
        return self.parts(phi)[1]


def richardson(f, h):
    return (4 * f(h / 2) - f(h)) / 3


def dense_hessian(func, x, h=2e-3):
    def at(h):
        k = len(x)
        H = np.empty((k, k))
        E = np.eye(k) * h
        for i in range(k):
            for j in range(i, k):
                H[i, j] = H[j, i] = (func(x + E[i] + E[j]) - func(x + E[i] - E[j]) - func(x - E[i] + E[j])
                                     + func(x - E[i] - E[j])) / (4 * h * h)
        return H
    return richardson(at, h)


def dense_jacobian(func, x, h=2e-3):
    def at(h):
        E = np.eye(len(x)) * h
        return np.array([(func(x + E[i]) - func(x - E[i])) / (2 * h) for i in range(len(x))])
    return richardson(at, h)


CASES = {  # one small model per structure kind: formula, data, structure
    "VarIdent": ("distance ~ Sex*age_c + (age_c | Subject)", orthodont, VarIdent("Sex")),
    "VarPower": ("distance ~ Sex*age_c + (1 | Subject)", orthodont, VarPower("age")),
    "VarExp": ("distance ~ Sex*age_c + (1 | Subject)", orthodont, VarExp("age_c")),
    "CorAR1": ("follicles ~ s + c + (1 | Mare)", ovary, CorAR1("Mare")),
    "CorCAR1": ("follicles ~ s + c + (1 | Mare)", ovary, CorCAR1("Mare", "Time")),
    "CorCompSymm": ("distance ~ Sex*age_c + (0 + age_c | Subject)", orthodont, CorCompSymm("Subject")),
    "VarIdent+CorAR1": ("distance ~ Sex*age_c + (1 | Subject)", orthodont, (VarIdent("Sex"), CorAR1("Subject"))),
}


def fit_case(name, method="reml"):
    formula, data, structure = CASES[name]
    d = data()
    kw = {"correlation" if s.kind == "correlation" else "variance": s
          for s in (structure if isinstance(structure, tuple) else (structure,))}
    return Model(formula, d, **kw).fit(method=method), structure, d


@pytest.mark.parametrize("name, method", [(name, "reml") for name in CASES] + [("VarIdent", "ml")])
def test_satterthwaite_matches_dense_build(name, method):
    """Hessian, ∂C and ν agree with the dense build (reached: Hessian ≤ 1.8e-7 of its largest entry,
    ∂C ≤ 7e-11, ν ≤ 1.1e-6 relative (VarIdent); tolerance 1e-5)."""
    fit, structure, data = fit_case(name, method)
    sat = fit.satterthwaite
    u = fit.spec.residual.unconstrained(fit.residual_params)
    phi = np.concatenate([fit.theta, u, [fit.sigma]])
    dense = Dense(fit, structure, data)
    # the dense deviance at the estimates is the fit's criterion: the two builds are one model
    assert dense.deviance(phi) == pytest.approx(fit.objective, rel=1e-10)
    H = dense_hessian(dense.deviance, phi)
    assert sat.hessian.shape == H.shape == (len(phi), len(phi))
    np.testing.assert_allclose(sat.hessian, H, rtol=1e-5, atol=1e-5 * np.abs(H).max())
    J = dense_jacobian(dense.vcov, phi)
    np.testing.assert_allclose(sat.jacobian, J, rtol=1e-5, atol=1e-5 * np.abs(J).max())
    np.testing.assert_allclose(sat.vcov, fit.vcov.to_numpy(), rtol=1e-10)
    A = 2 * np.linalg.inv(H)
    C = dense.vcov(phi)
    for ell in np.eye(len(fit.fixef))[[0, -1]]:
        g = np.einsum("a,kab,b->k", ell, J, ell)
        nu = 2 * (ell @ C @ ell) ** 2 / (g @ A @ g)
        assert sat.df(ell) == pytest.approx(nu, rel=1e-5)


# -- structural checks that can fail -------------------------------------------------------------
def test_unit_and_constant_weights_give_lmertest_df():
    """weights=1 (and weights=2: R = σ_w² I/2, so σ_w = √2 σ and θ_w = θ/√2 for the same G) take the
    structured path (whitened cross-products, (θ, σ) only) and must give lmerTest's df at lme4's θ and
    σ (sleepstudy; reached 1.3e-7 relative, tolerance 1e-5)."""
    from bayeslmm.datasets import load_dataset
    from bayeslmm.reml.satterthwaite import Satterthwaite

    ref = json.loads((DATA / "lmertest_reference.json").read_text())["models"]["sleepstudy_corr"]
    data = load_dataset("sleepstudy")
    for w in (1.0, 2.0):
        fit = Model(ref["formula"], data, weights=np.full(len(data), w)).fit()
        assert fit.spec.residual is not None
        sat = Satterthwaite(fit.spec, np.array(ref["theta"]) / np.sqrt(w), ref["sigma"] * np.sqrt(w),
                            residual=np.zeros(0))
        for k, name in enumerate(fit.fixef.index):
            assert sat.df(np.eye(2)[k]) == pytest.approx(ref["coef_satterthwaite"][name]["df"], rel=1e-5)
        # and at the fit's own estimates, through the public route
        assert fit.fixef_table()["df"].to_numpy() == pytest.approx([17.0, 17.0], rel=1e-3)


def test_compound_symmetry_equals_its_random_intercept_twin():
    """Compound symmetry (ρ > 0) within Subject plus a random slope is the model with a random
    intercept instead, reparameterised: same REML criterion, and ν — invariant to the
    parameterisation at a stationary point — the same for every coefficient (balanced: 25 =
    27 subjects − 2 sexes).  Reached: df 2.5e-6, SEs 5.5e-7 relative."""
    fit, _, data = fit_case("CorCompSymm")
    twin = Model("distance ~ Sex*age_c + (1 | Subject) + (0 + age_c | Subject)", data).fit()
    assert fit.residual_params["Rho"] > 0
    assert fit.objective == pytest.approx(twin.objective, rel=1e-9)
    ours, theirs = fit.fixef_table(), twin.fixef_table()
    np.testing.assert_allclose(ours["df"], theirs["df"], rtol=1e-5)
    np.testing.assert_allclose(ours["std_error"], theirs["std_error"], rtol=1e-5)
    np.testing.assert_allclose(ours["df"], 25.0, rtol=1e-4)


@pytest.fixture(scope="module")
def orthodont_fit():
    return Model("distance ~ Sex*age_c + (age_c | Subject)", orthodont(), variance=VarIdent("Sex")).fit()


def test_tests_work_on_a_structured_fit(orthodont_fit):
    """anova, f_test, fixef_table, marginal means and contrasts go through Satterthwaite in (θ, ρ, σ):
    a one-row F test is the t test squared, with the same df."""
    fit = orthodont_fit
    table = fit.fixef_table()
    df = table["df"].to_numpy()
    assert np.all(np.isfinite(df)) and np.all(df > 2)
    # the σ²I fit has 25 for every coefficient (balanced); with the females' residual sd 0.41 × the
    # males' the within-subject slopes are better determined: their df rise well above it (47.6, 37.8)
    plain = Model("distance ~ Sex*age_c + (age_c | Subject)", orthodont()).fit().fixef_table()["df"].to_numpy()
    np.testing.assert_allclose(plain, 25.0, rtol=1e-4)
    assert np.all(df[2:] > plain[2:] + 10)
    aov = fit.anova()
    inter = aov.loc["Sex:age_c"]
    assert inter["den_df"] == pytest.approx(df[3], rel=1e-10)
    assert inter["f_value"] == pytest.approx(table["t_value"].iloc[3] ** 2, rel=1e-10)
    assert set(fit.anova(type=2).index) == set(aov.index)
    ft = fit.f_test(np.eye(4)[[1, 3]])
    assert ft["num_df"] == 2 and np.isfinite(ft["den_df"]) and 0 < ft["p_value"] < 1
    means = fit.marginal_means("Sex")
    assert np.all(np.isfinite(means["df"])) and len(means) == 2
    pairs = fit.contrasts("Sex")
    # the Sex difference at age_c = 0 (the mean age) is coefficient 1 up to sign
    assert abs(pairs["estimate"].iloc[0]) == pytest.approx(abs(table["estimate"].iloc[1]), rel=1e-10)
    assert pairs["df"].iloc[0] == pytest.approx(df[1], rel=1e-8)


def test_kenward_roger_and_wald_work(orthodont_fit):
    """Kenward–Roger's df and SEs (checked densely in tests/reml/test_residual_kr_profile.py, with the
    profile intervals); Wald intervals as before."""
    fit = orthodont_fit
    kr = fit.fixef_table(ddf="kenward-roger")
    assert np.all(np.isfinite(kr["df"])) and np.all(kr["df"] > 2)
    ci = fit.confint(method="wald")
    z = 1.959963984540054
    fe = ci.loc[list(fit.fixef.index)]
    np.testing.assert_allclose(fe["upper"] - fe["estimate"], z * fit.fixef_se.to_numpy(), rtol=1e-12)
    assert ci.loc["sigma", "estimate"] == pytest.approx(fit.sigma)


# -- marginal covariance ----------------------------------------------------------------------
# nlme 3.1-162, on the reference models of tests/data/nlme_reference.json:
#   v <- getVarCov(fit, individuals = "M01", type = "marginal")[[1]]; format(as.vector(v), digits = 15)
NLME_MARGINAL = {
    ("orthodont_varident", "M01"): [
        5.63138862227915, 3.05738146519523, 3.13892020351633, 3.22045894183744,
        3.05738146519523, 5.89245733833958, 3.41644142067388, 3.59597139841320,
        3.13892020351633, 3.41644142067388, 6.34950853323645, 3.97148385498896,
        3.22045894183744, 3.59597139841320, 3.97148385498896, 7.00254220696975],
    ("orthodont_varident", "F01"): [
        3.41973166947356, 3.05738146519523, 3.13892020351633, 3.22045894183744,
        3.05738146519523, 3.68080038553399, 3.41644142067388, 3.59597139841320,
        3.13892020351633, 3.41644142067388, 4.13785158043086, 3.97148385498896,
        3.22045894183744, 3.59597139841320, 3.97148385498896, 4.79088525416416],
}
# Ovary, corAR1 within Mare, mare 1 (29 rows): its [0:4, 0:4] block, [0, 28], [28, 28], [9, 19] and the sum
NLME_OVARY_MARE1 = {"block": [21.3736452592861, 15.8545226152343, 12.5341096684836, 10.4744447395494,
                              15.8545226152343, 20.9323404972368, 15.4489694514188, 12.1971638608923,
                              12.5341096684836, 15.4489694514188, 20.5953945979218, 15.2079283509111,
                              10.4744447395494, 12.1971638608923, 15.2079283509111, 20.4697860165369],
                    "corner": 7.26650428736991, "last": 21.37364919607154, "middle": 6.66617560335059,
                    "sum": 8105.16058145621264}


@pytest.fixture(scope="module")
def reference_fits():
    return {"orthodont_varident": Model(REF["orthodont_varident"]["formula_py"], reference_data("orthodont_varident"),
                                        variance=VarIdent("Sex")).fit(),
            "ovary_ar1": Model(REF["ovary_ar1"]["formula_py"], reference_data("ovary_ar1"),
                               correlation=CorAR1("Mare")).fit()}


def test_marginal_covariance_matches_nlme(reference_fits):
    """V_j = Z_j G Z_jᵀ + σ² Λ_R,j as nlme's getVarCov(type = "marginal") (reached: 4.9e-6 relative,
    the fits' own distance from nlme's optimum; tolerance 1e-4 as the parameters')."""
    fit = reference_fits["orthodont_varident"]
    for (key, subject), want in NLME_MARGINAL.items():
        V = fit.marginal_covariance(subject)
        np.testing.assert_allclose(V.to_numpy().ravel(), want, rtol=1e-4)
    V = reference_fits["ovary_ar1"].marginal_covariance(1).to_numpy()
    ref = NLME_OVARY_MARE1
    assert V.shape == (29, 29)
    np.testing.assert_allclose(V[:4, :4].ravel(), ref["block"], rtol=1e-4)
    np.testing.assert_allclose([V[0, 28], V[28, 28], V[9, 19], V.sum()],
                               [ref["corner"], ref["last"], ref["middle"], ref["sum"]], rtol=1e-4)


@pytest.mark.parametrize("name", ["VarIdent", "CorCAR1", "CorCompSymm", "VarExp", "VarIdent+CorAR1"])
def test_marginal_covariance_matches_dense_build(name):
    """Each group's block of the dense V (built from the structures' definitions) to 1e-10."""
    fit, structure, data = fit_case(name)
    u = fit.spec.residual.unconstrained(fit.residual_params)
    V = Dense(fit, structure, data).V(np.concatenate([fit.theta, u, [fit.sigma]]))
    block = fit.spec.blocks[0]
    for level in (block.levels[0], block.levels[-1]):
        rows = np.flatnonzero(block.codes == list(block.levels).index(level))
        got = fit.marginal_covariance(level, group=block.group).to_numpy()
        np.testing.assert_allclose(got, V[np.ix_(rows, rows)], rtol=1e-10, atol=1e-12 * np.abs(V).max())


# -- variance decomposition, ICC, R² -------------------------------------------------------------
def test_variance_components_with_varident_by_hand():
    data = orthodont()
    fit = Model("distance ~ Sex + (1 | Subject)", data, variance=VarIdent("Sex")).fit()
    tau2, s2, r = fit.varcorr["vcov"].iloc[0], fit.sigma**2, fit.residual_params["Female"]
    n_female = int((data["Sex"] == "Female").sum())
    female = fit.variance_components(at={"Sex": "Female"})
    assert female.loc["Residual", "variance"] == pytest.approx(s2 * r * r, rel=1e-12)
    assert female.loc["Subject", "variance"] == pytest.approx(tau2, rel=1e-12)
    male = fit.icc(at={"Sex": "Male"})
    assert male["Subject"] == pytest.approx(tau2 / (tau2 + s2), rel=1e-12)
    mean_resid = s2 * ((len(data) - n_female) + n_female * r * r) / len(data)  # Nakagawa et al. 2017
    vc = fit.variance_components()
    assert vc.loc["Residual", "variance"] == pytest.approx(mean_resid, rel=1e-12)
    var_f = np.var(fit.spec.X @ fit.fixef.to_numpy(), ddof=1)
    r2 = fit.r2()
    total = var_f + tau2 + mean_resid
    assert r2["marginal"] == pytest.approx(var_f / total, rel=1e-12)
    assert r2["conditional"] == pytest.approx((var_f + tau2) / total, rel=1e-12)
    with pytest.raises(DataError, match="not a level"):
        fit.variance_components(at={"Sex": "Other"})


def test_variance_components_with_varpower_and_a_slope_on_the_same_column():
    """(Time | Rat) with VarPower(Time): at={"Time": 10} sets both z = (1, 10) and s = 10^δ."""
    d = reference_data("bodyweight_varpower_time")
    fit = Model("weight ~ Time*Diet + (Time | Rat)", d, variance=VarPower("Time")).fit()
    G = fit.block_covariances()[0]
    z = np.array([1.0, 10.0])
    vc = fit.variance_components(at={"Time": 10})
    assert vc.loc["Rat", "variance"] == pytest.approx(z @ G @ z, rel=1e-12)
    assert vc.loc["Residual", "variance"] == pytest.approx(fit.sigma**2 * 10 ** (2 * fit.residual_params["power"]),
                                                           rel=1e-12)
    with pytest.raises(ModelError, match="at="):
        fit.variance_components()  # the slope still needs a point


def test_correlation_leaves_a_rows_variance_alone():
    """AR(1): the residual part is σ², and σ² + τ² is the diagonal of the marginal covariance."""
    fit, _, _ = fit_case("CorAR1")
    vc = fit.variance_components()
    assert vc.loc["Residual", "variance"] == pytest.approx(fit.sigma**2, rel=1e-12)
    V = fit.marginal_covariance(1).to_numpy()
    np.testing.assert_allclose(np.diag(V), vc.loc["Total", "variance"], rtol=1e-12)
    assert V[0, 1] == pytest.approx(vc.loc["Mare", "variance"] + fit.sigma**2 * fit.residual_params["Phi"], rel=1e-12)
