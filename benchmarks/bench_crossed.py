#!/usr/bin/env python
"""Bayesian benchmark beyond one grouping factor: crossed, nested and q = 3 (issue 10).

This is a benchmark, not a test: it times, compares and reports, and exits 0 unless
``--strict`` is given (then a missed target of issue 10 exits 1).

Models (data simulated here with numpy from ``--data-seed``, default ``--seed``; the truth goes
into the JSON):

* ``crossed60`` -- subjects x items, 60 x 40, fully crossed (2,400 rows, every subject sees
  every item once), ``y ~ cond + (1 + cond | subj) + (1 + cond | item)``.  ``cond`` is
  +-0.5 by the parity of subject + item, so it varies within every subject and every item.
  Truth: beta = (2, 0.5); subject sds (1, 0.5), correlation 0.3; item sds (0.8, 0.4),
  correlation -0.2; sigma = 1.
* ``crossed60u`` -- crossed60's rows (the same simulated data) with uncorrelated effects,
  ``y ~ cond + (1 + cond || subj) + (1 + cond || item)``, in bayeslmm; bambi is given
  crossed60's formula, which it fits uncorrelated: the like-for-like comparison with bambi.
* ``crossed1000`` -- the same model and truth with 1,000 subjects x 500 items, but NOT fully
  crossed (that would be 500,000 rows): each subject sees 40 items drawn at random without
  replacement, 40,000 rows.
* ``nested`` -- ``y ~ x + (1 | a/b)``: 100 outer groups x 100 inner groups in each (10,000
  inner groups; the inner labels repeat across outer groups, so only ``a/b`` separates them),
  5 rows per inner group, 50,000 rows.  Truth: beta = (1, 0.5), sd(a) = 1, sd(a:b) = 0.5,
  sigma = 1.
* ``q3`` -- ``y ~ x + z + (1 + x + z | g)``: 200 groups x 20 rows.  Truth: beta =
  (1, 0.5, -0.3), sds (1, 0.5, 0.3), correlations (x, 1): 0.3, (z, 1): -0.2, (z, x): 0.1,
  sigma = 1.

``--quick`` shrinks them (20 x 12; 100 x 50 with 10 items each; 20 x 10 x 5; 40 x 10), draws
150 / tune 150 / 2 chains, one run per peer, a 240 s budget: a smoke run of a few minutes.

Engines, each run in a fresh process with a budget (``--budget``, default 600 s, for the whole
process: start-up, reading the data, the fit).  A process past it is killed with its process
group and recorded as ``timeout``, never dropped; one that dies is ``failed``.

* bayeslmm: ``Model(formula, df).fit(method="nuts", draws, tune, chains, random_seed, route,
  progressbar=False)``, ``route`` from ``--route`` (default "auto"), the package's defaults otherwise
  (sampler, priors, cores); the record keeps the route that ran.
  Then a second fresh process fits REML (``Model(...).fit()``, untimed, its own budget) for
  the check that the posterior medians of beta are within 0.1 posterior sd of REML's beta.
  The table also gives leapfrog steps per draw (the gradients each draw cost).
* bambi 0.21 (``bmb.Model(formula, df).fit(draws, tune, chains, random_seed)``, its default
  sampler, PyMC's NUTS; run by ``bench_bayes.py``'s worker, as the suite does).  bambi 0.21
  has no correlated group effects: ``(1 + cond | subj)`` is fitted as independent
  ``1|subj`` and ``cond|subj`` effects, each with its own sd (``bambi/backend/
  model_components.py`` has the LKJ code commented out; bambinos/bambi#702 "Allow
  non-independent random effects" is open).  So bambi fits the *uncorrelated* version of
  every model here, and its minimum ESS is over fixed effects, sds and sigma.  ``(1 | a/b)``
  is ``(1 | a) + (1 | a:b)`` in bambi, as in lme4.
* rstanarm ``stan_lmer(formula, data, chains = 4, iter = 2000, seed)`` via ``Rscript``
  (iter = draws + tune; rstanarm's default warm-up is iter / 2, i.e. tune), default settings
  otherwise (so the chains run one after another unless R's ``mc.cores`` option says
  otherwise), where ``library(rstanarm)`` loads; skipped with a note where R or
  rstanarm is missing.  Its wall is R's elapsed time around ``stan_lmer`` (model building and
  sampling; R's start-up and ``library()`` are outside, as the Python engines' imports are).
  Recorded from rstanarm's own summary: min ``n_eff`` and max ``Rhat`` over the fixed
  effects, the ``Sigma[...]`` (co)variances and sigma.  For the comparison, its draws of
  those are turned into sds and correlations and given ArviZ's bulk ESS and R-hat, as the
  other engines' are.

Every peer runs ``--repeats`` times (default 2: their numbers swing), each in a fresh
process; the first run uses ``--seed``, run k uses ``--seed + k - 1`` so that the swing of ESS
shows, not only that of the wall time.  Once a peer's run is out of time (or memory), its
later runs on that model are recorded as ``skipped`` rather than spending another budget on a
known timeout.  bayeslmm runs once per model (``--skip-bayeslmm``: peers only).

Metric: minimum bulk ESS over the fixed effects, the random-effect sds, the correlations
(bambi: none) and sigma, divided by wall (model construction + fit); the maximum R-hat over
the same; divergences.  Ratios bayeslmm / peer of min ESS per second (for bambi also with
bayeslmm's minimum taken without the correlations, which bambi does not fit).

Usage
-----
    .venv/bin/python benchmarks/bench_crossed.py --quick
    .venv/bin/python benchmarks/bench_crossed.py --models crossed60 --peers bambi --json out.json
    .venv/bin/python benchmarks/bench_crossed.py --models crossed60,q3 --peers "" --budget 300
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_bayes as bb  # noqa: E402  (the bambi worker, frames as .npz, md tables, code fingerprint)
import run_all as ra  # noqa: E402  (run_child: a fresh process with a time budget and a memory limit)
from machine import cpu_name  # noqa: E402

DEFAULT_MODELS = "crossed60,crossed60u,crossed1000,nested,q3"
DEFAULT_PEERS = "bambi,rstanarm"

#: issue 10's targets on the crossed models
TARGET_BAMBI = 50.0
TARGET_RSTANARM = 200.0
TARGET_RHAT = 1.01
TARGET_BETA_SDS = 0.1


def fmt(v, spec: str = "{:.2f}") -> str:
    """A number for a table cell; '-' for a missing one."""
    return "-" if v is None else spec.format(v)


# =========================================================================== models
@dataclass(frozen=True)
class Case:
    key: str
    formula: str
    full: tuple       # sizes passed to the simulator
    quick: tuple
    bambi_params: tuple
    about: str
    data_key: str = ""        # simulate the data of this model instead (the same rows for two formulas)
    bambi_formula: str = ""   # what bambi is given, where its formula syntax differs

    @property
    def simulated(self) -> str:
        return self.data_key or self.key


CROSSED_FORMULA = "y ~ cond + (1 + cond | subj) + (1 + cond | item)"
CROSSED_BAMBI = ("Intercept", "cond", "1|subj_sigma", "cond|subj_sigma", "1|item_sigma", "cond|item_sigma", "sigma")

CASES = {
    "crossed60": Case("crossed60", CROSSED_FORMULA, (60, 40, None), (20, 12, None), CROSSED_BAMBI,
                      "subjects x items, fully crossed"),
    "crossed1000": Case("crossed1000", CROSSED_FORMULA, (1000, 500, 40), (100, 50, 10), CROSSED_BAMBI,
                        "subjects x items, each subject a random subset of items"),
    "nested": Case("nested", "y ~ x + (1 | a/b)", (100, 100, 5), (20, 10, 5),
                   ("Intercept", "x", "1|a_sigma", "1|a:b_sigma", "sigma"), "inner groups within outer groups"),
    "q3": Case("q3", "y ~ x + z + (1 + x + z | g)", (200, 20), (40, 10),
               ("Intercept", "x", "z", "1|g_sigma", "x|g_sigma", "z|g_sigma", "sigma"),
               "one correlated block of three columns"),
    # last: the indices above seed the other models' data
    "crossed60u": Case("crossed60u", "y ~ cond + (1 + cond || subj) + (1 + cond || item)", (60, 40, None),
                       (20, 12, None), CROSSED_BAMBI, "crossed60's rows, uncorrelated effects in both engines",
                       data_key="crossed60", bambi_formula=CROSSED_FORMULA),
}


def block_effects(rng, n_levels: int, sds, corr) -> "np.ndarray":
    """(n_levels, q) draws from N(0, S R S)."""
    import numpy as np

    cov = np.outer(sds, sds) * np.asarray(corr, dtype=float)
    return rng.standard_normal((n_levels, len(sds))) @ np.linalg.cholesky(cov).T


def block_truth(group: str, columns, sds, corr) -> dict:
    """Truth under bayeslmm's summary names: sd[g|col], corr[g|col_i,col_j] for i < j."""
    out = {f"sd[{group}|{c}]": float(s) for c, s in zip(columns, sds)}
    for i in range(len(columns)):
        for j in range(i + 1, len(columns)):
            out[f"corr[{group}|{columns[i]},{columns[j]}]"] = float(corr[i][j])
    return out


