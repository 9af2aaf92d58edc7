"""Moving a model between bambi and bayeslmm (``Model.from_bambi``, ``Model.to_bambi``, ``bambi_priors``).

The fast tests check the structure both ways (formula, data, every prior, the
refusals); the posterior agreement fits both packages and is ``slow`` (bambi's
PyMC compile and sampling take about a minute on 2 cores).
"""

import os
import warnings
from importlib import metadata

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model, ModelError, Prior
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.datasets import load_dataset
from bayeslmm.interop import bambi_priors

try:
    import bambi as bmb
except ImportError:
    if os.environ.get("CI"):  # CI installs the test extra, which lists bambi: its absence is a failure there
        raise
    pytest.skip("bambi is not installed (pip install -e '.[test]' brings it)", allow_module_level=True)

SLEEP_UNCORRELATED = "Reaction ~ Days + (Days || Subject)"


@pytest.fixture(scope="module")
def sleep():
    return load_dataset("sleepstudy")


def _bambi(formula, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # bambi's use of pandas 3's select_dtypes
        return bmb.Model(formula, data, **kw)


def test_bambi_installs_beside_bayeslmm():
    """The test extra resolves to the current bambi and a formulae both accept (issue 14)."""
    def version(dist):
        return tuple(int(p) for p in metadata.version(dist).split(".")[:3])

    assert version("bambi") >= (0, 21, 0)
    assert (0, 6, 2) <= version("formulae") < (0, 10)
    assert bmb.__version__ == metadata.version("bambi")


def _same_prior(a: Prior, b: Prior) -> bool:
    return a.family == b.family and set(a.params) == set(b.params) and all(
        np.allclose(a.params[k], b.params[k], rtol=1e-12) for k in a.params)


def test_to_bambi_uses_bayeslmms_formula_data_and_priors(sleep):
    model = Model(SLEEP_UNCORRELATED, sleep)
    bm = model.to_bambi()
    assert bm.formula.main == "Reaction ~ Days + (Days | Subject)"   # bambi's (x | g) is uncorrelated
    assert bm.family.name == "gaussian" and bm.center_predictors
    np.testing.assert_array_equal(np.asarray(bm.response_term.data).ravel(), sleep["Reaction"].to_numpy())
    # every prior bambi will use is bayeslmm's default, read back through bambi's own objects
    ours = resolve_priors(model.spec, None)
    back = bambi_priors(bm)
    assert _same_prior(back["(Intercept)"], ours.beta[0]) and _same_prior(back["Days"], ours.beta[1])
    assert _same_prior(back["sigma"], ours.sigma)
    assert _same_prior(back["Subject"]["sd"], ours.blocks[0].sd)
    # the documented defaults, by their closed forms (rstanarm's autoscaling): sd(y) = 56.1721
    y, days = sleep["Reaction"].to_numpy(), sleep["Days"].to_numpy()
    assert back["(Intercept)"].params == pytest.approx({"mu": y.mean(), "sigma": 2.5 * y.std()})
    assert back["Days"].params["sigma"] == pytest.approx(2.5 * y.std() / days.std())
    assert back["sigma"].params["lam"] == pytest.approx(1 / y.std())
    np.testing.assert_allclose(back["Subject"]["sd"].params["sigma"], [y.std(), y.std() / days.std()])


def test_to_bambi_gives_the_same_log_density(sleep):
    """bambi's PyMC model and bayeslmm's explicit one are one density: equal at random points.

    Both are non-centred (effects = sd · z) with the predictors centred; measured: equal to
    7e-13 in log densities of about -1e3, against a bound of 1e-9 relative (1e-6).
    """
    model = Model(SLEEP_UNCORRELATED, sleep)
    bm = model.to_bambi()
    bm.build()
    ours, theirs = model.pymc_model().compile_logp(), bm.backend.model.compile_logp()
    rng = np.random.default_rng(0)
    for _ in range(4):
        beta = np.array([298.5, 10.0]) + rng.normal(size=2) * [10, 3]
        log_sigma, log_sd, z = np.log(25) + 0.2 * rng.normal(), np.log([25, 6]) + 0.3 * rng.normal(size=2), \
            rng.normal(size=(18, 2))
        a = ours({"beta_c": beta, "sigma_log__": log_sigma, "Subject_sd_log__": log_sd, "Subject_z": z})
        b = theirs({"Intercept": beta[0], "Days": beta[1], "sigma_log__": log_sigma,
                    "1|Subject_sigma_log__": log_sd[0], "Days|Subject_sigma_log__": log_sd[1],
                    "1|Subject_offset": z[:, 0], "Days|Subject_offset": z[:, 1]})
        assert abs(float(a) - float(b)) < 1e-9 * abs(float(a))


def test_to_bambi_translates_user_priors(sleep):
    priors = {"Days": Prior("Normal", mu=5, sigma=3), "sigma": Prior("HalfStudentT", nu=4, sigma=20),
              "Subject": {"sd": Prior("HalfCauchy", beta=[30, 8])}}
    bm = Model(SLEEP_UNCORRELATED, sleep).to_bambi(priors=priors)
    days = bm.parameters["mu"].common_terms["Days"].prior
    assert days.name == "Normal" and float(days.args["mu"]) == 5 and float(days.args["sigma"]) == 3
    back = bambi_priors(bm)
    assert _same_prior(back["sigma"], Prior("HalfStudentT", nu=4, sigma=20))
    assert _same_prior(back["Subject"]["sd"], Prior("HalfCauchy", beta=np.array([30.0, 8.0])))


def test_from_bambi_round_trip_and_bambis_default_priors(sleep):
    bm = _bambi("Reaction ~ Days + (Days | Subject)", sleep)
    model = Model.from_bambi(bm)
    assert model.formula == SLEEP_UNCORRELATED
    ref = Model(SLEEP_UNCORRELATED, sleep).spec
    np.testing.assert_array_equal(model.spec.y, ref.y)
    np.testing.assert_array_equal(model.spec.X, ref.X)
    assert [b.columns for b in model.spec.blocks] == [b.columns for b in ref.blocks]
    assert not model.spec.blocks[0].correlated
    # bambi's own defaults (its PriorScaler): HalfStudentT(4, sd(y)) for sigma, and an intercept sd
    # widened by the slopes' priors at the predictors' means
    y, days = sleep["Reaction"].to_numpy(), sleep["Days"].to_numpy()
    pri = bambi_priors(bm)
    slope_sd = 2.5 * y.std() / days.std()
    assert pri["sigma"].family == "HalfStudentT" and pri["sigma"].params == pytest.approx({"nu": 4, "sigma": y.std()})
    assert pri["(Intercept)"].params["sigma"] == pytest.approx(np.hypot(2.5 * y.std(), slope_sd * days.mean()))
    np.testing.assert_allclose(pri["Subject"]["sd"].params["sigma"], [pri["(Intercept)"].params["sigma"], slope_sd])
    resolve_priors(model.spec, pri)  # bayeslmm accepts them as they are


def test_categorical_coding_moves_with_the_model(sleep):
    phase = np.array(["early", "middle", "late"])[np.asarray(sleep["Days"]) // 4]
    d = sleep.assign(phase=pd.Categorical(phase, categories=["late", "early", "middle"]))
    # bayeslmm keeps the categorical's own order (reference 'late'), and bambi gets the same coding
    model = Model("Reaction ~ Days + phase + (Days || Subject)", d)
    assert model.spec.fixed_names == ("(Intercept)", "Days", "phase[early]", "phase[middle]")
    bm = model.to_bambi()
    assert list(bm.parameters["mu"].design.common.as_dataframe().columns) == \
        ["Intercept", "Days", "phase[early]", "phase[middle]"]
    ours, back = resolve_priors(model.spec, None), bambi_priors(bm)   # one bambi term, two columns
    for name, prior in zip(model.spec.fixed_names, ours.beta):
        assert _same_prior(back[name], prior), name
    # from bambi: formulae sorts an unordered categorical's levels (reference 'early'), so bayeslmm does too
    back = Model.from_bambi(_bambi("Reaction ~ Days + phase + (Days | Subject)", d))
    assert back.spec.fixed_names == ("(Intercept)", "Days", "phase[late]", "phase[middle]")


@pytest.mark.parametrize("make, match", [
    (lambda d: _bambi("hi ~ Days + (1 | Subject)", d.assign(hi=(d.Reaction > 300).astype(int)),
                      family="bernoulli"), "family 'bernoulli' with link 'logit'"),
    (lambda d: _bambi(bmb.Formula("Reaction ~ Days + (1 | Subject)", "sigma ~ Days"), d), "sigma ~ Days"),
    (lambda d: _bambi("Reaction ~ Days", d), "no group-specific term"),
    (lambda d: _bambi("Reaction ~ (0 + half | Subject) + (Days | Subject)",
                      d.assign(half=np.where(d.Days < 5, "a", "b"))), "two blocks with one grouping factor"),
])
def test_from_bambi_refuses_what_bayeslmm_cannot_express(sleep, make, match):
    bm = make(sleep)
    with pytest.raises(ModelError, match=match):
        Model.from_bambi(bm)


def test_categorical_left_side_moves_column_for_column(sleep):
    d = sleep.assign(half=np.where(sleep.Days < 5, "a", "b"))
    model = Model.from_bambi(_bambi("Reaction ~ Days + (0 + half | Subject)", d))
    assert model.formula == "Reaction ~ Days + (0 + half || Subject)"
    assert model.spec.blocks[0].columns == ("half[a]", "half[b]")
    assert bambi_priors(model.to_bambi())["Subject"]["sd"].params["sigma"].shape == (2,)


def test_bambi_priors_refuses_what_bayeslmm_cannot_express(sleep):
    bm = _bambi("Reaction ~ Days + (1 | Subject)", sleep,
                priors={"Days": bmb.Prior("Uniform", lower=-50, upper=50)})
    with pytest.raises(ModelError, match="Uniform"):
        bambi_priors(bm)
    bm = _bambi("Reaction ~ Days + (1 | Subject)", sleep,
                priors={"1|Subject": bmb.Prior("Normal", mu=5, sigma=bmb.Prior("HalfNormal", sigma=10))})
    with pytest.raises(ModelError, match="Normal\\(0, sd\\)"):
        bambi_priors(bm)


def test_to_bambi_refuses_correlations_unless_dropped(sleep):
    model = Model("Reaction ~ Days + (Days | Subject)", sleep)
    with pytest.raises(ModelError, match="uncorrelated.*'\\|\\|'.*drop_correlations=True"):
        model.to_bambi()
    with pytest.warns(UserWarning, match="no correlations for \\(Days \\| Subject\\)"):
        bm = model.to_bambi(drop_correlations=True)
    assert bm.formula.main == "Reaction ~ Days + (Days | Subject)"
    # a one-column block has no correlation to lose, and moves back as written
    bm = Model("Reaction ~ Days + (1 | Subject)", sleep).to_bambi()
    assert bm.formula.main == "Reaction ~ Days + (1 | Subject)"
    assert Model.from_bambi(bm).formula == "Reaction ~ Days + (1 | Subject)"


@pytest.mark.slow
def test_posteriors_agree_within_monte_carlo_error(sleep):
    """bambi (PyMC's NUTS) and bayeslmm (collapsed, nutpie) sample the same posterior.

    sleepstudy, Reaction ~ Days + (Days || Subject) (bambi's (Days | Subject)), bayeslmm's
    default priors set in bambi by to_bambi.  Every posterior mean (β, both sds, σ) must
    agree within 4 combined Monte Carlo standard errors, sqrt(mcse_bambi² + mcse_ours²)
    (ArviZ's mcse).  bambi: 2 chains x 2000 draws (its fit takes 30 s on a quiet 2-core
    machine, up to 3 min on a busy one, hence ``slow``); bayeslmm: 4 chains x 5000 draws
    (seconds), so bambi's error dominates.  Measured: the largest |difference| / combined
    MCSE over the five parameters was 1.31 with this seed (a factor 3 below the bound) and
    1.03, 0.92 and 1.73 with seeds 1, 2 and 11.  With 1000 draws per chain one seed put
    bambi's Days mean 3.0 MCSEs from ours, hence the longer run.  (The exact posterior mean
    of Days is known here: sleepstudy is balanced, so E[β | sds, σ] is the same GLS for all
    variance parameters up to the prior's pull, and its average over the draws is 10.455.)
    """
    import arviz as az

    model = Model(SLEEP_UNCORRELATED, sleep)
    bm = model.to_bambi()
    idata = bm.fit(draws=2000, tune=1000, chains=2, random_seed=5, progressbar=False)
    fit = model.fit(method="nuts", draws=5000, tune=1000, chains=4, random_seed=5, progressbar=False)
    names = {"Intercept": ("beta", {"coef": "(Intercept)"}), "Days": ("beta", {"coef": "Days"}),
             "1|Subject_sigma": ("Subject_sd", 0), "Days|Subject_sigma": ("Subject_sd", 1), "sigma": ("sigma", None)}
    theirs_mean = idata.posterior.to_dataset().mean(("chain", "draw"))
    theirs_mcse = az.mcse(idata, var_names=list(names))
    ours_mean = fit.posterior.mean(("chain", "draw"))
    ours_mcse = az.mcse(fit.idata, var_names=["beta", "Subject_sd", "sigma"])
    z = {}
    for bambi_name, (var, where) in names.items():
        mean, mcse = ours_mean[var], ours_mcse[var]
        if isinstance(where, dict):
            mean, mcse = mean.sel(where), mcse.sel(where)
        elif where is not None:
            mean, mcse = mean.isel({mean.dims[0]: where}), mcse.isel({mcse.dims[0]: where})
        diff = float(theirs_mean[bambi_name]) - float(mean)
        z[bambi_name] = abs(diff) / np.hypot(float(theirs_mcse[bambi_name]), float(mcse))
    assert max(z.values()) < 4, z
