"""The partly collapsed kernel (bayes/partial.py): the largest factor integrated out, the others sampled.

Checked against a dense reference written here: y ~ MvNormal(Xβ + Z_R b_R, σ²I + Z₁Σ₁Z₁ᵀ),
the other effects' priors (non-centred z ~ N(0, 1), or centred b ~ N(0, sd²)), scipy's scale
priors and LKJ with numerical Jacobians — and its gradient against finite differences.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from bayeslmm import Model
from bayeslmm.bayes.model import centring_matrix
from bayeslmm.bayes.partial import PartialData, reflect
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.crossprod import block_Z

from test_blocked import PRIORS, STRUCTURES, _crossed_data, _dense_logp, _points, assert_gradient_matches


def _setup(formula, data=None):
    m = Model(formula, _crossed_data() if data is None else data)
    ps = resolve_priors(m.spec, PRIORS)
    return m, ps, PartialData.build(m.spec, m.crossprods, ps, centring_matrix(m.spec, ps))


def _reference(m, ps, pd_, x):
    """Priors as the blocked reference (it reads the same leading coordinates), the effects' priors,
    and the first block integrated out of a dense Normal."""
    spec = m.spec
    c = pd_.constrain(x)
    # the blocked reference's likelihood, integrated over every block, is replaced below
    lp_all = _dense_logp(m, ps, pd_, x[: pd_.z0])
    beta, sigma = c["beta"], c["sigma"]
    Zs = [block_Z(b).toarray() for b in spec.blocks]
    V_all = sigma**2 * np.eye(spec.n_obs)
    for Z, sd, corr, block in zip(Zs, c["sd"], c["corr"], spec.blocks):
        R = np.eye(block.q) if corr is None else corr
        V_all += Z @ np.kron(np.eye(block.n_levels), np.outer(sd, sd) * R) @ Z.T
    lp_priors = lp_all - st.multivariate_normal(spec.X @ beta, V_all).logpdf(spec.y)
    mu = spec.X @ beta
    for k, (Z, b) in enumerate(zip(Zs[1:], c["effects"]), start=1):
        mu = mu + Z @ b.ravel()
        nlev, q = b.shape
        start = pd_.z0 + pd_.rest_off[k]
        if pd_.centred[k]:
            R = np.eye(q) if c["corr"][k] is None else c["corr"][k]
            cov = np.outer(c["sd"][k], c["sd"][k]) * R
            lp_priors += st.multivariate_normal(np.zeros(q), cov).logpdf(b).sum()
        else:
            lp_priors += st.norm().logpdf(x[start : start + nlev * q]).sum()
    sd, corr = c["sd"][0], c["corr"][0]
    R = np.eye(spec.blocks[0].q) if corr is None else corr
    V = sigma**2 * np.eye(spec.n_obs) + Zs[0] @ np.kron(np.eye(spec.blocks[0].n_levels), np.outer(sd, sd) * R) @ Zs[0].T
    return lp_priors + st.multivariate_normal(mu, V).logpdf(spec.y)


MULTI = [n for n in STRUCTURES if n not in ("q3",)]


def _centred_data():
    """Items with 30 rows each: the items' one-column block is sampled centred."""
    return _crossed_data(n_a=6, n_b=5, reps=6)


CENTRED = {"centred": "y ~ x + (1 + x | a) + (1 | b)", "centred_correlated": "y ~ x + (1 | a) + (1 + x | b)",
            "centred_uncorrelated": "y ~ x + (1 | a) + (x || b)"}


def _any_setup(name):
    if name in CENTRED:
        out = _setup(CENTRED[name], _centred_data())
        assert out[2].centred.tolist() == [0, 1]
        return out
    return _setup(STRUCTURES[name])


@pytest.mark.parametrize("name", MULTI + list(CENTRED))
def test_value_equals_dense_reference(name):
    m, ps, pd_ = _any_setup(name)
    rng = np.random.default_rng(1)
    for x in _points(pd_, rng):
        lp, _ = pd_.logp_and_grad(x)
        assert lp == pytest.approx(_reference(m, ps, pd_, x), rel=1e-10)


@pytest.mark.parametrize("name", MULTI + list(CENTRED))
def test_gradient_equals_finite_differences(name):
    _, _, pd_ = _any_setup(name)
    rng = np.random.default_rng(2)
    for x in _points(pd_, rng, 2):
        assert_gradient_matches(pd_, x)


def _nested_data(seed=4, n_s=40, n_d=8, n_e=3):
    """Students × lecturers, the lecturers nested in departments (InstEval's shape; columns a, b, c):
    a lecturer has 40 rows and a department more, so both pass the centred rows rule; the students
    (the largest factor) are integrated out."""
    rng = np.random.default_rng(seed)
    s = np.repeat(np.arange(n_s), n_d)
    d = np.tile(np.arange(n_d), n_s)
    e = d % n_e
    x = rng.normal(size=s.size)
    y = (3.0 + rng.normal(size=n_s)[s] * 0.5 + rng.normal(size=n_d)[d] * 0.6 + rng.normal(size=n_e)[e] * 0.4
         + (0.5 + rng.normal(size=n_d)[d] * 0.2) * x + rng.normal(size=s.size))
    return pd.DataFrame({"y": y, "x": x, "a": [f"s{i}" for i in s], "b": [f"d{i}" for i in d],
                         "c": [f"e{i}" for i in e]})


NESTED = "y ~ x + (1 | a) + (1 + x | b) + (1 | c)"   # students a, lecturers b in departments c


