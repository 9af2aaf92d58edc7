"""Models from Dask DataFrames and Parquet datasets (bayeslmm.outofcore) against the in-memory path.

The cross-products, the default priors' statistics, the profiled deviance and every
estimate at a given θ must equal the in-memory model's to 1e-10 relative; a fit's
optimum θ is compared more loosely, because the optimizer's path moves with rounding
on a flat objective.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

dd = pytest.importorskip("dask.dataframe")

from bayeslmm import Model  # noqa: E402
from bayeslmm.cli import main as cli_main  # noqa: E402
from bayeslmm.datasets import load_dataset  # noqa: E402
from bayeslmm.errors import DataError, FormulaError, ModelError  # noqa: E402
from bayeslmm.outofcore import is_parquet_source  # noqa: E402
from bayeslmm.reml.deviance import ProfiledDeviance  # noqa: E402
from bayeslmm.reml.estimates import compute_estimates  # noqa: E402
from bayeslmm.spec import Moments  # noqa: E402

RTOL = 1e-10


def assert_close(a, b, what, rtol=RTOL):
    """Entrywise |a − b| ≤ rtol·(|b| + 1e-3·max|b|): relative, with a floor for entries near 0."""
    a = a.toarray() if hasattr(a, "toarray") else np.asarray(a, dtype=float)
    b = b.toarray() if hasattr(b, "toarray") else np.asarray(b, dtype=float)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    scale = np.abs(b) + 1e-3 * (np.max(np.abs(b)) if b.size else 0.0)
    bad = np.abs(a - b) > rtol * scale
    assert not bad.any(), f"{what}: {bad.sum()} entries differ, worst {np.max(np.abs(a - b) / np.where(scale > 0, scale, 1)):.3g}"


def simulated_factors(n=3000, seed=11) -> pd.DataFrame:
    """Several factors: crossed a and b, c nested in a, a string and a categorical fixed factor.

    Sorted by ``a`` so that partitions miss levels of every factor.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, n)
    b = rng.integers(0, 25, n)
    c = rng.integers(0, 3, n)
    x = rng.normal(size=n) * 2 + 5
    f = rng.choice(["lo", "mid", "hi"], n)
    g = pd.Categorical(rng.choice(["u", "v", "w", "z"], n), categories=["w", "z", "u", "v"])
    ua, ub, uc = rng.normal(size=40) * 1.5, rng.normal(size=25), rng.normal(size=(40, 3)) * 0.7
    sa = rng.normal(size=40) * 0.3
    y = (1 + 0.5 * x + ua[a] + sa[a] * x + ub[b] + uc[a, c] + (f == "hi") * 0.8
         + np.asarray(g == "u") * 0.4 + rng.normal(size=n))
    df = pd.DataFrame({"y": y, "x": x, "a": [f"s{k:02d}" for k in a], "b": b, "c": c, "f": f, "g": g,
                       "pos": np.abs(x) + 0.1})
    return df.sort_values("a", kind="stable").reset_index(drop=True)


