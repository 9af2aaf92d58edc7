"""The compiled collapsed log-posterior (bayes/kernel.py): value, gradient, and its posterior."""

import numpy as np
import pytest
import scipy.stats as st

from bayeslmm import Model, Prior
from bayeslmm.bayes.collapsed import CollapsedData, collapsed_loglik
from bayeslmm.bayes.fit import kernel_model
from bayeslmm.bayes.kernel import KernelData, unsupported_reason
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.errors import BayesLMMError
from conftest import scale_logpdf

FORMULAS = ["Reaction ~ Days + (Days | Subject)", "Reaction ~ Days + (1 | Subject)",
            "Reaction ~ Days + (Days || Subject)", "Reaction ~ 0 + Days + (Days | Subject)"]
PRIORS = [None,
          {"sigma": Prior("HalfStudentT", nu=3, sigma=20), "Subject": {"sd": Prior("HalfCauchy", beta=10),
                                                                       "eta": 2.5}},
          {"sigma": Prior("HalfNormal", sigma=40), "Subject": {"sd": Prior("Exponential", lam=0.1)}}]


def _kernel(formula, priors):
    m = Model(formula, "sleepstudy")
    prior_set = resolve_priors(m.spec, priors)
    built, kd = kernel_model(m.spec, m.crossprods, prior_set)
    return m, prior_set, built.collapsed, kd


def _reference_logp(kd: KernelData, prior_set, data: CollapsedData, x):
    """The same density from the PyTensor likelihood, scipy's densities and the Jacobians."""
    c = kd.constrain(x)
    sd, sigma = c["sd"], c["sigma"]
    if kd.correlated:
        rho = c["corr"][0, 1]
        L = np.array([[sd[0], 0.0], [sd[1] * rho, sd[1] * np.sqrt(1 - rho**2)]])
    else:
        L = np.diag(sd)
    ll = collapsed_loglik(data, c["beta"], L, sigma).eval()
    lp = sum(st.norm(kd.mu_b[k], kd.s_b[k]).logpdf(x[k]) for k in range(kd.p))
    lp += scale_logpdf(prior_set.sigma, sigma) + np.log(sigma)
    lp += sum(scale_logpdf(prior_set.blocks[0].sd, sd[i], i) + np.log(sd[i]) for i in range(kd.q))
    if kd.correlated:
        eta = prior_set.blocks[0].eta
        # LKJ(η) for a 2×2 correlation: (ρ+1)/2 ~ Beta(η, η); Jacobian of ρ = tanh z is 1 − ρ²
        lp += st.beta(eta, eta).logpdf((rho + 1) / 2) - np.log(2) + np.log(1 - rho**2)
    return ll + lp


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("k", range(len(PRIORS)))
def test_value_matches_pytensor_likelihood_and_scipy_priors(formula, k):
    _, prior_set, data, kd = _kernel(formula, PRIORS[k])
    rng = np.random.default_rng(k)
    for _ in range(3):
        x = kd.initial_point(rng)
        x[: kd.p] += rng.normal(0, 5, kd.p)
        lp, _ = kd.logp_and_grad(x)
        assert lp == pytest.approx(_reference_logp(kd, prior_set, data, x), rel=1e-11, abs=1e-8)


@pytest.mark.parametrize("formula", FORMULAS)
def test_gradient_matches_finite_differences(formula):
    _, _, _, kd = _kernel(formula, PRIORS[1])
    rng = np.random.default_rng(3)
    for _ in range(4):
        x = kd.initial_point(rng) + rng.normal(0, 0.5, kd.ndim)
        _, grad = kd.logp_and_grad(x)
        h = 1e-6
        fd = np.array([(kd.logp_and_grad(x + e)[0] - kd.logp_and_grad(x - e)[0]) / (2 * h)
                       for e in np.eye(kd.ndim) * h])
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-4)


def test_gradient_far_in_the_tails():
    """Large |atanh ρ| and tiny or huge scales keep the value and gradient finite."""
    _, _, _, kd = _kernel(FORMULAS[0], None)
    x = kd.initial_point(np.random.default_rng(0))
    for z, ls in [(25.0, 0.0), (-30.0, 8.0), (0.5, -8.0)]:
        x2 = x.copy()
        x2[-1] = z
        x2[kd.p] += ls
        lp, grad = kd.logp_and_grad(x2)
        assert np.isfinite(lp) and np.all(np.isfinite(grad))


