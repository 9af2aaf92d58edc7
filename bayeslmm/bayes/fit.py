"""Sample the posterior with NUTS (PyMC's or nutpie's) and assemble a :class:`BayesFit`.

:func:`fit_bayes` is what ``Model.fit(method="nuts")`` calls.  The compiled kernel's
route is also open in three public steps, which the simulation-based calibration
(:mod:`.sbc`) and the tests use to sample many data sets with one compilation:
:func:`kernel_model` (build: the kernel's arrays from the cross-products),
:func:`sample_kernel` (sample: nutpie's NUTS, unconstrained draws ``x``) and
:func:`kernel_posterior` (posterior: those draws as the variables of :mod:`.naming`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import signal
import sys
import threading
import time
import warnings

import numpy as np
import xarray as xr

from ..crossprod import CrossProducts
from ..deprecation import warn_replaced
from ..errors import BayesLMMError, IncompleteTraceError, InsufficientMemoryError
from ..spec import ModelSpec
from . import diagnostics, naming
from .collapsed import CollapsedData, ResponseScale
from .compiled import private_cache_dir
from . import blocked, partial, structured
from .kernel import KernelData, unsupported_reason
from .model import PARAMETERIZATIONS, BuiltModel, build_pymc_model, centring_matrix
from .naming import block_names
from .posterior import (  # noqa: F401  (effect_draws, linear_predictor: importable from here as before)
    CONDITIONAL_GROUP,
    EFFECTS_GROUP,
    LEVEL_CHUNK,
    MAX_LOGLIK_VALUES,
    SUMMARY_PROBS,
    SUMMARY_STATS,
    draw_chunks,
    effect_draws,
    first_block_inputs,
    linear_predictor,
    pointwise_loglik,
)
from .priors import resolve_priors
from .progress import pymc_progress_options
from .results import BayesFit

SAMPLERS = ("auto", "pymc", "nutpie")
#: what ``fit(method="nuts", route=...)`` takes: the fastest exact route that applies ("auto"), whichever
#: compiled kernel applies ("kernel"), one compiled kernel by name, or the PyMC graph with the largest
#: factor integrated out ("graph") or every effect sampled ("graph-explicit"); docs/bayes.md, "Routes"
ROUTES = ("auto", "kernel", "one-factor", "blocked", "partial", "structured", "graph", "graph-explicit")
#: the compiled kernels: nutpie's NUTS runs them
KERNEL_ROUTES = ("one-factor", "blocked", "partial", "structured")
#: the older name of each route that ran (``fit.timings["backend"]``)
BACKEND_OF_ROUTE = {"one-factor": "kernel", "blocked": "blocked", "partial": "partial", "structured": "structured",
                    "graph": "pytensor", "graph-explicit": "pytensor"}
#: the routes the older ``backend=`` values spelt ("auto": no choice)
ROUTE_OF_BACKEND = {"auto": None, "kernel": "kernel", "blocked": "blocked", "partial": "partial",
                    "structured": "structured", "pytensor": "graph"}
#: per-gradient work (array elements touched) above which "auto" picks nutpie
AUTO_NUTPIE_WORK = 20_000


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BayesLMMError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_sampler_args(draws, tune, chains, cores, sampler, route, target_accept, max_treedepth, random_seed):
    """Validate the sampling arguments with messages that name the argument."""
    draws = _positive_int("draws", draws)
    tune = _positive_int("tune", tune, 0)
    chains = _positive_int("chains", chains)
    if cores is not None:
        cores = _positive_int("cores", cores)
    if sampler not in SAMPLERS:
        raise BayesLMMError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if route not in ROUTES:
        raise BayesLMMError(f"route must be one of {list(ROUTES)}, got {route!r}")
    if not isinstance(target_accept, (int, float)) or not 0 < target_accept < 1:
        raise BayesLMMError(f"target_accept must be a number strictly between 0 and 1, got {target_accept!r}")
    max_treedepth = _positive_int("max_treedepth", max_treedepth)
    if random_seed is not None and (isinstance(random_seed, bool) or not isinstance(random_seed, (int, np.integer))
                                    or random_seed < 0):
        raise BayesLMMError(f"random_seed must be a non-negative integer or None, got {random_seed!r}")
    return draws, tune, chains, cores, max_treedepth


def _explain_memory_errors(func):
    """Turn a MemoryError out of sampling or post-processing into one that says what to reduce."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except InsufficientMemoryError:
            raise
        except MemoryError as exc:
            detail = str(exc) or "no detail"
            raise InsufficientMemoryError(f"the fit ran out of memory ({detail}); nothing was returned. "
                                          f"{REDUCE_MEMORY}") from exc
    return wrapper


