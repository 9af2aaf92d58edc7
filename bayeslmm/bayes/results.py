"""The Bayesian fit: an ArviZ DataTree plus tables laid out like the REML fit's."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import xarray as xr

from ..deprecation import callable_for_old_calls
from ..errors import BayesLMMError, DataError
from ..group_frames import coef_frames, frames_by_group, posterior_ci_prob, with_intervals
from ..results_api import confint_labels
from ..spec import ModelSpec
from . import diagnostics as diag_mod
from . import naming
from .priors import PriorSet

SUMMARY_COLUMNS = ["mean", "sd", "median", "lower", "upper", "r_hat", "ess_bulk", "ess_tail"]
#: a posterior summary's columns in the shared tables (``fixef_table``, ``varcorr_table``): the
#: core ``estimate, std_error, lower, upper`` first, as FreqFit's
TABLE_NAMES = {"mean": "estimate", "sd": "std_error"}
TABLE_COLUMNS = ["estimate", "std_error", "lower", "upper", "median", "r_hat", "ess_bulk", "ess_tail"]
#: the routes a NUTS fit can have run (``fit.route``; ``fit(method="nuts", route=...)`` in bayes/fit.py)
RAN_ROUTES = ("one-factor", "blocked", "partial", "structured", "graph", "graph-explicit")


def route_of(backend: str | None, parameterization: str) -> str:
    """The route a fit ran, from what fits recorded before ``fit.route``: ``timings["backend"]`` (the
    engine; absent from fits made elsewhere, e.g. :meth:`BayesFit.from_pymc`) and the parameterisation."""
    if backend == "kernel":
        return "one-factor"
    if backend in ("blocked", "partial", "structured"):
        return backend
    return "graph-explicit" if parameterization == "explicit" else "graph"


def summarize_draws(draws: dict[str, np.ndarray], ci_prob: float | None = None) -> pd.DataFrame:
    """Posterior summary of named (chain, draw) arrays with ArviZ's diagnostics.

    The interval is ArviZ 1.x's default (an 89 % equal-tailed interval) unless
    ``ci_prob`` is given.
    """
    import arviz as az

    ds = xr.Dataset({k: (("chain", "draw"), np.asarray(v, dtype=float)) for k, v in draws.items()})
    s = az.summary(ds, kind="all", ci_prob=ci_prob, round_to="none")
    lower = [c for c in s.columns if c.endswith("_lb")][0]
    upper = [c for c in s.columns if c.endswith("_ub")][0]
    med = pd.Series({k: float(np.median(v)) for k, v in draws.items()})
    out = pd.DataFrame({"mean": s["mean"].astype(float), "sd": s["sd"].astype(float), "median": med,
                        "lower": s[lower].astype(float), "upper": s[upper].astype(float),
                        "r_hat": s["r_hat"].astype(float), "ess_bulk": s["ess_bulk"].astype(float),
                        "ess_tail": s["ess_tail"].astype(float)})
    out.attrs["interval"] = lower[: -len("_lb")]
    return out


def _quantile_stat(p: float) -> str:
    """The stored summary column of quantile ``p`` (effects kept as summaries only)."""
    from .posterior import SUMMARY_PROBS

    for sp in SUMMARY_PROBS:
        if abs(sp - p) < 1e-9:
            return f"q{100 * sp:g}"
    probs = sorted({round(abs(b - a), 6) for a in SUMMARY_PROBS for b in SUMMARY_PROBS if abs(a + b - 1) < 1e-9})
    raise BayesLMMError(f"this fit kept the effects as per-level summaries (effects='summary'): intervals are "
                        f"available for ci_prob in {[x for x in probs if x > 0]}; use one of those, or "
                        "effect_draws(levels=...) for the draws")


def _check_pymc_draws(spec: ModelSpec, names: list[str], post: xr.Dataset) -> None:
    """Refuse draws that are not from this model's ``pymc_model()``: every variable, with its labels."""
    wanted = {"beta": ("coef", list(spec.fixed_names)), "sigma": None}
    for name, block in zip(names, spec.blocks):
        wanted[naming.sd_var(name)] = (naming.effect_dim(name), list(block.columns))
        wanted[name] = (naming.level_dim(name), list(block.levels))
        if block.correlated and block.q > 1:
            wanted[naming.corr_var(name)] = (naming.pair_dim(name), naming.pair_labels(list(block.columns)))
    missing = [v for v in wanted if v not in post]
    if missing:
        hint = (" (draws from the collapsed parameterisation lack the first block's effects: sample "
                "pymc_model(parameterization='explicit'), or use fit(method='nuts'))"
                if missing == [names[0]] else "")
        raise BayesLMMError(f"these draws are not from this model's pymc_model(): the posterior lacks {missing}"
                            f"{hint}; it has {sorted(map(str, post.data_vars))}")
    for var, want in wanted.items():
        if want is None:
            continue
        dim, labels = want
        got = [str(v) for v in post[var].coords[dim].to_numpy()] if dim in post[var].coords else None
        if got != labels:
            raise BayesLMMError(f"the draws' {var!r} has {dim} {got}, but this model's are {labels}: "
                                "sample the PyMC model of this very Model (same formula and data)")


def _check_draws_match_spec(idata, spec: ModelSpec, source: str) -> None:
    """The response and design rebuilt from stored data must be the ones the draws were made from."""
    checks = [("observed_data", "y", spec.y), ("constant_data", "X", spec.X)]
    for group, var, value in checks:
        if group in idata.children and var in idata[group].dataset:
            stored = np.asarray(idata[group].dataset[var].values)
            if stored.shape != value.shape or not np.array_equal(stored, value):
                raise DataError(f"{source}: the {var} rebuilt from the stored data differs from the {group} the "
                                "draws were made from; the file was altered or saved by another bayeslmm version")


def _reported_draws(spec: ModelSpec, names: list[str], post: xr.Dataset) -> xr.Dataset:
    """The posterior of ``pymc_model()``'s draws, checked, without the model's internal variables."""
    _check_pymc_draws(spec, names, post)
    internal = {"beta_c"} | {f"{n}{suffix}" for n in names
                             for suffix in ("_z", "_chol_cov", "_chol_cov_corr", "_chol_cov_stds")}
    drop = [v for v in post.data_vars if str(v) in internal or str(v).startswith("beta_c[")]
    return post.drop_vars(drop)


