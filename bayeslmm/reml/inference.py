"""t and F tests of a REML/ML fit's fixed effects, with Satterthwaite's or Kenward–Roger's df.

What lmerTest adds to lme4 (Kuznetsova, Brockhoff & Christensen 2017): the
coefficient table's df and p-values, F tests per model term (type III by default, or
type II, as lmerTest's ``anova(m, type = )``) and of any hypothesis matrix L (its
``contest``).  The df come from :mod:`bayeslmm.reml.satterthwaite`, or with
``ddf="kenward-roger"`` (REML fits only) from :mod:`bayeslmm.reml.kenward_roger`, which
also adjusts the covariance of β̂ (the SEs and F statistics use Φ_A, as lmerTest's
``ddf = "Kenward-Roger"``); the hypotheses per term from :mod:`bayeslmm.hypotheses`.
``ddf="none"`` gives Wald tests (infinite df), which is what lme4's summary reports
without lmerTest.  Fits with a residual structure (R = σ² Λ_R(ρ)) have Satterthwaite's df
in (θ, ρ, σ), and Kenward–Roger's in (Σ, the residual parameters, σ²) (see
:class:`~bayeslmm.reml.kenward_roger.KenwardRoger`).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import BayesLMMError, ModelError
from ..hypotheses import check_matrix, find_term, type2_contrasts, type3_contrasts
from .kenward_roger import KenwardRoger
from .satterthwaite import Satterthwaite

#: the denominator-df methods
DDF_METHODS = ("satterthwaite", "kenward-roger", "none")


def check_ddf(ddf: str) -> str:
    if ddf not in DDF_METHODS:
        raise BayesLMMError(f"ddf must be one of {list(DDF_METHODS)} (Satterthwaite's approximation, "
                            f"Kenward-Roger's, or Wald tests with no df), got {ddf!r}")
    return ddf


def kenward_roger_for(fit) -> KenwardRoger:
    """The fit's Kenward–Roger pieces at its θ, σ (and residual parameters); REML fits only."""
    if fit.method != "REML":
        raise ModelError("Kenward-Roger degrees of freedom are defined for REML fits only: refit with "
                         "method='reml', or use ddf='satterthwaite' with this ML fit")
    rho = None if fit.spec.residual is None else fit.spec.residual.unconstrained(fit.residual_params)
    return KenwardRoger(fit.spec, fit.theta, fit.sigma, residual=rho)


def satterthwaite_for(fit) -> Satterthwaite | None:
    """The fit's Satterthwaite pieces at its θ and σ; None (with a warning) where undefined."""
    # with a residual structure the variance parameters are (θ, ρ, σ), ρ as the fit optimised it
    rho = None if fit.spec.residual is None else fit.spec.residual.unconstrained(fit.residual_params)
    try:
        return Satterthwaite(fit.spec, fit.theta, fit.sigma, reml=fit.method == "REML", residual=rho)
    except ModelError as exc:
        warnings.warn(f"no Satterthwaite degrees of freedom for this fit: {exc}", RuntimeWarning, stacklevel=4)
        return None


def coefficient_tests(fit, ddf: str) -> pd.DataFrame:
    """Per coefficient: SE, df and the two-sided p-value of t = β̂/SE (normal where ``ddf="none"``;
    the SE is Kenward–Roger's adjusted one where ``ddf="kenward-roger"``)."""
    out = contrast_tests(fit, np.eye(fit.spec.n_fixed), ddf)[["std_error", "df", "p_value"]]
    out.index = fit.fixef.index
    return out


