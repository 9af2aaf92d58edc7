"""The frequentist fit: lme4's answers as pandas objects, and a summary an lme4 user reads at once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..deprecation import renamed_kwargs
from ..errors import BayesLMMError, DataError, ModelError
from ..group_frames import check_ci_prob, coef_frames, frames_by_group, normal_quantile, with_intervals
from ..spec import ModelSpec
from .estimates import Estimates
from .optimize import OptimizationRecord

if TYPE_CHECKING:
    from .summary import FreqSummary

#: lme4's tolerance for calling a fit singular (``isSingular(tol = 1e-4)``)
SINGULAR_TOL = 1e-4


@dataclass(frozen=True, eq=False)
class FreqFit:
    """A REML or ML fit of a linear mixed model.

    Attributes
    ----------
    spec : ModelSpec
    method : {"REML", "ML"}
    theta : ndarray
        lme4's θ (relative Cholesky factors, lower triangles column by column,
        blocks by decreasing number of levels).
    objective : float
        REML criterion or deviance (−2 log-likelihood), on lme4's scale.
    optimization : OptimizationRecord
    residual_params : dict or None
        The residual structure's parameters on nlme's scale (varIdent sd ratios, varPower
        ``power``, corAR1 ``Phi``, ...; see :mod:`bayeslmm.residual`); None for σ² I.
    residual_structure : dict or None
        The structure and the columns it reads, as saved (``ResidualModel.describe``).
    """

    spec: ModelSpec
    method: str
    theta: np.ndarray
    objective: float
    estimates: Estimates
    optimization: OptimizationRecord
    data_name: str | None = None
    residual_params: dict | None = None
    residual_structure: dict | None = None

    #: what this fit's point values are (the random effects': conditional modes b̂); see
    #: :class:`bayeslmm.results_api.MixedFit`
    point_estimate = "conditional mode"
    #: the interval probability used when ``ci_prob`` is omitted
    default_ci_prob = 0.95

    # -- scalars --------------------------------------------------------------
    @property
    def nobs(self) -> int:
        return self.spec.n_obs

    @property
    def sigma(self) -> float:
        """Residual standard deviation."""
        return self.estimates.sigma

    @property
    def n_params(self) -> int:
        """Parameters counted by AIC/BIC: θ, β, σ (lme4's ``df`` of ``logLik``) and any residual
        structure's parameters (as nlme)."""
        return self.spec.n_theta + self.spec.n_fixed + 1 + len(self.residual_params or {})

    @property
    def loglik(self) -> float:
        """Log-likelihood (REML log restricted likelihood for REML fits), as lme4's ``logLik``."""
        return -0.5 * self.objective

    @property
    def aic(self) -> float:
        return self.objective + 2 * self.n_params

    @property
    def bic(self) -> float:
        """lme4's BIC, with log N for REML fits too (nlme's REML BIC uses log(N − p))."""
        return self.objective + np.log(self.nobs) * self.n_params

    @property
    def singular(self) -> bool:
        """True when a variance or correlation is on the boundary (lme4's ``isSingular``)."""
        lower = self.spec.theta_lower
        on_bound = lower == 0
        return bool(np.any(self.theta[on_bound] < SINGULAR_TOL))

    # -- fixed effects --------------------------------------------------------
    @property
    def fixef(self) -> pd.Series:
        """Fixed-effect estimates β̂: a Series indexed by coefficient, named ``estimate``."""
        return pd.Series(self.estimates.beta, index=list(self.spec.fixed_names), name="estimate")

    @property
    def vcov(self) -> pd.DataFrame:
        """Covariance matrix of β̂ (lme4's ``vcov``)."""
        names = list(self.spec.fixed_names)
        return pd.DataFrame(self.estimates.vcov_beta, index=names, columns=names)

    @property
    def fixef_se(self) -> pd.Series:
        """Standard errors of β̂."""
        return pd.Series(np.sqrt(np.diag(self.estimates.vcov_beta)), index=list(self.spec.fixed_names),
                         name="Std. Error")

    def fixef_table(self, ci_prob: float | None = None, ddf: str = "satterthwaite") -> pd.DataFrame:
        """β̂ with its standard error, interval, t value, df and p-value, one row per coefficient.

        Columns ``estimate, std_error, lower, upper, t_value, df, p_value`` (lme4's
        summary prints "Estimate", "Std. Error", "t value"; lmerTest adds "df" and
        "Pr(>|t|)").  ``df`` is Satterthwaite's (``ddf="satterthwaite"``, lmerTest's
        default) and the interval β̂ ± t_df·SE at ``ci_prob`` (default 0.95, in
        ``attrs["ci_prob"]``); ``ddf="kenward-roger"`` (REML fits) gives Kenward–Roger's
        df and adjusted SEs, as lmerTest's ``summary(m, ddf = "Kenward-Roger")``;
        ``ddf="none"`` gives Wald's: normal quantiles and infinite df.
        """
        from .inference import coefficient_tests

        prob = check_ci_prob(ci_prob, self.default_ci_prob)
        est = self.fixef
        tests = coefficient_tests(self, ddf)
        se = tests["std_error"]
        q = np.where(np.isinf(tests["df"]), normal_quantile(prob), _t_quantile(prob, tests["df"].to_numpy()))
        out = pd.DataFrame({"estimate": est, "std_error": se, "lower": est - q * se, "upper": est + q * se,
                            "t_value": est / se, "df": tests["df"], "p_value": tests["p_value"]})
        out.attrs.update(ci_prob=prob, ddf=ddf)
        return out

    # -- tests of the fixed effects (lmerTest's) -------------------------------------
    @cached_property
    def satterthwaite(self):
        """Satterthwaite's pieces at this fit (:class:`~bayeslmm.reml.satterthwaite.Satterthwaite`), or
        None where the deviance is not at a minimum; computed once, from the cross-products."""
        from .inference import satterthwaite_for

        return satterthwaite_for(self)

    @cached_property
    def kenward_roger(self):
        """Kenward–Roger's pieces at this REML fit (:class:`~bayeslmm.reml.kenward_roger.KenwardRoger`:
        the adjusted covariance ``vcov`` and the df); computed once, from the cross-products.
        Raises ModelError for an ML fit."""
        from .inference import kenward_roger_for

        return kenward_roger_for(self)

    def anova(self, type: int = 3, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F test per fixed-effect term, as lmerTest's ``anova(m, type = , ddf = )``.

        Type III (default): each term's hypothesis averaged over the other factors'
        levels, covariates at 0; type II: each term adjusted for the terms that do not
        contain it (see :mod:`bayeslmm.hypotheses`).  Columns ``sum_sq, mean_sq,
        num_df, den_df, f_value, p_value`` (lmerTest's Sum Sq … Pr(>F)); ``ddf="kenward-roger"``
        gives Kenward–Roger's scaled F and df (REML fits; ``mean_sq`` is of the unscaled F,
        as lmerTest); ``ddf="none"`` gives Wald tests (infinite den_df, χ² p-values).
        """
        from .inference import anova_table

        return anova_table(self, type=type, ddf=ddf)

    def f_test(self, L, ddf: str = "satterthwaite") -> dict:
        """F test of H₀: Lβ = 0 for a hypothesis matrix L (rows over ``fixef``'s columns), as
        lmerTest's ``contest(m, L, joint = TRUE)``: ``F, num_df, den_df, p_value`` (``ddf`` as in
        :meth:`anova`; Kenward–Roger's adds ``F_unscaled`` and ``scale``)."""
        from .inference import f_test, with_p_value

        return with_p_value(f_test(self, L, ddf))

    @property
    def theta_series(self) -> pd.Series:
        return pd.Series(self.theta, index=self.spec.theta_labels(), name="theta")

    # -- variance components -------------------------------------------------
    def block_covariances(self) -> list[np.ndarray]:
        """σ² T Tᵀ for each random-effect block."""
        s2 = self.sigma**2
        return [s2 * (T @ T.T) for T in (b.T(t) for b, t in zip(self.spec.blocks, self.spec.split_theta(self.theta)))]

    @property
    def varcorr(self) -> pd.DataFrame:
        """Variance components like R's ``as.data.frame(VarCorr(fit))``.

        Columns ``grp, var1, var2, vcov, sdcor``: a variance row has ``var2`` missing
        and ``sdcor`` the standard deviation; a covariance row has both names and
        ``sdcor`` the correlation; the last row is the residual.  A correlation
        involving an effect whose variance is exactly 0 is undefined (lme4 prints
        NaN); it is reported as 0 and the fit is flagged :attr:`singular`.
        """
        rows = []
        for block, cov in zip(self.spec.blocks, self.block_covariances()):
            sd = np.sqrt(np.diag(cov))
            for i, name in enumerate(block.columns):
                rows.append((block.group, name, None, cov[i, i], sd[i]))
            if block.correlated:
                for i in range(block.q):
                    for j in range(i + 1, block.q):
                        denom = sd[i] * sd[j]
                        corr = float(np.clip(cov[j, i] / denom, -1.0, 1.0)) if denom > 0 else 0.0
                        rows.append((block.group, block.columns[i], block.columns[j], cov[j, i], corr))
        rows.append(("Residual", None, None, self.sigma**2, self.sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    def varcorr_table(self, ci_prob: float | None = None, method: str = "profile") -> pd.DataFrame:
        """Every sd, correlation and σ with its interval, rows as :attr:`varcorr`.

        Columns ``grp, var1, var2, estimate, lower, upper`` (estimate: the sd or the
        correlation); the interval is :meth:`confint`'s with the same ``method``
        (profile likelihood by default; ``"wald"`` gives NaN, as lme4).
        ``attrs`` holds ``ci_prob``, ``method`` and confint's ``notes``.
        """
        ci = self.confint(check_ci_prob(ci_prob, self.default_ci_prob), method=method)
        vc = self.varcorr
        var = ci.iloc[: len(vc)]
        out = pd.DataFrame({"grp": vc["grp"], "var1": vc["var1"], "var2": vc["var2"],
                            "estimate": vc["sdcor"].to_numpy(), "lower": var["lower"].to_numpy(),
                            "upper": var["upper"].to_numpy()})
        out.attrs.update(ci.attrs)
        return out

    # -- random effects ------------------------------------------------------
    def _condsd(self) -> list[np.ndarray]:
        if not self.estimates.b_condvar:
            raise ModelError("conditional variances were not computed for this fit: refit it with "
                             "Model.fit(method='reml' or 'ml')")
        return [np.sqrt(np.maximum(np.diagonal(cv, axis1=1, axis2=2), 0.0)) for cv in self.estimates.b_condvar]

    def ranef(self, ci_prob: float | None = None) -> dict[str, pd.DataFrame]:
        """Conditional modes of the random effects, one frame per grouping factor.

        Keyed by the group as written in the formula; blocks on the same factor
        (``(1|g) + (0 + x|g)``, or ``||``) share a frame, columns in model order.
        With ``ci_prob``, each frame has two column levels, ``("estimate" | "lower" |
        "upper", column)``: the modes ± z·conditional sd (lme4's ``condVar``
        intervals; ``frame["estimate"]`` is the frame returned without it).
        """
        if ci_prob is None:
            return frames_by_group(self.spec, self.estimates.b)
        prob = check_ci_prob(ci_prob, 0.95)
        z = normal_quantile(prob)
        sds = self._condsd()
        return with_intervals(self.spec, self.estimates.b, [b - z * sd for b, sd in zip(self.estimates.b, sds)],
                              [b + z * sd for b, sd in zip(self.estimates.b, sds)], "estimate", prob)

    def ranef_table(self, ci_prob: float | None = None) -> pd.DataFrame:
        """Long table like R's ``as.data.frame(ranef(fit, condVar = TRUE))``.

        Columns ``grpvar, term, grp, estimate, std_error`` (the conditional mode and
        conditional sd: the columns every fit's ``ranef_table`` starts with); with
        ``ci_prob``, ``lower, upper`` = estimate ± z·std_error; then ``condval, condsd``
        (the same numbers under lme4's names).
        """
        sds = self._condsd()
        z = None if ci_prob is None else normal_quantile(check_ci_prob(ci_prob, 0.95))
        parts = []
        for block, b, sd in zip(self.spec.blocks, self.estimates.b, sds):
            for a, name in enumerate(block.columns):
                part = pd.DataFrame({"grpvar": block.group, "term": name, "grp": list(block.levels),
                                     "estimate": b[:, a], "std_error": sd[:, a]})
                if z is not None:
                    part["lower"], part["upper"] = b[:, a] - z * sd[:, a], b[:, a] + z * sd[:, a]
                part["condval"], part["condsd"] = b[:, a], sd[:, a]
                parts.append(part)
        out = pd.concat(parts, ignore_index=True)
        if ci_prob is not None:
            out.attrs["ci_prob"] = float(ci_prob)
        return out

    def coef(self) -> dict[str, pd.DataFrame]:
        """Fixed plus random effects per level, like lme4's ``coef``: one frame per grouping factor."""
        return coef_frames(self.spec, self.fixef, self.estimates.b)

    # -- observations ----------------------------------------------------------
    @property
    def fitted(self) -> pd.Series:
        """Conditional fitted values Xβ̂ + Zb̂."""
        return pd.Series(self.estimates.fitted, index=self.spec.row_index, name="fitted")

    @property
    def residuals(self) -> pd.Series:
        """Response minus conditional fitted values (raw; see :attr:`normalized_residuals`)."""
        return pd.Series(self.spec.y - self.estimates.fitted, index=self.spec.row_index, name="residuals")

    @property
    def normalized_residuals(self) -> pd.Series:
        """W(ρ̂)(y − Xβ̂ − Zb̂)/σ̂, nlme's ``residuals(fit, type = "normalized")``: uncorrelated with
        unit variance under the model's residual structure (raw residuals / σ̂ for σ² I)."""
        raw = self.residuals.to_numpy()
        if self.spec.residual is None:
            values = raw / self.sigma
        else:
            from .residual_fit import normalized_residuals

            values = normalized_residuals(self.spec, self.residual_params, raw, self.sigma)
        return pd.Series(values, index=self.spec.row_index, name="normalized_residuals")

    def marginal_covariance(self, level, group: str | None = None) -> pd.DataFrame:
        """Marginal covariance V_j = Z_j G Z_jᵀ + R_j of the observations in one group.

        R_j = σ² I, or with a residual structure the group's rows of R = σ² Λ_R(ρ̂) (their
        variances and within-group correlations), as nlme's ``getVarCov(fit, type = "marginal")``.

        Parameters
        ----------
        level : label
            A level of ``group`` (compared as a string, so ``308`` and ``"308"`` both work).
        group : str, optional
            The grouping factor; required when the model has several.

        Returns
        -------
        DataFrame indexed both ways by the data's row labels.  Every random-effect
        term contributes (for crossed factors, rows of this group that share a
        level of another factor covary through it).
        """
        self.spec.require_rows("the marginal covariance of a group's observations")
        groups = self.spec.group_names()
        if group is None:
            if len(groups) > 1:
                raise BayesLMMError(f"the model has several grouping factors {groups}; pass group=")
            group = groups[0]
        if group not in groups:
            raise BayesLMMError(f"unknown grouping factor {group!r}; the model has {groups}")
        block = next(b for b in self.spec.blocks if b.group == group)
        labels = list(block.levels)
        if str(level) not in labels:
            raise BayesLMMError(f"{level!r} is not a level of {group!r} (levels: {labels[:10]}...)")
        rows = np.flatnonzero(block.codes == labels.index(str(level)))
        V = self.sigma**2 * self._relative_residual_covariance(rows)
        for blk, G in zip(self.spec.blocks, self.block_covariances()):
            Zr = blk.Z[rows]
            same = blk.codes[rows][:, None] == blk.codes[rows][None, :]
            V += same * (Zr @ G @ Zr.T)
        idx = self.spec.row_index[rows]
        return pd.DataFrame(V, index=idx, columns=idx)

    def _relative_residual_covariance(self, rows: np.ndarray) -> np.ndarray:
        """R / σ² on ``rows``: I, or Λ_R(ρ̂) (the rows of one grouping level hold whole correlation groups)."""
        if self.spec.residual is None:
            return np.eye(len(rows))
        from ..residual import relative_covariance

        return relative_covariance(self.spec.residual, self.spec.residual.unconstrained(self.residual_params), rows)

    def _residual_variance(self, at) -> float:
        """σ², or with a variance function the residual variance at ``at`` (default: its mean over the rows)."""
        from .. import variance as V

        if self.spec.residual is None:
            return self.sigma**2
        return V.residual_variance(self.spec, self.sigma**2, self.spec.residual.unconstrained(self.residual_params), at)

    @renamed_kwargs(level="ci_prob")
    def confint(self, ci_prob: float = 0.95, method: str = "profile") -> pd.DataFrame:
        """Confidence intervals, rows and names as lme4's ``confint(fit, oldNames = FALSE)``.

        Parameters
        ----------
        ci_prob : float
            Coverage probability of the intervals (was ``level``, still accepted with a
            ``FutureWarning``).
        method : {"profile", "wald"}
            ``"profile"``: profile-likelihood intervals of every sd, correlation and σ
            (the ML deviance, a REML fit refitted by ML, as lme4 does; see
            :mod:`bayeslmm.reml.profile`).  ``"wald"``: NaN for those (as lme4).  The
            fixed effects get Wald intervals β̂ ± z·SE either way (lme4's profile
            method profiles them too; the two agree closely for linear mixed models).

        Returns
        -------
        DataFrame with columns ``estimate, lower, upper``: the variance parameters
        (``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``, ``sigma``, in the
        order of :attr:`varcorr`), then the fixed effects.  ``attrs["notes"]`` names the
        profile ends that are a boundary (an sd at 0, a correlation at ±1) or ``inf``
        because the profile never reaches the cutoff, and any parameter whose profile
        failed (NaN, with a warning).
        """
        from .profile import profile_intervals, variance_parameters

        if method not in ("profile", "wald"):
            raise BayesLMMError(f"method must be 'profile' or 'wald', got {method!r}")
        ci_prob = check_ci_prob(ci_prob, 0.95)
        if method == "profile":
            var = profile_intervals(self, ci_prob)
        else:
            labels = [p.label for p in variance_parameters(self.spec)]
            var = pd.DataFrame({"estimate": self.varcorr["sdcor"].to_numpy(), "lower": np.nan, "upper": np.nan},
                               index=pd.Index(labels, name="parameter"))
        z = normal_quantile(ci_prob)
        est, se = self.fixef, self.fixef_se
        fixed = pd.DataFrame({"estimate": est, "lower": est - z * se, "upper": est + z * se})
        out = pd.concat([var, fixed])
        out.index.name = "parameter"
        out.attrs.update(ci_prob=ci_prob, method=method, notes=list(var.attrs.get("notes", [])))
        return out

    # -- predictions -----------------------------------------------------------
    def predict(self, newdata=None, kind: str = "conditional", new_groups: str = "population") -> pd.Series:
        """Predicted means: Xβ̂ + Zb̂ (``kind="conditional"``) or Xβ̂ (``kind="marginal"``).

        Parameters
        ----------
        newdata : DataFrame or dict of columns, optional
            Rows to predict; the training rows when omitted (then the conditional
            prediction is :attr:`fitted`).  The fixed-effect design is rebuilt with
            the training data's contrasts and levels.
        kind : {"conditional", "marginal"}
            With the groups' conditional modes b̂, or at the population level (lme4's
            ``re.form = NULL`` / ``NA``).
        new_groups : {"population", "error"}
            A grouping level not seen in fitting gets no effect (b = 0, lme4's
            ``allow.new.levels = TRUE``), or raises.  The levels so predicted are listed
            in ``result.attrs["new_levels"]``.

        Returns
        -------
        Series indexed like ``newdata``.
        """
        from ..predict import freq_predict

        return freq_predict(self, newdata, kind, new_groups)

    # -- variance decomposition and R² ---------------------------------------------
    def variance_components(self, at: dict | None = None) -> pd.DataFrame:
        """Var(y) split into each grouping factor's part and the residual, at the point ``at``.

        For ``(1 + x | g)`` the group's part is σ²_u0 + 2σ_u01 x + σ²_u1 x² (the seeds'
        formula), so ``at={"x": value}`` is required; a random-intercept model needs
        no ``at``.  Columns ``variance, sd, proportion``; rows the grouping factors,
        ``Residual`` and ``Total``.  See :mod:`bayeslmm.variance`.

        With a variance function (``variance=``, ``weights=``) the residual variance differs by
        row: ``at`` may give its column (``at={"Sex": "Female"}``, ``{"Time": 10}``) for that
        row's σ² s²; without, ``Residual`` is the mean of σ² s_i² over the fitted rows (Nakagawa
        et al. 2017, as performance's and insight's for nlme fits).  A correlation structure
        leaves one row's variance at σ² s².
        """
        from .. import variance as V

        z = V.z_at(self.spec, at, also=V.residual_columns(self.spec))
        parts = {g: float(v) for g, v in V.group_variances(self.spec, z, self.block_covariances()).items()}
        return V.components_frame(self.spec, parts, self._residual_variance(at), at)

    def icc(self, at: dict | None = None) -> pd.Series:
        """Intraclass correlation of each grouping factor at ``at``: its share of Var(y).

        For a random intercept ICC = σ²_u / (σ²_u + σ²).
        """
        vc = self.variance_components(at)
        groups = [g for g in vc.index if g not in ("Residual", "Total")]
        out = vc.loc[groups, "proportion"].rename("ICC")
        out.attrs["at"] = vc.attrs["at"]
        return out

    def r2(self, method: str = "nakagawa") -> pd.Series:
        """Marginal (fixed effects) and conditional (fixed and random) R².

        ``method="nakagawa"``: Nakagawa & Schielzeth (2013) with Johnson's (2014)
        random-slope extension; ``"gelman"``: the residual form of Gelman et al.
        (2019) at the point estimates.  See :mod:`bayeslmm.variance`.  With a variance function
        Nakagawa's residual variance is the mean of σ² s_i² over the rows (Nakagawa et al. 2017).
        """
        from .. import variance as V
        from ..predict import require_rows

        V.check_r2_method(method)
        require_rows(self.spec, "R² (variances over the rows)")
        if method == "nakagawa":
            marg, cond = V.nakagawa_r2(self.spec, self.estimates.beta, self.block_covariances(),
                                       self._residual_variance(None))
        else:
            marg = V.gelman_r2(self.spec.y, self.spec.X @ self.estimates.beta)
            cond = V.gelman_r2(self.spec.y, self.estimates.fitted)
        out = pd.Series({"marginal": float(marg), "conditional": float(cond)}, name="R2")
        out.attrs["method"] = method
        return out

    def save(self, path):
        """Write the fit to ``path`` without pickling: a netCDF file (``.nc``) or a ``.zarr`` folder.

        ``bayeslmm.load(path)`` reads it back; see :mod:`bayeslmm.io` for what is stored.
        """
        from .. import store

        return store.save(self, path)

    #: the fields :meth:`to_record` stores in its own way; any other (added later) goes under "extra"
    RECORD_FIELDS = frozenset({"spec", "method", "theta", "objective", "estimates", "optimization", "data_name"})
    #: stored under "extra" only for a fit with a residual structure
    RESIDUAL_FIELDS = frozenset({"residual_params", "residual_structure"})

    def to_record(self) -> tuple[dict, dict]:
        """What a save holds of this fit: its JSON record (method, θ, the objective, the optimizer's
        record) and no datasets; the estimates are recomputed at θ on loading (:meth:`from_record`)."""
        from .. import store

        opt = self.optimization
        record = {
            "kind": "FreqFit",
            "data_name": self.data_name,
            "spec": store.spec_record(self.spec),
            "method": self.method,
            "theta": [float(t) for t in self.theta],
            "objective": float(self.objective),
            "optimization": {
                "optimizer": opt.optimizer,
                "start": [float(t) for t in opt.start],
                "end": [float(t) for t in opt.end],
                "objective": float(opt.objective),
                "n_evaluations": int(opt.n_evaluations),
                "tolerances": store.jsonable(opt.tolerances, "the optimizer's tolerances"),
                "message": opt.message,
                "warnings": list(opt.warnings),
                "seconds": float(opt.seconds),
            },
            "extra": store.extra_fields(self, self.RECORD_FIELDS | self.RESIDUAL_FIELDS),
        }
        if self.residual_structure is not None:  # a σ²I fit's record stays as before
            record["extra"].update(store.jsonable({k: getattr(self, k) for k in self.RESIDUAL_FIELDS}, "the "
                                                  "residual structure"))
        return record, {}

    @classmethod
    def from_record(cls, record: dict, spec: ModelSpec, groups: dict | None = None,
                    source: str = "the record") -> "FreqFit":
        """The fit of :meth:`to_record`, for ``spec`` rebuilt from the stored data.

        The estimates are recomputed at the stored θ by the fit's own route (the
        factorisation is deterministic, so every number equals the saved fit's), and the
        criterion there must equal the stored objective; otherwise a
        :class:`~bayeslmm.errors.DataError` naming ``source`` (the file).  JSON keeps
        floats' shortest round-trip repr, so θ and the objective come back bit for bit.
        """
        from .. import store
        from ..crossprod import CrossProducts
        from .solve import estimates_at

        theta = np.array(record["theta"], dtype=float)
        if theta.shape != (spec.n_theta,):
            raise DataError(f"{source}: θ has {theta.size} entries, the model needs {spec.n_theta}")
        extra = store.known_extra(cls, record)
        if extra.get("residual_structure") is not None:
            from .residual_fit import residual_estimates_at, with_residual

            spec = with_residual(spec, extra["residual_structure"])
            u = spec.residual.unconstrained(extra["residual_params"])
            again, estimates = residual_estimates_at(spec, theta, u, reml=record["method"] == "REML")
        else:
            again, estimates = estimates_at(spec, theta, reml=record["method"] == "REML",
                                            crossprods=CrossProducts.from_spec(spec))
        objective = float(record["objective"])
        if not abs(again - objective) <= 1e-8 * max(1.0, abs(objective)):
            raise DataError(f"{source}: the stored data give the objective {again!r} at the stored θ, not the "
                            f"saved {objective!r}; the file's data or θ were altered")
        o = record["optimization"]
        opt = OptimizationRecord(optimizer=o["optimizer"], start=np.array(o["start"], dtype=float),
                                 end=np.array(o["end"], dtype=float), objective=float(o["objective"]),
                                 n_evaluations=int(o["n_evaluations"]), tolerances=dict(o["tolerances"]),
                                 message=o["message"], warnings=tuple(o["warnings"]), seconds=float(o["seconds"]))
        return cls(spec=spec, method=record["method"], theta=theta, objective=objective, estimates=estimates,
                   optimization=opt, data_name=record["data_name"], **extra)

    # -- presentation ----------------------------------------------------------
    def summary(self, ddf: str = "satterthwaite") -> "FreqSummary":
        """lme4's summary with lmerTest's df and p-values: Satterthwaite's by default, or
        ``ddf="kenward-roger"`` / ``"none"`` (Wald), as ``fixef_table(ddf=)``."""
        from .inference import check_ddf
        from .summary import FreqSummary

        return FreqSummary(self, check_ddf(ddf))

    def __repr__(self) -> str:
        return str(self.summary())

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()

    def to_dict(self) -> dict:
        """Plain, JSON-ready results."""
        vc = self.varcorr.astype(object).where(self.varcorr.notna(), None)
        return {
            "formula": self.spec.formula,
            "method": self.method,
            "nobs": self.nobs,
            "objective": self.objective,
            "logLik": self.loglik,
            "AIC": self.aic,
            "BIC": self.bic,
            "theta": self.theta.tolist(),
            "sigma": self.sigma,
            "residual_params": self.residual_params,
            "fixef": self.fixef.to_dict(),
            "fixef_se": self.fixef_se.to_dict(),
            "varcorr": vc.to_dict(orient="records"),
            "singular": self.singular,
            "optimizer": {
                "name": self.optimization.optimizer,
                "evaluations": self.optimization.n_evaluations,
                "message": self.optimization.message,
                "warnings": list(self.optimization.warnings),
                "seconds": self.optimization.seconds,
            },
            "notes": list(self.spec.notes),
        }

    # -- marginal means and contrasts (emmeans') -------------------------------------
    def marginal_means(self, spec, by=None, at=None, ci_prob: float | None = None,
                       ddf: str = "satterthwaite") -> pd.DataFrame:
        """Estimated marginal means of the factor(s) ``spec``, as emmeans' ``emmeans(m, spec, by =, at =)``.

        ``spec``: ``"Product"``, ``"Product:Information"`` or a list; the other
        factors averaged with equal weights, covariates at their means unless
        ``at={"x": value}``; ``by``: means within levels of other factors (see
        :mod:`bayeslmm.marginal`).  One row per mean: the factors' columns, then
        ``estimate, std_error, lower, upper, t_value, df, p_value`` (t against 0);
        ``df`` Satterthwaite's by default; ``ddf="kenward-roger"`` gives Kenward–Roger's df
        and adjusted SEs (emmeans' own default for lmer fits), ``"none"`` Wald's, as
        :meth:`fixef_table`; unadjusted t intervals at ``ci_prob`` (default 0.95).
        """
        from ..marginal import freq_means, reference_grid
        from .inference import contrast_tests

        grid = reference_grid(self.spec, spec, by, at)
        out = freq_means(grid, lambda L: contrast_tests(self, L, ddf), check_ci_prob(ci_prob, self.default_ci_prob))
        out.attrs["ddf"] = ddf
        return out

    def contrasts(self, spec, method="pairwise", by=None, at=None, adjust: str | None = None,
                  ci_prob: float | None = None, ddf: str = "satterthwaite") -> pd.DataFrame:
        """Contrasts of :meth:`marginal_means`, as emmeans' ``contrast(emmeans(m, spec, by =), method, adjust =)``.

        ``method``: ``"pairwise"`` (every difference mᵢ − mⱼ, i < j, named ``"1 - 2"``
        by the levels as written), ``"trt.vs.ctrl"`` (each mean minus the first), a
        dict ``{name: weights}`` or a matrix of weights over the means of a ``by``
        group.  ``adjust``: "tukey" (the default for pairwise, as emmeans), "sidak"
        (the default for trt.vs.ctrl, where emmeans uses its Dunnett approximation),
        "bonferroni", "holm" or "none" (the default for your own weights), applied
        within each ``by`` group to the p-values *and* the intervals (Tukey's:
        β-difference ± q/√2·SE, as emmeans; Holm's intervals are Bonferroni's).
        Columns ``by…, contrast, estimate, std_error, lower, upper, t_value, df,
        p_value``; ``attrs`` hold ``ci_prob, adjust, ddf, at``.
        """
        from ..marginal import freq_contrasts, reference_grid
        from .inference import contrast_tests

        grid = reference_grid(self.spec, spec, by, at)
        out = freq_contrasts(grid, method, lambda L: contrast_tests(self, L, ddf),
                             check_ci_prob(ci_prob, self.default_ci_prob), adjust)
        out.attrs["ddf"] = ddf
        return out


def _t_quantile(prob: float, df: np.ndarray) -> np.ndarray:
    """The two-sided ``prob`` quantile of t with ``df`` (NaN where df is not known)."""
    from scipy import stats

    with np.errstate(invalid="ignore"):
        return stats.t.ppf((1 + prob) / 2, np.where(np.isfinite(df), df, np.nan))
