#!/usr/bin/env python
"""Bayesian benchmark: bayeslmm's NUTS engine against bambi, side by side, in one run.

This is a benchmark, not a test: it times, compares and reports, and exits 0 unless
``--strict`` is given (then a missed target exits 1).

Part 1 -- sleepstudy, ``Reaction ~ Days + (Days | Subject)``, 4 chains x 1000 draws
(1000 tuning steps), one seed for every engine:

* bayeslmm, collapsed likelihood, sampler ``pymc`` and ``nutpie``;
* bayeslmm, explicit (non-centred) parameterisation with ``pymc``, as a reference;
* bambi 0.21, ``bmb.Model("Reaction ~ Days + (Days | Subject)", data).fit(...)`` with
  its default sampler (PyMC's NUTS) and the same draws / tune / chains / seed.  bambi
  fits *uncorrelated* intercepts and slopes: that is the best it can do.

Each configuration runs in a fresh Python subprocess, so it pays its own imports and
compilation as a user in a new session would ("cold"; PyTensor's on-disk cache of
compiled C modules is shared, as it is for a user, unless ``--cold-cache`` gives every
subprocess an empty one), then fits the same model a second time in the same process
("warm").  Timed: wall clock from model construction to the finished posterior
(``Model(...)`` + ``.fit(...)``: formula, design matrices, cross-products, PyMC model,
compilation, tuning, sampling, the effects drawn after collapsed sampling, the
DataTree and the convergence checks), i.e. what a user waits for once the package is
imported and the data loaded (imports are timed separately).  Minimum bulk ESS is over
the comparable parameters: fixed effects, group sds, residual sigma (and, for
bayeslmm, the correlation); min ESS per second = min bulk ESS / wall.  Reported ratio:
bayeslmm / bambi of min-ESS-per-second, cold against cold and warm against warm.

Part 2 -- simulated ``y ~ x + (1 + x | g)`` (``bayeslmm.simulate.simulate_lmm``, 100
rows per group) at 1e4 x 100, 1e5 x 1000 and 1e6 x 10000 rows x groups: bayeslmm
collapsed (``pymc`` with the engine's default cores, ``nutpie``, and ``pymc`` with
``cores=2``), each in a fresh subprocess: wall, max R-hat, min bulk ESS
(over the same parameters, and separately over the 2 x groups random effects).
Target: 1e6 x 1e4 in <= 30 s wall with every R-hat <= 1.01 and bulk ESS >= 400.
bambi on the sizes in order until one does not finish within ``--bambi-budget``
seconds (a subprocess with a timeout); the ratio is taken at the largest common size.

bambi installs beside bayeslmm (the ``test`` extra brings it; both take formulae 0.6),
so it runs from the same environment, each configuration in its own fresh process
like bayeslmm's.  bambi's ``fit()`` passes ``nuts_sampler="pymc"`` to ``pm.sample``,
so its default is PyMC's own NUTS although nutpie is installed.

Compilation is measured by wrapping PyTensor's ``FunctionMaker`` (graph rewrites
and linking of every compiled function) and ``nutpie.compile_pymc_model`` in the
worker process; bayeslmm's ``fit.timings["sample"]`` contains it, and the table's
"sample" column is ``fit.timings["sample"]`` minus it.

Usage
-----
    .venv/bin/python benchmarks/bench_bayes.py [--json results.json]
    .venv/bin/python benchmarks/bench_bayes.py --quick          # a short smoke run
    .venv/bin/python benchmarks/bench_bayes.py --skip-sim --cold-cache
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from machine import CpuMeter, cpu_name  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SLEEP_FORMULA = "Reaction ~ Days + (Days | Subject)"
SIM_FORMULA = "y ~ x + (1 + x | g)"
SIM_TRUTH = dict(beta=(1.0, 2.0), sd_intercept=1.0, sd_slope=0.5, corr=0.3, sigma=1.0)
DEFAULT_SIZES = "1e4x100,1e5x1000,1e6x10000"

#: targets of issue 3
TARGET_ESS_RATIO = 3.0          # sleepstudy min-ESS/s at least 3x bambi's
TARGET_SIM_SECONDS = 30.0       # 1e6 x 1e4 in at most 30 s wall
TARGET_RHAT = 1.01
TARGET_ESS = 400.0
TARGET_SIM_SIZE = (1_000_000, 10_000)
BUSY_WARN_CORES = 0.25


# =========================================================================== worker
# The worker runs in a fresh interpreter and does not import bayeslmm when it fits with bambi.

class _CompileTimer:
    """Seconds spent compiling: PyTensor function construction (graph rewrites, C or
    numba linking) and nutpie's ``compile_pymc_model``, outermost calls only."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0

    def wrap(self, fn):
        timer = self

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if timer._depth:
                return fn(*args, **kwargs)
            timer._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - t0
                timer.calls += 1
                timer._depth -= 1

        return inner

    def install(self):
        try:
            from pytensor.compile.maker import FunctionMaker
        except ImportError:  # older PyTensor
            from pytensor.compile.function.types import FunctionMaker
        FunctionMaker.__init__ = self.wrap(FunctionMaker.__init__)
        FunctionMaker.create = self.wrap(FunctionMaker.create)
        try:
            import nutpie
        except ImportError:
            return
        nutpie.compile_pymc_model = self.wrap(nutpie.compile_pymc_model)


