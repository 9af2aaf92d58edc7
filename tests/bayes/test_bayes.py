"""The Bayesian engine on real data: agreement with lme4, collapsed = explicit, seeds, DataTree, priors."""

import warnings

import numpy as np
import pytest

from bayeslmm import Model
from bayeslmm.bayes import Prior
from bayeslmm.bayes.diagnostics import SamplingWarning
from bayeslmm.datasets import load_dataset
from bayeslmm.errors import BayesLMMError

from conftest import load_reference

REF = load_reference()
FAST = dict(progressbar=False)


@pytest.fixture(scope="module")
def sleep_model():
    return Model("Reaction ~ Days + (Days | Subject)", load_dataset("sleepstudy"))


@pytest.fixture(scope="module")
def sleep_fit(sleep_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingWarning)  # no convergence warning on this easy posterior
        return sleep_model.fit(method="nuts", random_seed=11, **FAST)


def _check_against_lme4(fit, key):
    """Posterior means of β within 0.1 posterior sd of lme4's REML; sd medians within 10 %."""
    ref = REF[key]
    fe = fit.fixef_table()
    for name, value in ref["fixef"].items():
        assert abs(fe.loc[name, "estimate"] - value) < 0.1 * fe.loc[name, "std_error"], name
    vc = fit.varcorr_table()
    for row in ref["varcorr"]:
        if row["var2"] is not None:
            continue
        sel = (vc.grp == row["grp"]) & (vc.var1.fillna("") == (row["var1"] or "")) & vc.var2.isna()
        median = vc.loc[sel, "median"].item()
        assert abs(median / row["sdcor"] - 1) < 0.10, (row, median)


def test_sleepstudy_matches_lme4(sleep_fit):
    _check_against_lme4(sleep_fit, "sleepstudy_corr_reml")
    d = sleep_fit.diagnostics()
    assert d.ok and d.divergences == 0 and d.max_rhat <= 1.01 and d.min_ess_bulk >= 400


def test_exam_matches_lme4():
    fit = Model("normexam ~ standLRT + (standLRT | school)", load_dataset("exam")).fit(
        method="nuts", random_seed=3, **FAST)
    _check_against_lme4(fit, "exam_slope_reml")


def test_tables_line_up_with_reml(sleep_model, sleep_fit):
    reml = sleep_model.fit(method="reml")
    fe = sleep_fit.fixef_table()
    assert list(fe.index) == list(reml.fixef.index)
    assert {"estimate", "std_error", "lower", "upper", "r_hat", "ess_bulk", "ess_tail"} <= set(fe.columns)
    vc = sleep_fit.varcorr_table()
    assert list(zip(vc.grp, vc.var1.fillna(""), vc.var2.fillna(""))) == \
        list(zip(reml.varcorr.grp, reml.varcorr.var1.fillna(""), reml.varcorr.var2.fillna("")))
    assert vc.attrs["interval"] == "eti89"  # ArviZ 1.x default
    assert sleep_fit.fixef_table(ci_prob=0.95).attrs["interval"] == "eti95"
    re = sleep_fit.ranef()["Subject"]
    lme4 = reml.ranef()["Subject"]
    assert re.shape == (18, 2)
    assert np.corrcoef(re["Days"], lme4["Days"])[0, 1] > 0.99
    text = str(sleep_fit.summary())
    assert "corr (Intercept), Days" in text and "Diagnostics: no divergences" in text
    assert "<table" in sleep_fit._repr_html_()


def test_datatree_groups_and_loo(sleep_fit):
    import arviz as az

    dt = sleep_fit.idata
    assert {"posterior", "sample_stats", "observed_data", "constant_data", "log_likelihood"} <= set(dt.children)
    post = dt["posterior"]
    assert post["Subject"].dims == ("chain", "draw", "Subject_level", "Subject_effect")
    assert list(post["beta"].coords["coef"].values) == ["(Intercept)", "Days"]
    assert "beta_c" not in post and "Subject_chol_cov" not in post
    assert dt["log_likelihood"]["y"].shape == (4, 1000, 180)
    loo = az.loo(dt)
    assert np.isfinite(loo.elpd) and -1000 < loo.elpd < -800


