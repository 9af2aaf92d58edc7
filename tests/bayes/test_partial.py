"""The partly collapsed kernel (bayes/partial.py): the largest factor integrated out, the others sampled.

Checked against a dense reference written here: y ~ MvNormal(Xβ + Z_R b_R, σ²I + Z₁Σ₁Z₁ᵀ),
the other effects' priors (non-centred z ~ N(0, 1), or centred b ~ N(0, sd²)), scipy's scale
priors and LKJ with numerical Jacobians — and its gradient against finite differences.
"""

import numpy as np
import pytest
import scipy.stats as st

from bayeslmm import Model
from bayeslmm.bayes.model import centring_matrix
from bayeslmm.bayes.partial import PartialData
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


@pytest.mark.parametrize("formula", [STRUCTURES["crossed_maximal"], CENTRED["centred_correlated"]])
def test_posterior_equals_the_blocked_kernels(formula, monkeypatch):
    """The same posterior whether the other effects are sampled (partial) or integrated out (blocked)."""
    import bayeslmm.bayes.fit as bayes_fit
    from test_blocked import _agree_within_mcse

    data = _centred_data() if formula in CENTRED.values() else _crossed_data(seed=3, n_a=15, n_b=8)
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
