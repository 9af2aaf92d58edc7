"""Bayesian and REML/ML fits of one model side by side, parameter by parameter.

``compare(bayes_fit, reml_fit)`` returns one table: for each fixed effect, each sd and
correlation of every random-effect block, and σ, the posterior mean, median, sd and
interval beside the REML (or ML) estimate, its standard error (fixed effects) and a
confidence interval at the same probability:

* fixed effects: Wald, β̂ ± z·SE (lme4's ``confint(method = "Wald")``);
* sds, correlations and σ: profile likelihood (lme4's ``confint(method = "profile")``,
  which profiles the ML deviance, refitting a REML fit by ML; see
  :mod:`bayeslmm.reml.profile`).  No standard error is given for these: their
  sampling distributions are skewed and bounded, and a Wald SE would mislead.

``diff_sd`` is (posterior mean − estimate) / posterior sd: how many posterior sds the
point estimate sits from the posterior mean.  For sds expect it to be positive: the
REML estimate is near the mode of a right-skewed likelihood, and the posterior mean
lies to its right.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from .errors import BayesLMMError, ModelError
from .results_api import varcorr_rows

#: ``intervals="auto"`` profiles when :func:`~bayeslmm.reml.profile.profile_work` is at most
#: this (a rule on the model's size, not on time: the same table on every machine).  A
#: dense block of ~250 columns with four variance parameters reaches it; sleepstudy's work
#: is 2.3e3, InstEval's 2.0e9
AUTO_PROFILE_MAX_WORK = 2e7
INTERVALS = ("auto", "profile", "wald", "none")


class ReportFrame(pd.DataFrame):
    """A DataFrame that prints with a heading and notes (plain text and HTML).

    Everything pandas does with it returns plain DataFrames; ``heading`` and
    ``notes`` are lists of lines; ``objects`` holds related Python objects (such as the
    fits an ``anova`` compared); columns named in ``attrs["hide"]`` are left out of
    the printed table (they stay in the frame).
    """

    _metadata = ["heading", "notes", "objects"]

    @property
    def _constructor(self):
        return pd.DataFrame

    @classmethod
    def of(cls, frame: pd.DataFrame, heading: list[str], notes: list[str], objects: dict | None = None,
           hide: list[str] | None = None) -> "ReportFrame":
        out = cls(frame)
        out.heading = list(heading)
        out.notes = list(notes)
        out.objects = dict(objects or {})
        if hide:
            out.attrs["hide"] = list(hide)
        out.attrs.update(frame.attrs)
        return out

    def to_frame(self) -> pd.DataFrame:
        """The table alone, as a plain DataFrame."""
        return pd.DataFrame(self)

    def _formatted(self) -> pd.DataFrame:
        out = pd.DataFrame(self).drop(columns=self.attrs.get("hide", []), errors="ignore")
        for col in out.columns:
            if pd.api.types.is_float_dtype(out[col]):
                out[col] = [("" if not np.isfinite(v) and np.isnan(v) else _fmt(v)) for v in out[col]]
        return out

    def __str__(self) -> str:
        lines = list(getattr(self, "heading", []) or [])
        if lines:
            lines.append("")
        lines += self._formatted().to_string().splitlines()
        notes = getattr(self, "notes", []) or []
        if notes:
            lines.append("")
            lines += [f"Note: {n}" for n in notes]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "<br>".join(html.escape(x) for x in (getattr(self, "heading", []) or []))
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in (getattr(self, "notes", []) or []))
        table = self._formatted().to_html()
        return (f"<div><p>{head}</p>{table}" + (f"<ul>{notes}</ul>" if notes else "") + "</div>")


def _fmt(v: float) -> str:
    return f"{v:.5g}"


def _structure(spec):
    """The residual structure as written (its structures and weights, not the rows), None for σ²I."""
    res = getattr(spec, "residual", None)
    if res is None:
        return None
    d = res.describe()
    return d["variance"], d["correlation"], d["weights"], res.names


def _same_model(bayes, freq) -> None:
    a, b = bayes.spec, freq.spec
    same = (a.fixed_names == b.fixed_names and a.n_obs == b.n_obs and _structure(a) == _structure(b)
            and [(x.group, x.columns, x.correlated) for x in a.blocks]
            == [(x.group, x.columns, x.correlated) for x in b.blocks])
    if same and getattr(a, "rows_in_memory", True) and getattr(b, "rows_in_memory", True):
        same = np.array_equal(a.y, b.y)
    if not same:
        why = "; their residual structures differ" if _structure(a) != _structure(b) else ""
        raise ModelError(f"the two fits are not of the same model and data ({a.formula!r}, {a.n_obs} rows vs "
                         f"{b.formula!r}, {b.n_obs} rows{why}); fit one Model both ways: model.fit('nuts'), "
                         "model.fit('reml')")


def _var_labels(vc: pd.DataFrame) -> list[str]:
    """compare's row names of ``varcorr``: ``sd[Subject|(Intercept)]``, ``corr[Subject|(Intercept),Days]``, ``sigma``."""
    formats = {"sigma": "sigma", "sd": "sd[{grp}|{v1}]", "cor": "corr[{grp}|{v1},{v2}]"}
    return [formats[kind].format(grp=grp, v1=v1, v2=v2) for kind, grp, v1, v2 in varcorr_rows(vc)]