def test_which_models_the_kernel_takes():
    m = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    pr = resolve_priors(m.spec, None)
    assert unsupported_reason(m.spec, pr, "collapsed") is None
    assert "collapsed" in unsupported_reason(m.spec, pr, "explicit")
    pr_t = resolve_priors(m.spec, {"Days": Prior("StudentT", nu=3, mu=0, sigma=10)})
    assert "Normal" in unsupported_reason(m.spec, pr_t, "collapsed")
    pr_g = resolve_priors(m.spec, {"sigma": Prior("Gamma", alpha=2, beta=0.1)})
    assert "Gamma" in unsupported_reason(m.spec, pr_g, "collapsed")
    pen = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin")
    assert "one random-effect term" in unsupported_reason(pen.spec, resolve_priors(pen.spec, None), "collapsed")
    # two crossed factors go to the blocked kernel (bayes/blocked.py), which refuses what it does not implement
    fit = pen.fit(method="nuts", route="kernel", draws=10, tune=10, chains=1, progressbar=False, warn=False)
    assert fit.route == "blocked"
    with pytest.raises(BayesLMMError, match="route='kernel' cannot fit this model: .*Normal priors"):
        pen.fit(method="nuts", route="kernel", draws=10, tune=10, chains=1, progressbar=False,
                priors={"(Intercept)": Prior("StudentT", nu=3, mu=20, sigma=10)})
    with pytest.raises(BayesLMMError, match="route must be one of"):
        m.fit(method="nuts", route="jax", progressbar=False)
    with pytest.raises(BayesLMMError, match="use sampler='nutpie' or 'auto'"):
        m.fit(method="nuts", route="kernel", sampler="pymc", progressbar=False)


@pytest.fixture(scope="module")
def sleep_fits():
    m = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    kw = dict(draws=800, tune=800, chains=2, random_seed=11, progressbar=False, warn=False)
    return m.fit(method="nuts", **kw), m.fit(method="nuts", route="graph", sampler="nutpie", **kw)


def test_kernel_posterior_equals_pytensor_posterior(sleep_fits):
    """Same model, two implementations: summaries agree within Monte Carlo error."""
    kern, graph = sleep_fits
    assert kern.route == "one-factor" and kern.sampler == "nutpie"
    assert graph.route == "graph"
    a, b = kern.summary_table(), graph.summary_table()
    assert list(a.index) == list(b.index)
    for name in a.index:
        mcse = np.hypot(a.loc[name, "sd"] / np.sqrt(a.loc[name, "ess_bulk"]),
                        b.loc[name, "sd"] / np.sqrt(b.loc[name, "ess_bulk"]))
        assert abs(a.loc[name, "mean"] - b.loc[name, "mean"]) < 4.5 * mcse, name
        assert a.loc[name, "sd"] == pytest.approx(b.loc[name, "sd"], rel=0.15), name
    assert kern.diagnostics().max_rhat < 1.01


def test_kernel_fit_has_the_usual_posterior(sleep_fits):
    kern, _ = sleep_fits
    post = kern.posterior
    assert set(post.data_vars) == {"beta", "sigma", "Subject_sd", "Subject_corr", "Subject"}
    assert post["Subject"].shape == (2, 800, 18, 2)
    corr = post["Subject_corr"]
    assert corr.dims == ("chain", "draw", "Subject_pair")  # the distinct correlations only
    assert np.all(np.abs(corr.to_numpy()) < 1)
    assert "log_likelihood" in kern.idata.children
    # reproducible: the same seed gives the same draws
    again = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy").fit(
        method="nuts", draws=800, tune=800, chains=2, random_seed=11, progressbar=False, warn=False)
    np.testing.assert_array_equal(again.posterior["beta"].to_numpy(), post["beta"].to_numpy())
    np.testing.assert_array_equal(again.posterior["Subject"].to_numpy(), post["Subject"].to_numpy())


# -- what is stored of the integrated-out effects ------------------------------------------
@pytest.fixture(scope="module")
def effects_pair():
    from bayeslmm.simulate import simulate_lmm

    df = simulate_lmm(n_groups=1200, n_per_group=3, random_seed=5)
    m = Model("y ~ x + (1 + x | g)", df)
    kw = dict(draws=150, tune=200, chains=2, random_seed=3, progressbar=False, warn=False)
    return m.fit(method="nuts", effects="draws", **kw), m.fit(method="nuts", effects="summary", **kw)


