"""Residual structures (R = σ²Λ_R(ρ)) sampled by NUTS: the explicit PyMC graph with whitened residuals.

* The model's log density at several points equals a dense reference: y ~ MvNormal(Xβ + Zb, σ²Λ_R)
  by scipy, Λ_R built from each structure's definition (``residual.relative_covariance``), plus the
  same priors by scipy (asserted 1e-8 absolute; reached ≤ 2e-9 for AR(1), where the dense MvNormal's
  own rounding on log densities of order 10³ dominates, ≤ 5e-13 for the other structures).
* Ovary AR(1) and BodyWeight varPower: posterior medians of β against nlme/REML (numbers below).
* Save/load, prior overrides and bad prior names, refusals of what a correlation structure rules out.
* An SBC smoke (20 simulations, AR(1) with a random intercept), 200 behind ``slow``.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import CorAR1, CorCAR1, CorCompSymm, Model, Prior, VarExp, VarFixed, VarIdent, VarPower
from bayeslmm.bayes.model import build_pymc_model, centring_matrix
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.errors import BayesLMMError
from bayeslmm.residual import relative_covariance
from conftest import (NLME_MODELS, thinned_rank, nlme_reference_data as reference_data,
                      residual_small_data as small_data)

pm = pytest.importorskip("pymc")

DATA = Path(__file__).resolve().parents[1] / "data"
REF = NLME_MODELS


# -- the log density against a dense reference ------------------------------------------------------
STRUCTURES = {
    "ar1_gaps_varident": dict(variance=VarIdent("s"), correlation=CorAR1("g", time="t")),
    "car1_varpower": dict(variance=VarPower("v"), correlation=CorCAR1("g", "tc")),
    "compsymm_varexp_weights": dict(variance=VarExp("v"), correlation=CorCompSymm("g"), weights="w"),
    "varfixed": dict(variance=VarFixed("v")),
}
#: residual parameter values at the points checked (a negative φ exercises AR(1)'s odd gaps)
NATURAL = [{"s_b": 1.7, "b": 1.7, "power": 0.6, "expon": -0.4, "Phi": -0.45, "Rho": 0.3},
           {"s_b": 0.6, "b": 0.6, "power": -1.2, "expon": 0.8, "Phi": 0.8, "Rho": -0.1}]


def _value_point(model, natural: dict) -> dict:
    """The model's point (transformed values) for natural values by variable name."""
    point = {}
    for rv in model.free_RVs:
        value = np.asarray(natural[rv.name], dtype=float)
        tr = model.rvs_to_transforms.get(rv)
        vv = model.rvs_to_values[rv]
        point[vv.name] = value if tr is None else tr.forward(value, *rv.owner.inputs).eval()
    return point


def _prior_logp(prior: Prior, x) -> float:
    p = prior.params
    x = np.asarray(x, dtype=float)
    f = {"Normal": lambda: stats.norm.logpdf(x, p.get("mu", 0.0), p["sigma"]),
         "Exponential": lambda: stats.expon.logpdf(x, scale=1.0 / p["lam"]),
         "HalfNormal": lambda: stats.halfnorm.logpdf(x, scale=p["sigma"]),
         "LogNormal": lambda: stats.lognorm.logpdf(x, s=p["sigma"], scale=np.exp(p.get("mu", 0.0))),
         "Uniform": lambda: stats.uniform.logpdf(x, p["lower"], p["upper"] - p["lower"])}[prior.family]
    return float(np.sum(f()))


def dense_logp(spec, priors, natural: dict) -> float:
    """log p(y, θ) by scipy: MvNormal(Xβ + Zb, σ²Λ_R(ρ)) and every prior (uncorrelated blocks)."""
    beta = centring_matrix(spec, priors) @ natural["beta_c"]
    mu = spec.X @ beta
    out = sum(_prior_logp(pr, b) for pr, b in zip(priors.beta, natural["beta_c"]))
    out += _prior_logp(priors.sigma, natural["sigma"])
    for block, bp in zip(spec.blocks, priors.blocks):
        sd, z = natural[f"{block.group}_sd"], natural[f"{block.group}_z"]
        out += _prior_logp(bp.sd, sd) + float(np.sum(stats.norm.logpdf(z)))
        mu = mu + np.sum(block.Z * (z * sd)[block.codes], axis=1)
    res = spec.residual
    out += sum(_prior_logp(pr, natural[name]) for name, pr in priors.residual)
    u = res.unconstrained({n: natural[f"residual_{n}"] for n in res.names})
    V = natural["sigma"] ** 2 * relative_covariance(res, u, np.arange(spec.n_obs))
    return out + float(stats.multivariate_normal.logpdf(spec.y, mu, V))