def _sample_stats(dt) -> dict:
    import numpy as np

    out = {}
    try:
        st = dt["sample_stats"].to_dataset()
    except KeyError:
        return out
    if "diverging" in st:
        out["divergences"] = int(np.asarray(st["diverging"]).sum())
    if "n_steps" in st:
        out["mean_steps"] = float(np.asarray(st["n_steps"]).mean())
        out["total_steps"] = int(np.asarray(st["n_steps"]).sum())
    for name in ("tree_depth", "depth"):
        if name in st:
            out["mean_depth"] = float(np.asarray(st[name]).mean())
            break
    if "step_size" in st:
        out["step_size"] = float(np.asarray(st["step_size"]).mean())
    return out


def _diag_rows(table) -> dict:
    """{parameter: {ess_bulk, ess_tail, r_hat, mean}} from a summary-like frame."""
    return {str(k): {"mean": float(r["mean"]), "ess_bulk": float(r["ess_bulk"]),
                     "ess_tail": float(r["ess_tail"]), "r_hat": float(r["r_hat"])}
            for k, r in table.iterrows()}


def _effects_diag(dt, var_names) -> dict:
    import arviz as az
    import numpy as np

    ess = az.ess(dt, var_names=var_names, method="bulk")
    rhat = az.rhat(dt, var_names=var_names)
    e = np.concatenate([np.asarray(ess[v]).ravel() for v in var_names])
    r = np.concatenate([np.asarray(rhat[v]).ravel() for v in var_names])
    return {"n": int(e.size), "min_ess_bulk": float(np.nanmin(e)), "max_r_hat": float(np.nanmax(r)),
            "n_rhat_over": int(np.sum(r > TARGET_RHAT)), "n_ess_under": int(np.sum(e < TARGET_ESS))}


def _fit_bayeslmm(cfg, df):
    import bayeslmm

    t0 = time.perf_counter()
    model = bayeslmm.Model(cfg["formula"], df)
    _ = model.crossprods  # computed on first use; timed as part of the model
    t1 = time.perf_counter()
    fit = model.fit(method="nuts", draws=cfg["draws"], tune=cfg["tune"], chains=cfg["chains"],
                    cores=cfg.get("cores"), random_seed=cfg["seed"], sampler=cfg["sampler"],
                    route=cfg.get("route", "auto"), progressbar=False)
    t2 = time.perf_counter()
    return fit, fit.idata, {"model": t1 - t0, "fit": t2 - t1, "wall": t2 - t0,
                            "engine_timings": dict(getattr(fit, "timings", {}) or {}),
                            "sampler_used": getattr(fit, "sampler", None)}


def _fit_bambi(cfg, df):
    import bambi as bmb

    t0 = time.perf_counter()
    model = bmb.Model(cfg["formula"], df)
    t1 = time.perf_counter()
    idata = model.fit(draws=cfg["draws"], tune=cfg["tune"], chains=cfg["chains"], random_seed=cfg["seed"],
                      progressbar=False)
    t2 = time.perf_counter()
    return model, idata, {"model": t1 - t0, "fit": t2 - t1, "wall": t2 - t0, "engine_timings": {}}


def _bambi_names(cfg):
    if cfg.get("bambi_params"):  # given by the caller (benchmarks/run_all.py) for any formula
        return list(cfg["bambi_params"]), list(cfg.get("bambi_effects") or [])
    if cfg["dataset"] == "sleepstudy":
        return ["Intercept", "Days", "1|Subject_sigma", "Days|Subject_sigma", "sigma"], ["1|Subject", "Days|Subject"]
    return ["Intercept", "x", "1|g_sigma", "x|g_sigma", "sigma"], ["1|g", "x|g"]


def _diagnose(cfg, fitted, dt) -> dict:
    import arviz as az

    out = {}
    if cfg["engine"] == "bayeslmm":
        table = fitted.summary_table()
        out["params"] = _diag_rows(table)
        effect_vars = list(fitted.names)
    else:
        names, effect_vars = _bambi_names(cfg)
        table = az.summary(dt, var_names=names, kind="all", round_to="none")
        out["params"] = _diag_rows(table)
    if cfg.get("effects_diagnostics"):
        out["effects"] = _effects_diag(dt, effect_vars)
    out.update(_sample_stats(dt))
    post = dt["posterior"].to_dataset()
    first = "beta" if "beta" in post else ("Intercept" if "Intercept" in post else None)
    if first is not None:  # same seed, same draws: cold and warm runs should agree exactly
        out["checksum"] = float(post[first].sum())
    return out


