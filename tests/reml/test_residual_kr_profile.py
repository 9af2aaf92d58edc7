"""Kenward–Roger df and profile-likelihood intervals on fits with a residual structure R = σ²Λ_R(ρ).

Kenward–Roger: checked against Kenward & Roger (1997) written densely here (Halekoh & Højsgaard 2014,
JSS 59(9), section 3, with the R_ij term that pbkrtest drops for lme4's linear V): V(τ) built as an
n × n matrix from τ = (Σ entries, residual parameters, σ²) with this file's own map, ∂V/∂τ and
∂²V/∂τ∂τ by Richardson-extrapolated central differences of that matrix, 𝒫, P_i, Q_ij, R_ij, the
expected information, Φ_A and the df of one contrast from their definitions.  And an identity:
compound symmetry plus a random slope is the random-intercept-plus-slope model reparameterised
linearly, so their Kenward–Roger df, SEs and F tests must agree (on unbalanced data, where Φ_A ≠ Φ).

Profiles: every end checked here is where an independent profile — the ML criterion minimised by
scipy's Nelder–Mead over the other parameters, its own optimum as the base — crosses the χ²₁
cutoff: the crossing lies within 1e-4 relative of the end (reached ≤ 5e-8).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from bayeslmm import CorAR1, CorCAR1, CorCompSymm, Model, ModelError, VarIdent, VarPower
from bayeslmm.crossprod import block_Z
from bayeslmm.reml.kenward_roger import KenwardRoger
from bayeslmm.reml.profile import Profiler
from bayeslmm.reml.residual_fit import JointCriterion
from conftest import NLME_MODELS, nlme_reference_data as reference_data
from test_residual_inference import orthodont, ovary

DATA = Path(__file__).resolve().parents[1] / "data"
REF = NLME_MODELS


def bodyweight():
    return reference_data("bodyweight_varpower_time")   # Time unscaled (test_residual_inference's divides by 10)


# -- Kenward–Roger, dense -------------------------------------------------------------------------------
def ar1_case():
    """Ovary, nlme's reference model: τ_R = (φ, σ²), V_R = σ² φ^|i−j| within a mare."""
    d = ovary()
    fit = Model("follicles ~ s + c + (s || Mare)", d, correlation=CorAR1("Mare")).fit()
    g = d["Mare"].astype(str).to_numpy()
    t = pd.Series(np.arange(len(d))).groupby(g).cumcount().to_numpy(dtype=float)
    same, lag = g[:, None] == g[None, :], np.abs(t[:, None] - t[None, :])
    return fit, (lambda r: r[1] * np.where(same, r[0] ** lag, 0.0)), [fit.residual_params["Phi"], fit.sigma**2]


def varident_case():
    """Orthodont varIdent(Sex): τ_R = (the females' residual variance, the males' σ²)."""
    d = orthodont()
    fit = Model("distance ~ Sex*age_c + (age_c | Subject)", d, variance=VarIdent("Sex")).fit()
    female = (d["Sex"] == "Female").to_numpy()
    return (fit, (lambda r: np.diag(np.where(female, r[0], r[1]))),
            [fit.sigma**2 * fit.residual_params["Female"] ** 2, fit.sigma**2])


def varpower_case():
    """BodyWeight varPower(Time): τ_R = (δ, σ²), V_R = σ² diag(Time^{2δ})."""
    d = bodyweight()
    fit = Model("weight ~ Time*Diet + (Time | Rat)", d, variance=VarPower("Time")).fit()
    time = d["Time"].to_numpy(dtype=float)
    return fit, (lambda r: np.diag(r[1] * time ** (2 * r[0]))), [fit.residual_params["power"], fit.sigma**2]


def varident_ar1_case():
    """Both at once (Orthodont, varIdent(Sex) and AR(1) within Subject): τ_R = (v_Female, φ, σ²),
    V_R = S C S with S² the rows' variances."""
    d = orthodont()
    fit = Model("distance ~ Sex*age_c + (1 | Subject)", d, variance=VarIdent("Sex"), correlation=CorAR1("Subject")).fit()
    female = (d["Sex"] == "Female").to_numpy()
    g = d["Subject"].astype(str).to_numpy()
    t = pd.Series(np.arange(len(d))).groupby(g).cumcount().to_numpy(dtype=float)
    same, lag = g[:, None] == g[None, :], np.abs(t[:, None] - t[None, :])

    def residual_V(r):
        sd = np.sqrt(np.where(female, r[0], r[2]))
        return sd[:, None] * np.where(same, r[1] ** lag, 0.0) * sd[None, :]

    return fit, residual_V, [fit.sigma**2 * fit.residual_params["Female"] ** 2, fit.residual_params["Phi"],
                             fit.sigma**2]


