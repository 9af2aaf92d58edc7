"""Simulation-based calibration of the collapsed sampler, including the LKJ correlation.

The default suite runs a 20-simulation smoke test; `make test-slow` runs 200.
"""

import pytest

from bayeslmm import Model
from bayeslmm.bayes.sbc import simulation_based_calibration
from bayeslmm.simulate import simulate_lmm


def _spec(n_groups=12, n_per_group=6):
    data = simulate_lmm(n_groups=n_groups, n_per_group=n_per_group, seed=1)
    return Model("y ~ x + (1 + x | g)", data).spec


def _assert_uniform(result, alpha):
    table = result.uniformity()
    assert set(table.index) == {"beta[(Intercept)]", "beta[x]", "sigma", "sd[g|(Intercept)]", "sd[g|x]",
                                "corr[g|(Intercept),x]"}
    assert (result.ranks.to_numpy() >= 0).all() and (result.ranks.to_numpy() <= result.n_ranks).all()
    bad = table[table.p_value < alpha]
    assert bad.empty, bad


def test_sbc_smoke():
    result = simulation_based_calibration(_spec(), n_sims=20, draws=200, tune=200, chains=2, seed=2026)
    assert len(result.ranks) == 20 and result.n_ranks == 100
    # six parameters, Bonferroni at 1e-3 overall: a miscalibrated sampler piles ranks at the ends
    _assert_uniform(result, 1e-3 / 6)
    # ranks are not degenerate: they spread over the range
    assert result.ranks.std().min() > 10


@pytest.mark.slow
def test_sbc_long():
    result = simulation_based_calibration(_spec(), n_sims=200, draws=400, tune=400, chains=2, seed=7)
    _assert_uniform(result, 0.01 / 6)
