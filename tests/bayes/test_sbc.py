"""Simulation-based calibration of the collapsed sampler, and the checks it rests on.

The default suite runs a 20-simulation smoke test of ``y ~ x + (1 + x | g)`` (12 groups
× 6 rows, LKJ prior; one nutpie compilation shared by the module) with the
log-likelihood rank and interval coverage, a negative control on the same compiled
model, and fast tests of the ingredients: the prior draws, the simulator, the
marginal log-likelihood, the chi-square, ECDF and Clopper–Pearson checks.
`make test-slow` runs 200 simulations; `make sbc` runs the full study
(validation/run_sbc.py, docs/calibration.md).
"""

import numpy as np
import pytest
from scipy import stats

from bayeslmm import Model, Prior
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.bayes.sbc import (
    LOGLIK,
    SBCResult,
    SBCRunner,
    chi2_uniformity,
    coverage_interval,
    draw_prior,
    ecdf_band,
    ecdf_statistic,
    ecdf_test,
    fixed_priors,
    marginal_loglik,
    simulate_response,
    simulation_based_calibration,
)
from bayeslmm.errors import BayesLMMError
from bayeslmm.simulate import simulate_lmm

QUANTITIES = ["beta[(Intercept)]", "beta[x]", "sigma", "sd[g|(Intercept)]", "sd[g|x]", "corr[g|(Intercept),x]",
              LOGLIK]
N_SMOKE = 20


def _spec(n_groups=12, n_per_group=6, seed=1):
    data = simulate_lmm(n_groups=n_groups, n_per_group=n_per_group, random_seed=seed)
    return Model("y ~ x + (1 + x | g)", data).spec


@pytest.fixture(scope="module")
def runner():
    r = SBCRunner(_spec(), N_SMOKE, draws=300, tune=300, chains=2, n_ranks=99, random_seed=2026)
    r.compile()
    return r


@pytest.fixture(scope="module")
def smoke(runner):
    seen = []
    result = runner.run(on_result=seen.append)
    return result, seen


# ------------------------------------------------------------------------------ the smoke run
def test_sbc_smoke_ranks_uniform(smoke):
    result, seen = smoke
    assert list(result.quantities) == QUANTITIES
    assert len(result.records) == N_SMOKE and len(seen) == N_SMOKE and result.n_ranks == 99
    ranks = result.ranks.to_numpy()
    assert (ranks >= 0).all() and (ranks <= 99).all()
    assert result.ranks.std().min() > 12          # spread over the range, not piled (uniform: 28.9)
    # 7 quantities × 2 tests, 1e-3 overall: a miscalibrated sampler piles ranks at the ends or the middle
    threshold = 1e-3 / 14
    chi = result.uniformity(bins=5)
    assert (chi.p_value > threshold).all(), chi
    ec = result.ecdf(ci_prob=0.95)
    assert (ec.p_value > threshold).all(), ec


def test_sbc_smoke_coverage_within_binomial_bounds(smoke):
    result, _ = smoke
    cov = result.coverage(ci_prob=1 - 1e-3 / 14)    # Clopper–Pearson, Bonferroni over 14 intervals
    assert set(cov.nominal) == {0.5, 0.9} and len(cov) == 14
    assert (cov.n == N_SMOKE).all()
    assert cov.consistent.all(), cov
    # the coverage flags agree with the ranks: a truth in the central 90 % interval has a middle rank
    r = result.records
    for q in QUANTITIES:
        extreme = (r[f"rank:{q}"] <= 1) | (r[f"rank:{q}"] >= 98)
        assert not (extreme & r[f"in50:{q}"]).any()


def test_sbc_smoke_fits_are_healthy(smoke):
    result, _ = smoke
    r = result.records
    # 600 draws a fit: ESS mostly above the 99 thinned draws, never collapsed
    assert r.min_ess_bulk.median() > 100 and (r.min_ess_bulk > 20).all(), r.min_ess_bulk.describe()
    assert (r.max_rhat < 1.1).all(), r.max_rhat.describe()
    assert (r.divergences >= 0).all()


