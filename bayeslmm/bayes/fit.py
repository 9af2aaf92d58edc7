"""Sample the posterior with NUTS (PyMC's or nutpie's) and assemble a :class:`BayesFit`."""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import xarray as xr

from ..crossprod import CrossProducts
from ..errors import BayesLMMError
from ..spec import ModelSpec
from . import diagnostics
from .collapsed import CollapsedData, draw_first_block
from .kernel import KernelData, unsupported_reason
from .model import PARAMETERIZATIONS, BuiltModel, block_names, build_pymc_model, centring_matrix
from .priors import resolve_priors
from .results import BayesFit

SAMPLERS = ("auto", "pymc", "nutpie")
#: per-gradient work (array elements touched) above which "auto" picks nutpie
AUTO_NUTPIE_WORK = 20_000
#: pointwise log-likelihood values stored by default at most (rows × draws)
MAX_LOGLIK_VALUES = 50_000_000


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BayesLMMError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_sampler_args(draws, tune, chains, cores, sampler, parameterization, target_accept, max_treedepth,
                       random_seed):
    """Validate the sampling arguments with messages that name the argument."""
    draws = _positive_int("draws", draws)
    tune = _positive_int("tune", tune, 0)
    chains = _positive_int("chains", chains)
    if cores is not None:
        cores = _positive_int("cores", cores)
    if sampler not in SAMPLERS:
        raise BayesLMMError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if parameterization not in PARAMETERIZATIONS:
        raise BayesLMMError(f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}")
    if not isinstance(target_accept, (int, float)) or not 0 < target_accept < 1:
        raise BayesLMMError(f"target_accept must be a number strictly between 0 and 1, got {target_accept!r}")
    max_treedepth = _positive_int("max_treedepth", max_treedepth)
    if random_seed is not None and (isinstance(random_seed, bool) or not isinstance(random_seed, (int, np.integer))
                                    or random_seed < 0):
        raise BayesLMMError(f"random_seed must be a non-negative integer or None, got {random_seed!r}")
    return draws, tune, chains, cores, max_treedepth