def labels(prefix: str, codes) -> "pd.Categorical":
    import pandas as pd

    return pd.Categorical([f"{prefix}{c}" for c in codes])


def sim_crossed(rng, n_subj: int, n_item: int, items_per_subj: int | None):
    import numpy as np
    import pandas as pd

    if items_per_subj is None:  # fully crossed
        item = np.tile(np.arange(n_item), n_subj)
        subj = np.repeat(np.arange(n_subj), n_item)
    else:  # each subject sees a random subset of the items
        item = np.concatenate([rng.choice(n_item, items_per_subj, replace=False) for _ in range(n_subj)])
        subj = np.repeat(np.arange(n_subj), items_per_subj)
    cond = np.where((subj + item) % 2 == 0, 0.5, -0.5)
    beta, sigma = (2.0, 0.5), 1.0
    s_sds, s_corr = (1.0, 0.5), [[1.0, 0.3], [0.3, 1.0]]
    i_sds, i_corr = (0.8, 0.4), [[1.0, -0.2], [-0.2, 1.0]]
    u, w = block_effects(rng, n_subj, s_sds, s_corr), block_effects(rng, n_item, i_sds, i_corr)
    y = (beta[0] + u[subj, 0] + w[item, 0] + (beta[1] + u[subj, 1] + w[item, 1]) * cond
         + sigma * rng.standard_normal(subj.size))
    df = pd.DataFrame({"y": y, "cond": cond, "subj": labels("s", subj), "item": labels("i", item)})
    truth = {"beta[(Intercept)]": beta[0], "beta[cond]": beta[1],
             **block_truth("subj", ("(Intercept)", "cond"), s_sds, s_corr),
             **block_truth("item", ("(Intercept)", "cond"), i_sds, i_corr), "sigma": sigma}
    return df, truth


