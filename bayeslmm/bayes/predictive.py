"""Prior predictive draws, from the explicit parameterisation (same priors as the collapsed one)."""

from __future__ import annotations

from ..crossprod import CrossProducts
from ..errors import BayesLMMError
from ..spec import ModelSpec
from .model import build_pymc_model
from .priors import resolve_priors


def prior_predictive(spec: ModelSpec, cp: CrossProducts, draws: int = 500, priors: dict | None = None,
                     random_seed: int | None = None):
    """A DataTree with ``prior`` (parameters) and ``prior_predictive`` (the response ``y``)."""
    import pymc as pm

    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise BayesLMMError(f"draws must be a positive integer, got {draws!r}")
    built = build_pymc_model(spec, cp, resolve_priors(spec, priors), "explicit")
    with built.model:
        return pm.sample_prior_predictive(draws=draws, random_seed=random_seed)