@_explain_memory_errors
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
    route: str = "auto",
    priors: dict | None = None,
    target_accept: float = 0.8,
    max_treedepth: int = 10,
    progressbar: bool = True,
    log_likelihood: bool | None = None,
    warn: bool = True,
    effects: str = "auto",
    data_name: str | None = None,
    backend: str | None = None,
    parameterization: str | None = None,
) -> BayesFit:
    """Sample the posterior of ``spec``; see :meth:`bayeslmm.Model.fit` for the arguments.

    ``backend`` and ``parameterization`` are the older spellings of ``route``
    (:func:`route_from_old_keywords`).
    """
    if backend is not None or parameterization is not None:
        route = route_from_old_keywords(route, backend, parameterization, stacklevel=3)
    draws, tune, chains, cores, max_treedepth = check_sampler_args(
        draws, tune, chains, cores, sampler, route, target_accept, max_treedepth, random_seed)
    prior_set = resolve_priors(spec, priors)
    route = resolve_route(spec, prior_set, route, sampler)
    parameterization = "explicit" if route == "graph-explicit" else "collapsed"
    if route == "graph-explicit":
        spec.require_rows("the explicit parameterisation (a likelihood over the rows)")
    effects, log_likelihood = _what_to_store(spec, route, effects, log_likelihood, chains, draws, warn)
    if sampler == "auto":
        sampler = "nutpie" if route in KERNEL_ROUTES else choose_sampler(spec, parameterization)
    seed = int(np.random.SeedSequence().entropy % (2**31)) if random_seed is None else int(random_seed)
    check_memory(spec, chains, draws, parameterization, effects, log_likelihood)
    t0 = time.perf_counter()
    built, dt, post, t1 = _sample_posterior(spec, crossprods, prior_set, route, draws, tune, chains, cores, seed,
                                            sampler, target_accept, max_treedepth, progressbar)
    t2 = time.perf_counter()
    _postprocess(spec, built, dt, post, route, seed, effects, log_likelihood, warn)
    t3 = time.perf_counter()
    fit = BayesFit(spec=spec, idata=dt, priors=prior_set, names=built.names, parameterization=parameterization,
                   sampler=sampler, seed=seed, data_name=data_name, route=route,
                   residual_structure=None if spec.residual is None else spec.residual.describe(),
                   timings={"build": t1 - t0, "sample": t2 - t1, "postprocess": t3 - t2,
                            "backend": BACKEND_OF_ROUTE[route]})
    diag = fit.diagnostics()
    if warn:
        diagnostics.warn(diag, stacklevel=4)
    return fit


def _what_to_store(spec, route: str, effects: str, log_likelihood, chains: int, draws: int, warn: bool):
    """(effects, log_likelihood) as the route and a residual structure allow: no pointwise log-likelihood
    under a correlation structure (asked for: an error), every effect's draws on the structured route."""
    from .posterior import no_pointwise_loglik

    why = no_pointwise_loglik(spec)
    if why is not None:
        if log_likelihood:
            raise BayesLMMError(f"log_likelihood=True: {why}; leave log_likelihood unset")
        log_likelihood = False
    if route == "structured":
        effects = _structured_effects(spec, effects, chains, draws, warn)
    return effects, log_likelihood


def _postprocess(spec, built, dt, post, route: str, seed: int, effects: str, log_likelihood, warn: bool) -> None:
    """The DataTree's groups: the posterior with the largest factor's effects (drawn here where the route
    integrated them out: every draw, or per-level summaries), the data, the pointwise log-likelihood."""
    chains, draws = post.sizes["chain"], post.sizes["draw"]
    mode = "draws"
    if route in ("one-factor", "blocked", "partial", "graph"):
        mode = _effects_mode(effects, spec.blocks[0].n_effects * chains * draws, log_likelihood)
        post = _store_effects(spec, built, dt, post, seed, mode, warn and effects == "auto")
    dt["posterior"] = xr.DataTree(post)
    if spec.rows_in_memory:
        _add_data_groups(dt, spec)
    _store_loglik(spec, built, dt, post, mode, spec.n_obs * chains * draws, log_likelihood, warn)


def route_from_old_keywords(route: str, backend: str | None, parameterization: str | None,
                            stacklevel: int = 2) -> str:
    """The ``route`` that the older keywords ``backend=`` and ``parameterization=`` spell, each with a
    ``FutureWarning`` naming the new spelling (``stacklevel`` counts from this function's caller).

    ``backend="kernel"``, ``"blocked"``, ``"partial"``, ``"structured"`` are the routes of those names,
    ``"pytensor"`` is ``"graph"``, ``"auto"`` chooses nothing; ``parameterization="explicit"`` is
    ``"graph-explicit"``, ``"collapsed"`` any other route.  Keywords that name different routes are
    an error.
    """
    if backend is None and parameterization is None:
        return route
    if backend is not None and backend not in ROUTE_OF_BACKEND:
        raise BayesLMMError(f"backend must be one of {list(ROUTE_OF_BACKEND)}, got {backend!r} (backend= is the "
                            f"older name of route=, one of {list(ROUTES)})")
    if parameterization is not None and parameterization not in PARAMETERIZATIONS:
        raise BayesLMMError(f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}")
    said = {}   # the keywords given, as written, with the route each names (None: any but graph-explicit)
    if backend is not None:
        said[f"backend={backend!r}"] = ROUTE_OF_BACKEND[backend]
    if parameterization is not None:
        said[f"parameterization={parameterization!r}"] = "graph-explicit" if parameterization == "explicit" else None
    if route != "auto":
        said[f"route={route!r}"] = route
    named = {r for r in said.values() if r is not None}
    explicit_refused = parameterization == "collapsed" and "graph-explicit" in named
    # the graph with every effect sampled is also "the PyMC graph" (backend='pytensor')
    if named == {"graph", "graph-explicit"} and route != "graph":
        named = {"graph-explicit"}
    if len(named) > 1 or explicit_refused:
        raise BayesLMMError(f"{' and '.join(said)} choose different routes: pass route= alone (one of "
                            f"{list(ROUTES)}; docs/vocabulary.md)")
    new = named.pop() if named else "auto"
    old = ", ".join(k for k in said if not k.startswith("route="))
    warn_replaced("fit()", old, f"route={new!r}", stacklevel + 1)
    return new


