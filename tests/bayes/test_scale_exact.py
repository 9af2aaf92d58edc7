"""Exact fits are refused, nearly exact ones fit; NUTS is equivariant in the response's scale (issue 14)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model, Prior
from bayeslmm.bayes.collapsed import CollapsedData, ResponseScale
from bayeslmm.bayes.priors import LOCATION_FAMILIES, resolve_priors
from bayeslmm.datasets import load_dataset
from bayeslmm.errors import BayesLMMError, ModelError
from bayeslmm.exactfit import EXACT_ULPS, NEAR_EXACT_RATIO, SCREEN_RATIO, check_exact_fit

FORMULA = "y ~ Days + (Days | Subject)"
FAST = dict(chains=2, draws=200, tune=200, progressbar=False, random_seed=3, warn=False)


def sleep_design(noise: float = 0.0, offset: float = 0.0, seed: int = 1) -> pd.DataFrame:
    """sleepstudy's balanced design with y = offset + 250 + 10·Days + subject offsets (+ noise·sd(y))."""
    d = load_dataset("sleepstudy").copy()
    rng = np.random.default_rng(seed)
    k = pd.factorize(d["Subject"])[0]
    a, b = rng.normal(0, 20, k.max() + 1), rng.normal(0, 5, k.max() + 1)
    a, b = a - a.mean(), b - b.mean()
    days = d["Days"].to_numpy(dtype=float)
    y = offset + 250 + 10 * days + a[k] + b[k] * days
    if noise:
        y = y + noise * np.std(y) * rng.standard_normal(len(y))
    d["y"] = y
    return d


def _exact_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "reproduce the response" in str(w.message)]


# ------------------------------------------------------------------------------ exact fits
@pytest.mark.parametrize("offset", [0.0, 1e8])
@pytest.mark.parametrize("method", ["reml", "ml", "nuts"])
def test_exact_fit_is_refused_by_every_method(offset, method):
    # before: REML returned intercept 250.73 (250.11 at +1e8) where GLS gives 250, σ/sd(y) 7e-7, no warning
    m = Model(FORMULA, sleep_design(offset=offset))
    with pytest.raises(ModelError, match="reproduce the response exactly"):
        m.fit(method=method, **(FAST if method == "nuts" else {}))


def test_exact_fit_of_a_crossed_design_is_refused():
    # Penicillin's crossed plate × sample design: the second block is projected densely (not level by level)
    d = load_dataset("Penicillin").copy()
    rng = np.random.default_rng(2)
    plate, sample = pd.factorize(d["plate"])[0], pd.factorize(d["sample"])[0]
    d["y"] = 23.0 + rng.normal(0, 1, plate.max() + 1)[plate] + rng.normal(0, 2, sample.max() + 1)[sample]
    with pytest.raises(ModelError, match="exactly"):
        Model("y ~ 1 + (1 | plate) + (1 | sample)", d).fit()
    d["y"] = d["y"] + 1e-3 * rng.standard_normal(len(d))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit = Model("y ~ 1 + (1 | plate) + (1 | sample)", d).fit()
    assert not _exact_warnings(record)
    assert 3e-4 < fit.sigma < 3e-3


@pytest.mark.parametrize("offset", [0.0, 1e8])
def test_nearly_exact_data_fit_without_an_alarm(offset):
    # noise of 1e-6·sd(y): real (if tiny) residual variation; the check measures it 1130 units of
    # rounding above y's own at +1e8 (4e8 at 0) against EXACT_ULPS = 8, and 8.7e-7·sd > NEAR_EXACT_RATIO
    d = sleep_design(noise=1e-6, offset=offset)
    m = Model(FORMULA, d)
    check = check_exact_fit(m.spec, m.crossprods)
    assert check.verdict == "no"
    assert check.residual_rms > 3 * EXACT_ULPS * check.rounding
    assert check.ratio > 3 * NEAR_EXACT_RATIO
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit = m.fit()
    assert not _exact_warnings(record)
    assert abs(fit.fixef["Days"] - 10.0) < 0.5


def test_exact_fits_sit_far_below_the_threshold():
    # measured: 0.53 units of rounding at offsets 0, 1e8 and -1e10 (threshold 8)
    for offset in (0.0, 1e8, -1e10):
        m = Model(FORMULA, sleep_design(offset=offset))
        check = check_exact_fit(m.spec, m.crossprods)
        assert check.verdict == "exact"
        assert check.residual_rms < EXACT_ULPS / 3 * check.rounding


def test_residual_below_what_the_sums_resolve_warns():
    # noise 1e-8·sd(y): REML's σ came out 1.05e-6·sd and the slope 22.6 instead of ~10
    m = Model(FORMULA, sleep_design(noise=1e-8))
    assert check_exact_fit(m.spec, m.crossprods).verdict == "near"
    with pytest.warns(UserWarning, match="almost exactly"):
        m.fit()


