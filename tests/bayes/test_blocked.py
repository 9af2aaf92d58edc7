"""The blocked kernel (bayes/blocked.py): every random-effect structure, all effects integrated out.

Its log-posterior is checked against a dense reference written independently here —
y ~ MvNormal(Xβ, σ²I + ZΣZᵀ) by scipy, the scale priors by scipy, LKJ(η) as
det(R)^(η−1)/c with Lewandowski, Kurowicka & Joe's (2009) constant, and every Jacobian
from finite differences of the map from the coordinates — and its gradient against
finite differences.
"""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
from scipy.special import betaln

from bayeslmm import Model, Prior
from bayeslmm.bayes.blocked import BlockedData, cpc_cholesky, lkj_log_constant
from bayeslmm.bayes.model import centring_matrix
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.crossprod import block_Z
from conftest import scale_logpdf


def _crossed_data(seed=0, n_a=12, n_b=9, reps=2):
    """Subjects a × items b (each pair `reps` times), with x, z varying within both, and a nesting c within a."""
    rng = np.random.default_rng(seed)
    a = np.repeat(np.arange(n_a), n_b * reps)
    b = np.tile(np.repeat(np.arange(n_b), reps), n_a)
    n = a.size
    x = rng.normal(size=n)
    z = rng.choice([-0.5, 0.5], size=n)
    c = rng.integers(0, 3, size=n)                        # 3 cells within each subject
    ua = rng.normal(size=(n_a, 3)) * [1.0, 0.5, 0.4]
    ub = rng.normal(size=(n_b, 2)) * [0.8, 0.3]
    uc = rng.normal(size=(n_a, 3)) * 0.6
    y = (2.0 + ua[a, 0] + ub[b, 0] + uc[a, c] + (0.5 + ua[a, 1] + ub[b, 1]) * x + (0.3 + ua[a, 2]) * z
         + rng.normal(size=n))
    return pd.DataFrame({"y": y * 3.0 + 10.0, "x": x, "z": z, "a": [f"s{i}" for i in a], "b": [f"i{i}" for i in b],
                         "c": [f"c{i}" for i in c]})


#: the structures the issue names: crossed, nested, several terms on one factor, ||, q = 3, the split
STRUCTURES = {
    "crossed": "y ~ x + (1 | a) + (1 | b)",
    "crossed_maximal": "y ~ x + (1 + x | a) + (1 + x | b)",
    "nested": "y ~ x + (1 | a/c)",
    "terms_one_factor": "y ~ x + z + (1 + x | a) + (0 + z | a) + (1 | b)",
    "uncorrelated": "y ~ x + (x || a) + (x || b)",
    "q3": "y ~ x + z + (1 + x + z | a)",
    "split": "y ~ x + (1 | a) + (0 + x | a)",
    "q3_rest": "y ~ x + z + (1 | b) + (1 + x + z | a)",
}
PRIORS = {"sigma": Prior("HalfStudentT", nu=4, sigma=3.0), "a": {"sd": Prior("HalfNormal", sigma=2.0), "eta": 2.5}}


def _setup(formula, priors=None, data=None):
    m = Model(formula, _crossed_data() if data is None else data)
    ps = resolve_priors(m.spec, priors)
    return m, ps, BlockedData.build(m.spec, m.crossprods, ps, centring_matrix(m.spec, ps))


def _lkj_log_c(q, eta):
    """log c_q(η), LKJ (2009) section 3.2: 2^Σ(2η−2+q−k)(q−k) Π B(η + (q−k−1)/2, ·)^(q−k)."""
    out = 0.0
    for k in range(1, q):
        b = eta + (q - k - 1) / 2
        out += (2 * eta - 2 + q - k) * (q - k) * math.log(2) + (q - k) * betaln(b, b)
    return out


def _corr_entries(y, q):
    R = cpc_cholesky(y, q) @ cpc_cholesky(y, q).T
    i, j = np.triu_indices(q, 1)
    return R[i, j]


