"""What is computed from a fit's draws after sampling, by the engine and by the results alike.

The first block's integrated-out effects are drawn exactly from their Gaussian
conditional, level chunk by level chunk, each chunk from its own random stream (so any
level can be redrawn alone, as :func:`effect_draws` does); the conditional means
Xβ + Zb and the pointwise log-likelihood are computed from the draws.  Both
:mod:`.fit` (which assembles a fit) and :mod:`.results` (which reads one) use these,
so they live below both.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import BayesLMMError
from ..spec import ModelSpec
from . import naming
from .collapsed import CollapsedData, draw_first_block
from .compiled import cached_njit

#: pointwise log-likelihood values stored by default at most (rows × draws)
MAX_LOGLIK_VALUES = 50_000_000
#: levels drawn together; each chunk has its own random stream, so any level can be redrawn alone
LEVEL_CHUNK = 512
#: the DataTree group of the integrated-out effects' per-level summaries (effects="summary")
EFFECTS_GROUP = "effects_summary"
#: the DataTree group of what redrawing the first block's levels needs
CONDITIONAL_GROUP = "effects_conditional"
SUMMARY_PROBS = (0.025, 0.05, 0.25, 0.5, 0.75, 0.95, 0.975)
SUMMARY_STATS = ("mean", "sd") + tuple(f"q{100 * p:g}" for p in SUMMARY_PROBS)


def first_block_inputs(post: xr.Dataset, names: list[str], block):
    """γ = [other blocks' effects, β], L and σ of every draw, flattened to (S, ·)."""
    C, D = post.sizes["chain"], post.sizes["draw"]
    beta = post["beta"].to_numpy().reshape(C * D, -1)
    rest = [post[n].to_numpy().reshape(C * D, -1) for n in names[1:]]
    gamma = np.concatenate(rest + [beta], axis=1)
    L = naming.cholesky_factors(post, names[0], block).reshape(C * D, block.q, block.q)
    sigma = post["sigma"].to_numpy().reshape(C * D)
    return gamma, L, sigma


def _level_chunk(data: CollapsedData, k: int) -> CollapsedData:
    """Chunk ``k``'s levels of ``data`` (the cross-products of β are not needed to draw effects)."""
    sl = slice(k * LEVEL_CHUNK, (k + 1) * LEVEL_CHUNK)
    return CollapsedData(G=data.G[sl], H=data.H[sl], g=data.g[sl], XtX=data.XtX, Xty=data.Xty, yty=data.yty,
                         n_obs=data.n_obs)


def draw_chunks(data: CollapsedData, gamma, L, sigma, seed: int, chunks):
    """Yield (chunk index, draws (S, levels in chunk, q)); chunk k uses the stream (seed, 1, k)."""
    for k in chunks:
        rng = np.random.default_rng([seed, 1, k])
        yield k, draw_first_block(_level_chunk(data, k), gamma, L, sigma, rng)


def effect_draws(fit, levels=None) -> xr.DataArray:
    """Draws of the first block's effects for ``levels`` (labels; all when None).

    They are exactly the draws a fit with ``effects="draws"`` and the same seed would
    have stored, and the ones its ``effects_summary`` was computed from.
    """
    spec, post = fit.spec, fit.posterior
    first, name = spec.blocks[0], fit.names[0]
    if name in post:
        da = post[name]
        return da if levels is None else da.sel({naming.level_dim(name): list(map(str, levels))})
    if CONDITIONAL_GROUP not in fit.idata.children:
        raise BayesLMMError(f"this fit has neither the draws of {name!r} nor what is needed to redraw them")
    cond = fit.idata[CONDITIONAL_GROUP].to_dataset()
    data = CollapsedData(G=cond["G"].to_numpy(), H=cond["H"].to_numpy(), g=cond["g"].to_numpy(),
                         XtX=np.zeros((0, 0)), Xty=np.zeros(0), yty=0.0, n_obs=spec.n_obs)
    labels = list(first.levels)
    if levels is None:
        idx = np.arange(first.n_levels)
    else:
        missing = [lv for lv in levels if str(lv) not in labels]
        if missing:
            raise BayesLMMError(f"levels {missing[:5]} are not levels of {first.group!r}")
        pos = {lv: i for i, lv in enumerate(labels)}
        idx = np.array([pos[str(lv)] for lv in levels], dtype=int)
    gamma, L, sigma = first_block_inputs(post, fit.names, first)
    chunks = sorted(set((idx // LEVEL_CHUNK).tolist()))
    got = {k: d for k, d in draw_chunks(data, gamma, L, sigma, fit.seed, chunks)}
    b = np.stack([got[i // LEVEL_CHUNK][:, i % LEVEL_CHUNK] for i in idx], axis=1)
    C, D = post.sizes["chain"], post.sizes["draw"]
    return xr.DataArray(b.reshape(C, D, len(idx), first.q),
                        dims=("chain", "draw", naming.level_dim(name), naming.effect_dim(name)),
                        coords={"chain": post["chain"].to_numpy(), "draw": post["draw"].to_numpy(),
                                naming.level_dim(name): [labels[i] for i in idx], naming.effect_dim(name): list(first.columns)},
                        name=name)


def linear_predictor(spec: ModelSpec, post: xr.Dataset, names: list[str]) -> np.ndarray:
    """Conditional means Xβ + Zb per draw: (chain, draw, obs)."""
    beta = post["beta"].to_numpy()
    C, D = beta.shape[:2]
    mu = np.ascontiguousarray(beta.reshape(C * D, -1) @ np.asarray(spec.X, dtype=float).T)
    for block, name in zip(spec.blocks, names):
        if name not in post:
            raise BayesLMMError(f"the draws of {name!r}'s effects were not stored (effects='summary'): per-draw "
                                "quantities over every row need them; refit with effects='draws'")
        b = np.ascontiguousarray(post[name].to_numpy(), dtype=float)
        _add_effects(mu, b.reshape(C * D, block.n_levels, block.q), np.asarray(block.codes, dtype=np.int64),
                     np.ascontiguousarray(block.Z, dtype=float))
    return mu.reshape(C, D, -1)


@cached_njit(nogil=True, error_model="numpy")
def _add_effects(mu, b, codes, Z):
    """mu[s, i] += Σ_a Z[i, a]·b[s, codes[i], a] for every draw s: a row's own level only (a gather
    in numpy would first copy b[:, codes] — draws × rows × q — into memory)."""
    q = Z.shape[1]
    for s in range(mu.shape[0]):
        bs, ms = b[s], mu[s]
        for i in range(mu.shape[1]):
            level = bs[codes[i]]
            acc = 0.0
            for a in range(q):
                acc += Z[i, a] * level[a]
            ms[i] += acc


def residual_natural(spec: ModelSpec, post: xr.Dataset) -> dict[str, np.ndarray]:
    """The residual structure's parameter draws on nlme's scale, flattened over (chain, draw), by the
    structure's names (``Phi``, ``power``, a VarIdent level); empty for R = σ²I."""
    res = spec.residual
    if res is None:
        return {}
    return {n: post[naming.residual_var(n)].to_numpy().reshape(-1) for n in res.names}


def independent_rows(spec: ModelSpec) -> bool:
    """Whether the rows are independent given the effects: no correlation structure (a variance
    function or weights only rescale each row's noise)."""
    return spec.residual is None or spec.residual.correlation is None


#: why a correlation structure has no pointwise log-likelihood (and so no PSIS-LOO)
NO_LOGLIK_UNDER_CORRELATION = (
    "under a correlation structure ({structure}) the rows of a group are not independent given the effects, so "
    "there is no pointwise (row by row) log-likelihood and no leave-one-out over rows; leave-one-group-out "
    "(the joint density of each group's rows) is what would apply, and is not in this release. LOO works for "
    "variance functions and weights (variance=, weights=) without correlation=")


def no_pointwise_loglik(spec: ModelSpec) -> str | None:
    """Why ``spec`` has no pointwise log-likelihood (:data:`NO_LOGLIK_UNDER_CORRELATION`, its structure
    named), or None where its rows are independent given the effects."""
    if independent_rows(spec):
        return None
    return NO_LOGLIK_UNDER_CORRELATION.format(structure=type(spec.residual.correlation.structure).__name__)


def pointwise_loglik(spec: ModelSpec, post: xr.Dataset, names: list[str]) -> xr.Dataset:
    """log N(y_i | X_iβ + Z_ib, σ s_i) per observation and draw (conditional on the effects, as brms).

    s_i is a variance function's (and the weights') relative sd of row i in each draw, 1 for
    R = σ²I; a correlation structure is refused (:data:`NO_LOGLIK_UNDER_CORRELATION`).
    """
    from ..residual_draws import relative_sd_draws

    why = no_pointwise_loglik(spec)
    if why is not None:
        raise BayesLMMError(why)
    mu = linear_predictor(spec, post, names)
    sd = post["sigma"].to_numpy()[..., None]
    if spec.residual is not None:
        s = relative_sd_draws(spec.residual, residual_natural(spec, post))
        if s is not None:  # (1, rows) when no parameter varies it
            sd = sd * (s[0] if len(s) == 1 else s.reshape(mu.shape))
    ll = -0.5 * np.log(2 * np.pi) - np.log(sd) - 0.5 * ((spec.y - mu) / sd) ** 2
    return xr.Dataset({"y": (("chain", "draw", "obs"), ll)}, coords={"obs": np.arange(spec.n_obs)})
