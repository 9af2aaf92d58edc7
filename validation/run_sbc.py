#!/usr/bin/env python
"""Simulation-based calibration of the collapsed NUTS sampler: ``make sbc``.

Model ``y ~ x + (1 + x | g)`` with the LKJ prior on the block's correlation, at two
data sizes, the designs fixed (``simulate_lmm(random_seed=1)``'s x and grouping):

* ``small``: 8 groups × 5 rows (40 rows): the posterior is close to the prior for the
  sds and the correlation, and σ and the sds have mass near 0, the hard geometry;
* ``large``: 40 groups × 10 rows (400 rows): the data dominate the prior;
* ``control``: the small design fitted with a *wrong* prior (LKJ η = 2 and
  HalfNormal(0.5) on the sds, while the truth comes from η = 1 and HalfNormal(1)): a
  negative control that the checks must reject.

Each simulation draws the parameters from the fixed priors of
:func:`bayeslmm.bayes.sbc.fixed_priors` (Normal(0, 2.5) coefficients, Exponential(1) σ,
HalfNormal(1) sds, LKJ(1)), simulates a response, fits it with nutpie's NUTS on the
collapsed model compiled once per design (2 chains × 1000 draws after 1000 tuning
steps), and ranks the truth among 99 evenly thinned draws.  Records are appended to
``validation/results/sbc_{size}.csv`` as they come, so an interrupted run resumes
where it stopped (the settings are kept beside it in ``sbc_{size}.json`` and a
resumed run must match them).  At the end the tables go to
``validation/results/sbc_summary.md`` and between the markers of
``docs/calibration.md``, the figures to ``docs/figures/sbc_*.png``.

Usage::

    nohup nice -n 15 .venv/bin/python validation/run_sbc.py > validation/results/sbc.log 2>&1 &
    .venv/bin/python validation/run_sbc.py --report-only          # tables and figures from the CSVs
    .venv/bin/python validation/run_sbc.py --sizes small --sims 200
"""

from __future__ import annotations

import os

# one thread for BLAS and numba: the machine is shared, and these models are tiny
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bayeslmm import Model, Prior  # noqa: E402
from bayeslmm.bayes.sbc import SBCResult, SBCRunner, chi2_uniformity, ecdf_band, fixed_priors  # noqa: E402
from bayeslmm.simulate import simulate_lmm  # noqa: E402

RESULTS = ROOT / "validation" / "results"
FIGURES = ROOT / "docs" / "figures"
DOC = ROOT / "docs" / "calibration.md"
BEGIN, END = "<!-- sbc-results:begin -->", "<!-- sbc-results:end -->"

SIZES = {
    "small": {"n_groups": 8, "n_per_group": 5, "seed": 11, "fit_priors": None,
              "title": "8 groups × 5 rows"},
    "large": {"n_groups": 40, "n_per_group": 10, "seed": 12, "fit_priors": None,
              "title": "40 groups × 10 rows"},
    "control": {"n_groups": 8, "n_per_group": 5, "seed": 13,
                "fit_priors": {"g": {"sd": Prior("HalfNormal", sigma=0.5), "eta": 2.0}},
                "title": "negative control: 8 × 5, fitted with LKJ(2) and HalfNormal(0.5) sds"},
}
DEFAULT_SIMS = {"small": 1000, "large": 1000, "control": 200}
BAND_CI_PROB = 0.95     # probability of the ECDF test's simultaneous band
COVERAGE_CI_PROB = 0.99  # probability of the coverage's Clopper–Pearson interval


def make_spec(size: str):
    cfg = SIZES[size]
    data = simulate_lmm(n_groups=cfg["n_groups"], n_per_group=cfg["n_per_group"], random_seed=1)
    return Model("y ~ x + (1 + x | g)", data).spec


def make_runner(size: str, n_sims: int, args) -> SBCRunner:
    cfg = SIZES[size]
    spec = make_spec(size)
    fit_priors = None
    if cfg["fit_priors"] is not None:
        fit_priors = {**fixed_priors(spec), **cfg["fit_priors"]}
    return SBCRunner(spec, n_sims, draws=args.draws, tune=args.tune, chains=args.chains, n_ranks=args.n_ranks,
                     random_seed=cfg["seed"], priors=fixed_priors(spec), sampler=args.sampler, fit_priors=fit_priors)


