#!/usr/bin/env python
"""Data past memory: 50 million rows, 100,000 groups, fitted from Parquet by REML and by NUTS.

This is a benchmark, not a test: it writes, fits, times and reports, and exits 0
unless ``--strict`` is given (then a missed target exits 1).

1. **Write** a simulated ``y ~ x + (1 + x | g)`` dataset to Parquet under
   ``benchmarks/results/big_parquet/`` (git-ignored), one file (one row group) per
   ``--chunk`` rows, generated chunk by chunk so the whole never sits in memory:
   ``g`` uniform over ``--groups`` levels, ``x ~ N(0, 1)``,
   ``y = β₀ + β₁x + b₀g + b₁g·x + ε`` with ``(b₀, b₁) ~ N(0, Σ)`` drawn once per group.
   A dataset already there with the same settings is reused (``--rewrite`` to redo).
2. **Model**: ``Model("y ~ x + (1 + x | g)", folder)`` — two Dask passes over the files
   (levels, then the cross-products), on Dask's local threaded scheduler.
3. **REML**: ``model.fit(method="reml")``.
4. **NUTS**: ``model.fit(method="nuts")``, collapsed likelihood on nutpie; the 100,000
   groups' effects are summarised per level, not stored as draws.

Per stage: wall time and the peak resident memory of this process during the stage
(sampled every 20 ms with psutil); overall: ``ru_maxrss``.  The estimates are checked
against the simulation's true values.  Targets: peak memory under 4 GiB, each engine
finishing in minutes.  Results go to ``benchmarks/results/big_parquet.json``.

    nice -n 10 .venv/bin/python benchmarks/big_parquet.py            # 5e7 rows × 1e5 groups
    .venv/bin/python benchmarks/big_parquet.py --rows 2000000 --groups 20000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bayeslmm import Model  # noqa: E402

TRUE = {"beta": (2.0, 0.5), "sd": (1.0, 0.5), "corr": 0.3, "sigma": 2.0}
GIB = 1024**3


class PeakMemory:
    """Peak resident set size of this process over a ``with`` block (sampled)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def write_dataset(folder: Path, rows: int, groups: int, chunk: int, seed: int) -> dict:
    """Write the Parquet files chunk by chunk; returns the settings record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings = {"rows": rows, "groups": groups, "chunk": chunk, "seed": seed, "true": TRUE}
    record = folder / "settings.json"
    if record.exists() and json.loads(record.read_text()) == settings:
        return settings
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    rng = np.random.default_rng([seed, 0])
    s0, s1 = TRUE["sd"]
    cov = np.array([[s0**2, TRUE["corr"] * s0 * s1], [TRUE["corr"] * s0 * s1, s1**2]])
    b = rng.multivariate_normal(np.zeros(2), cov, size=groups)
    b0, b1 = TRUE["beta"]
    for k, start in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - start)
        r = np.random.default_rng([seed, 1, k])
        g = r.integers(0, groups, n).astype(np.int32)
        x = r.normal(size=n)
        y = b0 + b1 * x + b[g, 0] + b[g, 1] * x + TRUE["sigma"] * r.normal(size=n)
        table = pa.table({"y": y, "x": x, "g": g})
        pq.write_table(table, folder / f"part-{k:05d}.parquet", row_group_size=n)
    record.write_text(json.dumps(settings))
    return settings


def check(name: str, est: float, true: float, tol: float) -> dict:
    return {"parameter": name, "estimate": float(est), "true": true, "tolerance": tol,
            "ok": bool(abs(est - true) <= tol)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000_000)
    ap.add_argument("--groups", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=1_000_000, help="rows per Parquet file (row group)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--folder", type=Path, default=HERE / "results" / "big_parquet")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--tune", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--rewrite", action="store_true", help="write the dataset even if one is there")
    ap.add_argument("--skip-nuts", action="store_true")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "big_parquet.json")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    logging.getLogger("bayeslmm.outofcore").setLevel(logging.INFO)
    if args.rewrite and (args.folder / "settings.json").exists():
        (args.folder / "settings.json").unlink()
    stages: dict = {}
    out = {"settings": None, "stages": stages, "checks": []}
    formula = "y ~ x + (1 + x | g)"

    with PeakMemory() as pm:
        out["settings"] = write_dataset(args.folder, args.rows, args.groups, args.chunk, args.seed)
    files = sorted(args.folder.glob("*.parquet"))
    disk = sum(f.stat().st_size for f in files)
    stages["write"] = {"wall_s": pm.wall, "peak_rss_gib": pm.peak / GIB}
    print(f"data: {args.rows:,} rows, {args.groups:,} groups, {len(files)} files, {disk / GIB:.2f} GiB on disk "
          f"({args.folder})")

    with PeakMemory() as pm:
        model = Model(formula, str(args.folder))
    stages["model (2 Dask passes)"] = {"wall_s": pm.wall, "peak_rss_gib": pm.peak / GIB}
    print(repr(model))

    with PeakMemory() as pm:
        reml = model.fit(method="reml")
    stages["REML fit"] = {"wall_s": pm.wall, "peak_rss_gib": pm.peak / GIB,
                          "evaluations": reml.optimization.n_evaluations}
    print(reml.summary())
    se = reml.fixef_se
    vc = reml.varcorr
    sds = vc["sdcor"].to_numpy()
    # 1e5 groups: the sds are estimated to ~0.3%, β to its SE; the tolerances allow ~5 SEs
    out["checks"] += [
        check("REML (Intercept)", reml.fixef.iloc[0], TRUE["beta"][0], 5 * se.iloc[0]),
        check("REML x", reml.fixef.iloc[1], TRUE["beta"][1], 5 * se.iloc[1]),
        check("REML sd (Intercept)", sds[0], TRUE["sd"][0], 0.02 * TRUE["sd"][0]),
        check("REML sd x", sds[1], TRUE["sd"][1], 0.02 * TRUE["sd"][1]),
        check("REML corr", sds[2], TRUE["corr"], 0.02),
        check("REML sigma", reml.sigma, TRUE["sigma"], 0.002 * TRUE["sigma"]),
    ]

    if not args.skip_nuts:
        options = dict(method="nuts", draws=args.draws, tune=args.tune, chains=args.chains, random_seed=args.seed,
                       progressbar=False)
        with PeakMemory() as pm, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bayes = model.fit(**options)
        stages["NUTS fit"] = {"wall_s": pm.wall, "peak_rss_gib": pm.peak / GIB, "sampler": bayes.sampler,
                              "timings": {k: v for k, v in bayes.timings.items()},
                              "warnings": [str(w.message) for w in caught]}
        for w in caught:
            print(f"  warning: {w.message}")
        diag = bayes.diagnostics()
        stages["NUTS fit"].update(max_rhat=diag.max_rhat, min_ess_bulk=diag.min_ess_bulk,
                                  divergences=diag.divergences,
                                  min_ess_bulk_per_s=diag.min_ess_bulk / pm.wall)
        print(bayes.summary())
        fe = bayes.fixef_table()
        post = bayes.idata["posterior"]
        sd_b = post["g_sd"].mean(("chain", "draw")).to_numpy()
        corr_b = float(post["g_corr"].mean(("chain", "draw")).to_numpy()[0, 1])
        sigma_b = float(post["sigma"].mean())
        out["checks"] += [
            check("NUTS (Intercept)", fe.iloc[0, 0], TRUE["beta"][0], 5 * se.iloc[0]),
            check("NUTS x", fe.iloc[1, 0], TRUE["beta"][1], 5 * se.iloc[1]),
            check("NUTS sd (Intercept)", sd_b[0], TRUE["sd"][0], 0.02 * TRUE["sd"][0]),
            check("NUTS sd x", sd_b[1], TRUE["sd"][1], 0.02 * TRUE["sd"][1]),
            check("NUTS corr", corr_b, TRUE["corr"], 0.02),
            check("NUTS sigma", sigma_b, TRUE["sigma"], 0.002 * TRUE["sigma"]),
        ]
        out["nuts_groups"] = sorted(bayes.idata.children)

    out["ru_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    out["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print("\n| stage | wall | peak RSS |\n|---|---:|---:|")
    for name, st in stages.items():
        print(f"| {name} | {st['wall_s']:.1f} s | {st['peak_rss_gib']:.2f} GiB |")
    print(f"\nprocess peak (ru_maxrss): {out['ru_maxrss_gib']:.2f} GiB")
    if "NUTS fit" in stages:
        st = stages["NUTS fit"]
        print(f"NUTS: sampler {st['sampler']}, max R-hat {st['max_rhat']:.3f}, min bulk ESS {st['min_ess_bulk']:.0f}, "
              f"{st['divergences']} divergences")
    print("\n| check | estimate | true | tolerance | ok |\n|---|---:|---:|---:|---|")
    for c in out["checks"]:
        print(f"| {c['parameter']} | {c['estimate']:.4f} | {c['true']} | {c['tolerance']:.4f} | {c['ok']} |")
    targets = {"peak memory < 4 GiB": out["ru_maxrss_gib"] < 4,
               "REML under 10 min (model + fit)": stages["model (2 Dask passes)"]["wall_s"]
               + stages["REML fit"]["wall_s"] < 600,
               "estimates near the truth": all(c["ok"] for c in out["checks"])}
    if "NUTS fit" in stages:
        targets["NUTS under 10 min"] = stages["NUTS fit"]["wall_s"] < 600
    out["targets"] = targets
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else 'MISSED'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return 1 if args.strict and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
