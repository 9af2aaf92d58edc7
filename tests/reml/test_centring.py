"""Badly offset random slopes: the REML engine optimises in centred coordinates and maps θ back."""

import warnings

import numpy as np
import pandas as pd
import pytest

from bayeslmm import BayesLMMError, Model, load
from bayeslmm.datasets import load_dataset
from bayeslmm.reml.fit import centring_shifts, theta_from_centred, theta_to_centred


@pytest.fixture(scope="module")
def fits():
    df = load_dataset("sleepstudy")
    df["D2"] = df["Days"] + 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the offset-slope warning is expected here
        plain = Model("Reaction ~ Days + (Days | Subject)", df).fit()
        offset = Model("Reaction ~ D2 + (D2 | Subject)", df).fit()
        offset_ml = Model("Reaction ~ D2 + (D2 | Subject)", df).fit(method="ml")
        plain_ml = Model("Reaction ~ Days + (Days | Subject)", df).fit(method="ml")
    return plain, offset, plain_ml, offset_ml


def test_same_model_same_optimum(fits):
    """lme4 1.1-31 stops at REML criterion 1782.445 on this model (with a convergence warning);
    BOBYQA in the raw coordinates stopped at 1745.957; the optimum is the centred model's 1743.628."""
    plain, offset, plain_ml, offset_ml = fits
    assert offset.objective == pytest.approx(plain.objective, rel=1e-9)
    assert offset_ml.objective == pytest.approx(plain_ml.objective, rel=1e-9)
    assert "centred slopes" in offset.optimization.message
    assert "centred" not in plain.optimization.message      # Days: |mean| / sd = 1.6, left alone
    assert offset.sigma == pytest.approx(plain.sigma, rel=1e-5)
    assert offset.fixef["D2"] == pytest.approx(plain.fixef["Days"], rel=1e-6)
    assert offset.fixef_se["D2"] == pytest.approx(plain.fixef_se["Days"], rel=1e-5)
    np.testing.assert_allclose(offset.fitted.to_numpy(), plain.fitted.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(offset.ranef()["Subject"]["D2"], plain.ranef()["Subject"]["Days"], rtol=1e-4)


def test_intercept_variance_is_the_extrapolation_to_zero(fits):
    """Var(b0 + b1·(−200)) from the Days fit is the D2 fit's intercept variance."""
    plain, offset, _, _ = fits
    S = plain.block_covariances()[0]
    x = np.array([1.0, -200.0])
    assert offset.block_covariances()[0][0, 0] == pytest.approx(x @ S @ x, rel=1e-4)
    assert offset.block_covariances()[0][1, 1] == pytest.approx(S[1, 1], rel=1e-4)


def test_theta_maps_are_inverse(fits):
    _, offset, _, _ = fits
    shifts = centring_shifts(offset.spec)
    assert shifts is not None and shifts[0][1] == pytest.approx(204.5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        th = np.array([abs(rng.normal()) + 0.1, rng.normal(), abs(rng.normal()) + 0.1])
        np.testing.assert_allclose(theta_to_centred(offset.spec, theta_from_centred(offset.spec, th, shifts),
                                                    shifts), th, rtol=1e-10)


def test_centred_fit_saves_and_loads_to_the_same_numbers(fits, tmp_path):
    _, offset, _, _ = fits
    path = tmp_path / "offset.zarr"
    offset.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load(path)
    assert again.objective == offset.objective
    np.testing.assert_array_equal(again.fixef_se.to_numpy(), offset.fixef_se.to_numpy())
    np.testing.assert_array_equal(again.ranef()["Subject"].to_numpy(), offset.ranef()["Subject"].to_numpy())


# -- a response far from zero: the cross-products are taken of y − mean(y) -------------------
def test_response_offset_does_not_cost_digits():
    """sleepstudy + 1e8 used to give σ 25.38 (yᵀy ~ 1e16 per row swamps the residual sum of squares)."""
    df = load_dataset("sleepstudy")
    df["R8"] = df["Reaction"] + 1e8
    plain = Model("Reaction ~ Days + (Days | Subject)", df).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the far-from-zero response warning is expected
        m = Model("R8 ~ Days + (Days | Subject)", df)
        offset = m.fit()
    assert m.crossprods.y_shift == pytest.approx(1e8 + df["Reaction"].mean())
    assert offset.objective == pytest.approx(plain.objective, rel=1e-10)
    assert offset.sigma == pytest.approx(plain.sigma, rel=1e-6)
    assert offset.fixef["(Intercept)"] == pytest.approx(plain.fixef["(Intercept)"] + 1e8, rel=1e-12)
    assert offset.fixef["Days"] == pytest.approx(plain.fixef["Days"], rel=1e-6)
    np.testing.assert_allclose(offset.varcorr["sdcor"], plain.varcorr["sdcor"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(offset.fitted - 1e8, plain.fitted, atol=1e-5)


def test_collapsed_data_undoes_the_shift_exactly():
    """The Bayesian engines read the same y-blocks as if no shift had been made."""
    from bayeslmm.bayes.collapsed import CollapsedData
    from bayeslmm.crossprod import CrossProducts

    df = load_dataset("sleepstudy")
    df["R4"] = df["Reaction"] + 1e4       # |mean| / sd ≈ 180: shifted, and still exact enough unshifted
    spec = Model("R4 ~ Days + (Days | Subject)", df).spec
    shifted = CrossProducts.from_spec(spec)
    assert shifted.y_shift != 0
    import bayeslmm.crossprod as cpmod

    ratio = cpmod.SHIFT_RATIO
    try:
        cpmod.SHIFT_RATIO = float("inf")
        direct = CrossProducts.from_spec(spec)
    finally:
        cpmod.SHIFT_RATIO = ratio
    assert direct.y_shift == 0
    a, b = CollapsedData.from_crossprods(shifted), CollapsedData.from_crossprods(direct)
    np.testing.assert_allclose(a.g, b.g, rtol=1e-12)
    np.testing.assert_allclose(a.Xty, b.Xty, rtol=1e-12)
    assert a.yty == pytest.approx(b.yty, rel=1e-12)
    np.testing.assert_array_equal(a.XtX, b.XtX)


def test_exactly_fitted_data_with_an_offset_slope_does_not_crash():
    """Found by the slow property search: y a line in x (two distinct points), x far from zero."""
    df = pd.DataFrame({"y": [0.400275, 0.411264, 0.400275, 0.411264, 0.400275],
                       "x": [-1.199449, -1.177473, -1.199449, -1.177473, -1.199449],
                       "g": pd.Categorical([0, 1, 0, 1, 0])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit = Model("y ~ x + (x | g)", df).fit()
        except BayesLMMError:
            return  # a clear refusal is fine; a LinAlgError is not
    assert np.isfinite(fit.objective) and np.all(np.isfinite(fit.fixef))
