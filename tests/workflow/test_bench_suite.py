"""The benchmark suite's bookkeeping (benchmarks/run_all.py) on canned results.

No benchmark runs here and nothing is timed: the records below are made by hand (with
numbers from real runs), and the only subprocesses are tiny ones that test the
budget and memory guards.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_bayes  # noqa: E402
import run_all  # noqa: E402


# --------------------------------------------------------------------------- canned records
def _reml(dataset, engine, wall, objective, beta, sds, corr, sigma, *, load=0.05, rows=180, groups="18",
          size=None, run_at="2026-11-21 09:00", status="ok", note=""):
    return {"dataset": dataset, "rows": rows, "groups": groups, "size": size, "method": "REML", "engine": engine,
            "status": status, "note": note, "wall": wall, "run_at": run_at, "peak_rss_mib": 190.0,
            "other_load_cores": load, "objective": objective,
            "estimates": {"beta": beta, "sd": sds, "corr": corr, "sigma": sigma}}


def _nuts(dataset, engine, wall, min_ess, *, load=0.05, rows=180, groups="18", size=None,
          run_at="2026-11-21 09:00", status="ok", note="", sampler="nutpie (kernel)"):
    return {"dataset": dataset, "rows": rows, "groups": groups, "size": size, "method": "NUTS", "engine": engine,
            "status": status, "note": note, "wall": wall, "run_at": run_at, "peak_rss_mib": 380.0,
            "other_load_cores": load, "min_ess": min_ess, "ess_per_s": min_ess / wall if wall else None,
            "max_rhat": 1.002, "sampler": sampler}


OURS_SLEEP = dict(beta=[251.405105, 10.467286], sds={"Subject": [24.740436, 5.922132]},
                  corr={"Subject": [0.065551]}, sigma=25.591818)


@pytest.fixture
def records():
    return [
        _nuts("sleepstudy", "bambi", 7.0, 2026.0, sampler="pymc (nutpie not installed)"),
        _reml("sleepstudy", "lme4", 0.014, 1743.628272 + 1.41e-9, [251.405105, 10.467286],
              {"Subject": [24.740440, 5.922130]}, {"Subject": [0.065552]}, 25.591818),
        _reml("sleepstudy", "bayeslmm", 0.0118, 1743.628272, **{k: v for k, v in OURS_SLEEP.items()}),
        _nuts("sleepstudy", "bayeslmm", 5.87, 3289.0),
        _reml("sleepstudy", "statsmodels", 0.103, 1743.628272 + 6e-10, [251.405105, 10.467286],
              {"Subject": [24.740584, 5.922130]}, {"Subject": [0.0655]}, 25.591818),
        _reml("sim 1e6 x 1e4", "statsmodels", None, None, [], {}, {}, None, rows=1_000_000, groups="10,000",
              size=[1_000_000, 10_000], status="timeout", note="over the 600 s budget", load=0.9),
        _reml("sim 1e6 x 1e4", "bayeslmm", 1.9, 2.9e6, [1.0, 2.0], {"g": [1.0, 0.5]}, {"g": [0.3]}, 1.0,
              rows=1_000_000, groups="10,000", size=[1_000_000, 10_000]),
        _nuts("sim 1e6 x 1e4", "bambi", None, 0.0, rows=1_000_000, groups="10,000", size=[1_000_000, 10_000],
              status="OOM", note="_ArrayMemoryError: Unable to allocate 74.5 GiB"),
        _reml("sim 1e3 x 50", "bayeslmm", 0.02, 3068.377888, [1.0, 2.0], {"g": [1.0, 0.5]}, {"g": [0.3]}, 1.0,
              rows=1000, groups="50", size=[1000, 50]),
        _reml("exam", "bayeslmm", 0.0152, 9327.600345, [-0.0116, 0.5565], {"school": [0.3035, 0.1223]},
              {"school": [0.494]}, 0.744, rows=4059, groups="65"),
    ]


# --------------------------------------------------------------------------- parsing, data
def test_parse_sizes_sorted_and_checked():
    assert run_all.parse_sizes("1e5x1e3, 1e3x50,,1e4x200") == [(1000, 50), (10_000, 200), (100_000, 1000)]
    assert run_all.parse_sizes("") == []
    for bad in ("1e3", "1000x3", "1e3x1", "axb"):
        with pytest.raises(ValueError, match="--sizes"):
            run_all.parse_sizes(bad)


def test_default_sizes_span_1e3_to_1e7_rows():
    sizes = run_all.parse_sizes(run_all.DEFAULT_SIZES)
    assert sizes[0][0] == 1000 and sizes[-1][0] == 10**7
    ds = run_all.sim_dataset(*sizes[-1])
    assert ds.key == "sim 1e7 x 1e5" and ds.groups == "100,000" and ds.rows == 10**7


def test_write_data_same_numbers_for_python_and_r(tmp_path):
    df = pd.DataFrame({"y": [1.5, -2.25, 3.0, 0.125], "x": [0.0, 1.0, 2.0, 3.0],
                       "g": pd.Categorical(["b", "a", "b", "c"], categories=["b", "a", "c"])})
    run_all.write_data(df, tmp_path)
    back = bench_bayes.load_frame(tmp_path / "data.npz")
    np.testing.assert_array_equal(back["y"].to_numpy(), df["y"].to_numpy())
    assert list(back["g"].astype(str)) == ["b", "a", "b", "c"]
    # what lme4_fit.R reads: columns.tsv, float64 / int32 little-endian, levels in order
    meta = (tmp_path / "columns.tsv").read_text().splitlines()
    assert meta == ["name\tkind\tn", "y\tdouble\t4", "x\tdouble\t4", "g\tfactor\t4"]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "y.bin", dtype="<f8"), df["y"].to_numpy())
    np.testing.assert_array_equal(np.fromfile(tmp_path / "g.bin", dtype="<i4"), [0, 1, 0, 2])
    assert (tmp_path / "g.levels").read_text().splitlines() == ["b", "a", "c"]


# --------------------------------------------------------------------------- estimates
def test_canonical_from_varcorr_and_differences():
    est = run_all.canonical_from_varcorr(
        [251.4, 10.47], 25.59,
        grp=["Subject", "Subject", "Subject", "Residual"], var1=["(Intercept)", "Days", "(Intercept)", None],
        var2=[None, None, "Days", None], sdcor=[24.74, 5.922, 0.0656, 25.59])
    assert est == {"beta": [251.4, 10.47], "sd": {"Subject": [24.74, 5.922]}, "corr": {"Subject": [0.0656]},
                   "sigma": 25.59}
    # R's NA for var2 arrives as NaN from pandas
    est_nan = run_all.canonical_from_varcorr([1.0], 1.0, ["s", "Residual"], ["(Intercept)", math.nan],
                                             [math.nan, math.nan], [0.3, 1.0])
    assert est_nan["sd"] == {"s": [0.3]} and est_nan["corr"] == {}

    other = {**est, "sd": {"Subject": [24.74 * (1 + 2e-5), 5.922]}, "corr": {"Subject": [0.0656 + 3e-4]}}
    d, key = run_all.estimate_difference(est, other)
    assert key == "corr[Subject][0]" and d == pytest.approx(3e-4)   # absolute for correlations
    other["corr"] = {"Subject": [0.0656]}
    d, key = run_all.estimate_difference(est, other)
    assert key == "sd[Subject][0]" and d == pytest.approx(2e-5)     # relative otherwise
    d, why = run_all.estimate_difference(est, {**est, "corr": {}})
    assert d is None and "corr[Subject][0]" in why


def test_reml_worker_statsmodels_estimates_line_up_with_bayeslmm(tmp_path):
    """The same canonical layout from both Python workers (real sleepstudy fits, no timing)."""
    ds = run_all.REAL_DATASETS["sleepstudy"]
    run_all.write_data(run_all.load_data(ds, seed=1), tmp_path)
    out = {}
    for engine in ("bayeslmm", "statsmodels"):
        cfg = tmp_path / f"{engine}.json"
        cfg.write_text(json.dumps({"engine": engine, "formula": ds.formula, "sm": ds.sm,
                                   "data": str(tmp_path / "data.npz"), "repeats": 0, "repeat_under": 0.0}))
        assert run_all.reml_worker(str(cfg), str(tmp_path / f"{engine}.out")) == 0
        out[engine] = json.loads((tmp_path / f"{engine}.out").read_text())
    ours, sm = out["bayeslmm"], out["statsmodels"]
    assert ours["objective"] == pytest.approx(1743.628272, abs=1e-5)
    assert sm["objective"] == pytest.approx(ours["objective"], abs=1e-4)  # -2 llf is on lme4's scale
    d, key = run_all.estimate_difference(ours["estimates"], sm["estimates"])
    assert d is not None and d < 1e-3, key
    assert ours["times"] == [] and ours["wall"] == ours["first_seconds"]


# --------------------------------------------------------------------------- failures, skipping
def test_classify_child_outcomes():
    gib = 2.0**30
    assert run_all.classify({"killed": "timeout"}, 600, 16 * gib) == ("timeout", "over the 600 s budget")
    assert run_all.classify({"killed": "oom"}, 600, 16 * gib) == ("OOM", "over the 16.00 GiB memory limit")
    assert run_all.classify({"returncode": -9, "log_tail": []}, 600, gib)[0] == "OOM"
    st, note = run_all.classify({"returncode": 1, "log_tail": [
        "Traceback (most recent call last):",
        "numpy._core._exceptions._ArrayMemoryError: Unable to allocate 74.5 GiB for an array"]}, 600, gib)
    assert st == "OOM" and note.startswith("_ArrayMemoryError: Unable to allocate 74.5 GiB")
    st, note = run_all.classify({"returncode": 1, "log_tail": ["Error in lmer(f): bad formula", "Execution halted"]},
                                600, gib)
    assert st == "failed" and "bad formula" in note
    assert run_all.classify({"returncode": 0, "log_tail": []}, 600, gib) == ("ok", "")


def test_skip_reason_after_timeout_or_oom():
    stopped = {("NUTS", "bambi"): ("1e6 x 1e4", "OOM")}
    assert run_all.skip_reason(stopped, ("NUTS", "bambi")) == "skipped: OOM at 1e6 x 1e4"
    assert run_all.skip_reason(stopped, ("REML", "lme4")) is None


def test_run_child_kills_over_budget_and_over_memory(tmp_path):
    t0 = time.perf_counter()
    run = run_all.run_child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, 2.0**34,
                            tmp_path / "sleep.log")
    assert time.perf_counter() - t0 < 10
    assert run["killed"] == "timeout" and run_all.classify(run, 0.5, 2.0**34)[0] == "timeout"

    grow = "import time\nblocks = []\nfor _ in range(60):\n    blocks.append(bytearray(20 * 2**20))\n" \
           "    time.sleep(0.05)\ntime.sleep(30)\n"
    run = run_all.run_child([sys.executable, "-c", grow], 60, 150 * 2**20, tmp_path / "grow.log")
    assert run["killed"] == "oom"
    assert run["peak_rss_bytes"] > 150 * 2**20

    run = run_all.run_child([sys.executable, "-c", "x = bytearray(80 * 2**20); print('done')"], 60, 2.0**34,
                            tmp_path / "ok.log")
    assert run["returncode"] == 0 and run["killed"] is None and run["log_tail"] == ["done"]
    assert run["peak_rss_bytes"] >= 80 * 2**20   # ru_maxrss of the child


# --------------------------------------------------------------------------- merge, compare, table
def test_merge_replaces_rows_of_the_same_key_and_sorts(records):
    redo = _reml("sleepstudy", "lme4", 0.0140, 1743.628272, [251.405105, 10.467286],
                 {"Subject": [24.740436, 5.922132]}, {"Subject": [0.065551]}, 25.591818,
                 run_at="2026-11-21 11:00", load=0.01)
    merged = run_all.merge_records(records, [redo])
    assert len(merged) == len(records)
    lme4 = [r for r in merged if r["engine"] == "lme4"]
    assert lme4 == [redo]
    order = [(r["dataset"], r["method"], r["engine"]) for r in merged]
    assert order == [
        ("sleepstudy", "REML", "bayeslmm"), ("sleepstudy", "REML", "lme4"), ("sleepstudy", "REML", "statsmodels"),
        ("sleepstudy", "NUTS", "bayeslmm"), ("sleepstudy", "NUTS", "bambi"),
        ("exam", "REML", "bayeslmm"),
        ("sim 1e3 x 50", "REML", "bayeslmm"),
        ("sim 1e6 x 1e4", "REML", "bayeslmm"), ("sim 1e6 x 1e4", "REML", "statsmodels"),
        ("sim 1e6 x 1e4", "NUTS", "bambi"),
    ]
    added = run_all.merge_records(records, [_reml("InstEval", "bayeslmm", 2.45, 237733.834128, [3.28, -0.09],
                                                  {"s": [0.33]}, {}, 1.18, rows=73421)])
    assert [r["dataset"] for r in added][5:7] == ["exam", "InstEval"]


def test_compare_records_speedups_and_agreement(records):
    recs = {(r["dataset"], r["method"], r["engine"]): r for r in run_all.compare_records(records)}
    lme4 = recs[("sleepstudy", "REML", "lme4")]["vs"]
    assert lme4["speedup"] == pytest.approx(0.014 / 0.0118)
    assert lme4["objective_diff"] == pytest.approx(-1.41e-9, abs=1e-12)
    assert lme4["estimate_worst"] == "corr[Subject][0]" and lme4["estimate_diff"] == pytest.approx(1e-6)
    sm = recs[("sleepstudy", "REML", "statsmodels")]["vs"]
    assert sm["estimate_worst"] == "corr[Subject][0]" and sm["estimate_diff"] == pytest.approx(5.1e-5)
    bambi = recs[("sleepstudy", "NUTS", "bambi")]["vs"]
    assert bambi["speedup"] == pytest.approx((3289 / 5.87) / (2026 / 7.0))
    assert bambi["wall_ratio"] == pytest.approx(7.0 / 5.87)
    assert "vs" not in recs[("sleepstudy", "REML", "bayeslmm")]
    assert "vs" not in recs[("sim 1e6 x 1e4", "REML", "statsmodels")]  # timed out: nothing to compare


def test_report_table_cells(records):
    records[0]["other_load_cores"] = 0.61  # bambi's row taken on a busy machine
    text = run_all.render_report(records, {"2026-11-21 09:00": {"processor": "Xeon", "cpu_count": 2,
                                                                "python": "3.12.1", "lme4": "1.1.31"}},
                                 ["lme4 skipped: nothing"])
    lines = text.splitlines()
    assert lines[0].startswith("run 2026-11-21 09:00: Xeon, 2 cores; Python 3.12.1; lme4 1.1.31")
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| data") and "groups" in ln)
    table = [ln for ln in lines[start:] if ln.startswith("| ")]   # the full table, after the pivot
    assert table[0].split("|")[1].strip() == "data" and len(table) == 1 + len(records)
    cells = {(c[1], c[4], c[5]): c for c in ([x.strip() for x in ln.split("|")] for ln in table[1:])}
    ours = cells[("sleepstudy", "REML", "bayeslmm")]
    assert ours[6] == "11.8 ms" and ours[11] == "REML crit 1743.628272" and ours[10] == ""
    lme4 = cells[("sleepstudy", "REML", "lme4")]
    assert lme4[6] == "14.0 ms" and lme4[10] == "1.19×" and lme4[11] == "Δcrit -1.4e-09; est 1.0e-06"
    bambi = cells[("sleepstudy", "NUTS", "bambi")]
    assert bambi[8] == "289" and bambi[10] == "1.94×" and bambi[12] == "0.61 busy"
    assert cells[("sleepstudy", "NUTS", "bayeslmm")][8] == "560"
    timeout = cells[("sim 1e6 x 1e4", "REML", "statsmodels")]
    assert timeout[2] == "1,000,000" and timeout[6] == "timeout" and timeout[13] == "over the 600 s budget"
    assert timeout[12] == "0.90 busy"
    oom = cells[("sim 1e6 x 1e4", "NUTS", "bambi")]
    assert oom[6] == "OOM" and oom[8] == "" and "74.5 GiB" in oom[13]
    assert "rows taken while other processes used > 0.25 cores: sleepstudy NUTS bambi, " \
           "sim 1e6 x 1e4 REML statsmodels" in text
    assert "note: lme4 skipped: nothing" in text
    assert "merged table" not in text
    records[1]["run_at"] = "2026-11-21 11:00"
    assert "merged table: rows come from the runs 2026-11-21 09:00, 2026-11-21 11:00" in \
        run_all.render_report(records, {}, [])


def test_fill_nuts_from_a_bench_bayes_worker_result():
    """The suite reads bench_bayes.py's worker output through bench_bayes.summarize_run."""
    res = {"config": {"engine": "bayeslmm", "sampler": "auto", "parameterization": "collapsed"},
           "import_seconds": 0.9, "bayeslmm_version": "0.1.0", "versions": {"pymc": "6.4.0"},
           "runs": [{"run": "cold", "wall": 2.0, "model": 0.01, "fit": 1.99, "compile": 0.0,
                     "engine_timings": {"build": 0.1, "sample": 1.5, "postprocess": 0.3, "backend": "kernel"},
                     "sampler_used": "nutpie", "divergences": 0, "warnings": [],
                     "params": {"beta[Intercept]": {"mean": 251.0, "ess_bulk": 3000.0, "ess_tail": 2500.0,
                                                    "r_hat": 1.001},
                                "corr[Subject]": {"mean": 0.1, "ess_bulk": 1800.0, "ess_tail": 2000.0,
                                                  "r_hat": 1.004},
                                "sigma": {"mean": 25.8, "ess_bulk": 4000.0, "ess_tail": 3000.0, "r_hat": 1.0}}}]}
    rec = {"dataset": "sleepstudy", "method": "NUTS", "engine": "bayeslmm", "note": ""}
    run_all.fill_nuts(rec, res)
    assert rec["min_ess"] == 1800.0 and rec["ess_per_s"] == pytest.approx(900.0)
    assert rec["max_rhat"] == pytest.approx(1.004) and rec["sampler"] == "nutpie (kernel)"
    assert rec["wall"] == 2.0 and rec["version"] == "0.1.0"


