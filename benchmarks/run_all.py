#!/usr/bin/env python
"""The benchmark suite: one command, one table, every engine side by side in one run.

    make bench-all                      # = .venv/bin/python benchmarks/run_all.py
    .venv/bin/python benchmarks/run_all.py --quick          # smoke run, small data only

Bayesian (NUTS): bayeslmm (collapsed likelihood, default sampler choice) against bambi
(PyMC's NUTS; bambi fits uncorrelated random effects): wall time, minimum bulk ESS per
second, max R-hat, peak memory.  REML: bayeslmm against lme4 (``Rscript``, when R and
lme4 are installed) and statsmodels ``MixedLM``: wall time, peak memory, and how far
each peer's REML criterion and estimates are from bayeslmm's.  Data: sleepstudy, exam,
InstEval and simulated ``y ~ x + (1 + x | g)`` from 1e3 to 1e7 rows.

Every engine fits every data set in a fresh subprocess with a time budget (``--budget``
seconds for the whole process: start-up, reading the data and the fit) and a memory
limit (``--mem-limit`` GiB, the process tree's resident memory polled every 0.1-0.25 s);
a process over either is killed and recorded as "timeout" or "OOM", as is one that
dies of a memory error.  Once an engine is over budget or out of memory on a simulated
size, the larger sizes are skipped for it.  Peak memory is the child's maximum resident
set size (``os.wait4``'s ``ru_maxrss``, the largest single process of the tree) or the
largest polled sum over the process tree, whichever is larger.  The background load
(cores used by *other* processes while a job ran, ``machine.CpuMeter``) is recorded per
row; rows above 0.25 cores are marked.

Writes ``benchmarks/results/suite_<date>.json`` (every record, every estimate, the
environment) and ``.md`` (the table), and prints the table.  ``--merge PATH`` starts
from an earlier JSON and replaces only the rows run now (to redo rows taken while the
machine was busy).  This is a benchmark, not a test: it exits 0 unless it cannot run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
R_SCRIPT = HERE / "lme4_fit.R"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_bayes as bb  # noqa: E402  (benchmarks/bench_bayes.py: the NUTS worker, finding bambi)
from machine import CpuMeter, cpu_name  # noqa: E402

#: other processes using more than this many cores on average during a job -> marked busy
BUSY_WARN_CORES = 0.25
DEFAULT_SIZES = "1e3x50,1e4x200,1e5x1e3,1e6x1e4,1e7x1e5"
QUICK_SIZES = "1e3x50,1e4x200"
DEFAULT_DATASETS = "sleepstudy,exam,InstEval"
QUICK_DATASETS = "sleepstudy,exam"
SIM_TRUTH = dict(beta=(1.0, 2.0), sd_intercept=1.0, sd_slope=0.5, corr=0.3, sigma=1.0)

#: (method, engine) in table order
ENGINES = (("REML", "bayeslmm"), ("REML", "lme4"), ("REML", "statsmodels"),
           ("NUTS", "bayeslmm"), ("NUTS", "bambi"))
ENGINE_FLAGS = {"bayeslmm-reml": ("REML", "bayeslmm"), "lme4": ("REML", "lme4"),
                "statsmodels": ("REML", "statsmodels"), "bayeslmm-nuts": ("NUTS", "bayeslmm"),
                "bambi": ("NUTS", "bambi")}
#: failures after which an engine is not tried on larger simulated sizes
STOPPING = ("timeout", "OOM")
# BAYESLMM_BLAS_THREADS: bayeslmm holds BLAS to it (default 1) inside its REML/ML fits
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BAYESLMM_BLAS_THREADS")
MEMORY_ERRORS = ("MemoryError", "Unable to allocate", "cannot allocate vector", "std::bad_alloc",
                 "Cannot allocate memory", "out of memory")


# =========================================================================== data sets
@dataclass(frozen=True)
class Dataset:
    key: str                      # table label and record key
    formula: str                  # lme4 syntax, used by bayeslmm, lme4 and bambi
    columns: tuple[str, ...]      # the columns the engines need
    groups: str                   # number of levels of each grouping factor, for the table
    sm: dict | None               # statsmodels MixedLM specification; None: cannot express it
    sm_note: str = ""
    bambi_params: tuple[str, ...] = ()
    bambi_effects: tuple[str, ...] = ()
    size: tuple[int, int] | None = None  # (rows, groups) of a simulated data set
    rows: int | None = None


REAL_DATASETS = {
    "sleepstudy": Dataset(
        "sleepstudy", "Reaction ~ Days + (Days | Subject)", ("Reaction", "Days", "Subject"), "18",
        sm={"formula": "Reaction ~ Days", "groups": "Subject", "re_formula": "~Days", "group_name": "Subject"},
        bambi_params=("Intercept", "Days", "1|Subject_sigma", "Days|Subject_sigma", "sigma"),
        bambi_effects=("1|Subject", "Days|Subject"), rows=180),
    "exam": Dataset(
        "exam", "normexam ~ standLRT + (standLRT | school)", ("normexam", "standLRT", "school"), "65",
        sm={"formula": "normexam ~ standLRT", "groups": "school", "re_formula": "~standLRT",
            "group_name": "school"},
        bambi_params=("Intercept", "standLRT", "1|school_sigma", "standLRT|school_sigma", "sigma"),
        bambi_effects=("1|school", "standLRT|school"), rows=4059),
    "InstEval": Dataset(
        "InstEval", "y ~ 1 + service + (1|s) + (1|d) + (1|dept)", ("y", "service", "s", "d", "dept"),
        "2972, 1128, 14",
        # MixedLM's random effects live inside one grouping factor; three crossed factors
        # become variance components of a single group holding every row.
        sm={"formula": "y ~ service", "groups": None, "re_formula": "0",
            "vc_formula": {"s": "0 + C(s)", "d": "0 + C(d)", "dept": "0 + C(dept)"}, "use_sparse": True},
        sm_note="crossed factors as variance components of one all-rows group",
        bambi_params=("Intercept", "service", "1|s_sigma", "1|d_sigma", "1|dept_sigma", "sigma"),
        bambi_effects=("1|s", "1|d", "1|dept"), rows=73421),
}


def sim_dataset(n: int, j: int) -> Dataset:
    return Dataset(
        f"sim {bb.size_label(n, j)}", "y ~ x + (1 + x | g)", ("y", "x", "g"), f"{j:,}",
        sm={"formula": "y ~ x", "groups": "g", "re_formula": "~x", "group_name": "g"},
        bambi_params=("Intercept", "x", "1|g_sigma", "x|g_sigma", "sigma"), bambi_effects=("1|g", "x|g"),
        size=(n, j), rows=n)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1e3x50,1e4x200' -> [(1000, 50), (10000, 200)]; rows must be a multiple of groups."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n_text, j_text = part.split("x")
            n, j = int(float(n_text)), int(float(j_text))
        except ValueError:
            raise ValueError(f"--sizes: {part!r} is not ROWSxGROUPS (e.g. 1e5x1e3)") from None
        if n < 1 or j < 2 or n % j:
            raise ValueError(f"--sizes: {part!r}: need at least 2 groups and rows a multiple of groups")
        out.append((n, j))
    return sorted(out)


def load_data(ds: Dataset, seed: int):
    import pandas as pd

    if ds.size is None:
        from bayeslmm.datasets import load_dataset

        df = load_dataset(ds.key)
    else:
        from bayeslmm.simulate import simulate_lmm

        n, j = ds.size
        df = simulate_lmm(n_groups=j, n_per_group=n // j, random_seed=seed, **SIM_TRUTH)
    df = df[list(ds.columns)].copy()
    for c in df.columns:  # integers (sleepstudy's Days, InstEval's y) as float64: one kind for R
        if not isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype("float64")
    return df


def write_data(df, directory: Path) -> None:
    """The same numbers for every engine: data.npz for Python (bench_bayes.load_frame) and
    one little-endian binary file per column for R (lme4_fit.R): float64 values, or
    int32 codes plus a .levels file for categoricals."""
    import numpy as np
    import pandas as pd

    directory.mkdir(parents=True, exist_ok=True)
    bb.save_frame(df, directory / "data.npz")
    meta = ["name\tkind\tn"]
    for c in df.columns:
        s = df[c]
        if isinstance(s.dtype, pd.CategoricalDtype):
            s.cat.codes.to_numpy().astype("<i4").tofile(directory / f"{c}.bin")
            (directory / f"{c}.levels").write_text("".join(f"{v}\n" for v in s.cat.categories))
            meta.append(f"{c}\tfactor\t{len(s)}")
        else:
            np.ascontiguousarray(s.to_numpy(dtype="float64")).astype("<f8").tofile(directory / f"{c}.bin")
            meta.append(f"{c}\tdouble\t{len(s)}")
    (directory / "columns.tsv").write_text("\n".join(meta) + "\n")


# =========================================================================== estimates
def canonical_from_varcorr(beta, sigma, grp, var1, var2, sdcor) -> dict:
    """Estimates keyed so that every engine can be compared by name: fixed effects by
    position, sds and correlations by grouping factor in the order of
    ``as.data.frame(VarCorr())`` (bayeslmm's ``fit.varcorr`` has the same layout)."""
    sd, corr = {}, {}
    for g, a, b, v in zip(grp, var1, var2, sdcor):
        if g == "Residual":
            continue
        target = corr if (b is not None and not (isinstance(b, float) and math.isnan(b))) else sd
        target.setdefault(str(g), []).append(float(v))
    return {"beta": [float(b) for b in beta], "sd": sd, "corr": corr, "sigma": float(sigma)}


def flatten_estimates(est: dict) -> dict[str, float]:
    out = {f"beta[{i}]": v for i, v in enumerate(est.get("beta", []))}
    for kind in ("sd", "corr"):
        for g, vals in est.get(kind, {}).items():
            for i, v in enumerate(vals):
                out[f"{kind}[{g}][{i}]"] = v
    if est.get("sigma") is not None:
        out["sigma"] = est["sigma"]
    return out


def estimate_difference(ours: dict, theirs: dict) -> tuple[float | None, str | None]:
    """Largest difference over the parameters both have: relative (|theirs - ours| / |ours|)
    for fixed effects, sds and sigma, absolute for correlations.  Returns (value, key);
    (None, reason) when the two do not hold the same parameters."""
    a, b = flatten_estimates(ours), flatten_estimates(theirs)
    if set(a) != set(b):
        return None, f"different parameters: {sorted(set(a) ^ set(b))}"
    worst, key = 0.0, None
    for k, v in a.items():
        d = abs(b[k] - v) if k.startswith("corr") else abs(b[k] - v) / max(abs(v), 1e-12)
        if d >= worst:
            worst, key = d, k
    return worst, key


# =========================================================================== workers
def reml_worker(cfg_path: str, out_path: str) -> int:
    """One engine, one data set, in this fresh process: fit by REML, time it, write JSON."""
    cfg = json.loads(Path(cfg_path).read_text())
    out = Path(out_path)
    t0 = time.perf_counter()
    import resource

    import numpy as np

    if cfg["engine"] == "bayeslmm":
        sys.path.insert(0, str(ROOT))
        import bayeslmm

        version = bayeslmm.__version__

        def one():
            t = time.perf_counter()
            fit = bayeslmm.Model(cfg["formula"], df).fit(method="reml")
            return fit, time.perf_counter() - t, []

        def describe(fit):
            vc = fit.varcorr
            var2 = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in vc["var2"]]
            return {"objective": float(fit.objective),
                    "estimates": canonical_from_varcorr(fit.fixef.to_numpy(), fit.sigma, vc["grp"], vc["var1"],
                                                        var2, vc["sdcor"]),
                    "evaluations": int(fit.optimization.n_evaluations),
                    "converged": True, "optimizer": fit.optimization.optimizer,
                    "warnings": list(fit.optimization.warnings)}
    else:
        import statsmodels
        import statsmodels.formula.api as smf

        version = statsmodels.__version__
        sm = cfg["sm"]

        def one():
            groups = df[sm["groups"]] if sm.get("groups") else np.zeros(len(df))
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = smf.mixedlm(sm["formula"], df, groups=groups, re_formula=sm.get("re_formula"),
                                    vc_formula=sm.get("vc_formula"), use_sparse=sm.get("use_sparse", False))
                res = model.fit(reml=True)
            seconds = time.perf_counter() - t
            return (model, res), seconds, sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})

        def describe(fitted):
            model, res = fitted
            sd, corr = {}, {}
            if sm.get("re_formula") not in (None, "0"):
                cov = np.asarray(res.cov_re, dtype=float)
                s = np.sqrt(np.diag(cov))
                sd[sm["group_name"]] = [float(v) for v in s]
                q = len(s)
                corr_vals = [float(cov[j, i] / (s[i] * s[j])) for i in range(q) for j in range(i + 1, q)]
                if corr_vals:
                    corr[sm["group_name"]] = corr_vals
            if sm.get("vc_formula"):
                for name, var in zip(model.exog_vc.names, np.asarray(res.vcomp, dtype=float)):
                    sd[str(name)] = [float(np.sqrt(max(var, 0.0)))]
            return {"objective": float(-2.0 * res.llf),  # REML criterion on lme4's scale
                    "estimates": {"beta": [float(v) for v in np.asarray(res.fe_params)], "sd": sd, "corr": corr,
                                  "sigma": float(np.sqrt(res.scale))},
                    "converged": bool(res.converged), "optimizer": "statsmodels MixedLM.fit defaults"}

    import_seconds = time.perf_counter() - t0
    df = bb.load_frame(cfg["data"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fitted, first, caught = one()
    times = []
    if first < cfg["repeat_under"]:
        for _ in range(cfg["repeats"]):
            gc.collect()
            fitted, seconds, caught = one()
            times.append(seconds)
    result = {"engine": cfg["engine"], "version": version, "import_seconds": import_seconds,
              "first_seconds": first, "times": times, "wall": statistics.median(times) if times else first,
              "rss_before_fit_bytes": rss_before, **describe(fitted)}
    result["warnings"] = sorted(set(result.get("warnings", [])) | set(caught))
    out.write_text(json.dumps(result, indent=1, default=str))
    return 0


# =========================================================================== running a job
def _tree_rss(proc) -> int:
    """Resident bytes of a process and all its descendants (0 when it is gone)."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(cmd: list[str], budget: float, mem_limit: float, log_path: Path, env: dict | None = None) -> dict:
    """Run cmd in a new session; kill its process group when it runs past `budget` seconds
    or its process tree holds more than `mem_limit` bytes.  Never waits longer than the
    budget (plus the polling interval)."""
    import psutil

    meter = CpuMeter()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                env=env)
    try:
        ps = psutil.Process(proc.pid)
    except psutil.Error:
        ps = None
    killed, polled_peak, status, usage = None, 0, 0, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        elapsed = time.perf_counter() - t0
        rss = _tree_rss(ps) if ps is not None else 0
        polled_peak = max(polled_peak, rss)
        if killed is None and rss > mem_limit:
            killed = "oom"
        elif killed is None and elapsed > budget:
            killed = "timeout"
        if killed is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.1 if elapsed < 10 else 0.25)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    maxrss = usage.ru_maxrss * 1024 if usage is not None else 0
    lines = log_path.read_text(errors="replace").splitlines()
    return {"returncode": proc.returncode, "killed": killed, "process_seconds": seconds,
            "peak_rss_bytes": max(maxrss, polled_peak), "maxrss_bytes": maxrss, "polled_peak_bytes": polled_peak,
            "other_load_cores": meter.others(), "log_tail": lines[-30:]}


def classify(run: dict, budget: float, mem_limit: float) -> tuple[str, str]:
    """(status, note) of a finished child: ok, timeout, OOM or failed."""
    if run.get("killed") == "timeout":
        return "timeout", f"over the {budget:g} s budget"
    if run.get("killed") == "oom":
        return "OOM", f"over the {fmt_mem(mem_limit / 2**20)} memory limit"
    tail = [ln.strip() for ln in run.get("log_tail", []) if ln.strip()]
    if run.get("returncode") == -signal.SIGKILL:
        return "OOM", "killed by SIGKILL from outside (the kernel's OOM killer?)"
    if run.get("returncode") != 0:
        for ln in reversed(tail):
            if any(m in ln for m in MEMORY_ERRORS):
                return "OOM", _short(ln)
        err = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        return "failed", f"exit {run.get('returncode')}: {_short(err)}"
    return "ok", ""


def _short(line: str, width: int = 120) -> str:
    """'numpy._core._exceptions._ArrayMemoryError: msg' -> '_ArrayMemoryError: msg'."""
    head, sep, msg = line.partition(": ")
    if sep and " " not in head:
        line = f"{head.rsplit('.', 1)[-1]}: {msg}"
    return line if len(line) <= width else line[: width - 1] + "…"


def skip_reason(stopped: dict, key: tuple[str, str]) -> str | None:
    """Why an engine is not run on a larger simulated size: it already ran out of time or
    memory on a smaller one (stopped maps (method, engine) to (size label, status))."""
    if key in stopped:
        label, status = stopped[key]
        return f"skipped: {status} at {label}"
    return None


# =========================================================================== records
def new_record(ds: Dataset, method: str, engine: str, run_at: str) -> dict:
    return {"dataset": ds.key, "rows": ds.rows, "groups": ds.groups, "size": list(ds.size) if ds.size else None,
            "method": method, "engine": engine, "status": None, "note": "", "wall": None, "run_at": run_at}


def fill_from_child(rec: dict, run: dict, status: str, note: str) -> None:
    rec.update(status=status, process_seconds=run["process_seconds"],
               peak_rss_mib=run["peak_rss_bytes"] / 2**20, other_load_cores=run["other_load_cores"])
    if note:
        rec["note"] = "; ".join(x for x in (rec.get("note"), note) if x)
    if status != "ok":
        rec["log_tail"] = run["log_tail"][-8:]


def fill_reml(rec: dict, res: dict) -> None:
    for k in ("wall", "first_seconds", "times", "objective", "estimates", "evaluations", "converged",
              "optimizer", "version", "import_seconds", "read_seconds", "feval", "theta",
              "rss_before_fit_bytes", "r_version", "lme4_version"):
        if k in res:
            rec[k] = res[k]
    warn = [w for w in (res.get("warnings") or []) if w]
    if isinstance(res.get("warnings"), str):
        warn = [res["warnings"]] if res["warnings"] else []
    rec["warnings"] = warn
    if rec["engine"] == "lme4" and "fixef" in res:
        rec["estimates"] = canonical_from_varcorr(res["fixef"], res["sigma"], res["vc_grp"], res["vc_var1"],
                                                  res["vc_var2"], res["vc_sdcor"])
        rec["version"] = res.get("lme4_version")
        rec["optimizer"] = res.get("optimizer")
    if rec["engine"] == "statsmodels" and res.get("converged") is False:
        rec["note"] = "; ".join(x for x in (rec.get("note"), "statsmodels: not converged") if x)


def fill_nuts(rec: dict, res: dict) -> None:
    run = res["runs"][0]
    row = bb.summarize_run(res, run)
    rec.update(wall=row["wall"], min_ess=row["min_ess"], ess_per_s=row["ess_per_s"], max_rhat=row["max_rhat"],
               divergences=row["divergences"], compile_seconds=row["compile"], model_seconds=row["model"],
               import_seconds=res.get("import_seconds"), versions=res.get("versions"),
               warnings=row.get("warnings", []))
    if rec["engine"] == "bayeslmm":
        backend = (run.get("engine_timings") or {}).get("backend")
        rec["sampler"] = run.get("sampler_used") or res["config"].get("sampler")
        if backend == "kernel":
            rec["sampler"] += " (kernel)"
        rec["version"] = res.get("bayeslmm_version")
    else:
        rec["sampler"] = res.get("bambi_nuts_sampler", "")
        rec["version"] = res.get("bambi_version")
        rec["note"] = "; ".join(x for x in (rec.get("note"), "uncorrelated effects (bambi's best)") if x)


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of `new` replace the rows of `old` with the same (data set, method, engine);
    the rest of `old` is kept.  Returned in table order."""
    by_key = {(r["dataset"], r["method"], r["engine"]): r for r in old}
    for r in new:
        by_key[(r["dataset"], r["method"], r["engine"])] = r
    return sort_records(list(by_key.values()))


def _dataset_order(r: dict) -> tuple:
    real = list(REAL_DATASETS)
    if r.get("size"):
        return (1, r["size"][0], r["size"][1], "")
    return (0, real.index(r["dataset"]) if r["dataset"] in real else len(real), 0, r["dataset"])


def sort_records(records: list[dict]) -> list[dict]:
    order = {k: i for i, k in enumerate(ENGINES)}
    return sorted(records, key=lambda r: (_dataset_order(r), order.get((r["method"], r["engine"]), 99)))


def compare_records(records: list[dict]) -> list[dict]:
    """Adds `vs` to every peer row that finished: REML: speed-up = peer wall / bayeslmm wall,
    objective difference (bayeslmm - peer, REML criterion on lme4's scale: negative means
    bayeslmm found a higher restricted likelihood) and the largest estimate difference;
    NUTS: speed-up = bayeslmm min ESS/s / peer min ESS/s, and the wall ratio."""
    ref = {(r["dataset"], r["method"]): r for r in records
           if r["engine"] == "bayeslmm" and r.get("status") == "ok"}
    for r in records:
        r.pop("vs", None)
        base = ref.get((r["dataset"], r["method"]))
        if r["engine"] == "bayeslmm" or r.get("status") != "ok" or base is None:
            continue
        vs = {}
        if r["method"] == "REML":
            if base.get("wall") and r.get("wall"):
                vs["speedup"] = r["wall"] / base["wall"]
            if base.get("objective") is not None and r.get("objective") is not None:
                vs["objective_diff"] = base["objective"] - r["objective"]
            if base.get("estimates") and r.get("estimates"):
                d, key = estimate_difference(base["estimates"], r["estimates"])
                vs["estimate_diff"], vs["estimate_worst"] = d, key
        else:
            if base.get("ess_per_s") and r.get("ess_per_s"):
                vs["speedup"] = base["ess_per_s"] / r["ess_per_s"]
            if base.get("wall") and r.get("wall"):
                vs["wall_ratio"] = r["wall"] / base["wall"]
        r["vs"] = vs
    return records


# =========================================================================== the table
def fmt_seconds(x) -> str:
    if x is None:
        return "-"
    if x < 1:
        return f"{x * 1000:.1f} ms"
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def fmt_mem(mib) -> str:
    if mib is None:
        return "-"
    return f"{mib:.0f} MiB" if mib < 1024 else f"{mib / 1024:.2f} GiB"


def fmt_ratio(x) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}×"
    return f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


def fmt_ess_rate(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _agreement(r: dict) -> str:
    if r.get("status") != "ok":
        return ""
    if r["method"] == "REML":
        if r["engine"] == "bayeslmm":
            return f"REML crit {r['objective']:.6f}" if r.get("objective") is not None else ""
        vs = r.get("vs") or {}
        parts = []
        if vs.get("objective_diff") is not None:
            parts.append(f"Δcrit {vs['objective_diff']:+.1e}")
        if vs.get("estimate_diff") is not None:
            parts.append(f"est {vs['estimate_diff']:.1e}")
        elif vs.get("estimate_worst"):
            parts.append("est: not comparable")
        return "; ".join(parts)
    return r.get("sampler") or ""


def _peer_warning(r: dict, width: int = 90) -> str:
    """A REML peer's own convergence warning, shortened to one line (lme4's messages have newlines)."""
    if r["method"] != "REML" or r["engine"] == "bayeslmm" or not r.get("warnings"):
        return ""
    text = " ".join(" ".join(str(w).split()) for w in r["warnings"])
    text = f"{r['engine']} warns: {text}"
    return text if len(text) <= width else text[: width - 1] + "…"


def table_rows(records: list[dict]) -> list[list[str]]:
    body = []
    for r in records:
        ok = r.get("status") == "ok"
        load = r.get("other_load_cores")
        busy = load is not None and load > BUSY_WARN_CORES
        rows = f"{r['rows']:,}" if r.get("rows") else "-"
        wall = fmt_seconds(r.get("wall")) if ok else (r.get("status") or "-")
        vs = r.get("vs") or {}
        body.append([
            r["dataset"], rows, r.get("groups") or "-", r["method"], r["engine"], wall,
            fmt_mem(r.get("peak_rss_mib")),
            fmt_ess_rate(r.get("ess_per_s")) if ok and r["method"] == "NUTS" else "",
            bb._f(r.get("max_rhat"), "{:.4f}") if ok and r["method"] == "NUTS" else "",
            fmt_ratio(vs.get("speedup")) if vs.get("speedup") else "",
            _agreement(r),
            ("-" if load is None else f"{load:.2f}") + (" busy" if busy else ""),
            "; ".join(x for x in (r.get("note"), _peer_warning(r)) if x),
        ])
    return body


TABLE_HEADERS = ["data", "rows", "groups", "method", "engine", "wall", "peak RSS", "min ESS/s", "max R-hat",
                 "bayeslmm speed-up", "agreement with bayeslmm", "load", "note"]

LEGEND = """\
wall: REML: median of 5 repeated fits when the first fit in the process took < 1 s, else that first fit;
  NUTS: one fit in a fresh process (Model + fit: compilation, tuning, sampling, post-processing).
  Imports and data loading are not in it; they are in the budget.
peak RSS: the engine's process (tree), interpreter, imports and data included.
bayeslmm speed-up: REML: peer wall / bayeslmm wall; NUTS: bayeslmm min ESS/s / peer min ESS/s
  (min bulk ESS over fixed effects, random-effect sds, correlations and sigma).
agreement: Δcrit = bayeslmm REML criterion - peer's (lme4's scale; < 0: bayeslmm's optimum is higher);
  est = largest difference from bayeslmm's estimates (relative for fixed effects, sds and sigma,
  absolute for correlations).  For NUTS rows: the sampler used.
load: cores used by other processes while the job ran; "busy" above 0.25 (timings unreliable)."""


def render_table(records: list[dict]) -> str:
    align = ["l", "r", "r", "l", "l", "r", "r", "r", "r", "r", "l", "r", "l"]
    return bb.md_table(TABLE_HEADERS, table_rows(records), align)


def pivot_cell(r: dict | None) -> str:
    """One engine's result as a cell of the side-by-side table."""
    if r is None:
        return "-"
    busy = "*" if (r.get("other_load_cores") or 0) > BUSY_WARN_CORES else ""
    if r.get("status") != "ok":
        return (r.get("status") or "-") + busy
    if r["method"] == "REML":
        return f"{fmt_seconds(r.get('wall'))}, {fmt_mem(r.get('peak_rss_mib'))}{busy}"
    return (f"{fmt_ess_rate(r.get('ess_per_s'))}/s, {fmt_seconds(r.get('wall'))}, "
            f"{fmt_mem(r.get('peak_rss_mib'))}{busy}")


def pivot_table(records: list[dict]) -> str:
    """Side by side, one line per data set: REML wall and peak memory of each engine, NUTS
    min ESS per second, wall and peak memory; '*' marks a job run while the machine was busy."""
    by = {(r["dataset"], r["method"], r["engine"]): r for r in records}
    datasets = []
    for r in sort_records(records):
        if r["dataset"] not in [d["dataset"] for d in datasets]:
            datasets.append(r)
    headers = ["data", "rows", "REML bayeslmm", "REML lme4", "REML statsmodels", "NUTS bayeslmm", "NUTS bambi"]
    body = []
    for d in datasets:
        rows = f"{d['rows']:,}" if d.get("rows") else "-"
        body.append([d["dataset"], rows] + [pivot_cell(by.get((d["dataset"], m, e))) for m, e in ENGINES])
    return bb.md_table(headers, body, ["l", "r", "r", "r", "r", "r", "r"])


PIVOT_LEGEND = ("REML cells: wall, peak RSS; NUTS cells: min bulk ESS per second, wall, peak RSS; "
                "'*': taken while other processes used > 0.25 cores; timeout / OOM / skipped: see the full table.")


def render_report(records: list[dict], environments: dict, notes: list[str]) -> str:
    records = compare_records(sort_records(records))
    lines = []
    used = {r.get("run_at") for r in records}
    for run_at, env in sorted(environments.items()):
        if run_at in used:  # runs whose rows were all replaced by a merge are left out
            lines.append(f"run {run_at}: {env_line(env)}")
    lines += ["", pivot_table(records), "", PIVOT_LEGEND, "", render_table(records), "", LEGEND]
    busy = [f"{r['dataset']} {r['method']} {r['engine']}" for r in records
            if (r.get("other_load_cores") or 0) > BUSY_WARN_CORES]
    if busy:
        lines.append(f"\nrows taken while other processes used > {BUSY_WARN_CORES} cores: " + ", ".join(busy))
    runs = sorted({r.get("run_at") for r in records if r.get("run_at")})
    if len(runs) > 1:
        lines.append("\nmerged table: rows come from the runs " + ", ".join(runs))
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def env_line(env: dict) -> str:
    parts = [f"{env.get('processor', '?')}, {env.get('cpu_count', '?')} cores",
             f"Python {env.get('python', '?')}"]
    for k in ("bayeslmm", "numpy", "statsmodels", "pymc", "nutpie", "bambi", "R", "lme4"):
        if env.get(k):
            parts.append(f"{k} {env[k]}")
    if env.get("git_head"):
        parts.append(f"git {env['git_head']}" + (" (bayeslmm/ modified)" if env.get("bayeslmm_dirty") else ""))
    if env.get("settings"):
        parts.append(env["settings"])
    return "; ".join(parts)


# =========================================================================== main
def check_lme4(rscript: str | None) -> tuple[str | None, str | None]:
    if rscript is None:
        return None, "lme4 skipped: Rscript not found on PATH (install R and lme4 to compare)"
    try:
        r = subprocess.run([rscript, "-e", "suppressPackageStartupMessages(library(lme4))"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"lme4 skipped: {rscript} did not run ({exc})"
    if r.returncode != 0:
        return None, f"lme4 skipped: library(lme4) fails in {rscript}: {r.stderr.strip()[-200:]}"
    return rscript, None


def default_mem_limit() -> float:
    try:
        import psutil

        return min(16 * 2**30, 0.7 * psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return 8 * 2**30


def environment(seed_settings: str) -> dict:
    from importlib import metadata

    env = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "processor": cpu_name(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "settings": seed_settings,
           **bb.code_fingerprint()}
    for dist in ("numpy", "statsmodels", "pymc", "nutpie"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        env["bayeslmm"] = metadata.version("bayeslmm")
    except metadata.PackageNotFoundError:
        pass
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: data sets {QUICK_DATASETS}, sizes {QUICK_SIZES}, 300 draws / 300 tune, "
                        "budget 120 s (explicit options still win)")
    p.add_argument("--sizes", default=None, help=f"simulated ROWSxGROUPS, comma-separated (default {DEFAULT_SIZES}; "
                                                 "'' for none)")
    p.add_argument("--datasets", default=None, help=f"real data sets (default {DEFAULT_DATASETS}; '' for none)")
    p.add_argument("--engines", default=",".join(ENGINE_FLAGS),
                   help="comma-separated subset of " + ", ".join(ENGINE_FLAGS))
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per engine and data set, whole process (default 600; 120 with --quick)")
    p.add_argument("--mem-limit", type=float, default=None,
                   help="GiB per engine process tree (default: 70%% of the memory available at start, at most 16)")
    p.add_argument("--draws", type=int, default=None, help="NUTS draws per chain (default 1000; 300 with --quick)")
    p.add_argument("--tune", type=int, default=None, help="NUTS tuning steps (default 1000; 300 with --quick)")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--seed", type=int, default=20261121, help="NUTS random_seed and the simulator's seed")
    p.add_argument("--repeats", type=int, default=5, help="REML: timed repeats when the first fit is fast")
    p.add_argument("--repeat-under", type=float, default=1.0,
                   help="REML: repeat when the first fit took fewer seconds than this (default 1)")
    p.add_argument("--blas-threads", type=int, default=None, metavar="N",
                   help="set OPENBLAS/OMP/MKL_NUM_THREADS=N in every engine's process (default: leave the "
                        "environment alone; OpenBLAS then uses every core)")
    p.add_argument("--no-bambi", action="store_true", help="do not run bambi")
    p.add_argument("--no-r", action="store_true", help="do not run lme4")
    p.add_argument("--no-statsmodels", action="store_true", help="do not run statsmodels")
    p.add_argument("--rscript", default=None, help="path to Rscript (default: found on PATH)")
    p.add_argument("--merge", metavar="JSON", help="start from an earlier suite JSON; rows run now replace its rows")
    p.add_argument("--out", metavar="PREFIX", default=None,
                   help="write PREFIX.json and PREFIX.md (default benchmarks/results/suite_<date>)")
    p.add_argument("--render", metavar="JSON", help="print (and with --out write) the table of an earlier "
                                                   "suite JSON without running anything")
    p.add_argument("--worker", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return reml_worker(*a.worker)
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        report = render_report(saved.get("records", []), saved.get("environments", {}), saved.get("notes", []))
        print(report)
        if a.out:
            Path(f"{a.out}.md").write_text(report + "\n")
        return 0

    budget = a.budget if a.budget is not None else (120.0 if a.quick else 600.0)
    draws = a.draws if a.draws is not None else (300 if a.quick else 1000)
    tune = a.tune if a.tune is not None else (300 if a.quick else 1000)
    sizes_text = a.sizes if a.sizes is not None else (QUICK_SIZES if a.quick else DEFAULT_SIZES)
    ds_text = a.datasets if a.datasets is not None else (QUICK_DATASETS if a.quick else DEFAULT_DATASETS)
    mem_limit = a.mem_limit * 2**30 if a.mem_limit else default_mem_limit()
    try:
        sizes = parse_sizes(sizes_text)
    except ValueError as exc:
        p.error(str(exc))
    real_by_lower = {k.lower(): k for k in REAL_DATASETS}
    names = [s.strip() for s in ds_text.split(",") if s.strip()]
    unknown = [s for s in names if s.lower() not in real_by_lower]
    if unknown:
        p.error(f"--datasets: unknown {unknown}; choose from {', '.join(REAL_DATASETS)}")
    datasets = [REAL_DATASETS[real_by_lower[s.lower()]] for s in names] + [sim_dataset(n, j) for n, j in sizes]
    flags = [s.strip() for s in a.engines.split(",") if s.strip()]
    if any(f not in ENGINE_FLAGS for f in flags):
        p.error(f"--engines: choose from {', '.join(ENGINE_FLAGS)}")
    engines = [ENGINE_FLAGS[f] for f in flags]
    if a.no_bambi:
        engines = [e for e in engines if e[1] != "bambi"]
    if a.no_r:
        engines = [e for e in engines if e[1] != "lme4"]
    if a.no_statsmodels:
        engines = [e for e in engines if e[1] != "statsmodels"]
    if not datasets or not engines:
        p.error("nothing to run: no data sets or no engines left")

    notes = []
    rscript = bambi_py = None
    if ("REML", "lme4") in engines:
        rscript, why = check_lme4(a.rscript or shutil.which("Rscript"))
        if why:
            notes.append(why)
            engines.remove(("REML", "lme4"))
    else:
        notes.append("lme4 skipped (--no-r or not in --engines)")
    if ("NUTS", "bambi") in engines:
        bambi_py, why = bb.find_bambi()
        if bambi_py is None:
            notes.append(why)
            engines.remove(("NUTS", "bambi"))
    else:
        notes.append("bambi skipped (--no-bambi or not in --engines)")
    if ("REML", "statsmodels") not in engines:
        notes.append("statsmodels skipped (--no-statsmodels or not in --engines)")
    engines = [e for e in ENGINES if e in engines]

    settings = (f"NUTS {a.chains} chains x {draws} draws ({tune} tune), seed {a.seed}; budget {budget:g} s, "
                f"memory limit {mem_limit / 2**30:.1f} GiB per job; BLAS threads "
                + (str(a.blas_threads) if a.blas_threads else "default"))
    child_env = None
    if a.blas_threads:
        child_env = {**os.environ, **{k: str(a.blas_threads) for k in BLAS_ENV}}
    env = environment(settings)
    run_at = env["date"]
    print(f"benchmark suite {run_at}: {env['processor']}, {env['cpu_count']} cores; {settings}", flush=True)
    print(f"data: {', '.join(d.key for d in datasets)}; engines: "
          f"{', '.join(f'{m} {e}' for m, e in engines)}", flush=True)
    for n in notes:
        print(n, flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    prefix = Path(a.out) if a.out else RESULTS / f"suite_{_dt.datetime.now():%Y%m%d_%H%M}"
    tmp = Path(tempfile.mkdtemp(prefix="bench_suite_"))
    records: list[dict] = []
    stopped: dict = {}
    old_records, environments = [], {}
    if a.merge:
        old = json.loads(Path(a.merge).read_text())
        old_records, environments = old.get("records", []), dict(old.get("environments", {}))
    environments[run_at] = env

    def save():
        merged = merge_records(old_records, records)
        report = render_report(merged, environments, notes)
        Path(f"{prefix}.json").write_text(json.dumps(
            {"environments": environments, "notes": notes, "records": compare_records(merged)},
            indent=1, default=str))
        Path(f"{prefix}.md").write_text(report + "\n")
        return report

    try:
        for ds in datasets:
            print(f"\n== {ds.key}: {ds.formula}", flush=True)
            df = load_data(ds, a.seed)
            ds = Dataset(**{**ds.__dict__, "rows": len(df)})
            data_dir = tmp / ds.key.replace(" ", "_")
            write_data(df, data_dir)
            del df
            gc.collect()
            for method, engine in engines:
                rec = new_record(ds, method, engine, run_at)
                records.append(rec)
                why = skip_reason(stopped, (method, engine)) if ds.size else None
                if engine == "statsmodels" and ds.sm is None:
                    why = f"n/a: {ds.sm_note}"
                if why:
                    rec.update(status="skipped" if why.startswith("skipped") else "n/a", note=why)
                    print(f"  {method} {engine}: {why}", flush=True)
                    continue
                if engine == "statsmodels" and ds.sm_note:
                    rec["note"] = ds.sm_note
                run_job(rec, ds, data_dir, tmp, budget, mem_limit, draws, tune, a, rscript, bambi_py, child_env)
                print(f"  {method} {engine}: {describe_record(rec)}", flush=True)
                if rec["status"] in STOPPING and ds.size:
                    stopped[(method, engine)] = (bb.size_label(*ds.size), rec["status"])
                save()
            shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in records:  # versions of the peers, from the rows that ran
        if r["engine"] == "lme4" and r.get("lme4_version"):
            env.update(R=r.get("r_version"), lme4=r["lme4_version"])
        if r["engine"] == "bambi" and r.get("version"):
            env["bambi"] = r["version"]
    report = save()
    print()
    print(report)
    print(f"\nwrote {prefix}.json and {prefix}.md")
    return 0


def describe_record(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']} ({r.get('note', '')}); process {r.get('process_seconds', 0):.0f} s"
    s = f"wall {fmt_seconds(r['wall'])}, peak {fmt_mem(r.get('peak_rss_mib'))}"
    if r["method"] == "NUTS":
        s += f", min ESS {bb._f(r.get('min_ess'), '{:.0f}')}, {fmt_ess_rate(r.get('ess_per_s'))}/s, " \
             f"R-hat {bb._f(r.get('max_rhat'), '{:.4f}')}, {r.get('sampler', '')}"
    elif r.get("objective") is not None:
        s += f", REML crit {r['objective']:.6f}"
    return s + f"; load {bb._f(r.get('other_load_cores'))}"


def run_job(rec: dict, ds: Dataset, data_dir: Path, tmp: Path, budget: float, mem_limit: float,
            draws: int, tune: int, a, rscript: str | None, bambi_py: str | None, env: dict | None = None) -> None:
    """Run one engine on one data set in a fresh process and fill its record."""
    method, engine = rec["method"], rec["engine"]
    tag = f"{data_dir.name}_{method}_{engine}"
    out = tmp / f"{tag}.out.json"
    cfg_path = tmp / f"{tag}.cfg.json"
    log = tmp / f"{tag}.log"
    if method == "REML" and engine == "lme4":
        cmd = [rscript, str(R_SCRIPT), "--data", str(data_dir), "--formula", ds.formula,
               "--repeats", str(a.repeats), "--repeat-under", str(a.repeat_under)]
    elif method == "REML":
        cfg = {"engine": engine, "formula": ds.formula, "sm": ds.sm, "data": str(data_dir / "data.npz"),
               "repeats": a.repeats, "repeat_under": a.repeat_under}
        cfg_path.write_text(json.dumps(cfg))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_path), str(out)]
    else:
        cfg = {"engine": engine, "tag": tag, "dataset": ds.key, "data": str(data_dir / "data.npz"),
               "formula": ds.formula, "draws": draws, "tune": tune, "chains": a.chains, "seed": a.seed,
               "cores": None, "runs": 1, "effects_diagnostics": False,
               "sampler": "auto" if engine == "bayeslmm" else None,
               "parameterization": "collapsed" if engine == "bayeslmm" else None,
               "route": "auto" if engine == "bayeslmm" else None,
               "bambi_params": list(ds.bambi_params), "bambi_effects": list(ds.bambi_effects)}
        cfg_path.write_text(json.dumps(cfg))
        cmd = [bambi_py if engine == "bambi" else sys.executable, str(HERE / "bench_bayes.py"), "--worker",
               str(cfg_path), str(out)]
    run = run_child(cmd, budget, mem_limit, log, env)
    status, note = classify(run, budget, mem_limit)
    res = None
    if status == "ok":
        try:
            if engine == "lme4":
                text = log.read_text()
                res = json.loads(text[text.index("{"): text.rindex("}") + 1], strict=False)
            else:
                res = json.loads(out.read_text())
                if method == "NUTS" and not res.get("runs"):
                    raise ValueError("the worker wrote no run")
        except (OSError, ValueError) as exc:
            status, note = "failed", f"no result: {exc}"
    fill_from_child(rec, run, status, note)
    if res is not None:
        (fill_reml if method == "REML" else fill_nuts)(rec, res)


if __name__ == "__main__":
    sys.exit(main())