def fit_bayes(
    spec: ModelSpec,
    crossprods: CrossProducts,
    *,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    cores: int | None = None,
    random_seed: int | None = None,
    sampler: str = "auto",
    parameterization: str = "collapsed",
    priors: dict | None = None,
    target_accept: float = 0.8,
    max_treedepth: int = 10,
    progressbar: bool = True,
    log_likelihood: bool | None = None,
    warn: bool = True,
    backend: str = "auto",
    effects: str = "auto",
    data_name: str | None = None,
) -> BayesFit:
    """Sample the posterior of ``spec``; see :meth:`bayeslmm.Model.fit` for the arguments."""
    draws, tune, chains, cores, max_treedepth = check_sampler_args(
        draws, tune, chains, cores, sampler, parameterization, target_accept, max_treedepth, random_seed)
    prior_set = resolve_priors(spec, priors)
    use_kernel = _use_kernel(spec, prior_set, parameterization, sampler, backend)
    if sampler == "auto":
        sampler = "nutpie" if use_kernel else choose_sampler(spec, parameterization)
    seed = int(np.random.SeedSequence().entropy % (2**31)) if random_seed is None else int(random_seed)
    t0 = time.perf_counter()
    if use_kernel:
        built, kd = _kernel_model(spec, crossprods, prior_set)
        t1 = time.perf_counter()
        dt = _sample_kernel(kd, draws, tune, chains, cores, seed, target_accept, max_treedepth, progressbar)
        t2 = time.perf_counter()
        post = _kernel_posterior(spec, kd, built.names, dt["posterior"].to_dataset())
    else:
        built = build_pymc_model(spec, crossprods, prior_set, parameterization)
        t1 = time.perf_counter()
        dt = _sample(built.model, draws, tune, chains, cores, seed, sampler, target_accept, max_treedepth,
                     progressbar)
        t2 = time.perf_counter()
        post = dt["posterior"].to_dataset()
        keep = [v for v in post.data_vars if v not in built.internal]
        post = post[keep]
    mode = "draws"
    if parameterization == "collapsed":
        first = spec.blocks[0]
        mode = _effects_mode(effects, first.n_effects * chains * draws, log_likelihood)
        if mode == "draws":
            post = _add_first_block(spec, built, post, seed)
        else:
            dt[EFFECTS_GROUP] = xr.DataTree(_first_block_summary(built, post, seed, first))
            dt[CONDITIONAL_GROUP] = xr.DataTree(_conditional_arrays(built.collapsed))
            if warn and effects == "auto":
                warnings.warn(
                    f"the draws of {first.group}'s {first.n_effects:,} random effects were not stored "
                    f"({first.n_effects * chains * draws:.2g} values, more than {MAX_EFFECT_VALUES:.0e}): "
                    f"idata['{EFFECTS_GROUP}'] holds each effect's posterior mean, sd and quantiles, and "
                    "bayeslmm.bayes.fit.effect_draws(fit, levels) redraws chosen levels exactly; pass "
                    "effects='draws' to store them all", UserWarning, stacklevel=3)
    dt["posterior"] = xr.DataTree(post)
    if spec.rows_in_memory:
        _add_data_groups(dt, spec)
    n_values = spec.n_obs * chains * draws
    if not spec.rows_in_memory:  # built out of memory (bayeslmm.outofcore): no rows to evaluate it on
        if warn:
            warnings.warn("the pointwise log-likelihood and the observed_data/constant_data groups were not "
                          "stored: the model was built out of memory (cross-products only)", UserWarning,
                          stacklevel=3)
    elif mode == "summary":
        pass  # the log-likelihood is conditional on the effects, whose draws were not kept
    elif log_likelihood or (log_likelihood is None and n_values <= MAX_LOGLIK_VALUES):
        dt["log_likelihood"] = xr.DataTree(pointwise_loglik(spec, post, built.names))
    elif log_likelihood is None and warn:
        warnings.warn(f"the pointwise log-likelihood was not stored: {spec.n_obs} rows × {chains * draws} draws "
                      f"= {n_values:.2g} values (more than {MAX_LOGLIK_VALUES:.0e}); pass log_likelihood=True "
                      "to store it for LOO", UserWarning, stacklevel=3)
    t3 = time.perf_counter()
    fit = BayesFit(spec=spec, idata=dt, priors=prior_set, names=built.names, parameterization=parameterization,
                   sampler=sampler, seed=seed, data_name=data_name,
                   timings={"build": t1 - t0, "sample": t2 - t1, "postprocess": t3 - t2,
                            "backend": "kernel" if use_kernel else "pytensor"})
    diag = fit.diagnostics()
    if warn:
        diagnostics.warn(diag, stacklevel=4)
    return fit


BACKENDS = ("auto", "kernel", "pytensor")
#: levels × columns from which the kernel samples chains on several threads
KERNEL_THREADS_WORK = 2_000


def _use_kernel(spec, prior_set, parameterization, sampler, backend) -> bool:
    """Whether to sample with the compiled kernel (:mod:`.kernel`) instead of a PyMC graph."""
    if backend not in BACKENDS:
        raise BayesLMMError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "pytensor" or sampler == "pymc":
        if backend == "kernel":
            raise BayesLMMError("backend='kernel' runs on nutpie's NUTS: use sampler='nutpie' or 'auto'")
        return False
    reason = unsupported_reason(spec, prior_set, parameterization)
    if reason is not None and backend == "kernel":
        raise BayesLMMError(f"backend='kernel' cannot fit this model: {reason}; use backend='auto' or 'pytensor'")
    return reason is None


def _kernel_model(spec, crossprods, prior_set):
    data = CollapsedData.from_crossprods(crossprods)
    kd = KernelData.build(spec, data, prior_set, centring_matrix(spec, prior_set))
    built = BuiltModel(model=None, parameterization="collapsed", names=block_names(spec), collapsed=data,
                       internal=[])
    return built, kd


def _sample_kernel(kd, draws, tune, chains, cores, seed, target_accept, max_treedepth, progressbar):
    """nutpie's NUTS on the compiled collapsed log-posterior; the draws stay unconstrained (``x``)."""
    import nutpie
    from nutpie.compiled_pyfunc import from_pyfunc

    ndim = kd.ndim

    def make_expand(seed1, seed2, chain):
        def expand(x, **_shared):
            return {"x": np.array(x, dtype=np.float64)}
        return expand

    def initial_point(chain_seed):
        return kd.initial_point(np.random.default_rng([seed, int(chain_seed)]))

    compiled = from_pyfunc(ndim, kd.logp_function, make_expand, [np.dtype("float64")], [(ndim,)], ["x"],
                           make_initial_point_fn=initial_point, coords={"x_dim": np.arange(ndim)},
                           dims={"x": ("x_dim",)})
    if cores is None:
        # the kernel releases the GIL, but each call still enters Python: threads pay off
        # only when a gradient is long enough (many levels) to outweigh the hand-over
        big = kd.G.shape[0] * kd.q >= KERNEL_THREADS_WORK
        cores = max(1, min(chains, os.cpu_count() or 1)) if big else 1
    return nutpie.sample(compiled, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed,
                         progress_bar=progressbar, target_accept=target_accept, maxdepth=max_treedepth,
                         save_warmup=False)