def sim_nested(rng, n_outer: int, n_inner: int, n_rows: int):
    import numpy as np
    import pandas as pd

    a = np.repeat(np.arange(n_outer), n_inner * n_rows)
    b = np.tile(np.repeat(np.arange(n_inner), n_rows), n_outer)  # inner labels repeat across a
    x = rng.standard_normal(a.size)
    beta, sd_a, sd_ab, sigma = (1.0, 0.5), 1.0, 0.5, 1.0
    ea = sd_a * rng.standard_normal(n_outer)
    eab = sd_ab * rng.standard_normal(n_outer * n_inner)
    y = beta[0] + beta[1] * x + ea[a] + eab[a * n_inner + b] + sigma * rng.standard_normal(a.size)
    df = pd.DataFrame({"y": y, "x": x, "a": labels("a", a), "b": labels("b", b)})
    truth = {"beta[(Intercept)]": beta[0], "beta[x]": beta[1], "sd[a:b|(Intercept)]": sd_ab,
             "sd[a|(Intercept)]": sd_a, "sigma": sigma}
    return df, truth


def sim_q3(rng, n_groups: int, n_rows: int):
    import numpy as np
    import pandas as pd

    g = np.repeat(np.arange(n_groups), n_rows)
    x, z = rng.standard_normal(g.size), rng.standard_normal(g.size)
    beta, sigma, sds = (1.0, 0.5, -0.3), 1.0, (1.0, 0.5, 0.3)
    corr = [[1.0, 0.3, -0.2], [0.3, 1.0, 0.1], [-0.2, 0.1, 1.0]]
    b = block_effects(rng, n_groups, sds, corr)
    y = (beta[0] + b[g, 0] + (beta[1] + b[g, 1]) * x + (beta[2] + b[g, 2]) * z
         + sigma * rng.standard_normal(g.size))
    df = pd.DataFrame({"y": y, "x": x, "z": z, "g": labels("g", g)})
    truth = {"beta[(Intercept)]": beta[0], "beta[x]": beta[1], "beta[z]": beta[2],
             **block_truth("g", ("(Intercept)", "x", "z"), sds, corr), "sigma": sigma}
    return df, truth


SIMULATORS = {"crossed60": sim_crossed, "crossed1000": sim_crossed, "nested": sim_nested, "q3": sim_q3}


def simulate(case: Case, quick: bool, seed: int):
    """(data frame, truth, sizes) of one model; one seeded generator per model."""
    import numpy as np

    sizes = case.quick if quick else case.full
    rng = np.random.default_rng([seed, list(CASES).index(case.simulated)])
    df, truth = SIMULATORS[case.simulated](rng, *sizes)
    return df, truth, sizes


# =========================================================================== bayeslmm worker
def bayeslmm_worker(cfg_path: str, out_path: str) -> int:
    """In this fresh process: one default NUTS fit, timed (task "nuts"), or REML's beta
    (task "reml", in a process of its own so that it does not eat the fit's budget)."""
    cfg = json.loads(Path(cfg_path).read_text())
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import bayeslmm

    result = {"config": cfg, "import_seconds": time.perf_counter() - t0, "version": bayeslmm.__version__,
              "sources_sha256": bb.code_fingerprint(git=False)["sources_sha256"]}
    df = bb.load_frame(cfg["data"])
    if cfg["task"] == "reml":
        reml = bayeslmm.Model(cfg["formula"], df).fit().fixef_table()
        result["reml_beta"] = {f"beta[{k}]": {"estimate": float(r["estimate"]), "std_error": float(r["std_error"])}
                               for k, r in reml.iterrows()}
    else:
        result.update(nuts_result(bayeslmm, cfg, df))
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))
    return 0


