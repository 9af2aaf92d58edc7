#!/usr/bin/env python
"""Inference benchmark: Satterthwaite df and F tests, bayeslmm beside lmerTest, in one run.

This is a benchmark, not a test: it times, compares and reports, and always exits 0
unless it cannot run at all.  The issue's bar (issue 12): Satterthwaite df for
InstEval's fixed effects in under 10 s on this project's 2 cores.

What is timed, per model (each stretch once per repeat, the median reported)
--------------------------------------------------------------------------------
* bayeslmm, in this process (imports and data loading outside the timings):
  ``fit``    ``Model(formula, df, missing=).fit(method="reml")``;
  ``table``  ``fit.fixef_table()`` right after, on the fresh fit: Satterthwaite's
             set-up (the derivatives of Var(β̂) and the Hessian in the variance
             parameters, cached on the fit) and every coefficient's df and p-value;
  ``anova``  ``fit.anova()`` (type III) after the table, the set-up already cached;
  ``anova cold``  ``fit.anova()`` first on another fresh fit (set-up included), once.
  One untimed warm-up on sleepstudy (a fit, its table and its F tests) comes first, so
  that first-use imports (scipy.stats, the hypotheses' helpers: ~1 s) are not timed.
* lmerTest, when ``Rscript`` with lmerTest is installed (``benchmarks/lmertest_bench.R``,
  once per model, ``proc.time()``): ``lme4::lmer`` (the fit), ``as_lmerModLmerTest``
  (lmerTest's set-up: what ``lmerTest::lmer`` adds to lme4's fit), ``summary(m)`` and
  ``anova(m)``.  "df total" is set-up + summary, the counterpart of our ``table``.

The ratio is lmerTest's df total / ours.  Agreement: the largest relative difference
between the two sides' coefficient df and between their type III F values (both at
their own optimum; lme4's and ours are equal to about 1e-6 on these models).

Models: InstEval ``y ~ service + (1|s) + (1|d) + (1|dept)`` (73,421 rows, 3 crossed
factors) and with more fixed effects ``y ~ service + lectage + studage + ...`` (studage
and lectage as unordered factors on both sides, so that both use treatment contrasts
and estimate the same 10 coefficients), ham ``Informed.liking ~ Product*Information +
(1|Consumer) + (1|Consumer:Product)`` and carrots ``Preference ~ sens2*Homesize +
(1 + sens2 | Consumer)`` (3 rows without Preference dropped on both sides).

Usage
-----
    .venv/bin/python benchmarks/bench_inference.py [--models InstEval,ham] [--repeats 3]
        [--no-r] [--r-results PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from machine import CpuMeter, cpu_name  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
R_SCRIPT = HERE / "lmertest_bench.R"
DATA_DIR = ROOT / "bayeslmm" / "datasets" / "data"
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

#: the issue's bar: InstEval's Satterthwaite df in under this many seconds
TARGET_SECONDS = 10.0
#: other processes using more than this many cores on average while timing -> marked busy
BUSY_WARN_CORES = 0.25


@dataclass(frozen=True)
class Case:
    name: str  # the key in lmertest_bench.R
    dataset: str
    formula: str
    missing: str = "raise"
    unordered: tuple[str, ...] = ()  # ordered factors turned unordered (treatment contrasts, as in R's run)


CASES = (
    Case("InstEval", "InstEval", "y ~ service + (1|s) + (1|d) + (1|dept)"),
    Case("InstEval_more", "InstEval", "y ~ service + lectage + studage + (1|s) + (1|d) + (1|dept)",
         unordered=("studage", "lectage")),
    Case("ham", "ham", "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)"),
    Case("carrots", "carrots", "Preference ~ sens2*Homesize + (1 + sens2 | Consumer)", missing="drop"),
)


# --------------------------------------------------------------------------- bayeslmm
def _data(case: Case):
    from bayeslmm.datasets import load_dataset

    df = load_dataset(case.dataset)
    for column in case.unordered:
        df[column] = df[column].cat.as_unordered()
    return df


def _timed(make):
    gc.collect()
    t0 = time.perf_counter()
    value = make()
    return value, time.perf_counter() - t0


def warm_up() -> None:
    """Imports and first-use costs outside the timings: one small fit, its table and its F tests."""
    from bayeslmm import Model
    from bayeslmm.datasets import load_dataset

    fit = Model("Reaction ~ Days + (Days | Subject)", load_dataset("sleepstudy")).fit(method="reml")
    fit.fixef_table()
    fit.anova()


def time_bayeslmm(case: Case, repeats: int) -> dict:
    from bayeslmm import Model

    df = _data(case)

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # carrots: "dropped 3 of 1236 rows" (expected)
            return Model(case.formula, df, missing=case.missing).fit(method="reml")

    meter = CpuMeter()
    runs = []
    for _ in range(repeats):
        f, t_fit = _timed(fit)
        table, t_table = _timed(f.fixef_table)
        anova, t_anova = _timed(f.anova)
        runs.append({"fit": t_fit, "table": t_table, "anova": t_anova})
    cold_fit, _ = _timed(fit)
    _, t_anova_cold = _timed(cold_fit.anova)
    return {
        "formula": case.formula,
        "n": int(f.nobs),
        "n_fixed": int(f.spec.n_fixed),
        "repeats": repeats,
        "runs": runs,
        **{k: statistics.median(r[k] for r in runs) for k in ("fit", "table", "anova")},
        "anova_cold": t_anova_cold,
        "objective": float(f.objective),
        "coef_names": list(table.index),
        "df": [float(v) for v in table["df"]],
        "terms": list(anova.index),
        "f_value": [float(v) for v in anova["f_value"]],
        "den_df": [float(v) for v in anova["den_df"]],
        "other_load_cores": meter.others(),
    }


# --------------------------------------------------------------------------- lmerTest
def run_lmertest(cases: list[Case], rscript: str, timeout: float) -> tuple[dict | None, str | None]:
    """Run lmertest_bench.R; return (parsed JSON, None) or (None, reason)."""
    cmd = [rscript, str(R_SCRIPT), "--data-dir", str(DATA_DIR), "--models", ",".join(c.name for c in cases)]
    meter = CpuMeter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"Rscript timed out after {timeout:.0f} s"
    except OSError as exc:
        return None, f"could not start {rscript}: {exc}"
    if proc.returncode != 0:
        return None, f"Rscript failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        return None, f"could not parse lmertest_bench.R output ({exc}): {proc.stdout[-500:]!r}"
    out["other_load_cores"] = meter.others()
    return out, None


def lmertest_available(rscript: str) -> str | None:
    """None when ``library(lmerTest)`` loads, else why not."""
    try:
        proc = subprocess.run([rscript, "-e", "suppressMessages(library(lmerTest))"], capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run {rscript}: {exc}"
    return None if proc.returncode == 0 else f"R has no lmerTest ({proc.stderr.strip()[-300:]})"


# --------------------------------------------------------------------------- report
def _fmt_s(x):
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _max_rel(ours: list[float], theirs: list[float]) -> float | None:
    if len(ours) != len(theirs) or not ours:
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))


def compare(ours: dict, theirs: dict | None) -> dict:
    row = {"ours": ours, "lmerTest": theirs}
    if theirs is None:
        return row
    theirs["df_total"] = theirs["setup"] + theirs["summary"]
    row["ratio_df"] = theirs["df_total"] / ours["table"] if ours["table"] > 0 else None
    row["ratio_anova"] = (theirs["setup"] + theirs["anova"]) / ours["anova_cold"] if ours["anova_cold"] else None
    row["df_rel_diff"] = _max_rel(ours["df"], theirs["df"])
    row["f_rel_diff"] = _max_rel(ours["f_value"], theirs["f_value"])
    row["objective_diff"] = ours["objective"] - theirs["objective"]
    return row


def table_lines(rows: dict[str, dict]) -> list[str]:
    head = ("model", "rows", "β", "fit bayeslmm", "df bayeslmm", "anova bayeslmm (cold)", "fit lme4",
            "df lmerTest (set-up + summary)", "anova lmerTest", "df speed-up", "df agree", "F agree")
    lines = []
    for name, r in rows.items():
        o, t = r["ours"], r["lmerTest"]
        rel = (lambda x: f"{x:.1e}" if x is not None else "-")
        lines.append((
            name, f"{o['n']:,}", str(o["n_fixed"]), _fmt_s(o["fit"]), _fmt_s(o["table"]),
            f"{_fmt_s(o['anova'])} ({_fmt_s(o['anova_cold'])})",
            _fmt_s(t["fit"]) if t else "-",
            f"{_fmt_s(t['df_total'])} ({_fmt_s(t['setup'])} + {_fmt_s(t['summary'])})" if t else "-",
            _fmt_s(t["anova"]) if t else "-",
            f"{r['ratio_df']:.1f}×" if r.get("ratio_df") else "-",
            rel(r.get("df_rel_diff")) if t else "-", rel(r.get("f_rel_diff")) if t else "-",
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    return [fmt(head), rule, *(fmt(line) for line in lines)]


def environment(r_json: dict | None) -> dict:
    import numpy
    import scipy

    import bayeslmm

    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "bayeslmm": getattr(bayeslmm, "__version__", "?"),
    }
    if r_json:
        env.update(R=r_json.get("r_version"), lme4=r_json.get("lme4_version"),
                   lmerTest=r_json.get("lmertest_version"), R_blas=r_json.get("blas"))
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(c.name for c in CASES),
                   help="comma-separated subset of: " + ", ".join(c.name for c in CASES))
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per model for bayeslmm (default 3)")
    p.add_argument("--no-r", action="store_true", help="do not run lmerTest")
    p.add_argument("--r-results", metavar="PATH",
                   help="read lmertest_bench.R's JSON output from PATH instead of running R (R takes minutes)")
    p.add_argument("--rscript", default=None, help="path to Rscript (default: found on PATH)")
    p.add_argument("--r-timeout", type=float, default=3600, help="seconds allowed for R (default 3600)")
    p.add_argument("--json", metavar="PATH", help="where to write every result as JSON (default "
                                                  "benchmarks/results/inference_<date>.json)")
    a = p.parse_args(argv)
    by_name = {c.name.lower(): c for c in CASES}
    try:
        cases = [by_name[m.strip().lower()] for m in a.models.split(",") if m.strip()]
    except KeyError as exc:
        p.error(f"unknown model {exc}; choose from {', '.join(c.name for c in CASES)}")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")

    r_json, r_note = None, None
    rscript = a.rscript or shutil.which("Rscript")
    if a.r_results:
        r_json = json.loads(Path(a.r_results).read_text())
        r_note = f"lmerTest timings read from {a.r_results}"
    elif a.no_r:
        r_note = "lmerTest skipped (--no-r)"
    elif rscript is None:
        r_note = "lmerTest skipped: Rscript not found on PATH (install R with lmerTest to compare)"
    elif (why := lmertest_available(rscript)) is not None:
        r_note = f"lmerTest skipped: {why}"
    else:
        print(f"running lmerTest via {rscript} {R_SCRIPT.relative_to(ROOT)} (minutes on InstEval) ...", flush=True)
        t0 = time.perf_counter()
        r_json, err = run_lmertest(cases, rscript, a.r_timeout)
        r_note = f"lmerTest skipped: {err}" if err else None
        if not err:
            print(f"  lmerTest done in {time.perf_counter() - t0:.1f} s", flush=True)
    if r_note:
        print(r_note, flush=True)

    print("running bayeslmm ...", flush=True)
    warm_up()

    rows = {}
    for case in cases:
        ours = time_bayeslmm(case, a.repeats)
        print(f"  {case.name}: fit {_fmt_s(ours['fit'])}, df {_fmt_s(ours['table'])}, "
              f"anova {_fmt_s(ours['anova'])} (cold {_fmt_s(ours['anova_cold'])})", flush=True)
        rows[case.name] = compare(ours, (r_json or {}).get("models", {}).get(case.name))

    env = environment(r_json)
    print()
    print(f"{env['date']}  {env['processor']}, {env['cpu_count']} cores; Python {env['python']}, numpy "
          f"{env['numpy']}" + (f"; R {env['R']}, lme4 {env['lme4']}, lmerTest {env['lmerTest']}" if r_json else ""))
    print(f"bayeslmm: medians of {a.repeats} repeats; lmerTest: one run per model")
    print()
    lines = table_lines(rows)
    print("\n".join(lines))
    print()
    print("df = every coefficient's Satterthwaite df and p-value (bayeslmm: fit.fixef_table() on a fresh fit; "
          "lmerTest: as_lmerModLmerTest + summary); anova = type III F tests (bayeslmm: after the table, cold = "
          "first on a fresh fit); df speed-up = lmerTest's df / bayeslmm's; agree = largest relative "
          "difference of the coefficient df and of the F values")
    busy = {f"bayeslmm {n}": r["ours"]["other_load_cores"] for n, r in rows.items()}
    if r_json and r_json.get("other_load_cores") is not None:
        busy["lmerTest (whole R run)"] = r_json["other_load_cores"]
    busy = {k: v for k, v in busy.items() if v is not None}
    if busy:
        print("background CPU load from other processes while timing (cores): "
              + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()))
        noisy = [k for k, v in busy.items() if v > BUSY_WARN_CORES]
        if noisy:
            print(f"WARNING: the machine was busy during {', '.join(noisy)}; timings are unreliable")
    targets = []
    if "InstEval" in rows:
        seconds = rows["InstEval"]["ours"]["table"]
        targets.append({"target": f"InstEval's Satterthwaite df in under {TARGET_SECONDS:g} s",
                        "value": _fmt_s(seconds), "met": seconds < TARGET_SECONDS})
    for t in targets:
        print(f"target [{'MET' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")

    path = Path(a.json) if a.json else RESULTS / f"inference_{_dt.datetime.now():%Y%m%d_%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "settings": vars(a), "lmertest_note": r_note,
                                "results": rows, "targets": targets, "table": lines}, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