def _kernel_posterior(spec, kd, names, raw: xr.Dataset) -> xr.Dataset:
    """The kernel's unconstrained draws as the posterior variables the PyMC model reports."""
    vals = kd.constrain(raw["x"].to_numpy())
    name, block = names[0], spec.blocks[0]
    e = f"{name}_effect"
    data = {"beta": (("chain", "draw", "coef"), vals["beta"]), "sigma": (("chain", "draw"), vals["sigma"]),
            f"{name}_sd": (("chain", "draw", e), vals["sd"])}
    coords = {"chain": raw["chain"].to_numpy(), "draw": raw["draw"].to_numpy(), "coef": list(spec.fixed_names),
              e: list(block.columns)}
    if "corr" in vals:
        data[f"{name}_corr"] = (("chain", "draw", e, f"{e}_"), vals["corr"])
        coords[f"{e}_"] = list(block.columns)
    return xr.Dataset(data, coords=coords)


def choose_sampler(spec: ModelSpec, parameterization: str) -> str:
    """PyMC's NUTS for small gradients (it starts in ~2 s), nutpie's when a gradient is big.

    nutpie's numba compilation costs ~10 s but each gradient then runs in compiled
    code, on one thread per chain; PyMC's NUTS pays Python overhead on every step.
    """
    first = spec.blocks[0]
    if parameterization == "collapsed":
        r = sum(b.n_effects for b in spec.blocks[1:]) + spec.n_fixed
        work = first.n_levels * first.q * (first.q + r) + r * r
    else:
        work = spec.n_obs * (spec.n_fixed + sum(b.q for b in spec.blocks))
    return "nutpie" if work > AUTO_NUTPIE_WORK else "pymc"


def _sample(model, draws, tune, chains, cores, seed, sampler, target_accept, max_treedepth, progressbar):
    with warnings.catch_warnings():
        # pip's PyTensor finds no BLAS it can link (numpy's is symbol-prefixed); the
        # collapsed graph has no large products, and the fallback calls numpy's BLAS
        warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS")
        return _run_sampler(model, draws, tune, chains, cores, seed, sampler, target_accept, max_treedepth,
                            progressbar)


def _run_sampler(model, draws, tune, chains, cores, seed, sampler, target_accept, max_treedepth, progressbar):
    import pymc as pm

    if sampler == "nutpie":
        import nutpie

        compiled = nutpie.compile_pymc_model(model)
        if cores is None:  # one thread per chain, but no more threads than processors
            cores = max(1, min(chains, os.cpu_count() or 1))
        return nutpie.sample(compiled, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed,
                             progress_bar=progressbar, target_accept=target_accept, maxdepth=max_treedepth,
                             save_warmup=False)
    # PyMC's own NUTS; one process by default: for these models starting worker
    # processes costs more than the sampling they would share
    logger = logging.getLogger("pymc")
    level = logger.level
    if not progressbar:
        logger.setLevel(logging.ERROR)
    try:
        with model:
            step = pm.NUTS(target_accept=target_accept, max_treedepth=max_treedepth)
            return pm.sample(draws=draws, tune=tune, chains=chains, cores=cores if cores is not None else 1,
                             random_seed=seed, step=step, progressbar=progressbar, nuts_sampler="pymc",
                             compute_convergence_checks=False)
    finally:
        logger.setLevel(level)


EFFECTS = ("auto", "draws", "summary")
#: draws of the integrated-out effects stored by default at most (levels × columns × draws): 800 MB
MAX_EFFECT_VALUES = 100_000_000
#: levels drawn together; each chunk has its own random stream, so any level can be redrawn alone
LEVEL_CHUNK = 512
EFFECTS_GROUP = "effects_summary"
CONDITIONAL_GROUP = "effects_conditional"
SUMMARY_PROBS = (0.025, 0.05, 0.25, 0.5, 0.75, 0.95, 0.975)
SUMMARY_STATS = ("mean", "sd") + tuple(f"q{100 * p:g}" for p in SUMMARY_PROBS)


