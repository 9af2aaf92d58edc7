"""The same random_seed gives the same draws; another seed gives other draws; a saved fit reloads
to the same numbers.

Every sampling path is covered: nutpie on the compiled collapsed kernel (what ``sampler="auto"``
picks for one grouping factor), PyMC's NUTS on both graph routes, and (slow: ~10 s of numba
compilation per fit) nutpie on the PyMC model.  Runs are tiny (50 + 50 draws): reproducibility is
about bits, not about convergence.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from bayeslmm import Model, load

DRAWS = {"draws": 50, "tune": 50, "progressbar": False, "warn": False}
#: sample statistics that are wall-clock measurements, not draws
TIMING_STATS = ("perf_counter", "process_time", "sampling_time")


@pytest.fixture(scope="module")
def model():
    return Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")


@pytest.fixture(scope="module")
def fits(model):
    """Fits made once per module and shared: ``fits(tag, **options)``; the tag tells repeats apart."""
    cache = {}

    def get(tag, **options):
        key = (tag, tuple(sorted(options.items())))
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # 50 draws are too few for the convergence checks
                cache[key] = model.fit(method="nuts", **DRAWS, **options)
        return cache[key]

    return get


def _values_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == object:     # nutpie's divergence messages: strings and None
        return all((x is None and y is None) or x == y for x, y in zip(a.ravel(), b.ravel()))
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def assert_same_draws(a, b):
    """Every posterior draw (effects included), sampler statistic and log-likelihood value is identical."""
    assert a.seed == b.seed and a.sampler == b.sampler and a.route == b.route
    for group in ("posterior", "sample_stats", "log_likelihood"):
        da, db = a.idata[group].dataset, b.idata[group].dataset
        assert sorted(da.data_vars) == sorted(db.data_vars), group
        for var in da.data_vars:
            if group == "sample_stats" and any(t in var for t in TIMING_STATS):
                continue
            assert _values_equal(da[var].values, db[var].values), f"{group}/{var} differs"


def assert_other_draws(a, b):
    post_a, post_b = a.posterior, b.posterior
    for var in ("beta", "sigma", "Subject_sd", "Subject"):
        assert not np.array_equal(post_a[var].values, post_b[var].values), var


# -- nutpie on the compiled collapsed kernel (sampler="auto") ---------------------------------------
@pytest.mark.parametrize("chains", [1, 4])
def test_kernel_same_seed_same_draws(fits, chains):
    a = fits("a", chains=chains, random_seed=2024)
    b = fits("b", chains=chains, random_seed=2024)
    assert a.sampler == "nutpie" and a.route == "one-factor"
    assert a.posterior.sizes["chain"] == chains
    assert_same_draws(a, b)


def test_kernel_threads_do_not_change_the_draws(fits):
    """Each chain has its own random stream: running the 4 chains on 2 threads changes nothing."""
    one = fits("a", chains=4, random_seed=2024)
    two = fits("threads", chains=4, random_seed=2024, cores=2)
    assert_same_draws(one, two)


def test_kernel_other_seed_other_draws(fits):
    assert_other_draws(fits("a", chains=4, random_seed=2024), fits("a", chains=4, random_seed=2025))


def test_unseeded_fit_records_the_seed_that_reproduces_it(fits):
    first = fits("unseeded", chains=2)
    assert isinstance(first.seed, int)
    again = fits("reseeded", chains=2, random_seed=first.seed)
    assert_same_draws(first, again)
    assert_other_draws(first, fits("unseeded-2", chains=2))


# -- PyMC's NUTS (one process) -----------------------------------------------------------------------
PYMC_FAST = [("graph", 4), ("graph-explicit", 1)]
PYMC_SLOW = [("graph", 1), ("graph-explicit", 4)]


def _pymc_pair(fits, route, chains):
    kw = {"sampler": "pymc", "route": route, "chains": chains, "random_seed": 7}
    return fits("a", **kw), fits("b", **kw)


@pytest.mark.parametrize("route,chains", PYMC_FAST)
def test_pymc_same_seed_same_draws(fits, route, chains):
    a, b = _pymc_pair(fits, route, chains)
    assert a.sampler == "pymc" and a.route == route
    assert a.posterior.sizes["chain"] == chains
    assert_same_draws(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("route,chains", PYMC_SLOW)
def test_pymc_same_seed_same_draws_other_combinations(fits, route, chains):
    assert_same_draws(*_pymc_pair(fits, route, chains))


def test_pymc_other_seed_other_draws(fits):
    a = fits("a", sampler="pymc", route="graph-explicit", chains=1, random_seed=7)
    assert_other_draws(a, fits("a", sampler="pymc", route="graph-explicit", chains=1, random_seed=8))


@pytest.mark.slow
def test_pymc_worker_processes_do_not_change_the_draws(fits):
    a = fits("a", sampler="pymc", route="graph", chains=4, random_seed=7)
    assert_same_draws(a, fits("procs", sampler="pymc", route="graph", chains=4, random_seed=7,
                              cores=2))


# -- nutpie on the PyMC model (numba-compiled; used for large or crossed models) ------------------------
@pytest.mark.slow
@pytest.mark.parametrize("route,chains", [("graph", 1), ("graph", 4), ("graph-explicit", 1), ("graph-explicit", 4)])
def test_nutpie_pytensor_same_seed_same_draws(fits, route, chains):
    kw = {"sampler": "nutpie", "route": route, "chains": chains, "random_seed": 31}
    a, b = fits("a", **kw), fits("b", **kw)     # chains run on min(chains, processors) threads
    assert a.route == route and a.sampler == "nutpie"
    assert_same_draws(a, b)
    if chains == 4:
        assert_other_draws(a, fits("a", **{**kw, "random_seed": 32}))


# -- saved and reloaded ----------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"chains": 4, "random_seed": 2024},
                                     {"sampler": "pymc", "route": "graph", "chains": 4,
                                      "random_seed": 7}], ids=["kernel", "pymc"])
def test_saved_fit_reloads_to_the_same_numbers(fits, tmp_path, options):
    fit = fits("a", **options)
    fit.save(tmp_path / "fit.nc")
    back = load(tmp_path / "fit.nc")
    assert_same_draws(fit, back)
    for group in ("sample_stats",):        # the timing statistics too: they are stored, not re-measured
        for var in fit.idata[group].dataset.data_vars:
            assert _values_equal(fit.idata[group].dataset[var].values, back.idata[group].dataset[var].values)
    assert str(back.summary()) == str(fit.summary())
    assert back.fixef_table().equals(fit.fixef_table()) and back.varcorr_table().equals(fit.varcorr_table())
    assert back.to_dict() == fit.to_dict()


def test_saved_reml_fit_reloads_to_the_same_numbers(model, tmp_path):
    fit = model.fit(method="reml")
    fit.save(tmp_path / "reml.nc")
    back = load(tmp_path / "reml.nc")
    np.testing.assert_array_equal(back.theta, fit.theta)
    for a, b in [(fit.fixef, back.fixef), (fit.fixef_se, back.fixef_se), (fit.fitted, back.fitted)]:
        np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-12, atol=0)
    assert back.objective == fit.objective and back.to_dict() == fit.to_dict()