@pytest.mark.parametrize("name, formula", [("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
                                           ("exam", "normexam ~ standLRT + (standLRT | school)"),
                                           ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)")])
def test_real_data_pass_the_screen(name, formula):
    m = Model(formula, name)
    check = check_exact_fit(m.spec, m.crossprods)
    assert check.verdict == "no" and check.ratio > 100 * SCREEN_RATIO   # measured 0.41, 0.73, 0.24


def test_overflowing_cross_products_are_refused_before_fitting():
    from bayeslmm.model import check_magnitude

    m = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    Arr = np.array(m.crossprods.Arr)
    Arr[-1, -1] = np.inf
    with pytest.raises(ModelError, match="overflow double precision"):
        check_magnitude(m.spec, dataclasses.replace(m.crossprods, Arr=Arr))


def test_response_too_large_is_refused_before_sampling():
    # before: * 1e50 made nutpie fail to initialise and the process segfault (exit 139); 1e50 now fits
    # (below), and 1e200 — whose squares overflow — is refused when the model is built
    d = load_dataset("sleepstudy").copy()
    d["Reaction"] = d["Reaction"] * 1e200
    with pytest.raises(BayesLMMError, match="overflow"):
        Model("Reaction ~ Days + (Days | Subject)", d)


# ------------------------------------------------------------------------------ scaled priors
def _logps(pairs) -> np.ndarray:
    """log densities of (prior, value) pairs by PyMC, compiled once."""
    import pymc as pm
    import pytensor

    # float64 arrays: PyTensor may hold a Python float such as 3.0 as a float32 constant (logp off by 2e-8)
    terms = [pm.logp(getattr(pm, p.family).dist(**{k: np.asarray(v, dtype=float) for k, v in p.params.items()}),
                     np.float64(v)) for p, v in pairs]
    return np.array(pytensor.function([], terms, mode="FAST_COMPILE")(), dtype=float)


SCALE_PRIORS = [Prior("HalfNormal", sigma=3.0), Prior("HalfStudentT", nu=4, sigma=2.0), Prior("HalfCauchy", beta=1.5),
                Prior("Exponential", lam=0.7), Prior("Gamma", alpha=2.0, beta=0.5),
                Prior("InverseGamma", alpha=3.0, beta=2.0), Prior("LogNormal", mu=0.3, sigma=0.8),
                Prior("Weibull", alpha=1.5, beta=2.0)]
LOCATION_PRIORS = [Prior("Normal", mu=1.0, sigma=3.0), Prior("StudentT", nu=5, mu=-1.0, sigma=2.0),
                   Prior("Cauchy", alpha=0.5, beta=1.5), Prior("Laplace", mu=2.0, b=1.2),
                   Prior("Logistic", mu=-0.5, s=0.8)]


def test_priors_move_as_a_change_of_variables():
    """p'(v') = p(v)·scale for v' = (v − shift)/scale, for every family a prior may name."""
    from bayeslmm.bayes.priors import BlockPriors, PriorSet

    assert {p.family for p in LOCATION_PRIORS} == set(LOCATION_FAMILIES)
    shift, scale = 7.0, 3.5
    original, moved = [], []
    for prior in LOCATION_PRIORS:
        ps = PriorSet(beta=(prior,), sigma=SCALE_PRIORS[0], blocks=(), centred=True, x_means=np.zeros(1))
        new = ps.standardised(shift, scale, 0).beta[0]
        for v in (-2.0, 4.0, 9.5):
            original.append((prior, v))
            moved.append((new, (v - shift) / scale))
    for prior in SCALE_PRIORS:
        ps = PriorSet(beta=(), sigma=prior, blocks=(BlockPriors(sd=prior, eta=2.0),), centred=False,
                      x_means=np.zeros(0))
        std = ps.standardised(shift, scale, -1)
        assert std.blocks[0].eta == 2.0
        for v in (0.3, 1.7, 6.0):
            original += [(prior, v), (prior, v)]
            moved += [(std.sigma, v / scale), (std.blocks[0].sd, v / scale)]
    np.testing.assert_allclose(_logps(moved), _logps(original) + np.log(scale), rtol=0, atol=1e-9)


def test_default_priors_are_equivariant():
    """The autoscaled defaults of c·y, standardised, are those of y standardised."""
    base = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    d = load_dataset("sleepstudy").copy()
    d["Reaction"] *= 1e15
    big = Model("Reaction ~ Days + (Days | Subject)", d)
    a = ResponseScale.of(base.spec, base.crossprods).priors(resolve_priors(base.spec, None))
    b = ResponseScale.of(big.spec, big.crossprods).priors(resolve_priors(big.spec, None))
    for pa, pb in zip(a.beta + (a.sigma, a.blocks[0].sd), b.beta + (b.sigma, b.blocks[0].sd)):
        for k in pa.params:
            np.testing.assert_allclose(pb.params[k], pa.params[k], rtol=1e-12, atol=1e-12)


def test_standardised_arrays_of_a_far_offset_response():
    """Arrays of (y − shift)/scale equal those of y, moved and divided, and keep their digits at +1e12."""
    d = load_dataset("sleepstudy").copy()
    far = d.assign(Reaction=d["Reaction"] + 1e12)
    m0, m1 = Model("Reaction ~ Days + (Days | Subject)", d), Model("Reaction ~ Days + (Days | Subject)", far)
    s0, s1 = ResponseScale.of(m0.spec, m0.crossprods), ResponseScale.of(m1.spec, m1.crossprods)
    assert s0.shift == 0.0 and s1.shift == pytest.approx(1e12 + d["Reaction"].mean())
    a, b = CollapsedData.from_crossprods(m0.crossprods, s0), CollapsedData.from_crossprods(m1.crossprods, s1)
    # the models of y/s0 and of (y + 1e12 − shift)/s1 differ by a move of the intercept: their residual
    # sums at the least-squares β agree (undoing the shift, as before, left ~4 of the 16 digits at +1e12)
    # (measured: 1.6e-7 relative, the rounding of y + 1e12 itself; the arrays of y with the shift undone,
    # which the sampler read before, gave a residual sum of 0.0 instead of 405251.6)
    np.testing.assert_allclose(b.G, a.G)
    assert _ols_rss(b) * s1.scale**2 == pytest.approx(_ols_rss(a) * s0.scale**2, rel=1e-6)
    undone = CollapsedData.from_crossprods(m1.crossprods)
    assert abs(_ols_rss(undone) - _ols_rss(a) * s0.scale**2) > 0.1 * _ols_rss(a) * s0.scale**2


def _ols_rss(data: CollapsedData) -> float:
    beta = np.linalg.solve(data.XtX, data.Xty)
    return float(data.yty - beta @ data.Xty)


# ------------------------------------------------------------------------------ NUTS at any scale
def _scaled_fit(c: float, **options):
    d = load_dataset("sleepstudy").copy()
    d["Reaction"] = d["Reaction"] * c
    return Model("Reaction ~ Days + (Days | Subject)", d).fit(method="nuts", **{**FAST, **options})


@pytest.fixture(scope="module")
def unit_fit():
    return _scaled_fit(1.0)


POSTERIOR_VARS = ("beta", "sigma", "Subject_sd", "Subject_corr", "Subject")


@pytest.mark.parametrize("c", [2.0**40, 2.0**-34])
def test_kernel_posterior_is_exactly_equivariant_for_powers_of_two(unit_fit, c):
    # c = 2^k leaves the standardised data bit-identical, so the draws must be c × those of y exactly
    # (any other c rounds the data, and NUTS's chains then part after a few iterations: see the next test)
    fit = _scaled_fit(c)
    for var in POSTERIOR_VARS:
        want = unit_fit.posterior[var].to_numpy() * (1.0 if var.endswith("_corr") else c)
        np.testing.assert_array_equal(fit.posterior[var].to_numpy(), want, err_msg=var)


def test_effect_summaries_and_redraws_are_in_the_response_units(unit_fit):
    # the integrated-out effects are drawn from y's own arrays after β, σ, L are mapped back
    from bayeslmm.bayes.fit import effect_draws

    c = 2.0**20
    a, b = _scaled_fit(1.0, effects="summary"), _scaled_fit(c, effects="summary")
    sa, sb = (f.idata["effects_summary"].to_dataset()["Subject"].to_numpy() for f in (a, b))
    np.testing.assert_array_equal(sb, sa * c)
    np.testing.assert_array_equal(effect_draws(b, ["308"]).to_numpy(), effect_draws(a, ["308"]).to_numpy() * c)
    np.testing.assert_allclose(effect_draws(a, ["308"]).to_numpy(),
                               unit_fit.posterior["Subject"].sel(Subject_level=["308"]).to_numpy(), rtol=1e-12)


def test_user_priors_in_data_units_give_the_same_model():
    c = 2.0**20
    priors = {"Days": Prior("Normal", mu=5.0, sigma=10.0), "sigma": Prior("HalfStudentT", nu=3, sigma=50.0),
              "Subject": {"sd": Prior("HalfCauchy", beta=[30.0, 8.0]), "eta": 2.0}}
    scaled = {"Days": Prior("Normal", mu=5.0 * c, sigma=10.0 * c), "sigma": Prior("HalfStudentT", nu=3, sigma=50.0 * c),
              "Subject": {"sd": Prior("HalfCauchy", beta=[30.0 * c, 8.0 * c]), "eta": 2.0}}
    a, b = _scaled_fit(1.0, priors=priors), _scaled_fit(c, priors=scaled)
    assert a.route == b.route == "one-factor"
    for var in POSTERIOR_VARS:
        want = a.posterior[var].to_numpy() * (1.0 if var.endswith("_corr") else c)
        np.testing.assert_array_equal(b.posterior[var].to_numpy(), want, err_msg=var)


def _z_scores(fit, ref, c: float, per_sd: bool = False) -> np.ndarray:
    """|mean difference| of β, σ and the sds, fit (of c·y) over c against ref, in MC standard errors
    (or, ``per_sd``, in ref's posterior sds)."""
    import arviz as az

    z = []
    for var in ("beta", "sigma", "Subject_sd"):
        a, b = ref.posterior[var], fit.posterior[var] / c
        diff = np.abs(a.mean(("chain", "draw")) - b.mean(("chain", "draw"))).to_numpy()
        se = np.sqrt(az.mcse(a.to_dataset(name=var))[var].to_numpy() ** 2
                     + az.mcse(b.to_dataset(name=var))[var].to_numpy() ** 2)
        z.append(np.ravel(diff / (a.std(("chain", "draw")).to_numpy() if per_sd else se)))
    return np.concatenate(z)


@pytest.mark.parametrize("c", [1e-10, 1e15, 1e50])
def test_kernel_posterior_scales_with_the_response(unit_fit, c):
    # before: * 1e15 gave β means [298.3, 0.06] (REML 251.41, 10.47) with R-hat 2.26; * 1e50 segfaulted.
    # measured after (seed 3): the largest difference 2.33 MC standard errors, 0.17 posterior
    # sds; R-hat ≤ 1.012
    fit = _scaled_fit(c)
    assert np.all(_z_scores(fit, unit_fit, c) < 7.0)
    assert np.all(_z_scores(fit, unit_fit, c, per_sd=True) < 0.5)
    assert fit.diagnostics().max_rhat < 1.1


def test_far_offset_response_samples_like_the_original(unit_fit):
    d = load_dataset("sleepstudy").copy()
    d["Reaction"] = d["Reaction"] + 1e12
    fit = Model("Reaction ~ Days + (Days | Subject)", d).fit(method="nuts", **FAST)
    shifted = fit.posterior.copy()
    beta = shifted["beta"].to_numpy().copy()
    beta[..., 0] -= 1e12
    shifted["beta"] = shifted["beta"].copy(data=beta)
    moved = type("Moved", (), {"posterior": shifted})()
    # before: β means [300.4, −0.33], σ 47.7, R-hat 1e16; measured after: ≤ 1.44 MC standard errors, 0.09 sds
    assert np.all(_z_scores(moved, unit_fit, 1.0) < 7.0)
    assert np.all(_z_scores(moved, unit_fit, 1.0, per_sd=True) < 0.5)


def test_pytensor_model_is_built_on_the_standardised_scale():
    """The PyMC graph of c·y (c = 1e50) holds the same data and priors as that of y, within rounding."""
    from bayeslmm.bayes.model import build_pymc_model

    models = []
    for c in (1.0, 1e50):
        d = load_dataset("sleepstudy").copy()
        d["Reaction"] = d["Reaction"] * c
        m = Model("Reaction ~ Days + (Days | Subject)", d)
        scale = ResponseScale.of(m.spec, m.crossprods)
        models.append(build_pymc_model(m.spec, m.crossprods, resolve_priors(m.spec, None), "collapsed",
                                       scale=scale).model)
    for name in ("Z1ty", "Xty", "yty"):
        np.testing.assert_allclose(models[1][name].get_value(), models[0][name].get_value(), rtol=1e-12)
    point = models[0].initial_point()
    lp = [float(m.compile_logp(mode="FAST_COMPILE")(point)) for m in models]
    assert lp[1] == pytest.approx(lp[0], rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [dict(route="graph", sampler="pymc"), dict(route="graph-explicit", sampler="pymc")])
def test_pytensor_routes_scale_with_the_response(kind):
    # measured: identical draws for c = 2^30 (collapsed) and 2^-20 (explicit); c = 1e50 within MC error
    ref = _scaled_fit(1.0, **kind)
    exact = _scaled_fit(2.0**30, **kind)
    for var in POSTERIOR_VARS:
        want = ref.posterior[var].to_numpy() * (1.0 if var.endswith("_corr") else 2.0**30)
        np.testing.assert_array_equal(exact.posterior[var].to_numpy(), want, err_msg=var)
    assert np.all(_z_scores(_scaled_fit(1e50, **kind), ref, 1e50) < 7.0)
