"""The Bayesian fit: an ArviZ DataTree plus tables laid out like the REML fit's."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import BayesLMMError
from ..spec import ModelSpec
from . import diagnostics as diag_mod
from .priors import PriorSet

SUMMARY_COLUMNS = ["mean", "sd", "median", "lower", "upper", "r_hat", "ess_bulk", "ess_tail"]


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
    sampler : {"pymc", "nutpie"}
    seed : int
        The seed the draws came from (reuse it to reproduce them).
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

    @property
    def method(self) -> str:
        return "NUTS"

    @property
    def posterior(self) -> xr.Dataset:
        return self.idata["posterior"].to_dataset()

    @property
    def n_draws(self) -> int:
        post = self.posterior
        return post.sizes["chain"] * post.sizes["draw"]

    # -- tables ---------------------------------------------------------------
    def fixef(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior summary of the fixed effects, one row per coefficient (as ``FreqFit.fixef``)."""
        beta = self.posterior["beta"]
        draws = {name: beta.sel(coef=name).to_numpy() for name in self.spec.fixed_names}
        return summarize_draws(draws, ci_prob)

    def _varcorr_draws(self) -> tuple[list[tuple], dict[str, np.ndarray]]:
        post = self.posterior
        rows, draws = [], {}
        for name, block in zip(self.names, self.spec.blocks):
            sd = post[f"{name}_sd"].to_numpy()
            for i, col in enumerate(block.columns):
                key = f"{name}|{col}"
                rows.append((key, block.group, col, None))
                draws[key] = sd[..., i]
            if block.correlated and block.q > 1:
                corr = post[f"{name}_corr"].to_numpy()
                for i in range(block.q):
                    for j in range(i + 1, block.q):
                        key = f"{name}|{block.columns[i]}|{block.columns[j]}"
                        rows.append((key, block.group, block.columns[i], block.columns[j]))
                        draws[key] = corr[..., j, i]
        rows.append(("sigma", "Residual", None, None))
        draws["sigma"] = post["sigma"].to_numpy()
        return rows, draws

    def varcorr(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Posterior of every sd and correlation, laid out like ``FreqFit.varcorr``.

        Rows: ``grp, var1, var2`` as in lme4's ``as.data.frame(VarCorr(m))``; the
        summary describes the sd (``var2`` missing) or the correlation.
        """
        rows, draws = self._varcorr_draws()
        s = summarize_draws(draws, ci_prob)
        out = pd.DataFrame(rows, columns=["key", "grp", "var1", "var2"]).set_index("key")
        out = out.join(s)
        out.index.name = None
        out = out.reset_index(drop=True)
        out.attrs["interval"] = s.attrs["interval"]
        return out

    def ranef(self, ci_prob: float | None = None) -> dict[str, pd.DataFrame]:
        """Posterior means of the random effects, one frame per block (levels × columns)."""
        post = self.posterior
        out = {}
        for name, block in zip(self.names, self.spec.blocks):
            mean = post[name].mean(("chain", "draw")).to_numpy()
            out[name] = pd.DataFrame(mean, index=pd.Index(block.levels, name=block.group), columns=list(block.columns))
        return out

    def ranef_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Long table: group, term, level, posterior mean, sd and interval of each effect."""
        import arviz as az

        prob = ci_prob if ci_prob is not None else az.rcParams["stats.ci_prob"]
        post = self.posterior
        parts = []
        for name, block in zip(self.names, self.spec.blocks):
            d = post[name].to_numpy().reshape(-1, block.n_levels, block.q)
            lo, hi = np.quantile(d, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
            for a, col in enumerate(block.columns):
                parts.append(pd.DataFrame({"grpvar": name, "term": col, "grp": list(block.levels),
                                           "mean": d[:, :, a].mean(0), "sd": d[:, :, a].std(0, ddof=1),
                                           "lower": lo[:, a], "upper": hi[:, a]}))
        return pd.concat(parts, ignore_index=True)

    # -- predictions ------------------------------------------------------------
    def posterior_predictive(self, random_seed: int | None = None) -> xr.DataArray:
        """Replicated responses for the training rows: y_rep = Xβ + Zb + σε per draw.

        One replicate per posterior draw, using that draw's β, effects b and σ (the
        draws ``arviz`` posterior predictive checks compare with the observed ``y``).

        Parameters
        ----------
        random_seed : int, optional
            Seed of the noise ε.  ``None`` derives it from the fit's own seed, so
            repeated calls return the same draws.

        Returns
        -------
        xarray.DataArray named ``y`` with dims ``(chain, draw, obs)``; ``obs`` is the row
        position, and the coordinate ``row`` holds the data's index labels.
        """
        from .fit import linear_predictor

        rng = self._rng(random_seed, 2)
        post = self.posterior
        mu = linear_predictor(self.spec, post, self.names)
        sigma = post["sigma"].to_numpy()[..., None]
        y = mu + sigma * rng.standard_normal(mu.shape)
        return xr.DataArray(y, dims=("chain", "draw", "obs"), name="y",
                            coords={"chain": post["chain"].to_numpy(), "draw": post["draw"].to_numpy(),
                                    "obs": np.arange(self.spec.n_obs), "row": ("obs", self.spec.row_index)})

    def _rng(self, random_seed, stream: int) -> np.random.Generator:
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
        fe = self.fixef(ci_prob)
        fe.index = [f"beta[{n}]" for n in fe.index]
        vc = self.varcorr(ci_prob)
        labels = [("sigma" if g == "Residual" else
                   f"sd[{g}|{v1}]" if v2 is None or (isinstance(v2, float) and np.isnan(v2)) else f"corr[{g}|{v1},{v2}]")
                  for g, v1, v2 in zip(vc.grp, vc.var1, vc.var2)]
        vc.index = labels
        table = pd.concat([fe, vc[SUMMARY_COLUMNS]])
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

    def summary(self):
        from .summary import BayesSummary

        return BayesSummary(self)

    def __repr__(self) -> str:
        return str(self.summary())

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()