def test_same_seed_same_draws(sleep_model):
    a = sleep_model.fit(method="nuts", random_seed=5, draws=100, tune=100, chains=2, warn=False, **FAST)
    b = sleep_model.fit(method="nuts", random_seed=5, draws=100, tune=100, chains=2, warn=False, **FAST)
    c = sleep_model.fit(method="nuts", random_seed=6, draws=100, tune=100, chains=2, warn=False, **FAST)
    for var in ("beta", "sigma", "Subject_sd", "Subject"):
        np.testing.assert_array_equal(a.posterior[var].to_numpy(), b.posterior[var].to_numpy())
    assert not np.array_equal(a.posterior["beta"].to_numpy(), c.posterior["beta"].to_numpy())


def _mc_agree(a, b, names):
    """Posterior means agree within 4 Monte Carlo standard errors of their difference."""
    for name in names:
        x, y = a.loc[name], b.loc[name]
        se = np.hypot(x["sd"] / np.sqrt(x["ess_bulk"]), y["sd"] / np.sqrt(y["ess_bulk"]))
        assert abs(x["mean"] - y["mean"]) < 4 * se, (name, x["mean"], y["mean"], se)
        assert abs(x["sd"] / y["sd"] - 1) < 0.12, (name, x["sd"], y["sd"])


@pytest.mark.slow   # ~25 s; the default suite checks the collapsed graph against the kernel (test_kernel) and the
                    # explicit graph against the structured kernel (test_structured), so each route against exact code
def test_collapsed_equals_explicit(sleep_model, sleep_fit):
    explicit = sleep_model.fit(method="nuts", random_seed=12, route="graph-explicit", **FAST)
    _mc_agree(sleep_fit.summary_table(), explicit.summary_table(),
              ["beta[(Intercept)]", "beta[Days]", "sd[Subject|(Intercept)]", "sd[Subject|Days]",
               "corr[Subject|(Intercept),Days]", "sigma"])
    # the exactly drawn effects match the sampled ones
    a = sleep_fit.ranef_table().set_index(["term", "grp"])
    b = explicit.ranef_table().set_index(["term", "grp"])
    se = np.hypot(a["sd"], b["sd"]) / np.sqrt(1000)
    assert (np.abs(a["mean"] - b["mean"]) < 5 * se).all()


@pytest.mark.slow   # two PyMC graphs, ~30 s; the compiled kernels' own graph comparisons run in the default suite
def test_crossed_partial_collapse_equals_explicit():
    """Penicillin: plate integrated out, sample drawn non-centred; same posterior as fully explicit."""
    model = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", load_dataset("Penicillin"))
    kw = dict(draws=600, tune=600, target_accept=0.95, warn=False, **FAST)
    a = model.fit(method="nuts", random_seed=1, **kw)
    b = model.fit(method="nuts", random_seed=2, route="graph-explicit", **kw)
    _mc_agree(a.summary_table(), b.summary_table(), ["sd[plate|(Intercept)]", "sigma"])
    assert set(a.ranef()) == {"plate", "sample"}


def test_three_by_three_block_and_uncorrelated_block():
    """q = 3 takes the general (batched Cholesky) path; || gives independent sds, no correlation."""
    data = load_dataset("sleepstudy").assign(Days2=lambda d: (d.Days - 4.5) ** 2 / 10)
    model = Model("Reaction ~ Days + (Days + Days2 | Subject)", data)
    fit = model.fit(method="nuts", random_seed=2, draws=300, tune=300, chains=2, warn=False, **FAST)
    assert fit.posterior["Subject_corr"].shape[-1] == 3  # the three distinct correlations of a 3×3 block
    assert np.isfinite(fit.summary_table()["mean"]).all()
    unc = Model("Reaction ~ Days + (Days || Subject)", load_dataset("sleepstudy")).fit(
        method="nuts", random_seed=2, draws=300, tune=300, chains=2, warn=False, **FAST)
    assert "Subject_corr" not in unc.posterior
    assert len(unc.varcorr) == 3


