"""The public PyMC model (``Model.pymc_model``), wrapping its draws (``fit_from_draws``), and ArviZ's checks."""

import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bayeslmm import Model
from bayeslmm.errors import BayesLMMError

pm = pytest.importorskip("pymc")


@pytest.fixture(scope="module")
def slopes():
    return Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")


@pytest.fixture(scope="module")
def intercepts():
    return Model("Reaction ~ Days + (1 | Subject)", "sleepstudy")


def test_pymc_model_names_the_linear_predictor_mu_and_the_observed_y(slopes):
    pmm = slopes.pymc_model()
    assert [v.name for v in pmm.observed_RVs] == ["y"]
    assert pmm.named_vars_to_dims["y"] == ("obs",) and pmm.named_vars_to_dims["mu"] == ("obs",)
    assert len(pmm.coords["obs"]) == slopes.spec.n_obs == 180
    # mu is X β + Z b: recompute it by hand from prior draws of β and b
    with pmm:
        prior = pm.sample_prior_predictive(draws=5, random_seed=3)["prior"].isel(chain=0)
    block = slopes.spec.blocks[0]
    beta, b = prior["beta"].to_numpy(), prior["Subject"].to_numpy()
    expect = beta @ slopes.spec.X.T + np.sum(block.Z * b[:, block.codes], axis=2)
    np.testing.assert_allclose(prior["mu"].to_numpy(), expect, rtol=1e-10)
    assert np.ptp(b) > 0  # the check saw non-zero effects


def test_fits_do_not_name_mu_so_their_posteriors_stay_small(slopes):
    from bayeslmm.bayes.model import build_pymc_model
    from bayeslmm.bayes.priors import resolve_priors

    # fit(method="nuts", route="graph-explicit") samples this model: no rows × draws Deterministic
    built = build_pymc_model(slopes.spec, slopes.crossprods, resolve_priors(slopes.spec, None), "explicit")
    assert "mu" not in built.model.named_vars and "y" in built.model.named_vars
    collapsed = slopes.pymc_model(parameterization="collapsed")
    assert "mu" not in collapsed.named_vars and not collapsed.observed_RVs


def test_pymc_model_checks_its_arguments(slopes):
    with pytest.raises(BayesLMMError, match="parameterization must be one of"):
        slopes.pymc_model(parameterization="centred")
    rng = np.random.default_rng(0)
    data = {"y": rng.normal(size=40), "mu": np.repeat(list("abcd"), 10)}
    with pytest.raises(BayesLMMError, match="rename the column"):
        Model("y ~ 1 + (1 | mu)", pd.DataFrame(data)).pymc_model()


def _prior_as_posterior(pmm, draws=60, seed=5):
    """Prior draws of every variable, shaped as a 2-chain posterior (a stand-in for pm.sample's output)."""
    with pmm, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The effect of Potentials")  # the collapsed model's
        prior = pm.sample_prior_predictive(draws=draws, random_seed=seed)["prior"].to_dataset().isel(chain=0)
    half = draws // 2
    halves = [prior.isel(draw=slice(k * half, (k + 1) * half)).assign_coords(draw=np.arange(half)) for k in (0, 1)]
    post = xr.concat(halves, dim="chain", join="exact").assign_coords(chain=[0, 1])
    stats = xr.Dataset({"diverging": (("chain", "draw"), np.zeros((2, half), bool)),
                        "energy": (("chain", "draw"), np.random.default_rng(seed).normal(size=(2, half)))},
                       coords={"chain": [0, 1], "draw": np.arange(half)})
    return xr.DataTree.from_dict({"/posterior": post, "/sample_stats": stats})


def test_from_pymc_reads_each_variable_where_the_fit_reports_it(slopes):
    dt = _prior_as_posterior(slopes.pymc_model())
    post = dt["posterior"].to_dataset()
    fit = slopes.fit_from_draws(dt, warn=False)
    vc = fit.varcorr_table()
    np.testing.assert_allclose(vc["estimate"].iloc[0], post["Subject_sd"].sel(Subject_effect="(Intercept)").mean())
    np.testing.assert_allclose(vc["estimate"].iloc[2], post["Subject_corr"].sel(Subject_pair="(Intercept),Days").mean())
    np.testing.assert_allclose(vc["estimate"].iloc[3], post["sigma"].mean())
    np.testing.assert_allclose(fit.fixef, post["beta"].mean(("chain", "draw")))
    re = fit.ranef()["Subject"]
    assert list(re.index) == list(slopes.spec.blocks[0].levels)
    np.testing.assert_allclose(re.to_numpy(), post["Subject"].mean(("chain", "draw")).to_numpy())
    # internal variables are left out, mu is kept, the log-likelihood is added; the input is untouched
    assert "beta_c" not in fit.posterior and "Subject_z" not in fit.posterior and "mu" in fit.posterior
    assert "log_likelihood" in fit.idata.children and "log_likelihood" not in dt.children
    assert "beta_c" in dt["posterior"].dataset
    assert fit.parameterization == "explicit" and fit.seed == 0
    assert "Subject" in str(fit.summary())