def save_frame(df, path) -> None:
    """A DataFrame as .npz (numeric columns, categoricals as codes + categories): read by
    both virtual environments, which need not share pandas' optional dependencies."""
    import numpy as np
    import pandas as pd

    arrays, kinds = {}, {}
    for col in df.columns:
        s = df[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            cats = np.asarray(s.cat.categories)
            arrays[f"{col}__codes"] = s.cat.codes.to_numpy()
            arrays[f"{col}__cats"] = cats if cats.dtype.kind in "iuf" else cats.astype(str)
            kinds[col] = "category"
        else:
            arrays[col] = s.to_numpy()
            kinds[col] = "numeric"
    arrays["__columns__"] = np.array(json.dumps(kinds))
    np.savez(path, **arrays)


def load_frame(path):
    import numpy as np
    import pandas as pd

    z = np.load(path)
    kinds = json.loads(str(z["__columns__"]))
    cols = {}
    for col, kind in kinds.items():
        if kind == "category":
            cols[col] = pd.Categorical.from_codes(z[f"{col}__codes"], categories=z[f"{col}__cats"])
        else:
            cols[col] = z[col]
    return pd.DataFrame(cols)


def worker(cfg_path: str, out_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    result = {"config": cfg, "runs": [], "python": sys.executable}
    out = Path(out_path)

    def save():
        out.write_text(json.dumps(result, indent=1, default=str))

    t0 = time.perf_counter()
    import numpy as np  # noqa: F401
    import pandas as pd
    import pymc  # noqa: F401
    import pytensor

    if cfg["engine"] == "bayeslmm":
        sys.path.insert(0, str(ROOT))
        import bayeslmm
        result["bayeslmm_version"] = bayeslmm.__version__
        result["bayeslmm_file"] = bayeslmm.__file__
        result["sources_sha256"] = code_fingerprint(git=False)["sources_sha256"]
        fitter = _fit_bayeslmm
    else:
        import bambi
        result["bambi_version"] = bambi.__version__
        # bambi's fit(inference_method="pymc") calls pm.sample(nuts_sampler="pymc"): PyMC's NUTS
        result["bambi_nuts_sampler"] = "pymc (bambi's default)"
        fitter = _fit_bambi
    result["import_seconds"] = time.perf_counter() - t0
    import arviz
    import pymc as pm
    result["versions"] = {"pymc": pm.__version__, "pytensor": pytensor.__version__, "arviz": arviz.__version__,
                          "numpy": np.__version__, "pandas": pd.__version__}
    try:
        import nutpie
        result["versions"]["nutpie"] = nutpie.__version__
    except ImportError:
        pass
    result["pytensor_compiledir"] = str(pytensor.config.compiledir)
    timer = _CompileTimer()
    timer.install()
    df = load_frame(cfg["data"])
    save()
    for run in range(cfg["runs"]):
        gc.collect()
        c0, n0 = timer.seconds, timer.calls
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitted, dt, times = fitter(cfg, df)
        times["compile"] = timer.seconds - c0
        times["compile_calls"] = timer.calls - n0
        rec = {"run": "cold" if run == 0 else "warm", **times,
               "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught
                                   if "could not link to a BLAS" not in str(w.message)})}
        t1 = time.perf_counter()
        rec.update(_diagnose(cfg, fitted, dt))
        rec["diagnose_seconds"] = time.perf_counter() - t1
        result["runs"].append(rec)
        save()
        del fitted, dt
    return 0


# =========================================================================== parent
def run_worker(python: str, cfg: dict, workdir: Path, timeout: float | None, env_extra: dict | None = None) -> dict:
    """Run one configuration in a fresh interpreter; returns the worker's JSON plus
    the subprocess's own wall time, CPU, background load and any error."""
    tag = cfg["tag"]
    cfg_path, out_path = workdir / f"{tag}.cfg.json", workdir / f"{tag}.out.json"
    cfg_path.write_text(json.dumps(cfg))
    if out_path.exists():
        out_path.unlink()
    env = dict(os.environ)
    env.update(env_extra or {})
    cmd = [python, str(Path(__file__).resolve()), "--worker", str(cfg_path), str(out_path)]
    meter = CpuMeter()
    cpu0 = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    timed_out = False
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)  # the worker and any sampler processes it started
        log, _ = proc.communicate()
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    res = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    res.setdefault("config", cfg)
    res.update(tag=tag, process_seconds=elapsed, timed_out=timed_out, returncode=proc.returncode,
               process_cpu_seconds=(cpu1.children_user + cpu1.children_system)
               - (cpu0.children_user + cpu0.children_system),
               other_load_cores=meter.others(),
               sampler_log=[ln.strip() for ln in (log or "").splitlines()
                            if "sampling (" in ln.lower() or "chains in" in ln.lower()][:4])
    if proc.returncode not in (0, None) and not timed_out:
        res["error"] = "\n".join((log or "").splitlines()[-25:])
    return res