def _with_residual(spec: ModelSpec, structure: dict, source: str) -> ModelSpec:
    """``spec`` rebuilt from a save, with the residual structure the save describes."""
    from dataclasses import replace

    from ..residual import check_nested, from_record

    res = from_record(structure)
    if len(res.frame) != spec.n_obs:
        raise DataError(f"{source}: the saved residual structure has {len(res.frame)} rows, the model {spec.n_obs}")
    check_nested(res, spec.blocks)
    return replace(spec, residual=res)


def _rows_frame(newdata, n_rows: int) -> pd.DataFrame:
    """``newdata`` (a DataFrame or a dict of columns) as a frame of the ``n_rows`` rows predicted."""
    frame = newdata if isinstance(newdata, pd.DataFrame) else pd.DataFrame(dict(newdata))
    if len(frame) != n_rows:  # the design keeps every row or refuses; a mismatch is a bug here
        raise BayesLMMError(f"newdata has {len(frame)} rows, its design {n_rows}")
    return frame


def _shared_table(summary: pd.DataFrame, prob: float) -> pd.DataFrame:
    """A :func:`summarize_draws` frame with the shared tables' names and column order."""
    out = summary[SUMMARY_COLUMNS].rename(columns=TABLE_NAMES)[TABLE_COLUMNS]
    out.attrs = {"ci_prob": prob, "interval": summary.attrs.get("interval")}
    return out


