"""A ModelSpec becomes a PyMC model, in one of two parameterisations of the same model.

* ``collapsed``: the first (largest) random-effect block is integrated out
  analytically (:mod:`.collapsed`); other blocks, if any, are sampled non-centred.
* ``explicit``: every random effect is sampled non-centred, b = z Lᵀ, with a
  Normal likelihood over the rows — the general fallback and the cross-check.

Variables (named dims throughout): ``beta`` (dim ``coef``), ``sigma``, and per
block ``{g}_sd`` (dim ``{g}_effect``), ``{g}_corr`` (dim ``{g}_pair``: the distinct
correlations) for correlated blocks, and the effects ``{g}`` (dims ``{g}_level``, ``{g}_effect``; drawn after sampling in the
collapsed parameterisation).  ``g`` is the grouping factor's name, with ``.1``,
``.2`` appended when several blocks share a factor (lme4's convention); the layout
is :mod:`.naming`'s.

:func:`pymc_model` is the public way in (``Model.pymc_model``): the explicit model
with the linear predictor as a named Deterministic ``mu`` (dim ``obs``) beside the
observed ``y``.  The fits themselves never name ``mu``: its draws (rows × draws)
would be stored in every posterior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..crossprod import CrossProducts
from ..errors import BayesLMMError
from ..spec import ModelSpec
from . import naming
from .collapsed import CollapsedData, ResponseScale, collapsed_loglik
from .naming import block_names
from .priors import PriorSet

PARAMETERIZATIONS = ("collapsed", "explicit")


@dataclass
class BuiltModel:
    """A PyMC model with what is needed to read its draws back."""

    model: object
    parameterization: str
    names: list[str]
    collapsed: CollapsedData | None
    internal: list[str]          # free variables that are not reported in the posterior


def _block_cov(name: str, block, bp, pm, pt):
    """The block's absolute Cholesky factor L (q×q), its sds and, if correlated, its correlation."""
    dims_e = naming.effect_dim(name)
    if block.correlated and block.q > 1:
        chol, corr, sds = pm.LKJCholeskyCov(f"{name}_chol_cov", n=block.q, eta=bp.eta,
                                            sd_dist=bp.sd.dist(shape=block.q), compute_corr=True)
        pm.Deterministic(naming.sd_var(name), sds, dims=dims_e)
        i, j = naming.pair_index(block.q)
        pm.Deterministic(naming.corr_var(name), corr[i, j], dims=naming.pair_dim(name))
        return chol
    sds = bp.sd.variable(naming.sd_var(name), dims=dims_e)
    return pt.diag(sds)


#: a sampled one-column block is centred when its levels average at least this many rows
CENTRED_MIN_ROWS = 20


def centred_block(spec: ModelSpec, block) -> bool:
    """Whether a sampled block's effects are parameterised centred (b ~ N(0, sd²)) rather than b = sd·z.

    Betancourt & Girolami (2015): non-centred suits weakly informed effects, centred
    strongly informed ones; here a one-column block whose levels average ≥ 20 rows
    (InstEval's lecturers and departments) is centred.
    """
    return block.q == 1 and spec.n_obs / block.n_levels >= CENTRED_MIN_ROWS


def centring_matrix(spec: ModelSpec, priors: PriorSet) -> np.ndarray:
    """C with β = C β_c: β_c are the coefficients on centred predictors (intercept at the means)."""
    Cm = np.eye(spec.n_fixed)
    if priors.centred:
        i0 = list(spec.fixed_names).index("(Intercept)")
        Cm[i0, :] -= priors.x_means
        Cm[i0, i0] = 1.0
    return Cm


