#!/usr/bin/env python
"""Scale benchmark of a residual structure: AR(1) within groups with a random slope, REML and NUTS.

This is a benchmark, not a test: it simulates, times, compares and reports, and exits 0.

What is simulated (``random_seed`` fixed, default 20261207)
-----------------------------------------------------------
``G`` groups of ``m`` = 100 consecutive times each (rows sorted by group, then time),
x = (t − 49.5)/29 (about unit sd), and

    y = 2 + 0.5 x + b0_g + b1_g x + ε,   (b0, b1) ~ N(0, diag(0.8², 0.3²)),
    ε AR(1) within g in row order: corr φ^|Δt|, φ = 0.6, sd σ = 1.

Sizes: 10⁵ rows × 10³ groups and 10⁶ rows × 10⁴ groups (``--sizes``).

What is timed
-------------
* bayeslmm: ``Model("y ~ x + (x | g)", df, correlation=CorAR1("g")).fit(method="reml")``
  from a loaded DataFrame to a finished fit (``time.perf_counter``), one repeat (the large
  fit is the point; no warm-up beyond one tiny fit that imports and compiles everything).
* bayeslmm NUTS (``--no-nuts`` to skip): the same model, ``fit(method="nuts")`` by its default
  route (the structured kernel, :mod:`bayeslmm.bayes.structured`: every effect integrated out,
  the cost per gradient free of the rows), 4 chains × 1000 draws after 1000 tuning; minimum bulk
  ESS per second over β, the sds, the correlation, σ and φ, R-hat, divergences, medians.
* nlme: ``lme(y ~ x, random = ~ x | g, correlation = corAR1(form = ~ 1 | g), method =
  "REML")`` in ``Rscript`` on the same rows written to CSV, timed inside R with
  ``proc.time()`` (elapsed) after the data are read; killed after ``--nlme-timeout``
  seconds (default 600) and recorded as a timeout.  Skipped, with a note, when
  ``Rscript`` or nlme is missing (``--no-nlme``).

Recovered: φ̂, σ̂, β̂ and the random-effect sds against the truth; the REML
log-likelihoods of the two programs (the same criterion, so they should agree).

Usage
-----
    .venv/bin/python benchmarks/bench_residual.py [--sizes 1e5,1e6] [--nlme-timeout 600]
        [--json results.json] [--no-nlme] [--no-nuts]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

TRUTH = {"beta": (2.0, 0.5), "sd": (0.8, 0.3), "phi": 0.6, "sigma": 1.0}
PER_GROUP = 100

R_CODE = r"""
suppressPackageStartupMessages(library(nlme))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1]); d$g <- factor(d$g)
t0 <- proc.time()[["elapsed"]]
fit <- lme(y ~ x, random = ~ x | g, correlation = corAR1(form = ~ 1 | g), data = d, method = "REML")
secs <- proc.time()[["elapsed"]] - t0
phi <- coef(fit$modelStruct$corStruct, unconstrained = FALSE)[["Phi"]]
sds <- as.numeric(VarCorr(fit)[1:2, "StdDev"])
cat(sprintf(paste0('{"seconds": %.3f, "logLik": %.15g, "phi": %.8g, "sigma": %.8g, ',
                   '"beta": [%.8g, %.8g], "sd": [%.8g, %.8g], "nlme": "%s"}\n'),
            secs, as.numeric(logLik(fit)), phi, fit$sigma, fixef(fit)[1], fixef(fit)[2], sds[1], sds[2],
            as.character(packageVersion("nlme"))))