def test_peer_convergence_warning_in_note_on_one_line(records):
    lme4 = next(r for r in records if r["engine"] == "lme4")
    lme4["warnings"] = ["Model failed to converge with max|grad| = 0.0269 (tol = 0.002, component 1); "
                        "Model is nearly unidentifiable: very large eigenvalue\n - Rescale variables?"]
    ours_nuts = next(r for r in records if r["engine"] == "bayeslmm" and r["method"] == "NUTS")
    ours_nuts["warnings"] = ["UserWarning: the pointwise log-likelihood was not stored"]
    rows = {(c[0], c[3], c[4]): c for c in run_all.table_rows(run_all.compare_records(records))}
    note = rows[("sleepstudy", "REML", "lme4")][-1]
    assert note.startswith("lme4 warns: Model failed to converge with max|grad| = 0.0269")
    assert "\n" not in note and len(note) <= 90 and note.endswith("…")
    assert rows[("sleepstudy", "NUTS", "bayeslmm")][-1] == ""   # bayeslmm's own notices stay in the JSON


def test_pivot_table_side_by_side(records):
    records[0]["other_load_cores"] = 0.61
    lines = run_all.pivot_table(run_all.compare_records(records)).splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "data", "rows", "REML bayeslmm", "REML lme4", "REML statsmodels", "NUTS bayeslmm", "NUTS bambi"]
    cells = {c[1]: c for c in ([x.strip() for x in ln.split("|")] for ln in lines[2:])}
    assert list(cells) == ["sleepstudy", "exam", "sim 1e3 x 50", "sim 1e6 x 1e4"]
    assert cells["sleepstudy"][3:8] == ["11.8 ms, 190 MiB", "14.0 ms, 190 MiB", "103.0 ms, 190 MiB",
                                        "560/s, 5.87 s, 380 MiB", "289/s, 7.00 s, 380 MiB*"]
    assert cells["exam"][4:8] == ["-", "-", "-", "-"]
    assert cells["sim 1e6 x 1e4"][3:8] == ["1.90 s, 190 MiB", "-", "timeout*", "-", "OOM"]


def test_report_lists_only_runs_that_still_have_rows(records):
    envs = {"2026-11-21 09:00": {"processor": "Xeon"}, "2026-11-21 08:00": {"processor": "old"}}
    text = run_all.render_report(records, envs, [])
    assert "run 2026-11-21 09:00: Xeon" in text and "08:00" not in text