def test_sbc_loglik_truth_is_marginal_likelihood_at_truth(runner):
    spec = runner.spec
    y, effects = runner.simulate(4)
    p = runner.params
    L = p["g_sd"][4][:, None] * p["g_corr_chol"][4]
    G = L @ L.T
    blk = spec.blocks[0]
    Z = np.zeros((spec.n_obs, blk.n_levels * 2))
    Z[np.arange(spec.n_obs)[:, None], 2 * blk.codes[:, None] + np.arange(2)] = blk.Z
    V = Z @ np.kron(np.eye(blk.n_levels), G) @ Z.T + p["sigma"][4] ** 2 * np.eye(spec.n_obs)
    dense = stats.multivariate_normal(spec.X @ p["beta"][4], V).logpdf(y)
    assert runner.truth(4)[LOGLIK] == pytest.approx(dense, rel=1e-10)


def test_sbc_resumes_to_the_same_records(runner, smoke):
    """Simulation i alone gives the record it had in the full run: a stopped run can resume."""
    _, seen = smoke
    again = runner.run_one(7)
    first = seen[7]
    assert again.keys() == first.keys()
    for k, v in first.items():
        if k != "seconds":
            assert again[k] == v, k


def test_sbc_negative_control_detected(runner):
    """Truths from another prior than the fitted model's: the checks must fail.

    The sd of the random slope is drawn from HalfNormal(4) while the fitted model assumes
    HalfNormal(1): posteriors of that sd are pulled below the truth (12 groups say little
    about it), so its ranks pile at the top and its intervals cover too little.  Same
    compiled model, no recompilation.
    """
    wrong = {**fixed_priors(runner.spec), "g": {"sd": Prior("HalfNormal", sigma=[1.0, 4.0]), "eta": 1.0}}
    control = runner.with_simulation_priors(wrong, random_seed=99)
    assert control._compiled is runner._compiled
    result = control.run()
    ec = result.ecdf(ci_prob=0.95)
    assert ec.loc["sd[g|x]", "outside_band"] and ec.loc["sd[g|x]", "p_value"] < 1e-3, ec
    assert result.ranks["sd[g|x]"].mean() > 65                 # uniform: 49.5
    cov = result.coverage(ci_prob=0.99).set_index(["quantity", "nominal"])
    assert not cov.loc[("sd[g|x]", 0.9), "consistent"], cov


# ------------------------------------------------------------------------------ prior draws and the simulator
def test_fixed_priors_do_not_depend_on_the_data():
    a, b = _spec(seed=1), _spec(seed=5)
    ta = resolve_priors(a, fixed_priors(a)).table(a)
    tb = resolve_priors(b, fixed_priors(b)).table(b)
    assert ta.prior.tolist() == tb.prior.tolist()
    assert "LKJ(eta=1)" in ta.prior.tolist() and "Exponential(lam=1)" in ta.prior.tolist()


def test_draw_prior_matches_the_priors():
    spec = _spec()
    priors = resolve_priors(spec, {**fixed_priors(spec), "g": {"sd": Prior("HalfNormal", sigma=[1.0, 0.5]),
                                                               "eta": 3.0}})
    n = 4000
    d = draw_prior(spec, priors, n, random_seed=3)
    assert d["beta"].shape == (n, 2) and d["g_sd"].shape == (n, 2) and d["g_corr_chol"].shape == (n, 2, 2)
    # LKJ(η) on a 2×2 correlation: (r + 1)/2 ~ Beta(η, η)
    R = d["g_corr_chol"] @ np.swapaxes(d["g_corr_chol"], 1, 2)
    assert np.allclose(np.diagonal(R, axis1=1, axis2=2), 1.0)
    assert stats.kstest((R[:, 1, 0] + 1) / 2, stats.beta(3, 3).cdf).pvalue > 1e-3
    assert stats.kstest(d["g_sd"][:, 0], stats.halfnorm(scale=1.0).cdf).pvalue > 1e-3
    assert stats.kstest(d["g_sd"][:, 1], stats.halfnorm(scale=0.5).cdf).pvalue > 1e-3
    assert stats.kstest(d["sigma"], stats.expon(scale=1.0).cdf).pvalue > 1e-3
    # β on the original scale; the model's prior is on the intercept at the mean of x
    xbar = spec.X[:, 1].mean()
    beta_c0 = d["beta"][:, 0] + xbar * d["beta"][:, 1]
    assert stats.kstest(beta_c0, stats.norm(0, 2.5).cdf).pvalue > 1e-3
    assert stats.kstest(d["beta"][:, 1], stats.norm(0, 2.5).cdf).pvalue > 1e-3


