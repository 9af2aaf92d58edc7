"""The collapsed likelihood and the exact effect draws, checked against the REML/ML engine.

At the ML estimates, −2 × the collapsed log-likelihood equals the profiled deviance;
draws of the integrated-out effects at fixed parameters have the conditional modes as
mean and lme4's conditional variances as covariance.
"""

import numpy as np
import pytest

from bayeslmm import Model
from bayeslmm.bayes.collapsed import CollapsedData, collapsed_loglik, draw_first_block
from bayeslmm.datasets import load_dataset

FORMULAS = ["Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days | Subject)",
            "Reaction ~ Days + (Days || Subject)", "Reaction ~ Days + (Days + Days2 | Subject)"]


@pytest.fixture(scope="module")
def data():
    return load_dataset("sleepstudy").assign(Days2=lambda d: (d.Days - 4.5) ** 2 / 10)


def _loglik_fn(cd):
    import pytensor
    import pytensor.tensor as pt

    g, L, s = pt.dvector(), pt.dmatrix(), pt.dscalar()
    return pytensor.function([g, L, s], collapsed_loglik(cd, g, L, s))


@pytest.mark.parametrize("formula", FORMULAS)
def test_collapsed_loglik_is_the_ml_deviance(data, formula):
    model = Model(formula, data)
    fit = model.fit(method="ml")
    cd = CollapsedData.from_crossprods(model.crossprods)
    T = model.spec.blocks[0].T(fit.theta)
    val = _loglik_fn(cd)(fit.fixef.to_numpy(), fit.sigma * T, fit.sigma)
    assert np.isclose(-2 * val, fit.objective, rtol=1e-11)
    # and it is a likelihood: moving β away lowers it
    assert _loglik_fn(cd)(fit.fixef.to_numpy() + 1.0, fit.sigma * T, fit.sigma) < val


@pytest.mark.parametrize("formula", [FORMULAS[0], FORMULAS[1], FORMULAS[3]])  # q = 1, 2 (closed form), 3
def test_effect_draws_have_conditional_mean_and_variance(data, formula):
    model = Model(formula, data)
    fit = model.fit(method="reml")
    cd = CollapsedData.from_crossprods(model.crossprods)
    S = 20_000
    q = model.spec.blocks[0].q
    L = np.broadcast_to(fit.sigma * model.spec.blocks[0].T(fit.theta), (S, q, q))
    b = draw_first_block(cd, np.tile(fit.fixef.to_numpy(), (S, 1)), np.array(L), np.full(S, fit.sigma),
                         np.random.default_rng(0))
    mean, modes = b.mean(0), fit.estimates.b[0]
    cov = fit.estimates.b_condvar[0]
    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2) / S)
    assert np.all(np.abs(mean - modes) < 5 * se)
    emp = np.einsum("sja,sjb->jab", b - mean, b - mean) / (S - 1)
    np.testing.assert_allclose(emp, cov, rtol=0.05, atol=0.05 * np.abs(cov).max())


def test_fused_effect_draws_equal_the_numpy_formula():
    """kernel.draw_effects_small (used for q ≤ 2) is _draw_small's arithmetic on the same normals."""
    from bayeslmm.bayes.collapsed import _draw_small
    from bayeslmm.bayes.kernel import draw_effects_small

    rng = np.random.default_rng(4)
    J, S, r = 37, 11, 3
    for q in (1, 2):
        A = rng.normal(size=(J, q, q))
        G = np.einsum("jab,jcb->jac", A, A) + np.eye(q)
        H, g = rng.normal(size=(J, q, r)), rng.normal(size=(J, q))
        gamma = rng.normal(size=(S, r))
        L = np.tril(rng.normal(size=(S, q, q)))
        L[:, np.arange(q), np.arange(q)] = np.abs(L[:, np.arange(q), np.arange(q)]) + 0.1
        s2 = rng.uniform(0.5, 2.0, S)
        u = g[None] - np.einsum("jqr,sr->sjq", H, gamma)
        ref = _draw_small(G, u, L, s2, np.random.default_rng(9))
        eps = np.random.default_rng(9).standard_normal((q, S, J))
        out = np.empty((S, J, q))
        draw_effects_small(G, H, g, gamma, L, s2, eps, out)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