def _var_terms(vc: pd.DataFrame) -> list[str]:
    """The ``term`` column of ``varcorr``'s rows: the effect, the pair ``v1,v2``, or nothing for σ."""
    formats = {"sigma": "", "sd": "{v1}", "cor": "{v1},{v2}"}
    return [formats[kind].format(v1=v1, v2=v2) for kind, _, v1, v2 in varcorr_rows(vc)]


def compare(bayes_fit, freq_fit, ci_prob: float | None = None, intervals: str = "auto") -> ReportFrame:
    """One table of the posterior beside the REML/ML estimates, parameter by parameter.

    Parameters
    ----------
    bayes_fit : BayesFit
    freq_fit : FreqFit
        A REML or ML fit of the same model and data (the order of the two may be swapped).
    ci_prob : float, optional
        Probability of both intervals: the posterior's equal-tailed interval and the
        frequentist confidence interval.  ArviZ's default (0.89) when omitted.
    intervals : {"auto", "profile", "wald", "none"}
        Frequentist intervals: ``"profile"``, Wald for the fixed effects and profile
        likelihood for the sds, correlations and σ; ``"wald"``, the fixed effects' only
        (the rest NaN); ``"none"``, no frequentist interval.  ``"auto"`` (default) is
        ``"profile"`` unless the model is so large (by
        :func:`~bayeslmm.reml.profile.profile_work` above ``AUTO_PROFILE_MAX_WORK``) that
        the profile would take minutes, and then says so in the notes.  The rule reads
        the model's size, never the clock, so the table is the same on any machine.
        A parameter whose profile fails gets no interval and a note; the rest are kept.

    Returns
    -------
    ReportFrame (a DataFrame) indexed ``beta[...]``, ``sd[group|term]``,
    ``corr[group|term1,term2]``, ``sigma``, in the order of ``fixef_table()``
    and ``varcorr``, then ``residual[Phi]``, ``residual[power]``, … for a residual structure
    (posterior of the ``residual_*`` variables beside ``residual_params``, nlme's scale; fits of
    the same structure only); columns ``group, term, post_mean, post_median, post_sd,
    post_lower, post_upper, r_hat, ess_bulk, estimate, se, lower, upper, diff_sd``.
    """
    from .group_frames import posterior_ci_prob

    bayes_fit, freq_fit = _checked_pair(bayes_fit, freq_fit, intervals)
    prob = posterior_ci_prob(ci_prob)
    post, pfe = _posterior_rows(bayes_fit, prob)
    fe, vc = freq_fit.fixef_table(prob, ddf="none"), freq_fit.varcorr  # Wald, as documented above
    res = list(freq_fit.residual_params or {})   # a residual structure's parameters, after σ
    freq, method, notes = _frequentist_rows(freq_fit, fe, vc, intervals, prob)
    table = pd.DataFrame({
        "group": ["fixed"] * len(fe) + list(vc["grp"]) + ["residual"] * len(res),
        "term": list(fe.index) + _var_terms(vc) + res,
        "post_mean": post["estimate"].to_numpy(), "post_median": post["median"].to_numpy(),
        "post_sd": post["std_error"].to_numpy(), "post_lower": post["lower"].to_numpy(),
        "post_upper": post["upper"].to_numpy(), "r_hat": post["r_hat"].to_numpy(),
        "ess_bulk": post["ess_bulk"].to_numpy(), **freq,
    }, index=[f"beta[{n}]" for n in fe.index] + _var_labels(vc) + [f"residual[{n}]" for n in res])
    table["diff_sd"] = (table["post_mean"] - table["estimate"]) / table["post_sd"]
    table.attrs.update(ci_prob=prob, interval=pfe.attrs.get("interval"), freq_method=freq_fit.method,
                       freq_intervals=method)
    if freq_fit.singular:
        notes.append(f"the {freq_fit.method} fit is singular (a variance on its boundary); the posterior keeps "
                     "it away from 0 and diff_sd is large there by construction")
    return ReportFrame.of(table, _heading(bayes_fit, freq_fit, prob, method), notes, hide=["group", "term"])


