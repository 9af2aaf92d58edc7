"""Simulation-based calibration (SBC) of the collapsed NUTS sampler.

Talts, Betancourt, Simpson, Vehtari & Gelman (2018), *Validating Bayesian inference
algorithms with simulation-based calibration*, arXiv:1804.06788: draw parameters θ̃
from the prior, data ỹ from the model given θ̃, fit the model to ỹ and record the
rank of θ̃ among (thinned) posterior draws.  If the computation is right, every
rank is uniform on 0..L.

What this module does:

* parameters are drawn from the package's own :class:`~bayeslmm.bayes.priors.PriorSet`
  (the same :class:`Prior` objects the PyMC model is built from, drawn with
  ``pm.draw``; the LKJ correlation with ``pm.LKJCorr``), and the response is
  simulated in numpy from them, independently of the PyMC model;
* every simulated response is fitted by the *collapsed* model compiled once: the
  response enters it only through the shared ``pm.Data`` blocks ``Z1ty``, ``Xty`` and
  ``yty`` (:func:`~bayeslmm.bayes.model.build_pymc_model`), which are swapped per
  simulation with nutpie's ``CompiledPyMCModel.with_data`` (no recompilation);
* ranks of β, σ, every sd and correlation, and of the marginal log-likelihood of
  the simulated data ``log p(ỹ | β, Σ, σ)`` (a data-dependent test quantity, which
  Modrák, Moon, Kim, Bürkner, Huurre, Faltejsková, Gelman & Vehtari 2023, *Bayesian
  Analysis*, show catches errors that parameter ranks miss);
* whether the truth lies in the central 50 % and 90 % posterior intervals;
* per simulation: divergences, smallest bulk ESS and largest R-hat.

And three checks of the collected ranks: a chi-square test on binned ranks (exact
expected counts), the ECDF test with simultaneous bands of Säilynoja, Bürkner &
Vehtari (2022), *Graphical test for discrete uniformity and its applications in
goodness-of-fit evaluation and multiple sample comparison*, Statistics and
Computing 32:32 (its simulation method, here for discrete ranks), and interval
coverage with Clopper–Pearson bounds.

The priors must not depend on the simulated data.  ``fixed_priors`` gives explicit
unit-scale priors (the defaults' families at sd(y) = sd(x) = 1); any prior not given
explicitly is resolved once, from the template ``spec``, and then held fixed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from ..crossprod import CrossProducts
from ..deprecation import renamed_kwargs
from ..errors import BayesLMMError
from ..spec import ModelSpec
from .collapsed import CollapsedData
from . import blocked, naming
from .fit import blocked_posterior, compiled_model, kernel_model, kernel_posterior, one_blas_thread, sample_kernel
from .kernel import unsupported_reason
from .model import build_pymc_model, centring_matrix
from .naming import block_names
from .priors import Prior, PriorSet, resolve_priors

SBC_SAMPLERS = ("kernel", "blocked", "nutpie")
#: the shared data containers of the collapsed model that hold the response
RESPONSE_DATA = ("Z1ty", "Xty", "yty")
LOGLIK = "loglik"


# --------------------------------------------------------------------------- priors and simulation
def fixed_priors(spec: ModelSpec, *, coef_sd: float = 2.5, sigma_rate: float = 1.0, sd_scale: float = 1.0,
                 eta: float = 1.0) -> dict:
    """Explicit priors for every parameter of ``spec``, none depending on the data.

    The families of the defaults at unit scale: ``Normal(0, coef_sd)`` for every
    coefficient (the intercept at the predictors' means), ``Exponential(sigma_rate)``
    for σ, ``HalfNormal(sd_scale)`` for every random-effect sd and ``LKJ(eta)`` for
    every correlated block.
    """
    out: dict = {name: Prior("Normal", mu=0.0, sigma=coef_sd) for name in spec.fixed_names}
    out["sigma"] = Prior("Exponential", lam=sigma_rate)
    for block in spec.blocks:
        if block.group in out:
            raise BayesLMMError(f"grouping factor {block.group!r} has two blocks; give the priors explicitly")
        out[block.group] = {"sd": Prior("HalfNormal", sigma=sd_scale), "eta": eta}
    return out


@renamed_kwargs(seed="random_seed")
def draw_prior(spec: ModelSpec, priors: PriorSet, n: int, random_seed: int) -> dict[str, np.ndarray]:
    """``n`` draws of every parameter from ``priors`` (the PyMC distributions of the model).

    Returns ``beta`` (n, p) on the original scale, ``sigma`` (n,), and per block name
    ``{name}_sd`` (n, q) and ``{name}_corr_chol`` (n, q, q): the Cholesky factor of the
    correlation matrix (the identity for ``||`` blocks).
    """
    import pymc as pm

    dists = [pr.dist() for pr in priors.beta] + [priors.sigma.dist()]
    for block, bp in zip(spec.blocks, priors.blocks):
        dists.append(bp.sd.dist(shape=block.q))
        if block.correlated and block.q > 1:
            dists.append(pm.LKJCorr.dist(n=block.q, eta=bp.eta))    # the Cholesky factor of R
    values = pm.draw(dists, draws=n, random_seed=random_seed)
    values = [np.asarray(v, dtype=float).reshape((n,) + np.shape(v)[1:]) for v in values]
    p = spec.n_fixed
    beta_c = np.stack(values[:p], axis=1)
    out = {"beta": beta_c @ centring_matrix(spec, priors).T, "sigma": values[p]}
    k = p + 1
    for name, block in zip(block_names(spec), spec.blocks):
        out[f"{name}_sd"] = values[k]
        k += 1
        if block.correlated and block.q > 1:
            out[f"{name}_corr_chol"] = values[k]
            k += 1
        else:
            out[f"{name}_corr_chol"] = np.broadcast_to(np.eye(block.q), (n, block.q, block.q)).copy()
    return out


def simulate_response(spec: ModelSpec, beta, sigma, sds, corr_chols, rng: np.random.Generator):
    """One response from the model with these parameters, and the effects drawn for it.

    y = Xβ + Σ_k Z_k b_k + σε, b_kj = L_k z_kj, L_k = diag(sd_k) · chol(R_k), z, ε ~ N(0, 1).
    ``sds`` and ``corr_chols`` are per block, in ``spec.blocks`` order.
    """
    y = spec.X @ np.asarray(beta, dtype=float)
    effects = []
    for block, sd, R in zip(spec.blocks, sds, corr_chols):
        L = np.asarray(sd, dtype=float)[:, None] * np.asarray(R, dtype=float)
        b = rng.standard_normal((block.n_levels, block.q)) @ L.T
        effects.append(b)
        y = y + np.sum(block.Z * b[block.codes], axis=1)
    return y + sigma * rng.standard_normal(spec.n_obs), effects


def marginal_loglik(data: CollapsedData, gamma: np.ndarray, L: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """log p(y | γ, L, σ) with the first block's effects integrated out, for many draws at once.

    The formula of :mod:`.collapsed` (DESIGN.md) in numpy, for any q:
    −½[N log 2πσ² + Σ_j log|M_j| + (rᵀr − Σ_j w_jᵀM_j⁻¹w_j/σ²)/σ²],
    M_j = I + LᵀG_jL/σ², w_j = Lᵀ(g_j − H_jγ), rᵀr = yᵀy − 2γᵀX̃ᵀy + γᵀX̃ᵀX̃γ.

    Parameters
    ----------
    gamma : (S, r)   L : (S, q, q) absolute Cholesky factors   sigma : (S,)
    """
    gamma = np.atleast_2d(gamma)
    L = np.asarray(L, dtype=float).reshape(-1, data.G.shape[1], data.G.shape[1])
    s2 = np.asarray(sigma, dtype=float).reshape(-1) ** 2
    q = data.G.shape[1]
    u = data.g[None] - np.einsum("jqr,sr->sjq", data.H, gamma)                     # (S, J, q)
    w = np.einsum("sba,sjb->sja", L, u)                                            # Lᵀu
    M = np.einsum("sba,jbc,scd->sjad", L, data.G, L) / s2[:, None, None, None] + np.eye(q)
    C = np.linalg.cholesky(M)
    v = np.linalg.solve(C, w[..., None])[..., 0]                                   # C v = w
    logdet = 2.0 * np.log(np.diagonal(C, axis1=-2, axis2=-1)).sum(axis=(1, 2))
    quad = (v**2).sum(axis=(1, 2))
    rtr = data.yty - 2.0 * gamma @ data.Xty + np.einsum("sr,rk,sk->s", gamma, data.XtX, gamma)
    return -0.5 * (data.n_obs * np.log(2.0 * np.pi * s2) + logdet + (rtr - quad / s2) / s2)


def _scalar_parameters(ds, names, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Flatten beta, sigma, every sd and correlation into named arrays over the leading dims."""
    out = {}
    beta = np.asarray(ds["beta"])
    for k, coef in enumerate(spec.fixed_names):
        out[f"beta[{coef}]"] = beta[..., k]
    out["sigma"] = np.asarray(ds["sigma"])
    for name, block in zip(names, spec.blocks):
        sd = np.asarray(ds[naming.sd_var(name)])
        for i, col in enumerate(block.columns):
            out[f"sd[{name}|{col}]"] = sd[..., i]
        if block.correlated and block.q > 1:
            pairs = np.asarray(ds[naming.corr_var(name)])  # the distinct correlations, in naming's order
            for p, label in enumerate(naming.pair_labels(list(block.columns))):
                out[f"corr[{name}|{label}]"] = pairs[..., p]
    return out


# --------------------------------------------------------------------------- the runner
def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BayesLMMError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def _old_attribute(old: str, new: str) -> property:
    """A read-only attribute ``old`` that warns (FutureWarning) and gives ``new``: a renamed attribute."""
    def get(self):
        warnings.warn(f"{type(self).__name__}.{old} is renamed {new}; the old name will be removed in a future "
                      "release (see docs/vocabulary.md)", FutureWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"The old name of ``{new}``.")


class SBCRunner:
    """Simulations of one design, fitted one at a time by one compiled collapsed model.

    Every simulation ``i`` is reproducible on its own: its parameters are the i-th of
    ``n_sims`` prior draws (seed ``random_seed``), its response noise comes from
    ``default_rng([random_seed, i])`` and its sampler seed from ``[random_seed, i, 2]``, so a run can
    stop and resume (``run(indices=...)``) and give the same records.

    Parameters
    ----------
    spec : ModelSpec
        The design (X, Z, grouping); its response is not used except to resolve priors
        that are not given explicitly.
    n_sims : int
    draws, tune, chains : int
        NUTS run per simulation.
    n_ranks : int
        Number L of thinned posterior draws the truth is ranked among (ranks 0..L);
        evenly spaced over the ``chains × draws`` draws.
    random_seed : int
        (formerly ``seed``)
    priors : dict, optional
        Overrides as for ``Model.fit``; default :func:`fixed_priors`.
    sampler : "kernel", "blocked" or "nutpie"
        ``"kernel"`` (default where it applies: one factor, at most two random-effect
        columns): the compiled collapsed kernel that ``fit(method="nuts")`` uses by
        default (:mod:`.kernel`), re-fed each simulation's response with nothing to
        compile.  ``"blocked"`` (default for every other structure): the compiled kernel
        with every effect integrated out (:mod:`.blocked`), rebuilt from each simulation's
        cross-products.  ``"nutpie"``: nutpie compiles the PyMC graph once (numba) and each
        simulation is a ``with_data`` copy of it (PyMC's own NUTS pays ~0.4 s of Python
        per fit more).
    ci_probs : tuple of float
        Probabilities of the central intervals whose coverage is recorded (formerly ``levels``).
    fit_priors : dict, optional
        Priors of the *fitted* model when they should differ from those the truth is drawn
        from: a deliberately miscalibrated run (a negative control that shows the checks
        can fail).  Default: the same priors.
    """

    @renamed_kwargs(seed="random_seed", levels="ci_probs")
    def __init__(self, spec: ModelSpec, n_sims: int = 20, *, draws: int = 500, tune: int = 500, chains: int = 2,
                 n_ranks: int = 99, random_seed: int = 0, priors: dict | None = None, sampler: str = "auto",
                 ci_probs: tuple[float, ...] = (0.5, 0.9), target_accept: float = 0.8,
                 fit_priors: dict | None = None):
        self.n_sims = _positive_int("n_sims", n_sims)
        self.draws = _positive_int("draws", draws)
        self.tune = _positive_int("tune", tune, 0)
        self.chains = _positive_int("chains", chains)
        self.n_ranks = _positive_int("n_ranks", n_ranks)
        self.random_seed = _positive_int("random_seed", random_seed, 0)
        if self.n_ranks > self.chains * self.draws:
            raise BayesLMMError(f"n_ranks ({n_ranks}) must be at most chains × draws ({self.chains * self.draws}); "
                                "lower n_ranks or draw more")
        if sampler not in SBC_SAMPLERS + ("auto",):
            raise BayesLMMError(f"sampler must be one of {['auto', *SBC_SAMPLERS]}, got {sampler!r}")
        if not ci_probs or not all(isinstance(p, float) and 0 < p < 1 for p in ci_probs):
            raise BayesLMMError(f"ci_probs must be interval probabilities strictly between 0 and 1, got {ci_probs!r}")
        if not 0 < target_accept < 1:
            raise BayesLMMError(f"target_accept must be strictly between 0 and 1, got {target_accept!r}")
        self.sampler, self.ci_probs, self.target_accept = sampler, tuple(ci_probs), float(target_accept)
        self.spec = spec
        self.prior_overrides = fixed_priors(spec) if priors is None else priors
        self.priors = resolve_priors(spec, self.prior_overrides)
        self.fit_priors = self.priors if fit_priors is None else resolve_priors(spec, fit_priors)
        reasons = {"kernel": unsupported_reason(spec, self.fit_priors, "collapsed"),
                   "blocked": blocked.unsupported_reason(spec, self.fit_priors)}
        if sampler == "auto":
            self.sampler = next((k for k, why in reasons.items() if why is None), "nutpie")
        elif sampler in reasons and reasons[sampler] is not None:
            raise BayesLMMError(f"sampler={sampler!r} cannot fit this model: {reasons[sampler]}; use sampler='nutpie'")
        self.names = block_names(spec)
        self.cp = CrossProducts.from_spec(spec)
        self.params = draw_prior(spec, self.priors, self.n_sims, self.random_seed)
        self.quantities = list(_scalar_parameters(self._truth_as_posterior(0), self.names, spec)) + [LOGLIK]
        self._compiled = None
        self._built = None

    seed = _old_attribute("seed", "random_seed")
    levels = _old_attribute("levels", "ci_probs")

    @renamed_kwargs(seed="random_seed")
    def with_simulation_priors(self, priors: dict, random_seed: int | None = None) -> "SBCRunner":
        """The same fitted (and compiled) model, with truths drawn from other priors.

        A negative control at no compilation cost: when ``priors`` differ from the fitted
        model's, the ranks are not uniform and the checks should say so.
        """
        self.compile()                       # compiled once, shared by the copy
        other = copy.copy(self)
        other.random_seed = (self.random_seed if random_seed is None
                             else _positive_int("random_seed", random_seed, 0))
        other.prior_overrides = priors
        other.priors = resolve_priors(self.spec, priors)
        other.params = draw_prior(self.spec, other.priors, self.n_sims, other.random_seed)
        return other

    # ------------------------------------------------------------------ settings and truth
    def settings(self) -> dict:
        """Everything that determines the records (for checking a resumed run).

        The seed is stored under ``"seed"``, the key of the runs already on disk
        (``validation/results/sbc_*.json``), so they still resume.
        """
        return {"formula": self.spec.formula, "n_obs": self.spec.n_obs,
                "levels_per_block": [b.n_levels for b in self.spec.blocks], "n_sims": self.n_sims,
                "draws": self.draws, "tune": self.tune, "chains": self.chains, "n_ranks": self.n_ranks,
                "seed": self.random_seed, "sampler": self.sampler, "target_accept": self.target_accept,
                "priors": self.priors.table(self.spec)["prior"].tolist(),
                "fit_priors": self.fit_priors.table(self.spec)["prior"].tolist()}

    def _truth_as_posterior(self, i: int) -> dict:
        ds = {"beta": self.params["beta"][i], "sigma": self.params["sigma"][i]}
        for name, block in zip(self.names, self.spec.blocks):
            ds[naming.sd_var(name)] = self.params[f"{name}_sd"][i]
            R = self.params[f"{name}_corr_chol"][i]
            ds[naming.corr_var(name)] = naming.pairs_of(R @ R.T)
        return ds

    def simulate(self, i: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The i-th simulated response and its effects (per block)."""
        if not 0 <= i < self.n_sims:
            raise BayesLMMError(f"simulation index {i} is outside 0..{self.n_sims - 1}")
        sds = [self.params[f"{n}_sd"][i] for n in self.names]
        chols = [self.params[f"{n}_corr_chol"][i] for n in self.names]
        return simulate_response(self.spec, self.params["beta"][i], self.params["sigma"][i], sds, chols,
                                 np.random.default_rng([self.random_seed, i]))

    def truth(self, i: int) -> dict[str, float]:
        """The true value of every quantity of simulation i (the log-likelihood at the truth included)."""
        out = {k: float(v) for k, v in _scalar_parameters(self._truth_as_posterior(i), self.names, self.spec).items()}
        y, effects = self.simulate(i)
        data = self._collapsed_data(y)
        L = self.params[f"{self.names[0]}_sd"][i][:, None] * self.params[f"{self.names[0]}_corr_chol"][i]
        gamma = np.concatenate([b.ravel() for b in effects[1:]] + [self.params["beta"][i]])
        out[LOGLIK] = float(marginal_loglik(data, gamma[None], L[None], np.array([self.params["sigma"][i]]))[0])
        return out

    def _crossprods(self, y: np.ndarray) -> CrossProducts:
        return CrossProducts.from_spec(dataclasses.replace(self.spec, y=y))

    def _collapsed_data(self, y: np.ndarray) -> CollapsedData:
        return CollapsedData.from_crossprods(self._crossprods(y))

    # ------------------------------------------------------------------ sampling
    def _build(self):
        if self._built is None:
            built = build_pymc_model(self.spec, self.cp, self.fit_priors, "collapsed")
            missing = [n for n in RESPONSE_DATA if n not in built.model.named_vars]
            if missing:
                raise BayesLMMError(f"the collapsed model has no data containers {missing}; SBC needs the response "
                                    f"in shared data {list(RESPONSE_DATA)} (bayes/model.py)")
            self._built = built
        return self._built

    def compile(self) -> float:
        """Build and compile the collapsed model once; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.sampler == "blocked":   # numba's cached machine code; its arrays are built per simulation
            return time.perf_counter() - t0
        if self.sampler == "kernel":    # the arrays built once, the response swapped per simulation
            if self._compiled is None:
                self._compiled = kernel_model(self.spec, self.cp, self.fit_priors)[1]
            return time.perf_counter() - t0
        built = self._build()
        if self._compiled is None:
            import nutpie

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS")
                self._compiled = nutpie.compile_pymc_model(built.model)
        return time.perf_counter() - t0

    def _sample(self, cp: CrossProducts, data: CollapsedData, seed: int):
        import nutpie

        self.compile()
        if self.sampler == "blocked":
            bd = compiled_model(self.spec, cp, self.fit_priors)[1]
            with one_blas_thread():
                dt = sample_kernel(bd, self.draws, self.tune, self.chains, 1, seed, self.target_accept, 10, False)
                dt["posterior"] = xr.DataTree(blocked_posterior(self.spec, bd, self.names,
                                                                dt["posterior"].to_dataset(), seed))
            return dt
        if self.sampler == "kernel":
            kd = dataclasses.replace(self._compiled, g=np.ascontiguousarray(data.g), Xty=data.Xty,
                                     yty=float(data.yty))
            dt = sample_kernel(kd, self.draws, self.tune, self.chains, 1, seed, self.target_accept, 10, False)
            dt["posterior"] = xr.DataTree(kernel_posterior(self.spec, kd, self.names,
                                                            dt["posterior"].to_dataset()))
            return dt
        compiled = self._compiled.with_data(Z1ty=data.g, Xty=data.Xty, yty=data.yty)
        return nutpie.sample(compiled, draws=self.draws, tune=self.tune, chains=self.chains, cores=1, seed=seed,
                             progress_bar=False, save_warmup=False, target_accept=self.target_accept)

    def run_one(self, i: int) -> dict:
        """Simulate, fit and rank simulation ``i``; one flat record (see :class:`SBCResult`)."""
        from arviz_stats.base import array_stats

        t0 = time.perf_counter()
        y, _ = self.simulate(i)
        truth = self.truth(i)
        cp = self._crossprods(y)
        data = CollapsedData.from_crossprods(cp)
        seed = int(np.random.SeedSequence([self.random_seed, i, 2]).generate_state(1)[0] % (2**31))
        dt = self._sample(cp, data, seed)
        post = dt["posterior"].to_dataset()
        draws = _scalar_parameters(post, self.names, self.spec)
        C, D = post.sizes["chain"], post.sizes["draw"]
        first = self.spec.blocks[0]
        L = naming.cholesky_factors(post, self.names[0], first).reshape(C * D, first.q, first.q)
        rest = [post[n].to_numpy().reshape(C * D, -1) for n in self.names[1:]]
        gamma = np.concatenate(rest + [post["beta"].to_numpy().reshape(C * D, -1)], axis=1)
        draws[LOGLIK] = marginal_loglik(data, gamma, L, post["sigma"].to_numpy().reshape(C * D)).reshape(C, D)
        keep = np.floor((np.arange(self.n_ranks) + 0.5) * (C * D) / self.n_ranks).astype(int)
        record: dict = {"sim": i, "sampler_seed": seed}
        ess, rhat = [], []
        for q in self.quantities:
            v = np.asarray(draws[q], dtype=float)
            flat = v.reshape(-1)
            record[f"rank:{q}"] = int(np.sum(flat[keep] < truth[q]))
            record[f"truth:{q}"] = truth[q]
            for p in self.ci_probs:
                lo, hi = np.quantile(flat, [(1 - p) / 2, (1 + p) / 2])
                record[f"in{_pct(p)}:{q}"] = bool(lo <= truth[q] <= hi)
            if np.ptp(flat) > 0:
                ess.append(float(array_stats.ess(v, chain_axis=0, draw_axis=1, method="bulk")))
                rhat.append(float(array_stats.rhat(v, chain_axis=0, draw_axis=1)) if C > 1 else np.nan)
        stats_ = dt["sample_stats"]
        div = stats_["diverging"] if "diverging" in stats_ else stats_.get("divergences")
        record["divergences"] = int(np.asarray(div).sum()) if div is not None else -1
        record["min_ess_bulk"] = float(np.min(ess)) if ess else np.nan
        record["max_rhat"] = float(np.nanmax(rhat)) if rhat and not np.all(np.isnan(rhat)) else np.nan
        record["seconds"] = time.perf_counter() - t0
        return record

    def run(self, indices: Iterable[int] | None = None, on_result: Callable[[dict], None] | None = None) -> "SBCResult":
        """Run the simulations ``indices`` (default all) and return their result."""
        indices = range(self.n_sims) if indices is None else list(indices)
        records = []
        for i in indices:
            rec = self.run_one(int(i))
            records.append(rec)
            if on_result is not None:
                on_result(rec)
        return SBCResult.from_records(pd.DataFrame(records), self.n_ranks, self.quantities, self.ci_probs)


def _pct(p: float) -> str:
    return f"{100 * p:g}"


@renamed_kwargs(seed="random_seed", levels="ci_probs")
def simulation_based_calibration(spec: ModelSpec, n_sims: int = 20, *, draws: int = 500, tune: int = 500,
                                 chains: int = 2, n_ranks: int = 99, random_seed: int = 0, priors: dict | None = None,
                                 sampler: str = "nutpie", ci_probs: tuple[float, ...] = (0.5, 0.9)) -> "SBCResult":
    """Run SBC for the collapsed model of ``spec``'s design; see :class:`SBCRunner`."""
    runner = SBCRunner(spec, n_sims, draws=draws, tune=tune, chains=chains, n_ranks=n_ranks, random_seed=random_seed,
                       priors=priors, sampler=sampler, ci_probs=ci_probs)
    return runner.run()


# --------------------------------------------------------------------------- the checks
def _alpha_as_ci_prob(new: str = "ci_prob"):
    """Decorator: accept the old ``alpha`` (1 − the band's probability) as ``new = 1 − alpha``, with a FutureWarning.

    :func:`bayeslmm.deprecation.renamed_kwargs` for an argument whose value changes too:
    ``alpha=0.05`` was the 95 % band, now ``ci_prob=0.95``.  ``new`` is keyword-only
    in the decorated function, so an old positional ``alpha`` is a ``TypeError``, never
    silently taken for a probability.
    """
    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if "alpha" in kwargs:
                if new in kwargs:
                    raise BayesLMMError(f"{func.__qualname__}() got both `alpha` and `{new}`; `{new}` = 1 − alpha "
                                        f"replaces `alpha`: pass only `{new}`")
                warnings.warn(f"{func.__qualname__}(): `alpha` is replaced by `{new}` = 1 − alpha (alpha=0.05 is "
                              f"{new}=0.95); `alpha` will be removed in a future release (see docs/vocabulary.md)",
                              FutureWarning, stacklevel=2)
                kwargs[new] = 1.0 - kwargs.pop("alpha")
            return func(*args, **kwargs)

        return wrapper

    return decorate


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        raise BayesLMMError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")
    return float(value)


def _tail_prob(counts, n: int, p) -> np.ndarray:
    """Two-sided binomial tail probability of each count: 2·min(P(X ≤ c), P(X ≥ c)), at most 1."""
    lower = stats.binom.cdf(counts, n, p)
    upper = stats.binom.sf(np.asarray(counts) - 1, n, p)
    return np.minimum(1.0, 2.0 * np.minimum(lower, upper))


def _ecdf_counts(ranks: np.ndarray, n_ranks: int) -> np.ndarray:
    """#{rank < k} for k = 1..L: the ECDF (times N) at z_k = k/(L+1), the rank grid."""
    ranks = np.asarray(ranks)
    if ranks.ndim == 1:
        return np.cumsum(np.bincount(ranks, minlength=n_ranks + 1))[:-1]
    rows = ranks.shape[0]
    flat = (ranks + (n_ranks + 1) * np.arange(rows)[:, None]).ravel()
    counts = np.bincount(flat, minlength=rows * (n_ranks + 1)).reshape(rows, n_ranks + 1)
    return np.cumsum(counts, axis=1)[:, :-1]


def ecdf_statistic(ranks, n_ranks: int) -> float:
    """Säilynoja et al.'s statistic: the smallest pointwise two-sided binomial tail probability of the ECDF.

    Under uniformity the count of ranks below k is Binomial(N, k/(L+1)) at every k;
    small values mean the ECDF strays from the diagonal somewhere.
    """
    ranks = np.asarray(ranks, dtype=int)
    z = np.arange(1, n_ranks + 1) / (n_ranks + 1)
    return float(np.min(_tail_prob(_ecdf_counts(ranks, n_ranks), len(ranks), z)))


@lru_cache(maxsize=32)
def _null_statistics(n: int, n_ranks: int, n_null: int, random_seed: int) -> np.ndarray:
    """The statistic over ``n_null`` samples of ``n`` exactly uniform ranks on 0..L (sorted)."""
    rng = np.random.default_rng(random_seed)
    z = np.arange(1, n_ranks + 1) / (n_ranks + 1)
    out = np.empty(n_null)
    chunk = max(1, 2_000_000 // max(n, n_ranks))
    for start in range(0, n_null, chunk):
        m = min(chunk, n_null - start)
        counts = _ecdf_counts(rng.integers(0, n_ranks + 1, size=(m, n)), n_ranks)
        out[start:start + m] = _tail_prob(counts, n, z).min(axis=1)
    return np.sort(out)


@_alpha_as_ci_prob()
@renamed_kwargs(seed="random_seed")
def ecdf_test(ranks, n_ranks: int, *, ci_prob: float = 0.95, n_null: int = 10_000, random_seed: int = 1) -> dict:
    """The ECDF uniformity test with a simultaneous ``ci_prob`` band (Säilynoja, Bürkner & Vehtari 2022).

    The band level γ is the (1 − ci_prob)-quantile of the statistic under exact discrete
    uniformity (simulated), so the whole ECDF stays inside the pointwise γ-level
    binomial bands with probability ≥ ci_prob (their 1 − α with α = 1 − ci_prob; ``alpha``
    is the old argument).  Returns the statistic, γ, the p-value (the statistic's null
    CDF at the observed value) and whether the ECDF leaves the band.
    """
    ci_prob = _probability("ci_prob", ci_prob)
    ranks = np.asarray(ranks, dtype=int)
    null = _null_statistics(len(ranks), int(n_ranks), int(n_null), int(random_seed))
    t = ecdf_statistic(ranks, n_ranks)
    gamma = float(np.quantile(null, 1.0 - ci_prob))
    p = (1 + np.searchsorted(null, t, side="right")) / (len(null) + 1)
    return {"statistic": t, "gamma": gamma, "p_value": float(min(1.0, p)), "outside_band": bool(t < gamma)}


@_alpha_as_ci_prob()
@renamed_kwargs(seed="random_seed")
def ecdf_band(n: int, n_ranks: int, *, ci_prob: float = 0.95, n_null: int = 10_000, random_seed: int = 1):
    """The simultaneous ``ci_prob`` band of the ECDF of ``n`` ranks on 0..L at the points z_k = k/(L+1).

    Returns ``z``, ``lower`` and ``upper`` as fractions: the ECDF of uniform ranks lies
    within [lower, upper] at every z at once with probability ≥ ci_prob.
    """
    ci_prob = _probability("ci_prob", ci_prob)
    null = _null_statistics(int(n), int(n_ranks), int(n_null), int(random_seed))
    gamma = float(np.quantile(null, 1.0 - ci_prob))
    z = np.arange(1, n_ranks + 1) / (n_ranks + 1)
    c = np.arange(n + 1)[:, None]
    inside = _tail_prob(c, n, z[None, :]) >= gamma                 # (n+1, L): counts inside the band
    lower = np.argmax(inside, axis=0)
    upper = n - np.argmax(inside[::-1], axis=0)
    return z, lower / n, upper / n


def chi2_uniformity(ranks, n_ranks: int, bins: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Chi-square test of uniform ranks on 0..L in ``bins`` bins of consecutive ranks.

    Expected counts are exact (the number of rank values in each bin), so bins need
    not divide L + 1.  Returns (statistic, p-value, observed, expected).
    """
    ranks = np.asarray(ranks, dtype=int)
    if not 2 <= bins <= n_ranks + 1:
        raise BayesLMMError(f"bins must be between 2 and n_ranks + 1 = {n_ranks + 1}, got {bins}")
    edges = np.round(np.linspace(0, n_ranks + 1, bins + 1)).astype(int)
    observed = np.histogram(ranks, bins=edges - 0.5)[0]
    expected = len(ranks) * np.diff(edges) / (n_ranks + 1)
    chi2, p = stats.chisquare(observed, expected)
    return float(chi2), float(p), observed, expected


@renamed_kwargs(ci="ci_prob")
def coverage_interval(k: int, n: int, ci_prob: float = 0.99) -> tuple[float, float]:
    """Clopper–Pearson interval of a proportion k/n with probability ``ci_prob``."""
    r = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=ci_prob, method="exact")
    return float(r.low), float(r.high)


@dataclass(frozen=True)
class SBCResult:
    """The records of an SBC run: one row per simulation.

    Columns: ``sim``, ``sampler_seed``; per quantity ``rank:{q}`` (0..n_ranks),
    ``truth:{q}`` and ``in{50,90}:{q}`` (the truth inside the central interval of all
    draws); ``divergences``, ``min_ess_bulk``, ``max_rhat``, ``seconds``.
    """

    records: pd.DataFrame
    n_ranks: int
    quantities: tuple[str, ...]
    ci_probs: tuple[float, ...] = (0.5, 0.9)

    levels = _old_attribute("levels", "ci_probs")

    @classmethod
    @renamed_kwargs(levels="ci_probs")
    def from_records(cls, records: pd.DataFrame, n_ranks: int, quantities=None, ci_probs=(0.5, 0.9)) -> "SBCResult":
        if quantities is None:
            quantities = [c.split(":", 1)[1] for c in records.columns if c.startswith("rank:")]
        recs = records.sort_values("sim").reset_index(drop=True) if len(records) else records
        return cls(records=recs, n_ranks=int(n_ranks), quantities=tuple(quantities), ci_probs=tuple(ci_probs))

    @property
    def ranks(self) -> pd.DataFrame:
        return pd.DataFrame({q: self.records[f"rank:{q}"].astype(int).to_numpy() for q in self.quantities})

    @property
    def truth(self) -> pd.DataFrame:
        return pd.DataFrame({q: self.records[f"truth:{q}"].to_numpy() for q in self.quantities})

    def uniformity(self, bins: int = 5) -> pd.DataFrame:
        """Chi-square test of uniform ranks per quantity."""
        rows = []
        for q in self.quantities:
            chi2, p, obs, _ = chi2_uniformity(self.ranks[q], self.n_ranks, bins)
            rows.append((q, chi2, p, obs.tolist()))
        return pd.DataFrame(rows, columns=["quantity", "chi2", "p_value", "counts"]).set_index("quantity")

    @_alpha_as_ci_prob()
    def ecdf(self, *, ci_prob: float = 0.95, n_null: int = 10_000) -> pd.DataFrame:
        """The ECDF test with a simultaneous ``ci_prob`` band per quantity (:func:`ecdf_test`)."""
        rows = [{"quantity": q, **ecdf_test(self.ranks[q], self.n_ranks, ci_prob=ci_prob, n_null=n_null)}
                for q in self.quantities]
        return pd.DataFrame(rows).set_index("quantity")

    @renamed_kwargs(ci="ci_prob")
    def coverage(self, ci_prob: float = 0.99) -> pd.DataFrame:
        """Observed coverage of each central interval with its Clopper–Pearson interval of probability ``ci_prob``."""
        rows = []
        n = len(self.records)
        for q in self.quantities:
            for p in self.ci_probs:
                k = int(self.records[f"in{_pct(p)}:{q}"].astype(bool).sum())
                lo, hi = coverage_interval(k, n, ci_prob)
                rows.append((q, p, k, n, k / n, lo, hi, lo <= p <= hi))
        return pd.DataFrame(rows, columns=["quantity", "nominal", "covered", "n", "coverage", "ci_low", "ci_high",
                                           "consistent"])

    @_alpha_as_ci_prob("band_ci_prob")
    @renamed_kwargs(ci="coverage_ci_prob")
    def table(self, bins: int = 10, *, band_ci_prob: float = 0.95, coverage_ci_prob: float = 0.99) -> pd.DataFrame:
        """One row per quantity: chi-square p, ECDF p and band verdict, each coverage with its interval.

        Two intervals, two probabilities: ``band_ci_prob`` of the ECDF test's simultaneous
        band (formerly ``alpha`` = 1 − band_ci_prob) and ``coverage_ci_prob`` of each
        coverage's Clopper–Pearson interval (formerly ``ci``).
        """
        chi = self.uniformity(bins)
        ec = self.ecdf(ci_prob=band_ci_prob)
        cov = self.coverage(coverage_ci_prob)
        out = pd.DataFrame(index=pd.Index(self.quantities, name="quantity"))
        out["chi2_p"] = chi["p_value"]
        out["ecdf_p"] = ec["p_value"]
        out["ecdf_inside_band"] = ~ec["outside_band"]
        for p in self.ci_probs:
            c = cov[cov.nominal == p].set_index("quantity")
            out[f"cov{_pct(p)}"] = c["coverage"]
            out[f"cov{_pct(p)}_low"] = c["ci_low"]
            out[f"cov{_pct(p)}_high"] = c["ci_high"]
            out[f"cov{_pct(p)}_ok"] = c["consistent"]
        return out