def dense_V(fit, residual_V):
    """τ ↦ V = Σ_b Z_b (I ⊗ Σ_b) Z_bᵀ + V_R(τ_R), and τ at the fit (Σ_b = σ²TTᵀ)."""
    spec = fit.spec
    Zs = [block_Z(b).toarray() for b in spec.blocks]
    sizes = [len(b.theta_index[0]) for b in spec.blocks]
    tau_sigma = []
    for b, th in zip(spec.blocks, spec.split_theta(fit.theta)):
        T = b.T(th)
        tau_sigma += list((fit.sigma**2 * T @ T.T)[b.theta_index])

    def V(tau):
        out, k = residual_V(tau[sum(sizes):]), 0
        for b, Z, m in zip(spec.blocks, Zs, sizes):
            S = np.zeros((b.q, b.q))
            S[b.theta_index] = S[b.theta_index[::-1]] = tau[k : k + m]
            k += m
            out = out + Z @ np.kron(np.eye(b.n_levels), S) @ Z.T
        return out

    return V, np.array(tau_sigma)


def dense_derivatives(V, tau, h=2e-3):
    k = len(tau)
    steps = h * np.maximum(np.abs(tau), 0.1)

    def at(scale):
        E = np.diag(steps * scale)
        first = [(V(tau + E[i]) - V(tau - E[i])) / (2 * E[i, i]) for i in range(k)]
        second = [[None] * k for _ in range(k)]
        for i in range(k):
            for j in range(i, k):
                second[i][j] = second[j][i] = (V(tau + E[i] + E[j]) - V(tau + E[i] - E[j]) - V(tau - E[i] + E[j])
                                               + V(tau - E[i] - E[j])) / (4 * E[i, i] * E[j, j])
        return first, second

    (f1, s1), (f2, s2) = at(1.0), at(0.5)
    return ([(4 * b - a) / 3 for a, b in zip(f1, f2)],
            [[(4 * s2[i][j] - s1[i][j]) / 3 for j in range(k)] for i in range(k)])


def dense_kenward_roger(X, V, G, H):
    """Kenward & Roger (1997): Φ, P_i, Q_ij, R_ij, tr(𝒫G_i𝒫G_j), W = 2·info⁻¹, Φ_A."""
    Vi = np.linalg.inv(V)
    phi = np.linalg.inv(X.T @ Vi @ X)
    proj = Vi - Vi @ X @ phi @ X.T @ Vi
    k = len(G)
    P = np.array([-X.T @ Vi @ g @ Vi @ X for g in G])
    Q = np.array([[X.T @ Vi @ G[i] @ Vi @ G[j] @ Vi @ X for j in range(k)] for i in range(k)])
    R = np.array([[X.T @ Vi @ H[i][j] @ Vi @ X for j in range(k)] for i in range(k)])
    PG = [proj @ g for g in G]
    info = np.array([[np.sum(PG[i] * PG[j].T) for j in range(k)] for i in range(k)])
    W = 2 * np.linalg.inv(info)
    adjust = sum(W[i, j] * (Q[i, j] - P[i] @ phi @ P[j] - R[i, j] / 4) for i in range(k) for j in range(k))
    return {"phi": phi, "P": P, "Q": Q, "R": R, "information": info, "W": W, "vcov": phi + 2 * phi @ adjust @ phi}