def test_simulate_response_has_the_model_covariance():
    spec = _spec(n_groups=3, n_per_group=4)
    beta, sigma = np.array([0.5, -1.0]), 0.7
    sd, R = np.array([1.2, 0.6]), np.linalg.cholesky(np.array([[1.0, -0.4], [-0.4, 1.0]]))
    rng = np.random.default_rng(0)
    ys = np.array([simulate_response(spec, beta, sigma, [sd], [R], rng)[0] for _ in range(20_000)])
    G = (sd[:, None] * R) @ (sd[:, None] * R).T
    blk = spec.blocks[0]
    same = blk.codes[:, None] == blk.codes[None, :]
    V = np.where(same, blk.Z @ G @ blk.Z.T, 0.0) + sigma**2 * np.eye(spec.n_obs)
    assert np.abs(ys.mean(axis=0) - spec.X @ beta).max() < 0.05
    assert np.abs(np.cov(ys.T) - V).max() < 0.12 * V.max()


def test_marginal_loglik_matches_dense_normal_for_many_draws():
    spec = _spec(n_groups=5, n_per_group=3)
    runner_free = resolve_priors(spec, fixed_priors(spec))
    d = draw_prior(spec, runner_free, 6, random_seed=8)
    from bayeslmm.bayes.collapsed import CollapsedData
    from bayeslmm.crossprod import CrossProducts

    data = CollapsedData.from_crossprods(CrossProducts.from_spec(spec))
    L = d["g_sd"][:, :, None] * d["g_corr_chol"]
    got = marginal_loglik(data, d["beta"], L, d["sigma"])
    blk = spec.blocks[0]
    same = blk.codes[:, None] == blk.codes[None, :]
    for s in range(6):
        G = L[s] @ L[s].T
        V = np.where(same, blk.Z @ G @ blk.Z.T, 0.0) + d["sigma"][s] ** 2 * np.eye(spec.n_obs)
        want = stats.multivariate_normal(spec.X @ d["beta"][s], V).logpdf(spec.y)
        assert got[s] == pytest.approx(want, rel=1e-10)


# ------------------------------------------------------------------------------ the checks
def test_ecdf_test_has_its_size_and_power():
    rng = np.random.default_rng(11)
    n, L = 200, 99
    rejections = sum(ecdf_test(rng.integers(0, L + 1, n), L, ci_prob=0.95)["outside_band"] for _ in range(400))
    assert 0.02 <= rejections / 400 <= 0.085          # simultaneous 95 % band: about 5 % of uniform samples leave it
    # ranks of a posterior too narrow by 30 % (truth ~ N(0,1), draws ~ N(0, 0.7²)): ∪-shaped
    truth = rng.standard_normal(n)
    ranks = (rng.normal(0, 0.7, (n, L)) < truth[:, None]).sum(axis=1)
    out = ecdf_test(ranks, L, ci_prob=0.95)
    assert out["outside_band"] and out["p_value"] < 1e-3
    # a posterior shifted by half its sd: ranks lean to one side
    ranks = (rng.normal(0.5, 1.0, (n, L)) < truth[:, None]).sum(axis=1)
    assert ecdf_test(ranks, L)["p_value"] < 0.01


