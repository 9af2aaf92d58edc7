"""Printed summary of a Bayesian fit (plain text and HTML).

Laid out like lme4's summary — fixed effects, then each grouping factor's sds and
correlations, then the residual sd and any residual structure's parameters (``residual_Phi``
…) — with the posterior mean, sd, median, an interval
(ArviZ's default, an 89 % equal-tailed interval, unless ``ci_prob`` is given), R-hat
and bulk/tail ESS for every parameter, and the sampler's diagnostics.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

_NUMBER_COLUMNS = ["mean", "sd", "median", "lower", "upper"]
#: the printed columns, in order: the posterior summary, then the convergence diagnostics
_PRINTED_COLUMNS = _NUMBER_COLUMNS + ["r_hat", "ess_bulk", "ess_tail"]


def _num(v: float) -> str:
    return "" if v is None or not np.isfinite(v) else f"{v:.4g}"


def _formatters(table: pd.DataFrame) -> dict:
    out = {c: _num for c in _NUMBER_COLUMNS if c in table.columns}
    out["r_hat"] = lambda v: "" if not np.isfinite(v) else f"{v:.3f}"
    out["ess_bulk"] = out["ess_tail"] = lambda v: "" if not np.isfinite(v) else f"{v:.0f}"
    return out


#: what each route (``fit.route``) integrates out and samples, said in the summary's header
ROUTE_NOTES = {"one-factor": "compiled kernel: the random effects integrated out",
               "blocked": "compiled kernel: every random effect integrated out",
               "partial": "compiled kernel: the largest factor integrated out, the others sampled",
               "structured": "compiled kernel: every random effect integrated out, on the residual structure's "
                             "cross-products",
               "graph": "PyMC graph: the largest factor integrated out, the others sampled",
               "graph-explicit": "PyMC graph: every random effect sampled"}


class BayesSummary:
    """What ``print(fit.summary())`` shows; also rendered as HTML in notebooks.

    Parameters
    ----------
    fit : BayesFit
    ci_prob : float, optional
        Probability of the equal-tailed interval (ArviZ's default, 0.89, when omitted).
    """

    def __init__(self, fit, ci_prob: float | None = None):
        from ..group_frames import posterior_ci_prob

        self.fit = fit
        self.ci_prob = None if ci_prob is None else posterior_ci_prob(ci_prob)

    # -- pieces --------------------------------------------------------------------
    def header(self) -> list[str]:
        fit = self.fit
        post = fit.posterior
        lines = ["Linear mixed model fit by NUTS (bayeslmm)", f"Formula: {fit.spec.formula}"]
        if fit.data_name:
            lines.append(f"   Data: {fit.data_name}")
        lines.append(fit.spec.counts_line())
        lines.append(f"Draws: {post.sizes['chain']} chains × {post.sizes['draw']} ({fit.sampler} NUTS, seed "
                     f"{fit.seed})")
        lines.append(f"Route: {fit.route} ({ROUTE_NOTES[fit.route]})")
        return lines

    def tables(self) -> dict[str, pd.DataFrame]:
        """The summary's tables: ``fixed``, ``random`` (sds and correlations), ``residual`` and, with a
        residual structure, ``structure`` (its parameters)."""
        fit = self.fit
        # printed with the posterior's own words: mean and sd (the shared tables' estimate, std_error)
        words = {"estimate": "mean", "std_error": "sd"}
        fe = fit.fixef_table(self.ci_prob).rename(columns=words)[_PRINTED_COLUMNS]
        vc = fit.varcorr_table(self.ci_prob).rename(columns=words)
        interval = fe.attrs["interval"]
        cols = [c for c in fe.columns]
        rand = vc[vc["grp"] != "Residual"]
        names, groups = [], []
        last = None
        for g, v1, v2 in zip(rand["grp"], rand["var1"], rand["var2"]):
            corr = not (v2 is None or (isinstance(v2, float) and np.isnan(v2)))
            groups.append(g if g != last else "")
            last = g
            names.append(f"corr {v1}, {v2}" if corr else f"sd {v1}")
        random = rand[cols].copy()
        random.index = pd.MultiIndex.from_arrays([groups, names], names=["Groups", "Name"])
        resid = vc[vc["grp"] == "Residual"][cols].copy()
        resid.index = pd.Index(["sd (sigma)"], name="Residual")
        out = {"fixed": fe, "random": random, "residual": resid}
        structure = fit.residual_table(self.ci_prob)
        if len(structure):  # the residual structure's parameters, by their posterior names
            out["structure"] = structure.rename(columns=words)[cols]
        for t in out.values():
            t.attrs["interval"] = interval
        return out

    def interval_line(self, interval: str) -> str:
        prob = interval[3:] if interval.startswith(("eti", "hdi")) else interval
        kind = "equal-tailed" if interval.startswith("eti") else "highest-density" if interval.startswith("hdi") else ""
        return f"Posterior mean, sd, median and {prob} % {kind} interval (lower, upper); R-hat and ESS per parameter"

    def diagnostics_lines(self) -> list[str]:
        diag = self.fit.diagnostics()
        if diag.ok:
            return [f"Diagnostics: no divergences, R-hat ≤ {diag.max_rhat:.3f}, "
                    f"bulk ESS ≥ {diag.min_ess_bulk:.0f}, tail ESS ≥ {diag.min_ess_tail:.0f}"]
        return ["Diagnostics:"] + [f"  ! {m}" for m in diag.messages]

    # -- renderings ----------------------------------------------------------------
    def __str__(self) -> str:
        t = self.tables()
        random = t["random"]
        width = max(len(g) for g in random.index.get_level_values(0)) if len(random) else 0
        sections = [
            ("Fixed effects:", list(t["fixed"].index), t["fixed"]),
            ("Random effects:", [f"{g:<{width}}  {n}" for g, n in random.index], random),
            ("Residual:", ["sigma"], t["residual"]),
        ]
        if "structure" in t:
            sections.append(("Residual structure:", list(t["structure"].index), t["structure"]))
        cols = list(t["fixed"].columns)
        fmt = _formatters(t["fixed"])
        cells = [[[fmt[c](v) for c, v in zip(cols, row)] for row in frame.itertuples(index=False)]
                 for _, _, frame in sections]
        label_w = max(len(x) for _, labels, _ in sections for x in labels)
        col_w = [max(len(c), *(len(r[k]) for sec in cells for r in sec)) for k, c in enumerate(cols)]
        header = " " * label_w + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, col_w))
        lines = self.header() + ["", self.interval_line(t["fixed"].attrs["interval"])]
        for (title, labels, _), rows in zip(sections, cells):
            lines += ["", title, header]
            for label, row in zip(labels, rows):
                lines.append(label.ljust(label_w) + "  " + "  ".join(v.rjust(w) for v, w in zip(row, col_w)))
        lines.append("")
        lines += self.diagnostics_lines()
        for note in self.fit.spec.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        t = self.tables()
        head = "<br>".join(html.escape(x) for x in self.header())
        parts = [f"<div><p>{head}</p><p><i>{html.escape(self.interval_line(t['fixed'].attrs['interval']))}</i></p>"]
        for title, key in (("Fixed effects", "fixed"), ("Random effects", "random"), ("Residual", "residual"),
                           ("Residual structure", "structure")):
            if key not in t:
                continue
            parts.append(f"<h4>{title}</h4>")
            parts.append(t[key].to_html(formatters=_formatters(t[key])))
        diag = self.fit.diagnostics()
        if diag.ok:
            parts.append(f"<p>{html.escape(self.diagnostics_lines()[0])}</p>")
        else:
            msgs = "".join(f"<li>{html.escape(m)}</li>" for m in diag.messages)
            parts.append(f"<p><b>Diagnostics</b></p><ul>{msgs}</ul>")
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.fit.spec.notes)
        if notes:
            parts.append(f"<ul>{notes}</ul>")
        parts.append("</div>")
        return "".join(parts)