def dense_df(d, ell):
    """Kenward–Roger's m for one contrast (q = 1: E* and V* of Kenward & Roger 1997, section 4)."""
    phi, W = d["phi"], d["W"]
    theta = np.outer(ell, ell) / (ell @ phi @ ell)
    u = [theta @ phi @ p @ phi for p in d["P"]]
    tr = np.array([np.trace(x) for x in u])
    A1 = tr @ W @ tr
    A2 = sum(W[i, j] * np.trace(u[i] @ u[j]) for i in range(len(u)) for j in range(len(u)))
    B = (A1 + 6 * A2) / 2
    g = (2 * A1 - 5 * A2) / (3 * A2)
    c1, c2, c3 = g / (3 + 2 * (1 - g)), (1 - g) / (3 + 2 * (1 - g)), (3 - g) / (3 + 2 * (1 - g))
    E = 1 / (1 - A2)
    Vs = 2 * (1 + c1 * B) / ((1 - c2 * B) ** 2 * (1 - c3 * B))
    rho = Vs / (2 * E**2)
    return 4 + 3 / (rho - 1)


@pytest.mark.parametrize("case", [ar1_case, varident_case, varpower_case, varident_ar1_case])
def test_kenward_roger_matches_the_dense_formulas(case):
    """Reached: P, Q, information ≤ 2e-11 relative to their largest entry; R ≤ 1e-9 of Q's largest
    entry (the second differences' rounding); Φ_A ≤ 5e-11; df ≤ 6e-12.  Tolerances 1e-8 (R 1e-6)."""
    fit, residual_V, tau_r = case()
    kr = fit.kenward_roger
    V, tau_sigma = dense_V(fit, residual_V)
    tau = np.concatenate([tau_sigma, tau_r])
    G, H = dense_derivatives(V, tau)
    d = dense_kenward_roger(fit.spec.X, V(tau), G, H)
    assert len(kr.labels) == len(tau) and kr.labels[-1] == "sigma2"
    np.testing.assert_allclose(kr.unadjusted_vcov, d["phi"], rtol=1e-8, atol=1e-8 * np.abs(d["phi"]).max())
    for name, tol in (("P", 1e-8), ("Q", 1e-8), ("information", 1e-8), ("R", 1e-6)):
        mine, ref = getattr(kr, name), d[name]
        scale = np.abs(d["Q"] if name == "R" else ref).max()  # R is 0 up to rounding for a linear τ
        np.testing.assert_allclose(mine, ref, rtol=0, atol=tol * scale, err_msg=name)
    np.testing.assert_allclose(kr.vcov, d["vcov"], rtol=1e-8, atol=1e-8 * np.abs(d["vcov"]).max())
    for ell in np.eye(len(fit.fixef)):
        assert kr.df(ell) == pytest.approx(dense_df(d, ell), rel=1e-8)


def test_ar1_adjustment_uses_the_second_derivatives():
    """AR(1)'s V is not linear in φ: R_ij ≠ 0 and Φ_A moves with it (so the check above would fail
    without the ¼R_ij term)."""
    fit, _, _ = ar1_case()
    kr = fit.kenward_roger
    phi_idx = kr.labels.index("Phi")
    assert np.abs(kr.R[phi_idx, phi_idx]).max() > 1e-2 * np.abs(kr.Q).max()
    phi = kr.unadjusted_vcov
    without = kr.vcov + 0.5 * phi @ np.einsum("ij,ijab->ab", kr.param_vcov, kr.R) @ phi
    assert np.max(np.abs(without / kr.vcov - 1)) > 1e-3
    table = fit.fixef_table(ddf="kenward-roger")
    np.testing.assert_allclose(table["std_error"], np.sqrt(np.diag(kr.vcov)), rtol=1e-12)
    assert np.all(np.isfinite(table["df"])) and np.all(table["df"] > 2)
    aov = fit.anova(ddf="kenward-roger")
    assert aov.loc["c", "den_df"] == pytest.approx(table.loc["c", "df"], rel=1e-10)
    assert str(fit.summary(ddf="kenward-roger"))


