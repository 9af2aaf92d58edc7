"""Simulation-based calibration of the blocked kernel on a crossed, correlated model.

``y ~ x + (1 + x | a) + (1 + x | b)``, 12 subjects a × 8 items b, every pair once: both
blocks correlated, every effect integrated out (:mod:`bayeslmm.bayes.blocked`), the other
block's effects drawn exactly afterwards.  The default suite runs 20 simulations and a
planted error (truths drawn with a wider sd prior than the fitted model's); ``make
test-slow`` runs 200.
"""

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model, Prior
from bayeslmm.bayes.sbc import LOGLIK, SBCRunner, fixed_priors

N_SMOKE = 20


def _spec(seed=5):
    rng = np.random.default_rng(seed)
    a = np.repeat(np.arange(12), 8)
    b = np.tile(np.arange(8), 12)
    df = pd.DataFrame({"y": rng.normal(size=a.size), "x": rng.normal(size=a.size),
                       "a": [f"s{i}" for i in a], "b": [f"i{i}" for i in b]})
    return Model("y ~ x + (1 + x | a) + (1 + x | b)", df).spec


def _passes(result, alpha=1e-3):
    """Every quantity's binned ranks pass the chi-square test at α after Bonferroni over the quantities."""
    chi = result.uniformity(bins=5)
    return (chi.p_value > alpha / len(chi)).all(), chi


@pytest.fixture(scope="module")
def runner():
    r = SBCRunner(_spec(), N_SMOKE, draws=300, tune=300, chains=2, n_ranks=99, random_seed=2027)
    assert r.sampler == "blocked"
    return r


def test_crossed_sbc_ranks_uniform(runner):
    result = runner.run()
    assert set(result.quantities) == {"beta[(Intercept)]", "beta[x]", "sigma", "sd[a|(Intercept)]", "sd[a|x]",
                                      "corr[a|(Intercept),x]", "sd[b|(Intercept)]", "sd[b|x]",
                                      "corr[b|(Intercept),x]", LOGLIK}
    ok, chi = _passes(result)
    assert ok, chi
    assert (result.records.max_rhat < 1.1).all()


def test_crossed_sbc_rejects_a_planted_error(runner):
    """Truths of the items' slope sd from HalfNormal(4), fitted with HalfNormal(1): the check must fail."""
    wrong = {**fixed_priors(runner.spec), "b": {"sd": Prior("HalfNormal", sigma=[1.0, 4.0]), "eta": 1.0}}
    result = runner.with_simulation_priors(wrong, random_seed=98).run()
    ok, chi = _passes(result)
    assert not ok
    assert chi.loc["sd[b|x]", "p_value"] < 1e-3 / len(chi), chi


@pytest.mark.slow
def test_crossed_sbc_long():
    result = SBCRunner(_spec(), 200, draws=500, tune=500, chains=2, n_ranks=99, random_seed=2028).run()
    ok, chi = _passes(result)
    assert ok, chi
    assert result.coverage(ci_prob=1 - 1e-3 / 20).consistent.all()