def nuts_result(bayeslmm, cfg: dict, df) -> dict:
    """Time Model(...) + fit(method="nuts") with the package's defaults; diagnostics after."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        model = bayeslmm.Model(cfg["formula"], df)
        t1 = time.perf_counter()
        fit = model.fit(method="nuts", draws=cfg["draws"], tune=cfg["tune"], chains=cfg["chains"],
                        random_seed=cfg["seed"], route=cfg.get("route", "auto"), progressbar=False)
        t2 = time.perf_counter()
    out = {"wall": t2 - t0, "model_seconds": t1 - t0, "fit_seconds": t2 - t1,
           "engine_timings": dict(getattr(fit, "timings", None) or {}), "sampler": getattr(fit, "sampler", None),
           "route": getattr(fit, "route", None),
           "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})}
    out["params"] = {str(k): {c: float(r[c]) for c in ("median", "sd", "ess_bulk", "r_hat")}
                     for k, r in fit.summary_table().iterrows()}
    out["divergences"] = int(fit.diagnostics().divergences)
    stats = fit.idata["sample_stats"].to_dataset()
    if "n_steps" in stats:  # leapfrog steps per draw: the gradients each draw cost
        out["mean_steps"] = float(stats["n_steps"].mean())
    return out


# =========================================================================== rstanarm
R_SCRIPT = r"""
args <- commandArgs(trailingOnly = TRUE)  # data.csv formula chains iter seed out_prefix
suppressPackageStartupMessages(library(rstanarm))
d <- read.csv(args[1], stringsAsFactors = TRUE)
t0 <- proc.time()[["elapsed"]]
fit <- stan_lmer(as.formula(args[2]), data = d, chains = as.integer(args[3]), iter = as.integer(args[4]),
                 seed = as.integer(args[5]), refresh = 0)
wall <- proc.time()[["elapsed"]] - t0
s <- summary(fit)
keep <- c(names(fixef(fit)), "sigma", grep("^Sigma\\[", rownames(s), value = TRUE))
write.csv(data.frame(param = keep, n_eff = s[keep, "n_eff"], Rhat = s[keep, "Rhat"]),
          paste0(args[6], "_summary.csv"), row.names = FALSE)
a <- as.array(fit, pars = keep)  # iterations x chains x parameters
draws <- do.call(rbind, lapply(seq_len(dim(a)[2]), function(k)
  data.frame(chain = k, a[, k, ], check.names = FALSE)))
write.csv(draws, paste0(args[6], "_draws.csv"), row.names = FALSE)
sp <- rstan::get_sampler_params(fit$stanfit, inc_warmup = FALSE)
div <- sum(sapply(sp, function(m) sum(m[, "divergent__"])))
steps <- mean(sapply(sp, function(m) mean(m[, "n_leapfrog__"])))
writeLines(c("key,value", paste0("wall,", wall), paste0("divergences,", div), paste0("mean_steps,", steps),
             paste0("rstanarm,", packageVersion("rstanarm")), paste0("rstan,", packageVersion("rstan"))),
           paste0(args[6], "_info.csv"))