def test_compound_symmetry_kenward_roger_equals_its_random_intercept_twin():
    """(0 + age_c | Subject) with compound symmetry ρ, and (1 | Subject) + (0 + age_c | Subject), at the
    same V (v_int = σ²ρ, σ_twin² = σ²(1 − ρ)): one model, τ related linearly, so the same Kenward–Roger
    numbers.  Unbalanced (7 rows dropped): df 24.2 … 25.2, an F test's λ 0.98.  Reached 4e-11."""
    d = orthodont().drop(index=[0, 5, 13, 30, 47, 66, 90]).reset_index(drop=True)
    fit = Model("distance ~ Sex*age_c + (0 + age_c | Subject)", d, correlation=CorCompSymm("Subject")).fit()
    twin = Model("distance ~ Sex*age_c + (1 | Subject) + (0 + age_c | Subject)", d).fit()
    rho, s2 = fit.residual_params["Rho"], fit.sigma**2
    assert rho > 0
    s2_twin = s2 * (1 - rho)
    variance = {"(Intercept)": s2 * rho, "age_c": s2 * fit.theta[0] ** 2}
    theta = np.array([np.sqrt(variance[b.columns[0]] / s2_twin) for b in twin.spec.blocks])
    theirs = KenwardRoger(twin.spec, theta, np.sqrt(s2_twin))
    ours = fit.kenward_roger
    assert ours.labels == ["Subject.age_c", "sigma2*Rho", "sigma2"]
    np.testing.assert_allclose(ours.vcov, theirs.vcov, rtol=1e-6)
    for ell in np.eye(4):
        assert ours.df(ell) == pytest.approx(theirs.df(ell), rel=1e-6)
    L = np.eye(4)[[1, 3]]
    a, b = ours.f_test(L, fit.fixef), theirs.f_test(L, fit.fixef)
    assert a["scale"] < 0.99  # not the trivial balanced case
    for key in ("F", "scale", "den_df"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)
    # and through the public route, against the twin's own fit (optimiser-close)
    np.testing.assert_allclose(fit.fixef_table(ddf="kenward-roger")["df"],
                               twin.fixef_table(ddf="kenward-roger")["df"], rtol=1e-4)


def test_kenward_roger_still_refuses_ml_fits():
    fit = Model("distance ~ Sex*age_c + (1 | Subject)", orthodont(), variance=VarIdent("Sex")).fit(method="ml")
    with pytest.raises(ModelError, match="REML fits only"):
        fit.fixef_table(ddf="kenward-roger")


# -- profiles ---------------------------------------------------------------------------------------------
CUTOFF = float(stats.chi2.ppf(0.95, 1))


class IndependentProfile:
    """The ML criterion of a structured model, D(θ, u, σ) (σ given) or profiled in σ, minimised by
    scipy's Nelder–Mead over what is free; ψ ∈ {Phi or a VarIdent ratio (u fixed), sigma}."""

    def __init__(self, fit):
        self.spec, self.crit = fit.spec, JointCriterion(fit.spec, reml=False)
        self.k = fit.spec.n_theta
        x0 = np.concatenate([fit.theta, fit.spec.residual.unconstrained(fit.residual_params)])
        best = self._min(self._joint, x0)
        self.base, self.x_hat = best.fun, best.x

    def _joint(self, x):
        if np.any(x[: self.k] < 0):
            return np.inf
        return self.crit(x)

    def with_sigma(self, x, sigma):
        if np.any(x[: self.k] < 0):
            return np.inf
        u = x[self.k:]
        f = self.crit.deviance(u).factor(x[: self.k])
        n = self.spec.n_obs
        return (f.logdet_Z + f.pwrss / sigma**2 + n * np.log(2 * np.pi * sigma**2)
                + self.spec.residual.log_det(u))

    @staticmethod
    def _min(f, x0):
        out = None
        for _ in range(2):  # restarted once: Nelder–Mead can stall before the minimum
            out = optimize.minimize(f, x0 if out is None else out.x, method="Nelder-Mead",
                                    options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000, "maxfev": 20000})
        return out

    def excess(self, name, v):
        """min D subject to ψ = v, minus the ML optimum."""
        if name == "sigma":
            return self._min(lambda x: self.with_sigma(x, v), self.x_hat).fun - self.base
        res = self.spec.residual
        natural = res.natural(self.x_hat[self.k:])
        natural[name] = v
        u = res.unconstrained(natural)
        got = self._min(lambda th: self._joint(np.concatenate([th, u])), self.x_hat[: self.k])
        return got.fun - self.base


def assert_crossing(indep, name, end):
    """The independent profile crosses the cutoff within 1e-4 relative of ``end``."""
    below, above = indep.excess(name, end * (1 - 1e-4)), indep.excess(name, end * (1 + 1e-4))
    assert (below - CUTOFF) * (above - CUTOFF) < 0, (name, end, below, above)


