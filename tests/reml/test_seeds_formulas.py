"""The seeds' formulas, on the engine's output, with explicit dense matrices.

V_j = Z_j G Z_jᵀ + R_j,  β̂ = (Σ X_jᵀV_j⁻¹X_j)⁻¹ Σ X_jᵀV_j⁻¹y_j,
b̂_j = G Z_jᵀ V_j⁻¹ (y_j − X_j β̂),  Var(y_ij) = σ²_u0 + 2σ_u01 x + σ²_u1 x² + σ²,
covariance within a group, zero across groups.
"""

import numpy as np
import pytest

from bayeslmm import Model
from bayeslmm.datasets import load_dataset


@pytest.fixture(scope="module", params=["reml", "ml"])
def sleep_fit(request):
    return Model("Reaction ~ Days + (Days | Subject)", load_dataset("sleepstudy")).fit(method=request.param)


def _groups(fit):
    block = fit.spec.blocks[0]
    for j, level in enumerate(block.levels):
        rows = np.flatnonzero(block.codes == j)
        yield level, rows, fit.spec.X[rows], block.Z[rows], fit.spec.y[rows]


def test_marginal_covariance_is_ZGZt_plus_R(sleep_fit):
    fit = sleep_fit
    G = fit.block_covariances()[0]
    s2 = fit.sigma**2
    for level, rows, X, Z, y in _groups(fit):
        V = Z @ G @ Z.T + s2 * np.eye(len(rows))
        got = fit.marginal_covariance(level)
        np.testing.assert_allclose(got.to_numpy(), V, rtol=1e-12)
        assert list(got.index) == list(fit.spec.row_index[rows])
    # integer labels work as well as strings
    np.testing.assert_allclose(fit.marginal_covariance(308).to_numpy(), fit.marginal_covariance("308").to_numpy())


def test_variance_formula_random_slope(sleep_fit):
    """Var(y_ij) = σ²_u0 + 2σ_u01 x + σ²_u1 x² + σ² and Cov(y_ij, y_ik) within a group."""
    fit = sleep_fit
    G = fit.block_covariances()[0]
    s2 = fit.sigma**2
    V = fit.marginal_covariance("308").to_numpy()
    x = np.arange(10.0)  # Days for subject 308
    np.testing.assert_allclose(np.diag(V), G[0, 0] + 2 * G[1, 0] * x + G[1, 1] * x**2 + s2, rtol=1e-12)
    off = G[0, 0] + G[1, 0] * (x[:, None] + x[None, :]) + G[1, 1] * np.outer(x, x)
    np.testing.assert_allclose(V - np.diag(np.diag(V)), off - np.diag(np.diag(off)), rtol=1e-12)


def test_gls_beta_and_blup(sleep_fit):
    fit = sleep_fit
    G = fit.block_covariances()[0]
    s2 = fit.sigma**2
    XtVX = np.zeros((2, 2))
    XtVy = np.zeros(2)
    parts = []
    for level, rows, X, Z, y in _groups(fit):
        V = Z @ G @ Z.T + s2 * np.eye(len(rows))
        Vi = np.linalg.inv(V)
        XtVX += X.T @ Vi @ X
        XtVy += X.T @ Vi @ y
        parts.append((level, X, Z, y, Vi))
    beta = np.linalg.solve(XtVX, XtVy)
    np.testing.assert_allclose(fit.fixef.to_numpy(), beta, rtol=1e-10)
    # Var(β̂) = (Σ X_jᵀV_j⁻¹X_j)⁻¹
    np.testing.assert_allclose(fit.vcov.to_numpy(), np.linalg.inv(XtVX), rtol=1e-8)
    re = fit.ranef()["Subject"]
    for level, X, Z, y, Vi in parts:
        b = G @ Z.T @ Vi @ (y - X @ beta)
        np.testing.assert_allclose(re.loc[level].to_numpy(), b, rtol=1e-8, atol=1e-9)


def test_no_covariance_across_groups(sleep_fit):
    """Two observations of different subjects: Cov = 0, so V is block diagonal by subject."""
    fit = sleep_fit
    block = fit.spec.blocks[0]
    G = fit.block_covariances()[0]
    Z = np.hstack([np.eye(block.n_levels)[block.codes][:, [j]] * block.Z for j in range(block.n_levels)])
    Gfull = np.kron(np.eye(block.n_levels), G)
    V = Z @ Gfull @ Z.T + fit.sigma**2 * np.eye(fit.nobs)
    other = block.codes[:, None] != block.codes[None, :]
    assert np.all(V[other] == 0)


def test_dense_likelihood_equals_profiled_objective():
    """−2 log L computed from the dense V agrees with the profiled deviance at the optimum."""
    for method in ("reml", "ml"):
        fit = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", load_dataset("Penicillin")).fit(method=method)
        spec = fit.spec
        Z = np.hstack([np.eye(b.n_levels)[b.codes] for b in spec.blocks])
        g = np.concatenate([np.full(b.n_levels, cov[0, 0]) for b, cov in zip(spec.blocks, fit.block_covariances())])
        V = (Z * g) @ Z.T + fit.sigma**2 * np.eye(fit.nobs)
        X, y = spec.X, spec.y
        Vi = np.linalg.inv(V)
        beta = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
        r = y - X @ beta
        n, p = X.shape
        if method == "ml":
            m2ll = np.linalg.slogdet(V)[1] + r @ Vi @ r + n * np.log(2 * np.pi)
        else:
            m2ll = (np.linalg.slogdet(V)[1] + np.linalg.slogdet(X.T @ Vi @ X)[1] + r @ Vi @ r
                    + (n - p) * np.log(2 * np.pi))
        assert np.isclose(m2ll, fit.objective, rtol=1e-10), method
        np.testing.assert_allclose(fit.fixef.to_numpy(), beta, rtol=1e-10)
        # BLUPs of crossed effects: b̂ = G Zᵀ V⁻¹ (y − Xβ̂)
        b = g * (Z.T @ Vi @ r)
        np.testing.assert_allclose(np.concatenate([x[:, 0] for x in fit.estimates.b]), b, rtol=1e-8, atol=1e-10)


def test_random_intercept_icc_story():
    """Exam, random intercept: Var(y) = σ²_u + σ², Cov within a school = σ²_u."""
    fit = Model("normexam ~ standLRT + (1 | school)", load_dataset("exam")).fit()
    s2u = fit.block_covariances()[0][0, 0]
    V = fit.marginal_covariance(1).to_numpy()
    np.testing.assert_allclose(np.diag(V), s2u + fit.sigma**2)
    np.testing.assert_allclose(V[0, 1:], s2u)