"""

SIGMA_NAME = re.compile(r"^Sigma\[(?P<grp>.+):(?P<v1>[^:,]+),(?P<v2>[^,]+)\]$")


def find_rstanarm() -> tuple[str | None, str]:
    """Rscript where library(rstanarm) loads, or None and why not."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return None, "rstanarm skipped: no Rscript on this machine"
    code = 'suppressPackageStartupMessages(library(rstanarm)); cat(as.character(packageVersion("rstanarm")))'
    try:
        r = subprocess.run([rscript, "-e", code], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"rstanarm skipped: Rscript did not run ({exc})"
    if r.returncode != 0:
        return None, f"rstanarm skipped: library(rstanarm) fails: {r.stderr.strip()[-200:]}"
    return rscript, f"rstanarm {r.stdout.strip()}"


def rstan_draws(prefix: str) -> dict:
    """{name: (chains, draws) array}: fixed effects and sigma as they are, Sigma[...] as
    sd[grp|v] (diagonal) and corr[grp|v2,v1] (below the diagonal)."""
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(f"{prefix}_draws.csv")
    chains = sorted(frame["chain"].unique())
    arr = {c: np.stack([frame.loc[frame["chain"] == k, c].to_numpy() for k in chains])
           for c in frame.columns if c != "chain"}
    out, cov = {}, {}
    for name, x in arr.items():
        m = SIGMA_NAME.match(name)
        if m is None:
            out[name] = x
        else:
            cov[(m["grp"], m["v1"], m["v2"])] = x
    for (g, v1, v2), x in cov.items():
        if v1 == v2:
            out[f"sd[{g}|{v1}]"] = np.sqrt(x)
        else:
            out[f"corr[{g}|{v2},{v1}]"] = x / np.sqrt(cov[(g, v1, v1)] * cov[(g, v2, v2)])
    return out


def rstan_result(prefix: str) -> dict:
    import arviz as az
    import pandas as pd

    info = dict(pd.read_csv(f"{prefix}_info.csv", dtype=str).itertuples(index=False))
    own = pd.read_csv(f"{prefix}_summary.csv")
    params = {}
    for name, x in rstan_draws(prefix).items():
        params[name] = {"ess_bulk": float(az.ess(x, method="bulk")), "r_hat": float(az.rhat(x))}
    return {"wall": float(info["wall"]), "divergences": int(float(info["divergences"])), "params": params,
            "mean_steps": float(info["mean_steps"]),
            "version": info.get("rstanarm"), "rstan_version": info.get("rstan"),
            "own_min_n_eff": float(own["n_eff"].min()), "own_max_rhat": float(own["Rhat"].max()),
            "own_summary": {r.param: {"n_eff": float(r.n_eff), "Rhat": float(r.Rhat)}
                            for r in own.itertuples(index=False)}}


# =========================================================================== runs
def new_record(case: Case, engine: str, run: int, seed: int) -> dict:
    return {"model": case.key, "engine": engine, "run": run, "seed": seed, "status": "ok", "note": ""}


def finish_record(rec: dict, child: dict, budget: float, mem_limit: float) -> None:
    """Status from the child process; min ESS, min ESS/s and max R-hat from rec['params']."""
    status, note = ra.classify(child, budget, mem_limit)
    if rec["status"] == "ok":  # not already marked failed for an unreadable result
        rec["status"] = status
    rec["note"] = "; ".join(x for x in (note, rec.get("note")) if x)
    rec.update(process_seconds=child["process_seconds"], other_load_cores=child.get("other_load_cores"),
               peak_rss_mib=child.get("peak_rss_bytes", 0) / 2**20)
    if rec["status"] != "ok":
        rec["log_tail"] = child.get("log_tail", [])[-8:]
        return
    params = rec.get("params") or {}
    ess = {k: v["ess_bulk"] for k, v in params.items()}
    nocorr = [v for k, v in ess.items() if not k.startswith("corr[")]
    rec["min_ess"] = min(ess.values()) if ess else None
    rec["min_ess_nocorr"] = min(nocorr) if nocorr else None
    rec["max_rhat"] = max((v["r_hat"] for v in params.values()), default=None)
    rec["ess_per_s"] = rec["min_ess"] / rec["wall"] if rec["min_ess"] else None
    rec["ess_nocorr_per_s"] = rec["min_ess_nocorr"] / rec["wall"] if rec["min_ess_nocorr"] else None


def read_json_result(rec: dict, out: Path) -> dict | None:
    """The worker's JSON, or None with rec marked failed."""
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        rec["status"], rec["note"] = "failed", f"no result: {exc}"
        return None


def bayeslmm_child(task: str, case: Case, data: Path, tmp: Path, a, mem_limit: float) -> tuple[dict, dict | None]:
    """(the child process's record, its JSON or None) of one bayeslmm worker task."""
    tag = f"{case.key}_bayeslmm_{task}"
    cfg = {"task": task, "formula": case.formula, "data": str(data), "draws": a.draws, "tune": a.tune,
           "chains": a.chains, "seed": a.seed, "route": a.route}
    cfg_path, out = tmp / f"{tag}.cfg.json", tmp / f"{tag}.out.json"
    cfg_path.write_text(json.dumps(cfg))
    child = ra.run_child([sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_path), str(out)],
                         a.budget, mem_limit, tmp / f"{tag}.log")
    if ra.classify(child, a.budget, mem_limit)[0] != "ok":
        return child, None
    try:
        return child, json.loads(out.read_text())
    except (OSError, ValueError):
        return child, None


def run_bayeslmm(case: Case, data: Path, tmp: Path, a, mem_limit: float) -> dict:
    rec = new_record(case, "bayeslmm", 1, a.seed)
    child, res = bayeslmm_child("nuts", case, data, tmp, a, mem_limit)
    if res is not None:
        keys = ("wall", "model_seconds", "fit_seconds", "import_seconds", "engine_timings", "sampler", "route",
                "params", "divergences", "mean_steps", "warnings", "version", "sources_sha256")
        rec.update({k: res.get(k) for k in keys})
    elif ra.classify(child, a.budget, mem_limit)[0] == "ok":
        rec["status"], rec["note"] = "failed", "no result from the worker"
    finish_record(rec, child, a.budget, mem_limit)
    if rec["status"] == "ok":
        reml_child, reml = bayeslmm_child("reml", case, data, tmp, a, mem_limit)
        if reml is None:
            rec["note"] = "REML: " + (ra.classify(reml_child, a.budget, mem_limit)[1] or "no result")
        else:
            rec["reml_beta"] = reml["reml_beta"]
    return rec


def run_bambi(case: Case, data: dict, tmp: Path, a, mem_limit: float, python: str, run: int) -> dict:
    seed = a.seed + run - 1
    rec = new_record(case, "bambi", run, seed)
    tag = f"{case.key}_bambi_{run}"
    cfg = {"engine": "bambi", "tag": tag, "dataset": case.key, "data": str(data["npz"]),
           "formula": case.bambi_formula or case.formula, "draws": a.draws, "tune": a.tune, "chains": a.chains, "seed": seed, "cores": None, "runs": 1,
           "effects_diagnostics": False, "sampler": None, "parameterization": None,
           "bambi_params": list(case.bambi_params), "bambi_effects": []}
    cfg_path, out = tmp / f"{tag}.cfg.json", tmp / f"{tag}.out.json"
    cfg_path.write_text(json.dumps(cfg))
    child = ra.run_child([python, str(HERE / "bench_bayes.py"), "--worker", str(cfg_path), str(out)],
                         a.budget, mem_limit, tmp / f"{tag}.log")
    if ra.classify(child, a.budget, mem_limit)[0] == "ok":
        res = read_json_result(rec, out)
        if res is not None and res.get("runs"):
            r = res["runs"][0]
            rec.update(wall=r["wall"], model_seconds=r["model"], fit_seconds=r["fit"], params=r["params"],
                       divergences=r.get("divergences"), mean_steps=r.get("mean_steps"),
                       version=res.get("bambi_version"),
                       import_seconds=res.get("import_seconds"), warnings=r.get("warnings", []),
                       note="uncorrelated effects (bambi's best)")
        elif res is not None:
            rec["status"], rec["note"] = "failed", "the worker wrote no run"
    finish_record(rec, child, a.budget, mem_limit)
    return rec


