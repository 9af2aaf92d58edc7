"""The last old names (docs/vocabulary.md): ``Profiler.interval(level=)`` and the SBC tools' ``seed``,
``ci`` and ``alpha``.  The new names work without a warning, the old ones warn and mean the same,
and ``alpha`` (1 − a probability) is never silently taken for the ``ci_prob`` that replaces it.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import BayesLMMError
from bayeslmm.bayes.sbc import (
    SBCResult,
    SBCRunner,
    coverage_interval,
    draw_prior,
    ecdf_band,
    ecdf_test,
    fixed_priors,
    simulation_based_calibration,
)
from bayeslmm.reml.profile import Profiler


def _quiet(fn, *args, **kwargs):
    """Call ``fn``, asserting that it gave no renaming warning: the new names must not warn."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    assert not [w for w in seen if issubclass(w.category, FutureWarning) and "future release" in str(w.message)]
    return out


# -- Profiler.interval: ``level`` was the interval's probability -> ``ci_prob`` -------------------
def test_profiler_interval_takes_ci_prob(sleep_reml):
    prof = Profiler(sleep_reml)
    sigma = prof.params[-1]
    lo, hi, notes = _quiet(prof.interval, sigma, ci_prob=0.9)
    assert _quiet(prof.interval, sigma, 0.9)[:2] == (lo, hi)            # the position is kept
    with pytest.warns(FutureWarning, match="interval\\(\\): `level` is renamed `ci_prob`"):
        assert prof.interval(sigma, level=0.9)[:2] == (lo, hi)
    with pytest.raises(BayesLMMError, match="both `level` and `ci_prob`"):
        prof.interval(sigma, level=0.9, ci_prob=0.9)
    # ci_prob is the probability: both ends sit where the profile deviance crosses χ²₁'s 0.9
    # quantile, 2.7055 (reached: 3e-6; asserted to 1e-3)
    cutoff = stats.chi2.ppf(0.9, 1)
    assert lo < sleep_reml.sigma < hi and not notes
    assert prof.profile(sigma, lo) == pytest.approx(cutoff, abs=1e-3)
    assert prof.profile(sigma, hi) == pytest.approx(cutoff, abs=1e-3)


# -- SBC: seed -> random_seed ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec(sleep_model):
    return sleep_model.spec


def test_draw_prior_takes_random_seed(spec):
    from bayeslmm.bayes.priors import resolve_priors

    priors = resolve_priors(spec, fixed_priors(spec))
    new = _quiet(draw_prior, spec, priors, 5, random_seed=4)
    with pytest.warns(FutureWarning, match="draw_prior\\(\\): `seed` is renamed `random_seed`"):
        old = draw_prior(spec, priors, 5, seed=4)
    assert new.keys() == old.keys() and all(np.array_equal(new[k], old[k]) for k in new)
    assert not np.array_equal(new["beta"], draw_prior(spec, priors, 5, 5)["beta"])   # the seed matters


def test_runner_takes_random_seed(spec):
    new = _quiet(SBCRunner, spec, 3, draws=20, chains=2, n_ranks=9, random_seed=11)
    with pytest.warns(FutureWarning, match="`seed` is renamed `random_seed`"):
        old = SBCRunner(spec, 3, draws=20, chains=2, n_ranks=9, seed=11)
    assert new.random_seed == old.random_seed == 11
    assert np.array_equal(new.params["sigma"], old.params["sigma"])
    np.testing.assert_array_equal(new.simulate(2)[0], old.simulate(2)[0])
    # the settings stored beside a run keep their "seed" key, so stored runs still resume
    assert new.settings()["seed"] == 11
    with pytest.warns(FutureWarning, match="with_simulation_priors\\(\\): `seed` is renamed `random_seed`"):
        other = new.with_simulation_priors(fixed_priors(spec), seed=12)
    assert other.random_seed == 12
    assert np.array_equal(other.params["sigma"], _quiet(new.with_simulation_priors, fixed_priors(spec),
                                                        random_seed=12).params["sigma"])


def test_every_public_sbc_seed_has_the_shim():
    assert simulation_based_calibration.renamed_kwargs == {"seed": "random_seed", "levels": "ci_probs"}
    assert SBCRunner.__init__.renamed_kwargs == {"seed": "random_seed", "levels": "ci_probs"}


# -- SBC: levels (interval probabilities; a level is one value of a group) -> ci_probs -----------
def test_sbc_levels_are_ci_probs(spec, result):
    with pytest.warns(FutureWarning, match="`levels` is renamed `ci_probs`"):
        runner = SBCRunner(spec, 3, draws=20, chains=2, n_ranks=9, levels=(0.8,))
    assert runner.ci_probs == (0.8,)
    with pytest.warns(FutureWarning, match="SBCRunner.levels is renamed ci_probs"):
        assert runner.levels == (0.8,)
    with pytest.warns(FutureWarning, match="SBCRunner.seed is renamed random_seed"):
        assert runner.seed == runner.random_seed == 0
    with pytest.warns(FutureWarning, match="SBCResult.levels is renamed ci_probs"):
        assert result.levels == result.ci_probs == (0.5, 0.9)
    with pytest.warns(FutureWarning, match="from_records\\(\\): `levels` is renamed `ci_probs`"):
        only50 = SBCResult.from_records(result.records, 99, levels=(0.5,))
    assert only50.ci_probs == (0.5,) and list(_quiet(only50.coverage).nominal) == [0.5]