def test_priors_default_summary_and_overrides(sleep_model):
    table = sleep_model.prior_summary()
    y = sleep_model.spec.y
    row = table.set_index("parameter").loc["sigma", "prior"]
    assert row == f"Exponential(lam={1 / np.std(y):.4g})"
    assert "LKJ(eta=1)" in set(table.prior)
    custom = sleep_model.prior_summary({"Days": Prior("Normal", mu=0, sigma=10), "sigma": Prior("HalfNormal", sigma=50),
                                        "Subject": {"eta": 2.0}, "Subject|Days": Prior("HalfNormal", sigma=8)})
    custom = custom.set_index("parameter")["prior"]
    assert custom["Days"] == "Normal(mu=0, sigma=10)"
    assert custom["sigma"] == "HalfNormal(sigma=50)"
    assert custom["Subject|Days"] == "HalfNormal(sigma=8)"
    assert "LKJ(eta=2)" in set(custom)


def test_strong_prior_moves_the_posterior(sleep_model):
    fit = sleep_model.fit(method="nuts", random_seed=4, draws=500, tune=500, chains=2, warn=False,
                          priors={"Days": Prior("Normal", mu=0, sigma=0.01)}, **FAST)
    assert abs(fit.fixef["Days"]) < 0.05


@pytest.mark.parametrize("priors, match", [
    ({"Days": Prior("Normal", mu=0, sigma=-1)}, "must be positive"),
    ({"Days": Prior("Wobbly", mu=0)}, "unknown or unsuitable distribution 'Wobbly'"),
    ({"sigma": Prior("Normal", mu=0, sigma=1)}, "unsuitable"),
    ({"Dayz": Prior("Normal", mu=0, sigma=1)}, "names nothing in the model"),
    ({"Subject": {"eta": -2}}, "eta must be a positive number"),
    ({"Subject|Dayz": Prior("HalfNormal", sigma=1)}, "has no random effect 'Dayz'"),
    ({"Days": 3.0}, "must be a bayeslmm.Prior"),
])
def test_invalid_priors(sleep_model, priors, match):
    with pytest.raises(BayesLMMError, match=match):
        sleep_model.fit(method="nuts", priors=priors)


@pytest.mark.parametrize("kwargs, match", [
    (dict(draws=0), "draws"), (dict(chains=1.5), "chains"), (dict(sampler="stan"), "sampler"),
    (dict(route="centred"), "route must be one of"), (dict(target_accept=1.2), "target_accept"),
    (dict(random_seed=-1), "random_seed"), (dict(tune=-5), "tune"), (dict(drawz=10), "drawz"),
])
def test_invalid_sampler_arguments(sleep_model, kwargs, match):
    with pytest.raises(BayesLMMError, match=match):
        sleep_model.fit(method="nuts", **kwargs)


def test_prior_predictive(sleep_model):
    pp = sleep_model.prior_predictive(draws=200, random_seed=1)
    y = pp["prior_predictive"]["y"].to_numpy()
    assert y.shape[-1] == 180 and np.isfinite(y).all()
    # weakly informative: the prior predictive spread covers the data's scale but not absurdly
    spread = np.std(y)
    assert np.std(sleep_model.spec.y) < spread < 100 * np.std(sleep_model.spec.y)


def test_nutpie_sampler(sleep_model):
    fit = sleep_model.fit(method="nuts", sampler="nutpie", random_seed=7, **FAST)
    _check_against_lme4(fit, "sleepstudy_corr_reml")
    assert fit.sampler == "nutpie" and fit.diagnostics().ok


def test_data_rich_sampled_blocks_are_centred():
    """Penicillin: 'sample' (6 levels, 24 rows each) is sampled centred, 'plate' (24 levels, 6 rows) non-centred."""
    from bayeslmm.bayes.model import build_pymc_model, centred_block
    from bayeslmm.bayes.priors import resolve_priors

    m = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin")
    spec = m.spec
    assert [b.group for b in spec.blocks] == ["plate", "sample"]
    assert [centred_block(spec, b) for b in spec.blocks] == [False, True]
    built = build_pymc_model(spec, m.crossprods, resolve_priors(spec, None), "explicit")
    free = {rv.name for rv in built.model.free_RVs}
    assert {"plate_z", "sample"} <= free and "sample_z" not in free