def _check_against_dense(model_obj, point_values):
    spec = model_obj.spec
    priors = resolve_priors(spec, None)
    built = build_pymc_model(spec, model_obj.crossprods, priors, "explicit")
    logp = built.model.compile_logp(jacobian=False)
    rng = np.random.default_rng(5)
    gaps = []
    for values in point_values:
        natural = {"beta_c": np.array([pr.params.get("mu", 0.0) for pr in priors.beta]) + rng.normal(size=spec.n_fixed),
                   "sigma": 1.3}
        for block in spec.blocks:
            natural[f"{block.group}_sd"] = rng.uniform(0.5, 2.0, block.q)
            natural[f"{block.group}_z"] = rng.normal(size=(block.n_levels, block.q))
        natural.update({f"residual_{n}": values[n] for n in spec.residual.names})
        if isinstance(spec.residual.correlation and spec.residual.correlation.structure, CorCAR1):
            natural["residual_Phi"] = abs(values["Phi"])  # CAR(1): 0 < φ < 1
        got = float(logp(_value_point(built.model, natural)))
        want = dense_logp(spec, priors, natural)
        gaps.append(abs(got - want))
        assert got == pytest.approx(want, abs=1e-8, rel=0)
    return gaps


@pytest.mark.parametrize("key", list(STRUCTURES))
def test_log_density_equals_the_dense_multivariate_normal(key):
    m = Model("y ~ x + (1 | g)", small_data(), **STRUCTURES[key])
    _check_against_dense(m, NATURAL)


def test_log_density_on_ovary_ar1_row_order():
    ref = REF["ovary_ar1"]
    m = Model(ref["formula_py"], reference_data(ref), correlation=CorAR1("Mare"))
    _check_against_dense(m, NATURAL)


def test_the_jacobian_sign_matters():
    """The check can fail: the dense density with the opposite sign of ½log|Λ_R| differs by log|Λ_R|."""
    m = Model("y ~ x + (1 | g)", small_data(), **STRUCTURES["car1_varpower"])
    res = m.spec.residual
    u = res.unconstrained({"power": 0.6, "Phi": 0.45})
    assert abs(res.log_det(u)) > 1.0   # so a wrong sign would be seen far above 1e-8


# -- the posterior against REML ----------------------------------------------------------------------
CASES = {"ovary_ar1": dict(correlation=CorAR1("Mare")), "bodyweight_varpower_time": dict(variance=VarPower("Time"))}


def _medians_in_sds(key: str, chains: int, draws: int, seed: int):
    ref = REF[key]
    m = Model(ref["formula_py"], reference_data(ref), **CASES[key])
    reml = m.fit()
    fit = m.fit(method="nuts", chains=chains, draws=draws, tune=draws, random_seed=seed, progressbar=False,
                warn=False)
    fe = fit.fixef_table()
    gap = ((fe["median"] - reml.fixef) / fe["std_error"]).abs()
    return gap, fit, reml


def test_posterior_medians_of_beta_near_reml_on_the_graph():
    """The PyMC graph (every effect sampled, O(N) per gradient), still there as an explicit choice."""
    ref = REF["ovary_ar1"]
    m = Model(ref["formula_py"], reference_data(ref), **CASES["ovary_ar1"])
    fit = m.fit(method="nuts", chains=2, draws=500, tune=500, random_seed=11, progressbar=False, warn=False,
                route="graph")
    gap = ((fit.fixef_table()["median"] - m.fit().fixef) / fit.fixef_table()["std_error"]).abs()
    # the Monte Carlo error of a median is ~1.25/√ESS ≈ 0.06–0.08 sd with 2 × 500 draws: 0.3 sd asserted
    assert gap.max() < 0.3, gap
    assert fit.route == "graph-explicit"   # the graph samples every effect of a structured model
    assert fit.parameterization == "explicit" and fit.timings["backend"] == "pytensor"   # the older names


