"""Simulation-based calibration of the structured kernel (bayes/structured.py): AR(1) within groups
with a random intercept, ``y ~ x + (1 | g)``, 10 groups × 5 rows, every effect integrated out.

Each simulation draws β, σ, the intercepts' sd and φ from the fitted priors, simulates y with
AR(1) errors (a dense Cholesky factor of Λ_R from ``residual.relative_covariance``, written
independently of the kernel's pieces), rebuilds the kernel's arrays for that y (nothing is
compiled) and ranks the truth among thinned draws.  20 simulations and a planted error in the
default suite; 200 behind ``slow``.
"""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from bayeslmm import CorAR1, Model, Prior
from bayeslmm.bayes.fit import sample_kernel
from bayeslmm.bayes.model import centring_matrix
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.bayes.sbc import draw_prior, ecdf_test, fixed_priors
from bayeslmm.bayes.structured import StructuredData
from bayeslmm.crossprod import CrossProducts
from bayeslmm.residual import relative_covariance
from conftest import thinned_rank

QUANTITIES = ("beta0", "beta1", "sigma", "g_sd", "Phi")


def _spec(seed=2, groups=10, per=5):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    df = pd.DataFrame({"y": rng.normal(size=g.size), "x": rng.normal(size=g.size), "g": [f"g{i}" for i in g]})
    return Model("y ~ x + (1 | g)", df, correlation=CorAR1("g")).spec


def _ranks(n_sims, random_seed, truth_priors=None, n_ranks=39):
    """Ranks of the truths (drawn from ``truth_priors``, default the fitted priors) among thinned draws."""
    import pymc as pm

    spec = _spec()
    fitted = resolve_priors(spec, fixed_priors(spec))
    truths = fitted if truth_priors is None else resolve_priors(spec, truth_priors)
    params = draw_prior(spec, truths, n_sims, random_seed)
    phis = pm.draw(truths.residual[0][1].dist(), draws=n_sims, random_seed=random_seed + 1)
    block = spec.blocks[0]
    ranks = {q: [] for q in QUANTITIES}
    for i in range(n_sims):
        rng = np.random.default_rng([random_seed, i])
        u = spec.residual.unconstrained({"Phi": float(phis[i])})
        chol = np.linalg.cholesky(relative_covariance(spec.residual, u, np.arange(spec.n_obs)))
        b = rng.standard_normal(block.n_levels) * params["g_sd"][i, 0]
        y = spec.X @ params["beta"][i] + b[block.codes] + params["sigma"][i] * chol @ rng.standard_normal(spec.n_obs)
        sim = replace(spec, y=y)
        sd = StructuredData.build(sim, CrossProducts.from_spec(sim), fitted, centring_matrix(sim, fitted))
        dt = sample_kernel(sd, 200, 200, 2, 1, random_seed * 1000 + i, 0.8, 10, False)
        c = sd.constrain(dt["posterior"]["x"].to_numpy())
        draws = {"beta0": c["beta"][..., 0], "beta1": c["beta"][..., 1], "sigma": c["sigma"],
                 "g_sd": c["sd"][0][..., 0], "Phi": c["residual"][..., 0]}
        truth = {"beta0": params["beta"][i, 0], "beta1": params["beta"][i, 1], "sigma": params["sigma"][i],
                 "g_sd": params["g_sd"][i, 0], "Phi": float(phis[i])}
        for q, d in draws.items():
            ranks[q].append(thinned_rank(d, truth[q], n_ranks))
    return {q: np.array(r) for q, r in ranks.items()}, n_ranks


def _outside_band(ranks, n_ranks, ci_prob=0.99):
    tests = {q: ecdf_test(r, n_ranks, ci_prob=ci_prob) for q, r in ranks.items()}
    return {q: t["p_value"] for q, t in tests.items() if t["outside_band"]}


def test_sbc_smoke_ar1_random_intercept():
    # 20 simulations see gross miscalibration only (a wrong sign of the pieces' derivative, a missing
    # −½log|Λ_R| or Jacobian move every rank of Phi or σ to one end): a 0.99 simultaneous band per quantity
    ranks, n_ranks = _ranks(20, random_seed=4)
    assert not _outside_band(ranks, n_ranks)


def test_sbc_rejects_a_planted_error():
    """Truths of the intercepts' sd from HalfNormal(4), fitted with HalfNormal(1): its ranks pile up at the top."""
    spec = _spec()
    wrong = {**fixed_priors(spec), "g": {"sd": Prior("HalfNormal", sigma=4.0), "eta": 1.0}}
    ranks, n_ranks = _ranks(20, random_seed=6, truth_priors=wrong)
    assert "g_sd" in _outside_band(ranks, n_ranks)


@pytest.mark.slow
def test_sbc_ar1_random_intercept_200():
    ranks, n_ranks = _ranks(200, random_seed=5)
    assert not _outside_band(ranks, n_ranks)