CASES = {
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", lambda: load_dataset("sleepstudy"), 3),
    "exam": ("normexam ~ standLRT + sex + schgend + vr + (standLRT | school)", lambda: load_dataset("exam"), 5),
    "crossed": ("y ~ x + f + g + (1 + x | a) + (1 | b)", simulated_factors, 4),
    "nested_uncorrelated": ("np.log(y + 20) ~ I(x**2) + C(f) + (1 | a/c) + (x || b)", simulated_factors, 6),
    "three_crossed": ("y ~ x + (1 | a) + (1 | b) + (1 | g)", simulated_factors, 7),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    formula, make, nparts = CASES[request.param]
    df = make()
    return request.param, Model(formula, df), Model(formula, dd.from_pandas(df, npartitions=nparts))


def test_spec_and_crossproducts_equal_in_memory(pair):
    name, mem, ooc = pair
    s0, s1 = mem.spec, ooc.spec
    assert not s1.rows_in_memory and s0.rows_in_memory
    assert s1.n_obs == s0.n_obs and s1.fixed_names == s0.fixed_names
    assert [(b.group, b.levels, b.columns, b.correlated) for b in s1.blocks] == \
           [(b.group, b.levels, b.columns, b.correlated) for b in s0.blocks]
    assert len(s1.y) == 0 and s1.X.shape == (0, s0.n_fixed) and all(len(b.codes) == 0 for b in s1.blocks)
    c0, c1 = mem.crossprods, ooc.crossprods
    assert c1.n_obs == c0.n_obs and c1.m == c0.m and c1.rest_offsets == c0.rest_offsets
    assert_close(c1.A11, c0.A11, f"{name} A11")
    assert_close(c1.Arr, c0.Arr, f"{name} Arr")
    assert_close(c1.B, c0.B, f"{name} B")
    assert_close(c1.P, c0.P, f"{name} P")
    assert np.array_equal(c1.S_rows, c0.S_rows) and np.array_equal(c1.S_cols, c0.S_cols)


def test_default_priors_equal_in_memory(pair):
    name, mem, ooc = pair
    from bayeslmm.bayes.priors import default_priors

    p0, p1 = default_priors(mem.spec), default_priors(ooc.spec)
    assert p1.centred == p0.centred
    assert_close(p1.x_means, p0.x_means, f"{name} x_means")
    for a, b in zip(p1.beta + (p1.sigma,), p0.beta + (p0.sigma,)):
        assert a.family == b.family
        for k in b.params:
            assert_close(a.params[k], b.params[k], f"{name} prior {b}")
    for a, b in zip(p1.blocks, p0.blocks):
        assert_close(a.sd.params["sigma"], b.sd.params["sigma"], f"{name} sd prior")


@pytest.mark.parametrize("reml", [True, False])
def test_deviance_and_estimates_at_theta_equal_in_memory(pair, reml):
    name, mem, ooc = pair
    d0 = ProfiledDeviance(mem.spec, mem.crossprods, reml=reml)
    d1 = ProfiledDeviance(ooc.spec, ooc.crossprods, reml=reml)
    rng = np.random.default_rng(3)
    for theta in [mem.spec.theta_start, mem.spec.theta_start * 0.6 + 0.1 * rng.random(mem.spec.n_theta)]:
        f0, f1 = d0.factor(theta), d1.factor(theta)
        assert abs(d1.objective(f1) - d0.objective(f0)) <= RTOL * abs(d0.objective(f0))
        e0, e1 = compute_estimates(d0, f0), compute_estimates(d1, f1)
        assert_close(e1.beta, e0.beta, f"{name} beta")
        assert abs(e1.sigma - e0.sigma) <= RTOL * e0.sigma
        assert_close(e1.vcov_beta, e0.vcov_beta, f"{name} vcov")
        for b1, b0 in zip(e1.b, e0.b):
            assert_close(b1, b0, f"{name} b", rtol=1e-9)
        for v1, v0 in zip(e1.b_condvar, e0.b_condvar):
            assert_close(v1, v0, f"{name} condVar")


def test_reml_fit_matches_and_per_row_outputs_refuse(pair):
    name, mem, ooc = pair
    r0, r1 = mem.fit(method="reml"), ooc.fit(method="reml")
    assert abs(r1.objective - r0.objective) <= 1e-10 * abs(r0.objective)
    np.testing.assert_allclose(r1.theta, r0.theta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r1.fixef, r0.fixef, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(r1.fixef_se, r0.fixef_se, rtol=1e-5)
    np.testing.assert_allclose(r1.varcorr["sdcor"], r0.varcorr["sdcor"], rtol=1e-4, atol=1e-5)
    rt0, rt1 = r0.ranef_table(), r1.ranef_table()
    assert rt1[["grpvar", "term", "grp"]].equals(rt0[["grpvar", "term", "grp"]])
    np.testing.assert_allclose(rt1["condsd"], rt0["condsd"], rtol=1e-4, atol=1e-6)
    with pytest.raises(DataError, match="rows in memory"):
        r1.fitted
    with pytest.raises(DataError, match="rows in memory"):
        r1.residuals
    text = str(r1.summary())
    assert "not computed (fitted out of memory" in text and f"Number of obs: {mem.spec.n_obs}" in text
    assert r1.to_dict()["nobs"] == mem.spec.n_obs


def test_moments_combine_exactly():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(1000, 3)) * [1, 1e-3, 50] + [1e4, 0, -3]
    parts = [Moments.of(v[i:j]) for i, j in [(0, 1), (1, 400), (400, 400), (400, 1000)]]
    total = parts[0]
    for p in parts[1:]:
        total = total.combine(p)
    assert total.n == 1000
    np.testing.assert_allclose(total.mean, v.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(total.std, v.std(axis=0), rtol=1e-11)
    np.testing.assert_array_equal(total.max_abs, np.abs(v).max(axis=0))
    np.testing.assert_array_equal(total.minimum, v.min(axis=0))


def test_parquet_glob_and_folder(tmp_path):
    df = load_dataset("sleepstudy")
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), 3)):
        df.iloc[chunk].to_parquet(tmp_path / f"part{i}.parquet")
    f = "Reaction ~ Days + (Days | Subject)"
    mem = Model(f, df)
    assert is_parquet_source(str(tmp_path / "*.parquet")) and is_parquet_source(tmp_path)
    for source in (str(tmp_path / "*.parquet"), str(tmp_path)):
        ooc = Model(f, source)
        assert ooc.spec.blocks[0].levels == mem.spec.blocks[0].levels
        assert_close(ooc.crossprods.Arr, mem.crossprods.Arr, "parquet Arr")
        assert_close(ooc.crossprods.B, mem.crossprods.B, "parquet B")
    with pytest.raises(DataError, match="no such Parquet"):
        Model(f, str(tmp_path / "absent.parquet"))


