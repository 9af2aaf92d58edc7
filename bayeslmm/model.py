"""``Model``: parse and validate once; ``fit()`` returns a new result and changes nothing."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import pandas as pd

from .crossprod import CrossProducts, crossproducts_of, remember
from .errors import BayesLMMError, DataError, ModelError, did_you_mean
from .exactfit import NEAR_EXACT_RATIO, check_exact_fit
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
    data : pandas.DataFrame, polars.DataFrame, the name of a bundled dataset, or data larger than memory
        A polars DataFrame is converted with its ``to_pandas()`` (which needs pyarrow).
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
    variance, correlation : optional
        A residual structure, R = σ² Λ_R(ρ) instead of σ² I, as nlme's ``weights =`` and
        ``correlation =``: ``variance=VarIdent("Sex")``, ``VarPower("Time")``,
        ``VarExp("x")``, ``VarFixed("x")``; ``correlation=CorAR1("Mare")``,
        ``CorCAR1("g", "t")``, ``CorCompSymm("g")`` (:mod:`bayeslmm.residual`).  Fitted
        by REML/ML, and by NUTS on the explicit PyMC graph (docs/bayes.md, "Residual
        structures"); the columns they read must have no missing values.
    weights : str or array, optional
        Known precision weights, Var(y_i) = σ²/w_i (lme4's ``weights``): a column name or
        one positive value per row used.

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
        variance=None,
        correlation=None,
        weights=None,
    ):
        self.data_name = None
        from .outofcore import build_out_of_core, is_dask_dataframe, is_parquet_source

        if is_dask_dataframe(data) or is_parquet_source(data):
            if not (variance is None and correlation is None and weights is None):
                raise ModelError("residual structures (variance=, correlation=, weights=) need the rows in "
                                 "memory in this release; build the model from a pandas DataFrame")
            if isinstance(data, str):
                self.data_name = data
            self.formula = formula
            self.spec, self.crossprods = build_out_of_core(formula, data, groups=groups, missing=missing,
                                                           rank_deficient=rank_deficient)
            remember(self.spec, self.crossprods)  # the fits' profiles and df need them; no rows to redo them
            return
        if isinstance(data, str):
            from .datasets import load_dataset

            self.data_name = data
            data = load_dataset(data)
        self.formula = formula
        self.spec: ModelSpec = build_spec(formula, data, groups=groups, missing=missing,
                                          rank_deficient=rank_deficient)
        if not (variance is None and correlation is None and weights is None):
            self.spec = _with_residual(self.spec, data, variance, correlation, weights)

    @cached_property
    def crossprods(self) -> CrossProducts:
        """The cross-product blocks, computed on first use and shared by every fit (and by their
        profiles and df, through :func:`bayeslmm.crossprod.crossproducts_of`)."""
        return crossproducts_of(self.spec)

    def fit(self, method: str = "reml", **options):
        """Fit the model.

        Parameters
        ----------
        method : {"reml", "ml", "nuts"}
            Restricted maximum likelihood (lme4's default), maximum likelihood, or
            the posterior by NUTS.
        **options
            For REML/ML: ``start`` (θ), optimizer settings (``ftol_rel``,
            ``xtol_abs``, ``maxeval``, ``restarts``, ``initial_step``) and
            ``blas_threads`` (default ``$BAYESLMM_BLAS_THREADS``, else 1).

            For NUTS: ``route`` (how the posterior is computed, docs/bayes.md "Routes"):
            ``"auto"`` (default: the fastest exact route that applies), ``"kernel"``
            (whichever compiled kernel applies), one compiled kernel by name —
            ``"one-factor"`` (:mod:`bayeslmm.bayes.kernel`: one grouping factor, at most
            two random-effect columns), ``"blocked"`` (:mod:`bayeslmm.bayes.blocked`:
            every effect integrated out; auto's choice for other σ²I models with up to
            200 effects outside the largest factor), ``"partial"``
            (:mod:`bayeslmm.bayes.partial`: the largest factor integrated out, the
            others sampled), ``"structured"`` (:mod:`bayeslmm.bayes.structured`: a
            residual structure) — each an error saying why where it cannot fit the
            model; ``"graph"`` (the PyMC graph, the largest factor integrated out) or
            ``"graph-explicit"`` (the PyMC graph, every effect sampled; a model with a
            residual structure is always sampled so on the graph). ``fit.route`` says
            which ran. ``sampler="auto" | "pymc" | "nutpie"``: which NUTS runs a graph
            route (auto: PyMC's for small gradients, nutpie's for big ones, see
            ``bayes.fit.choose_sampler``; the compiled kernels always run on nutpie, and
            ``sampler="pymc"`` with ``route="auto"`` means the graph). ``draws=1000``,
            ``tune=1000``, ``chains=4``, ``cores`` (1 for PyMC's sampler; for nutpie
            one thread per chain up to the number of processors), ``random_seed``,
            ``priors`` (see :mod:`bayeslmm.bayes.priors`), ``target_accept=0.8``,
            ``max_treedepth=10``, ``progressbar=True``, ``log_likelihood`` (pointwise,
            for LOO; on by default below 5e7 values), ``warn=True`` (convergence
            warnings), ``effects="auto" | "draws" | "summary"`` (the integrated-out
            block's effects: every draw, or per-level posterior means, sds and
            quantiles; auto stores draws up to ``bayes.fit.MAX_EFFECT_VALUES`` values —
            see docs/bayes.md). The older ``backend=`` and ``parameterization=`` still
            work, with a ``FutureWarning`` naming the ``route`` they spell
            (docs/vocabulary.md).

        Returns
        -------
        FreqFit or BayesFit

        Raises
        ------
        ModelError
            When the fixed and random effects reproduce the response exactly (every
            method, before fitting): its residual after projection on the fixed and
            random-effect columns is rounding error of y (:mod:`bayeslmm.exactfit`), so
            σ would be 0 and σ, the variances and β artefacts of where the optimizer or
            sampler stops. Data with tiny real noise (1e-6 × sd(y)) fit as usual; a
            residual above rounding but below 1e-7 × sd(y), which the sums of squares
            cannot resolve, fits with a warning. Also when the cross-products overflow.

        Notes
        -----
        NUTS samples in standardised units of the response and reports draws in its
        own (:class:`bayeslmm.bayes.collapsed.ResponseScale`; priors are given in the
        response's units): the posterior of ``c * y`` is ``c`` times that of ``y``.
        """
        if not isinstance(method, str) or method.lower() not in METHODS:
            raise BayesLMMError(f"method must be one of {list(METHODS)}, got {method!r}")
        if method.lower() == "nuts":
            from .bayes.fit import fit_bayes, route_from_old_keywords

            options = _known(options, _NUTS_OPTIONS)
            if "backend" in options or "parameterization" in options:   # the older spellings of route=
                options["route"] = route_from_old_keywords(options.get("route", "auto"), options.pop("backend", None),
                                                           options.pop("parameterization", None))
            if options.get("log_likelihood"):
                self.spec.require_rows("the pointwise log-likelihood (log_likelihood=True)")
            self._check_response()
            return fit_bayes(self.spec, self.crossprods, data_name=self.data_name, **options)
        from .reml import fit_frequentist

        options = _known(options, _FREQ_OPTIONS)
        self._check_response()
        fit = fit_frequentist(self.spec, reml=method.lower() == "reml", crossprods=self.crossprods,
                              data_name=self.data_name, **options)
        if self._exact_fit.verdict == "no":  # (the other verdicts were reported before fitting)
            _warn_if_exact(fit)
        return fit

    def _refuse_residual(self, what: str) -> None:
        """What would build the model with R = σ²I refuses rather than drop a structure silently."""
        if self.spec.residual is not None:
            raise ModelError(f"{what} would have R = σ²I: this model's residual structure is sampled by "
                             "fit(method='nuts') only in this release (docs/bayes.md); drop "
                             "variance=/correlation=/weights= for the σ²I model")

    def _check_response(self) -> None:
        """Refuse a response whose squares overflow or that the effects reproduce exactly (every method)."""
        check_magnitude(self.spec, self.crossprods)
        if self._exact_fit.verdict in ("exact", "near", "unresolved"):
            _exact_fit_message(self._exact_fit)

    @cached_property
    def _exact_fit(self):
        return check_exact_fit(self.spec, self.crossprods)

    def prior_predictive(self, draws: int = 500, priors: dict | None = None, random_seed: int | None = None):
        """Draws of the response from the priors (a DataTree with ``prior`` and ``prior_predictive``).

        Built from the explicit parameterisation, which has the same priors as the
        collapsed one.
        """
        from .bayes.predictive import prior_predictive

        self._refuse_residual("prior predictive draws")
        self.spec.require_rows("prior predictive draws of the response")
        return prior_predictive(self.spec, self.crossprods, draws=draws, priors=priors, random_seed=random_seed)

    def pymc_model(self, priors: dict | None = None, parameterization: str = "explicit"):
        """The PyMC model (``pm.Model``) that ``fit(method="nuts")`` samples, to sample or extend yourself.

        ``explicit`` (default) has the linear predictor as the Deterministic ``mu``
        and the likelihood as the observed ``y``, both with dim ``obs`` (the row
        position); ``collapsed`` integrates the first block out (no ``mu``, no ``y``).
        Wrap draws of the explicit model back into a fit with :meth:`fit_from_draws`
        (see docs/bayes.md).
        """
        from .bayes.model import pymc_model
        from .bayes.priors import resolve_priors

        self._refuse_residual("the PyMC model")
        return pymc_model(self.spec, self.crossprods, resolve_priors(self.spec, priors), parameterization)

    def fit_from_draws(self, idata, priors: dict | None = None, random_seed: int = 0, warn: bool = True):
        """A ``BayesFit`` of draws made from :meth:`pymc_model` (``with m: idata = pm.sample()``).

        Pass the ``priors`` the PyMC model was built with; see ``BayesFit.from_pymc``.
        """
        from .bayes.results import BayesFit

        return BayesFit.from_pymc(self, idata, priors=priors, random_seed=random_seed, warn=warn)

    @classmethod
    def from_bambi(cls, bmb_model) -> "Model":
        """The same model from a ``bambi.Model`` (Gaussian, identity link): same formula and data.

        bambi's ``(x | g)`` is uncorrelated, so it becomes ``(x || g)``; what bayeslmm cannot
        express raises ``ModelError``.  bambi's priors: ``fit(method="nuts",
        priors=bayeslmm.interop.bambi_priors(bmb_model))`` (see :mod:`bayeslmm.interop`).
        The model is checked against bambi's design column by column: one that would not
        move exactly raises ``ModelError`` instead of moving approximately.
        """
        from .interop import check_same_design, model_arguments

        model = cls(**model_arguments(bmb_model))
        check_same_design(model.spec, bmb_model)
        return model

    def to_bambi(self, priors: dict | None = None, drop_correlations: bool = False):
        """The same model as a ``bambi.Model``, with the priors ``fit(method="nuts", priors=priors)`` uses.

        bambi has no correlated effects: a correlated block with more than one column raises
        ``ModelError`` unless ``drop_correlations=True`` (see :mod:`bayeslmm.interop`).
        """
        from .interop import to_bambi

        self._refuse_residual("a bambi model")
        return to_bambi(self.spec, priors=priors, drop_correlations=drop_correlations)

    def prior_summary(self, priors: dict | None = None):
        """The priors a NUTS fit would use: defaults scaled to the data, with ``priors`` applied."""
        from .bayes.priors import resolve_priors

        return resolve_priors(self.spec, priors).table(self.spec)

    def __repr__(self) -> str:
        s = self.spec
        groups = ", ".join(f"{b.group} ({b.n_levels} levels, {', '.join(b.columns)})" for b in s.blocks)
        return (f"Model({s.formula!r}: {s.n_obs} observations, fixed effects {list(s.fixed_names)}, "
                f"random effects by {groups})")


def _with_residual(spec: ModelSpec, data: pd.DataFrame, variance, correlation, weights) -> ModelSpec:
    """The spec with its residual structure bound to the rows it uses (:mod:`bayeslmm.residual`)."""
    from dataclasses import replace

    from .residual import bind_residual, check_nested, columns_of

    cols = columns_of(variance, correlation, weights)
    unknown = [c for c in cols if c not in data.columns]
    if unknown:
        names = [str(c) for c in data.columns]
        raise DataError(f"the residual structure names {unknown[0]!r}, which is not a column of the data; "
                        f"columns: {names[:20]}{did_you_mean(str(unknown[0]), names)}")
    frame = data[cols]
    if len(frame) != spec.n_obs:  # rows dropped for missing values: take the ones used
        if not data.index.is_unique:
            raise DataError("rows were dropped for missing values and the data's index has duplicate labels, "
                            "so the residual structure's rows cannot be matched; reset the index first")
        frame = frame.loc[spec.row_index]
    if weights is not None and not isinstance(weights, str) and len(np.ravel(weights)) == len(data) != spec.n_obs:
        weights = pd.Series(np.ravel(weights), index=data.index).loc[spec.row_index].to_numpy()
    res = bind_residual(variance, correlation, weights, frame.reset_index(drop=True))
    check_nested(res, spec.blocks)
    return replace(spec, residual=res)


_FREQ_OPTIONS = {"start", "ftol_rel", "ftol_abs", "xtol_abs", "xtol_rel", "maxeval", "restarts", "initial_step",
                 "blas_threads"}
_NUTS_OPTIONS = {"draws", "tune", "chains", "cores", "random_seed", "sampler", "route", "priors",
                 "target_accept", "max_treedepth", "progressbar", "log_likelihood", "warn", "effects",
                 "backend", "parameterization"}   # the last two: the older spellings of route=


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


def check_magnitude(spec, cp) -> None:
    """Refuse cross-products that overflowed (each value's square fits, as the spec checks, but not their sums)."""
    if np.all(np.isfinite(cp.Arr)) and np.all(np.isfinite(cp.B.data)) and np.all(np.isfinite(cp.A11)):
        return
    big = float(np.max(np.abs(spec.y))) if spec.rows_in_memory else float(spec.moments.y.max_abs[0])
    raise ModelError(
        f"the sums of squares and products of the response and design overflow double precision (largest |y| "
        f"{big:.3g}, {spec.n_obs} rows). Rescale the response (and any large predictor) before fitting, e.g. "
        f"divide y by 1e{int(np.log10(big)) if np.isfinite(big) and big > 1 else 100}, and multiply β, σ and the "
        "effects' sds back"
    )


def _exact_fit_message(check) -> None:
    """Raise (exact fit) or warn (nearly exact, or not verifiable) as ``Model.fit`` documents."""
    if check.verdict == "exact":
        raise ModelError(
            f"the fixed and random effects reproduce the response exactly: its residual after projection on "
            f"the fixed and random-effect columns is {check.residual_rms:.3g} (rms), rounding error of y "
            f"(sd {check.response_sd:.3g}). There is no residual variation, so σ is 0 and the variance "
            "parameters, σ and even β would be artefacts of where the optimizer or sampler stops. Check that "
            "the response is not computed from the predictors and groups; if it is simulated, add noise"
        )
    if check.verdict == "near":
        warnings.warn(
            f"the fixed and random effects reproduce the response almost exactly: its residual after projection "
            f"is {check.ratio:.2g} × its sd, below the {NEAR_EXACT_RATIO:g} that the sums of squares both "
            "engines work from resolve, so σ, the variance parameters and β's uncertainty may be far off. "
            "Check that the response is not (nearly) computed from the predictors and groups",
            UserWarning, stacklevel=4,
        )
    elif check.verdict == "unresolved" and check.ratio < NEAR_EXACT_RATIO:
        warnings.warn(
            f"the response may be reproduced exactly by the fixed and random effects (residual from the "
            f"cross-products {check.ratio:.2g} × its sd; the rows were not available to check it precisely): "
            "σ and the variance parameters may be rounding artefacts",
            UserWarning, stacklevel=4,
        )


def _warn_if_exact(fit) -> None:
    """Warn when the fitted residual sd is at rounding level although the data passed the exact-fit check.

    A backstop behind :func:`bayeslmm.exactfit.check_exact_fit`, which judges the data
    before fitting: then σ̂ and the variance parameters are artefacts of floating point.
    """
    y = fit.spec.y
    if len(y) != fit.spec.n_obs:  # built out of memory: no rows to compare with
        return
    spread = float(np.std(y))
    if fit.sigma < NEAR_EXACT_RATIO * spread:  # the ratio the data check warns below
        warnings.warn(
            f"the residual standard deviation ({fit.sigma:.3g}) is below {NEAR_EXACT_RATIO:g} × the response's "
            f"({spread:.3g}): the fixed and random effects reproduce the response (almost) exactly, so σ and "
            "the variance parameters are rounding artefacts, not estimates. Check that the response is not "
            "a function of the predictors and groups",
            UserWarning, stacklevel=3,
        )
