#!/usr/bin/env python
"""REML benchmark: bayeslmm against lme4, side by side, in one run.

This is a benchmark, not a test: it times, compares and reports, and by default
always exits 0 (``--strict`` makes a missed target or a worse objective exit 1).

What is timed
-------------
* bayeslmm: wall-clock time (``time.perf_counter``) of
  ``bayeslmm.Model(formula, df).fit(method="reml")`` -- from a formula and an
  already-loaded pandas DataFrame to a finished ``FreqFit`` (formula parsing, design
  matrices, cross-products, optimisation, estimates).  The package is imported and
  the data loaded before timing; one untimed warm-up fit per model comes first;
  ``gc.collect()`` runs before each timed repeat.  A new ``Model`` is built every
  repeat, so cached cross-products are not reused.
* lme4: ``Rscript benchmarks/lme4_bench.R`` fits the same models with
  ``lmer(formula, data, REML = TRUE)`` (default control: nloptwrap / BOBYQA), timed
  inside R with ``proc.time()`` (elapsed), after one untimed warm-up fit; data are read
  and factors made before timing.  Skipped, with a note, when ``Rscript`` is not on
  PATH or ``--no-lme4`` is given.

Both sides report the median of the repeats.  The ratio is lme4 / bayeslmm (the
speed-up of bayeslmm).  Objectives are the REML criterion on lme4's scale; the
difference is ours minus lme4's, and ours should not exceed lme4's by more than
1e-6 relative.

Usage
-----
    .venv/bin/python benchmarks/bench_reml.py [--repeats 5] [--repeats-large 3]
        [--models InstEval,sleepstudy] [--json results.json] [--no-lme4] [--strict]
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
from dataclasses import dataclass
from pathlib import Path

from machine import CpuMeter, cpu_name  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
R_SCRIPT = HERE / "lme4_bench.R"
DATA_DIR = ROOT / "bayeslmm" / "datasets" / "data"

if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

#: relative tolerance for "our objective is no worse than lme4's"
OBJ_RTOL = 1e-6
#: targets noted in the output
TARGET_INSTEVAL_SPEEDUP = 5.0  # InstEval REML in at most 1/5 of lme4's time
TARGET_SLEEPSTUDY_SECONDS = 0.020  # sleepstudy REML under 20 ms
#: other processes using more than this many cores on average while timing → warning
BUSY_WARN_CORES = 0.25
# BAYESLMM_BLAS_THREADS: bayeslmm holds BLAS to it (default 1) inside its REML/ML fits
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BAYESLMM_BLAS_THREADS")


@dataclass(frozen=True)
class Case:
    name: str  # also the dataset name and the key in lme4_bench.R
    formula: str
    large: bool = False  # uses --repeats-large


CASES = (
    Case("InstEval", "y ~ 1 + service + (1|s) + (1|d) + (1|dept)", large=True),
    Case("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    Case("exam", "normexam ~ standLRT + (standLRT | school)"),
    Case("Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)"),
)


# --------------------------------------------------------------------------- load
def time_bayeslmm(case: Case, repeats: int, warmup: bool = True) -> dict:
    import bayeslmm
    from bayeslmm.datasets import load_dataset

    df = load_dataset(case.name)

    def one():
        # Model(...).fit(...) in one timed stretch; the stage times are read on the way
        # (Model.crossprods is computed on first use and reused by fit()).
        t0 = time.perf_counter()
        model = bayeslmm.Model(case.formula, df)
        t1 = time.perf_counter()
        getattr(model, "crossprods", None)
        t2 = time.perf_counter()
        fit = model.fit(method="reml")
        t3 = time.perf_counter()
        opt = getattr(fit.optimization, "seconds", None)
        stages = {"spec": t1 - t0, "crossprods": t2 - t1, "fit": t3 - t2, "optimizer": opt}
        return fit, t3 - t0, stages

    if warmup:
        one()
    meter = CpuMeter()
    times, stage_runs, fit = [], [], None
    for _ in range(repeats):
        gc.collect()
        fit, seconds, stages = one()
        times.append(seconds)
        stage_runs.append(stages)
    stage_medians = {k: statistics.median(r[k] for r in stage_runs)
                     for k in stage_runs[0] if all(r[k] is not None for r in stage_runs)}
    return {
        "formula": case.formula,
        "n": int(len(df)),
        "repeats": repeats,
        "times": times,
        "median": statistics.median(times),
        "objective": float(fit.objective),
        "evaluations": int(fit.optimization.n_evaluations),
        "theta": [float(t) for t in fit.theta],
        "sigma": float(fit.sigma),
        "optimizer": fit.optimization.optimizer,
        "stages": stage_medians,
        "warnings": list(fit.optimization.warnings),
        "other_load_cores": meter.others(),
    }


# --------------------------------------------------------------------------- lme4
def run_lme4(cases: list[Case], repeats: int, repeats_large: int, rscript: str,
             timeout: float) -> tuple[dict | None, str | None]:
    """Run lme4_bench.R; return (parsed JSON, None) or (None, reason)."""
    cmd = [rscript, str(R_SCRIPT), "--data-dir", str(DATA_DIR),
           "--models", ",".join(c.name for c in cases),
           "--repeats", str(repeats), "--repeats-large", str(repeats_large)]
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
        out["other_load_cores"] = meter.others()
        return out, None
    except json.JSONDecodeError as exc:
        return None, f"could not parse lme4_bench.R output ({exc}): {proc.stdout[-500:]!r}"


# --------------------------------------------------------------------------- report
def _fmt_s(x):
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def compare(ours: dict, theirs: dict | None) -> dict:
    row = {"ours": ours, "lme4": theirs}
    if theirs is None:
        return row
    row["speedup"] = theirs["median"] / ours["median"] if ours["median"] > 0 else None
    diff = ours["objective"] - theirs["objective"]
    row["objective_diff"] = diff
    row["objective_ok"] = diff <= OBJ_RTOL * abs(theirs["objective"])
    if theirs.get("formula") and theirs["formula"] != ours["formula"]:
        row["note"] = f"formula mismatch: lme4 ran {theirs['formula']!r}"
    return row


def print_table(rows: dict[str, dict]) -> None:
    head = ("model", "n", "bayeslmm", "lme4", "speed-up", "objective (ours)",
            "objective (lme4)", "ours - lme4", "evals ours", "evals lme4")
    lines = []
    for name, r in rows.items():
        o, t = r["ours"], r["lme4"]
        lines.append((
            name, f"{o['n']:,}", _fmt_s(o["median"]),
            _fmt_s(t["median"]) if t else "-",
            f"{r['speedup']:.1f}x" if r.get("speedup") else "-",
            f"{o['objective']:.6f}",
            f"{t['objective']:.6f}" if t else "-",
            (f"{r['objective_diff']:+.2e}" + ("" if r["objective_ok"] else " WORSE")) if t else "-",
            str(o["evaluations"]),
            str(int(t["feval"])) if t and t.get("feval") is not None else "-",
        ))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(fmt(head))
    print("|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1))
                         for i, w in enumerate(widths)) + "|")
    for l in lines:
        print(fmt(l))
    for name, r in rows.items():
        if r.get("note"):
            print(f"note ({name}): {r['note']}")
        for w in r["ours"]["warnings"]:
            print(f"bayeslmm warning ({name}): {w}")
        if r["lme4"] and r["lme4"].get("warnings"):
            print(f"lme4 warning ({name}): {r['lme4']['warnings']}")


def print_stages(rows: dict[str, dict]) -> None:
    """Where bayeslmm's time goes (medians over the repeats)."""
    print("bayeslmm stages (medians): spec = formula + design matrices, crossprods = "
          "[Z X y]'[Z X y] blocks, fit = optimizer + estimates")
    for name, r in rows.items():
        st = r["ours"]["stages"]
        parts = [f"{k} {_fmt_s(st[k])}" for k in ("spec", "crossprods", "fit") if k in st]
        if "optimizer" in st:
            ev = r["ours"]["evaluations"]
            parts.append(f"(optimizer {_fmt_s(st['optimizer'])}, "
                         f"{st['optimizer'] / ev * 1000:.2f} ms per evaluation)")
        print(f"  {name}: " + ", ".join(parts))