def test_from_pymc_refuses_draws_of_another_model(slopes, intercepts):
    other = _prior_as_posterior(intercepts.pymc_model())
    with pytest.raises(BayesLMMError, match="not from this model's pymc_model"):
        slopes.fit_from_draws(other, warn=False)
    collapsed = _prior_as_posterior(slopes.pymc_model(parameterization="collapsed"))
    with pytest.raises(BayesLMMError, match="collapsed parameterisation lack"):
        slopes.fit_from_draws(collapsed, warn=False)
    with pytest.raises(BayesLMMError, match="DataTree pm.sample"):
        slopes.fit_from_draws({"posterior": None}, warn=False)
    with pytest.raises(BayesLMMError, match="random_seed must be a non-negative integer"):
        intercepts.fit_from_draws(other, random_seed=-1, warn=False)


def test_draws_from_pm_sample_wrap_into_a_fit_like_fit_nuts(intercepts):
    # PyMC's own NUTS on the accessor's model, 2 × 200 draws, against fit(method="nuts") on the same
    # priors. Tolerance: 5 Monte Carlo standard errors of the difference (mcse ≈ sd / √ESS_bulk each);
    # reached: 1.7 (the sd of Subject's intercept; ESS 61 to 770 in these runs)
    with intercepts.pymc_model(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = pm.sample(draws=200, tune=200, chains=2, cores=1, random_seed=1, progressbar=False,
                          nuts_sampler="pymc", compute_convergence_checks=False)
    mine = intercepts.fit_from_draws(idata, warn=False)
    ref = intercepts.fit(method="nuts", draws=200, tune=200, chains=2, random_seed=2, progressbar=False,
                         warn=False)
    a, b = mine.summary_table(), ref.summary_table()
    assert list(a.index) == list(b.index)
    mcse = np.sqrt(a["sd"] ** 2 / a["ess_bulk"] + b["sd"] ** 2 / b["ess_bulk"])
    gap = (a["mean"] - b["mean"]).abs() / mcse
    assert (gap < 5).all(), gap
    assert mine.sampler == "pymc"
    assert mine.ranef()["Subject"].shape == (18, 1)
    assert np.isfinite(mine.fixef).all() and len(mine.varcorr) == 2


def test_posterior_predictive_stores_its_group_for_arviz(intercepts):
    az = pytest.importorskip("arviz")
    pytest.importorskip("arviz_plots")
    import matplotlib

    matplotlib.use("Agg")
    fit = intercepts.fit(method="nuts", draws=100, tune=100, chains=2, random_seed=4, progressbar=False,
                         warn=False)
    with pytest.raises(KeyError):  # nothing to compare with yet
        az.plot_ppc_dist(fit.idata)
    yrep = fit.posterior_predictive()
    stored = fit.idata["posterior_predictive"]["y"]
    assert stored.dims == ("chain", "draw", "obs")
    np.testing.assert_array_equal(stored.to_numpy(), yrep.to_numpy())
    az.plot_ppc_dist(fit.idata)  # ArviZ 1.x (arviz_plots) reads it as it is
    # draws for new rows are returned, not stored over the training rows' ones
    new = intercepts.spec.data.iloc[:3]
    fit.posterior_predictive(newdata=new, random_seed=9)
    assert fit.idata["posterior_predictive"]["y"].sizes["obs"] == 180
    matplotlib.pyplot.close("all")


# -- progress in a notebook without ipywidgets ------------------------------------------------

class ZMQInteractiveShell:
    """What rich (and nutpie) take for a Jupyter kernel: ``get_ipython()``'s class name."""


@pytest.fixture
def fake_notebook(monkeypatch):
    import builtins
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        pytest.skip("ipywidgets is installed: rich draws PyMC's bar in a notebook")
    monkeypatch.setattr(builtins, "get_ipython", lambda: ZMQInteractiveShell(), raising=False)


def test_text_progress_rewrites_one_line_per_five_percent():
    import io
    from types import SimpleNamespace

    from bayeslmm.bayes.progress import TextProgress

    out = io.StringIO()
    bar = TextProgress(chains=2, tune=20, draws=20, stream=out)
    for chain in (0, 1):
        for i in range(40):
            bar(draw=SimpleNamespace(chain=chain, draw_idx=i, tuning=i < 20))
    lines = out.getvalue().split("\r")[1:]
    assert len(lines) == 2 * 20 and out.getvalue().endswith("\n")
    assert lines[0].startswith("NUTS (PyMC) chain 1/2: iteration 2/40 (tuning)")
    assert lines[-1].startswith("NUTS (PyMC) chain 2/2: iteration 40/40 (sampling)")


def test_pymc_sampler_in_a_notebook_without_ipywidgets_shows_text_not_a_warning(intercepts, fake_notebook, capsys):
    from bayeslmm.bayes.progress import notebook_without_widgets, pymc_progress_options

    assert notebook_without_widgets()
    assert pymc_progress_options(False, 2, 10, 10) == {"progressbar": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = intercepts.fit(method="nuts", sampler="pymc", chains=1, draws=40, tune=40, random_seed=1,
                             warn=False)
    messages = [str(w.message) for w in caught]
    assert not any("ipywidgets" in m for m in messages), messages  # rich said 'install "ipywidgets" ...'
    assert "NUTS (PyMC) chain 1/1: iteration 80/80 (sampling)" in capsys.readouterr().err
    assert fit.n_draws == 40