def test_effect_summaries_equal_the_draws_they_summarise(effects_pair):
    from bayeslmm.bayes.fit import EFFECTS_GROUP, SUMMARY_PROBS, effect_draws

    full, summ = effects_pair
    assert "g" in full.posterior and "g" not in summ.posterior
    assert EFFECTS_GROUP not in full.idata.children and "log_likelihood" not in summ.idata.children
    np.testing.assert_array_equal(full.posterior["beta"].to_numpy(), summ.posterior["beta"].to_numpy())
    d = full.posterior["g"].to_numpy().reshape(-1, 1200, 2)
    table = summ.idata[EFFECTS_GROUP]["g"].to_numpy()
    np.testing.assert_allclose(table[..., 0], d.mean(0), rtol=1e-12)
    np.testing.assert_allclose(table[..., 1], d.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(table[..., 2:], np.moveaxis(np.quantile(d, SUMMARY_PROBS, axis=0), 0, -1),
                               rtol=1e-12)
    # levels redrawn on request (across chunk boundaries) are the stored draws
    levels = [full.spec.blocks[0].levels[i] for i in (0, 511, 512, 1199, 7)]
    again = effect_draws(summ, levels)
    np.testing.assert_array_equal(again.to_numpy(), full.posterior["g"].sel(g_level=levels).to_numpy())
    with pytest.raises(BayesLMMError, match="not levels of 'g'"):
        effect_draws(summ, ["no-such-level"])


def test_effects_option_is_checked_and_auto_switches(monkeypatch):
    import bayeslmm.bayes.fit as bf

    m = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    with pytest.raises(BayesLMMError, match="effects must be one of"):
        m.fit(method="nuts", effects="some", progressbar=False)
    with pytest.raises(BayesLMMError, match="log_likelihood=True needs the effects' draws"):
        m.fit(method="nuts", effects="summary", log_likelihood=True, draws=20, tune=20, chains=1,
              progressbar=False)
    monkeypatch.setattr(bf, "MAX_EFFECT_VALUES", 1000)
    with pytest.warns(UserWarning, match="random effects were not stored"):
        fit = m.fit(method="nuts", draws=50, tune=50, chains=1, random_seed=1, progressbar=False)
    assert "Subject" not in fit.posterior and bf.EFFECTS_GROUP in fit.idata.children


def test_fit_methods_work_from_effect_summaries(effects_pair):
    """ranef, coef, ranef_table, predict and pooling give the same answers from summaries as from draws."""
    import bayeslmm

    full, summ = effects_pair
    for a, b in zip(full.ranef().values(), summ.ranef().values()):
        pd_testing = pytest.importorskip("pandas.testing")
        pd_testing.assert_frame_equal(a, b, rtol=1e-12)
    t_full, t_summ = full.ranef_table(ci_prob=0.95), summ.ranef_table(ci_prob=0.95)
    np.testing.assert_allclose(t_summ[["mean", "sd", "lower", "upper"]].to_numpy(),
                               t_full[["mean", "sd", "lower", "upper"]].to_numpy(), rtol=1e-12)
    with pytest.raises(BayesLMMError, match="intervals are available for ci_prob in"):
        summ.ranef_table(ci_prob=0.8)
    new = full.spec.data.iloc[[0, 1, 700, 3599]]
    np.testing.assert_allclose(summ.predict(new)["mean"].to_numpy(), full.predict(new)["mean"].to_numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(bayeslmm.pooling_table(summ)["partial"].to_numpy(),
                               bayeslmm.pooling_table(full)["partial"].to_numpy(), rtol=1e-12)
    with pytest.raises(BayesLMMError, match="effects='summary'"):
        summ.r2(method="gelman")


def test_the_sampler_never_sees_nan_or_an_exception():
    """Where σ or an sd under/overflows the log-density is -inf with a zero gradient (a divergence for
    NUTS); numba's default would raise ZeroDivisionError inside nutpie's thread and abort the run."""
    _, _, _, kd = _kernel(FORMULAS[0], None)
    f = kd.logp_function()
    x = kd.initial_point(np.random.default_rng(0))
    for idx in range(kd.p, kd.ndim):
        for v in (-800.0, 800.0):
            y = x.copy()
            y[idx] = v
            lp, grad = f(y)
            assert np.isfinite(lp) or lp == -np.inf
            assert np.all(np.isfinite(grad))