def _effects_mode(effects, n_values, log_likelihood) -> str:
    if effects not in EFFECTS:
        raise BayesLMMError(f"effects must be one of {list(EFFECTS)}, got {effects!r}")
    mode = effects
    if effects == "auto":
        mode = "draws" if n_values <= MAX_EFFECT_VALUES else "summary"
    if mode == "summary" and log_likelihood:
        raise BayesLMMError("log_likelihood=True needs the effects' draws (the pointwise likelihood is conditional "
                            "on them): pass effects='draws' as well")
    return mode


def _cov_factor(post: xr.Dataset, name: str, block) -> np.ndarray:
    """Per-draw absolute Cholesky factor L (chain, draw, q, q) from the sd and correlation draws."""
    sd = post[f"{name}_sd"].to_numpy()
    if block.correlated and block.q > 1:
        corr = post[f"{name}_corr"].to_numpy()
        return sd[..., :, None] * np.linalg.cholesky(corr)
    return sd[..., :, None] * np.eye(block.q)


def _first_block_inputs(post: xr.Dataset, names: list[str], block):
    """γ = [other blocks' effects, β], L and σ of every draw, flattened to (S, ·)."""
    C, D = post.sizes["chain"], post.sizes["draw"]
    beta = post["beta"].to_numpy().reshape(C * D, -1)
    rest = [post[n].to_numpy().reshape(C * D, -1) for n in names[1:]]
    gamma = np.concatenate(rest + [beta], axis=1)
    L = _cov_factor(post, names[0], block).reshape(C * D, block.q, block.q)
    sigma = post["sigma"].to_numpy().reshape(C * D)
    return gamma, L, sigma


def _level_chunk(data: CollapsedData, k: int) -> CollapsedData:
    sl = slice(k * LEVEL_CHUNK, (k + 1) * LEVEL_CHUNK)
    return CollapsedData(G=data.G[sl], H=data.H[sl], g=data.g[sl], XtX=data.XtX, Xty=data.Xty, yty=data.yty,
                         n_obs=data.n_obs)


def _draw_chunks(data: CollapsedData, gamma, L, sigma, seed: int, chunks):
    """Yield (chunk index, draws (S, levels in chunk, q)); chunk k uses the stream (seed, 1, k)."""
    for k in chunks:
        rng = np.random.default_rng([seed, 1, k])
        yield k, draw_first_block(_level_chunk(data, k), gamma, L, sigma, rng)


