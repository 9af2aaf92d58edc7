"""Printed summary of a Bayesian fit (plain text and HTML)."""

from __future__ import annotations

import html


class BayesSummary:
    def __init__(self, fit):
        self.fit = fit

    def header(self) -> list[str]:
        fit = self.fit
        post = fit.posterior
        lines = ["Linear mixed model fit by NUTS (bayeslmm)", f"Formula: {fit.spec.formula}"]
        if fit.data_name:
            lines.append(f"   Data: {fit.data_name}")
        lines.append(fit.spec.counts_line())
        lines.append(f"Draws: {post.sizes['chain']} chains × {post.sizes['draw']} ({fit.sampler} NUTS, "
                     f"{fit.parameterization} parameterisation, seed {fit.seed})")
        return lines

    def __str__(self) -> str:
        fit = self.fit
        table = fit.summary_table()
        lines = self.header() + ["", f"Posterior (interval: {table.attrs['interval']}):"]
        lines += table.to_string(float_format=lambda v: f"{v:.4g}").splitlines()
        diag = fit.diagnostics()
        lines.append("")
        if diag.ok:
            lines.append(f"Diagnostics: no divergences, R-hat ≤ {diag.max_rhat:.3f}, "
                         f"bulk ESS ≥ {diag.min_ess_bulk:.0f}, tail ESS ≥ {diag.min_ess_tail:.0f}")
        else:
            lines.append("Diagnostics:")
            lines += [f"  ! {m}" for m in diag.messages]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        fit = self.fit
        head = "<br>".join(html.escape(x) for x in self.header())
        table = fit.summary_table().to_html(float_format=lambda v: f"{v:.4g}")
        diag = fit.diagnostics()
        msgs = "".join(f"<li>{html.escape(m)}</li>" for m in diag.messages)
        note = f"<ul>{msgs}</ul>" if msgs else "<p>Diagnostics: all checks passed.</p>"
        return f"<div><p>{head}</p>{table}{note}</div>"
