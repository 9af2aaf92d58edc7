"""Simulators: the doctors/patients design, y ~ x + (1 + x | g) data, seeds, errors.

Recovery checks use fixed seeds, so they are deterministic; the tolerances are still
set at about four or more standard errors of the moment estimators used, so that a
change of seed (or of numpy's generator streams) would not make them fail by chance.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from bayeslmm.errors import BayesLMMError
from bayeslmm.simulate import (
    DOCTORS_BETA,
    DOCTORS_SD_INTERCEPT,
    DOCTORS_SIGMA,
    simulate_doctors,
    simulate_lmm,
)

COVARIATES = ["age", "married", "sex", "rbc", "wbc"]


def _group_means(codes: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.bincount(codes, weights=values, minlength=counts.size) / counts


# ----------------------------------------------------------------- doctors design
def test_doctors_default_design():
    df = simulate_doctors(random_seed=1)
    assert len(df) == 8525
    assert list(df.columns) == ["doctor", "mobility", *COVARIATES]
    assert isinstance(df["doctor"].dtype, pd.CategoricalDtype)
    assert df["doctor"].cat.categories.tolist() == list(range(1, 408))
    counts = df["doctor"].value_counts()
    assert counts.size == 407
    assert counts.min() >= 2 and counts.max() <= 40
    assert counts.mean() == pytest.approx(8525 / 407)  # about 21, as in the seeds
    assert set(df["married"].unique()) <= {0, 1} and set(df["sex"].unique()) <= {0, 1}
    assert df["married"].dtype.kind == "i" and df["sex"].dtype.kind == "i"
    assert df["age"].between(20, 95).all() and df["rbc"].between(2.5, 7).all()
    assert (df["wbc"] > 0).all()
    assert not df.isna().any().any()


def test_doctors_truth_in_attrs():
    truth = simulate_doctors(random_seed=2).attrs["truth"]
    assert truth["beta"] == dict(DOCTORS_BETA)
    assert list(truth["beta"]) == ["(Intercept)", *COVARIATES]  # six fixed effects
    assert truth["sd_intercept"] == DOCTORS_SD_INTERCEPT == 4.0
    assert truth["sigma"] == DOCTORS_SIGMA == 6.0
    assert truth["formula"] == "mobility ~ age + married + sex + rbc + wbc + (1 | doctor)"


def test_doctors_reproducible_with_seed():
    a, b = simulate_doctors(random_seed=7), simulate_doctors(random_seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs == b.attrs
    c = simulate_doctors(random_seed=8)
    assert not np.array_equal(a["mobility"].to_numpy(), c["mobility"].to_numpy())
    assert not a["doctor"].value_counts(sort=False).equals(c["doctor"].value_counts(sort=False))
    gen = simulate_doctors(random_seed=np.random.default_rng(7))
    pd.testing.assert_frame_equal(a, gen)  # a Generator seeded alike gives the same frame


@pytest.mark.parametrize("target, expected", [(50, {5}), (20, {2}), (35, None)])
def test_doctors_counts_hit_target_within_bounds(target, expected):
    df = simulate_doctors(n_doctors=10, min_patients=2, max_patients=5,
                          target_patients=target, random_seed=3)
    counts = df["doctor"].value_counts()
    assert counts.sum() == target and counts.size == 10
    assert counts.between(2, 5).all()
    if expected is not None:
        assert set(counts) == expected


@pytest.mark.parametrize("seed", range(5))
def test_doctors_target_met_for_many_seeds(seed):
    counts = simulate_doctors(random_seed=seed)["doctor"].value_counts()
    assert counts.sum() == 8525 and counts.between(2, 40).all() and counts.size == 407


def test_doctors_without_target():
    df = simulate_doctors(n_doctors=50, target_patients=None, random_seed=4)
    counts = df["doctor"].value_counts()
    assert counts.size == 50 and counts.between(2, 40).all()
    assert len(df) == counts.sum()


def test_doctors_model_equation_is_exact_without_noise():
    beta = {"(Intercept)": 10.0, "age": 0.1, "married": -2.0, "sex": 3.0,
            "rbc": 0.5, "wbc": 1.0}
    df = simulate_doctors(random_seed=5, beta=beta, sd_intercept=0.0, sigma=1e-9)
    X = np.column_stack([np.ones(len(df)), df[COVARIATES].to_numpy(float)])
    coef, *_ = np.linalg.lstsq(X, df["mobility"].to_numpy(), rcond=None)
    np.testing.assert_allclose(coef, list(beta.values()), atol=1e-6)
    partial = simulate_doctors(random_seed=5, beta={"age": 0.0}).attrs["truth"]["beta"]
    assert partial["age"] == 0.0 and partial["rbc"] == DOCTORS_BETA["rbc"]


def test_doctors_recovers_truth_from_a_large_simulation():
    """Within-doctor OLS for the slopes and sigma, moments of doctor means for the sd.

    With J = 5,000 doctors (N ~ 105,000 patients): SE(sigma_hat) ~ 6 / sqrt(2 N) ~ 0.013
    (tolerance 2 %, > 8 SE); SE(sd_hat) ~ 0.045 (tolerance 5 % = 0.2, ~4.5 SE); slopes
    within 4 of their OLS standard errors; intercept within 0.6 (~4 SE: 0.06 from the
    doctor means plus ~0.13 from extrapolating the slopes to age 0).
    """
    df = simulate_doctors(n_doctors=5000, target_patients=None, random_seed=20240601)
    codes = df["doctor"].cat.codes.to_numpy()
    counts = np.bincount(codes).astype(float)
    y = df["mobility"].to_numpy()
    X = df[COVARIATES].to_numpy(float)
    y_bar = _group_means(codes, y, counts)
    X_bar = np.column_stack([_group_means(codes, X[:, k], counts) for k in range(5)])
    yw, Xw = y - y_bar[codes], X - X_bar[codes]
    slopes, *_ = np.linalg.lstsq(Xw, yw, rcond=None)
    resid = yw - Xw @ slopes
    n, J = len(y), counts.size
    sigma2 = resid @ resid / (n - J - 5)
    se = np.sqrt(sigma2 * np.diag(np.linalg.inv(Xw.T @ Xw)))
    truth = df.attrs["truth"]
    true_slopes = np.array([truth["beta"][c] for c in COVARIATES])
    assert np.all(np.abs(slopes - true_slopes) < 4 * se), (slopes, se)
    assert np.sqrt(sigma2) == pytest.approx(truth["sigma"], rel=0.02)

    r = y_bar - X_bar @ slopes  # = beta0 + u_j + mean error of doctor j
    tau2 = r.var(ddof=1) - sigma2 * np.mean(1.0 / counts)
    assert np.sqrt(tau2) == pytest.approx(truth["sd_intercept"], rel=0.05)
    assert r.mean() == pytest.approx(truth["beta"]["(Intercept)"], abs=0.6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"n_doctors": 0}, "n_doctors"),
        ({"n_doctors": 4.5}, "n_doctors"),
        ({"n_doctors": True}, "n_doctors"),
        ({"min_patients": 0}, "min_patients"),
        ({"max_patients": "40"}, "max_patients"),
        ({"min_patients": 10, "max_patients": 5}, "max_patients"),
        ({"target_patients": 100}, "target_patients"),  # < 407 * 2
        ({"target_patients": 407 * 40 + 1}, "target_patients"),
        ({"sd_intercept": -1.0}, "sd_intercept"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"beta": {"height": 1.0}}, "beta"),
        ({"beta": [1.0, 2.0]}, "beta"),
        ({"beta": {"age": "old"}}, "beta"),
        ({"random_seed": -3}, "random_seed"),
        ({"random_seed": "abc"}, "random_seed"),
    ],
)
def test_doctors_argument_errors(kwargs, argument):
    with pytest.raises(BayesLMMError, match=f"`{argument}"):
        simulate_doctors(**kwargs)


# ------------------------------------------------------------- y ~ x + (1 + x | g)
def test_lmm_shape_and_types():
    df = simulate_lmm(n_groups=7, n_per_group=3, random_seed=0)
    assert df.shape == (21, 3) and list(df.columns) == ["y", "x", "g"]
    assert df["y"].dtype == np.float64 and df["x"].dtype == np.float64
    assert isinstance(df["g"].dtype, pd.CategoricalDtype)
    assert df["g"].cat.categories.tolist() == list(range(1, 8))
    assert (df["g"].value_counts() == 3).all()
    truth = df.attrs["truth"]
    assert truth == {
        "formula": "y ~ x + (1 + x | g)", "beta": {"(Intercept)": 1.0, "x": 2.0},
        "sd_intercept": 1.0, "sd_slope": 0.5, "corr": 0.3, "sigma": 1.0,
    }


def test_lmm_unbalanced_groups():
    df = simulate_lmm(n_groups=3, n_per_group=[1, 4, 2], random_seed=0)
    assert df["g"].value_counts(sort=False).tolist() == [1, 4, 2]


def test_lmm_reproducible_with_seed():
    a, b = simulate_lmm(50, 20, random_seed=11), simulate_lmm(50, 20, random_seed=11)
    pd.testing.assert_frame_equal(a, b)
    c = simulate_lmm(50, 20, random_seed=12)
    assert not np.array_equal(a["y"].to_numpy(), c["y"].to_numpy())


def test_lmm_recovers_covariance_from_per_group_fits():
    """Per-group OLS: Cov(b_hat_j) = G + sigma^2 (X_j'X_j)^-1, so G = that minus the mean.

    J = 4,000 groups of 50: SE of sd_intercept_hat ~ 1.1 %, of sd_slope_hat ~ 1.2 %
    (tolerance 5 %), of corr_hat ~ 0.015 (tolerance 0.07), of sigma_hat ~ 0.2 %
    (tolerance 1 %); beta within 4 SE (0.016 and 0.008 → 0.07 and 0.04).
    """
    J, m = 4000, 50
    df = simulate_lmm(J, m, beta=(1.0, 2.0), sd_intercept=1.0, sd_slope=0.5,
                      corr=0.3, sigma=1.0, random_seed=99)
    codes = df["g"].cat.codes.to_numpy()
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    n = np.full(J, float(m))
    sx, sy = np.bincount(codes, x), np.bincount(codes, y)
    sxx, sxy = np.bincount(codes, x * x), np.bincount(codes, x * y)
    det = n * sxx - sx * sx
    b1 = (n * sxy - sx * sy) / det
    b0 = (sy - b1 * sx) / n
    resid = y - b0[codes] - b1[codes] * x
    sigma2 = resid @ resid / (len(y) - 2 * J)
    # mean of sigma^2 (X'X)^-1, with (X'X)^-1 = [[sxx, -sx], [-sx, n]] / det
    sampling = sigma2 * np.array([[np.mean(sxx / det), -np.mean(sx / det)],
                                  [-np.mean(sx / det), np.mean(n / det)]])
    G = np.cov(np.vstack([b0, b1])) - sampling
    sd0, sd1 = np.sqrt(G[0, 0]), np.sqrt(G[1, 1])
    assert sd0 == pytest.approx(1.0, rel=0.05)
    assert sd1 == pytest.approx(0.5, rel=0.05)
    assert G[0, 1] / (sd0 * sd1) == pytest.approx(0.3, abs=0.07)
    assert np.sqrt(sigma2) == pytest.approx(1.0, rel=0.01)
    assert b0.mean() == pytest.approx(1.0, abs=0.07)
    assert b1.mean() == pytest.approx(2.0, abs=0.04)


def test_lmm_marginal_variance_matches_seed_formula():
    """Var(y | x) = s_u0^2 + 2 s_u01 x + s_u1^2 x^2 + sigma^2 (the seeds' formula).

    1e6 rows in 1e4 groups; ~13,000 rows near x = +-1.5 give SE ~ 1.2 % (tolerance 5 %).
    """
    df = simulate_lmm(10_000, 100, beta=(1.0, 2.0), sd_intercept=1.0, sd_slope=0.5,
                      corr=0.3, sigma=1.0, random_seed=2024)
    x = df["x"].to_numpy()
    r = df["y"].to_numpy() - 1.0 - 2.0 * x
    s01 = 0.3 * 1.0 * 0.5
    for x0 in (-1.5, 0.0, 1.5):
        near = np.abs(x - x0) < 0.05
        expected = 1.0 + 2 * s01 * x0 + 0.25 * x0**2 + 1.0
        assert r[near].var() == pytest.approx(expected, rel=0.05), x0


def test_lmm_degenerate_covariances():
    df = simulate_lmm(200, 5, sd_intercept=0.0, sd_slope=0.0, sigma=1e-9, random_seed=1)
    np.testing.assert_allclose(df["y"], 1.0 + 2.0 * df["x"], atol=1e-7)
    perfect = simulate_lmm(500, 2, sd_intercept=1.0, sd_slope=2.0, corr=1.0, random_seed=1)
    assert np.isfinite(perfect["y"]).all()


def test_lmm_million_rows_is_fast():
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        df = simulate_lmm(n_groups=10_000, n_per_group=100, random_seed=0)
        best = min(best, time.perf_counter() - start)
    assert df.shape == (1_000_000, 3) and df["g"].nunique() == 10_000
    assert best < 1.0, f"1e6 rows took {best:.2f} s"  # about 0.04 s on a laptop-class CPU


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"n_groups": 0}, "n_groups"),
        ({"n_groups": 2.0}, "n_groups"),
        ({"n_per_group": 0}, "n_per_group"),
        ({"n_groups": 3, "n_per_group": [1, 2]}, "n_per_group"),
        ({"n_groups": 2, "n_per_group": [1, 0]}, "n_per_group"),
        ({"n_groups": 2, "n_per_group": [1.5, 2.0]}, "n_per_group"),
        ({"beta": (1.0,)}, "beta"),
        ({"beta": 1.0}, "beta"),
        ({"beta": (1.0, np.inf)}, "beta"),
        ({"sd_intercept": -0.1}, "sd_intercept"),
        ({"sd_slope": -0.1}, "sd_slope"),
        ({"corr": 1.5}, "corr"),
        ({"corr": -1.01}, "corr"),
        ({"sigma": -1.0}, "sigma"),
        ({"random_seed": 1.5}, "random_seed"),
    ],
)
def test_lmm_argument_errors(kwargs, argument):
    with pytest.raises(BayesLMMError, match=f"`{argument}"):
        simulate_lmm(**kwargs)