def _sample_posterior(spec, crossprods, prior_set, route, draws, tune, chains, cores, seed, sampler, target_accept,
                      max_treedepth, progressbar):
    """Build and sample by ``route`` (a compiled kernel or the PyMC graph): (built model, DataTree,
    posterior in y's units, the time the build ended)."""
    # sampled in standardised units of y (any magnitude looks alike to NUTS), reported in y's own
    scale = ResponseScale.of(spec, crossprods)
    if route in ("blocked", "partial", "structured"):
        built, kdata = compiled_model(spec, crossprods, prior_set, scale, route)
        t1 = time.perf_counter()
        with one_blas_thread():  # the chains' threads each call BLAS: more threads would only contend
            dt = sample_kernel(kdata, draws, tune, chains, cores, seed, target_accept, max_treedepth, progressbar)
            raw = dt["posterior"].to_dataset()
            if route == "partial":
                post = partial_posterior(spec, kdata, built.names, raw)
            else:
                draw = blocked_posterior if route == "blocked" else structured_posterior
                post = draw(spec, kdata, built.names, raw, seed)
    elif route == "one-factor":
        built, kd = kernel_model(spec, crossprods, prior_set, scale)
        t1 = time.perf_counter()
        dt = sample_kernel(kd, draws, tune, chains, cores, seed, target_accept, max_treedepth, progressbar)
        post = kernel_posterior(spec, kd, built.names, dt["posterior"].to_dataset())
    else:
        ensure_pytensor_compiledir()  # before PyTensor is first imported
        parameterization = "explicit" if route == "graph-explicit" else "collapsed"
        built = build_pymc_model(spec, crossprods, prior_set, parameterization, scale=scale)
        t1 = time.perf_counter()
        dt = _sample(built.model, draws, tune, chains, cores, seed, sampler, target_accept, max_treedepth,
                     progressbar)
        post = dt["posterior"].to_dataset()
        post = post[[v for v in post.data_vars if v not in built.internal]]
        if built.collapsed is not None:  # the effects are drawn below in y's units, from y's arrays
            built.collapsed = CollapsedData.from_crossprods(crossprods)
    # the residual parameters (sd ratios, powers, correlations) have no units: kept as sampled
    unitless = naming.residual_vars(spec)
    in_units = scale.to_data_units(post.drop_vars(unitless), built.names)
    return built, dt, in_units.assign({v: post[v] for v in unitless}), t1


def _structured_effects(spec, effects: str, chains: int, draws: int, warn: bool) -> str:
    """The structured route keeps every block's effects' draws (they are drawn at each draw's residual
    parameters, so there is no per-level summary to redraw from): ``effects="summary"`` is refused and an
    ``"auto"`` past ``MAX_EFFECT_VALUES`` keeps them all, saying so; the memory check counts them."""
    if effects not in EFFECTS:
        raise BayesLMMError(f"effects must be one of {list(EFFECTS)}, got {effects!r}")
    if effects == "summary":
        raise BayesLMMError("effects='summary' keeps per-level summaries of the σ²I routes' integrated-out effects; "
                            "with a residual structure every effect's draws are kept (they are drawn at each "
                            "draw's residual parameters): leave effects unset, or ask for fewer draws")
    n_values = spec.blocks[0].n_effects * chains * draws
    if effects == "auto" and n_values > MAX_EFFECT_VALUES and warn:
        warnings.warn(f"every draw of {spec.blocks[0].group}'s {spec.blocks[0].n_effects:,} random effects is kept "
                      f"({n_values:.2g} values, {8 * n_values / 2**30:.1f} GiB): a residual structure's route has no "
                      "per-level summary mode; ask for fewer draws or chains to keep less", UserWarning, stacklevel=5)
    return "draws"


def _store_effects(spec, built, dt, post, seed: int, mode: str, warn: bool) -> xr.Dataset:
    """The integrated-out block's effects: every draw in the posterior, or per-level summaries in
    their own group (with a warning when that was chosen for the user)."""
    if mode == "draws":
        return _add_first_block(spec, built, post, seed)
    first = spec.blocks[0]
    dt[EFFECTS_GROUP] = xr.DataTree(_first_block_summary(built, post, seed, first))
    dt[CONDITIONAL_GROUP] = xr.DataTree(_conditional_arrays(built.collapsed))
    if warn:
        n_values = first.n_effects * post.sizes["chain"] * post.sizes["draw"]
        warnings.warn(
            f"the draws of {first.group}'s {first.n_effects:,} random effects were not stored "
            f"({n_values:.2g} values, more than {MAX_EFFECT_VALUES:.0e}): "
            f"idata['{EFFECTS_GROUP}'] holds each effect's posterior mean, sd and quantiles, and "
            "bayeslmm.bayes.fit.effect_draws(fit, levels) redraws chosen levels exactly; pass "
            "effects='draws' to store them all", UserWarning, stacklevel=5)
    return post


def _store_loglik(spec, built, dt, post, mode: str, n_values: int, log_likelihood, warn: bool) -> None:
    """The pointwise log-likelihood, when the rows are in memory, the effects' draws were kept and the
    user asked for it or it is small enough; each omission the user did not ask for is said."""
    if not spec.rows_in_memory:  # built out of memory (bayeslmm.outofcore): no rows to evaluate it on
        if warn:
            warnings.warn("the pointwise log-likelihood and the observed_data/constant_data groups were not "
                          "stored: the model was built out of memory (cross-products only)", UserWarning,
                          stacklevel=5)
    elif mode == "summary":
        pass  # the log-likelihood is conditional on the effects, whose draws were not kept
    elif log_likelihood or (log_likelihood is None and n_values <= MAX_LOGLIK_VALUES):
        dt["log_likelihood"] = xr.DataTree(pointwise_loglik(spec, post, built.names))
    elif log_likelihood is None and warn:
        draws = n_values // spec.n_obs
        warnings.warn(f"the pointwise log-likelihood was not stored: {spec.n_obs} rows × {draws} draws "
                      f"= {n_values:.2g} values (more than {MAX_LOGLIK_VALUES:.0e}); pass log_likelihood=True "
                      "to store it for LOO", UserWarning, stacklevel=5)

