"""Each fit writes and reads its own record; ``load`` picks the class by the record's kind;
the container (:mod:`bayeslmm.store`) knows no fit.

Files saved before this split load unchanged: tests/workflow/test_io.py and
test_io_faults.py cover the format itself.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

import bayeslmm.io
from bayeslmm import DataError, load
from bayeslmm.bayes import naming
from bayeslmm.bayes.priors import Prior, PriorSet, resolve_priors
from bayeslmm.bayes.results import BayesFit
from bayeslmm.reml.results import FreqFit

ROOT = Path(__file__).resolve().parents[2]


def json_trip(record: dict) -> dict:
    """The record as a file gives it back (JSON keeps floats' shortest round-trip repr)."""
    return json.loads(json.dumps(record, allow_nan=True))


@pytest.fixture(scope="module")
def reml_fit(sleep_model):
    return sleep_model.fit(method="reml")


def synthetic_bayes_fit(spec, seed: int = 0) -> BayesFit:
    """A BayesFit of sleepstudy's model with made-up draws: its record does not depend on how they were drawn."""
    rng = np.random.default_rng(seed)
    C, D = 2, 5
    (name,), block = naming.block_names(spec), spec.blocks[0]
    corr = naming.corr_data(name, block.columns, rng.uniform(-0.5, 0.5, (C, D, 1)))
    post = xr.Dataset(
        {"beta": (("chain", "draw", "coef"), rng.normal(size=(C, D, spec.n_fixed))),
         "sigma": (("chain", "draw"), rng.uniform(20, 30, (C, D))),
         naming.sd_var(name): (("chain", "draw", naming.effect_dim(name)), rng.uniform(1, 30, (C, D, block.q))),
         name: (("chain", "draw", naming.level_dim(name), naming.effect_dim(name)),
                rng.normal(size=(C, D, block.n_levels, block.q))),
         **corr[0]},
        coords={"coef": list(spec.fixed_names), naming.effect_dim(name): list(block.columns),
                naming.level_dim(name): list(block.levels), **corr[1]})
    obs = np.arange(spec.n_obs)
    idata = xr.DataTree.from_dict({
        "/posterior": post,
        "/sample_stats": xr.Dataset({"diverging": (("chain", "draw"), np.zeros((C, D), dtype=bool))}),
        "/observed_data": xr.Dataset({"y": ("obs", spec.y)}, coords={"obs": obs}),
        "/constant_data": xr.Dataset({"X": (("obs", "coef"), spec.X)}, coords={"obs": obs,
                                                                              "coef": list(spec.fixed_names)}),
    })
    priors = resolve_priors(spec, {"Days": Prior("Normal", mu=0, sigma=20.5),
                                   "Subject": {"sd": Prior("HalfNormal", sigma=[40, 12]), "eta": 2.0}})
    return BayesFit(spec=spec, idata=idata, priors=priors, names=[name], parameterization="collapsed",
                    sampler="nutpie", seed=17, data_name="sleepstudy", timings={"sample": 1.25})


# -- each class round-trips its own record ---------------------------------------------------------
def test_a_freq_fit_round_trips_its_record(reml_fit):
    record, groups = reml_fit.to_record()
    assert record["kind"] == "FreqFit" and groups == {}
    back = FreqFit.from_record(json_trip(record), reml_fit.spec, groups)
    for f in dataclasses.fields(FreqFit):
        if f.name not in ("theta", "estimates", "optimization"):
            assert getattr(back, f.name) == getattr(reml_fit, f.name), f.name
    np.testing.assert_array_equal(back.theta, reml_fit.theta)       # bit for bit through JSON
    for a, b in [(back.estimates.beta, reml_fit.estimates.beta), (back.estimates.fitted, reml_fit.estimates.fitted),
                 (back.estimates.b[0], reml_fit.estimates.b[0]), (back.estimates.b_condvar[0],
                                                                  reml_fit.estimates.b_condvar[0])]:
        np.testing.assert_array_equal(a, b)   # the same route at the same θ: the same numbers
    ob, oa = back.optimization, reml_fit.optimization
    assert (ob.optimizer, ob.objective, ob.n_evaluations, ob.tolerances, ob.message, ob.warnings, ob.seconds) == \
        (oa.optimizer, oa.objective, oa.n_evaluations, oa.tolerances, oa.message, oa.warnings, oa.seconds)
    assert back.to_record()[0] == record


def test_a_freq_record_with_another_objective_is_refused(reml_fit):
    record = json_trip(reml_fit.to_record()[0])
    record["objective"] += 1e-3   # sleepstudy's REML criterion is 1743.6: 1e-3 is 6e-7 relative, > the 1e-8 allowed
    with pytest.raises(DataError, match=r"fit\.nc: the stored data give the objective .* not the saved"):
        FreqFit.from_record(record, reml_fit.spec, {}, "fit.nc")


def test_a_bayes_fit_round_trips_its_record(sleep_model):
    fit = synthetic_bayes_fit(sleep_model.spec)
    record, groups = fit.to_record()
    assert record["kind"] == "BayesFit" and set(groups) == set(fit.idata.children)
    back = BayesFit.from_record(json_trip(record), fit.spec, groups)
    for name in ("names", "parameterization", "sampler", "seed", "data_name", "timings", "spec"):
        assert getattr(back, name) == getattr(fit, name), name
    for group in fit.idata.children:
        xr.testing.assert_identical(back.idata[group].to_dataset(), fit.idata[group].to_dataset())
    assert back.priors.to_record() == fit.priors.to_record()
    assert isinstance(back.priors.blocks[0].sd.params["sigma"], np.ndarray)   # dtypes come back as saved
    assert back.to_record()[0] == record


def test_a_bayes_record_whose_draws_are_not_of_the_data_is_refused(sleep_model):
    fit = synthetic_bayes_fit(sleep_model.spec)
    record, groups = fit.to_record()
    groups["observed_data"] = groups["observed_data"].assign(y=groups["observed_data"]["y"] + 1.0)
    with pytest.raises(DataError, match=r"fit\.nc: the y rebuilt from the stored data differs"):
        BayesFit.from_record(record, fit.spec, groups, "fit.nc")
    record, groups = fit.to_record()
    with pytest.raises(DataError, match=r"the groups \['sample_stats'\] of the saved posterior are missing"):
        BayesFit.from_record(record, fit.spec, {k: v for k, v in groups.items() if k != "sample_stats"}, "fit.nc")


def test_priors_round_trip_their_record_and_are_checked_against_the_model(sleep_model):
    priors = synthetic_bayes_fit(sleep_model.spec).priors
    record = json_trip(priors.to_record())
    back = PriorSet.from_record(record, sleep_model.spec)
    assert back.to_record() == priors.to_record()
    np.testing.assert_array_equal(back.x_means, priors.x_means)
    record["blocks"][0]["sd"]["params"]["sigma"]["ndarray"] = [40.0, 12.0, 3.0]
    with pytest.raises(DataError, match=r"x\.nc: the stored priors are not ones a fit accepts: prior for Subject "
                                        r"sd: parameter sigma has shape \(3,\), not \(2,\)"):
        PriorSet.from_record(record, sleep_model.spec, "x.nc")


# -- load dispatches on the record's kind -----------------------------------------------------------
def test_load_dispatches_by_the_records_kind_through_the_registry(reml_fit, tmp_path, monkeypatch):
    path = reml_fit.save(tmp_path / "fit.nc")

    @dataclasses.dataclass(frozen=True, eq=False)
    class OtherFreqFit(FreqFit):
        pass

    monkeypatch.setattr(bayeslmm.io, "record_classes", lambda: {"FreqFit": OtherFreqFit})
    assert type(load(path)) is OtherFreqFit   # the class the kind names, whatever class saved it


def test_a_record_of_an_unknown_kind_is_a_clear_data_error(reml_fit, tmp_path):
    path = reml_fit.save(tmp_path / "fit.nc")
    with h5py.File(path, "r+") as fh:
        record = json.loads(fh.attrs["bayeslmm_record"])
        record["kind"] = "GlmmFit"
        fh.attrs["bayeslmm_record"] = json.dumps(record)
    with pytest.raises(DataError, match=r"fit\.nc: unknown kind of fit 'GlmmFit'; this bayeslmm reads "
                                        r"\['BayesFit', 'FreqFit'\]"):
        load(path)


def test_save_fit_is_the_fits_own_save(reml_fit, tmp_path):
    path = bayeslmm.io.save_fit(reml_fit, tmp_path / "fit.nc")
    assert type(load(path)) is FreqFit
    with pytest.raises(bayeslmm.BayesLMMError, match="save expects a FreqFit or a BayesFit, got dict"):
        bayeslmm.io.save_fit({}, tmp_path / "other.nc")


# -- the store sits below the results ------------------------------------------------------------------
def test_the_store_imports_no_results_or_engine_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    edges = tool.graph(ROOT)
    # every import, deferred ones included: errors, the version, and the formula (to rebuild the spec)
    assert set(edges["bayeslmm.store"]) <= {"bayeslmm.errors", "bayeslmm.version", "bayeslmm.formula"}
    assert "bayeslmm" not in edges["bayeslmm.version"] and not edges["bayeslmm.version"]
    code = ("import sys, bayeslmm.store; print(sorted(m for m in sys.modules if m.startswith(('bayeslmm.reml', "
            "'bayeslmm.bayes', 'bayeslmm.io', 'bayeslmm.model', 'bayeslmm.crossprod', 'bayeslmm.exactfit'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
