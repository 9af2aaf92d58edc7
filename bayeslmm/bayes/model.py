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
from ..residual import CorAR1, CorCompSymm, VarExp, VarIdent, VarPower
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


def _block_cov(name: str, block, bp):
    """The block's absolute Cholesky factor L (q×q), its sds and, if correlated, its correlation."""
    import pymc as pm
    import pytensor.tensor as pt

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

    if scale is not None:
        priors = scale.priors(priors)
    names = block_names(spec)
    # the variables are created in this order, which fixes the order of a point's values
    if spec.residual is not None and parameterization != "explicit":
        raise BayesLMMError("a model with a residual structure is sampled in the explicit parameterisation "
                            "(the collapsed one would re-form its cross-products at every evaluation)")
    with pm.Model(coords=_coords(spec, names)) as model:
        beta, internal = _fixed_effects(spec, priors)
        sigma = priors.sigma.variable("sigma")
        chols, cov_internal = _block_covs(spec, names, priors)
        rho = {name: prior.variable(name) for name, prior in priors.residual}
        # the collapsed parameterisation integrates the first block out: only the others are sampled
        first = 1 if parameterization == "collapsed" else 0
        effects, z_internal = _sampled_effects(spec, names[first:], spec.blocks[first:], chols[first:])
        if parameterization == "collapsed":
            data = _collapsed_likelihood(cp, scale, effects, beta, chols[0], sigma)
        elif parameterization == "explicit":
            data = None
            _explicit_likelihood(model, spec, effects, beta, sigma, named_mu, scale, rho)
        else:
            raise ValueError(parameterization)
    return BuiltModel(model=model, parameterization=parameterization, names=names, collapsed=data,
                      internal=internal + cov_internal + z_internal)


def _coords(spec: ModelSpec, names: list[str]) -> dict[str, list]:
    """The named dims: ``coef``, and per block its levels, its effects and (correlated) its pairs."""
    coords = {"coef": list(spec.fixed_names)}
    for name, block in zip(names, spec.blocks):
        coords[naming.level_dim(name)] = list(block.levels)
        coords[naming.effect_dim(name)] = list(block.columns)
        if block.correlated and block.q > 1:
            coords[naming.pair_dim(name)] = naming.pair_labels(list(block.columns))
    return coords


def _fixed_effects(spec: ModelSpec, priors: PriorSet):
    """β = C β_c (:func:`centring_matrix`), with β_c sampled; (β, the internal variables' names)."""
    import pymc as pm
    import pytensor.tensor as pt

    internal = ["beta_c"]
    mus = np.array([pr.params.get("mu", 0.0) for pr in priors.beta])
    if all(pr.family == "Normal" for pr in priors.beta):
        # all Normal: one vector variable; other families may differ by coefficient, so one variable each
        sig = np.array([pr.params["sigma"] for pr in priors.beta])
        beta_c = pm.Normal("beta_c", mu=mus, sigma=sig, dims="coef")
    else:
        beta_c = pt.stack([pr.variable(f"beta_c[{n}]") for pr, n in zip(priors.beta, spec.fixed_names)])
        internal += [f"beta_c[{n}]" for n in spec.fixed_names]
    beta = pm.Deterministic("beta", pt.dot(centring_matrix(spec, priors), beta_c), dims="coef")
    return beta, internal


def _block_covs(spec: ModelSpec, names: list[str], priors: PriorSet):
    """Every block's Cholesky factor (:func:`_block_cov`); (the factors, the internal variables' names)."""
    chols, internal = [], []
    for name, block, bp in zip(names, spec.blocks, priors.blocks):
        chols.append(_block_cov(name, block, bp))
        if block.correlated and block.q > 1:
            internal += [f"{name}_chol_cov", f"{name}_chol_cov_corr", f"{name}_chol_cov_stds"]
    return chols, internal


def _sampled_effects(spec: ModelSpec, names, blocks, chols):
    """The sampled blocks' effects b (levels × effects); (the effects, the internal variables' names)."""
    import pymc as pm
    import pytensor.tensor as pt

    effects, internal = [], []
    for name, block, L in zip(names, blocks, chols):
        dims = (naming.level_dim(name), naming.effect_dim(name))
        if centred_block(spec, block):
            # data-rich levels: the centred form b ~ N(0, sd²) has the better geometry
            # (the non-centred one turns into a ridge between z and the sd)
            effects.append(pm.Normal(name, 0.0, L[0, 0], dims=dims))
            continue
        z = pm.Normal(f"{name}_z", 0.0, 1.0, dims=dims)
        internal.append(f"{name}_z")
        effects.append(pm.Deterministic(name, pt.dot(z, L.T), dims=dims))
    return effects, internal


def _collapsed_likelihood(cp: CrossProducts, scale, effects, beta, chol, sigma) -> CollapsedData:
    """The first block integrated out: its marginal likelihood as a Potential; returns the data it reads."""
    import pymc as pm
    import pytensor.tensor as pt

    data = CollapsedData.from_crossprods(cp, scale)
    # the response enters only through these three: shared, so that a compiled
    # model can be refitted to new y of the same design (simulation-based calibration)
    shared = data.with_response(pm.Data("Z1ty", data.g), pm.Data("Xty", data.Xty), pm.Data("yty", data.yty))
    gamma = pt.concatenate([e.ravel() for e in effects] + [beta]) if effects else beta
    pm.Potential("marginal_loglik", collapsed_loglik(shared, gamma, chol, sigma))
    return data