"""


def simulate(n_groups: int, random_seed: int) -> pd.DataFrame:
    """The rows of the module docstring: AR(1) errors by the stationary recursion."""
    rng = np.random.default_rng(random_seed)
    t = np.tile(np.arange(PER_GROUP, dtype=float), n_groups)
    g = np.repeat(np.arange(n_groups), PER_GROUP)
    x = (t - 49.5) / 29.0
    b = rng.standard_normal((n_groups, 2)) * np.array(TRUTH["sd"])
    phi, sigma = TRUTH["phi"], TRUTH["sigma"]
    innov = rng.standard_normal((n_groups, PER_GROUP)) * sigma * np.sqrt(1 - phi ** 2)
    e = np.empty_like(innov)
    e[:, 0] = rng.standard_normal(n_groups) * sigma  # stationary start
    for k in range(1, PER_GROUP):
        e[:, k] = phi * e[:, k - 1] + innov[:, k]
    y = TRUTH["beta"][0] + TRUTH["beta"][1] * x + b[g, 0] + b[g, 1] * x + e.ravel()
    return pd.DataFrame({"g": g, "x": x, "y": y})


def time_bayeslmm(df: pd.DataFrame) -> dict:
    import bayeslmm
    from bayeslmm import CorAR1

    t0 = time.perf_counter()
    fit = bayeslmm.Model("y ~ x + (x | g)", df, correlation=CorAR1("g")).fit(method="reml")
    seconds = time.perf_counter() - t0
    vc = fit.varcorr
    return {"seconds": seconds, "logLik": float(fit.loglik), "phi": float(fit.residual_params["Phi"]),
            "sigma": float(fit.sigma), "beta": [float(v) for v in fit.fixef.to_numpy()],
            "sd": [float(v) for v in vc[vc["var2"].isna()]["sdcor"].to_numpy()[:2]],
            "evaluations": int(fit.optimization.n_evaluations)}


def time_bayeslmm_nuts(df: pd.DataFrame, random_seed: int) -> dict:
    """``fit(method="nuts")`` by the default route (the structured kernel: every effect integrated
    out, the cost per gradient free of the rows), 4 chains × 1000 draws after 1000 tuning, from
    the Model to a finished fit; minimum bulk ESS over β, sds, correlation, σ and φ per second."""
    import arviz as az

    import bayeslmm
    from bayeslmm import CorAR1

    t0 = time.perf_counter()
    model = bayeslmm.Model("y ~ x + (x | g)", df, correlation=CorAR1("g"))
    fit = model.fit(method="nuts", random_seed=random_seed, progressbar=False, warn=False)
    seconds = time.perf_counter() - t0
    post = fit.idata["posterior"].to_dataset()
    names = [v for v in post.data_vars if post[v].ndim <= 3 and v not in ("g",)]
    summ = az.summary(post[names], kind="diagnostics")
    phi = post["residual_Phi"].to_numpy()
    return {"seconds": seconds, "sample_seconds": float(fit.timings["sample"]), "backend": fit.timings["backend"],
            "min_ess_bulk": float(summ["ess_bulk"].min()), "max_rhat": float(summ["r_hat"].max()),
            "ess_per_second": float(summ["ess_bulk"].min()) / seconds, "divergences": int(fit.diagnostics().divergences),
            "phi_median": float(np.median(phi)), "beta_median": [float(v) for v in fit.fixef_table()["median"]]}


def time_nlme(df: pd.DataFrame, rscript: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        csv, script = Path(tmp) / "data.csv", Path(tmp) / "fit.R"
        df.to_csv(csv, index=False)
        script.write_text(R_CODE)
        t0 = time.perf_counter()
        try:
            run = subprocess.run([rscript, str(script), str(csv)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"timeout": True, "seconds": timeout, "wall": time.perf_counter() - t0}
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - t0
    return out


def nlme_available(rscript: str | None) -> str | None:
    """Why nlme cannot run, or None."""
    if rscript is None:
        return "Rscript not on PATH"
    probe = subprocess.run([rscript, "-e", "library(nlme)"], capture_output=True, text=True)
    return None if probe.returncode == 0 else "the R package nlme is not installed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e5,1e6", help="rows, comma-separated (each a multiple of 100)")
    p.add_argument("--nlme-timeout", type=float, default=600.0)
    p.add_argument("--random-seed", type=int, default=20261207)
    p.add_argument("--no-nlme", action="store_true")
    p.add_argument("--no-nuts", action="store_true", help="REML only")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import bayeslmm

    time_bayeslmm(simulate(20, args.random_seed))  # imports and compiles everything once
    if not args.no_nuts:
        time_bayeslmm_nuts(simulate(20, args.random_seed), args.random_seed)
    rscript = shutil.which("Rscript")
    why_not = "--no-nlme" if args.no_nlme else nlme_available(rscript)
    results = {"when": _dt.datetime.now().isoformat(timespec="minutes"), "machine": platform.processor()
               or platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
               "bayeslmm": bayeslmm.__version__, "truth": TRUTH, "random_seed": args.random_seed, "runs": []}
    for size in (int(float(s)) for s in args.sizes.split(",")):
        df = simulate(size // PER_GROUP, args.random_seed)
        run = {"rows": len(df), "groups": size // PER_GROUP, "bayeslmm": time_bayeslmm(df)}
        print(f"{len(df):>10,} rows: bayeslmm {run['bayeslmm']}", flush=True)
        if not args.no_nuts:
            run["nuts"] = time_bayeslmm_nuts(df, args.random_seed)
            print(f"{'':>16} NUTS {run['nuts']}", flush=True)
        run["nlme"] = {"skipped": why_not} if why_not else time_nlme(df, rscript, args.nlme_timeout)
        print(f"{'':>16} nlme {run['nlme']}", flush=True)
        results["runs"].append(run)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _secs(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.1f} s"


def table(results: dict) -> str:
    """The runs as a Markdown table."""
    rows = ["| rows × groups | REML bayeslmm | REML nlme | φ̂ ours / nlme (true 0.6) | σ̂ (1) | β̂ (2, 0.5) | "
            "sds (0.8, 0.3) | logLik ours − nlme |",
            "|---|---:|---:|---|---|---|---|---:|"]
    for run in results["runs"]:
        ours, theirs = run["bayeslmm"], run["nlme"]
        if "seconds" in theirs and not theirs.get("timeout"):
            nlme_t, phi_n = _secs(theirs["seconds"]), f"{theirs['phi']:.4f}"
            dl = f"{ours['logLik'] - theirs['logLik']:.2g}"
        else:
            nlme_t = f"timeout ({theirs['seconds']:.0f} s)" if theirs.get("timeout") else theirs.get(
                "skipped", theirs.get("error", "?"))
            phi_n, dl = "–", "–"
        rows.append(f"| {run['rows']:,} × {run['groups']:,} | {_secs(ours['seconds'])} | {nlme_t} | "
                    f"{ours['phi']:.4f} / {phi_n} | {ours['sigma']:.4f} | "
                    f"{ours['beta'][0]:.3f}, {ours['beta'][1]:.3f} | {ours['sd'][0]:.3f}, {ours['sd'][1]:.3f} | "
                    f"{dl} |")
    nuts = [run for run in results["runs"] if "nuts" in run]
    if nuts:
        rows += ["", "| rows × groups | NUTS bayeslmm (route) | min bulk ESS | ESS/s | max R-hat | divergences | "
                 "φ median (0.6) | β medians (2, 0.5) |", "|---|---:|---:|---:|---:|---:|---|---|"]
        for run in nuts:
            nu = run["nuts"]
            rows.append(f"| {run['rows']:,} × {run['groups']:,} | {_secs(nu['seconds'])} ({nu['backend']}) | "
                        f"{nu['min_ess_bulk']:.0f} | {nu['ess_per_second']:.1f} | {nu['max_rhat']:.3f} | "
                        f"{nu['divergences']} | {nu['phi_median']:.4f} | "
                        f"{nu['beta_median'][0]:.3f}, {nu['beta_median'][1]:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