def test_missing_values_raise_or_drop_like_in_memory():
    df = simulated_factors(600)
    df.loc[[5, 17, 300], "x"] = np.nan
    df.loc[[17, 401], "b"] = np.nan
    df.loc[44, "y"] = np.inf
    ddf = dd.from_pandas(df, npartitions=4)
    f = "y ~ x + (1 | a) + (1 | b)"
    with pytest.raises(DataError) as e_mem:
        Model(f, df)
    with pytest.raises(DataError) as e_ooc:
        Model(f, ddf)
    assert str(e_ooc.value) == str(e_mem.value)
    with pytest.warns(UserWarning, match="dropped 5 of 600 rows"):
        mem = Model(f, df, missing="drop")
    with pytest.warns(UserWarning, match="dropped 5 of 600 rows"):
        ooc = Model(f, ddf, missing="drop")
    assert ooc.spec.notes == mem.spec.notes and ooc.spec.n_obs == 595
    assert ooc.spec.blocks[1].levels == mem.spec.blocks[1].levels  # b's levels: floats made integers
    assert_close(ooc.crossprods.Arr, mem.crossprods.Arr, "dropped Arr")


def test_rank_deficient_columns_dropped_like_in_memory():
    df = simulated_factors(500)
    df["x2"] = 2 * df["x"] - 1
    ddf = dd.from_pandas(df, npartitions=3)
    f = "y ~ x + x2 + f + (1 | a)"
    with pytest.warns(UserWarning, match="rank deficient so dropping 1 column: \\['x2'\\]"):
        mem = Model(f, df)
    with pytest.warns(UserWarning, match="rank deficient so dropping 1 column: \\['x2'\\]"):
        ooc = Model(f, ddf)
    assert ooc.spec.fixed_names == mem.spec.fixed_names and ooc.spec.dropped_fixed == ("x2",)
    assert_close(ooc.crossprods.Arr, mem.crossprods.Arr, "rank-deficient Arr")
    with pytest.raises(ModelError, match="rank deficient: \\['x2'\\]"):
        Model(f, ddf, rank_deficient="error")


def test_bad_input_is_named():
    df = simulated_factors(400)
    ddf = dd.from_pandas(df, npartitions=2)
    with pytest.raises(FormulaError, match="center\\(\\) computes its parameters"):
        Model("y ~ center(x) + (1 | a)", ddf)
    with pytest.raises(FormulaError, match="must wrap a column name"):
        Model("y ~ C(np.round(x)) + (1 | a)", ddf)
    with pytest.raises(DataError, match="unknown column 'xx'.*Did you mean 'x'"):
        Model("y ~ xx + (1 | a)", ddf)
    with pytest.raises(DataError, match="response 'f' is not numeric"):
        Model("f ~ x + (1 | a)", ddf)
    const = df.assign(y=3.0)
    with pytest.raises(DataError, match="constant"):
        Model("y ~ x + (1 | a)", dd.from_pandas(const, npartitions=2))
    with pytest.raises(ModelError, match="only one level"):
        Model("y ~ x + (1 | one)", dd.from_pandas(df.assign(one="k"), npartitions=2))
    with pytest.raises(DataError, match="data is empty"):
        Model("y ~ x + (1 | a)", dd.from_pandas(df.iloc[:0], npartitions=1))
    ooc = Model("y ~ x + (1 | a)", ddf)
    with pytest.raises(DataError, match="explicit parameterisation .* needs the data's rows"):
        ooc.fit(method="nuts", route="graph-explicit")
    with pytest.raises(DataError, match="prior predictive"):
        ooc.prior_predictive()


def test_numeric_C_term_with_levels_missing_from_partitions():
    df = simulated_factors(900).sort_values("c", kind="stable").reset_index(drop=True)
    f = "y ~ x + C(c) + (1 | a)"
    mem = Model(f, df)
    ooc = Model(f, dd.from_pandas(df, npartitions=5))  # most partitions hold one value of c
    assert ooc.spec.fixed_names == mem.spec.fixed_names == ("(Intercept)", "x", "C(c)[1]", "C(c)[2]")
    assert_close(ooc.crossprods.Arr, mem.crossprods.Arr, "C(c) Arr")