def test_ecdf_band_is_the_test():
    n, L = 150, 49
    z, lower, upper = ecdf_band(n, L, ci_prob=0.95)
    assert np.all(lower <= z) and np.all(z <= upper) and np.all(lower >= 0) and np.all(upper <= 1)
    rng = np.random.default_rng(5)
    for _ in range(200):
        ranks = rng.integers(0, L + 1, n)
        ecdf = np.cumsum(np.bincount(ranks, minlength=L + 1))[:-1] / n
        outside = bool(np.any(ecdf < lower - 1e-12) | np.any(ecdf > upper + 1e-12))
        assert outside == ecdf_test(ranks, L, ci_prob=0.95)["outside_band"]
    # the statistic is the smallest two-sided binomial tail probability
    ranks = np.array([0, 0, 0, 0, 49])                # 4 of 5 below rank 1, where 1/50 are expected
    p = 1 / 50
    assert ecdf_statistic(ranks, L) == pytest.approx(2 * (5 * p**4 * (1 - p) + p**5), rel=1e-9)


def test_chi2_uses_exact_expected_counts():
    ranks = np.arange(100)                            # every rank of 0..99 once: perfectly uniform
    chi2, p, obs, expected = chi2_uniformity(ranks, 99, bins=10)
    assert chi2 == pytest.approx(0.0) and p == pytest.approx(1.0) and obs.tolist() == [10] * 10
    chi2, p, obs, expected = chi2_uniformity(np.arange(101), 100, bins=7)   # 101 values in 7 unequal bins
    assert obs.sum() == 101 and np.allclose(obs, expected) and chi2 == pytest.approx(0.0)
    assert chi2_uniformity(np.zeros(50, int), 99, bins=10)[1] < 1e-20
    with pytest.raises(BayesLMMError, match="bins"):
        chi2_uniformity(ranks, 99, bins=1)


def test_coverage_interval_is_clopper_pearson():
    lo, hi = coverage_interval(45, 100, ci_prob=0.99)
    assert lo == pytest.approx(stats.beta.ppf(0.005, 45, 56), rel=1e-8)
    assert hi == pytest.approx(stats.beta.ppf(0.995, 46, 55), rel=1e-8)
    assert coverage_interval(0, 20, 0.99)[0] == 0.0 and coverage_interval(20, 20, 0.99)[1] == 1.0


def test_result_tables_from_records():
    rng = np.random.default_rng(2)
    n = 300
    rec = {"sim": np.arange(n)}
    rec["rank:a"] = rng.integers(0, 100, n)
    rec["truth:a"] = rng.standard_normal(n)
    rec["in50:a"] = rng.random(n) < 0.5
    rec["in90:a"] = rng.random(n) < 0.6               # 90 % intervals covering 60 %: flagged
    import pandas as pd

    res = SBCResult.from_records(pd.DataFrame(rec), n_ranks=99)
    assert res.quantities == ("a",)
    tab = res.table(bins=10)
    assert tab.loc["a", "cov50_ok"] and not tab.loc["a", "cov90_ok"]
    assert tab.loc["a", "cov90"] == pytest.approx(rec["in90:a"].mean())


def test_sbc_arguments_are_checked():
    spec = _spec(n_groups=4, n_per_group=3)
    with pytest.raises(BayesLMMError, match="n_ranks"):
        SBCRunner(spec, 2, draws=20, chains=2, n_ranks=99)
    with pytest.raises(BayesLMMError, match="sampler"):
        SBCRunner(spec, 2, sampler="stan")
    with pytest.raises(BayesLMMError, match="n_sims"):
        SBCRunner(spec, 0)
    with pytest.raises(BayesLMMError, match="ci_probs"):
        SBCRunner(spec, 2, ci_probs=(0.5, 1.5))
    r = SBCRunner(spec, 2, draws=50, n_ranks=20)
    with pytest.raises(BayesLMMError, match="simulation index"):
        r.simulate(2)


@pytest.mark.slow
def test_sbc_long():
    """200 simulations: ranks uniform (chi-square and ECDF) and coverage within 99.9 % bounds."""
    result = simulation_based_calibration(_spec(), n_sims=200, draws=500, tune=500, chains=2, random_seed=7)
    threshold = 0.01 / 14
    assert (result.uniformity(bins=10).p_value > threshold).all()
    assert (result.ecdf().p_value > threshold).all()
    assert result.coverage(ci_prob=1 - 1e-3 / 14).consistent.all()