#: levels × columns from which a kernel called through Python (no C callback: :func:`sample_kernel`)
#: samples chains on several threads
KERNEL_THREADS_WORK = 2_000
#: effects outside the first block (the dense part of the factorisation) up to which the blocked kernel
#: is chosen: its gradient costs ~m³ for m such effects; above, the partly collapsed kernel samples them.
#: Measured on (1 | a) + (1 | b), 20,000 rows, 2m × m levels (min bulk ESS/s, blocked vs partial):
#: m = 100: 344 vs 30; m = 175: 141 vs 45; m = 250: 41 vs 64
BLOCKED_AUTO_MAX_REST = 200


def resolve_route(spec, prior_set, route: str = "auto", sampler: str = "auto") -> str:
    """The route that samples this model (one of ``results.RAN_ROUTES``), for ``route`` as asked.

    "auto": the compiled kernel that applies — :mod:`.kernel` ("one-factor": one factor, q ≤ 2),
    :mod:`.blocked` (every effect integrated out), :mod:`.partial` (more than
    ``BLOCKED_AUTO_MAX_REST`` effects outside the largest factor: those sampled), :mod:`.structured`
    (a residual structure) — else the PyMC graph; ``sampler="pymc"`` means the graph.  A kernel asked
    for by name (or "kernel": any) is an error that says why when it cannot sample the model.  On a
    model with a residual structure the graph samples every effect ("graph-explicit").
    """
    if route not in ROUTES:
        raise BayesLMMError(f"route must be one of {list(ROUTES)}, got {route!r}")
    graph = "graph-explicit" if route == "graph-explicit" or spec.residual is not None else "graph"
    if route in ("graph", "graph-explicit"):
        return graph
    if sampler == "pymc":
        if route != "auto":
            raise BayesLMMError(f"route={route!r} is a compiled kernel, which runs on nutpie's NUTS only: use "
                                "sampler='nutpie' or 'auto', or route='graph' for PyMC's NUTS")
        return graph
    kernel, why = _kernel_route(spec, prior_set, route)
    if kernel is not None:
        return kernel
    if route != "auto":
        raise BayesLMMError(f"route={route!r} cannot fit this model: {why}; use route='auto' or 'graph'")
    return graph


def _kernel_route(spec, prior_set, route: str) -> tuple[str | None, str | None]:
    """(the compiled kernel for ``route`` — "auto", "kernel" or a kernel's name — or None, and why not)."""
    if spec.residual is not None:
        return _structured_kernel(spec, prior_set, route)
    if route == "structured":
        return None, ("the structured kernel is for models with a residual structure (variance=, correlation=, "
                      "weights=)")
    one_factor = unsupported_reason(spec, prior_set, "collapsed")
    if route == "one-factor" or (route in ("auto", "kernel") and one_factor is None):
        return ("one-factor", None) if one_factor is None else (None, one_factor)
    reason = blocked.unsupported_reason(spec, prior_set)
    if reason is not None:
        return None, reason
    if route in ("blocked", "partial"):
        return route, None
    rest = sum(b.n_effects for b in spec.blocks[1:])
    return ("blocked" if rest <= BLOCKED_AUTO_MAX_REST else "partial"), None


def _structured_kernel(spec, prior_set, route: str) -> tuple[str | None, str | None]:
    """The kernel of a model with a residual structure: the structured kernel (:mod:`.structured`), or
    none (the PyMC graph) where its pieces would be too many or its dense part too large (O(N) per
    gradient): (kernel or None, why not)."""
    if route in ("one-factor", "blocked", "partial"):
        return None, ("the one-factor, blocked and partly collapsed kernels sample R = σ²I; the structured "
                      "kernel samples residual structures")
    reason = structured.unsupported_reason(spec, prior_set)
    rest = sum(b.n_effects for b in spec.blocks[1:])
    if reason is None and rest > BLOCKED_AUTO_MAX_REST and route == "auto":
        reason = f"{rest} effects outside the largest factor (the dense part; auto takes up to {BLOCKED_AUTO_MAX_REST})"
    return ("structured", None) if reason is None else (None, reason)


def one_blas_thread():
    """A context in which BLAS uses one thread (the blocked kernel's products are small and run per chain)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def compiled_model(spec, crossprods, prior_set, scale: ResponseScale | None = None, route: str = "blocked"):
    """The arrays of the compiled kernel ``route`` ("blocked", "partial" or "structured"), in ``scale``'s
    standardised units when given, and the model in y's own units."""
    if scale is not None:
        prior_set = scale.priors(prior_set)
    kind = {"blocked": blocked.BlockedData, "partial": partial.PartialData,
            "structured": structured.StructuredData}[route]
    data = kind.build(spec, crossprods, prior_set, centring_matrix(spec, prior_set),
                      scale=1.0 if scale is None else scale.scale)
    # the structured route draws every block's effects at each draw's ρ: no σ²I conditional is kept
    collapsed = None if route == "structured" else CollapsedData.from_crossprods(crossprods)
    built = BuiltModel(model=None, parameterization="collapsed", names=block_names(spec), collapsed=collapsed,
                       internal=[])
    return built, data