def _add_first_block(spec, built, post, seed: int):
    """Draw the integrated-out effects exactly from their Gaussian conditional."""
    first, name = spec.blocks[0], built.names[0]
    C, D = post.sizes["chain"], post.sizes["draw"]
    gamma, L, sigma = _first_block_inputs(post, built.names, first)
    n_chunks = -(-first.n_levels // LEVEL_CHUNK)
    b = np.empty((C * D, first.n_levels, first.q))
    for k, d in _draw_chunks(built.collapsed, gamma, L, sigma, seed, range(n_chunks)):
        b[:, k * LEVEL_CHUNK : k * LEVEL_CHUNK + d.shape[1]] = d
    b = b.reshape(C, D, first.n_levels, first.q)
    post[name] = xr.DataArray(b, dims=("chain", "draw", f"{name}_level", f"{name}_effect"),
                              coords={f"{name}_level": list(first.levels), f"{name}_effect": list(first.columns)})
    return post[[name] + [v for v in post.data_vars if v != name]]


def _summarise_effects(d: np.ndarray) -> np.ndarray:
    """(S, levels, q) draws → (levels, q, stat) with SUMMARY_STATS."""
    from .kernel import summarise_columns

    S, c, q = d.shape
    out = np.empty((c * q, len(SUMMARY_STATS)))
    summarise_columns(np.ascontiguousarray(d).reshape(S, c * q), np.asarray(SUMMARY_PROBS), out)
    return out.reshape(c, q, len(SUMMARY_STATS))


def _first_block_summary(built, post, seed: int, first) -> xr.Dataset:
    """Per-level posterior summaries of the integrated-out effects, drawn chunk by chunk, never all at once."""
    name = built.names[0]
    gamma, L, sigma = _first_block_inputs(post, built.names, first)
    n_chunks = -(-first.n_levels // LEVEL_CHUNK)
    out = np.empty((first.n_levels, first.q, len(SUMMARY_STATS)))
    for k, d in _draw_chunks(built.collapsed, gamma, L, sigma, seed, range(n_chunks)):
        out[k * LEVEL_CHUNK : k * LEVEL_CHUNK + d.shape[1]] = _summarise_effects(d)
    return xr.Dataset({name: ((f"{name}_level", f"{name}_effect", "stat"), out)},
                      coords={f"{name}_level": list(first.levels), f"{name}_effect": list(first.columns),
                              "stat": list(SUMMARY_STATS)},
                      attrs={"seed": seed, "level_chunk": LEVEL_CHUNK, "n_draws": int(gamma.shape[0])})


def _conditional_arrays(data: CollapsedData) -> xr.Dataset:
    """What redrawing the first block needs (G_j, H_j, g_j per level), so a fit can redraw any level."""
    return xr.Dataset({"G": (("level", "i", "k"), data.G), "H": (("level", "i", "r"), data.H),
                       "g": (("level", "i"), data.g)})


def effect_draws(fit, levels=None) -> xr.DataArray:
    """Draws of the first block's effects for ``levels`` (labels; all when None).

    They are exactly the draws a fit with ``effects="draws"`` and the same seed would
    have stored, and the ones its ``effects_summary`` was computed from.
    """
    spec, post = fit.spec, fit.posterior
    first, name = spec.blocks[0], fit.names[0]
    if name in post:
        da = post[name]
        return da if levels is None else da.sel({f"{name}_level": list(map(str, levels))})
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
    gamma, L, sigma = _first_block_inputs(post, fit.names, first)
    chunks = sorted(set((idx // LEVEL_CHUNK).tolist()))
    got = {k: d for k, d in _draw_chunks(data, gamma, L, sigma, fit.seed, chunks)}
    b = np.stack([got[i // LEVEL_CHUNK][:, i % LEVEL_CHUNK] for i in idx], axis=1)
    C, D = post.sizes["chain"], post.sizes["draw"]
    return xr.DataArray(b.reshape(C, D, len(idx), first.q),
                        dims=("chain", "draw", f"{name}_level", f"{name}_effect"),
                        coords={"chain": post["chain"].to_numpy(), "draw": post["draw"].to_numpy(),
                                f"{name}_level": [labels[i] for i in idx], f"{name}_effect": list(first.columns)},
                        name=name)


def linear_predictor(spec: ModelSpec, post: xr.Dataset, names: list[str]) -> np.ndarray:
    """Conditional means Xβ + Zb per draw: (chain, draw, obs)."""
    beta = post["beta"].to_numpy()
    mu = np.einsum("cdp,np->cdn", beta, spec.X)
    for block, name in zip(spec.blocks, names):
        if name not in post:
            raise BayesLMMError(f"the draws of {name!r}'s effects were not stored (effects='summary'): per-draw "
                                "quantities over every row need them; refit with effects='draws'")
        b = post[name].to_numpy()
        mu += np.einsum("cdnq,nq->cdn", b[:, :, block.codes, :], block.Z)
    return mu


def pointwise_loglik(spec: ModelSpec, post: xr.Dataset, names: list[str]) -> xr.Dataset:
    """log N(y_i | X_iβ + Z_ib, σ) per observation and draw (conditional on the effects, as brms)."""
    mu = linear_predictor(spec, post, names)
    sigma = post["sigma"].to_numpy()[..., None]
    ll = -0.5 * np.log(2 * np.pi) - np.log(sigma) - 0.5 * ((spec.y - mu) / sigma) ** 2
    return xr.Dataset({"y": (("chain", "draw", "obs"), ll)}, coords={"obs": np.arange(spec.n_obs)})


def _add_data_groups(dt, spec: ModelSpec) -> None:
    obs = np.arange(spec.n_obs)
    dt["observed_data"] = xr.DataTree(xr.Dataset({"y": ("obs", spec.y)}, coords={"obs": obs}))
    const = {"X": (("obs", "coef"), spec.X)}
    for i, block in enumerate(spec.blocks):
        const[f"codes_{i}"] = ("obs", block.codes)
    dt["constant_data"] = xr.DataTree(xr.Dataset(const, coords={"obs": obs, "coef": list(spec.fixed_names)}))