def run_rstanarm(case: Case, data: dict, tmp: Path, a, mem_limit: float, rscript: str, run: int) -> dict:
    seed = a.seed + run - 1
    rec = new_record(case, "rstanarm", run, seed)
    prefix = tmp / f"{case.key}_rstanarm_{run}"
    script = tmp / "stan_lmer_fit.R"
    script.write_text(R_SCRIPT)
    cmd = [rscript, str(script), str(data["csv"]), case.formula, str(a.chains), str(a.draws + a.tune),
           str(seed), str(prefix)]
    child = ra.run_child(cmd, a.budget, mem_limit, tmp / f"{prefix.name}.log")
    if ra.classify(child, a.budget, mem_limit)[0] == "ok":
        try:
            rec.update(rstan_result(str(prefix)))
            rec["note"] = (f"its own summary: min n_eff {rec['own_min_n_eff']:.0f}, "
                           f"max Rhat {rec['own_max_rhat']:.4f}")
        except (OSError, ValueError, KeyError) as exc:
            rec["status"], rec["note"] = "failed", f"no result: {exc}"
    finish_record(rec, child, a.budget, mem_limit)
    return rec


PEER_RUNNERS = {"bambi": run_bambi, "rstanarm": run_rstanarm}


def write_data(df, tmp: Path, key: str, want_csv: bool) -> dict:
    """The frame as .npz (Python engines) and, for R, as CSV with the labels as text."""
    paths = {"npz": tmp / f"{key}.npz"}
    bb.save_frame(df, paths["npz"])
    if want_csv:
        paths["csv"] = tmp / f"{key}.csv"
        df.to_csv(paths["csv"], index=False)
    return paths


def run_peer(peer: str, case: Case, data: dict, tmp: Path, a, mem_limit: float, exe: str) -> list[dict]:
    """--repeats runs of one peer; once a run is out of time or memory the later ones are
    recorded as skipped (another budget spent on a known timeout tells nothing)."""
    recs = []
    for run in range(1, a.repeats + 1):
        stopped = next((r for r in recs if r["status"] in ("timeout", "OOM")), None)
        if stopped is not None:
            rec = new_record(case, peer, run, a.seed + run - 1)
            rec.update(status="skipped", note=f"run {stopped['run']}: {stopped['status']}")
        else:
            rec = PEER_RUNNERS[peer](case, data, tmp, a, mem_limit, exe, run)
        recs.append(rec)
        show(rec)
    return recs


# =========================================================================== report
def ratios(records: list[dict]) -> list[dict]:
    """bayeslmm / peer of min ESS per second, per model and peer run."""
    out = []
    ours = {r["model"]: r for r in records if r["engine"] == "bayeslmm" and r["status"] == "ok"}
    for r in records:
        if r["engine"] == "bayeslmm" or r["model"] not in ours:
            continue
        row = {"model": r["model"], "peer": r["engine"], "run": r["run"], "peer_status": r["status"]}
        if r["status"] == "ok" and r.get("ess_per_s"):
            b = ours[r["model"]]
            row["ratio"] = b["ess_per_s"] / r["ess_per_s"]
            row["ratio_nocorr"] = b["ess_nocorr_per_s"] / r["ess_per_s"]
            row["wall_ratio"] = r["wall"] / b["wall"]
        out.append(row)
    return out


def result_table(records: list[dict], rat: list[dict]) -> str:
    by = {(x["model"], x["peer"], x["run"]): x for x in rat}
    headers = ["model", "engine", "run", "seed", "status", "wall s", "min ESS", "min ESS/s",
               "min ESS/s no corr", "max R-hat", "div", "steps/draw", "bayeslmm / this", "load", "note"]
    body = []
    for r in records:
        x = by.get((r["model"], r["engine"], r["run"]), {})
        ratio = (f"{x['ratio']:.1f}x [{x['ratio_nocorr']:.1f}x]" if "ratio" in x
                 else ("-" if r["engine"] == "bayeslmm" else "n/a"))
        body.append([r["model"], r["engine"], r["run"], r["seed"], r["status"], fmt(r.get("wall"), "{:.1f}"),
                     fmt(r.get("min_ess"), "{:.0f}"), fmt(r.get("ess_per_s"), "{:.3g}"),
                     fmt(r.get("ess_nocorr_per_s"), "{:.3g}"), fmt(r.get("max_rhat"), "{:.4f}"),
                     fmt(r.get("divergences"), "{}"), fmt(r.get("mean_steps"), "{:.1f}"), ratio,
                     fmt(r.get("other_load_cores")),
                     r.get("note", "")])
    return bb.md_table(headers, body, ["l", "l", "r", "r", "l"] + ["r"] * 9 + ["l"])