def blocked_posterior(spec, bd, names, raw: xr.Dataset, seed: int) -> xr.Dataset:
    """The blocked kernel's draws as the posterior variables, with the effects of every block but the
    first drawn exactly from their conditional (stream (seed, 2)); the first block's are drawn later
    from theirs given these, as for every collapsed fit."""
    x = raw["x"].to_numpy()
    rest = blocked.draw_rest_effects(bd, x, np.random.default_rng([seed, 2]))
    return _compiled_posterior(spec, names, raw, bd.constrain(x), _rest_blocks(spec, rest, x.shape[:2]))


def _rest_blocks(spec, rest: np.ndarray, shape: tuple) -> list[np.ndarray]:
    """The draws of every block's effects but the first, (draws, mR) level-major, as (chain, draw, levels, q)
    per block."""
    effects, start = [], 0
    for block in spec.blocks[1:]:
        effects.append(rest[:, start : start + block.n_effects].reshape(*shape, block.n_levels, block.q))
        start += block.n_effects
    return effects


def _with_first_block(spec, names, post: xr.Dataset, b: np.ndarray) -> xr.Dataset:
    """``post`` with the first block's effect draws ``b`` (chain, draw, levels, q) as its first variable."""
    first, name = spec.blocks[0], names[0]
    post[name] = xr.DataArray(b, dims=("chain", "draw", naming.level_dim(name), naming.effect_dim(name)),
                              coords={naming.level_dim(name): list(first.levels),
                                      naming.effect_dim(name): list(first.columns)})
    return post[[name] + [v for v in post.data_vars if v != name]]


def structured_posterior(spec, sdata, names, raw: xr.Dataset, seed: int) -> xr.Dataset:
    """The structured kernel's draws as the posterior variables: every block's effects drawn exactly at each
    draw's residual parameters (stream (seed, 2)), and the residual parameters on nlme's scale."""
    x = raw["x"].to_numpy()
    first_b, rest = structured.draw_effects(sdata, x, np.random.default_rng([seed, 2]))
    vals = sdata.constrain(x)
    post = _compiled_posterior(spec, names, raw, vals, _rest_blocks(spec, rest, x.shape[:2]))
    for i, var in enumerate(naming.residual_vars(spec)):
        post[var] = (("chain", "draw"), vals["residual"][..., i])
    return _with_first_block(spec, names, post, first_b.reshape(x.shape[:2] + first_b.shape[1:]))


def partial_posterior(spec, pdata, names, raw: xr.Dataset) -> xr.Dataset:
    """The partly collapsed kernel's draws as the posterior variables (the other blocks' effects were sampled)."""
    vals = pdata.constrain(raw["x"].to_numpy())
    return _compiled_posterior(spec, names, raw, vals, vals["effects"])


def _compiled_posterior(spec, names, raw: xr.Dataset, vals: dict, effects: list) -> xr.Dataset:
    """β, σ, every block's sds and correlations, and the effects of every block but the first (chain, draw, ...)."""
    coords = {"chain": raw["chain"].to_numpy(), "draw": raw["draw"].to_numpy(), "coef": list(spec.fixed_names)}
    data = {"beta": (("chain", "draw", "coef"), vals["beta"]), "sigma": (("chain", "draw"), vals["sigma"])}
    for name, block, sd, corr in zip(names, spec.blocks, vals["sd"], vals["corr"]):
        e = naming.effect_dim(name)
        data[naming.sd_var(name)] = (("chain", "draw", e), sd)
        coords[e] = list(block.columns)
        if corr is not None:
            corr_vars, corr_coords = naming.corr_data(name, block.columns, naming.pairs_of(corr))
            data.update(corr_vars)
            coords.update(corr_coords)
    for name, block, b in zip(names[1:], spec.blocks[1:], effects):
        lv = naming.level_dim(name)
        data[name] = (("chain", "draw", lv, naming.effect_dim(name)), b)
        coords[lv] = list(block.levels)
    return xr.Dataset(data, coords=coords)


def kernel_model(spec, crossprods, prior_set, scale: ResponseScale | None = None):
    """The kernel's arrays (in ``scale``'s standardised units when given), and the model in y's own units."""
    data = CollapsedData.from_crossprods(crossprods)
    if scale is not None:
        prior_set = scale.priors(prior_set)
    kd = KernelData.build(spec, CollapsedData.from_crossprods(crossprods, scale), prior_set,
                          centring_matrix(spec, prior_set))
    built = BuiltModel(model=None, parameterization="collapsed", names=block_names(spec), collapsed=data,
                       internal=[])
    return built, kd