def _jsonable(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def run_size(size: str, n_sims: int, args) -> None:
    csv, meta = RESULTS / f"sbc_{size}.csv", RESULTS / f"sbc_{size}.json"
    runner = make_runner(size, n_sims, args)
    settings = _jsonable(runner.settings())
    done: set[int] = set()
    if csv.exists() and not args.fresh:
        old = json.loads(meta.read_text()) if meta.exists() else None
        if old is None or {k: v for k, v in old.items() if k != "n_sims"} != \
                {k: v for k, v in settings.items() if k != "n_sims"}:
            raise SystemExit(f"{csv} was written with other settings ({meta}); pass --fresh to start again")
        if old["n_sims"] != settings["n_sims"]:
            raise SystemExit(f"{csv} holds a run of {old['n_sims']} simulations (the prior draws depend on it); "
                             f"pass --sims {old['n_sims']} or --fresh")
        prev = pd.read_csv(csv)
        done = set(prev["sim"].astype(int))
        # the same seeds must give the same truths: check every stored one
        for _, row in prev.iterrows():
            truth = runner.truth(int(row["sim"]))
            stored = np.array([row[f"truth:{q}"] for q in runner.quantities])
            if not np.allclose(stored, [truth[q] for q in runner.quantities], rtol=1e-9, atol=1e-12):
                raise SystemExit(f"{csv}: simulation {int(row['sim'])} has other true values than this code "
                                 "draws; pass --fresh")
    else:
        csv.unlink(missing_ok=True)
        meta.write_text(json.dumps(settings, indent=1) + "\n")
    todo = [i for i in range(n_sims) if i not in done]
    print(f"[{size}] {len(done)} done, {len(todo)} to run ({runner.spec.n_obs} rows, "
          f"{runner.spec.blocks[0].n_levels} groups)", flush=True)
    if not todo:
        return
    print(f"[{size}] compiling the collapsed model with nutpie ...", flush=True)
    print(f"[{size}] compiled in {runner.compile():.1f} s", flush=True)
    t0 = time.perf_counter()
    state = {"n": 0, "header": not csv.exists()}

    def append(rec: dict) -> None:
        pd.DataFrame([rec]).to_csv(csv, mode="a", header=state["header"], index=False, float_format="%.10g")
        state["header"] = False
        state["n"] += 1
        n = state["n"]
        if n % 25 == 0 or n == len(todo):
            rate = (time.perf_counter() - t0) / n
            print(f"[{size}] {len(done) + n}/{n_sims}  {rate:.2f} s/fit  ETA {rate * (len(todo) - n) / 60:.1f} min"
                  f"  (last: {rec['divergences']} divergences, min ESS {rec['min_ess_bulk']:.0f})", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        runner.run(todo, on_result=append)


# ------------------------------------------------------------------------------ report
def load(size: str) -> tuple[SBCResult, dict]:
    settings = json.loads((RESULTS / f"sbc_{size}.json").read_text())
    records = pd.read_csv(RESULTS / f"sbc_{size}.csv")
    return SBCResult.from_records(records, settings["n_ranks"]), settings


def bins_for(n_sims: int) -> int:
    """Bins of 5 rank values (20 bins) when every bin expects ≥ 20 simulations, else 10 bins."""
    return 20 if n_sims >= 400 else 10


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}".replace("e-0", "e-")


def markdown_table(res: SBCResult) -> str:
    n = len(res.records)
    bins = bins_for(n)
    tab = res.table(bins=bins, band_ci_prob=BAND_CI_PROB, coverage_ci_prob=COVERAGE_CI_PROB)
    lines = [f"| quantity | χ² p ({bins} bins) | ECDF p | inside {100 * BAND_CI_PROB:g} % band | "
             f"50 % coverage [99 % CP] | 90 % coverage [99 % CP] |",
             "|---|---:|---:|:---:|---:|---:|"]
    for q, row in tab.iterrows():
        # the ECDF p-value is simulated from 10,000 null samples: its floor is 1/10,001
        ecdf_p = "< 2e-4" if row.ecdf_p < 2e-4 else _fmt_p(row.ecdf_p)
        cells = ["`" + q.replace("|", "\\|") + "`", _fmt_p(row.chi2_p), ecdf_p, "yes" if row.ecdf_inside_band else "**no**"]
        for p in ("50", "90"):
            mark = "" if row[f"cov{p}_ok"] else " **✗**"
            cells.append(f"{row[f'cov{p}']:.3f} [{row[f'cov{p}_low']:.3f}, {row[f'cov{p}_high']:.3f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_line(res: SBCResult, settings: dict) -> str:
    r = res.records
    n = len(r)
    div = int((r["divergences"] > 0).sum())
    low_ess = int((r["min_ess_bulk"] < settings["n_ranks"]).sum())
    return (f"{n} simulations; {div} ({100 * div / n:.1f} %) had divergent transitions "
            f"({int(r['divergences'].sum())} in all); smallest bulk ESS per fit: median "
            f"{r['min_ess_bulk'].median():.0f}, {low_ess} fits below the {settings['n_ranks']} thinned draws; "
            f"largest R-hat: median {r['max_rhat'].median():.3f}, {int((r['max_rhat'] > 1.01).sum())} fits above "
            f"1.01; {r['seconds'].median():.2f} s per fit (median, compilation excluded).")


def _finish_panels(fig, axes, n_used: int, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Blank the unused panels, label the outer ones, title, save and close; returns ``path``."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[n_used:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(res: SBCResult, size: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    n, L = len(res.records), res.n_ranks
    qs = list(res.quantities)
    z, lower, upper = ecdf_band(n, L, ci_prob=BAND_CI_PROB)
    ncol = 4
    nrow = int(np.ceil(len(qs) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), sharex=True, sharey=True)
    for ax, q in zip(axes.flat, qs):
        ranks = res.ranks[q].to_numpy()
        ecdf = np.cumsum(np.bincount(ranks, minlength=L + 1))[:-1] / n
        ax.fill_between(z, lower - z, upper - z, step="mid", color="0.85", label=f"{100 * BAND_CI_PROB:g} % band")
        ax.step(z, ecdf - z, where="mid", color="C0", lw=1.2)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_title(q, fontsize=9)
    ecdf_path = _finish_panels(fig, axes, len(qs), "fractional rank", "ECDF − uniform",
                               f"SBC ECDF difference, {title} ({n} simulations, ranks among {L} draws)",
                               FIGURES / f"sbc_ecdf_{size}.png")

    bins = bins_for(n)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), sharex=True, sharey=True)
    edges = np.round(np.linspace(0, L + 1, bins + 1)).astype(int)
    for ax, q in zip(axes.flat, qs):
        _, _, obs, expected = chi2_uniformity(res.ranks[q], L, bins)
        from scipy import stats

        lo = stats.binom.ppf(0.005, n, expected / n)
        hi = stats.binom.ppf(0.995, n, expected / n)
        ax.fill_between(edges, np.r_[lo, lo[-1]], np.r_[hi, hi[-1]], step="post", color="0.85")
        ax.stairs(obs, edges, color="C0", lw=1.2)
        ax.set_title(q, fontsize=9)
    hist_path = _finish_panels(fig, axes, len(qs), "rank", "simulations",
                               f"SBC rank histograms, {title} (grey: 99 % pointwise binomial range per bin)",
                               FIGURES / f"sbc_hist_{size}.png")
    return [ecdf_path.name, hist_path.name]


def report(sizes: list[str]) -> str:
    parts = [f"Generated by `validation/run_sbc.py` on {dt.date.today().isoformat()}. "
             f"ECDF test: simultaneous {100 * BAND_CI_PROB:g} % band (p-value of Säilynoja et al.'s "
             f"statistic from 10,000 exactly uniform rank samples). Coverage: share of simulations whose true "
             f"value lies in the central interval of all posterior draws, with its {100 * COVERAGE_CI_PROB:g} % "
             f"Clopper–Pearson interval; ✗ marks a nominal level outside it."]
    for size in sizes:
        if not (RESULTS / f"sbc_{size}.csv").exists():
            continue
        res, settings = load(size)
        title = SIZES[size]["title"]
        figs = plot(res, size, title)
        parts.append(f"### {title[0].upper() + title[1:]}\n\n"
                     f"{settings['chains']} chains × {settings['draws']} draws after {settings['tune']} tuning "
                     f"steps per fit, {settings['sampler']}, ranks among {settings['n_ranks']} thinned draws. "
                     f"{diagnostics_line(res, settings)}\n\n{markdown_table(res)}\n\n"
                     + "\n".join(f"![{f}](figures/{f})" for f in figs))
    return "\n\n".join(parts) + "\n"


def write_report(text: str) -> None:
    (RESULTS / "sbc_summary.md").write_text("# SBC results\n\n" + text.replace("](figures/", "](../../docs/figures/"))
    doc = DOC.read_text() if DOC.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} lacks the markers {BEGIN} / {END}")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--sims", type=int, default=None, help="simulations per size (default: 1000; 200 for control)")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--tune", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--n-ranks", type=int, default=99, help="thinned draws the truth is ranked among")
    ap.add_argument("--sampler", default="kernel", choices=["kernel", "nutpie"],
                    help="kernel: the compiled collapsed kernel fit(method='nuts') uses by default; "
                         "nutpie: the PyMC graph compiled by nutpie")
    ap.add_argument("--fresh", action="store_true", help="discard existing results and start again")
    ap.add_argument("--report-only", action="store_true", help="only write the tables and figures")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for size in args.sizes:
            run_size(size, args.sims or DEFAULT_SIMS[size], args)
    write_report(report(list(SIZES)))
    print((RESULTS / "sbc_summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