def _checked_pair(bayes_fit, freq_fit, intervals):
    """(the NUTS fit, the REML/ML fit), in either order given; both of one model, ``intervals`` known."""
    from .bayes.results import BayesFit
    from .reml.results import FreqFit

    if isinstance(bayes_fit, FreqFit) and isinstance(freq_fit, BayesFit):
        bayes_fit, freq_fit = freq_fit, bayes_fit
    if not isinstance(bayes_fit, BayesFit) or not isinstance(freq_fit, FreqFit):
        raise BayesLMMError("compare(bayes_fit, reml_fit) needs a NUTS fit and a REML/ML fit, got "
                            f"{type(bayes_fit).__name__} and {type(freq_fit).__name__}")
    if not isinstance(intervals, str) or intervals not in INTERVALS:
        raise BayesLMMError(f"intervals must be one of {', '.join(map(repr, INTERVALS))}, got {intervals!r}")
    _same_model(bayes_fit, freq_fit)
    return bayes_fit, freq_fit


def _posterior_rows(bayes_fit, prob: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The posterior's fixed effects then its varcorr rows, one frame (and the fixed effects' own)."""
    pfe = bayes_fit.fixef_table(prob)
    pvc = bayes_fit.varcorr_table(prob)
    parts = [pfe.reset_index(drop=True), pvc[pfe.columns].reset_index(drop=True)]
    if bayes_fit.spec.residual is not None:
        parts.append(bayes_fit.residual_table(prob)[pfe.columns].reset_index(drop=True))
    post = pd.concat(parts, ignore_index=True)
    return post, pfe


def _frequentist_rows(freq_fit, fe: pd.DataFrame, vc: pd.DataFrame, intervals: str, prob: float):
    """The columns ``estimate, se, lower, upper`` (fixed effects, then varcorr's rows, then a residual
    structure's parameters), method words, notes.

    Wald intervals of the fixed effects come with ``fe``; the variances' are computed
    by :func:`_variance_intervals` as ``intervals`` asks.
    """
    res = list((freq_fit.residual_params or {}).values())
    n_var = len(vc) + len(res)
    est = np.concatenate([fe["estimate"].to_numpy(), vc["sdcor"].to_numpy(), res])
    se = np.concatenate([fe["std_error"].to_numpy(), np.full(n_var, np.nan)])
    lower = np.concatenate([fe["lower"].to_numpy(), np.full(n_var, np.nan)])
    upper = np.concatenate([fe["upper"].to_numpy(), np.full(n_var, np.nan)])
    method, notes = _variance_intervals(freq_fit, intervals, prob, lower[len(fe):], upper[len(fe):])
    if intervals == "none":
        lower[:], upper[:] = np.nan, np.nan
        method = "no intervals"
        notes.append("no frequentist intervals (intervals='none'); intervals='profile' computes them")
    return {"estimate": est, "se": se, "lower": lower, "upper": upper}, method, notes


def _heading(bayes_fit, freq_fit, prob: float, method: str) -> list[str]:
    pst = bayes_fit.posterior
    return [f"Posterior (NUTS, {pst.sizes['chain']} chains × {pst.sizes['draw']} draws) beside {freq_fit.method}: "
            f"{bayes_fit.spec.formula}",
            f"Intervals at {prob:.0%}: posterior equal-tailed; {freq_fit.method} {method}.",
            "diff_sd = (posterior mean − estimate) / posterior sd"]


def _variance_intervals(freq_fit, intervals: str, prob: float, lower: np.ndarray, upper: np.ndarray):
    """Fill the sds', correlations' and σ's interval ends in place; (method words, notes)."""
    from .reml.profile import profile_intervals, profile_work

    method = "Wald for the fixed effects"
    notes: list[str] = []
    if intervals in ("wald", "none"):
        if intervals == "wald":
            notes.append("no frequentist interval for the sds, correlations and σ (intervals='wald'); "
                         "intervals='profile' computes profile-likelihood ones")
        return method, notes
    if intervals == "auto":
        work = profile_work(freq_fit)
        if not np.isfinite(work):
            return method, ["profile intervals of the variance parameters skipped: the model was built out "
                            "of memory (no rows to profile)"]
        if work > AUTO_PROFILE_MAX_WORK:
            return method, [f"profile intervals of the variance parameters skipped: the model is large "
                            f"(profile work {work:.2g} > {AUTO_PROFILE_MAX_WORK:.2g}; it could take minutes); "
                            "pass intervals='profile' (command line: --intervals profile) to compute them"]
    try:
        prof = profile_intervals(freq_fit, prob)
    except (BayesLMMError, ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        # the two fits are done: a failed profile must not lose them
        return method, [f"profile intervals could not be computed ({type(exc).__name__}: {exc}); the sds, "
                        "correlations and σ have none"]
    lower[:] = prof["lower"].to_numpy()
    upper[:] = prof["upper"].to_numpy()
    notes += [f"profile: {n}" for n in prof.attrs.get("notes", [])]
    method += "; profile likelihood (ML deviance, as lme4's confint) for the sds, correlations and σ"
    if freq_fit.residual_params:
        method += " and the residual structure's parameters"
    return method, notes
