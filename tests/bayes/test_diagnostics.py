"""Each convergence diagnostic, provoked: it warns with a message saying what to do."""

import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bayeslmm import Model
from bayeslmm.bayes import diagnostics
from bayeslmm.bayes.diagnostics import SamplingWarning
from bayeslmm.datasets import load_dataset


def _messages(record):
    return [str(w.message) for w in record if issubclass(w.category, SamplingWarning)]


@pytest.fixture(scope="module")
def sleep_model():
    return Model("Reaction ~ Days + (Days | Subject)", load_dataset("sleepstudy"))


def test_tree_depth_saturation_warns(sleep_model):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit = sleep_model.fit(method="nuts", max_treedepth=1, draws=200, tune=200, chains=2, random_seed=1,
                              progressbar=False)
    assert fit.diagnostics().max_treedepth_hits > 0
    assert any("maximum tree depth" in m and "max_treedepth" in m for m in _messages(rec))


def test_short_chains_warn_about_ess_and_rhat(sleep_model):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit = sleep_model.fit(method="nuts", draws=30, tune=5, chains=2, random_seed=2, progressbar=False)
    msgs = _messages(rec)
    assert any("bulk ESS below 400" in m for m in msgs)
    assert any("tail ESS below 400" in m for m in msgs)
    assert any("R-hat above 1.01" in m for m in msgs), msgs
    assert not fit.diagnostics().ok


def test_divergences_warn():
    """A tiny target acceptance makes the step size too large for the hierarchical funnel."""
    model = Model("Yield ~ 1 + (1 | Batch)", load_dataset("Dyestuff"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit = model.fit(method="nuts", route="graph-explicit", target_accept=0.2, draws=300, tune=300,
                        chains=2, random_seed=3, progressbar=False)
    assert fit.diagnostics().divergences > 0
    assert any("divergent transitions" in m and "target_accept" in m for m in _messages(rec))


def test_low_ebfmi_is_flagged():
    """E-BFMI from energies: a random walk in energy (poor exploration) falls below 0.3."""
    rng = np.random.default_rng(0)
    good = rng.normal(size=(2, 1000))                        # iid energies: E-BFMI ≈ 2
    bad = np.cumsum(rng.normal(size=(2, 1000)), axis=1)      # a random walk: E-BFMI ≪ 0.3
    assert np.all(diagnostics.ebfmi(good) > 1.5)
    assert np.all(diagnostics.ebfmi(bad) < 0.05)
    summary = pd.DataFrame({"r_hat": [1.0], "ess_bulk": [1000.0], "ess_tail": [1000.0]}, index=["x"])
    stats = xr.Dataset({"energy": (("chain", "draw"), bad), "diverging": (("chain", "draw"), np.zeros((2, 1000), bool))})
    d = diagnostics.check(summary, stats, 2000)
    assert len(d.messages) == 1 and "E-BFMI below 0.3 in chain(s) [0, 1]" in d.messages[0]
    with pytest.warns(SamplingWarning, match="E-BFMI"):
        diagnostics.warn(d)
    ok = diagnostics.check(summary, stats.assign(energy=(("chain", "draw"), good)), 2000)
    assert ok.ok


def test_warnings_can_be_turned_off(sleep_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingWarning)
        fit = sleep_model.fit(method="nuts", draws=30, tune=5, chains=2, random_seed=2, progressbar=False, warn=False)
    assert not fit.diagnostics().ok  # still recorded, and shown in the summary
    assert "Diagnostics:" in str(fit.summary()) and "!" in str(fit.summary())


def test_undefined_rhat_is_reported_not_hidden():
    """A NaN R-hat with several chains (a stuck chain) is a message; with one chain it is just NaN."""
    import xarray as xr

    from bayeslmm.bayes import diagnostics as d

    table = pd.DataFrame({"r_hat": [1.001, np.nan], "ess_bulk": [900.0, 800.0], "ess_tail": [900.0, 700.0]},
                          index=["beta[x]", "sigma"])
    for chains, expect in ((2, True), (1, False)):
        stats = xr.Dataset({"diverging": (("chain", "draw"), np.zeros((chains, 500), bool))})
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            diag = d.check(table, stats, chains * 500)
        assert diag.max_rhat == 1.001
        assert any("could not be computed" in m for m in diag.messages) is expect
