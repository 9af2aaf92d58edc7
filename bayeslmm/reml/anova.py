"""Likelihood-ratio tests, AIC and BIC of models fitted to the same data, as lme4's ``anova``.

lme4's ``anova(m1, m2, ...)`` (``anova.merMod``) with its default ``refit = TRUE``
refits every REML fit by maximum likelihood before comparing — whether or not the
fixed effects differ — because REML criteria of models with different fixed effects
are likelihoods of different data (different error contrasts) and cannot be compared.
The models are ordered by their number of parameters; each row's Chisq is
2·max(0, ΔlogLik) against the row above, with Df the difference in parameters and
Pr(>Chisq) the upper χ² tail.  This module does the same.  With ``refit=False`` the
fits are compared as they are; unlike lme4 (which does not check) REML fits whose
fixed effects differ are then refused.

The χ² reference is conservative for a variance tested on its boundary (Self & Liang
1987; Stram & Lee 1994: a mixture of χ² distributions): a p-value for dropping a random
slope is too large, as in lme4.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import BayesLMMError, ModelError


def anova(*fits, refit: bool = True, names: list[str] | None = None):
    """Compare nested REML/ML fits: npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq).

    With one fit, its F tests per term instead (``fit.anova()``: type III, Satterthwaite's
    df), as lmerTest's ``anova(m)``.

    Parameters
    ----------
    *fits : FreqFit
        Two or more fits of models for the same response and rows.
    refit : bool
        Refit REML fits by ML first (lme4's default); the table then compares
        maximum likelihoods.  With ``False``, all fits must use the same criterion,
        and REML fits the same fixed effects.
    names : list of str, optional
        Row names; ``m1, m2, ...`` in the order given.

    Returns
    -------
    ReportFrame (a DataFrame) ordered by number of parameters, with the models'
    formulas in its heading; ``.objects`` holds the fits compared (ML refits
    included), by name.
    """
    from ..compare import ReportFrame
    from .results import FreqFit

    if len(fits) == 1 and isinstance(fits[0], (list, tuple)):
        fits = tuple(fits[0])
    if len(fits) == 1 and isinstance(fits[0], FreqFit):  # lmerTest's anova(m): F tests per term
        return fits[0].anova()
    names = _checked_names(fits, names)
    _check_same_rows(fits, names)
    fits, notes = _comparable_fits(fits, names, refit)
    order = sorted(range(len(fits)), key=lambda k: fits[k].n_params)  # stable, as R's order()
    fits = [fits[k] for k in order]
    names = [names[k] for k in order]
    table = _lr_table(fits, names)
    if np.any(table["Df"].to_numpy()[1:] == 0):
        notes.append("models with the same number of parameters are not nested: no test between them")
    crit = "ML" if all(f.method == "ML" for f in fits) else "REML"
    heading = [f"Data: {fits[0].data_name}" if fits[0].data_name else f"Data: {fits[0].nobs} rows",
               f"Models ({crit}):"] + [f"{n}: {f.spec.formula}" for n, f in zip(names, fits)]
    return ReportFrame.of(table, heading, notes, objects=dict(zip(names, fits)))


def _checked_names(fits, names) -> list[str]:
    """The rows' names, after checking there are at least two fits and all are REML/ML fits."""
    from .results import FreqFit

    if len(fits) < 2:
        raise BayesLMMError("anova needs a REML/ML fit (F tests per term, as lmerTest's anova(m)) or at least "
                            "two fits to compare (anova(fit1, fit2, ...))")
    for k, f in enumerate(fits):
        if not isinstance(f, FreqFit):
            raise BayesLMMError(f"anova compares REML/ML fits; argument {k + 1} is a {type(f).__name__} "
                                "(for NUTS fits compare predictive accuracy with fit.loo())")
    if names is None:
        names = [f"m{k + 1}" for k in range(len(fits))]
    names = [str(n) for n in names]
    if len(names) != len(fits) or len(set(names)) != len(names):
        raise BayesLMMError(f"names must give {len(fits)} distinct names, one per fit, got {names!r}")
    return names


def _check_same_rows(fits, names) -> None:
    """Likelihoods compare only on the same response: the same rows (and values, where the rows are kept)."""
    first = fits[0].spec
    for name, f in zip(names, fits):
        s = f.spec
        if s.n_obs != first.n_obs or (getattr(s, "rows_in_memory", True) and getattr(first, "rows_in_memory", True)
                                      and not np.array_equal(s.y, first.y)):
            raise ModelError(f"all models must be fitted to the same rows and response: {name} ({s.formula!r}, "
                             f"{s.n_obs} rows) differs from {names[0]} ({first.formula!r}, {first.n_obs} rows)")


def _comparable_fits(fits, names, refit: bool) -> tuple[tuple, list[str]]:
    """The fits to compare (REML ones refitted by ML when ``refit``) and a note saying so."""
    from .fit import fit_frequentist

    methods = {f.method for f in fits}
    if refit and "REML" in methods:
        for name, f in zip(names, fits):
            if f.method == "REML" and not getattr(f.spec, "rows_in_memory", True):
                raise ModelError(f"{name} is a REML fit of a model built out of memory, which anova cannot refit "
                                 "by ML from its rows; fit those models with method='ml' and compare those fits")
        fits = tuple(fit_frequentist(f.spec, reml=False, data_name=f.data_name) if f.method == "REML" else f
                     for f in fits)
        return fits, ["refitted the REML fit(s) by ML for the likelihood-ratio test (lme4's refit = TRUE)"]
    if not refit:
        if len(methods) > 1:
            raise ModelError("the fits mix REML and ML criteria, which cannot be compared; use refit=True")
        # REML criteria are likelihoods of error contrasts, which differ with the fixed effects
        first = fits[0].spec
        if methods == {"REML"}:
            for name, f in zip(names, fits):
                if f.spec.fixed_names != first.fixed_names or not np.array_equal(f.spec.X, first.X):
                    raise ModelError(f"REML criteria of models with different fixed effects ({names[0]}: "
                                     f"{list(first.fixed_names)}, {name}: {list(f.spec.fixed_names)}) are not "
                                     "comparable; use refit=True to compare them by ML")
    return fits, []


def _lr_table(fits, names) -> pd.DataFrame:
    """lme4's table: each row's χ² test against the row above (fits ordered by their number of parameters)."""
    npar = np.array([f.n_params for f in fits])
    loglik = np.array([f.loglik for f in fits])
    chisq = np.r_[np.nan, 2 * np.maximum(0.0, np.diff(loglik))]
    df = np.r_[np.nan, np.diff(npar)].astype(float)
    with np.errstate(invalid="ignore"):
        p = np.where(df > 0, stats.chi2.sf(chisq, np.where(df > 0, df, 1)), np.nan)
    p[0] = np.nan
    return pd.DataFrame({"npar": npar, "AIC": [f.aic for f in fits], "BIC": [f.bic for f in fits],
                         "logLik": loglik, "deviance": -2 * loglik, "Chisq": chisq, "Df": df,
                         "Pr(>Chisq)": p}, index=pd.Index(names, name="model"))
