"""fit.save(path) / bayeslmm.load(path): every number of a reloaded fit equals the saved fit's."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import bayeslmm
from bayeslmm import DataError, Model, Prior, load
from bayeslmm.bayes.results import BayesFit
from bayeslmm.errors import BayesLMMError
from bayeslmm.io import FORMAT_VERSION, decode_frame, encode_frame, save_fit
from bayeslmm.reml.results import FreqFit

HAVE_H5PY = importlib.util.find_spec("h5py") is not None   # h5netcdf writes netCDF through it
needs_h5py = pytest.mark.skipif(not HAVE_H5PY, reason="h5py is not installed: netCDF files cannot be written")
#: the format of the tests that are not about one format
EXT = ".nc" if HAVE_H5PY else ".zarr"
FORMATS = [pytest.param("fit.nc", marks=needs_h5py), "fit.zarr"]
RTOL = 1e-12


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=RTOL, atol=0)


def frames_close(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=RTOL, atol=0)


def assert_spec_equal(a, b):
    assert a.formula == b.formula and a.response == b.response
    assert a.fixed_names == b.fixed_names and a.dropped_fixed == b.dropped_fixed
    assert a.notes == b.notes and a.missing == b.missing and a.rank_deficient == b.rank_deficient
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.row_index, b.row_index)
    assert len(a.blocks) == len(b.blocks)
    for x, y in zip(a.blocks, b.blocks):
        assert (x.group, x.levels, x.columns, x.correlated) == (y.group, y.levels, y.columns, y.correlated)
        np.testing.assert_array_equal(x.codes, y.codes)
        np.testing.assert_array_equal(x.Z, y.Z)
    pd.testing.assert_frame_equal(a.data, b.data, check_exact=True)


def assert_freq_equal(a: FreqFit, b: FreqFit):
    assert type(b) is FreqFit
    assert_spec_equal(a.spec, b.spec)
    assert b.method == a.method and b.data_name == a.data_name
    np.testing.assert_array_equal(a.theta, b.theta)
    assert b.objective == a.objective and b.loglik == a.loglik and b.aic == a.aic and b.bic == a.bic
    close(a.sigma, b.sigma)
    close(a.fixef, b.fixef)
    close(a.fixef_se, b.fixef_se)
    frames_close(a.vcov, b.vcov)
    frames_close(a.varcorr, b.varcorr)
    for g in a.ranef():
        frames_close(a.ranef()[g], b.ranef()[g])
        frames_close(a.coef()[g], b.coef()[g])
    frames_close(a.ranef_table(), b.ranef_table())          # conditional sds (condVar)
    for x, y in zip(a.estimates.b_condvar, b.estimates.b_condvar):
        close(x, y)
    pd.testing.assert_series_equal(a.fitted, b.fitted, check_exact=False, rtol=RTOL, atol=0)
    pd.testing.assert_series_equal(a.residuals, b.residuals, check_exact=False, rtol=RTOL, atol=0)
    assert b.singular == a.singular
    oa, ob = a.optimization, b.optimization
    assert (ob.optimizer, ob.objective, ob.n_evaluations, ob.tolerances, ob.message, ob.warnings, ob.seconds) == \
        (oa.optimizer, oa.objective, oa.n_evaluations, oa.tolerances, oa.message, oa.warnings, oa.seconds)
    np.testing.assert_array_equal(oa.start, ob.start)
    np.testing.assert_array_equal(oa.end, ob.end)
    assert str(b.summary()) == str(a.summary())
    assert b.to_dict() == a.to_dict()


def assert_priors_equal(a, b):
    assert a.centred == b.centred
    np.testing.assert_array_equal(a.x_means, b.x_means)
    pairs = list(zip(a.beta, b.beta)) + [(a.sigma, b.sigma)] + [(x.sd, y.sd) for x, y in zip(a.blocks, b.blocks)]
    assert [x.eta for x in a.blocks] == [y.eta for y in b.blocks]
    for p, q in pairs:
        assert p.family == q.family and set(p.params) == set(q.params)
        for k in p.params:
            assert type(p.params[k]) is type(q.params[k]), k
            np.testing.assert_array_equal(p.params[k], q.params[k])


def assert_bayes_equal(a: BayesFit, b: BayesFit):
    assert type(b) is BayesFit
    assert_spec_equal(a.spec, b.spec)
    assert (b.names, b.parameterization, b.sampler, b.seed, b.data_name, b.timings) == \
        (a.names, a.parameterization, a.sampler, a.seed, a.data_name, a.timings)
    assert_priors_equal(a.priors, b.priors)
    assert list(b.idata.children) == list(a.idata.children)
    for g in a.idata.children:
        xr.testing.assert_identical(a.idata[g].to_dataset(), b.idata[g].to_dataset())
        for v in a.idata[g].dataset.variables:
            assert a.idata[g].dataset[v].dtype == b.idata[g].dataset[v].dtype, (g, v)
    frames_close(a.fixef_table(), b.fixef_table())
    frames_close(a.fixef_table(ci_prob=0.5), b.fixef_table(ci_prob=0.5))
    frames_close(a.varcorr_table(), b.varcorr_table())
    for name in a.ranef():
        frames_close(a.ranef()[name], b.ranef()[name])
    frames_close(a.ranef_table(), b.ranef_table())
    frames_close(a.summary_table(), b.summary_table())
    pd.testing.assert_frame_equal(a.prior_summary(), b.prior_summary())
    da, db = a.diagnostics(), b.diagnostics()
    assert (da.divergences, da.max_treedepth_hits, da.messages) == (db.divergences, db.max_treedepth_hits, db.messages)
    np.testing.assert_array_equal(da.ebfmi, db.ebfmi)
    for x, y in [(da.max_rhat, db.max_rhat), (da.min_ess_bulk, db.min_ess_bulk), (da.min_ess_tail, db.min_ess_tail)]:
        assert x == y or (np.isnan(x) and np.isnan(y))
    assert str(b.summary()) == str(a.summary())
    assert b.summary()._repr_html_() == a.summary()._repr_html_()
    assert json.dumps(b.to_dict(), sort_keys=True) == json.dumps(a.to_dict(), sort_keys=True)


# -- fits shared by the tests (sleep_model is conftest's) -------------------------------------
@pytest.fixture(scope="module")
def reml_fit(sleep_model):
    return sleep_model.fit(method="reml")


@pytest.fixture(scope="module")
def bayes_fit(sleep_model):
    # nutpie on the compiled kernel (sampler="auto"); the priors' parameters are floats, an int and an array
    priors = {"Days": Prior("Normal", mu=0, sigma=20.5), "sigma": Prior("HalfStudentT", nu=3, sigma=40),
              "Subject": {"sd": Prior("HalfNormal", sigma=[40, 12]), "eta": 2.0}}
    return sleep_model.fit(method="nuts", draws=150, tune=150, chains=2, random_seed=11,
                           priors=priors, progressbar=False, warn=False)


def awkward_frame(seed: int = 3) -> pd.DataFrame:
    """Data that exercise every kind of column: strings (pandas' str and object), a categorical
    whose categories are not in alphabetical order, booleans, small ints, a string row index,
    missing values (dropped) and a collinear column (dropped)."""
    rng = np.random.default_rng(seed)
    n = 160
    g = np.array([f"school {k:02d}" for k in rng.integers(0, 12, n)])
    h = pd.Categorical(rng.choice(["zeta", "alpha", "mu", "kappa"], n), categories=["zeta", "alpha", "mu", "kappa"])
    x = rng.normal(size=n)
    f = pd.Categorical(rng.choice(["low", "mid", "high"], n), categories=["low", "mid", "high"], ordered=False)
    k = rng.integers(0, 5, n).astype(np.int16)
    o = np.array([f"rater-{j}" for j in rng.integers(0, 6, n)], dtype=object)
    ge = {lv: rng.normal(scale=1.0) for lv in np.unique(g)}
    y = 2 + 0.5 * x + 0.3 * k + np.array([ge[v] for v in g]) + rng.normal(scale=0.7, size=n)
    y[[4, 50]] = np.nan
    index = pd.Index([f"r{i:03d}" for i in range(n)], name="rowid")
    df = pd.DataFrame({"y": y, "x": x, "x2": 2 * x, "f": f, "k": k, "g": pd.array(g, dtype="str"), "h": h,
                       "o": pd.Series(o, dtype=object, index=index), "unused": "dropped from spec.data"},
                      index=index)
    df.loc["r007", "x"] = np.nan
    df.loc["r008", "x2"] = np.nan
    return df


AWKWARD_FORMULA = "y ~ x + x2 + f + k + (1 + x || g) + (1 | h) + (1 | o)"


@pytest.fixture(scope="module")
def awkward_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the dropped rows and the collinear column are warned about
        model = Model(AWKWARD_FORMULA, awkward_frame(), missing="drop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(method="reml")


# -- REML / ML ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_reml_fit_round_trips_to_identical_numbers(reml_fit, tmp_path, name):
    written = reml_fit.save(tmp_path / name)
    assert written == tmp_path / name and written.exists()
    assert_freq_equal(reml_fit, load(written))


def test_ml_fit_round_trips(sleep_model, tmp_path):
    ml = sleep_model.fit(method="ml")
    ml.save(tmp_path / f"ml{EXT}")
    back = bayeslmm.load(str(tmp_path / f"ml{EXT}"))
    assert back.method == "ML"
    assert_freq_equal(ml, back)


def test_awkward_data_keep_dtypes_index_notes_and_numbers(awkward_fit, tmp_path):
    spec = awkward_fit.spec
    assert spec.dropped_fixed == ("x2",) and len(spec.notes) == 2 and spec.n_obs == 156
    assert [(b.group, b.correlated) for b in spec.blocks] == [("g", False), ("o", True), ("h", True)]
    awkward_fit.save(tmp_path / f"awkward{EXT}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # loading re-warns nothing: the notes come back as they were
        back = load(tmp_path / f"awkward{EXT}")
    assert_freq_equal(awkward_fit, back)
    data = back.spec.data
    assert list(data.columns) == ["y", "x", "x2", "f", "k", "g", "h", "o"]
    assert data.index.name == "rowid" and data.index[0] == "r000"
    assert data["h"].cat.categories.tolist() == ["zeta", "alpha", "mu", "kappa"]
    assert str(data["k"].dtype) == "int16" and data["o"].dtype == object and data["g"].dtype == spec.data["g"].dtype
    # the reloaded fit's contrasts still use the categorical's order ("low" is the reference)
    assert [n for n in back.spec.fixed_names if n.startswith("f")] == ["f[mid]", "f[high]"]


# -- Bayesian ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_bayes_fit_round_trips(bayes_fit, tmp_path, name):
    bayes_fit.save(tmp_path / name)
    back = load(tmp_path / name)
    assert_bayes_equal(bayes_fit, back)
    assert back.prior_summary()["prior"].tolist()[1:3] == ["Normal(mu=0, sigma=20.5)", "HalfStudentT(nu=3, sigma=40)"]
    assert type(back.priors.sigma.params["nu"]) is int


def test_bayes_fit_with_added_groups_and_object_arrays(bayes_fit, tmp_path):
    """Extra groups (posterior predictive draws) and object arrays with gaps (as nutpie's
    divergence messages) round-trip exactly, gaps included."""
    idata = bayes_fit.idata.copy()
    stats = idata["sample_stats"].to_dataset()
    msg = np.full(stats["diverging"].shape, None, dtype=object)
    msg[0, 3] = "divergence at step 3: energy error 1234.5"
    stats["divergence_message"] = (("chain", "draw"), msg)
    idata["sample_stats"] = xr.DataTree(stats)
    rng = np.random.default_rng(0)
    idata["posterior_predictive"] = xr.DataTree(xr.Dataset(
        {"y": (("chain", "draw", "obs"), rng.normal(size=(2, 150, bayes_fit.spec.n_obs)))}))
    fit = dataclasses.replace(bayes_fit, idata=idata)
    fit.save(tmp_path / f"extra{EXT}")
    back = load(tmp_path / f"extra{EXT}")
    assert "posterior_predictive" in back.idata.children
    got = back.idata["sample_stats"].dataset["divergence_message"].values
    gaps = [isinstance(v, float) and np.isnan(v) for v in got.ravel()]   # xarray holds None as NaN
    assert got.dtype == object and got[0, 3] == msg[0, 3] and sum(gaps) == msg.size - 1
    assert_bayes_equal(fit, back)


def test_loaded_bayes_fit_predicts_like_the_original(bayes_fit, tmp_path):
    if not hasattr(BayesFit, "predict"):
        pytest.skip("BayesFit.predict is not there yet")
    bayes_fit.save(tmp_path / f"p{EXT}")
    back = load(tmp_path / f"p{EXT}")
    new = pd.DataFrame({"Days": [0, 4.5, 9], "Subject": pd.Categorical(["308", "333", "new subject"])})
    for kw in [{}, {"kind": "marginal"}, {"newdata": new}, {"newdata": new, "new_groups": "sample"},
               {"newdata": new, "predictive": True, "random_seed": 5}]:
        frames_close(bayes_fit.predict(**kw), back.predict(**kw))
    np.testing.assert_array_equal(bayes_fit.posterior_predictive().values, back.posterior_predictive().values)


def test_loaded_reml_fit_predicts_like_the_original(reml_fit, tmp_path):
    if not hasattr(FreqFit, "predict"):
        pytest.skip("FreqFit.predict is not there yet")
    reml_fit.save(tmp_path / f"p{EXT}")
    back = load(tmp_path / f"p{EXT}")
    new = pd.DataFrame({"Days": [0, 4.5, 9], "Subject": ["308", "333", "new subject"]})
    for kw in [{}, {"kind": "marginal"}, {"newdata": new}]:
        pd.testing.assert_series_equal(reml_fit.predict(**kw), back.predict(**kw), check_exact=False, rtol=RTOL)


def _pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def test_loaded_fits_plot_like_the_originals(bayes_fit, reml_fit, tmp_path):
    plots = pytest.importorskip("bayeslmm.plots")
    bayes_fit.save(tmp_path / f"b{EXT}")
    reml_fit.save(tmp_path / f"r{EXT}")
    b2, r2 = load(tmp_path / f"b{EXT}"), load(tmp_path / f"r{EXT}")
    for draw in (lambda b, r: plots.caterpillar_plot(b), lambda b, r: plots.variance_plot(b, r),
                 lambda b, r: plots.caterpillar_plot(r), lambda b, r: plots.shrinkage_plot(r),
                 lambda b, r: plots.shrinkage_plot(b), lambda b, r: plots.ppc_plot(b, n_draws=20, random_seed=3)):
        fig_a, fig_b = draw(bayes_fit, reml_fit), draw(b2, r2)
        fig_a = getattr(fig_a, "figure", fig_a)
        fig_b = getattr(fig_b, "figure", fig_b)
        np.testing.assert_array_equal(_pixels(fig_a), _pixels(fig_b))


# -- what a file is and is not -------------------------------------------------------------------
def test_saving_and_loading_pickle_nothing(reml_fit, bayes_fit, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("dumps", "dump", "loads", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    reml_fit.save(tmp_path / f"r{EXT}")
    bayes_fit.save(tmp_path / f"b{EXT}")
    assert type(load(tmp_path / f"r{EXT}")) is FreqFit and type(load(tmp_path / f"b{EXT}")) is BayesFit


@needs_h5py
def test_file_is_plain_netcdf_with_a_json_record(bayes_fit, tmp_path):
    bayes_fit.save(tmp_path / "b.nc")
    tree = xr.open_datatree(tmp_path / "b.nc", engine="h5netcdf")
    try:
        assert tree.attrs["bayeslmm_format"] == "bayeslmm-fit"
        assert int(tree.attrs["bayeslmm_format_version"]) == FORMAT_VERSION
        record = json.loads(tree.attrs["bayeslmm_record"])
        assert record["kind"] == "BayesFit" and record["bayeslmm_version"] == bayeslmm.__version__
        assert record["spec"]["formula"] == "Reaction ~ Days + (Days | Subject)"
        assert record["seed"] == 11 and record["sampler"] == "nutpie" and record["names"] == ["Subject"]
        assert record["priors"]["blocks"][0] == {"sd": {"family": "HalfNormal", "params": {
            "sigma": {"ndarray": [40.0, 12.0], "dtype": "float64"}}}, "eta": 2.0}
        # (posterior_predictive() of an earlier test stores its group in the fit, and so in the file)
        assert set(tree.children) - {"posterior_predictive"} == {
            "posterior", "sample_stats", "observed_data", "constant_data", "log_likelihood", "bayeslmm_data"}
        np.testing.assert_array_equal(tree["bayeslmm_data"]["c0"].values, bayes_fit.spec.data["Reaction"].to_numpy())
    finally:
        tree.close()


def test_saving_again_replaces_the_file(sleep_model, reml_fit, tmp_path):
    path = tmp_path / f"fit{EXT}"
    sleep_model.fit(method="ml").save(path)
    reml_fit.save(path)
    assert load(path).method == "REML"
    assert [p.name for p in tmp_path.iterdir()] == [f"fit{EXT}"]     # no temporary file left behind


def test_data_encoding_round_trips_every_supported_dtype():
    n = 5
    df = pd.DataFrame({
        "f64": np.linspace(0, 1, n), "f32": np.arange(n, dtype=np.float32), "u8": np.arange(n, dtype=np.uint8),
        "i64": np.arange(n) - 2, "b": np.array([True, False, True, True, False]),
        "s": pd.array(list("abcde"), dtype="str"), "obj": pd.Series(list("vwxyz"), dtype=object),
        "objint": pd.Series([1, 2, 3, 4, 5], dtype=object), "Int": pd.array([1, 2, 3, 4, 5], dtype="Int64"),
        "boolean": pd.array([True, False, True, False, True], dtype="boolean"),
        "when": pd.date_range("2024-01-01", periods=n, freq="D"), "dt": pd.to_timedelta(np.arange(n), unit="h"),
        "cat_int": pd.Categorical([3, 1, 2, 3, 1], categories=[3, 2, 1], ordered=True),
        "cat_str": pd.Categorical(["b", "a", "b", "c", "a"], categories=["c", "b", "a", "unused"]),
        "empty_str": pd.array(["", "x", "", "y", ""], dtype="str"),
    }, index=pd.MultiIndex.from_arrays([[1, 1, 2, 2, 3], list("pqrst")], names=["wave", "id"]))
    ds, meta = encode_frame(types.SimpleNamespace(data=df))
    back = decode_frame(ds, json.loads(json.dumps(meta)), "memory")
    pd.testing.assert_frame_equal(df, back, check_exact=True)
    assert [str(t) for t in back.dtypes] == [str(t) for t in df.dtypes]

    ranged = pd.DataFrame({"a": [1.0, 2.0]}, index=pd.RangeIndex(10, 14, 2, name="r"))
    ds, meta = encode_frame(types.SimpleNamespace(data=ranged))
    out = decode_frame(ds, meta, "memory")
    assert isinstance(out.index, pd.RangeIndex)
    pd.testing.assert_frame_equal(ranged, out, check_exact=True)


# -- errors ----------------------------------------------------------------------------------------
def test_missing_file_is_a_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=r"no-such-fit\.nc.*no such file"):
        load(tmp_path / "no-such-fit.nc")


def test_a_file_that_is_not_a_save_is_refused(tmp_path):
    text = tmp_path / "notes.nc"
    text.write_text("Reaction ~ Days\n")
    with pytest.raises(DataError, match=r"notes\.nc.*not a netCDF-4 file.*not a bayeslmm save"):
        load(text)
    if HAVE_H5PY:
        other = tmp_path / "other.nc"
        xr.Dataset({"a": ("x", np.arange(3.0))}).to_netcdf(other, engine="h5netcdf")
        with pytest.raises(DataError, match=r"other\.nc.*not a bayeslmm save"):
            load(other)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder.*not a zarr store"):
        load(folder)
    plain_zarr = tmp_path / "plain.zarr"
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(plain_zarr, consolidated=False)
    with pytest.raises(DataError, match=r"plain\.zarr.*not a bayeslmm save"):
        load(plain_zarr)


@needs_h5py
def test_a_truncated_file_is_a_data_error(reml_fit, tmp_path):
    path = tmp_path / "cut.nc"
    reml_fit.save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(DataError, match=r"cut\.nc.*could not be read"):
        load(path)


@needs_h5py
def test_a_damaged_record_is_a_data_error(reml_fit, tmp_path):
    import h5py

    path = tmp_path / "damaged.nc"
    reml_fit.save(path)
    with h5py.File(path, "r+") as fh:
        record = json.loads(fh.attrs["bayeslmm_record"])
        del record["data"]["columns"][0]["store"]
        fh.attrs["bayeslmm_record"] = json.dumps(record)
    with pytest.raises(DataError, match=r"damaged\.nc.*incomplete or damaged"):
        load(path)


@needs_h5py
def test_a_newer_format_version_is_refused(reml_fit, tmp_path):
    import h5py

    path = tmp_path / "future.nc"
    reml_fit.save(path)
    with h5py.File(path, "r+") as fh:
        fh.attrs["bayeslmm_format_version"] = FORMAT_VERSION + 1
    with pytest.raises(DataError, match=rf"future\.nc.*format {FORMAT_VERSION + 1}.*upgrade bayeslmm"):
        load(path)


@needs_h5py
def test_altered_data_are_detected(reml_fit, bayes_fit, tmp_path):
    import h5py

    for fit, name in [(reml_fit, "r.nc"), (bayes_fit, "b.nc")]:
        path = tmp_path / name
        fit.save(path)
        with h5py.File(path, "r+") as fh:
            fh["bayeslmm_data/c0"][3] += 1.0        # one response value
        with pytest.raises(DataError, match=rf"{name}.*(altered)"):
            load(path)


def test_bad_save_targets(reml_fit, tmp_path):
    with pytest.raises(DataError, match=r"folder .*missing-dir.* does not exist"):
        reml_fit.save(tmp_path / "missing-dir" / "fit.nc")
    with pytest.raises(DataError, match=r"is a folder"):
        reml_fit.save(tmp_path)
    (tmp_path / "taken.zarr").write_text("not a zarr folder")
    with pytest.raises(DataError, match=r"taken\.zarr.*not a zarr folder"):
        reml_fit.save(tmp_path / "taken.zarr")
    with pytest.raises(BayesLMMError, match=r"path must be a file path"):
        reml_fit.save(42)
    with pytest.raises(BayesLMMError, match=r"save expects a FreqFit or a BayesFit"):
        save_fit({"not": "a fit"}, tmp_path / "x.nc")


def test_fits_without_rows_or_with_unsupported_columns_say_why(reml_fit, tmp_path):
    no_rows = dataclasses.replace(reml_fit, spec=dataclasses.replace(reml_fit.spec, data=None))
    with pytest.raises(DataError, match=r"keeps no rows"):
        no_rows.save(tmp_path / f"x{EXT}")
    weird = reml_fit.spec.data.assign(Subject=pd.Series([("a", 1)] * reml_fit.nobs, dtype=object))
    odd = dataclasses.replace(reml_fit, spec=dataclasses.replace(reml_fit.spec, data=weird))
    with pytest.raises(DataError, match=r"column 'Subject'.*mixed or unsupported types"):
        odd.save(tmp_path / f"x{EXT}")
    assert not (tmp_path / f"x{EXT}").exists()


def test_netcdf_without_h5py_says_what_to_install(reml_fit, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)      # as if h5py were not installed
    with pytest.raises(BayesLMMError, match=r"needs the h5py package.*pip install h5py.*'\.zarr'"):
        reml_fit.save(tmp_path / "fit.nc")
    assert list(tmp_path.iterdir()) == []


def test_fields_added_to_a_fit_class_are_stored_too(reml_fit, tmp_path):
    """A field this module does not know is kept as JSON under "extra" (and ignored by a class without it)."""
    @dataclasses.dataclass(frozen=True, eq=False)
    class TaggedFit(FreqFit):
        tag: str = ""
        weights: tuple = ()

    tagged = TaggedFit(**{f.name: getattr(reml_fit, f.name) for f in dataclasses.fields(FreqFit)},
                       tag="first try", weights=(np.float64(0.5), 2))
    path = tagged.save(tmp_path / f"tagged{EXT}")
    tree = xr.open_datatree(path, engine="h5netcdf" if EXT == ".nc" else "zarr")
    try:
        assert json.loads(tree.attrs["bayeslmm_record"])["extra"] == {"tag": "first try", "weights": [0.5, 2]}
    finally:
        tree.close()
    back = load(path)
    assert type(back) is FreqFit
    assert_freq_equal(reml_fit, back)