@dataclass(frozen=True, eq=False)
class BayesFit:
    """A posterior sample of a linear mixed model.

    Attributes
    ----------
    spec : ModelSpec
    idata : xarray.DataTree
        ArviZ's container: ``posterior``, ``sample_stats``, ``observed_data``,
        ``constant_data`` and (unless too large) a pointwise ``log_likelihood``.
    priors : PriorSet
    parameterization : {"collapsed", "explicit"}
        The older name of what ``route`` says: ``"explicit"`` for ``"graph-explicit"`` (every
        effect sampled), ``"collapsed"`` otherwise.
    sampler : {"pymc", "nutpie"}
    seed : int
        The seed the draws came from (reuse it to reproduce them).
    residual_structure : dict or None
        The residual structure's description (``ResidualModel.describe``; what a save
        keeps to rebuild it), None for R = σ²I.  Its parameters' draws are the posterior's
        ``residual_*`` variables (:meth:`residual_table`).
    timings : dict
        Seconds spent building, sampling and post-processing; ``timings["backend"]`` is the older
        name of the route (``"kernel"`` for ``"one-factor"``, ``"pytensor"`` for either graph).
    route : {"one-factor", "blocked", "partial", "structured", "graph", "graph-explicit"}
        The route that sampled the posterior (``fit(method="nuts", route=...)``, docs/bayes.md);
        when not given, inferred from ``timings["backend"]`` and ``parameterization``.
    """

    spec: ModelSpec
    idata: object
    priors: PriorSet
    names: list[str]
    parameterization: str
    sampler: str
    seed: int
    data_name: str | None = None
    timings: dict = field(default_factory=dict)
    residual_structure: dict | None = None
    route: str | None = None

    def __post_init__(self):
        if self.route is None:  # fits recorded before the route was (and draws sampled elsewhere)
            object.__setattr__(self, "route", route_of((self.timings or {}).get("backend"), self.parameterization))
        elif self.route not in RAN_ROUTES:
            raise BayesLMMError(f"route must be one of {list(RAN_ROUTES)}, got {self.route!r}")

    @classmethod
    def from_pymc(cls, model, idata, priors: dict | None = None, random_seed: int = 0,
                  warn: bool = True) -> "BayesFit":
        """Wrap draws made from ``Model.pymc_model()`` into a fit (``summary()``, ``fixef``, ``ranef()`` ...).

        Parameters
        ----------
        model : bayeslmm.Model or ModelSpec
            The model whose ``pymc_model(priors=...)`` was sampled (explicit
            parameterisation: the collapsed model's draws lack the first block's effects).
        idata : xarray.DataTree
            What ``pm.sample()`` returned (any sampler): a ``posterior`` with ``beta``,
            ``sigma``, each block's ``{g}_sd`` (and ``{g}_corr``) and effects ``{g}``.
        priors : dict, optional
            The ``priors`` the PyMC model was built with; they are what
            ``prior_summary()`` reports (draws do not record their priors).
        random_seed : int
            The fit's seed for later draws (posterior predictive noise, new groups):
            ``pm.sample``'s own seed is not recorded in the DataTree.
        warn : bool
            Warn about failed convergence diagnostics, as ``fit()`` does.

        The returned fit's ``idata`` is a shallow copy of ``idata`` whose posterior
        leaves out the model's internal variables (``beta_c``, ``*_z``, ``*_chol_cov``)
        and keeps the rest (``mu`` included); a pointwise ``log_likelihood`` is added
        when absent, under the same size limit as ``fit()``.
        """
        from .posterior import MAX_LOGLIK_VALUES, independent_rows, pointwise_loglik
        from .priors import resolve_priors

        spec = getattr(model, "spec", model)
        if not isinstance(spec, ModelSpec):
            raise BayesLMMError(f"model must be a bayeslmm Model (or its ModelSpec), got {type(model).__name__}")
        if isinstance(random_seed, bool) or not isinstance(random_seed, (int, np.integer)) or random_seed < 0:
            raise BayesLMMError(f"random_seed must be a non-negative integer, got {random_seed!r}")
        children = getattr(idata, "children", None)
        if children is None or "posterior" not in children or "sample_stats" not in children:
            raise BayesLMMError("idata must be the DataTree pm.sample() returns, with 'posterior' and "
                                f"'sample_stats' groups; got {type(idata).__name__}")
        names = naming.block_names(spec)
        post = _reported_draws(spec, names, idata["posterior"].to_dataset())
        dt = idata.copy()
        dt["posterior"] = xr.DataTree(post)
        n_values = spec.n_obs * post.sizes["chain"] * post.sizes["draw"]
        if ("log_likelihood" not in dt.children and spec.rows_in_memory and n_values <= MAX_LOGLIK_VALUES
                and independent_rows(spec)):
            dt["log_likelihood"] = xr.DataTree(pointwise_loglik(spec, post, names))
        sampler = str(post.attrs.get("inference_library", "pymc"))
        timings = {"sample": post.attrs["sampling_time"]} if "sampling_time" in post.attrs else {}
        fit = cls(spec=spec, idata=dt, priors=resolve_priors(spec, priors), names=names,
                  parameterization="explicit", sampler=sampler, seed=int(random_seed),
                  data_name=getattr(model, "data_name", None), timings=timings)
        if warn:
            diag_mod.warn(fit.diagnostics(), stacklevel=3)
        return fit

    #: every point value of this fit is a posterior mean; see :class:`bayeslmm.results_api.MixedFit`
    point_estimate = "posterior mean"

    @property
    def method(self) -> str:
        return "NUTS"

    @property
    def default_ci_prob(self) -> float:
        """The interval probability used when ``ci_prob`` is omitted: ArviZ's ``stats.ci_prob`` (0.89)."""
        return posterior_ci_prob(None)

    @property
    def nobs(self) -> int:
        return self.spec.n_obs

    @property
    def sigma(self) -> float:
        """Posterior mean of the residual standard deviation σ."""
        return float(self.posterior["sigma"].mean())

    @property
    def posterior(self) -> xr.Dataset:
        return self.idata["posterior"].to_dataset()

    @property
    def n_draws(self) -> int:
        post = self.posterior
        return post.sizes["chain"] * post.sizes["draw"]

    # -- tables ---------------------------------------------------------------
    @property
    def fixef(self) -> pd.Series:
        """Posterior means of the fixed effects: a Series indexed by coefficient, named ``estimate``.

        As ``FreqFit.fixef`` and brms's ``fixef()`` "Estimate" (the posterior mean).
        :meth:`fixef_table` gives the posterior summary.  Calling it as the method it
        was (``fit.fixef()``, ``fit.fixef(ci_prob)``) still returns the old summary
        frame, with a ``FutureWarning``.
        """
        beta = self.posterior["beta"].mean(("chain", "draw"))
        names = list(self.spec.fixed_names)
        value = pd.Series(beta.sel(coef=names).to_numpy(), index=names, name="estimate")
        return callable_for_old_calls(value, self._fixef_summary,
                                      "BayesFit.fixef is now a property (posterior means), as FreqFit's; "
                                      "use fixef_table(ci_prob) for the posterior summary")

    def _fixef_summary(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior summary of the fixed effects (columns :data:`SUMMARY_COLUMNS`)."""
        beta = self.posterior["beta"]
        draws = {name: beta.sel(coef=name).to_numpy() for name in self.spec.fixed_names}
        return summarize_draws(draws, ci_prob)

    def fixef_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior summary per coefficient: ``estimate`` (mean), ``std_error`` (posterior sd), the
        equal-tailed ``ci_prob`` interval ``lower, upper`` (default ArviZ's 0.89), then ``median, r_hat,
        ess_bulk, ess_tail``; ``attrs["ci_prob"]``."""
        prob = posterior_ci_prob(ci_prob)
        return _shared_table(self._fixef_summary(prob), prob)

    def _varcorr_draws(self) -> tuple[list[tuple], dict[str, np.ndarray]]:
        post = self.posterior
        rows, draws = [], {}
        for name, block in zip(self.names, self.spec.blocks):
            sd = post[naming.sd_var(name)].to_numpy()
            for i, col in enumerate(block.columns):
                key = f"{name}|{col}"
                rows.append((key, block.group, col, None))
                draws[key] = sd[..., i]
            if block.correlated and block.q > 1:
                corr = naming.correlation_matrices(post, name, block.q)
                for i, j in zip(*naming.pair_index(block.q)):
                    key = f"{name}|{block.columns[i]}|{block.columns[j]}"
                    rows.append((key, block.group, block.columns[i], block.columns[j]))
                    draws[key] = corr[..., j, i]
        rows.append(("sigma", "Residual", None, None))
        draws["sigma"] = post["sigma"].to_numpy()
        return rows, draws

    def block_covariances(self) -> list[np.ndarray]:
        """Posterior mean of each block's covariance Σ (q × q), in ``spec.blocks`` order."""
        return [cov.mean(axis=(0, 1)) for cov in self.block_covariance_draws()]

    @property
    def varcorr(self) -> pd.DataFrame:
        """Variance components as ``FreqFit.varcorr``: columns ``grp, var1, var2, vcov, sdcor``.

        ``sdcor`` is the posterior mean of each sd (``var2`` missing) or correlation,
        ``vcov`` the posterior mean of the variance or covariance (per draw
        sd_i·sd_j·corr_ij), so ``vcov`` is not ``sdcor**2``; the residual row is last.
        :meth:`varcorr_table` gives the posterior summary.  Calling it as the method it
        was (``fit.varcorr()``) still returns the old summary frame, with a ``FutureWarning``.
        """
        rows, draws = self._varcorr_draws()
        out = []
        for key, g, v1, v2 in rows:
            if v2 is None:  # an sd or σ
                cov = draws[key] ** 2
            else:  # key is f"{block}|{v1}|{v2}"; the block's sds are f"{block}|{v1}", f"{block}|{v2}"
                block = key[: -len(f"|{v1}|{v2}")]
                cov = draws[key] * draws[f"{block}|{v1}"] * draws[f"{block}|{v2}"]
            out.append((g, v1, v2, float(np.mean(cov)), float(np.mean(draws[key]))))
        value = pd.DataFrame(out, columns=["grp", "var1", "var2", "vcov", "sdcor"])
        return callable_for_old_calls(value, self._varcorr_summary,
                                      "BayesFit.varcorr is now a property (posterior means), as FreqFit's; "
                                      "use varcorr_table(ci_prob) for the posterior summary")

    def varcorr_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior summary of every sd, correlation and σ, rows as :attr:`varcorr`.

        Columns ``grp, var1, var2, estimate, lower, upper`` (estimate: the posterior
        mean of the sd or correlation; the equal-tailed ``ci_prob`` interval, default
        ArviZ's 0.89), then ``std_error, median, r_hat, ess_bulk, ess_tail``;
        ``attrs["ci_prob"]``.
        """
        prob = posterior_ci_prob(ci_prob)
        old = self._varcorr_summary(prob)
        table = _shared_table(old[SUMMARY_COLUMNS], prob)
        out = pd.concat([old[["grp", "var1", "var2"]], table], axis=1)
        first = ["grp", "var1", "var2", "estimate", "lower", "upper"]
        out = out[first + [c for c in out.columns if c not in first]]
        out.attrs = dict(table.attrs)
        return out

    def residual_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior summary of the residual structure's parameters (rows ``residual_Phi``,
        ``residual_power``, ``residual_<level>`` …, on nlme's scale), columns as :meth:`fixef_table`;
        empty for R = σ²I."""
        prob = posterior_ci_prob(ci_prob)
        names = naming.residual_vars(self.spec)
        if not names:
            return pd.DataFrame(columns=TABLE_COLUMNS)
        return _shared_table(summarize_draws({n: self.posterior[n].to_numpy() for n in names}, prob), prob)

    def confint(self, ci_prob: float = 0.95) -> pd.DataFrame:
        """Equal-tailed posterior intervals, rows and columns as ``FreqFit.confint``.

        Rows ``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``, ``sigma`` (in
        the order of :attr:`varcorr`), then the fixed effects; columns ``estimate``
        (posterior mean), ``lower, upper``.  There is no ``method``: a posterior has one
        kind of interval here.
        """
        prob = posterior_ci_prob(ci_prob)
        vc, fe = self.varcorr_table(prob), self.fixef_table(prob)
        cols = ["estimate", "lower", "upper"]
        var = vc[cols].set_axis(confint_labels(vc), axis=0)
        out = pd.concat([var, fe[cols]])
        out.index.name = "parameter"
        out.attrs.update(ci_prob=prob, method="posterior", notes=[])
        return out

    def _varcorr_summary(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior summary of every sd and correlation (``grp, var1, var2`` then :data:`SUMMARY_COLUMNS`)."""
        rows, draws = self._varcorr_draws()
        s = summarize_draws(draws, ci_prob)
        out = pd.DataFrame(rows, columns=["key", "grp", "var1", "var2"]).set_index("key")
        out = out.join(s)
        out.index.name = None
        out = out.reset_index(drop=True)
        out.attrs["interval"] = s.attrs["interval"]
        return out

    # -- the random effects' draws, stored or summarised ---------------------------
    def effects_stored(self, block: int | str = 0) -> bool:
        """Whether every draw of a block's effects is in the posterior (see ``fit(effects=...)``)."""
        k = self._block_index(block)
        return self.names[k] in self.posterior

    def _block_index(self, block: int | str) -> int:
        if isinstance(block, str):
            if block not in self.names:
                raise BayesLMMError(f"no random-effect block {block!r}; the blocks are {self.names}")
            return self.names.index(block)
        if not 0 <= int(block) < len(self.names):
            raise BayesLMMError(f"block index {block!r} out of range: the model has {len(self.names)} block(s)")
        return int(block)

    def effect_draws(self, block: int | str = 0, levels=None) -> xr.DataArray:
        """Draws (chain, draw, level, column) of one block's effects, for ``levels`` (all when None).

        When the fit kept only per-level summaries of its largest block
        (``effects="summary"``, the default for very many levels), the draws of the
        requested levels are recomputed exactly: they are the draws a fit with
        ``effects="draws"`` and the same seed stores.
        """
        from .posterior import effect_draws

        k = self._block_index(block)
        name = self.names[k]
        if k == 0:
            return effect_draws(self, levels)
        da = self.posterior[name]
        return da if levels is None else da.sel({naming.level_dim(name): [str(v) for v in levels]})

    def _effect_summary(self, k: int) -> xr.DataArray | None:
        from .posterior import EFFECTS_GROUP

        name = self.names[k]
        if name in self.posterior or EFFECTS_GROUP not in self.idata.children:
            return None
        return self.idata[EFFECTS_GROUP][name]

    def effect_means(self, block: int | str = 0) -> np.ndarray:
        """Posterior means (levels × columns) of one block's effects, stored draws or not."""
        k = self._block_index(block)
        summ = self._effect_summary(k)
        if summ is not None:
            return summ.sel(stat="mean").to_numpy()
        return self.posterior[self.names[k]].mean(("chain", "draw")).to_numpy()

    def _effect_intervals(self, k: int, prob: float) -> tuple[np.ndarray, ...]:
        """Posterior mean, sd and equal-tailed ``prob`` interval (levels × columns) of block ``k``."""
        summ = self._effect_summary(k)
        if summ is not None:  # kept as summaries: only the stored quantiles exist
            return (summ.sel(stat="mean").to_numpy(), summ.sel(stat="sd").to_numpy(),
                    summ.sel(stat=_quantile_stat((1 - prob) / 2)).to_numpy(),
                    summ.sel(stat=_quantile_stat((1 + prob) / 2)).to_numpy())
        block = self.spec.blocks[k]
        d = self.posterior[self.names[k]].to_numpy().reshape(-1, block.n_levels, block.q)
        lo, hi = np.quantile(d, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
        return d.mean(0), d.std(0, ddof=1), lo, hi

    def ranef(self, ci_prob: float | None = None) -> dict[str, pd.DataFrame]:
        """Posterior means of the random effects, one frame per grouping factor (levels × columns).

        Keyed by the group as written in the formula; a factor's blocks
        (``(1|g) + (0 + x|g)``) share one frame, columns in model order (as
        ``FreqFit.ranef``).  With ``ci_prob``, each frame has two column levels,
        ``("estimate" | "lower" | "upper", column)``, as ``FreqFit.ranef``'s: the
        posterior means and the equal-tailed posterior interval (``frame["estimate"]``
        is the frame returned without it).
        A fit that kept its effects as summaries (``effects="summary"``) has the
        50, 90 and 95 % intervals only, and says so for others.
        """
        if ci_prob is None:
            return frames_by_group(self.spec, [self.effect_means(k) for k in range(len(self.names))])
        prob = posterior_ci_prob(ci_prob)
        parts = [self._effect_intervals(k, prob) for k in range(len(self.names))]
        return with_intervals(self.spec, [p[0] for p in parts], [p[2] for p in parts], [p[3] for p in parts],
                              "estimate", prob)

    def coef(self) -> dict[str, pd.DataFrame]:
        """Posterior means of fixed plus random effects per level, like lme4's ``coef`` (and ``FreqFit.coef``).

        One frame per grouping factor (levels × fixed-effect names, plus any random
        column with no fixed counterpart); blocks on one factor are added together.
        """
        beta = self.posterior["beta"].mean(("chain", "draw"))
        fe = pd.Series(beta.sel(coef=list(self.spec.fixed_names)).to_numpy(), index=list(self.spec.fixed_names))
        return coef_frames(self.spec, fe, [self.effect_means(k) for k in range(len(self.names))])

    def ranef_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Long table, one row per effect: ``grpvar`` (the group as written), ``term``, ``grp`` (the
        level), ``estimate`` and ``std_error`` (the posterior mean and sd: the columns every fit's
        ``ranef_table`` starts with), the equal-tailed ``ci_prob`` interval ``lower``, ``upper``, and
        ``mean``, ``sd`` (the same numbers under ArviZ's names)."""
        prob = posterior_ci_prob(ci_prob)
        parts = []
        for k, block in enumerate(self.spec.blocks):
            mean, sd, lo, hi = self._effect_intervals(k, prob)
            for a, col in enumerate(block.columns):
                parts.append(pd.DataFrame({"grpvar": block.group, "term": col, "grp": list(block.levels),
                                           "estimate": mean[:, a], "std_error": sd[:, a],
                                           "lower": lo[:, a], "upper": hi[:, a], "mean": mean[:, a],
                                           "sd": sd[:, a]}))
        out = pd.concat(parts, ignore_index=True)
        out.attrs["ci_prob"] = prob
        return out

    # -- observations ------------------------------------------------------------
    @property
    def fitted(self) -> pd.Series:
        """Posterior mean of the conditional means Xβ + Zb per row (``predict()["mean"]``).

        The model is linear in β and b, so this is X·E[β] + Z·E[b]: it needs no
        effect draws (a fit that kept only summaries has it too).
        """
        from ..predict import require_rows

        require_rows(self.spec, "fitted values (one per row)")
        mu = self.spec.X @ self.fixef.to_numpy()
        for k, block in enumerate(self.spec.blocks):
            mu = mu + np.einsum("nq,nq->n", block.Z, self.effect_means(k)[block.codes])
        return pd.Series(mu, index=self.spec.row_index, name="fitted")

    @property
    def residuals(self) -> pd.Series:
        """Response minus :attr:`fitted` (the posterior mean of y − Xβ − Zb)."""
        return pd.Series(self.spec.y - self.fitted.to_numpy(), index=self.spec.row_index, name="residuals")

    # -- predictions ------------------------------------------------------------
    def posterior_predictive(self, random_seed: int | None = None, *, newdata=None, kind: str = "conditional",
                             new_groups: str = "population") -> xr.DataArray:
        """Replicated responses y_rep = Xβ + Zb + ε, ε ~ N(0, σ²I) or N(0, σ²Λ_R(ρ)), one per posterior draw.

        For the training rows by default: the draws ArviZ's posterior predictive
        checks compare with the observed ``y``.  Those draws (``newdata`` omitted)
        are also stored as ``fit.idata["posterior_predictive"]`` (replacing any
        earlier ones), so ``arviz.plot_ppc_dist(fit.idata)`` works right after this
        call.  Draws for ``newdata`` are returned only: their rows are not the
        observed ones.  Each draw uses that draw's β, effects b and σ, and with a residual
        structure its parameters ρ (:meth:`predict_draws` says how ε is drawn then).

        Parameters
        ----------
        random_seed : int, optional
            Seed of the noise ε (and of new groups' effects).  ``None`` derives it from
            the fit's own seed, so repeated calls return the same draws.
        newdata, kind, new_groups
            As in :meth:`predict`.

        Returns
        -------
        xarray.DataArray named ``y`` with dims ``(chain, draw, obs)``; ``obs`` is the row
        position, and the coordinate ``row`` holds the data's index labels.
        """
        yrep = self._draws(newdata, kind, new_groups, True, random_seed)[0]
        if newdata is None:
            self._attach_predictive(yrep)
        return yrep

    def _attach_predictive(self, yrep: xr.DataArray) -> None:
        """Store training-row draws as the ``posterior_predictive`` group ArviZ's checks read."""
        self.idata["posterior_predictive"] = xr.DataTree(xr.Dataset({"y": yrep.drop_vars("row")}))

    def predict_draws(self, newdata=None, kind: str = "conditional", new_groups: str = "population",
                      predictive: bool = False, random_seed: int | None = None) -> xr.DataArray:
        """Per-draw predicted means (or, ``predictive=True``, new responses): DataArray (chain, draw, obs).

        With a residual structure a new response is the mean plus ε ~ N(0, σ²Λ_R(ρ)) of that
        draw (:mod:`bayeslmm.residual_draws`): a variance function is evaluated at each row
        (``newdata`` must have its column: a fitted level for VarIdent), and a correlation
        structure correlates the rows it puts in one group (``newdata`` must have the group
        and any time column; AR(1) without a time takes the rows' order within a group).  New
        rows' noise is a fresh series: it does not continue the training rows' residuals.
        """
        return self._draws(newdata, kind, new_groups, predictive, random_seed)[0]

    def _draws(self, newdata, kind: str, new_groups: str, predictive: bool, random_seed):
        """(draws (chain, draw, obs), the rows' design): means, or means plus the residual noise."""
        from ..predict import bayes_draws

        if not predictive or self.spec.residual is None:
            return bayes_draws(self, newdata, kind, new_groups, predictive, random_seed)
        from ..residual_draws import noise_draws
        from .posterior import residual_natural

        mu, d = bayes_draws(self, newdata, kind, new_groups, False, random_seed)
        frame = None if newdata is None else _rows_frame(newdata, d.n_rows)
        post = self.posterior
        # a stream of its own: new groups' effects (bayes_draws) come from the seed's stream 2 itself
        rng = self.random_stream(random_seed, 2).spawn(1)[0]
        eps = noise_draws(rng, self.spec.residual, residual_natural(self.spec, post), post["sigma"].to_numpy(), frame)
        y = mu.copy(data=mu.to_numpy() + eps.reshape(mu.shape)).rename("y")
        y.attrs["predictive"] = 1
        return y, d

    def predict(self, newdata=None, kind: str = "conditional", new_groups: str = "population",
                predictive: bool = False, ci_prob: float | None = None,
                random_seed: int | None = None) -> pd.DataFrame:
        """Posterior predictions: mean, sd, median and interval per row.

        Parameters
        ----------
        newdata : DataFrame or dict of columns, optional
            Rows to predict; the training rows when omitted.  The fixed-effect design
            is rebuilt with the training data's contrasts and levels; a missing
            column, a missing value or an unseen category of a fixed-effect factor
            raises a :class:`~bayeslmm.errors.DataError` naming the column.
        kind : {"conditional", "marginal"}
            Xβ + Zb (with the groups' effects) or Xβ (the population mean).
        new_groups : {"population", "sample", "error"}
            For grouping levels not seen in fitting: no effect (the population mean),
            effects drawn from the fitted distribution N(0, Σ) for each posterior draw
            (one draw per new level, shared by its rows), or an error.
        predictive : bool
            ``False``: the posterior of the mean (its interval is the uncertainty of
            the mean).  ``True``: posterior predictive draws of new observations,
            residual noise included (with a residual structure: see :meth:`predict_draws`).
        ci_prob : float, optional
            Probability of the equal-tailed interval (ArviZ's default, 0.89).
        random_seed : int, optional
            For ``predictive`` noise and sampled new groups; the fit's seed by default.

        Returns
        -------
        DataFrame indexed like ``newdata`` with columns ``mean, sd, median, lower, upper``;
        ``attrs`` records the kind, the interval and the unseen levels.
        """
        from ..predict import bayes_predict, new_levels_note, summarize_rows

        if not predictive or self.spec.residual is None:
            return bayes_predict(self, newdata, kind, new_groups, predictive, ci_prob, random_seed)
        prob = posterior_ci_prob(ci_prob)
        draws, d = self._draws(newdata, kind, new_groups, True, random_seed)
        out = summarize_rows(draws.to_numpy().reshape(-1, d.n_rows), d.index, prob)
        out.attrs.update(kind=kind, predictive=True, interval=f"eti{round(prob * 100):d}",
                         new_levels=new_levels_note(self.spec, d))
        return out

    def add_posterior_predictive(self, random_seed: int | None = None):
        """Store :meth:`posterior_predictive` draws as ``idata["posterior_predictive"]`` and return ``idata``.

        The same as calling ``fit.posterior_predictive(random_seed)`` (which stores
        them too); with the ``observed_data`` group already there, ArviZ's checks
        work on it: ``arviz.plot_ppc_dist(fit.add_posterior_predictive())``.
        Calling it again replaces the group.
        """
        self.posterior_predictive(random_seed)
        return self.idata

    def loo(self, pointwise: bool | None = None, **kwargs):
        """PSIS-LOO (Vehtari, Gelman & Gabry 2017) by ``arviz.loo`` on the stored pointwise log-likelihood.

        The log-likelihood is conditional on the drawn group effects (as brms stores
        it), so this estimates the predictive accuracy for new observations of the
        fitted groups.  Extra keyword arguments go to ``arviz.loo``.

        With a variance function or weights each row's term is log N(y_i | μ_i, σ² s_i²),
        computed here (and stored) when the fit did not store it; a correlation structure
        has no pointwise log-likelihood, and is refused with what would apply.
        """
        import arviz as az

        from .posterior import no_pointwise_loglik

        why = no_pointwise_loglik(self.spec)
        if why is not None:
            raise BayesLMMError(f"LOO is not available for this fit: {why}")
        if "log_likelihood" not in self.idata.children and self.spec.residual is not None:
            self._attach_loglik()
        if "log_likelihood" not in self.idata.children:
            from ..predict import require_rows

            require_rows(self.spec, "LOO (a pointwise log-likelihood over the rows)")
            raise BayesLMMError("this fit has no pointwise log-likelihood (it is skipped above 5e7 rows × draws); "
                                "refit with fit(method='nuts', log_likelihood=True) to use LOO")
        return az.loo(self.idata, pointwise=pointwise, var_name="y", **kwargs)

    def _attach_loglik(self) -> None:
        """Store the pointwise log-likelihood of a fit sampled without it, when the rows and effects allow."""
        from ..predict import require_rows
        from .posterior import MAX_LOGLIK_VALUES, pointwise_loglik

        require_rows(self.spec, "LOO (a pointwise log-likelihood over the rows)")
        if self.spec.n_obs * self.n_draws > MAX_LOGLIK_VALUES:
            raise BayesLMMError(f"LOO would need {self.spec.n_obs * self.n_draws:.2g} pointwise log-likelihood "
                                f"values (more than {MAX_LOGLIK_VALUES:.0e}); thin the draws first")
        self.idata["log_likelihood"] = xr.DataTree(pointwise_loglik(self.spec, self.posterior, self.names))

    # -- variance decomposition and R² -----------------------------------------------
    def block_covariance_draws(self) -> list[np.ndarray]:
        """Σ = L Lᵀ of each block per posterior draw: arrays (chain, draw, q, q), in ``spec.blocks`` order."""
        from .naming import cholesky_factors

        post = self.posterior
        out = []
        for name, block in zip(self.names, self.spec.blocks):
            L = cholesky_factors(post, name, block)
            out.append(np.einsum("cdab,cdeb->cdae", L, L))
        return out

    def variance_component_draws(self, at: dict | None = None) -> dict[str, np.ndarray]:
        """Per-draw variance of each grouping factor's part of Var(y) at ``at``, ``Residual`` and ``Total``.

        With a variance function (``variance=``, ``weights=``) ``Residual`` is σ² s² of a row at
        the values ``at`` gives its columns, else the mean of σ² s_i² over the rows, per draw:
        the REML fit's convention (``FreqFit.variance_components``; Nakagawa et al. 2017).
        """
        from .. import variance as V

        z = V.z_at(self.spec, at, also=V.residual_columns(self.spec))
        out = V.group_variances(self.spec, z, self.block_covariance_draws())
        out["Residual"] = self._residual_variance_draws(at)
        out["Total"] = sum(out.values())
        return out

    def _residual_variance_draws(self, at) -> np.ndarray:
        """σ² per draw (chain, draw); with a residual structure σ² s² at ``at`` or its mean over the rows."""
        from .. import variance as V
        from .posterior import residual_natural

        sigma2 = self.posterior["sigma"].to_numpy() ** 2
        res = self.spec.residual
        if res is None:
            return sigma2
        natural, flat = residual_natural(self.spec, self.posterior), sigma2.reshape(-1)
        out = [V.residual_variance(self.spec, flat[k], res.unconstrained({n: v[k] for n, v in natural.items()}), at)
               for k in range(flat.size)]
        return np.asarray(out).reshape(sigma2.shape)

    def variance_components(self, at: dict | None = None, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior of Var(y)'s decomposition at the point ``at`` (see ``FreqFit.variance_components``).

        One row per grouping factor, ``Residual`` and ``Total``: the posterior summary
        of each part's variance (computed per draw), and ``proportion``, the
        posterior mean of its share of the total.
        """
        draws = self.variance_component_draws(at)
        table = summarize_draws(draws, ci_prob)
        total = draws["Total"]
        table["proportion"] = [float(np.mean(v / total)) for v in draws.values()]
        table.index.name = "component"
        table.attrs["at"] = dict(at) if at else {}
        return table

    def icc(self, at: dict | None = None, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior of each grouping factor's intraclass correlation at ``at`` (per draw: its share of Var(y))."""
        draws = self.variance_component_draws(at)
        total = draws.pop("Total")
        draws.pop("Residual")
        table = summarize_draws({g: v / total for g, v in draws.items()}, ci_prob)
        table.index.name = "group"
        table.attrs["at"] = dict(at) if at else {}
        return table

    def r2(self, method: str = "nakagawa", ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior of the marginal and conditional R², computed per draw.

        ``method="nakagawa"``: Nakagawa & Schielzeth (2013) with Johnson's (2014)
        random-slope extension; ``"gelman"``: Gelman, Goodrich, Gabry & Vehtari (2019),
        residual form as ``brms::bayes_R2``.  See :mod:`bayeslmm.variance`.  With a variance
        function Nakagawa's residual variance is, per draw, the mean of σ² s_i² over the rows
        (Nakagawa et al. 2017), as the REML fit's.
        """
        from .. import variance as V
        from ..predict import require_rows
        from .posterior import linear_predictor

        V.check_r2_method(method)
        require_rows(self.spec, "R² (variances over the rows)")
        post = self.posterior
        beta = post["beta"].to_numpy()
        if method == "nakagawa":
            marg, cond = V.nakagawa_r2(self.spec, beta, self.block_covariance_draws(),
                                       self._residual_variance_draws(None))
        else:
            marg = V.gelman_r2(self.spec.y, np.einsum("cdp,np->cdn", beta, self.spec.X))
            cond = V.gelman_r2(self.spec.y, linear_predictor(self.spec, post, self.names))
        table = summarize_draws({"marginal": marg, "conditional": cond}, ci_prob)
        table.attrs["method"] = method
        return table

    def random_stream(self, random_seed, stream: int) -> np.random.Generator:
        """A generator: ``random_seed`` when given, else stream ``stream`` of the fit's own seed (repeatable)."""
        if random_seed is None:
            return np.random.default_rng([self.seed, stream])
        if isinstance(random_seed, bool) or not isinstance(random_seed, (int, np.integer)) or random_seed < 0:
            raise BayesLMMError(f"random_seed must be a non-negative integer or None, got {random_seed!r}")
        return np.random.default_rng(int(random_seed))

    def prior_summary(self) -> pd.DataFrame:
        """The priors used (defaults scaled to the data, with any overrides)."""
        return self.priors.table(self.spec)

    # -- diagnostics ------------------------------------------------------------
    def summary_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Fixed effects, sds, correlations and σ in one table."""
        fe = self._fixef_summary(ci_prob)
        fe.index = [f"beta[{n}]" for n in fe.index]
        vc = self._varcorr_summary(ci_prob)
        labels = [("sigma" if g == "Residual" else
                   f"sd[{g}|{v1}]" if v2 is None or (isinstance(v2, float) and np.isnan(v2)) else f"corr[{g}|{v1},{v2}]")
                  for g, v1, v2 in zip(vc.grp, vc.var1, vc.var2)]
        vc.index = labels
        parts = [fe, vc[SUMMARY_COLUMNS]]
        names = naming.residual_vars(self.spec)
        if names:
            parts.append(summarize_draws({n: self.posterior[n].to_numpy() for n in names}, ci_prob)[SUMMARY_COLUMNS])
        table = pd.concat(parts)
        table.attrs["interval"] = fe.attrs["interval"]
        return table

    @cached_property
    def _diagnostics(self) -> diag_mod.Diagnostics:
        stats = self.idata["sample_stats"].to_dataset()
        return diag_mod.check(self.summary_table(), stats, self.n_draws)

    def diagnostics(self) -> diag_mod.Diagnostics:
        """Divergences, tree depth, E-BFMI, R-hat and ESS against their thresholds (computed once)."""
        return self._diagnostics

    def to_dict(self) -> dict:
        """Plain, JSON-ready results: the posterior summary, diagnostics and settings."""
        table = self.summary_table()
        diag = self.diagnostics()
        post = self.posterior
        return {
            "formula": self.spec.formula,
            "method": "NUTS",
            "nobs": self.spec.n_obs,
            "sampler": self.sampler,
            "route": self.route,
            "parameterization": self.parameterization,
            "seed": self.seed,
            "chains": int(post.sizes["chain"]),
            "draws": int(post.sizes["draw"]),
            "interval": table.attrs["interval"],
            "posterior": {k: {c: float(v) for c, v in row.items()} for k, row in table.iterrows()},
            "diagnostics": {"divergences": diag.divergences, "max_rhat": diag.max_rhat,
                            "min_ess_bulk": diag.min_ess_bulk, "min_ess_tail": diag.min_ess_tail,
                            "messages": list(diag.messages)},
            "timings": self.timings,
            "priors": self.prior_summary().to_dict(orient="records"),
        }

    def save(self, path):
        """Write the fit to ``path`` without pickling: a netCDF file (``.nc``) or a ``.zarr`` folder.

        ``bayeslmm.load(path)`` reads it back; see :mod:`bayeslmm.io` for what is stored.
        """
        from .. import store

        return store.save(self, path)

    #: the fields :meth:`to_record` stores in its own way; any other (added later) goes under "extra"
    RECORD_FIELDS = frozenset({"spec", "idata", "priors", "names", "parameterization", "sampler", "seed",
                               "data_name", "timings", "route"})

    def to_record(self) -> tuple[dict, dict]:
        """What a save holds of this fit: its JSON record and the DataTree's groups ``{name: Dataset}``.

        The record has the priors (every family and parameter), the block names,
        route, parameterisation, sampler, seed, timings and the names of the groups; the
        model's data and the format's header are the store's (:mod:`bayeslmm.store`).
        """
        from .. import store

        record = {
            "kind": "BayesFit",
            "data_name": self.data_name,
            "spec": store.spec_record(self.spec),
            "priors": self.priors.to_record(),
            "names": list(self.names),
            "route": self.route,
            "parameterization": self.parameterization,
            "sampler": self.sampler,
            "seed": int(self.seed),
            "timings": store.jsonable(self.timings, "the timings"),
            "groups": list(self.idata.children),
            "extra": store.extra_fields(self, self.RECORD_FIELDS),
        }
        return record, {name: self.idata[name].to_dataset() for name in self.idata.children}

    @classmethod
    def from_record(cls, record: dict, spec: ModelSpec, groups: dict, source: str = "the record") -> "BayesFit":
        """The fit of :meth:`to_record`, for ``spec`` rebuilt from the stored data.

        The stored response and design must be the ones the draws were made from, and
        the priors ones a fit accepts; otherwise a
        :class:`~bayeslmm.errors.DataError` naming ``source`` (the file).  Files saved
        before the distinct-correlation layout (whole correlation matrices) are read as
        today's, and files saved before ``route`` was recorded have it inferred (:func:`route_of`).
        """
        from .. import store

        missing = [g for g in record["groups"] if g not in groups]
        if missing:
            raise DataError(f"{source}: the groups {missing} of the saved posterior are missing from the file")
        structure = record.get("extra", {}).get("residual_structure")
        if structure is not None:
            spec = _with_residual(spec, structure, source)
        idata = xr.DataTree.from_dict({f"/{g}": groups[g] for g in record["groups"]})
        idata["posterior"] = xr.DataTree(naming.upgrade(idata["posterior"].to_dataset(), record["names"],
                                                        spec.blocks))
        _check_draws_match_spec(idata, spec, source)
        return cls(spec=spec, idata=idata, priors=PriorSet.from_record(record["priors"], spec, source),
                   names=list(record["names"]), parameterization=record["parameterization"],
                   route=record.get("route"),
                   sampler=record["sampler"], seed=int(record["seed"]), data_name=record["data_name"],
                   timings=dict(record["timings"]), **store.known_extra(cls, record))

    def summary(self, ci_prob: float | None = None):
        """The printed summary: fixed effects, each block's sds and correlations, σ.

        Posterior mean, sd, median and interval (ArviZ's default 89 % equal-tailed
        interval, or ``ci_prob``), R-hat and bulk/tail ESS per parameter, then the
        sampler's diagnostics.  Plain text with ``print``, HTML in a notebook;
        ``summary().tables()`` gives the three tables as DataFrames.
        """
        from .summary import BayesSummary

        return BayesSummary(self, ci_prob)

    def __repr__(self) -> str:
        return str(self.summary())

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()

    # -- marginal means and contrasts (emmeans') -------------------------------------
    def _beta_draws(self) -> np.ndarray:
        """β's draws, one row per (chain, draw), columns in ``fixef``'s order."""
        beta = self.posterior["beta"].sel(coef=list(self.spec.fixed_names))
        return beta.stack(sample=("chain", "draw")).transpose("sample", "coef").to_numpy()

    def marginal_means(self, spec, by=None, at=None, ci_prob: float | None = None) -> pd.DataFrame:
        """The posterior of the estimated marginal means of the factor(s) ``spec`` (emmeans' reference grid).

        The grid as ``FreqFit.marginal_means`` (other factors averaged with equal
        weights, covariates at their means or ``at``, ``by`` groups; see
        :mod:`bayeslmm.marginal`); each mean's draws are ℓβ over β's draws.  One row per
        mean: the factors' columns, ``estimate`` (posterior mean), ``std_error``
        (posterior sd), the equal-tailed ``ci_prob`` interval ``lower, upper`` (default
        ArviZ's 0.89), ``median`` and ``pd`` (probability of direction, max(P(> 0), P(< 0))).
        """
        from ..marginal import posterior_means, reference_grid

        grid = reference_grid(self.spec, spec, by, at)
        return posterior_means(grid, self._beta_draws(), posterior_ci_prob(ci_prob))

    def contrasts(self, spec, method="pairwise", by=None, at=None, adjust: str | None = None,
                  ci_prob: float | None = None) -> pd.DataFrame:
        """The posterior of contrasts of :meth:`marginal_means` (``method`` as ``FreqFit.contrasts``).

        Columns ``by…, contrast, estimate, std_error, lower, upper, median, pd``.  No
        multiplicity adjustment: each contrast's marginal posterior is reported as it
        is (intervals and ``pd`` are per contrast, not simultaneous), so ``adjust`` must
        be None or "none" — anything else is an error rather than silently ignored.
        """
        from ..marginal import posterior_contrasts, reference_grid

        grid = reference_grid(self.spec, spec, by, at)
        return posterior_contrasts(grid, method, self._beta_draws(), posterior_ci_prob(ci_prob), adjust)