def test_cli_reads_parquet_through_dask(tmp_path, capsys):
    df = load_dataset("sleepstudy")
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), 2)):
        df.iloc[chunk].to_parquet(tmp_path / f"p{i}.parquet")
    rc = cli_main(["fit", str(tmp_path / "*.parquet"), "Reaction ~ Days + (Days | Subject)"])
    out = capsys.readouterr().out
    assert rc == 0 and "REML criterion at convergence: 1743.6283" in out and "not computed" in out
    rc = cli_main(["fit", str(tmp_path / "p0.parquet"), "Reaction ~ Days + (Days | Subject)", "--dask"])
    out = capsys.readouterr().out
    assert rc == 0 and "fitted out of memory" in out and "Number of obs: 90" in out


@pytest.fixture(scope="module")
def nuts_pair():
    df = load_dataset("sleepstudy")
    f = "Reaction ~ Days + (Days | Subject)"
    kw = dict(method="nuts", draws=300, tune=300, chains=2, random_seed=5, progressbar=False, warn=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mem = Model(f, df).fit(**kw)
        ooc = Model(f, dd.from_pandas(df, npartitions=3)).fit(**{**kw, "warn": True})
    return mem, ooc, [str(w.message) for w in caught]


def test_nuts_collapsed_out_of_core(nuts_pair):
    mem, ooc, caught = nuts_pair
    groups = set(ooc.idata.children)
    assert "posterior" in groups and "log_likelihood" not in groups
    assert all("obs" not in ooc.idata[g].dims for g in groups), "no per-row arrays out of memory"
    assert "obs" in mem.idata["observed_data"].dims and "log_likelihood" in mem.idata.children
    post0, post1 = mem.idata["posterior"], ooc.idata["posterior"]
    assert post1["Subject"].shape == post0["Subject"].shape == (2, 300, 18, 2)
    # the same model: posterior means agree within Monte Carlo error
    for var in ("beta", "sigma", "Subject_sd"):
        a, b = post1[var].to_numpy(), post0[var].to_numpy()
        se = np.sqrt(a.var(axis=(0, 1)) / 100 + b.var(axis=(0, 1)) / 100)  # ESS ≥ 100 per fit
        assert np.all(np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))) < 5 * se), var
    assert any("pointwise log-likelihood and the observed_data" in m for m in caught)
    with pytest.raises(DataError, match="pointwise log-likelihood"):
        Model("Reaction ~ Days + (Days | Subject)", dd.from_pandas(load_dataset("sleepstudy"), npartitions=2)).fit(
            method="nuts", log_likelihood=True)


def _pickling_scheduler(dsk, keys, **kwargs):
    """Dask's synchronous scheduler on a graph sent through cloudpickle, as a distributed.Client sends it."""
    import cloudpickle
    import dask.local

    return dask.local.get_sync(cloudpickle.loads(cloudpickle.dumps(dsk)), keys, **kwargs)


@pytest.mark.parametrize("scheduler", [
    pytest.param(_pickling_scheduler, id="pickled-graph"),
    pytest.param("processes", id="processes", marks=pytest.mark.slow),  # ~10 s: two workers import bayeslmm
])
def test_runs_on_other_schedulers(scheduler):
    """The graph travels (what a distributed.Client needs) and gives the same blocks."""
    import dask

    df = simulated_factors(800)
    f = "y ~ x + f + (1 + x | a) + (1 | b)"
    mem = Model(f, df)
    with dask.config.set(scheduler=scheduler, num_workers=2):
        ooc = Model(f, dd.from_pandas(df, npartitions=3))
    assert_close(ooc.crossprods.Arr, mem.crossprods.Arr, "scheduler Arr")
    assert_close(ooc.crossprods.B, mem.crossprods.B, "scheduler B")


def test_bracket_glob_is_expanded(tmp_path):
    df = load_dataset("sleepstudy")
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), 4)):
        df.iloc[chunk].to_parquet(tmp_path / f"part{i}.parquet")
    ooc = Model("Reaction ~ Days + (1 | Subject)", str(tmp_path / "part[0-1].parquet"))
    assert ooc.spec.n_obs == 90
    with pytest.raises(DataError, match="no Parquet file matches"):
        Model("Reaction ~ Days + (1 | Subject)", str(tmp_path / "nothing*.parquet"))


def test_row_level_tools_refuse_an_out_of_core_fit_clearly():
    """The pooling table and a group's marginal covariance need rows: a DataError, not n = 0 or 0×0."""
    import dask.dataframe as dd

    import bayeslmm
    from bayeslmm.datasets import load_dataset
    from bayeslmm.errors import DataError

    ddf = dd.from_pandas(load_dataset("sleepstudy"), npartitions=3)
    fit = bayeslmm.Model("Reaction ~ Days + (Days | Subject)", ddf).fit()
    with pytest.raises(DataError, match="pooling table .* needs the data's rows in memory"):
        bayeslmm.pooling_table(fit)
    with pytest.raises(DataError, match="marginal covariance .* needs the data's rows"):
        fit.marginal_covariance("308")