def check_targets(rows: dict[str, dict]) -> list[dict]:
    out = []
    if "InstEval" in rows:
        r = rows["InstEval"]
        s = r.get("speedup")
        out.append({
            "target": f"InstEval REML in <= 1/{TARGET_INSTEVAL_SPEEDUP:g} of lme4's time "
                      f"(speed-up >= {TARGET_INSTEVAL_SPEEDUP:g}x)",
            "value": f"{s:.2f}x" if s else "n/a (no lme4)",
            "met": None if s is None else s >= TARGET_INSTEVAL_SPEEDUP,
        })
    if "sleepstudy" in rows:
        m = rows["sleepstudy"]["ours"]["median"]
        out.append({
            "target": f"sleepstudy REML under {TARGET_SLEEPSTUDY_SECONDS * 1000:g} ms",
            "value": _fmt_s(m),
            "met": m < TARGET_SLEEPSTUDY_SECONDS,
        })
    for name, r in rows.items():
        if r.get("lme4") is not None:
            out.append({
                "target": f"{name}: objective <= lme4's + {OBJ_RTOL:g} relative",
                "value": f"{r['objective_diff']:+.3e}",
                "met": r["objective_ok"],
            })
    return out


def environment(lme4_json: dict | None) -> dict:
    import numpy
    import scipy

    try:
        import bayeslmm
        version = getattr(bayeslmm, "__version__", "?")
    except Exception:  # pragma: no cover
        version = "?"
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "bayeslmm": version,
        "blas": _numpy_blas(),
        "blas_threads_env": {k: os.environ[k] for k in BLAS_ENV if k in os.environ},
    }
    if lme4_json:
        env["R"] = lme4_json.get("r_version")
        env["lme4"] = lme4_json.get("lme4_version")
        env["R_blas"] = lme4_json.get("blas")
    return env


