"""The Bayesian engine: the same ModelSpec as a PyMC model, sampled by NUTS."""

from .priors import Prior, PriorSet, default_priors, resolve_priors

__all__ = ["Prior", "PriorSet", "default_priors", "resolve_priors"]