def test_hierarchy_of_a_nested_pair():
    """Lecturers' totals start from their department's (b_e + β₀), whose block is sampled non-centred;
    the lecturers' slope column, which the departments lack, from β_x."""
    m, _, pd_ = _setup(NESTED, _nested_data())
    assert [b.group for b in m.spec.blocks] == ["a", "b", "c"]
    assert pd_.centred.tolist() == [0, 1, 0]
    mR, d_off, e_off = pd_.parent.shape[0], pd_.rest_off[1], pd_.rest_off[2]
    dept = np.arange(8) % 3
    np.testing.assert_array_equal(pd_.parent[d_off : d_off + 16 : 2], e_off + dept)      # intercepts
    np.testing.assert_array_equal(pd_.parent[d_off + 1 : d_off + 16 : 2], mR + 1)         # slopes → β_x
    np.testing.assert_array_equal(pd_.parent[e_off:], mR + 0)                            # departments → β₀
    # the slope totals (parent β) are the only ones reflected about their mean
    np.testing.assert_array_equal(pd_.spin_idx, d_off + 1 + 2 * np.arange(8))


@pytest.mark.parametrize("formula", [NESTED, "y ~ x + (1 | a) + (1 + x | b) + (1 + x | c)"])
def test_nested_value_and_gradient(formula):
    """A lecturer's intercept (and, in the second, slope) total on its department's non-centred total."""
    m, ps, pd_ = _setup(formula, _nested_data())
    assert pd_.centred.tolist() == [0, 1, 0] and np.all(pd_.parent[pd_.rest_off[1] : pd_.rest_off[2]] >= 0)
    rng = np.random.default_rng(5)
    for x in _points(pd_, rng):
        lp, _ = pd_.logp_and_grad(x)
        assert lp == pytest.approx(_reference(m, ps, pd_, x), rel=1e-10)
        assert_gradient_matches(pd_, x)


def test_totals_start_at_their_base():
    """At the initial point a centred effect is the jitter (U(−1, 1), the slopes' reflected: same norm),
    though its total carries β₀ ≈ 3."""
    _, _, pd_ = _setup(NESTED, _nested_data())
    x = pd_.initial_point(np.random.default_rng(6))
    b_d = pd_.constrain(x)["effects"][0]
    assert np.abs(b_d[:, 0]).max() < 1.0 and np.linalg.norm(b_d[:, 1]) < np.sqrt(8)
    totals = reflect(x[pd_.z0 : pd_.z0 + pd_.parent.shape[0]], pd_.spin_ptr, pd_.spin_idx)
    assert totals[pd_.rest_off[1] : pd_.rest_off[1] + 16 : 2].mean() > 1.5


def test_reflection_is_orthonormal_and_its_own_inverse():
    rng = np.random.default_rng(7)
    ptr, idx = np.array([0, 5, 7]), np.array([8, 1, 3, 5, 0, 2, 6])
    H = reflect(np.eye(9), ptr, idx)
    np.testing.assert_allclose(H @ H.T, np.eye(9), atol=1e-14)
    np.testing.assert_allclose(H @ H, np.eye(9), atol=1e-14)
    u = rng.normal(size=9)
    assert reflect(u, ptr, idx)[idx[:5]].mean() == pytest.approx(u[8] / np.sqrt(5), rel=1e-12)


@pytest.mark.parametrize("formula", [STRUCTURES["crossed_maximal"], CENTRED["centred_correlated"], NESTED])
def test_posterior_equals_the_blocked_kernels(formula, monkeypatch):
    """The same posterior whether the other effects are sampled (partial) or integrated out (blocked)."""
    import bayeslmm.bayes.fit as bayes_fit
    from test_blocked import _agree_within_mcse

    data = {CENTRED["centred_correlated"]: _centred_data(), NESTED: _nested_data()}.get(
        formula, _crossed_data(seed=3, n_a=15, n_b=8))
    m = Model(formula, data)
    opts = dict(method="nuts", draws=1000, tune=1000, chains=2, random_seed=12, progressbar=False, warn=False)
    whole = m.fit(**opts)
    monkeypatch.setattr(bayes_fit, "BLOCKED_AUTO_MAX_REST", -1)
    part = m.fit(**opts)
    assert whole.route == "blocked" and part.route == "partial"
    _agree_within_mcse(whole, part)
    for name in part.names:       # every block's effects are in both posteriors, in the same layout
        assert part.posterior[name].dims == whole.posterior[name].dims
        np.testing.assert_allclose(part.posterior[name].mean(("chain", "draw")),
                                   whole.posterior[name].mean(("chain", "draw")), atol=0.15 * float(data.y.std()))


def test_three_nested_levels():
    """Lecturers in departments in faculties: the lecturers are centred on their department's total
    (b + β₀); the faculties, non-centred, are nobody's base and keep plain coordinates."""
    data = _nested_data()
    data["f"] = np.where(data["c"] == "e2", "f1", "f0")
    m, ps, pd_ = _setup("y ~ x + (1 | a) + (1 | b) + (1 | c) + (1 | f)", data)
    assert [b.group for b in m.spec.blocks] == ["a", "b", "c", "f"]
    assert pd_.centred.tolist() == [0, 1, 0, 0]
    mR, (b_off, c_off, f_off) = pd_.parent.shape[0], pd_.rest_off[1:]
    np.testing.assert_array_equal(pd_.parent[b_off:c_off], c_off + np.arange(8) % 3)
    np.testing.assert_array_equal(pd_.parent[c_off:f_off], mR + 0)
    np.testing.assert_array_equal(pd_.parent[f_off:], -1)
    for x in _points(pd_, np.random.default_rng(8), 2):
        assert pd_.logp_and_grad(x)[0] == pytest.approx(_reference(m, ps, pd_, x), rel=1e-10)
        assert_gradient_matches(pd_, x)
