"""``Model``: parse and validate once; ``fit()`` returns a new result and changes nothing."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import pandas as pd

from .crossprod import CrossProducts
from .errors import BayesLMMError
from .formula import build_spec
from .spec import ModelSpec

METHODS = ("reml", "ml", "nuts")


class Model:
    """A linear mixed model from an lme4 formula and a DataFrame.

    Parameters
    ----------
    formula : str
        lme4 syntax: ``"y ~ x + (1 + x | g)"``, ``(x || g)``, ``(1 | a/b)``,
        ``(1 | a) + (1 | b)``.
    data : pandas.DataFrame, the name of a bundled dataset, or data larger than memory
        A Dask DataFrame, or the path of a Parquet file, folder or glob
        (``"runs/*.parquet"``): the cross-products are then computed partition by
        partition (:mod:`bayeslmm.outofcore`, ``docs/scale.md``) and the model keeps
        no rows, so REML/ML and collapsed NUTS fits work but per-row results
        (fitted values, residuals) do not.
    groups : dict, list or str, optional
        The grouping-columns form: ``Model("y ~ x", data, groups={"school": "1 + x"})``
        is ``y ~ x + (1 + x | school)``.
    missing : {"raise", "drop"}
        Rows with missing or infinite values in a used column raise an error
        (default) or are dropped and reported.
    rank_deficient : {"drop", "error"}
        Fixed-effect columns that are linear combinations of others are dropped
        with a warning (lme4's behaviour) or raise.

    Examples
    --------
    >>> from bayeslmm import Model
    >>> fit = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy").fit(method="reml")
    >>> round(fit.objective, 2)
    1743.63
    """

    def __init__(
        self,
        formula: str,
        data: pd.DataFrame | str,
        groups: Mapping[str, str] | Sequence[str] | str | None = None,
        missing: str = "raise",
        rank_deficient: str = "drop",
    ):
        self.data_name = None
        from .outofcore import build_out_of_core, is_dask_dataframe, is_parquet_source

        if is_dask_dataframe(data) or is_parquet_source(data):
            if isinstance(data, str):
                self.data_name = data
            self.formula = formula
            self.spec, self.crossprods = build_out_of_core(formula, data, groups=groups, missing=missing,
                                                           rank_deficient=rank_deficient)
            return
        if isinstance(data, str):
            from .datasets import load_dataset

            self.data_name = data
            data = load_dataset(data)
        self.formula = formula
        self.spec: ModelSpec = build_spec(formula, data, groups=groups, missing=missing,
                                          rank_deficient=rank_deficient)

    @cached_property
    def crossprods(self) -> CrossProducts:
        """The cross-product blocks, computed on first use and shared by every fit."""
        return CrossProducts.from_spec(self.spec)

    def fit(self, method: str = "reml", **options):
        """Fit the model.

        Parameters
        ----------
        method : {"reml", "ml", "nuts"}
            Restricted maximum likelihood (lme4's default), maximum likelihood, or
            the posterior by NUTS.
        **options
            For REML/ML: ``start`` (θ) and optimizer settings (``ftol_rel``,
            ``xtol_abs``, ``maxeval``, ``restarts``, ``initial_step``).

            For NUTS: ``draws=1000``, ``tune=1000``, ``chains=4``, ``cores`` (1 for
            PyMC's sampler; for nutpie one thread per chain up to the number of
            processors), ``random_seed``, ``sampler="auto" | "pymc" | "nutpie"``
            (auto: PyMC's NUTS for small gradients, nutpie's for big ones, see
            ``bayes.fit.choose_sampler``), ``parameterization="collapsed" |
            "explicit"``, ``priors`` (see :mod:`bayeslmm.bayes.priors`),
            ``target_accept=0.8``, ``max_treedepth=10``, ``progressbar=True``,
            ``log_likelihood`` (pointwise, for LOO; on by default below 5e7 values),
            ``warn=True`` (convergence warnings), ``backend="auto" | "kernel" |
            "pytensor"`` (auto: the compiled collapsed kernel of
            :mod:`bayeslmm.bayes.kernel` on nutpie when the model is one grouping
            factor with at most two random-effect columns and the priors are ones it
            implements; PyMC's graph otherwise), ``effects="auto" | "draws" |
            "summary"`` (the integrated-out block's effects: every draw, or per-level
            posterior means, sds and quantiles; auto stores draws up to
            ``bayes.fit.MAX_EFFECT_VALUES`` values — see docs/bayes.md).

        Returns
        -------
        FreqFit or BayesFit
        """
        if not isinstance(method, str) or method.lower() not in METHODS:
            raise BayesLMMError(f"method must be one of {list(METHODS)}, got {method!r}")
        if method.lower() == "nuts":
            from .bayes.fit import fit_bayes

            if options.get("parameterization") == "explicit":
                self.spec.require_rows("the explicit parameterisation (a likelihood over the rows)")
            if options.get("log_likelihood"):
                self.spec.require_rows("the pointwise log-likelihood (log_likelihood=True)")
            return fit_bayes(self.spec, self.crossprods, data_name=self.data_name, **_known(options, _NUTS_OPTIONS))
        from .reml import fit_frequentist

        fit = fit_frequentist(self.spec, reml=method.lower() == "reml", crossprods=self.crossprods,
                              data_name=self.data_name, **_known(options, _FREQ_OPTIONS))
        _warn_if_exact(fit)
        return fit

    def prior_predictive(self, draws: int = 500, priors: dict | None = None, random_seed: int | None = None):
        """Draws of the response from the priors (a DataTree with ``prior`` and ``prior_predictive``).

        Built from the explicit parameterisation, which has the same priors as the
        collapsed one.
        """
        from .bayes.predictive import prior_predictive

        self.spec.require_rows("prior predictive draws of the response")
        return prior_predictive(self.spec, self.crossprods, draws=draws, priors=priors, random_seed=random_seed)

    def prior_summary(self, priors: dict | None = None):
        """The priors a NUTS fit would use: defaults scaled to the data, with ``priors`` applied."""
        from .bayes.priors import resolve_priors

        return resolve_priors(self.spec, priors).table(self.spec)

    def __repr__(self) -> str:
        s = self.spec
        groups = ", ".join(f"{b.group} ({b.n_levels} levels, {', '.join(b.columns)})" for b in s.blocks)
        return (f"Model({s.formula!r}: {s.n_obs} observations, fixed effects {list(s.fixed_names)}, "
                f"random effects by {groups})")


_FREQ_OPTIONS = {"start", "ftol_rel", "ftol_abs", "xtol_abs", "xtol_rel", "maxeval", "restarts", "initial_step"}
_NUTS_OPTIONS = {"draws", "tune", "chains", "cores", "random_seed", "sampler", "parameterization", "priors",
                 "target_accept", "max_treedepth", "progressbar", "log_likelihood", "warn", "backend",
                 "effects"}


def _known(options: dict, allowed: set[str]) -> dict:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BayesLMMError(f"unknown fit option(s) {unknown} for this method; allowed: {sorted(allowed)}")
    for name in ("progressbar", "warn", "log_likelihood"):
        value = options.get(name)
        if name in options and not isinstance(value, bool) and not (name == "log_likelihood" and value is None):
            allowed_values = "True, False or None" if name == "log_likelihood" else "True or False"
            raise BayesLMMError(f"{name} must be {allowed_values}, got {value!r}")
    if options.get("start") is not None:
        try:
            np.asarray(options["start"], dtype=float)
        except (TypeError, ValueError):
            raise BayesLMMError(f"start must be a sequence of numbers (one per θ), got {options['start']!r}") from None
    return options


#: σ̂ below this fraction of the response's sd means the model reproduces the data to rounding error
EXACT_FIT_RATIO = 1e-7


def _warn_if_exact(fit) -> None:
    """Warn when the residual sd is at rounding level: the effects reproduce the response exactly.

    Then the optimum lies at θ → ∞ (or anywhere), and σ̂ and the variance parameters
    are artefacts of floating point, not estimates.
    """
    y = fit.spec.y
    if len(y) != fit.spec.n_obs:  # built out of memory: no rows to compare with
        return
    spread = float(np.std(y))
    if fit.sigma < EXACT_FIT_RATIO * spread:
        warnings.warn(
            f"the residual standard deviation ({fit.sigma:.3g}) is below {EXACT_FIT_RATIO:g} × the response's "
            f"({spread:.3g}): the fixed and random effects reproduce the response (almost) exactly, so σ and "
            "the variance parameters are rounding artefacts, not estimates. Check that the response is not "
            "a function of the predictors and groups",
            UserWarning, stacklevel=3,
        )