def _log_abs_jacobian(func, y, h=1e-6):
    J = np.empty((func(y).size, y.size))
    for k in range(y.size):
        e = np.zeros_like(y)
        e[k] = h
        J[:, k] = (func(y + e) - func(y - e)) / (2 * h)
    return np.linalg.slogdet(J)[1]


def _dense_logp(m, ps, bd, x, relative_residual=None):
    """The log-posterior at x from y ~ MvNormal(Xβ, σ²I + ZΣZᵀ), scipy's densities and numerical Jacobians
    (σ²Λ_R + ZΣZᵀ for a relative residual covariance Λ_R given; its parameters' priors are the caller's)."""
    spec, p = m.spec, bd.p
    lp = sum(st.norm(ps.beta[k].params.get("mu", 0.0), ps.beta[k].params["sigma"]).logpdf(x[k]) for k in range(p))
    beta = centring_matrix(spec, ps) @ x[:p]
    sigma = math.exp(x[p])
    lp += scale_logpdf(ps.sigma, sigma) + x[p]
    V = sigma**2 * (np.eye(spec.n_obs) if relative_residual is None else relative_residual)
    for k, (block, bp) in enumerate(zip(spec.blocks, ps.blocks)):
        q, x0 = block.q, bd.priors.blk_x0[k]
        sd = np.exp(x[x0 : x0 + q])
        lp += sum(scale_logpdf(bp.sd, sd[c], c) + x[x0 + c] for c in range(q))
        R = np.eye(q)
        if block.correlated and q > 1:
            y = x[x0 + q : x0 + q + q * (q - 1) // 2]
            R = cpc_cholesky(y, q) @ cpc_cholesky(y, q).T
            lp += (bp.eta - 1) * np.linalg.slogdet(R)[1] - _lkj_log_c(q, bp.eta)
            lp += _log_abs_jacobian(lambda v: _corr_entries(v, q), y)
        Z = block_Z(block).toarray()
        V += Z @ np.kron(np.eye(block.n_levels), np.outer(sd, sd) * R) @ Z.T
    return lp + st.multivariate_normal(spec.X @ beta, V).logpdf(spec.y)


def assert_gradient_matches(kernel, x):
    """The kernel's gradient at x against central differences (steps 1e-5·max(1, |x_k|)) to rtol 1e-6."""
    _, grad = kernel.logp_and_grad(x)
    num = np.empty_like(x)
    for k in range(x.size):
        h = 1e-5 * max(1.0, abs(x[k]))
        e = np.zeros_like(x)
        e[k] = h
        num[k] = (kernel.logp_and_grad(x + e)[0] - kernel.logp_and_grad(x - e)[0]) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-6 * np.abs(num).max())


def _points(bd, rng, k=3):
    for _ in range(k):
        x = bd.initial_point(rng)
        x[: bd.p] += rng.normal(0, 2, bd.p)
        x[bd.p :] += rng.normal(0, 0.4, bd.ndim - bd.p)
        yield x


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_value_equals_dense_reference(name):
    m, ps, bd = _setup(STRUCTURES[name], PRIORS)
    rng = np.random.default_rng(1)
    for x in _points(bd, rng):
        lp, _ = bd.logp_and_grad(x)
        assert lp == pytest.approx(_dense_logp(m, ps, bd, x), rel=1e-10)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_gradient_equals_finite_differences(name):
    _, _, bd = _setup(STRUCTURES[name], PRIORS)
    rng = np.random.default_rng(2)
    for x in _points(bd, rng):
        assert_gradient_matches(bd, x)


def test_lkj_constant_is_lewandowskis():
    for q in (2, 3, 4, 6):
        for eta in (0.5, 1.0, 2.5):
            assert lkj_log_constant(q, eta) == pytest.approx(-_lkj_log_c(q, eta), rel=1e-12)


