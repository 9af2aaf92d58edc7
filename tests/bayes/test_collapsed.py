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
    """compiled.draw_effects_small (used for q ≤ 2) is the numpy closed form below on the same normals."""
    from bayeslmm.bayes.compiled import draw_effects_small

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


def _draw_small(G: np.ndarray, u: np.ndarray, L: np.ndarray, s2: np.ndarray, rng) -> np.ndarray:
    """Reference: the q ≤ 2 closed-form draw in numpy, elementwise over (draws, levels)."""
    q = G.shape[1]
    s2 = s2[:, None]
    if q == 1:
        a = L[:, 0, 0][:, None]
        M = 1.0 + a**2 * G[None, :, 0, 0] / s2
        w = a * u[..., 0]
        v = w / (s2 * M) + rng.standard_normal(w.shape) / np.sqrt(M)
        return (a * v)[..., None]
    a, b, c = L[:, 0, 0][:, None], L[:, 1, 0][:, None], L[:, 1, 1][:, None]
    g11, g12, g22 = G[None, :, 0, 0], G[None, :, 0, 1], G[None, :, 1, 1]
    m11 = 1.0 + (a**2 * g11 + 2 * a * b * g12 + b**2 * g22) / s2
    m12 = c * (a * g12 + b * g22) / s2
    m22 = 1.0 + c**2 * g22 / s2
    det = m11 * m22 - m12**2
    w1 = (a * u[..., 0] + b * u[..., 1]) / s2
    w2 = c * u[..., 1] / s2
    mean1 = (m22 * w1 - m12 * w2) / det
    mean2 = (m11 * w2 - m12 * w1) / det
    c11 = np.sqrt(m11)
    c21 = m12 / c11
    c22 = np.sqrt(m22 - c21**2)
    eps = rng.standard_normal((2,) + w1.shape)
    n2 = eps[1] / c22                      # Cᵀ n = ε, C = chol(M) lower
    n1 = (eps[0] - c21 * n2) / c11
    v1, v2 = mean1 + n1, mean2 + n2
    return np.stack([a * v1, b * v1 + c * v2], axis=-1)
