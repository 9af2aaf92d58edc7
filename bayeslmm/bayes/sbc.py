"""Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018).

Draw parameters and a response from the prior (the explicit parameterisation's
prior predictive), fit the collapsed model to each simulated response, and record
the rank of the true value among the posterior draws.  If the sampler and the
collapsed likelihood are right, every parameter's ranks are uniform.

The collapsed model is compiled once: the response enters it only through three
shared blocks (Z₁ᵀy, X̃ᵀy, yᵀy), which are swapped for each simulation.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from ..crossprod import CrossProducts
from ..spec import ModelSpec
from .collapsed import CollapsedData
from .model import build_pymc_model
from .priors import resolve_priors


@dataclass(frozen=True)
class SBCResult:
    """Ranks (simulations × parameters, each in 0..n_ranks) and a uniformity test per parameter."""

    ranks: pd.DataFrame
    n_ranks: int
    truth: pd.DataFrame

    def uniformity(self, bins: int = 5) -> pd.DataFrame:
        """Chi-square test of uniform ranks per parameter (``bins`` equal-width bins)."""
        rows = []
        for name in self.ranks.columns:
            counts, _ = np.histogram(self.ranks[name], bins=bins, range=(0, self.n_ranks + 1))
            chi2, p = stats.chisquare(counts)
            rows.append((name, chi2, p, counts.tolist()))
        return pd.DataFrame(rows, columns=["parameter", "chi2", "p_value", "counts"]).set_index("parameter")


def _scalar_parameters(ds, names, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Flatten beta, sigma, every sd and correlation into named arrays over the leading dims."""
    out = {}
    beta = np.asarray(ds["beta"])
    for k, coef in enumerate(spec.fixed_names):
        out[f"beta[{coef}]"] = beta[..., k]
    out["sigma"] = np.asarray(ds["sigma"])
    for name, block in zip(names, spec.blocks):
        sd = np.asarray(ds[f"{name}_sd"])
        for i, col in enumerate(block.columns):
            out[f"sd[{name}|{col}]"] = sd[..., i]
        if block.correlated and block.q > 1:
            corr = np.asarray(ds[f"{name}_corr"])
            for i in range(block.q):
                for j in range(i + 1, block.q):
                    out[f"corr[{name}|{block.columns[i]},{block.columns[j]}]"] = corr[..., j, i]
    return out


def simulation_based_calibration(spec: ModelSpec, n_sims: int = 20, draws: int = 200, tune: int = 200,
                                 chains: int = 2, thin: int = 4, seed: int = 0, priors: dict | None = None) -> SBCResult:
    """Run SBC for the collapsed model of ``spec``'s design (its X, Z and grouping).

    Returns ranks in ``0 .. chains·draws/thin``.
    """
    import pymc as pm

    prior_set = resolve_priors(spec, priors)
    cp = CrossProducts.from_spec(spec)
    explicit = build_pymc_model(spec, cp, prior_set, "explicit")
    with explicit.model, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prior = pm.sample_prior_predictive(draws=n_sims, random_seed=seed)
    truth_ds = prior["prior"].to_dataset().isel(chain=0)
    y_sims = prior["prior_predictive"]["y"].to_numpy()[0]
    truth = _scalar_parameters(truth_ds, explicit.names, spec)

    collapsed = build_pymc_model(spec, cp, prior_set, "collapsed")
    logger = logging.getLogger("pymc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    rows = []
    try:
        with collapsed.model, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = pm.NUTS()
            for i in range(n_sims):
                sim = CollapsedData.from_crossprods(CrossProducts.from_spec(dataclasses.replace(spec, y=y_sims[i])))
                pm.set_data({"Z1ty": sim.g, "Xty": sim.Xty, "yty": sim.yty})
                dt = pm.sample(draws=draws, tune=tune, chains=chains, cores=1, step=step, random_seed=seed + 1 + i,
                               progressbar=False, compute_convergence_checks=False)
                post = dt["posterior"].to_dataset()
                draws_i = _scalar_parameters(post, collapsed.names, spec)
                rows.append({k: int(np.sum(v[:, ::thin] < truth[k][i])) for k, v in draws_i.items()})
    finally:
        logger.setLevel(level)
    n_ranks = chains * len(range(0, draws, thin))
    return SBCResult(ranks=pd.DataFrame(rows), n_ranks=n_ranks, truth=pd.DataFrame(truth))
