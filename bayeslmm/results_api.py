"""The contract both fits keep: one question, one member, one answer's layout.

:class:`MixedFit` lists what a REML/ML fit (:class:`~bayeslmm.reml.results.FreqFit`)
and a NUTS fit (:class:`~bayeslmm.bayes.results.BayesFit`) both answer, with the same
names, the same argument names and the same core columns; code written against it
works on either engine (``tests/contract`` checks every member on both, and on fits
reloaded from a file).  Where the engines differ in what a number *is*, the fit says
so: :attr:`MixedFit.point_estimate`.

Arguments an engine has beyond the protocol's come after them, with defaults:
``FreqFit.confint`` and ``FreqFit.varcorr_table`` take ``method`` ("profile" or
"wald"), and ``FreqFit.marginal_means`` and ``FreqFit.contrasts`` take ``ddf`` (the
denominator df); ``BayesFit`` has no such choice (its intervals are the posterior's
equal-tailed ones), so it takes no ``method``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

#: the columns every ``varcorr`` has (lme4's ``as.data.frame(VarCorr(m))``)
VARCORR_COLUMNS = ["grp", "var1", "var2", "vcov", "sdcor"]
#: the first columns of every ``fixef_table``
FIXEF_TABLE_COLUMNS = ["estimate", "std_error", "lower", "upper"]
#: the first columns of every ``varcorr_table``
VARCORR_TABLE_COLUMNS = ["grp", "var1", "var2", "estimate", "lower", "upper"]
#: the first columns of every ``ranef_table`` (one row per effect)
RANEF_TABLE_COLUMNS = ["grpvar", "term", "grp", "estimate", "std_error"]
#: the columns of every ``confint``
CONFINT_COLUMNS = ["estimate", "lower", "upper"]
#: the columns every ``marginal_means`` and ``contrasts`` have after the grid's (factors, or ``contrast``)
MARGINAL_COLUMNS = ["estimate", "std_error", "lower", "upper"]


@runtime_checkable
class MixedFit(Protocol):
    """What every fitted linear mixed model answers (REML, ML or NUTS)."""

    #: "REML", "ML" or "NUTS"
    method: str
    #: what a point value is: "conditional mode" (REML/ML: b̂; β̂ and the variances are the
    #: REML/ML estimates) or "posterior mean" (NUTS: every point value)
    point_estimate: str
    #: the interval probability used when ``ci_prob`` is omitted (REML/ML 0.95, NUTS ArviZ's 0.89)
    default_ci_prob: float

    @property
    def nobs(self) -> int:
        """Number of observations."""

    @property
    def sigma(self) -> float:
        """Residual standard deviation (REML/ML estimate, or posterior mean)."""

    @property
    def fixef(self) -> pd.Series:
        """Fixed effects: Series indexed by coefficient, named ``estimate``."""

    @property
    def varcorr(self) -> pd.DataFrame:
        """Variance components: columns ``grp, var1, var2, vcov, sdcor``, the residual last."""

    @property
    def fitted(self) -> pd.Series:
        """Conditional fitted values Xβ + Zb over the data's rows."""

    @property
    def residuals(self) -> pd.Series:
        """Response minus :attr:`fitted`."""

    def fixef_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Per coefficient ``estimate, std_error, lower, upper`` and more; ``attrs["ci_prob"]``."""

    def varcorr_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Per sd, correlation and σ ``grp, var1, var2, estimate, lower, upper`` and more."""

    def confint(self, ci_prob: float = 0.95) -> pd.DataFrame:
        """``estimate, lower, upper`` of every sd, correlation, σ and fixed effect, named as lme4's."""

    def ranef(self, ci_prob: float | None = None) -> dict[str, pd.DataFrame]:
        """Random effects, one frame per grouping factor as written in the formula."""

    def ranef_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Random effects as one long table (``grpvar, term, grp`` first)."""

    def coef(self) -> dict[str, pd.DataFrame]:
        """Fixed plus random effects per level, one frame per grouping factor."""

    def block_covariances(self) -> list[np.ndarray]:
        """Each random-effect block's covariance matrix (estimate, or posterior mean)."""

    def predict(self, newdata=None, kind: str = "conditional", new_groups: str = "population"):
        """Predicted means for ``newdata`` (the training rows when omitted)."""

    def marginal_means(self, spec, by=None, at=None, ci_prob: float | None = None) -> pd.DataFrame:
        """emmeans' marginal means of factor(s) ``spec``: their columns, ``estimate, std_error, lower, upper``."""

    def contrasts(self, spec, method="pairwise", by=None, at=None, adjust: str | None = None,
                  ci_prob: float | None = None) -> pd.DataFrame:
        """Contrasts of the marginal means: ``by…, contrast, estimate, std_error, lower, upper`` and more."""

    def summary(self):
        """The printed summary (text with ``print``, HTML in a notebook)."""

    def save(self, path):
        """Write the fit to a file that ``bayeslmm.load`` reads back."""


def varcorr_rows(varcorr: pd.DataFrame) -> Iterator[tuple[str, str, str | None, str | None]]:
    """``(kind, group, var1, var2)`` for each row of ``varcorr``, in its order.

    ``kind`` is ``"sigma"`` (the residual row: both variables None), ``"sd"``
    (``var2`` None) or ``"cor"``; a missing variable reads None whether the frame
    holds None or NaN (pandas stores None as NaN).  The one walker of these rows:
    the labels of :func:`confint_labels` and of ``compare`` format what it yields.
    """
    for grp, v1, v2 in zip(varcorr["grp"], varcorr["var1"], varcorr["var2"]):
        if grp == "Residual":
            yield "sigma", grp, None, None
        elif v2 is None or (isinstance(v2, float) and np.isnan(v2)):
            yield "sd", grp, v1, None
        else:
            yield "cor", grp, v1, v2


def confint_labels(varcorr: pd.DataFrame) -> list[str]:
    """lme4's ``confint(oldNames = FALSE)`` names of ``varcorr``'s rows.

    ``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject`` (the later column
    first, as lme4), ``sigma``.
    """
    formats = {"sigma": "sigma", "sd": "sd_{v1}|{grp}", "cor": "cor_{v2}.{v1}|{grp}"}
    return [formats[kind].format(grp=grp, v1=v1, v2=v2) for kind, grp, v1, v2 in varcorr_rows(varcorr)]
