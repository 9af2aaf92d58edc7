"""Predictions of both fits: conditional (with the groups' effects) or marginal (population) means.

The frequentist fit predicts the point values Xβ̂ + Zb̂ (conditional) or Xβ̂ (marginal),
as lme4's ``predict(fit, newdata, re.form = NA | NULL, allow.new.levels = TRUE)``.  The
Bayesian fit computes the mean for every posterior draw, so its predictions carry the
posterior uncertainty; with ``predictive=True`` each draw also gets the residual noise
σε, giving posterior predictive draws of new responses.

New data are turned into designs by :func:`bayeslmm.formula.design.new_data_design`
with the training data's contrasts and levels.  A grouping level the fit has not seen
gets, by the user's choice (``new_groups``):

* ``"population"`` — no group effect, b = 0: the population mean for that group (lme4's
  ``allow.new.levels = TRUE``);
* ``"sample"`` (Bayesian fits) — for each posterior draw, one draw of the new group's
  effects from the fitted random-effect distribution N(0, Σ_draw), shared by all rows
  of that group: the prediction for a group like the fitted ones but not yet seen;
* ``"error"`` — raise, naming the unseen levels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import BayesLMMError, DataError
from .group_frames import posterior_ci_prob
from .formula.design import NewDesign, new_data_design
from .spec import ModelSpec

KINDS = ("conditional", "marginal")
NEW_GROUPS = ("population", "sample", "error")


def check_options(kind: str, new_groups: str, *, bayesian: bool) -> None:
    if kind not in KINDS:
        raise BayesLMMError(f"kind must be one of {list(KINDS)} (with or without the groups' effects), got {kind!r}")
    if new_groups not in NEW_GROUPS:
        raise BayesLMMError(f"new_groups must be one of {list(NEW_GROUPS)}, got {new_groups!r}")
    if new_groups == "sample" and not bayesian:
        raise BayesLMMError("new_groups='sample' draws new groups' effects from the posterior and needs a "
                            "Bayesian fit; a REML/ML fit predicts unseen groups at the population mean "
                            "(new_groups='population')")


def design(spec: ModelSpec, newdata, kind: str, new_groups: str) -> NewDesign:
    """The design of the rows to predict: the training rows when ``newdata`` is None."""
    if newdata is None:
        require_rows(spec, "predictions for the training rows (pass newdata= to predict other rows)")
        conditional = kind == "conditional"
        return NewDesign(index=pd.Index(spec.row_index), X=spec.X,
                         Z=tuple(b.Z if conditional else None for b in spec.blocks),
                         codes=tuple(b.codes if conditional else None for b in spec.blocks),
                         new_levels=tuple(() for _ in spec.blocks))
    conditional = kind == "conditional"
    d = new_data_design(spec, newdata, fixed=True, random=conditional, groups=conditional)
    if conditional and new_groups == "error":
        unseen = {b.group: list(lv) for b, lv in zip(spec.blocks, d.new_levels) if lv}
        if unseen:
            detail = "; ".join(f"{g!r}: {lv[:10]}{' ...' if len(lv) > 10 else ''}" for g, lv in unseen.items())
            raise DataError(f"newdata has grouping levels the fit has not seen ({detail}); pass "
                            "new_groups='population' to predict them at the population mean, or (Bayesian "
                            "fits) new_groups='sample' to draw their effects from the fitted distribution")
    return d


def require_rows(spec: ModelSpec, what: str) -> None:
    """A DataError when the spec was built out of memory and keeps no rows."""
    if not getattr(spec, "rows_in_memory", True):
        spec.require_rows(what)


def new_levels_note(spec: ModelSpec, d: NewDesign) -> dict[str, list[str]]:
    """Per grouping factor, the unseen levels that were predicted without a fitted effect."""
    out: dict[str, list[str]] = {}
    for block, lv in zip(spec.blocks, d.new_levels):
        if lv:
            out.setdefault(block.group, [])
            out[block.group] += [x for x in lv if x not in out[block.group]]
    return out


# -- frequentist ------------------------------------------------------------------------

def freq_predict(fit, newdata=None, kind: str = "conditional", new_groups: str = "population") -> pd.Series:
    """Xβ̂ (marginal) or Xβ̂ + Zb̂ (conditional, b̂ the conditional modes; b = 0 for unseen levels)."""
    check_options(kind, new_groups, bayesian=False)
    d = design(fit.spec, newdata, kind, new_groups)
    mu = d.X @ fit.estimates.beta
    if kind == "conditional":
        for b, Z, codes in zip(fit.estimates.b, d.Z, d.codes):
            seen = codes >= 0
            mu[seen] += np.einsum("nq,nq->n", Z[seen], b[codes[seen]])
    out = pd.Series(mu, index=d.index, name="predicted")
    out.attrs.update(kind=kind, new_levels=new_levels_note(fit.spec, d))
    return out


# -- Bayesian ---------------------------------------------------------------------------

def bayes_mean_draws(fit, d: NewDesign, kind: str, new_groups: str, rng: np.random.Generator) -> np.ndarray:
    """The mean of every row to predict for every posterior draw: (chain, draw, rows)."""
    from .bayes.naming import cholesky_factors

    post = fit.posterior
    beta = post["beta"].to_numpy()
    mu = np.einsum("cdp,np->cdn", beta, d.X)
    if kind == "marginal":
        return mu
    for k, (name, block, Z, codes) in enumerate(zip(fit.names, fit.spec.blocks, d.Z, d.codes)):
        seen = codes >= 0
        if seen.any():
            used = np.unique(codes[seen])   # only the levels predicted (all of them may not be stored)
            b = fit.effect_draws(k, [block.levels[i] for i in used]).to_numpy()  # (chain, draw, used, q)
            mu[:, :, seen] += np.einsum("cdnq,nq->cdn", b[:, :, np.searchsorted(used, codes[seen]), :], Z[seen])
        if new_groups == "sample" and not seen.all():
            # one draw of each unseen level's effects per posterior draw, from N(0, Σ_draw)
            k = -1 - codes[~seen]  # index of the unseen level
            L = cholesky_factors(post, name, block)
            z = rng.standard_normal(L.shape[:2] + (int(k.max()) + 1, block.q))
            b_new = np.einsum("cdab,cdkb->cdka", L, z)
            mu[:, :, ~seen] += np.einsum("cdnq,nq->cdn", b_new[:, :, k, :], Z[~seen])
    return mu


def bayes_draws(fit, newdata=None, kind: str = "conditional", new_groups: str = "population",
                predictive: bool = False, random_seed: int | None = None):
    """Draws of the mean (or, ``predictive=True``, of new responses) per row: a DataArray (chain, draw, obs)."""
    import xarray as xr

    check_options(kind, new_groups, bayesian=True)
    d = design(fit.spec, newdata, kind, new_groups)
    rng = fit.random_stream(random_seed, 2)
    mu = bayes_mean_draws(fit, d, kind, new_groups, rng)
    if predictive:
        sigma = fit.posterior["sigma"].to_numpy()[..., None]
        mu = mu + sigma * rng.standard_normal(mu.shape)
    post = fit.posterior
    out = xr.DataArray(mu, dims=("chain", "draw", "obs"), name="y" if predictive else "mu",
                       coords={"chain": post["chain"].to_numpy(), "draw": post["draw"].to_numpy(),
                               "obs": np.arange(d.n_rows), "row": ("obs", np.asarray(d.index))})
    out.attrs.update(kind=kind, predictive=int(predictive), new_groups=new_groups)
    return out, d


def summarize_rows(draws: np.ndarray, index, prob: float) -> pd.DataFrame:
    """Mean, sd, median and the equal-tailed interval of (samples, rows) draws, one row per row."""
    lo, med, hi = np.quantile(draws, [(1 - prob) / 2, 0.5, (1 + prob) / 2], axis=0)
    return pd.DataFrame({"mean": draws.mean(0), "sd": draws.std(0, ddof=1), "median": med,
                         "lower": lo, "upper": hi}, index=index)


def bayes_predict(fit, newdata=None, kind: str = "conditional", new_groups: str = "population",
                  predictive: bool = False, ci_prob: float | None = None,
                  random_seed: int | None = None) -> pd.DataFrame:
    """Posterior summary of the predicted mean (or of new responses) per row."""
    prob = posterior_ci_prob(ci_prob)
    draws, d = bayes_draws(fit, newdata, kind, new_groups, predictive, random_seed)
    out = summarize_rows(draws.to_numpy().reshape(-1, d.n_rows), d.index, prob)
    out.attrs.update(kind=kind, predictive=predictive, interval=f"eti{round(prob * 100):d}",
                     new_levels=new_levels_note(fit.spec, d))
    return out