@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k.startswith("bodyweight") else k
                                 for k in CASES])   # BodyWeight's 4 × 2000 takes ~16 s: behind slow
def test_posterior_medians_of_beta_within_a_tenth_of_a_posterior_sd_of_reml(key):
    """The issue's 0.1 posterior sd with 4 × 2000 draws, by the default route (the structured kernel:
    reached ≤ 0.04 on both); the residual parameter's posterior mean within 3 sd of nlme's estimate."""
    gap, fit, reml = _medians_in_sds(key, 4, 2000, 12)
    assert gap.max() < 0.1, gap
    assert fit.route == "structured"
    nat = fit.residual_table()["estimate"]
    name, value = next(iter(reml.residual_params.items()))
    assert abs(nat[f"residual_{name}"] - value) < 3 * fit.residual_table()["std_error"][f"residual_{name}"]


# -- priors, save/load, refusals -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ar1_model():
    return Model("y ~ x + (1 | g)", small_data(1), variance=VarIdent("s"), correlation=CorAR1("g"))


def test_default_residual_priors_are_in_prior_summary(ar1_model):
    table = resolve_priors(ar1_model.spec, None).table(ar1_model.spec).set_index("parameter")
    assert table.loc["residual_b", "prior"] == "LogNormal(mu=0, sigma=1)"
    assert table.loc["residual_Phi", "prior"] == "Uniform(lower=-1, upper=1)"
    assert table.loc["residual_Phi", "class"] == "residual structure"


def test_prior_overrides_of_residual_parameters(ar1_model):
    spec = ar1_model.spec
    priors = resolve_priors(spec, {"residual_Phi": Prior("Uniform", lower=0.5, upper=0.9),
                                   "residual_b": Prior("HalfNormal", sigma=2.0)})
    table = priors.table(spec).set_index("parameter")
    assert table.loc["residual_Phi", "prior"] == "Uniform(lower=0.5, upper=0.9)"
    assert table.loc["residual_b", "prior"] == "HalfNormal(sigma=2)"
    # the override is the one the model uses: φ = 0.3 lies outside its support, 0.7 has density 1/0.4
    model = build_pymc_model(spec, ar1_model.crossprods, priors, "explicit").model
    assert float(pm.logp(model["residual_Phi"], 0.3).eval()) == -np.inf
    assert float(pm.logp(model["residual_Phi"], 0.7).eval()) == pytest.approx(np.log(1 / 0.4), abs=1e-12)


@pytest.mark.parametrize("overrides, match", [
    ({"Phi": Prior("Uniform", lower=0, upper=1)}, "residual parameter \\['residual_b', 'residual_Phi'\\]"),
    ({"residual_Phi": Prior("Normal", mu=0, sigma=1)}, "takes Uniform"),
    ({"residual_Phi": Prior("Uniform", lower=-2, upper=1)}, "inside the parameter's range"),
    ({"residual_b": Prior("Normal", mu=0, sigma=1)}, "unknown or unsuitable"),
])
def test_bad_residual_priors_are_refused(ar1_model, overrides, match):
    with pytest.raises(BayesLMMError, match=match):
        resolve_priors(ar1_model.spec, overrides)


@pytest.fixture(scope="module")
def small_fit(ar1_model):
    return ar1_model.fit(method="nuts", chains=2, draws=100, tune=100, random_seed=3, progressbar=False, warn=False)


def test_save_load_round_trip(small_fit, tmp_path):
    from bayeslmm import load

    path = small_fit.save(tmp_path / "ar1.nc")
    back = load(path)
    assert back.spec.residual is not None and back.residual_structure == small_fit.residual_structure
    pd.testing.assert_frame_equal(back.prior_summary(), small_fit.prior_summary())
    for var in ("residual_Phi", "residual_b", "beta", "sigma"):
        np.testing.assert_array_equal(back.posterior[var].to_numpy(), small_fit.posterior[var].to_numpy())
    assert "residual_Phi" in str(back.summary()) and "Residual structure:" in str(back.summary())