def beta_checks(rec: dict, truth: dict) -> list[dict]:
    """Per fixed effect: truth, REML estimate and se, posterior median and sd, and
    |median - REML| in posterior sds."""
    out = []
    for name, reml in (rec.get("reml_beta") or {}).items():
        post = rec["params"].get(name)
        if post is None:
            continue
        dist = abs(post["median"] - reml["estimate"]) / post["sd"]
        out.append({"param": name, "truth": truth.get(name), "reml": reml["estimate"], "reml_se": reml["std_error"],
                    "median": post["median"], "post_sd": post["sd"], "distance_sds": dist,
                    "within": dist <= TARGET_BETA_SDS})
    return out


def posterior_table(records: list[dict], truths: dict) -> str:
    """bayeslmm's posterior medians beside the truth, and beside REML for beta."""
    headers = ["model", "parameter", "truth", "REML", "REML se", "posterior median", "posterior sd",
               "|median - REML| / sd"]
    body = []
    for r in records:
        if r["engine"] != "bayeslmm" or r["status"] != "ok":
            continue
        checks = {c["param"]: c for c in r.get("beta_check", [])}
        for name, p in r["params"].items():
            c = checks.get(name, {})
            body.append([r["model"], name, fmt(truths[r["model"]].get(name), "{:.3g}"),
                         fmt(c.get("reml"), "{:.4f}"), fmt(c.get("reml_se"), "{:.4f}"),
                         f"{p['median']:.4f}", f"{p['sd']:.4f}", fmt(c.get("distance_sds"), "{:.3f}")])
    return bb.md_table(headers, body, ["l", "l"] + ["r"] * 6)


def targets(records: list[dict], rat: list[dict]) -> list[dict]:
    """Issue 10's targets on the crossed models: every peer run's ratio, R-hat, beta vs REML."""
    out = []
    goal = {"bambi": TARGET_BAMBI, "rstanarm": TARGET_RSTANARM}
    for x in rat:
        if x["model"].startswith("crossed") and "ratio" in x:
            out.append({"target": f"{x['model']}: min ESS/s >= {goal[x['peer']]:g}x {x['peer']} (run {x['run']})",
                        "value": f"{x['ratio']:.1f}x", "met": x["ratio"] >= goal[x["peer"]]})
    for r in records:
        if r["engine"] != "bayeslmm" or r["status"] != "ok":
            continue
        if r["model"].startswith("crossed"):
            out.append({"target": f"{r['model']}: bayeslmm R-hat <= {TARGET_RHAT}", "value": f"{r['max_rhat']:.4f}",
                        "met": r["max_rhat"] <= TARGET_RHAT})
        worst = max((c["distance_sds"] for c in r.get("beta_check", [])), default=None)
        if worst is not None:
            out.append({"target": f"{r['model']}: posterior medians of beta within {TARGET_BETA_SDS} posterior sd "
                                  "of REML", "value": f"{worst:.3f} sd", "met": worst <= TARGET_BETA_SDS})
    return out


def report(results: dict, a) -> list[dict]:
    records, rat = results["records"], results["ratios"]
    print(f"\nbayeslmm default NUTS vs peers; {a.chains} chains x {a.draws} draws ({a.tune} tune), seed {a.seed}, "
          f"budget {a.budget:g} s per run; ratio = bayeslmm's min ESS/s / the peer's "
          "[with bayeslmm's minimum taken without the correlations]\n")
    print(result_table(records, rat))
    if any(r["engine"] == "bayeslmm" and r["status"] == "ok" for r in records):
        print("\nbayeslmm's posterior against the simulated truth and REML\n")
        print(posterior_table(records, results["truth"]))
    tg = targets(records, rat)
    if tg:
        print("\ntargets (issue 10):")
        for t in tg:
            print(f"  [{'MET   ' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")
    start = results["environment"]["sources_sha256"]
    seen = sorted({r["sources_sha256"] for r in records if r.get("sources_sha256")} - {start})
    if seen:
        print(f"NOTE: bayeslmm's sources changed during the run (start {start}, workers saw {', '.join(seen)}): "
              "the rows may come from different code")
    for note in results["notes"]:
        print(f"note: {note}")
    busy = [f"{r['model']}/{r['engine']}/{r['run']}" for r in records
            if (r.get("other_load_cores") or 0) > ra.BUSY_WARN_CORES]
    if busy:
        print(f"WARNING: other processes used > {ra.BUSY_WARN_CORES} cores during {', '.join(busy)}: "
              "those timings are unreliable")
    return tg