def _numpy_blas() -> str:
    try:
        import numpy
        cfg = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name', '?')} {cfg.get('version', '')}".strip()
    except Exception:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats for the small models (default 5)")
    p.add_argument("--repeats-large", type=int, default=3,
                   help="timed repeats for InstEval (default 3)")
    p.add_argument("--models", default=",".join(c.name for c in CASES),
                   help="comma-separated subset of: " + ", ".join(c.name for c in CASES))
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON here")
    p.add_argument("--no-lme4", action="store_true", help="do not run lme4")
    p.add_argument("--rscript", default=None, help="path to Rscript (default: found on PATH)")
    p.add_argument("--r-timeout", type=float, default=1800, help="seconds allowed for R")
    p.add_argument("--blas-threads", type=int, default=None, metavar="N",
                   help="set OPENBLAS/OMP/MKL_NUM_THREADS=N for bayeslmm (default: leave the "
                        "environment alone; OpenBLAS then uses every core)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a target is missed or an objective is worse than lme4's")
    a = p.parse_args(argv)

    by_name = {c.name.lower(): c for c in CASES}
    try:
        cases = [by_name[m.strip().lower()] for m in a.models.split(",") if m.strip()]
    except KeyError as exc:
        p.error(f"unknown model {exc}; choose from {', '.join(c.name for c in CASES)}")
    if a.repeats < 1 or a.repeats_large < 1:
        p.error("repeats must be >= 1")

    if a.blas_threads is not None:  # must happen before numpy is first imported
        if "numpy" in sys.modules:
            print("warning: numpy already imported; --blas-threads may have no effect")
        for k in BLAS_ENV:
            os.environ[k] = str(a.blas_threads)

    print(f"bayeslmm vs lme4, REML; medians of {a.repeats} repeats "
          f"({a.repeats_large} for InstEval), after one warm-up fit each", flush=True)

    lme4_json, lme4_note = None, None
    rscript = a.rscript or shutil.which("Rscript")
    if a.no_lme4:
        lme4_note = "lme4 skipped (--no-lme4)"
    elif rscript is None:
        lme4_note = "lme4 skipped: Rscript not found on PATH (install R and lme4 to compare)"
    else:
        print(f"running lme4 via {rscript} {R_SCRIPT.relative_to(ROOT)} ...", flush=True)
        t0 = time.perf_counter()
        lme4_json, err = run_lme4(cases, a.repeats, a.repeats_large, rscript, a.r_timeout)
        if err:
            lme4_note = f"lme4 skipped: {err}"
        else:
            print(f"  lme4 done in {time.perf_counter() - t0:.1f} s", flush=True)
    if lme4_note:
        print(lme4_note, flush=True)

    print("running bayeslmm ...", flush=True)
    t0 = time.perf_counter()
    import bayeslmm  # noqa: F401  (import outside the timed region)
    print(f"  import bayeslmm: {time.perf_counter() - t0:.2f} s", flush=True)

    rows = {}
    for case in cases:
        k = a.repeats_large if case.large else a.repeats
        ours = time_bayeslmm(case, k)
        print(f"  {case.name}: median {_fmt_s(ours['median'])} over {k}", flush=True)
        theirs = (lme4_json or {}).get("models", {}).get(case.name)
        rows[case.name] = compare(ours, theirs)

    env = environment(lme4_json)
    print()
    print(f"{env['date']}  {env['processor']}, {env['cpu_count']} cores; Python {env['python']}, "
          f"numpy {env['numpy']}, scipy {env['scipy']}"
          + (f"; R {env['R']}, lme4 {env['lme4']}" if lme4_json else ""))
    threads = env["blas_threads_env"].get("OPENBLAS_NUM_THREADS") or f"default ({os.cpu_count()})"
    print(f"BLAS: bayeslmm {env['blas']}, threads {threads}"
          + (f"; R {os.path.basename(env['R_blas'] or '?')}" if lme4_json else ""))
    print()
    print_table(rows)
    print()
    print("speed-up = lme4 seconds / bayeslmm seconds (medians); "
          "ours - lme4 = REML criterion difference (negative or ~0 is good)")
    if lme4_note:
        print(lme4_note)
    print_stages(rows)
    busy = {f"bayeslmm {n}": r["ours"]["other_load_cores"] for n, r in rows.items()}
    if lme4_json:
        busy["lme4 (whole R run)"] = lme4_json.get("other_load_cores")
    busy = {k: v for k, v in busy.items() if v is not None}
    if busy:
        print("background CPU load from other processes while timing (cores): "
              + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()))
        noisy = [k for k, v in busy.items() if v > BUSY_WARN_CORES]
        if noisy:
            print(f"WARNING: the machine was busy during {', '.join(noisy)}; "
                  "timings are unreliable, rerun on a quiet machine")
    targets = check_targets(rows)
    print()
    print("targets:")
    for t in targets:
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
        print(f"  [{mark}] {t['target']}: {t['value']}")

    if a.json:
        out = {"environment": env, "settings": vars(a), "lme4_note": lme4_note,
               "results": rows, "targets": targets}
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
        print(f"\nwrote {a.json}")

    if a.strict and any(t["met"] is False for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