def contrast_tests(fit, L, ddf: str = "satterthwaite") -> pd.DataFrame:
    """One t test per row ℓ of L: ``estimate`` ℓβ̂, ``std_error`` √(ℓCℓᵀ), ``df``, ``t_value``,
    two-sided ``p_value`` (unadjusted).  The building block of coefficient tables, marginal
    means and contrasts.  With ``ddf="kenward-roger"`` C is Kenward–Roger's adjusted Φ_A."""
    L = check_matrix(L, list(fit.fixef.index))
    beta = fit.fixef.to_numpy()
    est = L @ beta
    vcov = fit.kenward_roger.vcov if check_ddf(ddf) == "kenward-roger" else fit.vcov.to_numpy()
    se = np.sqrt(np.einsum("ia,ab,ib->i", L, vcov, L))
    if ddf == "none":
        df = np.full(len(L), np.inf)
    elif ddf == "kenward-roger":
        df = np.array([fit.kenward_roger.df(row) for row in L])
    else:
        sat = fit.satterthwaite
        df = np.array([sat.df(row) for row in L]) if sat is not None else np.full(len(L), np.nan)
    t = est / se
    p = np.where(np.isinf(df), 2 * stats.norm.sf(np.abs(t)), 2 * stats.t.sf(np.abs(t), df))
    return pd.DataFrame({"estimate": est, "std_error": se, "df": df, "t_value": t, "p_value": p})


def f_test(fit, L, ddf: str = "satterthwaite") -> dict:
    """F test of H₀: Lβ = 0: F, numerator and denominator df (Kenward–Roger's adds ``F_unscaled`` and
    its ``scale`` λ: F = λ·F_unscaled)."""
    beta = fit.fixef.to_numpy()
    if check_ddf(ddf) == "kenward-roger":
        return fit.kenward_roger.f_test(L, beta)
    if ddf == "satterthwaite":
        sat = fit.satterthwaite
        if sat is None:
            raise ModelError("Satterthwaite degrees of freedom are not defined for this fit (see the "
                             "warning); use ddf='none' for a Wald test")
        return sat.f_test(L, beta)
    L = check_matrix(L, list(fit.fixef.index))
    M = L @ fit.vcov.to_numpy() @ L.T
    F = float((L @ beta) @ np.linalg.solve(M, L @ beta)) / len(L)
    return {"F": F, "num_df": len(L), "den_df": np.inf}


def with_p_value(res: dict) -> dict:
    """Add the upper-tail p-value: F(num_df, den_df), or χ²(num_df)/num_df for Wald (infinite df)."""
    F, k, d = res["F"], res["num_df"], res["den_df"]
    res["p_value"] = float(stats.chi2.sf(F * k, k) if np.isinf(d) else stats.f.sf(F, k, d))
    return res


def term_hypotheses(fit, type: int) -> dict[str, np.ndarray]:
    """Each fixed-effect term's hypothesis rows (type III or II), in formula order."""
    from ..formula.terms import factor_levels, factor_parts, fixed_terms

    if type not in (2, 3):
        raise BayesLMMError(f"type must be 3 (lmerTest's default) or 2, got {type!r}")
    spec = fit.spec
    spec.require_rows("F tests per term")
    terms = fixed_terms(spec)
    if type == 2:
        return {t.name: type2_contrasts(t, terms, spec.X) for t in terms if not t.is_intercept}
    levels = factor_levels(spec, terms)
    parts = factor_parts(spec, terms)
    return {t.name: type3_contrasts(t, terms, levels, parts)
            for t in terms if not t.is_intercept}


def anova_table(fit, type: int = 3, ddf: str = "satterthwaite") -> pd.DataFrame:
    """lmerTest's ``anova(m, type=, ddf=)``: one F test per term.  With Kenward–Roger's df the
    sums of squares are of the unscaled F (lmerTest's "Mean Sq"), ``f_value`` the scaled one."""
    rows = {}
    s2 = fit.sigma**2
    for name, L in term_hypotheses(fit, type).items():
        r = with_p_value(f_test(fit, L, ddf))
        ms = r.get("F_unscaled", r["F"]) * s2
        rows[name] = {"sum_sq": ms * r["num_df"], "mean_sq": ms, "num_df": r["num_df"],
                      "den_df": r["den_df"], "f_value": r["F"], "p_value": r["p_value"]}
    out = pd.DataFrame.from_dict(rows, orient="index",
                                 columns=["sum_sq", "mean_sq", "num_df", "den_df", "f_value", "p_value"])
    out.attrs.update(type=type, ddf=ddf)
    return out


def term_test(fit, term: str, type: int = 3, ddf: str = "satterthwaite") -> dict:
    """One term's F test (its name as in the formula, variables in any order)."""
    from ..formula.terms import fixed_terms

    name = find_term(fixed_terms(fit.spec), term).name
    return with_p_value(f_test(fit, term_hypotheses(fit, type)[name], ddf))