# -- SBC: alpha (1 − the band's probability) -> ci_prob; ci -> ci_prob ----------------------------
RANKS = np.random.default_rng(5).integers(0, 20, 60)


def test_ecdf_test_takes_ci_prob_for_alpha():
    new = _quiet(ecdf_test, RANKS, 19, ci_prob=0.9, n_null=2000, random_seed=3)
    with pytest.warns(FutureWarning, match="`alpha` is replaced by `ci_prob` = 1 − alpha"):
        old = ecdf_test(RANKS, 19, alpha=0.1, n_null=2000, random_seed=3)
    assert old == new                             # alpha=0.1 is ci_prob=0.9 exactly
    # the band level γ is the (1 − ci_prob) quantile of the null statistic: a wider band, a smaller γ
    assert _quiet(ecdf_test, RANKS, 19, ci_prob=0.99, n_null=2000, random_seed=3)["gamma"] < new["gamma"]
    with pytest.warns(FutureWarning, match="`seed` is renamed `random_seed`"):
        assert ecdf_test(RANKS, 19, ci_prob=0.9, n_null=2000, seed=3) == new
    with pytest.raises(TypeError):               # an old positional alpha is refused, not read as ci_prob
        ecdf_test(RANKS, 19, 0.05)
    with pytest.raises(BayesLMMError, match="both `alpha` and `ci_prob`"):
        ecdf_test(RANKS, 19, alpha=0.05, ci_prob=0.95)
    with pytest.raises(BayesLMMError, match="ci_prob must be a probability"):
        ecdf_test(RANKS, 19, ci_prob=95)


def test_ecdf_band_takes_ci_prob_for_alpha():
    new = _quiet(ecdf_band, 60, 19, ci_prob=0.9, n_null=2000)
    with pytest.warns(FutureWarning, match="ecdf_band\\(\\): `alpha` is replaced by `ci_prob`"):
        old = ecdf_band(60, 19, alpha=0.1, n_null=2000)
    for a, b in zip(new, old):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError):
        ecdf_band(60, 19, 0.05)


def test_coverage_interval_takes_ci_prob():
    new = _quiet(coverage_interval, 0, 20, ci_prob=0.9)
    with pytest.warns(FutureWarning, match="coverage_interval\\(\\): `ci` is renamed `ci_prob`"):
        assert coverage_interval(0, 20, ci=0.9) == new
    # Clopper–Pearson with no successes: [0, 1 − (α/2)^(1/n)], α = 1 − ci_prob
    assert new[0] == 0.0 and new[1] == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-10)


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(2)
    n = 200
    rec = {"sim": np.arange(n), "rank:a": rng.integers(0, 100, n), "truth:a": rng.standard_normal(n),
           "in50:a": rng.random(n) < 0.5, "in90:a": rng.random(n) < 0.85}
    return SBCResult.from_records(pd.DataFrame(rec), n_ranks=99)


def test_result_checks_take_ci_prob(result):
    ec = _quiet(result.ecdf, ci_prob=0.9, n_null=2000)
    with pytest.warns(FutureWarning, match="ecdf\\(\\): `alpha` is replaced by `ci_prob`"):
        pd.testing.assert_frame_equal(result.ecdf(alpha=0.1, n_null=2000), ec)
    cov = _quiet(result.coverage, ci_prob=0.9)
    with pytest.warns(FutureWarning, match="coverage\\(\\): `ci` is renamed `ci_prob`"):
        pd.testing.assert_frame_equal(result.coverage(ci=0.9), cov)
    k = int(result.records["in90:a"].sum())
    row = cov.set_index("nominal").loc[0.9]
    assert (row.ci_low, row.ci_high) == coverage_interval(k, 200, 0.9)


def test_result_table_names_both_probabilities(result):
    new = _quiet(result.table, bins=10, band_ci_prob=0.9, coverage_ci_prob=0.8)
    with pytest.warns(FutureWarning) as seen:
        old = result.table(bins=10, alpha=0.1, ci=0.8)
    assert {str(w.message).split("(): ")[1].split(";")[0] for w in seen if "SBCResult.table" in str(w.message)} == {
        "`alpha` is replaced by `band_ci_prob` = 1 − alpha (alpha=0.05 is band_ci_prob=0.95)",
        "`ci` is renamed `coverage_ci_prob`"}
    pd.testing.assert_frame_equal(old, new)
    assert new.loc["a", "cov90_low"] == coverage_interval(int(result.records["in90:a"].sum()), 200, 0.8)[0]
    with pytest.raises(TypeError):
        result.table(10, 0.05, 0.99)
