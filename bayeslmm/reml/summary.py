"""lme4-style printed summary of a frequentist fit (plain text and HTML)."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd


#: lme4's printed names of ``FreqFit.fixef_table``'s columns (summary's "Fixed effects:")
LME4_FIXEF_LABELS = {"estimate": "Estimate", "std_error": "Std. Error", "df": "df", "t_value": "t value",
                     "p_value": "Pr(>|t|)"}


#: how the summary names a non-default df method (Satterthwaite's, lmerTest's default, goes unsaid)
DDF_NAMES = {"kenward-roger": "t tests with Kenward–Roger's df and adjusted SEs", "none": "Wald: normal tests"}


def _lme4_fixef_table(fit, ddf: str = "satterthwaite") -> pd.DataFrame:
    """lmerTest's coefficient table: lme4's columns with the df and p-values of ``ddf`` (as text)."""
    table = fit.fixef_table(ddf=ddf)
    table = table[list(LME4_FIXEF_LABELS)].rename(columns=LME4_FIXEF_LABELS)
    table["df"] = [f"{v:.2f}" if np.isfinite(v) else ("Inf" if v == np.inf else "NA") for v in table["df"]]
    table["Pr(>|t|)"] = [format_p_value(v) for v in table["Pr(>|t|)"]]
    return table


def format_p_value(p: float) -> str:
    """As R's ``format.pval`` with 3 significant digits: ``< 2e-16`` below machine precision."""
    if not np.isfinite(p):
        return "NA"
    if p < 2.2e-16:
        return "< 2e-16"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}"


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return ""
    return f"{x:.{digits}g}"


class FreqSummary:
    """What ``print(fit.summary())`` shows; also rendered as HTML in notebooks."""

    def __init__(self, fit, ddf: str = "satterthwaite"):
        self.fit = fit
        self.ddf = ddf

    def random_effects_table(self) -> pd.DataFrame:
        """Groups, Name, Variance, Std.Dev. and correlations laid out as lme4 prints them."""
        fit = self.fit
        rows = []
        for block, cov in zip(fit.spec.blocks, fit.block_covariances()):
            sd = np.sqrt(np.diag(cov))
            for i, name in enumerate(block.columns):
                corr = []
                if block.correlated:
                    for j in range(i):
                        d = sd[i] * sd[j]
                        corr.append(f"{cov[i, j] / d:.2f}" if d > 0 else "0.00")
                rows.append({"Groups": block.group if i == 0 else "", "Name": name,
                             "Variance": cov[i, i], "Std.Dev.": sd[i], "Corr": " ".join(corr)})
        rows.append({"Groups": "Residual", "Name": "", "Variance": fit.sigma**2, "Std.Dev.": fit.sigma, "Corr": ""})
        return pd.DataFrame(rows)

    def header(self) -> list[str]:
        fit = self.fit
        crit = "REML criterion at convergence" if fit.method == "REML" else "deviance"
        lines = [f"Linear mixed model fit by {'REML' if fit.method == 'REML' else 'maximum likelihood'} (bayeslmm)",
                 f"Formula: {fit.spec.formula}"]
        if fit.data_name:
            lines.append(f"   Data: {fit.data_name}")
        lines.append("")
        if fit.method == "REML":
            lines.append(f"{crit}: {fit.objective:.4f}")
        else:
            lines.append(f"{'AIC':>10} {'BIC':>10} {'logLik':>10} {'deviance':>10} {'df.resid':>8}")
            lines.append(f"{fit.aic:>10.1f} {fit.bic:>10.1f} {fit.loglik:>10.1f} {fit.objective:>10.1f} "
                         f"{fit.nobs - fit.n_params:>8d}")
        return lines

    def __str__(self) -> str:
        fit = self.fit
        lines = self.header()
        if fit.spec.rows_in_memory:
            res = fit.normalized_residuals.to_numpy()  # raw / σ for R = σ²I (lme4's), whitened otherwise
            q = np.quantile(res, [0, 0.25, 0.5, 0.75, 1])
            lines += ["", "Scaled residuals:",
                      "     Min      1Q  Median      3Q     Max",
                      " ".join(f"{v:7.4f}" for v in q), "", "Random effects:"]
        else:  # built out of memory (cross-products only): no residuals to summarise
            lines += ["", "Scaled residuals: not computed (fitted out of memory, from cross-products)",
                      "", "Random effects:"]
        re = self.random_effects_table()
        cols = {"Groups": list(re["Groups"]), "Name": list(re["Name"]),
                "Variance": [f"{v:.4g}" for v in re["Variance"]],
                "Std.Dev.": [f"{v:.4g}" for v in re["Std.Dev."]], "Corr": list(re["Corr"])}
        width = {k: max(len(k), *(len(v) for v in vals)) for k, vals in cols.items()}
        left = {"Groups", "Name", "Corr"}
        for i in range(-1, len(re)):
            cells = [(k if i < 0 else cols[k][i]) for k in cols]
            lines.append(" " + " ".join(c.ljust(width[k]) if k in left else c.rjust(width[k])
                                        for k, c in zip(cols, cells)).rstrip())
        lines.append(fit.spec.counts_line())
        if fit.spec.residual is not None:  # nlme's lines, with the estimates on its scale
            lines += [""] + fit.spec.residual.lines(fit.spec.residual.unconstrained(fit.residual_params))
        lines += ["", "Fixed effects:" if self.ddf == "satterthwaite" else f"Fixed effects ({DDF_NAMES[self.ddf]}):"]
        fe = _lme4_fixef_table(fit, self.ddf)
        lines += fe.to_string(float_format=lambda v: f"{v:.4f}").splitlines()
        if fit.spec.n_fixed > 1:
            v = fit.vcov.to_numpy()
            d = np.sqrt(np.diag(v))
            corr = v / np.outer(d, d)
            names = list(fit.spec.fixed_names)
            lines += ["", "Correlation of Fixed Effects:"]
            width = max(len(n) for n in names)
            for i in range(1, len(names)):
                lines.append(f"{names[i]:<{width}} " + " ".join(f"{corr[i, j]:6.3f}" for j in range(i)))
        opt = fit.optimization
        lines += ["", f"Optimizer: {opt.optimizer}, {opt.n_evaluations} evaluations ({opt.message})"]
        for note in fit.spec.notes:
            lines.append(f"Note: {note}")
        for w in opt.warnings:
            lines.append(f"Warning: {w}")
        if fit.singular:
            lines.append("boundary (singular) fit: a variance is (near) zero or a correlation (near) ±1; "
                         "see fit.varcorr")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        fit = self.fit
        head = "<br>".join(html.escape(line) for line in self.header() if line)
        re = self.random_effects_table().to_html(index=False, float_format=lambda v: f"{v:.4g}")
        fe = _lme4_fixef_table(fit, self.ddf).to_html(float_format=lambda v: f"{v:.4f}")
        flag = "<p><b>boundary (singular) fit</b></p>" if fit.singular else ""
        return (f"<div><p>{head}</p><h4>Random effects</h4>{re}"
                f"<p>{html.escape(fit.spec.counts_line())}</p><h4>Fixed effects</h4>{fe}{flag}</div>")

