"""Simulated data with a known truth, for teaching, tests and benchmarks.

* :func:`simulate_doctors` — the doctors/patients example of the UCLA introduction to
  linear mixed models: 407 doctors, each seeing 2 to 40 patients (8,525 in all), a
  continuous mobility score, five patient covariates and a random intercept per doctor.
* :func:`simulate_lmm` — ``y ~ x + (1 + x | g)`` data with correlated random intercepts
  and slopes, vectorised for benchmark sizes (1e6 rows x 1e4 groups in a fraction of
  a second).

Both are reproducible through ``random_seed`` (passed to :func:`numpy.random.default_rng`) and
put the true parameters in ``df.attrs["truth"]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

import numpy as np
import pandas as pd

from bayeslmm.deprecation import renamed_kwargs
from bayeslmm.errors import BayesLMMError

__all__ = [
    "DOCTORS_BETA",
    "DOCTORS_SD_INTERCEPT",
    "DOCTORS_SIGMA",
    "simulate_doctors",
    "simulate_lmm",
]

#: True fixed effects of :func:`simulate_doctors` (mobility score points per unit).
DOCTORS_BETA: Mapping[str, float] = {
    "(Intercept)": 40.0,  # mobility of a 0-year-old, unmarried man with rbc = wbc = 0
    "age": -0.25,  # per year
    "married": 1.5,  # married (1) vs not (0)
    "sex": -1.0,  # female (1) vs male (0)
    "rbc": 2.0,  # per 10^12 red cells / L
    "wbc": -0.3,  # per 10^9 white cells / L
}
#: True standard deviation of the doctors' random intercepts.
DOCTORS_SD_INTERCEPT = 4.0
#: True residual (patient-level) standard deviation.
DOCTORS_SIGMA = 6.0

_COVARIATES = ("age", "married", "sex", "rbc", "wbc")


# --------------------------------------------------------------------------- checks
def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise BayesLMMError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise BayesLMMError(f"`{name}` must be at least {minimum}, got {value}.")
    return int(value)


def _float_arg(name: str, value, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise BayesLMMError(f"`{name}` must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise BayesLMMError(f"`{name}` must be positive, got {value}.")
    if nonneg and value < 0:
        raise BayesLMMError(f"`{name}` must be zero or positive, got {value}.")
    return float(value)


def _rng(seed) -> np.random.Generator:
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as err:
        raise BayesLMMError(
            f"`random_seed` must be None, a non-negative integer, a SeedSequence or a "
            f"numpy Generator, got {seed!r} ({err})."
        ) from None


def _group_factor(codes: np.ndarray, n_groups: int) -> pd.Categorical:
    """Categorical with integer labels 1..n_groups from 0-based codes (no hashing)."""
    return pd.Categorical.from_codes(codes, categories=pd.RangeIndex(1, n_groups + 1))


# ------------------------------------------------------------------------- doctors
def _patient_counts(rng, n_doctors, low, high, target) -> np.ndarray:
    """Uniform counts in [low, high], then nudged by +-1 until they sum to target."""
    counts = rng.integers(low, high + 1, size=n_doctors)
    if target is None:
        return counts
    gap = target - int(counts.sum())
    while gap != 0:  # each pass moves |gap| down by >= 1; feasibility checked upstream
        step = 1 if gap > 0 else -1
        room = np.flatnonzero(counts < high) if step > 0 else np.flatnonzero(counts > low)
        chosen = rng.choice(room, size=min(abs(gap), room.size), replace=False)
        counts[chosen] += step
        gap -= step * chosen.size
    return counts


@renamed_kwargs(seed="random_seed")
def simulate_doctors(
    n_doctors: int = 407,
    min_patients: int = 2,
    max_patients: int = 40,
    target_patients: int | None = 8525,
    random_seed=None,
    *,
    beta: Mapping[str, float] | None = None,
    sd_intercept: float = DOCTORS_SD_INTERCEPT,
    sigma: float = DOCTORS_SIGMA,
) -> pd.DataFrame:
    """Simulate the doctors/patients random-intercept example.

    Each doctor sees between `min_patients` and `max_patients` patients; the counts
    are drawn uniformly and then adjusted one patient at a time (never leaving the
    range) so that they add up to exactly `target_patients`.  By default that is the
    seeds' design: 407 doctors, 2 to 40 patients each, 8,525 patients, about 21 per
    doctor.  The model is::

        mobility = 40 - 0.25 age + 1.5 married - 1.0 sex + 2.0 rbc - 0.3 wbc
                   + u_doctor + e,     u_doctor ~ N(0, 4^2),  e ~ N(0, 6^2)

    i.e. ``mobility ~ age + married + sex + rbc + wbc + (1 | doctor)``, six fixed
    effects with the intercept (:data:`DOCTORS_BETA`), random-intercept sd
    :data:`DOCTORS_SD_INTERCEPT` = 4 and residual sd :data:`DOCTORS_SIGMA` = 6.

    Parameters
    ----------
    n_doctors : int, default 407
        Number of doctors (groups), at least 1.
    min_patients, max_patients : int, default 2 and 40
        Range of patients per doctor, ``1 <= min_patients <= max_patients``.
    target_patients : int or None, default 8525
        Total number of patients; must lie in
        ``[n_doctors * min_patients, n_doctors * max_patients]``.  ``None`` keeps the
        uniform draws as they are.
    random_seed : None, int, numpy.random.SeedSequence or numpy.random.Generator
        Passed to :func:`numpy.random.default_rng`; the same seed gives the same frame
        (was ``seed``, still accepted with a ``FutureWarning``).
    beta : mapping, optional
        Fixed effects overriding :data:`DOCTORS_BETA`, keyed by its names
        (``"(Intercept)"``, ``"age"``, ``"married"``, ``"sex"``, ``"rbc"``, ``"wbc"``);
        keys left out keep their default.
    sd_intercept : float, default 4.0
        Standard deviation of the doctors' random intercepts (``>= 0``).
    sigma : float, default 6.0
        Residual standard deviation (``> 0``).

    Returns
    -------
    pandas.DataFrame
        One row per patient, rows grouped by doctor, columns:

        ``doctor``  Categorical, integer labels 1..n_doctors;
        ``mobility`` float, the outcome;
        ``age``     float, years, N(60, 10^2) clipped to [20, 95];
        ``married`` int 0/1, P(1) = 0.6;
        ``sex``     int 0/1, 1 = female, P(1) = 0.5;
        ``rbc``     float, red blood cells 10^12/L, N(4.7, 0.5^2) clipped to [2.5, 7];
        ``wbc``     float, white blood cells 10^9/L, log-normal, median 7.

        ``df.attrs["truth"]`` holds ``{"formula", "beta", "sd_intercept", "sigma"}``.

    Raises
    ------
    bayeslmm.errors.BayesLMMError
        For an invalid argument; the message names it.

    Examples
    --------
    >>> df = simulate_doctors(random_seed=1)
    >>> len(df), df["doctor"].nunique()
    (8525, 407)
    """
    n_doctors, low, high, target_patients = _doctors_design(n_doctors, min_patients, max_patients,
                                                            target_patients)
    coef = _doctors_beta(beta)
    sd_intercept = _float_arg("sd_intercept", sd_intercept, nonneg=True)
    sigma = _float_arg("sigma", sigma, positive=True)
    rng = _rng(random_seed)

    counts = _patient_counts(rng, n_doctors, low, high, target_patients)
    codes = np.repeat(np.arange(n_doctors), counts)
    covariates = _doctors_covariates(rng, codes.size)
    mobility = _doctors_mobility(rng, codes, n_doctors, coef, covariates, sd_intercept, sigma)

    frame = pd.DataFrame(
        {"doctor": _group_factor(codes, n_doctors), "mobility": mobility, **covariates}
    )
    frame.attrs["truth"] = {
        "formula": "mobility ~ age + married + sex + rbc + wbc + (1 | doctor)",
        "beta": coef,
        "sd_intercept": sd_intercept,
        "sigma": sigma,
    }
    return frame


def _doctors_design(n_doctors, min_patients, max_patients, target_patients):
    """The checked ``(n_doctors, low, high, target)``; the target must be reachable."""
    n_doctors = _int_arg("n_doctors", n_doctors, 1)
    low = _int_arg("min_patients", min_patients, 1)
    high = _int_arg("max_patients", max_patients, 1)
    if high < low:
        raise BayesLMMError(
            f"`max_patients` ({high}) must be at least `min_patients` ({low})."
        )
    if target_patients is not None:
        target_patients = _int_arg("target_patients", target_patients, 1)
        # checked here so that _patient_counts' loop always ends
        if not n_doctors * low <= target_patients <= n_doctors * high:
            raise BayesLMMError(
                f"`target_patients` = {target_patients} cannot be reached by {n_doctors} "
                f"doctors seeing {low} to {high} patients each; it must lie in "
                f"[{n_doctors * low}, {n_doctors * high}]."
            )
    return n_doctors, low, high, target_patients


def _doctors_beta(beta) -> dict[str, float]:
    """:data:`DOCTORS_BETA` with the user's overrides, each checked by name."""
    coef = dict(DOCTORS_BETA)
    if beta is None:
        return coef
    if not isinstance(beta, Mapping):
        raise BayesLMMError(f"`beta` must be a mapping of coefficient names, got {beta!r}.")
    unknown = set(beta) - set(coef)
    if unknown:
        raise BayesLMMError(
            f"`beta` has unknown coefficient(s) {sorted(map(str, unknown))}; "
            f"known: {list(coef)}."
        )
    coef.update({k: _float_arg(f"beta[{k!r}]", v) for k, v in beta.items()})
    return coef