@pytest.fixture(scope="module")
def ovary_intervals():
    fit = ar1_case()[0]
    return fit, fit.confint()


def test_ovary_ar1_profile_ends_are_crossings(ovary_intervals):
    """Phi (0.440, 0.694 around 0.572) and σ (3.06, 4.14): each end within 1e-4 of the independent
    profile's crossing (reached ≤ 5e-9).  Sanity only, not asserted: nlme 3.1-162's intervals() (Wald on a transformed
    scale, REML) gives Phi 0.431 … 0.686 and σ 3.02 … 4.07."""
    fit, ci = ovary_intervals
    assert ci.loc["Phi", "estimate"] == pytest.approx(fit.residual_params["Phi"])
    indep = IndependentProfile(fit)
    for name in ("Phi", "sigma"):
        lo, hi = ci.loc[name, "lower"], ci.loc[name, "upper"]
        assert lo < ci.loc[name, "estimate"] < hi
        assert_crossing(indep, name, lo)
        assert_crossing(indep, name, hi)
    assert ci.attrs["notes"] == [n for n in ci.attrs["notes"] if n.startswith("sd_s|Mare")]


def test_orthodont_varident_ratio_profile_ends_are_crossings():
    """The females' sd ratio 0.409: (0.293, 0.587), crossings reached within 5e-8."""
    fit = varident_case()[0]
    prof = Profiler(fit)
    p = next(q for q in prof.params if q.label == "Female")
    lo, hi, notes = prof.interval(p, 0.95)
    assert lo < fit.residual_params["Female"] < hi and notes == []
    indep = IndependentProfile(fit)
    assert_crossing(indep, "Female", lo)
    assert_crossing(indep, "Female", hi)


def test_compound_symmetry_and_twin_give_the_same_slope_interval():
    """The slope's sd is the same parameter in both models, and their ML deviances are one function
    (ρ stays > 0 along the profile): the same interval, 0 (a boundary) to 0.3386, to 1e-5 (reached
    6e-8 on the upper end)."""
    d = orthodont()
    fit = Model("distance ~ Sex*age_c + (0 + age_c | Subject)", d, correlation=CorCompSymm("Subject")).fit()
    twin = Model("distance ~ Sex*age_c + (1 | Subject) + (0 + age_c | Subject)", d).fit()
    ends = []
    for f in (fit, twin):
        prof = Profiler(f)
        p = next(q for q in prof.params if q.label == "sd_age_c|Subject")
        ends.append(prof.interval(p, 0.95)[:2])
    np.testing.assert_allclose(ends[0], ends[1], rtol=1e-5)


def test_a_residual_profile_that_reaches_its_boundary_ends_there():
    """CAR(1)'s φ is bounded below by 0 (independence, a regular point): on 48 simulated rows with no
    correlation the profile stays below the cutoff down to 0 and the interval ends there, noted."""
    fit = car1_simulated(1)
    prof = Profiler(fit)
    p = next(q for q in prof.params if q.label == "Phi")
    lo, hi, notes = prof.interval(p, 0.95)
    assert lo == 0.0 and fit.residual_params["Phi"] < hi < 1
    assert any("ends there (0)" in n for n in notes)
    assert prof.profile(p, 1e-6) < CUTOFF


def car1_simulated(seed):
    """48 rows, 8 groups of 6 times, no residual correlation in truth."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(8), 6)
    d = pd.DataFrame({"y": rng.normal(size=8)[g] + rng.normal(size=48), "t": np.tile(np.arange(6.0), 8),
                      "g": g.astype(str)})
    return Model("y ~ t + (1 | g)", d, correlation=CorCAR1("g", "t")).fit()


def test_kenward_roger_refuses_a_residual_parameter_at_its_bound():
    """Seed 0: φ̂ = 2.8e-9, CAR(1)'s bound 0; the differences cannot straddle it.  Satterthwaite's df
    (in the unconstrained ρ) remain."""
    fit = car1_simulated(0)
    assert fit.residual_params["Phi"] < 1e-6
    with pytest.raises(ModelError, match="Phi 2.78.*bound of its range.*satterthwaite"):
        fit.fixef_table(ddf="kenward-roger")