def _explicit_likelihood(model, spec: ModelSpec, effects, beta, sigma, named_mu: bool, scale, rho=None) -> None:
    """The Normal likelihood over the rows, μ = Xβ + Σ Z b (``mu`` named only when asked); with a
    residual structure that of the whitened residuals, a Potential ``residual_loglik``."""
    import pymc as pm
    import pytensor.tensor as pt

    mu = pt.dot(spec.X, beta)
    for block, b in zip(spec.blocks, effects):
        mu = mu + pt.sum(block.Z * b[block.codes], axis=1)
    model.add_coord("obs", np.arange(spec.n_obs))
    if named_mu:
        mu = pm.Deterministic("mu", mu, dims="obs")
    if spec.residual is not None:
        # shared, so that a compiled model can be refitted to a new response (simulation-based calibration)
        y = pm.Data("y_data", spec.y if scale is None else scale.standardise(spec.y), dims="obs")
        pm.Potential("residual_loglik", structured_loglik(spec.residual, y - mu, sigma, rho))
        return
    pm.Normal("y", mu=mu, sigma=sigma, observed=spec.y if scale is None else scale.standardise(spec.y),
              dims="obs")


def structured_loglik(residual, e, sigma, rho: dict):
    """log N(e | 0, σ²Λ_R(ρ)) as a PyTensor expression, O(N): the whitened residuals' Normal density
    plus the Jacobian −log|W| = −½ log|Λ_R| (:mod:`bayeslmm.residual`'s whitening W = C^{-1/2} S^{-1}).

    ``e`` are the residuals y − Xβ − Zb on the rows, ``rho`` the residual parameters'
    variables by their posterior names (:func:`.naming.residual_var`), on nlme's scale.
    """
    import pytensor.tensor as pt

    log_s = _log_relative_sd(residual, rho)
    if log_s is not None:
        e = e * pt.exp(-log_s)
    log_det = 0.0 if log_s is None else 2.0 * pt.sum(log_s)
    corr = residual.correlation
    if corr is not None:
        r = rho[naming.residual_var(corr.names[0])]
        if isinstance(corr.structure, CorCompSymm):
            e, ld = _whiten_compsymm(e, r, corr)
        else:
            e, ld = _whiten_markov(e, r, corr)
        log_det = log_det + ld
    n = residual.frame.shape[0]
    return (-0.5 * n * np.log(2 * np.pi) - n * pt.log(sigma) - 0.5 * pt.sum(pt.sqr(e)) / pt.sqr(sigma)
            - 0.5 * log_det)


def _log_relative_sd(residual, rho: dict):
    """log s_i(ρ) per row (the variance function and the precision weights), None where all are 0."""
    import pytensor.tensor as pt

    out = None
    var = residual.variance
    if var is not None:
        st = var.structure
        if isinstance(st, VarIdent):
            ratios = pt.stack([pt.constant(1.0)] + [rho[naming.residual_var(n)] for n in var.names])
            out = pt.log(ratios)[var.values.astype(np.int64)]
        elif isinstance(st, VarPower):
            out = rho[naming.residual_var("power")] * np.log(np.abs(var.values))
        elif isinstance(st, VarExp):
            out = rho[naming.residual_var("expon")] * var.values
        else:  # VarFixed: known
            out = pt.as_tensor_variable(0.5 * np.log(var.values))
    if residual.weights is not None:
        w = pt.as_tensor_variable(-0.5 * np.log(residual.weights))
        out = w if out is None else out + w
    return out


def _whiten_markov(e, phi, corr):
    """Prais–Winsten on every row with a predecessor: (e_t − φ^Δ e_prev)/√(1 − φ^{2Δ}); and Σ log(1 − φ^{2Δ})."""
    import pytensor.tensor as pt

    has = np.flatnonzero(corr.prev >= 0)
    lag = corr.lag[has]
    if np.all(lag == 1):
        c = phi * pt.ones(len(has))
    else:
        # φ^Δ for AR(1)'s integer gaps (φ may be negative) and CAR(1)'s real ones (φ > 0)
        odd = (np.round(lag) % 2 == 1) & isinstance(corr.structure, CorAR1)
        c = pt.switch(odd, pt.sign(phi), 1.0) * pt.power(pt.abs(phi), lag)
    one_minus = 1.0 - pt.sqr(c)
    moved = (e[has] - c * e[corr.prev[has]]) / pt.sqrt(one_minus)
    return pt.set_subtensor(e[has], moved), pt.sum(pt.log(one_minus))


def _whiten_compsymm(e, rho, corr):
    """The symmetric C^{-1/2} by group sums: a·e + (c_g − a)·mean_g(e), a = (1−ρ)^{-½}, c_g = (1+(m_g−1)ρ)^{-½};
    and Σ_g [(m_g−1) log(1−ρ) + log(1+(m_g−1)ρ)]."""
    import pytensor.tensor as pt

    m = corr.sizes
    means = pt.inc_subtensor(pt.zeros(len(m))[corr.group], e) / m
    a = 1.0 / pt.sqrt(1.0 - rho)
    c = 1.0 / pt.sqrt(1.0 + (m - 1.0) * rho)
    out = a * e + ((c - a) * means)[corr.group]
    return out, pt.sum((m - 1.0) * pt.log1p(-rho) + pt.log1p((m - 1.0) * rho))


#: variable names the models use besides the blocks' own
RESERVED_NAMES = ("beta", "beta_c", "sigma", "mu", "y", "marginal_loglik", "residual_loglik", "y_data", "Z1ty", "Xty",
                  "yty")


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