def test_what_a_correlation_structure_rules_out_is_refused(small_fit, ar1_model):
    """Predictive draws, ICC and R² know the structure (tests/bayes/test_residual_nuts_results.py);
    a pointwise log-likelihood (LOO) and the σ²I kernels are refused."""
    with pytest.raises(BayesLMMError, match="leave-one-group-out"):
        small_fit.loo()
    assert np.isfinite(small_fit.posterior_predictive().to_numpy()).all()
    assert np.isfinite(small_fit.predict(predictive=True)["sd"]).all()
    assert np.isfinite(small_fit.icc()["mean"]).all() and np.isfinite(small_fit.r2()["mean"]).all()
    with pytest.raises(BayesLMMError, match="route='blocked' cannot fit this model.*sample R = σ²I"):
        ar1_model.fit(method="nuts", route="blocked")
    with pytest.raises(BayesLMMError, match="log_likelihood=True"):
        ar1_model.fit(method="nuts", log_likelihood=True)


# -- simulation-based calibration ------------------------------------------------------------------------
def _sbc_ranks(n_sims: int, random_seed: int, n_ranks: int = 39):
    """Ranks of the truth among thinned draws for y ~ x + (1|g), AR(1) within g: one compiled model
    (nutpie), each simulation's response swapped in (its ``y_data``)."""
    import nutpie

    from bayeslmm.bayes.sbc import draw_prior, fixed_priors

    data = small_data(2, groups=10, per=5)
    m = Model("y ~ x + (1 | g)", data, correlation=CorAR1("g"))
    spec = m.spec
    priors = resolve_priors(spec, fixed_priors(spec))
    params = draw_prior(spec, priors, n_sims, random_seed)
    phis = pm.draw(priors.residual[0][1].dist(), draws=n_sims, random_seed=random_seed + 1)
    compiled = nutpie.compile_pymc_model(build_pymc_model(spec, m.crossprods, priors, "explicit").model)
    block = spec.blocks[0]
    ranks = {q: [] for q in ("beta0", "beta1", "sigma", "g_sd", "Phi")}
    for i in range(n_sims):
        rng = np.random.default_rng([random_seed, i])
        u = spec.residual.unconstrained({"Phi": float(phis[i])})
        chol = np.linalg.cholesky(relative_covariance(spec.residual, u, np.arange(spec.n_obs)))
        b = rng.standard_normal(block.n_levels) * params["g_sd"][i, 0]
        y = spec.X @ params["beta"][i] + b[block.codes] + params["sigma"][i] * chol @ rng.standard_normal(spec.n_obs)
        post = nutpie.sample(compiled.with_data(y_data=y), draws=200, tune=200, chains=2, cores=1,
                             seed=random_seed * 1000 + i, progress_bar=False)["posterior"]
        draws = {"beta0": post["beta"][..., 0], "beta1": post["beta"][..., 1], "sigma": post["sigma"],
                 "g_sd": post["g_sd"][..., 0], "Phi": post["residual_Phi"]}
        truth = {"beta0": params["beta"][i, 0], "beta1": params["beta"][i, 1], "sigma": params["sigma"][i],
                 "g_sd": params["g_sd"][i, 0], "Phi": float(phis[i])}
        for q, d in draws.items():
            ranks[q].append(thinned_rank(d, truth[q], n_ranks))
    return {q: np.array(r) for q, r in ranks.items()}, n_ranks


def _check_uniform(ranks: dict, n_ranks: int, ci_prob: float):
    from bayeslmm.bayes.sbc import ecdf_test

    out = {q: ecdf_test(r, n_ranks, ci_prob=ci_prob) for q, r in ranks.items()}
    bad = {q: t["p_value"] for q, t in out.items() if t["outside_band"]}
    assert not bad, bad
    return out


@pytest.mark.slow   # the default route's (the structured kernel's) SBC smoke runs in tests/bayes/test_sbc_structured.py
def test_sbc_smoke_ar1_random_intercept():
    ranks, n_ranks = _sbc_ranks(20, random_seed=4)
    # 20 simulations see only gross miscalibration (a wrong Jacobian or whitening moves every rank of
    # Phi and sigma to one end); a 0.99 simultaneous band over five quantities
    _check_uniform(ranks, n_ranks, 0.99)


@pytest.mark.slow
def test_sbc_ar1_random_intercept_200():
    ranks, n_ranks = _sbc_ranks(200, random_seed=5)
    _check_uniform(ranks, n_ranks, 0.99)