def test_dense_and_sparse_coupling_agree(monkeypatch):
    """The fully crossed coupling is multiplied densely by BLAS; the level-by-level path must agree."""
    import bayeslmm.bayes.blocked as blocked

    _, _, dense = _setup(STRUCTURES["crossed_maximal"])
    monkeypatch.setattr(blocked, "DENSE_COUPLING", 2.0)
    _, _, sparse = _setup(STRUCTURES["crossed_maximal"])
    assert dense.Bd.size and not sparse.Bd.size
    x = dense.initial_point(np.random.default_rng(4))
    (l1, g1), (l2, g2) = dense.logp_and_grad(x), sparse.logp_and_grad(x)
    assert l1 == pytest.approx(l2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-9)


def test_response_scale_divides_the_response_column():
    """Built with scale s, the arrays are those of y/s: the same log-likelihood up to N log s."""
    data = _crossed_data()
    m, ps, bd = _setup(STRUCTURES["crossed_maximal"], None, data)
    s = 7.0
    small = data.assign(y=data.y / s)
    m2 = Model(STRUCTURES["crossed_maximal"], small)
    bd_s = BlockedData.build(m.spec, m.crossprods, ps, centring_matrix(m.spec, ps), scale=s)
    bd_2 = BlockedData.build(m2.spec, m2.crossprods, ps, centring_matrix(m2.spec, ps))
    x = bd.initial_point(np.random.default_rng(5))
    assert bd_s.logp_and_grad(x)[0] == pytest.approx(bd_2.logp_and_grad(x)[0], rel=1e-12)


class _Fixed:
    """A stand-in generator that returns the given 'standard normals'."""

    def __init__(self, eps):
        self.eps = eps

    def standard_normal(self, shape):
        assert shape == self.eps.shape
        return self.eps


@pytest.mark.parametrize("name", ["crossed_maximal", "nested", "terms_one_factor", "q3_rest"])
def test_rest_effects_are_drawn_from_their_exact_conditional(name):
    """Mean (ε = 0) and covariance (ε = unit vectors) of the draws equal the dense Gaussian conditional."""
    from bayeslmm.bayes.blocked import draw_rest_effects

    m, ps, bd = _setup(STRUCTURES[name], PRIORS)
    spec = m.spec
    x = next(_points(bd, np.random.default_rng(6), 1))
    mR = sum(b.n_effects for b in spec.blocks[1:])
    eps = np.vstack([np.zeros(mR), np.eye(mR)])
    draws = draw_rest_effects(bd, np.repeat(x[None], mR + 1, axis=0), _Fixed(eps))
    mean, A = draws[0], (draws[1:] - draws[0]).T           # b = mean + A ε
    c = bd.constrain(x)
    sigma, beta = c["sigma"], c["beta"]
    Zs, covs = [], []
    for block, C in zip(spec.blocks, bd.cholesky_factors(x)):
        Zs.append(block_Z(block).toarray())
        covs.append(np.kron(np.eye(block.n_levels), C @ C.T))
    Z = np.hstack(Zs)
    Sig = np.zeros((Z.shape[1], Z.shape[1]))
    o = 0
    for cv in covs:
        Sig[o : o + cv.shape[0], o : o + cv.shape[0]] = cv
        o += cv.shape[0]
    V = sigma**2 * np.eye(spec.n_obs) + Z @ Sig @ Z.T
    KZ = Sig @ Z.T @ np.linalg.inv(V)
    rest = slice(spec.blocks[0].n_effects, None)
    np.testing.assert_allclose(mean, (KZ @ (spec.y - spec.X @ beta))[rest], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(A @ A.T, (Sig - KZ @ Z @ Sig)[rest, rest], rtol=1e-8, atol=1e-10)


def _agree_within_mcse(a, b, k=4.0):
    """Posterior means of every parameter within k Monte Carlo standard errors (sd/√ESS of each fit)."""
    ta, tb = a.summary_table(), b.summary_table()
    assert list(ta.index) == list(tb.index)
    se = np.sqrt(ta["sd"] ** 2 / ta["ess_bulk"] + tb["sd"] ** 2 / tb["ess_bulk"])
    z = (ta["mean"] - tb["mean"]).abs() / se
    assert (z < k).all(), z.to_dict()


GRAPH_CHECKED = ["crossed_maximal"]   # the other seven behind `slow` (each fits the PyMC graph)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in GRAPH_CHECKED else pytest.mark.slow)
                                  for n in STRUCTURES])