def _doctors_covariates(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The five patient covariates, drawn in this order (the order fixes a seed's data)."""
    return {
        "age": np.clip(rng.normal(60.0, 10.0, n), 20.0, 95.0),
        "married": (rng.random(n) < 0.6).astype(np.int64),
        "sex": (rng.random(n) < 0.5).astype(np.int64),
        "rbc": np.clip(rng.normal(4.7, 0.5, n), 2.5, 7.0),
        "wbc": np.exp(rng.normal(math.log(7.0), 0.25, n)),
    }


def _doctors_mobility(rng, codes, n_doctors, coef, covariates, sd_intercept, sigma) -> np.ndarray:
    """The outcome: doctors' intercepts drawn before the patients' noise, as always."""
    u = rng.normal(0.0, sd_intercept, n_doctors)
    mobility = coef["(Intercept)"] + u[codes] + rng.normal(0.0, sigma, codes.size)
    for name in _COVARIATES:
        mobility += coef[name] * covariates[name]
    return mobility


# ----------------------------------------------------------------- general y ~ x
@renamed_kwargs(seed="random_seed")
def simulate_lmm(
    n_groups: int = 100,
    n_per_group: int | Sequence[int] = 10,
    beta: Sequence[float] = (1.0, 2.0),
    sd_intercept: float = 1.0,
    sd_slope: float = 0.5,
    corr: float = 0.3,
    sigma: float = 1.0,
    random_seed=None,
) -> pd.DataFrame:
    """Simulate ``y ~ x + (1 + x | g)`` data with correlated random effects.

    The model is ``y_ij = (beta0 + b0_j) + (beta1 + b1_j) x_ij + e_ij`` with
    ``x_ij ~ N(0, 1)``, ``(b0_j, b1_j) ~ N(0, G)``,
    ``G = [[sd_intercept^2, r sd_intercept sd_slope], [r sd_intercept sd_slope,
    sd_slope^2]]`` (``r = corr``) and ``e_ij ~ N(0, sigma^2)``.  Fully vectorised: one
    million rows in ten thousand groups take a fraction of a second.

    Parameters
    ----------
    n_groups : int, default 100
        Number of groups (at least 1).
    n_per_group : int or sequence of int, default 10
        Rows per group: one number for a balanced design, or one count per group
        (length `n_groups`, each at least 1).
    beta : pair of float, default (1.0, 2.0)
        Fixed intercept and slope.
    sd_intercept, sd_slope : float, default 1.0 and 0.5
        Standard deviations of the random intercepts and slopes (``>= 0``; zero gives
        a singular model).
    corr : float, default 0.3
        Correlation of random intercept and slope, in ``[-1, 1]``.
    sigma : float, default 1.0
        Residual standard deviation (``> 0``).
    random_seed : None, int, numpy.random.SeedSequence or numpy.random.Generator
        Passed to :func:`numpy.random.default_rng`; the same seed gives the same frame
        (was ``seed``, still accepted with a ``FutureWarning``).

    Returns
    -------
    pandas.DataFrame
        Columns ``y`` (float), ``x`` (float) and ``g`` (Categorical, integer labels
        1..n_groups), rows grouped by ``g``.  ``df.attrs["truth"]`` holds
        ``{"formula", "beta": {"(Intercept)", "x"}, "sd_intercept", "sd_slope",
        "corr", "sigma"}``.

    Raises
    ------
    bayeslmm.errors.BayesLMMError
        For an invalid argument; the message names it.

    Examples
    --------
    >>> df = simulate_lmm(n_groups=3, n_per_group=4, random_seed=0)
    >>> df.shape
    (12, 3)
    """
    n_groups = _int_arg("n_groups", n_groups, 1)
    counts = _group_counts(n_groups, n_per_group)
    b0, b1 = _beta_pair(beta)
    sd0, sd1, corr = _effects_covariance(sd_intercept, sd_slope, corr)
    sigma = _float_arg("sigma", sigma, positive=True)
    rng = _rng(random_seed)

    u0, u1 = _correlated_effects(rng, n_groups, sd0, sd1, corr)
    codes = np.repeat(np.arange(n_groups), counts)
    n = codes.size
    x = rng.standard_normal(n)
    # in place: at benchmark sizes (1e6 rows) each temporary costs a full copy
    y = rng.standard_normal(n)
    y *= sigma
    y += (b0 + u0)[codes]
    y += (b1 + u1)[codes] * x

    frame = pd.DataFrame({"y": y, "x": x, "g": _group_factor(codes, n_groups)}, copy=False)
    frame.attrs["truth"] = {
        "formula": "y ~ x + (1 + x | g)",
        "beta": {"(Intercept)": b0, "x": b1},
        "sd_intercept": sd0,
        "sd_slope": sd1,
        "corr": corr,
        "sigma": sigma,
    }
    return frame


def _group_counts(n_groups: int, n_per_group) -> np.ndarray:
    """Rows per group (int64): one number for every group, or one count per group."""
    if isinstance(n_per_group, Integral) and not isinstance(n_per_group, bool):
        return np.full(n_groups, _int_arg("n_per_group", n_per_group, 1), dtype=np.int64)
    try:
        counts = np.asarray(n_per_group)
    except ValueError:  # ragged nested sequences
        counts = np.asarray([None])
    if counts.ndim != 1 or counts.size != n_groups or counts.dtype.kind not in "iu":
        raise BayesLMMError(
            f"`n_per_group` must be an integer or a sequence of {n_groups} integers "
            f"(one per group), got {n_per_group!r}."
        )
    if counts.min() < 1:
        raise BayesLMMError("`n_per_group` must be at least 1 in every group.")
    return counts.astype(np.int64)


def _beta_pair(beta) -> tuple[float, float]:
    """The checked (intercept, slope)."""
    try:
        b0, b1 = beta
    except (TypeError, ValueError):
        raise BayesLMMError(
            f"`beta` must be a pair (intercept, slope), got {beta!r}."
        ) from None
    return _float_arg("beta[0]", b0), _float_arg("beta[1]", b1)


def _effects_covariance(sd_intercept, sd_slope, corr) -> tuple[float, float, float]:
    """The checked sds of the random intercepts and slopes and their correlation."""
    sd0 = _float_arg("sd_intercept", sd_intercept, nonneg=True)
    sd1 = _float_arg("sd_slope", sd_slope, nonneg=True)
    corr = _float_arg("corr", corr)
    if not -1.0 <= corr <= 1.0:
        raise BayesLMMError(f"`corr` must lie in [-1, 1], got {corr}.")
    return sd0, sd1, corr


def _correlated_effects(rng, n_groups: int, sd0: float, sd1: float, corr: float):
    """Random intercepts and slopes (b0, b1) = L z, L the Cholesky factor of G written out for 2 x 2."""
    z = rng.standard_normal((2, n_groups))
    u0 = sd0 * z[0]
    u1 = sd1 * (corr * z[0] + math.sqrt(1.0 - corr * corr) * z[1])
    return u0, u1