def build_pymc_model(spec: ModelSpec, cp: CrossProducts, priors: PriorSet,
                     parameterization: str = "collapsed", named_mu: bool = False,
                     scale: ResponseScale | None = None) -> BuiltModel:
    """The PyMC model of ``spec`` under ``priors``.

    With ``scale`` the same model of the standardised response (y − shift)/scale, the
    priors mapped to it (:class:`.collapsed.ResponseScale`): what fits sample.

    ``named_mu`` (explicit parameterisation only) adds the linear predictor as a
    Deterministic ``mu`` with dim ``obs``; off for fits, whose posteriors would
    otherwise hold rows × draws values of it.
    """
    import pymc as pm
    import pytensor.tensor as pt

    if scale is not None:
        priors = scale.priors(priors)
    names = block_names(spec)
    coords = {"coef": list(spec.fixed_names)}
    for name, block in zip(names, spec.blocks):
        coords[naming.level_dim(name)] = list(block.levels)
        coords[naming.effect_dim(name)] = list(block.columns)
        if block.correlated and block.q > 1:
            coords[naming.pair_dim(name)] = naming.pair_labels(list(block.columns))
    Cm = centring_matrix(spec, priors)
    internal = ["beta_c"]
    with pm.Model(coords=coords) as model:
        mus = np.array([pr.params.get("mu", 0.0) for pr in priors.beta])
        same_family = all(pr.family == "Normal" for pr in priors.beta)
        if same_family:
            sig = np.array([pr.params["sigma"] for pr in priors.beta])
            beta_c = pm.Normal("beta_c", mu=mus, sigma=sig, dims="coef")
        else:
            beta_c = pt.stack([pr.variable(f"beta_c[{n}]") for pr, n in zip(priors.beta, spec.fixed_names)])
            internal += [f"beta_c[{n}]" for n in spec.fixed_names]
        beta = pm.Deterministic("beta", pt.dot(Cm, beta_c), dims="coef")
        sigma = priors.sigma.variable("sigma")
        chols = []
        for name, block, bp in zip(names, spec.blocks, priors.blocks):
            chols.append(_block_cov(name, block, bp, pm, pt))
            if block.correlated and block.q > 1:
                internal += [f"{name}_chol_cov", f"{name}_chol_cov_corr", f"{name}_chol_cov_stds"]
        first = 1 if parameterization == "collapsed" else 0
        effects = []
        for name, block, L in zip(names[first:], spec.blocks[first:], chols[first:]):
            dims = (naming.level_dim(name), naming.effect_dim(name))
            if centred_block(spec, block):
                # data-rich levels: the centred form b ~ N(0, sd²) has the better geometry
                # (the non-centred one turns into a ridge between z and the sd)
                effects.append(pm.Normal(name, 0.0, L[0, 0], dims=dims))
                continue
            z = pm.Normal(f"{name}_z", 0.0, 1.0, dims=dims)
            internal.append(f"{name}_z")
            effects.append(pm.Deterministic(name, pt.dot(z, L.T), dims=dims))
        if parameterization == "collapsed":
            data = CollapsedData.from_crossprods(cp, scale)
            # the response enters only through these three: shared, so that a compiled
            # model can be refitted to new y of the same design (simulation-based calibration)
            shared = data.with_response(pm.Data("Z1ty", data.g), pm.Data("Xty", data.Xty), pm.Data("yty", data.yty))
            gamma = pt.concatenate([e.ravel() for e in effects] + [beta]) if effects else beta
            pm.Potential("marginal_loglik", collapsed_loglik(shared, gamma, chols[0], sigma))
        elif parameterization == "explicit":
            data = None
            mu = pt.dot(spec.X, beta)
            for block, b in zip(spec.blocks, effects):
                mu = mu + pt.sum(block.Z * b[block.codes], axis=1)
            model.add_coord("obs", np.arange(spec.n_obs))
            if named_mu:
                mu = pm.Deterministic("mu", mu, dims="obs")
            pm.Normal("y", mu=mu, sigma=sigma, observed=spec.y if scale is None else scale.standardise(spec.y),
                      dims="obs")
        else:
            raise ValueError(parameterization)
    return BuiltModel(model=model, parameterization=parameterization, names=names, collapsed=data,
                      internal=internal)


#: variable names the models use besides the blocks' own
RESERVED_NAMES = ("beta", "beta_c", "sigma", "mu", "y", "marginal_loglik", "Z1ty", "Xty", "yty")


def pymc_model(spec: ModelSpec, cp: CrossProducts, priors: PriorSet, parameterization: str = "explicit"):
    """The ``pm.Model`` of a NUTS fit, for users to sample, extend or inspect themselves.

    It is on the response's own scale (a fit may sample a standardised copy of it,
    whose draws it maps back: the same posterior).

    ``explicit`` (default): every effect sampled non-centred (or centred, see
    :func:`centred_block`), the linear predictor as the Deterministic ``mu`` (dim
    ``obs``) and the Normal likelihood as the observed ``y`` (dim ``obs``).
    ``collapsed``: the first block integrated out, its likelihood a Potential
    ``marginal_loglik`` (no ``mu`` and no ``y``: the rows enter through cross-products).
    """
    if parameterization not in PARAMETERIZATIONS:
        raise BayesLMMError(f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}")
    clash = sorted(set(block_names(spec)) & set(RESERVED_NAMES))
    if clash:
        raise BayesLMMError(f"the grouping factor(s) {clash} share a name with a variable of the PyMC model "
                            f"({list(RESERVED_NAMES)}): rename the column(s) in the data")
    if parameterization == "explicit":
        spec.require_rows("the explicit parameterisation (a likelihood over the rows)")
    return build_pymc_model(spec, cp, priors, parameterization, named_mu=parameterization == "explicit").model