def test_posterior_equals_the_pymc_graphs(name):
    """The same posterior as the PyMC graph (first block integrated out, the others sampled)."""
    m = Model(STRUCTURES[name], _crossed_data(seed=3, n_a=15, n_b=8))
    # the slow ones with 4 chains: with 2 the graph's ESS of q = 3 sds is optimistic (q3_rest at seed 11 gave
    # z = 4.04 for sd[a|(Intercept)]; with 4 × 2000 at seeds 12, 13 it was 1.09, 0.45)
    chains = 2 if name in GRAPH_CHECKED else 4
    opts = dict(method="nuts", draws=1000, tune=1000, chains=chains, random_seed=11, progressbar=False, warn=False)
    fast = m.fit(**opts)
    graph = m.fit(**opts, route="graph")
    assert fast.route == "blocked" and graph.route == "graph"
    _agree_within_mcse(fast, graph)
    # divergences rare: at most 1 in 1,000 draws (uncorrelated, 4 × 1000 at seed 11: 1, a log sd near 0)
    assert fast.diagnostics().divergences <= chains


@pytest.mark.parametrize("name", ["crossed_maximal", "q3_rest", "terms_one_factor"])
def test_the_sampler_never_sees_nan_or_an_exception(name):
    """A correlation at ±1, an sd of 0 or ∞, σ under/overflowing: a finite log-density or −inf with a
    zero gradient (a divergence for NUTS), never NaN or an exception inside nutpie's thread."""
    _, _, bd = _setup(STRUCTURES[name], PRIORS)
    f = bd.logp_function()
    x = bd.initial_point(np.random.default_rng(0))
    for idx in range(bd.p, bd.ndim):
        for v in (-800.0, -40.0, 40.0, 800.0):
            y = x.copy()
            y[idx] = v
            lp, grad = f(y)
            assert np.isfinite(lp) or lp == -np.inf
            assert np.all(np.isfinite(grad))
    y = x.copy()
    y[bd.p + 1 :] = 40.0                   # every sd huge and every correlation at +1 together
    lp, grad = f(y)
    assert (np.isfinite(lp) or lp == -np.inf) and np.all(np.isfinite(grad))


def test_a_factor_with_two_levels_samples():
    data = _crossed_data(n_a=10, n_b=2, reps=4)
    fit = Model("y ~ x + (1 + x | a) + (1 | b)", data).fit(method="nuts", draws=200, tune=300, chains=2,
                                                            random_seed=3, progressbar=False, warn=False)
    assert fit.route == "blocked"
    assert "Route: blocked (compiled kernel: every random effect integrated out)" in str(fit.summary())
    post = fit.posterior
    for var in ("beta", "sigma", "a_sd", "b_sd", "a_corr", "b"):
        assert np.isfinite(post[var].to_numpy()).all(), var


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (Days | Subject)", "Reaction ~ Days + (Days || Subject)",
                                     "Reaction ~ Days + (1 | Subject)"])
def test_one_factor_equals_the_one_factor_kernel(formula):
    """With one factor the three compiled kernels share their coordinates: the same log-density and gradient."""
    from bayeslmm.bayes.fit import kernel_model
    from bayeslmm.bayes.partial import PartialData

    m = Model(formula, "sleepstudy")
    ps = resolve_priors(m.spec, None)
    _, kd = kernel_model(m.spec, m.crossprods, ps)
    Cm = centring_matrix(m.spec, ps)
    others = [BlockedData.build(m.spec, m.crossprods, ps, Cm), PartialData.build(m.spec, m.crossprods, ps, Cm)]
    rng = np.random.default_rng(8)
    for _ in range(3):
        x = kd.initial_point(rng)
        lp, grad = kd.logp_and_grad(x)
        for other in others:
            lp2, grad2 = other.logp_and_grad(x)
            assert lp2 == pytest.approx(lp, rel=1e-11)
            np.testing.assert_allclose(grad2, grad, rtol=1e-9, atol=1e-9 * np.abs(grad).max())