def sample_kernel(kd, draws, tune, chains, cores, seed, target_accept, max_treedepth, progressbar):
    """nutpie's NUTS on the compiled collapsed log-posterior; the draws stay unconstrained (``x``).

    nutpie calls the kernel's C callback (:mod:`.native`) without entering Python; where that
    cannot be built (nutpie's internals or a kernel's arguments changed), it calls a Python
    function per gradient instead, with a warning.
    """
    def initial_point(chain_seed):
        return kd.initial_point(np.random.default_rng([seed, int(chain_seed)]))

    counter = DrawCounter(chains, tune, draws)
    with counter.interrupts():
        try:
            from .native import native_model
            compiled, native = native_model(kd, initial_point), True
        except Exception as exc:  # noqa: BLE001  (any failure here leaves the slower path, which still works)
            warnings.warn(f"the kernel is sampled through Python calls (slower): its C callback failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                          RuntimeWarning, stacklevel=2)
            compiled, native = _python_model(kd, initial_point), False
        if cores is None:
            # a C callback never waits for the GIL: a thread per chain pays off on every model; a Python
            # one hands the GIL over per gradient, worth it only when a gradient is long (many levels)
            threads = native or kd.work >= KERNEL_THREADS_WORK
            cores = max(1, min(chains, os.cpu_count() or 1)) if threads else 1
        return _nutpie_sample(compiled, counter, cores=cores, seed=seed, progress_bar=progressbar,
                              target_accept=target_accept, maxdepth=max_treedepth)


def _python_model(kd, initial_point):
    """The kernel as a nutpie model that calls ``kd.logp_function()`` (Python) per gradient."""
    from nutpie.compiled_pyfunc import from_pyfunc

    ndim = kd.ndim

    def make_expand(seed1, seed2, chain):
        def expand(x, **_shared):
            return {"x": np.array(x, dtype=np.float64)}
        return expand

    return from_pyfunc(ndim, kd.logp_function, make_expand, [np.dtype("float64")], [(ndim,)], ["x"],
                       make_initial_point_fn=initial_point, coords={"x_dim": np.arange(ndim)},
                       dims={"x": ("x_dim",)})


def kernel_posterior(spec, kd, names, raw: xr.Dataset) -> xr.Dataset:
    """The kernel's unconstrained draws as the posterior variables the PyMC model reports."""
    vals = kd.constrain(raw["x"].to_numpy())
    one_block = {"beta": vals["beta"], "sigma": vals["sigma"], "sd": [vals["sd"]], "corr": [vals.get("corr")]}
    return _compiled_posterior(spec, names, raw, one_block, [])


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

        counter = DrawCounter(chains, tune, draws)
        with counter.interrupts():
            compiled = nutpie.compile_pymc_model(model)
            if cores is None:  # one thread per chain, but no more threads than processors
                cores = max(1, min(chains, os.cpu_count() or 1))
            return _nutpie_sample(compiled, counter, cores=cores, seed=seed, progress_bar=progressbar,
                                  target_accept=target_accept, maxdepth=max_treedepth)
    # PyMC's own NUTS; one process by default: for these models starting worker
    # processes costs more than the sampling they would share
    logger = logging.getLogger("pymc")
    level = logger.level
    if not progressbar:
        logger.setLevel(logging.ERROR)
    counter = DrawCounter(chains, tune, draws)
    # in a notebook without ipywidgets: a line of text (rich would only warn), see .progress
    options = pymc_progress_options(progressbar, chains, tune, draws)
    text_progress = options.pop("callback", None)  # before the call: **options must not hold it too
    try:
        with counter.interrupts(), _noting_sigint() as sigint, model:
            step = pm.NUTS(target_accept=target_accept, max_treedepth=max_treedepth)
            try:
                trace = pm.sample(draws=draws, tune=tune, chains=chains, cores=cores if cores is not None else 1,
                                  random_seed=seed, step=step, nuts_sampler="pymc",
                                  compute_convergence_checks=False,
                                  **options, callback=counter.pymc_callback(sigint, text_progress))
            finally:
                # PyMC catches the KeyboardInterrupt, then returns the partial trace (or, while
                # tuning, fails to build one): either way the interrupt is what the caller gets
                if sigint.is_set():
                    raise KeyboardInterrupt from None
    finally:
        logger.setLevel(level)
    check_complete(trace["posterior"], chains, draws)
    return trace


def _nutpie_sample(compiled, counter: DrawCounter, **options):
    """``nutpie.sample`` that raises on an interrupt, where nutpie returns the draws so far padded with NaN."""
    import nutpie

    sampler = nutpie.sample(compiled, draws=counter.draws, tune=counter.tune, chains=counter.chains,
                            save_warmup=False, blocking=False, progress_callback=counter.nutpie_progress,
                            **options)
    try:
        trace = sampler.wait()
    except BaseException:
        sampler.cancel()  # stops the chains' threads and drops their draws
        raise
    check_complete(trace["posterior"], counter.chains, counter.draws)
    return trace


class DrawCounter:
    """Iterations each chain has finished (tuning included), as the sampler reports them.

    It turns an interrupt into ``KeyboardInterrupt("the fit was interrupted after N of M
    draws ...")``: a fit is never made from part of the chains.
    """

    def __init__(self, chains: int, tune: int, draws: int):
        self.chains, self.tune, self.draws = chains, tune, draws
        self.done = np.zeros(chains, dtype=int)

    def interrupted(self) -> KeyboardInterrupt:
        kept = int(np.clip(self.done - self.tune, 0, self.draws).sum())
        note = ""
        if not self.done.any():
            note = ", before sampling began"
        elif kept == 0 and self.tune:
            note = f", while tuning ({int(self.done.max()):,} of {self.tune:,} tuning iterations)"
        return KeyboardInterrupt(f"the fit was interrupted after {kept:,} of {self.chains * self.draws:,} draws "
                                 f"({self.chains} chains × {self.draws:,}){note}; nothing was returned")

    @contextlib.contextmanager
    def interrupts(self):
        """Re-raise a KeyboardInterrupt from the block with the count of draws made."""
        try:
            yield self
        except KeyboardInterrupt:
            raise self.interrupted() from None

    def nutpie_progress(self, progress) -> None:
        """nutpie's ``progress_callback`` (called on a background thread every progress refresh)."""
        for i, chain in enumerate(progress[: self.chains]):
            self.done[i] = chain.finished_draws

    def pymc_callback(self, sigint: threading.Event, then=None):
        """``pm.sample``'s per-draw callback: counts, stops each later chain once SIGINT came, calls ``then``."""
        def callback(trace=None, draw=None):
            self.done[draw.chain] = draw.draw_idx + 1
            if sigint.is_set():  # PyMC samples chains one after another: stop the next ones at once
                raise KeyboardInterrupt
            if then is not None:
                then(trace=trace, draw=draw)
        return callback


@contextlib.contextmanager
def _noting_sigint():
    """Set the yielded event when SIGINT arrives, then act as before (raise KeyboardInterrupt).

    PyMC's ``pm.sample`` catches the KeyboardInterrupt and returns the partial trace;
    the event is how the caller learns of it.  Only the main thread receives signals,
    so elsewhere nothing is installed (and :func:`check_complete` still refuses a
    partial trace).
    """
    event = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield event
        return

    def handler(signum, frame):
        event.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def check_complete(posterior, chains: int, draws: int) -> None:
    """Raise :class:`~bayeslmm.errors.IncompleteTraceError` unless every chain holds all its draws.

    A sampler that stops early (an interrupt, a crashed chain) may hand back fewer
    draws or chains padded with NaN; no fit is made from such a trace.
    """
    ds = posterior.to_dataset() if isinstance(posterior, xr.DataTree) else posterior
    got = (ds.sizes.get("chain", 0), ds.sizes.get("draw", 0))
    complete = np.full(got[0], got[1])
    for da in ds.data_vars.values():
        if np.issubdtype(da.dtype, np.floating) and da.dims[:2] == ("chain", "draw"):
            missing = np.isnan(da.to_numpy().reshape(got[0], got[1], -1)).any(axis=2)
            complete = np.minimum(complete, got[1] - missing.sum(axis=1))
    if got == (chains, draws) and (complete == draws).all():
        return
    per_chain = ", ".join(f"chain {c}: {int(n):,}" for c, n in enumerate(complete))
    raise IncompleteTraceError(
        f"the sampler returned an incomplete trace ({chains} chains × {draws:,} draws asked; complete draws "
        f"per chain: {per_chain or 'none'}); no fit was made from it. An interrupted or failed sampler "
        "leaves chains unfinished: run the fit again")


def ensure_pytensor_compiledir() -> None:
    """Give PyTensor a private compile folder where its default (``~/.pytensor``) cannot be written.

    A read-only install with no writable home (a system or container install) has
    none, and PyTensor would stop at its first compilation.  PyTensor reads the
    folder when it is imported, so the fallback (``PYTENSOR_FLAGS=base_compiledir=``
    a private temporary folder, also seen by worker processes) is set only before
    that; a folder the user chose in ``PYTENSOR_FLAGS`` is left alone.
    """
    flags = os.environ.get("PYTENSOR_FLAGS", "")
    if "base_compiledir" in flags:
        return
    if "pytensor" in sys.modules:
        import pytensor

        folder = str(pytensor.config.base_compiledir)
    else:
        folder = os.path.join(os.path.expanduser("~"), ".pytensor")
    if _writable_folder(folder):
        return
    private = private_cache_dir("pytensor")
    if private is None or "pytensor" in sys.modules:
        raise BayesLMMError(f"PyTensor cannot write its compile folder {folder}: start Python with "
                            "PYTENSOR_FLAGS=base_compiledir=DIR set to a folder you can write")
    os.environ["PYTENSOR_FLAGS"] = ",".join(filter(None, [flags, f"base_compiledir={private}"]))


def _writable_folder(path: str) -> bool:
    """Whether ``path`` is, or can be made, a folder this process can write."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


#: what a fit that does not fit in memory can give up
REDUCE_MEMORY = ("Ask for fewer draws or chains, effects='summary' (keeps per-level summaries of the integrated-out "
                 "effects, not their draws) or log_likelihood=False.")
#: sample statistics a sampler keeps per draw (nutpie ~20, PyMC ~15)
STATS_PER_DRAW = 15
#: the sampler's trace grows by doubling its buffers, then is copied out: up to 3× its size at once
#: (counted in full because an allocation that fails inside nutpie aborts the process)
TRACE_GROWTH = 3


def memory_needed(spec: ModelSpec, chains: int, draws: int, parameterization: str, effects: str,
                  log_likelihood: bool | None) -> int:
    """Bytes a fit's draws take at the least: the sampler's trace, the posterior and the log-likelihood.

    Nearer a floor than a forecast: tuning draws and the libraries' other copies and
    temporaries come on top.
    """
    first = spec.blocks[0]
    mode = _effects_mode(effects, first.n_effects * chains * draws, log_likelihood)
    integrated = parameterization == "collapsed" and mode == "summary"
    sampled = spec.n_fixed + 1
    for i, block in enumerate(spec.blocks):
        sampled += block.q + (block.q * block.q if block.correlated and block.q > 1 else 0)
        if i > 0 or parameterization != "collapsed":
            sampled += block.n_effects
    stored = sampled + (first.n_effects if parameterization == "collapsed" and not integrated else 0)
    n_values = spec.n_obs * chains * draws
    loglik = spec.rows_in_memory and not integrated and (
        log_likelihood or (log_likelihood is None and n_values <= MAX_LOGLIK_VALUES))
    # the pointwise log-likelihood is computed from the linear predictor, one more array as big
    per_draw = TRACE_GROWTH * (sampled + STATS_PER_DRAW) + stored + (2 * spec.n_obs if loglik else 0)
    return 8 * chains * draws * per_draw


def memory_available() -> tuple[int, str] | None:
    """Bytes this process may still allocate, and what limits it (``None`` where nothing can be read).

    The least of: the address-space limit (``ulimit -v``, RLIMIT_AS) less the process's
    size, the cgroup's ``memory.max`` less its use, and the system's available memory
    and free swap.
    """
    room = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _proc_kib("/proc/self/status", "VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        room.append((soft - size, f"the address-space limit (ulimit -v) of {soft / 2**30:.1f} GiB"))
    cgroup = _cgroup_room()
    if cgroup is not None:
        room.append(cgroup)
    free = [_proc_kib("/proc/meminfo", key) for key in ("MemAvailable", "SwapFree")]
    if free[0] is not None:
        room.append((free[0] + (free[1] or 0), "the memory available on this machine"))
    return min(room) if room else None


def _proc_kib(path: str, key: str) -> int | None:
    """A ``key:  N kB`` line of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> tuple[int, str] | None:
    """The least ``memory.max − memory.current`` over this process's cgroup (v2) and its parents."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.split("::", 1)[1].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    best = None
    while True:
        folder = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        try:
            with open(os.path.join(folder, "memory.max")) as f:
                limit = f.read().strip()
            with open(os.path.join(folder, "memory.current")) as f:
                used = int(f.read())
            if limit != "max":
                room = (int(limit) - used, f"the cgroup memory limit (memory.max) of {int(limit) / 2**30:.1f} GiB")
                best = room if best is None else min(best, room)
        except (OSError, ValueError):
            pass
        if path in ("", "/"):
            return best
        path = os.path.dirname(path.rstrip("/"))


def check_memory(spec: ModelSpec, chains: int, draws: int, parameterization: str, effects: str,
                 log_likelihood: bool | None) -> None:
    """Refuse before sampling when the draws clearly cannot fit in what this process may allocate.

    Past this check a MemoryError still surfaces as :class:`InsufficientMemoryError`, but
    an allocation that fails inside nutpie's Rust code aborts the process (Rust's
    allocator aborts by design): the check is what keeps that from happening.
    """
    needed = memory_needed(spec, chains, draws, parameterization, effects, log_likelihood)
    room = memory_available()
    if room is not None and needed > room[0]:
        raise InsufficientMemoryError(
            f"storing {chains} chains × {draws:,} draws needs at least {needed / 2**30:.2f} GiB, but this process "
            f"may allocate only about {max(room[0], 0) / 2**30:.2f} GiB more ({room[1]}); nothing was sampled. "
            f"{REDUCE_MEMORY}")


EFFECTS = ("auto", "draws", "summary")
#: draws of the integrated-out effects stored by default at most (levels × columns × draws): 800 MB
MAX_EFFECT_VALUES = 100_000_000


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


def _add_first_block(spec, built, post, seed: int):
    """Draw the integrated-out effects exactly from their Gaussian conditional."""
    first = spec.blocks[0]
    C, D = post.sizes["chain"], post.sizes["draw"]
    gamma, L, sigma = first_block_inputs(post, built.names, first)
    n_chunks = -(-first.n_levels // LEVEL_CHUNK)
    b = np.empty((C * D, first.n_levels, first.q))
    for k, d in draw_chunks(built.collapsed, gamma, L, sigma, seed, range(n_chunks)):
        b[:, k * LEVEL_CHUNK : k * LEVEL_CHUNK + d.shape[1]] = d
    return _with_first_block(spec, built.names, post, b.reshape(C, D, first.n_levels, first.q))


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
    gamma, L, sigma = first_block_inputs(post, built.names, first)
    n_chunks = -(-first.n_levels // LEVEL_CHUNK)
    out = np.empty((first.n_levels, first.q, len(SUMMARY_STATS)))
    for k, d in draw_chunks(built.collapsed, gamma, L, sigma, seed, range(n_chunks)):
        out[k * LEVEL_CHUNK : k * LEVEL_CHUNK + d.shape[1]] = _summarise_effects(d)
    return xr.Dataset({name: ((naming.level_dim(name), naming.effect_dim(name), "stat"), out)},
                      coords={naming.level_dim(name): list(first.levels), naming.effect_dim(name): list(first.columns),
                              "stat": list(SUMMARY_STATS)},
                      attrs={"seed": seed, "level_chunk": LEVEL_CHUNK, "n_draws": int(gamma.shape[0])})


def _conditional_arrays(data: CollapsedData) -> xr.Dataset:
    """What redrawing the first block needs (G_j, H_j, g_j per level), so a fit can redraw any level."""
    return xr.Dataset({"G": (("level", "i", "k"), data.G), "H": (("level", "i", "r"), data.H),
                       "g": (("level", "i"), data.g)})


def _add_data_groups(dt, spec: ModelSpec) -> None:
    obs = np.arange(spec.n_obs)
    dt["observed_data"] = xr.DataTree(xr.Dataset({"y": ("obs", spec.y)}, coords={"obs": obs}))
    const = {"X": (("obs", "coef"), spec.X)}
    for i, block in enumerate(spec.blocks):
        const[f"codes_{i}"] = ("obs", block.codes)
    dt["constant_data"] = xr.DataTree(xr.Dataset(const, coords={"obs": obs, "coef": list(spec.fixed_names)}))