# --------------------------------------------------------------------------- bambi
def find_bambi() -> tuple[str | None, str]:
    """The interpreter that runs bambi's fits (this one; each fit in a fresh process), or None and why not.

    Checked in a subprocess, so that this process does not pay bambi's import.
    """
    r = subprocess.run([sys.executable, "-c", "import bambi; print(bambi.__version__)"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"bambi skipped: `import bambi` fails here ({last}); pip install -e '.[test]' installs it"
    return sys.executable, f"bambi {r.stdout.strip()} from this environment"


# --------------------------------------------------------------------------- summaries
def _min_ess(params: dict, keys=None) -> float | None:
    vals = [v["ess_bulk"] for k, v in params.items() if keys is None or keys(k)]
    return min(vals) if vals else None


def _max_rhat(params: dict) -> float | None:
    vals = [v["r_hat"] for v in params.values()]
    return max(vals) if vals else None


def summarize_run(res: dict, run: dict) -> dict:
    params = run.get("params", {})
    is_corr = lambda k: k.startswith("corr[")  # noqa: E731
    min_all = _min_ess(params)
    min_nocorr = _min_ess(params, lambda k: not is_corr(k))
    et = run.get("engine_timings", {})
    comp = run.get("compile", 0.0)
    row = {
        "engine": res["config"]["engine"], "sampler": res["config"].get("sampler") or "pymc (default)",
        "cores": res["config"].get("cores"), "backend": et.get("backend"),
        "parameterization": res["config"].get("parameterization") or "non-centred",
        "run": run["run"], "wall": run["wall"], "model": run["model"], "fit": run["fit"], "compile": comp,
        "build": et.get("build"), "sample_engine": et.get("sample"), "postprocess": et.get("postprocess"),
        "min_ess": min_all, "min_ess_nocorr": min_nocorr,
        "ess_per_s": (min_all / run["wall"]) if min_all else None,
        "ess_nocorr_per_s": (min_nocorr / run["wall"]) if min_nocorr else None,
        "max_rhat": _max_rhat(params), "divergences": run.get("divergences"),
        "mean_steps": run.get("mean_steps"), "import": res.get("import_seconds"),
        "other_load": res.get("other_load_cores"), "effects": run.get("effects"),
        "checksum": run.get("checksum"), "warnings": run.get("warnings", []),
    }
    if et.get("sample") is not None:
        row["sample_net"] = max(et["sample"] - comp, 0.0)
        known = row["model"] + sum(v for v in (et.get("build"), et.get("sample"), et.get("postprocess")) if v)
        row["other"] = run["wall"] - known
    else:
        row["sample_net"] = max(run["fit"] - comp, 0.0)  # bambi: build + sample + conversion
        row["other"] = None
    return row


def _f(v, fmt="{:.2f}", none="-"):
    if v is None:
        return none
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def md_table(headers, rows, align=None) -> str:
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    cells = [[str(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.rjust(w[i]) if align[i] == "r" else c.ljust(w[i])  # noqa: E731
                                        for i, c in enumerate(r)) + " |"
    sep = "|" + "|".join((":" + "-" * (w[i] + 1)) if align[i] == "l" else ("-" * (w[i] + 1) + ":")
                         for i in range(len(headers))) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def _label(row):
    if row["engine"] == "bambi":
        return "bambi (uncorrelated)"
    cores = f" cores={row['cores']}" if row.get("cores") else ""
    backend = f" ({row['backend']})" if row.get("backend") else ""
    return f"bayeslmm {row['parameterization']} / {row['sampler']}{backend}{cores}"


def sleep_table(rows) -> str:
    headers = ["engine / sampler", "run", "wall s", "model s", "compile s", "sample s", "post s",
               "min ESS", "min ESS no corr", "min ESS/s", "max R-hat", "div", "steps/draw", "import s"]
    body = [[_label(r), r["run"], _f(r["wall"]), _f(r["model"], "{:.3f}"), _f(r["compile"]),
             _f(r["sample_net"]), _f(r["postprocess"]), _f(r["min_ess"], "{:.0f}"),
             _f(r["min_ess_nocorr"], "{:.0f}"), _f(r["ess_per_s"], "{:.0f}"), _f(r["max_rhat"], "{:.4f}"),
             _f(r["divergences"], "{}"), _f(r["mean_steps"], "{:.1f}"), _f(r["import"])] for r in rows]
    return md_table(headers, body, ["l", "l"] + ["r"] * (len(headers) - 2))


def sim_table(rows) -> str:
    headers = ["rows x groups", "engine / sampler", "wall s", "model s", "compile s", "sample s", "post s",
               "max R-hat", "min ESS", "min ESS/s", "effects: max R-hat", "effects: min ESS", "div",
               "steps/draw", "note"]
    body = []
    for r in rows:
        if r.get("failed") and r.get("wall") is None:
            body.append([r["size_label"], _label(r)] + ["-"] * (len(headers) - 3) + [r["failed"]])
            continue
        eff = r.get("effects") or {}
        body.append([r["size_label"], _label(r), _f(r["wall"]), _f(r["model"]), _f(r["compile"]),
                     _f(r["sample_net"]), _f(r["postprocess"]), _f(r["max_rhat"], "{:.4f}"),
                     _f(r["min_ess"], "{:.0f}"), _f(r["ess_per_s"], "{:.3g}"),
                     _f(eff.get("max_r_hat"), "{:.4f}"), _f(eff.get("min_ess_bulk"), "{:.0f}"),
                     _f(r["divergences"], "{}"), _f(r["mean_steps"], "{:.1f}"),
                     "; ".join(x for x in (r.get("target") and f"target {r['target']}", r.get("failed")) if x)])
    return md_table(headers, body, ["l", "l"] + ["r"] * (len(headers) - 3) + ["l"])


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        if part.strip():
            n, j = part.lower().split("x")
            out.append((int(float(n)), int(float(j))))
    return out


def size_label(n, j) -> str:
    def short(v):
        e = len(str(v)) - 1
        return f"1e{e}" if v == 10 ** e else f"{v:,}"
    return f"{short(n)} x {short(j)}"


def code_fingerprint(git: bool = True) -> dict:
    """git HEAD, whether the tree is dirty, and a hash of the package's sources (the
    engine is edited while benchmarks run: this ties a result to a code state)."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "bayeslmm").rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    info = {"sources_sha256": h.hexdigest()[:16]}
    if not git:
        return info
    try:
        info["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "bayeslmm"], cwd=ROOT, capture_output=True,
                            text=True).stdout
        info["bayeslmm_dirty"] = bool(st.strip())
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--tune", type=int, default=1000)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--seed", type=int, default=20261121, help="random_seed for every engine and the simulator")
    p.add_argument("--cores", type=int, default=None,
                   help="cores= for bayeslmm's fit (default: the engine's default)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"simulated sizes, rows x groups (default {DEFAULT_SIZES})")
    p.add_argument("--sim-samplers", default="auto,pymc",
                   help="bayeslmm samplers on the simulated data; 'pymc:2' = fit(cores=2) "
                        "(default pymc,nutpie,pymc:2)")
    p.add_argument("--sim-warm", action="store_true", help="also a warm (second, same-process) run per size")
    p.add_argument("--bambi-budget", type=float, default=600.0,
                   help="seconds bambi may take on one simulated size (default 600)")
    p.add_argument("--no-bambi", action="store_true", help="bayeslmm only")
    p.add_argument("--skip-sleepstudy", action="store_true")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--no-effects-diagnostics", action="store_true",
                   help="skip R-hat/ESS over every random effect on the simulated data")
    p.add_argument("--cold-cache", action="store_true",
                   help="give every subprocess an empty PyTensor compile cache (a first-ever session)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 300 draws / 300 tune, sizes 1e4x100 only, bambi budget 120 s")
    p.add_argument("--json", metavar="PATH", help="write everything (every run, every parameter) as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--worker", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(*a.worker)
    if a.quick:
        a.draws, a.tune = 300, 300
        if a.sizes == DEFAULT_SIZES:
            a.sizes = "1e4x100"
        a.bambi_budget = min(a.bambi_budget, 120.0)

    started = _dt.datetime.now()
    env_info = {"date": started.strftime("%Y-%m-%d %H:%M"), "processor": cpu_name(), "cpu_count": os.cpu_count(),
                "python": platform.python_version(), **code_fingerprint()}
    print(f"bayeslmm NUTS vs bambi; {a.chains} chains x {a.draws} draws ({a.tune} tune), seed {a.seed}; "
          f"{env_info['date']}, {env_info['processor']}, {env_info['cpu_count']} cores", flush=True)
    print(f"code: HEAD {env_info.get('git_head')}, bayeslmm/ dirty: {env_info.get('bayeslmm_dirty')}, "
          f"sources {env_info['sources_sha256']}", flush=True)

    bambi_py, bambi_note = (None, "bambi skipped (--no-bambi)") if a.no_bambi else find_bambi()
    print(bambi_note + " (bambi's default fit: pm.sample with PyMC's NUTS)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_bayes_"))
    base = {"draws": a.draws, "tune": a.tune, "chains": a.chains, "seed": a.seed, "cores": a.cores}
    caches = []

    def extra_env(tag):
        if not a.cold_cache:
            return None
        d = tmp / f"cache_{tag}"
        d.mkdir()
        caches.append(d)
        return {"PYTENSOR_FLAGS": f"compiledir={d / 'pytensor'}", "NUMBA_CACHE_DIR": str(d / "numba")}

    sys.path.insert(0, str(ROOT))
    from bayeslmm.datasets import load_dataset
    from bayeslmm.simulate import simulate_lmm

    results = {"environment": env_info, "settings": vars(a), "bambi_note": bambi_note,
               "sleepstudy": [], "sim": []}
    sleep_rows, sim_rows = [], []

    # ----------------------------------------------------------------- part 1
    if not a.skip_sleepstudy:
        data = tmp / "sleepstudy.npz"
        save_frame(load_dataset("sleepstudy"), data)
        configs = [
            # "parameterization" labels the rows; "route" is what fit() is given
            dict(engine="bayeslmm", sampler="auto", parameterization="collapsed", route="auto"),
            dict(engine="bayeslmm", sampler="pymc", parameterization="collapsed", route="graph"),
            dict(engine="bayeslmm", sampler="nutpie", parameterization="collapsed", route="graph"),
            dict(engine="bayeslmm", sampler="pymc", parameterization="explicit", route="graph-explicit"),
        ]
        if bambi_py:
            configs.append(dict(engine="bambi", sampler=None, parameterization=None))
        print(f"\n[1] sleepstudy, {SLEEP_FORMULA}: each in a fresh process, a cold then a warm fit", flush=True)
        for c in configs:
            tag = (f"sleep_{c['engine']}_{c['sampler'] or 'default'}_{c['parameterization'] or 'nc'}"
                   + ("_pytensor" if c.get("route") == "graph" and c["sampler"] == "nutpie" else ""))
            cfg = {**base, **c, "tag": tag, "dataset": "sleepstudy", "data": str(data), "formula": SLEEP_FORMULA,
                   "runs": 2, "effects_diagnostics": False}
            py = bambi_py if c["engine"] == "bambi" else sys.executable
            res = run_worker(py, cfg, tmp, timeout=1800, env_extra=extra_env(tag))
            results["sleepstudy"].append(res)
            if res.get("error") or not res["runs"]:
                print(f"  {tag}: FAILED\n{res.get('error', '')}", flush=True)
                continue
            for run in res["runs"]:
                row = summarize_run(res, run)
                sleep_rows.append(row)
                print(f"  {_label(row):34s} {row['run']:4s}: wall {row['wall']:6.2f} s, compile {row['compile']:5.2f} s, "
                      f"min ESS {row['min_ess']:.0f}, {row['ess_per_s']:.0f}/s "
                      f"(process {res['process_seconds']:.1f} s, import {res['import_seconds']:.2f} s, "
                      f"background load {_f(res['other_load_cores'])} cores)", flush=True)

    # ----------------------------------------------------------------- part 2
    if not a.skip_sim:
        sizes = parse_sizes(a.sizes)
        print(f"\n[2] simulated {SIM_FORMULA}, rows x groups = "
              f"{', '.join(size_label(n, j) for n, j in sizes)}", flush=True)
        sim_data = {}
        for n, j in sizes:
            if n % j:
                p.error(f"size {n}x{j}: rows must be a multiple of groups")
            df = simulate_lmm(n_groups=j, n_per_group=n // j, random_seed=a.seed, **SIM_TRUTH)
            path = tmp / f"sim_{n}_{j}.npz"
            save_frame(df, path)
            sim_data[(n, j)] = path
            del df
        samplers = [s.strip() for s in a.sim_samplers.split(",") if s.strip()]
        for n, j in sizes:
            for spec in samplers:
                s, _, cores = spec.partition(":")
                tag = f"sim_{n}_{j}_bayeslmm_{s}" + (f"_cores{cores}" if cores else "")
                cfg = {**base, "engine": "bayeslmm", "sampler": s, "parameterization": "collapsed", "tag": tag,
                       **({"cores": int(cores)} if cores else {}),
                       "dataset": "sim", "data": str(sim_data[(n, j)]), "formula": SIM_FORMULA,
                       "runs": 2 if a.sim_warm else 1, "effects_diagnostics": not a.no_effects_diagnostics}
                res = run_worker(sys.executable, cfg, tmp, timeout=3600, env_extra=extra_env(tag))
                res["size"] = [n, j]
                results["sim"].append(res)
                _report_sim(res, n, j, sim_rows, None)
        if bambi_py:
            for n, j in sizes:
                tag = f"sim_{n}_{j}_bambi"
                cfg = {**base, "engine": "bambi", "sampler": None, "parameterization": None, "tag": tag,
                       "dataset": "sim", "data": str(sim_data[(n, j)]), "formula": SIM_FORMULA, "runs": 1,
                       "effects_diagnostics": not a.no_effects_diagnostics}
                # the budget is for the fit; imports and data loading get 60 s more
                res = run_worker(bambi_py, cfg, tmp, timeout=a.bambi_budget + 60, env_extra=extra_env(tag))
                res["size"] = [n, j]
                results["sim"].append(res)
                ok = _report_sim(res, n, j, sim_rows, a.bambi_budget)
                if not ok:
                    break

    # ----------------------------------------------------------------- report
    results["sleep_rows"], results["sim_rows"] = sleep_rows, sim_rows
    targets = []
    print()
    print(f"Run {env_info['date']} on {env_info['processor']}, {env_info['cpu_count']} cores; "
          f"{a.chains} chains x {a.draws} draws, {a.tune} tune, seed {a.seed}; "
          f"PyTensor cache: {'empty per process (--cold-cache)' if a.cold_cache else 'shared on-disk cache'}")
    if sleep_rows:
        print(f"\nsleepstudy, {SLEEP_FORMULA} (cold = first fit in a fresh process, warm = second fit in it)\n")
        print(sleep_table(sleep_rows))
        ratios = sleep_ratios(sleep_rows)
        results["sleep_ratios"] = ratios
        if ratios:
            print("\nmin-ESS-per-second ratio, bayeslmm / bambi (same run kind; in brackets: without the "
                  "correlation, which bambi does not have):")
            for r in ratios:
                print(f"  {r['label']:36s} {r['run']:4s}: {r['ratio']:.2f}x  [{r['ratio_nocorr']:.2f}x]  "
                      f"(wall ratio bambi/bayeslmm {r['wall_ratio']:.2f}x)")
            main_ratio = [r for r in ratios if r["label"].endswith("collapsed / pymc") and r["run"] == "cold"]
            best = max((r for r in ratios if "collapsed" in r["label"] and r["run"] == "cold"),
                       key=lambda r: r["ratio"], default=None)
            for r in main_ratio + ([best] if best and best not in main_ratio else []):
                targets.append({"target": f"sleepstudy min-ESS/s >= {TARGET_ESS_RATIO:g}x bambi's "
                                          f"({r['label']}, cold)", "value": f"{r['ratio']:.2f}x",
                                "met": r["ratio"] >= TARGET_ESS_RATIO})
    if sim_rows:
        print(f"\nsimulated {SIM_FORMULA}, 100 rows per group (one fit per fresh process; "
              "'effects' = every random effect)\n")
        print(sim_table(sim_rows))
        sr = sim_ratios(sim_rows)
        results["sim_ratios"] = sr
        for r in sr:
            print(f"\nat {r['size']} (largest size bambi finished): min-ESS/s ratio bayeslmm/bambi "
                  + "; ".join(f"{k}: {v['ratio']:.1f}x (bambi's wall / bayeslmm's {v['wall_ratio']:.1f}x)"
                              for k, v in r["by_sampler"].items()))
        for r in sim_rows:
            if r["engine"] == "bayeslmm" and tuple(r["size"]) == TARGET_SIM_SIZE and not r.get("failed"):
                eff = r.get("effects") or {}
                ok = (r["wall"] <= TARGET_SIM_SECONDS and r["max_rhat"] <= TARGET_RHAT
                      and r["min_ess"] >= TARGET_ESS)
                targets.append({"target": f"1e6 x 1e4 in <= {TARGET_SIM_SECONDS:g} s, R-hat <= {TARGET_RHAT}, "
                                          f"bulk ESS >= {TARGET_ESS:g} ({_label(r).removeprefix('bayeslmm collapsed / ')}, "
                                          f"{r['run']})",
                                "value": f"{r['wall']:.1f} s, R-hat {r['max_rhat']:.4f}, ESS {r['min_ess']:.0f}"
                                         + (f"; effects R-hat {eff['max_r_hat']:.4f}, ESS {eff['min_ess_bulk']:.0f}"
                                            if eff else ""),
                                "met": ok})
    print_where_time_goes(sleep_rows, sim_rows)
    shas = {res.get("sources_sha256") for res in results["sleepstudy"] + results["sim"]
            if res.get("sources_sha256")}
    if shas - {env_info["sources_sha256"]}:
        print(f"\nNOTE: bayeslmm's sources changed during the run (start {env_info['sources_sha256']}, "
              f"workers saw {', '.join(sorted(shas))}): the rows may come from different code")
    loads = [(res["tag"], res.get("other_load_cores")) for res in results["sleepstudy"] + results["sim"]]
    noisy = [t for t, v in loads if v is not None and v > BUSY_WARN_CORES]
    if noisy:
        print(f"\nWARNING: other processes used > {BUSY_WARN_CORES} cores during: {', '.join(noisy)}; "
              "those timings are unreliable")
    odd = sorted({w for r in sleep_rows + sim_rows for w in r.get("warnings", [])})
    if odd:
        print("\nwarnings raised during the timed fits:")
        for w in odd:
            print(f"  {w[:200]}")
    same = [res["tag"] for res in results["sleepstudy"] + results["sim"] if len(res["runs"]) > 1
            and len({r.get("checksum") for r in res["runs"]}) > 1]
    if any(len(res["runs"]) > 1 for res in results["sleepstudy"] + results["sim"]):
        print("\nsame seed, same draws in the warm run as in the cold one: "
              + ("yes, everywhere" if not same else f"NO for {', '.join(same)}"))
    for res in results["sleepstudy"] + results["sim"]:
        if res.get("sampler_log"):
            print(f"  [{res['tag']}] {' | '.join(res['sampler_log'][:1])}")
    if targets:
        print("\ntargets:")
        for t in targets:
            print(f"  [{'MET   ' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")
    results["targets"] = targets
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {a.json}")
    for d in caches:
        subprocess.run(["rm", "-rf", str(d)])
    return 1 if a.strict and any(not t["met"] for t in targets) else 0


def _short_error(line: str) -> str:
    """'numpy._core._exceptions._ArrayMemoryError: msg' -> '_ArrayMemoryError: msg' (shortened)."""
    head, _, msg = line.partition(": ")
    return f"{head.rsplit('.', 1)[-1]}: {msg}"[:110] if msg else line[:110]


def _report_sim(res, n, j, sim_rows, budget) -> bool:
    label = size_label(n, j)
    eng = res["config"]["engine"]
    cores = res["config"].get("cores")
    name = f"{eng} {res['config'].get('sampler') or ''}".strip() + (f" cores={cores}" if cores else "")
    if res.get("timed_out") or res.get("error") or not res["runs"]:
        err = [ln.strip() for ln in (res.get("error") or "").splitlines() if ln.strip()]
        why = (f"did not finish in {budget:g} s" if res.get("timed_out") else
               "failed: " + (_short_error(err[-1]) if err else "no result"))
        sim_rows.append({"size": [n, j], "size_label": label, "engine": eng, "sampler": res["config"].get("sampler")
                         or "pymc (default)", "parameterization": res["config"].get("parameterization") or "",
                         "cores": res["config"].get("cores"), "failed": why})
        print(f"  {label} {name}: {why} (process {res['process_seconds']:.0f} s)"
              + (f"; last lines of its output:\n{chr(10).join(res['error'].splitlines()[-3:])}"
                 if res.get("error") and not why.startswith("failed: ") else ""), flush=True)
        return False
    ok = True
    for run in res["runs"]:
        row = summarize_run(res, run)
        row.update(size=[n, j], size_label=label)
        if budget is not None and row["wall"] > budget:
            ok = False
            row["failed"] = f"{row['wall']:.0f} s > budget {budget:g} s"
        if eng == "bayeslmm" and (n, j) == TARGET_SIM_SIZE:
            met = row["wall"] <= TARGET_SIM_SECONDS and row["max_rhat"] <= TARGET_RHAT and row["min_ess"] >= TARGET_ESS
            row["target"] = "met" if met else "missed"
        sim_rows.append(row)
        eff = row.get("effects") or {}
        print(f"  {label} {name} {row['run']}: wall {row['wall']:.1f} s (model {row['model']:.2f}, compile "
              f"{row['compile']:.1f}, sample {row['sample_net']:.1f}, post {_f(row['postprocess'], '{:.1f}')}), "
              f"max R-hat {row['max_rhat']:.4f}, min ESS {row['min_ess']:.0f}"
              + (f"; effects R-hat {eff['max_r_hat']:.4f} ESS {eff['min_ess_bulk']:.0f}" if eff else "")
              + f" (background load {_f(res['other_load_cores'])})", flush=True)
    return ok


def sleep_ratios(rows) -> list[dict]:
    out = []
    bambi = {r["run"]: r for r in rows if r["engine"] == "bambi"}
    for r in rows:
        if r["engine"] != "bayeslmm" or r["run"] not in bambi:
            continue
        b = bambi[r["run"]]
        out.append({"label": _label(r), "run": r["run"], "ratio": r["ess_per_s"] / b["ess_per_s"],
                    "ratio_nocorr": r["ess_nocorr_per_s"] / b["ess_per_s"], "wall_ratio": b["wall"] / r["wall"],
                    "bayeslmm_ess_per_s": r["ess_per_s"], "bambi_ess_per_s": b["ess_per_s"]})
    return out


def sim_ratios(rows) -> list[dict]:
    done = [r for r in rows if not r.get("failed") and r["run"] == "cold"]
    bambi_sizes = [tuple(r["size"]) for r in done if r["engine"] == "bambi"]
    if not bambi_sizes:
        return []
    size = max(bambi_sizes)
    b = [r for r in done if r["engine"] == "bambi" and tuple(r["size"]) == size][0]
    by = {}
    for r in done:
        if r["engine"] == "bayeslmm" and tuple(r["size"]) == size:
            by[_label(r)] = {"ratio": r["ess_per_s"] / b["ess_per_s"], "wall_ratio": b["wall"] / r["wall"],
                                "bayeslmm_ess_per_s": r["ess_per_s"], "bambi_ess_per_s": b["ess_per_s"]}
    return [{"size": size_label(*size), "by_sampler": by}]


def print_where_time_goes(sleep_rows, sim_rows):
    rows = [r for r in sleep_rows + sim_rows if r["engine"] == "bayeslmm" and not r.get("failed")]
    if not rows:
        return
    print("\nwhere bayeslmm's wall time goes (s): model = Model() + cross-products; build = PyMC graph "
          "(fit.timings); compile = PyTensor/nutpie compilation (timed inside fit.timings['sample']); "
          "sample = the rest of fit.timings['sample']; post = fit.timings['postprocess'] (effects drawn, "
          "DataTree, log-likelihood); other = wall - all of these (diagnostics, priors)")
    for r in rows:
        where = f"{r['size_label']} " if r.get("size_label") else "sleepstudy "
        print(f"  {where}{_label(r)} {r['run']}: wall {r['wall']:.2f} = model {r['model']:.2f} + build "
              f"{_f(r['build'])} + compile {r['compile']:.2f} + sample {r['sample_net']:.2f} + post "
              f"{_f(r['postprocess'])} + other {_f(r['other'])}")


if __name__ == "__main__":
    sys.exit(main())