# =========================================================================== main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list (default {DEFAULT_MODELS})")
    p.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma list, may be empty (default {DEFAULT_PEERS})")
    p.add_argument("--skip-bayeslmm", action="store_true", help="peers only (no ratios then)")
    p.add_argument("--budget", type=float, default=None, help="seconds per run, whole process (default 600)")
    p.add_argument("--repeats", type=int, default=None, help="runs per peer and model (default 2)")
    p.add_argument("--draws", type=int, default=None, help="default 1000 (rstanarm: iter = draws + tune)")
    p.add_argument("--tune", type=int, default=None, help="default 1000")
    p.add_argument("--chains", type=int, default=None, help="default 4")
    p.add_argument("--route", default="auto", help="bayeslmm's fit(method='nuts', route=...) (default auto)")
    p.add_argument("--seed", type=int, default=20261121, help="random_seed of the first run (default 20261121)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the simulated data (default --seed)")
    p.add_argument("--quick", action="store_true", help="small sizes, 150 draws / 150 tune / 2 chains, one run "
                                                        "per peer, budget 240 s")
    p.add_argument("--json", metavar="PATH", help="write every record, the truth and the ratios as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--worker", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    quick = dict(budget=240.0, repeats=1, draws=150, tune=150, chains=2)
    full = dict(budget=600.0, repeats=2, draws=1000, tune=1000, chains=4)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.data_seed = a.seed if a.data_seed is None else a.data_seed
    a.model_list = [m.strip() for m in a.models.split(",") if m.strip()]
    a.peer_list = [m.strip() for m in a.peers.split(",") if m.strip()]
    unknown = [m for m in a.model_list if m not in CASES] + [m for m in a.peer_list if m not in ("bambi", "rstanarm")]
    if unknown:
        p.error(f"unknown model or peer: {', '.join(unknown)}")
    return a


def find_peers(a) -> tuple[dict, list[str]]:
    """{peer: interpreter} of the peers that can run, and notes on the others."""
    found, notes = {}, []
    if "bambi" in a.peer_list:
        py, why = bb.find_bambi()
        if py:
            found["bambi"] = py
        notes.append(why)
    if "rstanarm" in a.peer_list:
        rscript, why = find_rstanarm()
        if rscript:
            found["rstanarm"] = rscript
        notes.append(why)
    return found, notes


def show(r: dict) -> None:
    """One finished run, as it finishes."""
    print(f"  {r['engine']} run {r['run']}: {r['status']} {r.get('note', '')}; wall {fmt(r.get('wall'), '{:.1f}')} s"
          f" (process {fmt(r.get('process_seconds'), '{:.1f}')} s), min ESS {fmt(r.get('min_ess'), '{:.0f}')}, "
          f"{fmt(r.get('ess_per_s'), '{:.3g}')}/s, max R-hat {fmt(r.get('max_rhat'), '{:.4f}')}, "
          f"div {fmt(r.get('divergences'), '{}')}", flush=True)
    if r["status"] == "failed":
        print("    " + "\n    ".join(r.get("log_tail", [])[-3:]), flush=True)


def run_model(case: Case, a, peers: dict, tmp: Path, mem_limit: float, results: dict) -> None:
    df, truth, sizes = simulate(case, a.quick, a.data_seed)
    results["truth"][case.key] = truth
    results["sizes"][case.key] = {"sizes": list(sizes), "rows": len(df), "formula": case.formula, "about": case.about}
    data = write_data(df, tmp, case.key, "rstanarm" in peers)
    print(f"\n[{case.key}] {case.formula}: {len(df):,} rows, sizes {sizes} ({case.about})", flush=True)
    recs = []
    if not a.skip_bayeslmm:
        recs.append(run_bayeslmm(case, data["npz"], tmp, a, mem_limit))
        if recs[0]["status"] == "ok":
            recs[0]["beta_check"] = beta_checks(recs[0], truth)
        show(recs[0])
    for peer, exe in peers.items():
        recs.extend(run_peer(peer, case, data, tmp, a, mem_limit, exe))
    results["records"].extend(recs)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return bayeslmm_worker(*a.worker)
    env = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "processor": cpu_name(),
           "cpu_count": os.cpu_count(), **bb.code_fingerprint()}
    print(f"bench_crossed: models {', '.join(a.model_list)}; peers {', '.join(a.peer_list) or 'none'}; "
          f"{env['date']}, {env['processor']}, {env['cpu_count']} cores; code HEAD {env.get('git_head')}, "
          f"bayeslmm/ dirty: {env.get('bayeslmm_dirty')}, sources {env['sources_sha256']}", flush=True)
    peers, notes = find_peers(a)
    for n in notes:
        print(n, flush=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("worker",)}
    results = {"environment": env, "settings": settings, "notes": notes, "truth": {}, "sizes": {}, "records": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench_crossed_"))
    mem_limit = ra.default_mem_limit()
    try:
        for key in a.model_list:
            run_model(CASES[key], a, peers, tmp, mem_limit, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["ratios"] = ratios(results["records"])
    results["targets"] = report(results, a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {a.json}")
    return 1 if a.strict and any(not t["met"] for t in results["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
