"""The structured kernel (bayes/structured.py): residual structures with every effect integrated out.

Its log-posterior is checked against a dense reference written here — y ~ MvNormal(Xβ,
σ²Λ_R(ρ) + ZΣZᵀ) with Λ_R from ``residual.relative_covariance`` (the REML engine's definition
of each structure), scipy's densities, LKJ and the Jacobians numerically (test_blocked's
reference) — its gradient against finite differences, its effect draws against the dense
Gaussian conditional, and its posterior against the PyMC graph's.
"""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from bayeslmm import Model, Prior
from bayeslmm.bayes.fit import resolve_route
from bayeslmm.bayes.model import centring_matrix
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.bayes.structured import StructuredData, draw_effects, residual_pieces, unsupported_reason
from bayeslmm.crossprod import block_Z
from bayeslmm.errors import BayesLMMError
from bayeslmm.residual import (CorAR1, CorCAR1, CorCompSymm, VarExp, VarFixed, VarIdent, VarPower,
                               relative_covariance)
from test_blocked import _agree_within_mcse, _dense_logp, assert_gradient_matches


def _data(seed=0, clusters=4, groups=3, per=6):
    """Clusters c ⊃ groups g with integer times (gaps), half-step times, a stratum s, a 3-valued covariate k,
    a positive covariate v and weights w."""
    rng = np.random.default_rng(seed)
    n_g = clusters * groups
    g = np.repeat(np.arange(n_g), per)
    c = g // groups
    t = np.concatenate([np.sort(rng.choice(10, per, replace=False)) for _ in range(n_g)]).astype(float)
    n = g.size
    x = rng.normal(size=n)
    ug = rng.normal(size=(n_g, 2)) * [1.0, 0.4]
    y = 3.0 + 0.5 * x + ug[g, 0] + ug[g, 1] * x + rng.normal(size=n) * 0.8
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{i}" for i in g], "c": [f"c{i}" for i in c], "t": t,
                         "th": t / 2.0, "t1": t + 1.0, "s": rng.choice(["a", "b"], n),
                         "k": rng.choice([0.0, 1.0, 2.5], n),
                         "v": rng.uniform(0.5, 3.0, n), "w": rng.uniform(0.5, 2.0, n)})


#: (formula, residual structure): AR(1) in row order and with gaps, CAR(1), compound symmetry, the
#: variance functions, known weights, a variance and a correlation together; q = 1, q = 2, nested factors
CASES = {
    "ar1_rows": ("y ~ x + (1 | g)", dict(correlation=CorAR1("g"))),
    "ar1_gaps_varident": ("y ~ x + (1 + x | g)", dict(variance=VarIdent("s"), correlation=CorAR1("g", time="t"))),
    "car1_half_steps": ("y ~ x + (1 | g)", dict(correlation=CorCAR1("g", "th"))),
    "nested_ar1": ("y ~ x + (1 | c/g)", dict(correlation=CorAR1("g", time="t"))),
    "varpower": ("y ~ x + (1 + x | g)", dict(variance=VarPower("t1"))),
    "varexp_compsymm": ("y ~ x + (1 | c)", dict(variance=VarExp("k"), correlation=CorCompSymm("g"))),
    "compsymm_weights": ("y ~ x + (x || c)", dict(correlation=CorCompSymm("g"), weights="w")),
    "varfixed": ("y ~ x + (1 | g)", dict(variance=VarFixed("v"))),
}
PRIORS = {"sigma": Prior("HalfStudentT", nu=4, sigma=2.0)}


def _setup(name, priors=PRIORS, seed=0):
    formula, structure = CASES[name]
    m = Model(formula, _data(seed), **structure)
    ps = resolve_priors(m.spec, priors)
    return m, ps, StructuredData.build(m.spec, m.crossprods, ps, centring_matrix(m.spec, ps))


def _residual_prior(prior, value, coordinate, ratio):
    """scipy's density of a residual parameter's prior, plus the Jacobian of the kernel's coordinate."""
    p = prior.params
    if prior.family == "Uniform":
        s = 1.0 / (1.0 + math.exp(-coordinate))
        width = p["upper"] - p["lower"]
        return st.uniform(p["lower"], width).logpdf(value) + math.log(width * s * (1 - s))
    if prior.family == "LogNormal":
        return st.lognorm(s=p["sigma"], scale=math.exp(p.get("mu", 0.0))).logpdf(value) + coordinate
    assert prior.family == "Normal" and not ratio
    return st.norm(p.get("mu", 0.0), p["sigma"]).logpdf(value)


def _dense_structured(m, ps, sd, x):
    spec, res = m.spec, m.spec.residual
    natural = sd.constrain(x[None])["residual"][0]
    u = res.unconstrained(dict(zip(res.names, natural)))
    lp = _dense_logp(m, ps, sd, x, relative_covariance(res, u, np.arange(spec.n_obs)))
    for i, (_, prior) in enumerate(ps.residual):
        lp += _residual_prior(prior, natural[i], x[sd.res_x0 + i], bool(sd.res_ratio[i]))
    return lp


def _points(sd, rng, k=3):
    for _ in range(k):
        x = sd.initial_point(rng)
        x[: sd.p] += rng.normal(0, 1, sd.p)
        x[sd.p:] += rng.normal(0, 0.4, sd.ndim - sd.p)
        yield x


@pytest.mark.parametrize("name", list(CASES))
def test_value_equals_dense_reference(name):
    m, ps, sd = _setup(name)
    for x in _points(sd, np.random.default_rng(1)):
        lp, _ = sd.logp_and_grad(x)
        assert lp == pytest.approx(_dense_structured(m, ps, sd, x), rel=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_equals_finite_differences(name):
    _, _, sd = _setup(name)
    for x in _points(sd, np.random.default_rng(2), 2):
        assert_gradient_matches(sd, x)


def test_pieces_are_few_and_free_of_the_rows():
    """AR(1) in row order: the first rows, and one lag's current, previous and cross pieces."""
    m, _, sd = _setup("ar1_rows")
    assert list(residual_pieces(m.spec).kind) == [0, 1, 2, 3]
    assert sd.cArr.shape[0] == 4 and sd.cA11.shape[1:] == (m.spec.blocks[0].n_levels, 1, 1)


def test_boundaries_are_rejected_not_nan():
    """φ at ±1 (coordinate ±40, ±800), sds and σ at e^±40: a finite value or −inf with a zero gradient."""
    _, _, sd = _setup("ar1_gaps_varident")
    x0 = next(_points(sd, np.random.default_rng(3), 1))
    for k in (sd.p, sd.ndim - 1, sd.ndim - 2):
        for v in (-800.0, -40.0, 40.0, 800.0):
            x = x0.copy()
            x[k] = v
            lp, grad = sd.logp_and_grad(x)
            assert lp == -math.inf and not grad.any() or (math.isfinite(lp) and np.isfinite(grad).all())


class _Queue:
    """A stand-in generator returning the given 'standard normals' in order."""

    def __init__(self, *arrays):
        self.arrays = list(arrays)

    def standard_normal(self, shape):
        out = self.arrays.pop(0)
        assert out.shape == shape
        return out


@pytest.mark.parametrize("name", ["nested_ar1", "ar1_gaps_varident", "varexp_compsymm"])
def test_effects_are_drawn_from_their_exact_conditional(name):
    """Every block's effects: mean (ε = 0) and covariance (ε = unit vectors) equal the dense Gaussian conditional."""
    m, _, sd = _setup(name)
    spec, res = m.spec, m.spec.residual
    x = next(_points(sd, np.random.default_rng(6), 1))
    first = spec.blocks[0]
    n1q1, mR = first.n_effects, sum(b.n_effects for b in spec.blocks[1:])
    k = 1 + mR + n1q1
    eps_rest, eps_first = np.zeros((k, mR)), np.zeros((k, first.n_levels, first.q))
    eps_rest[1 : 1 + mR] = np.eye(mR)
    eps_first[1 + mR :] = np.eye(n1q1).reshape(n1q1, first.n_levels, first.q)
    b1, br = draw_effects(sd, np.repeat(x[None], k, axis=0), _Queue(eps_rest, eps_first))
    b = np.hstack([b1.reshape(k, -1), br])
    mean, A = b[0], (b[1:] - b[0]).T
    c = sd.constrain(x)
    u = res.unconstrained(dict(zip(res.names, c["residual"])))
    Z = np.hstack([block_Z(blk).toarray() for blk in spec.blocks])
    covs = [np.kron(np.eye(blk.n_levels), C @ C.T) for blk, C in zip(spec.blocks, c["factor"])]
    Sig = np.zeros((Z.shape[1], Z.shape[1]))
    o = 0
    for cv in covs:
        Sig[o : o + len(cv), o : o + len(cv)] = cv
        o += len(cv)
    V = c["sigma"] ** 2 * relative_covariance(res, u, np.arange(spec.n_obs)) + Z @ Sig @ Z.T
    KZ = Sig @ Z.T @ np.linalg.inv(V)
    np.testing.assert_allclose(mean, KZ @ (spec.y - spec.X @ c["beta"]), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(A @ A.T, Sig - KZ @ Z @ Sig, rtol=1e-8, atol=1e-10)


def test_routes():
    """The default route of a structured model is this kernel; where its pieces would be too many
    (CAR(1) with every lag distinct) the PyMC graph samples it, and a route asked for by name says why."""
    m, ps, _ = _setup("ar1_rows")
    assert resolve_route(m.spec, ps) == "structured"
    data = _data()
    data["tc"] = data["t"] + np.random.default_rng(0).uniform(0, 0.5, len(data))
    many = Model("y ~ x + (1 | g)", data, correlation=CorCAR1("g", "tc"))
    ps2 = resolve_priors(many.spec, None)
    assert "distinct lags" in unsupported_reason(many.spec, ps2)
    assert resolve_route(many.spec, ps2) == "graph-explicit"
    with pytest.raises(BayesLMMError, match="distinct lags"):
        resolve_route(many.spec, ps2, "structured")
    with pytest.raises(BayesLMMError, match="sample R = σ²I"):
        resolve_route(m.spec, ps, "blocked")
    plain = Model("y ~ x + (1 | g)", data)
    with pytest.raises(BayesLMMError, match="residual structure"):
        resolve_route(plain.spec, resolve_priors(plain.spec, None), "structured")
    custom = resolve_priors(m.spec, {"residual_Phi": Prior("Uniform", lower=0, upper=1)})
    assert resolve_route(m.spec, custom) == "structured"


GRAPH_CHECKED = ["ar1_gaps_varident"]   # the others behind `slow` (each fits the PyMC graph)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in GRAPH_CHECKED else pytest.mark.slow)
                                  for n in CASES])
def test_posterior_equals_the_pymc_graphs(name):
    """The same posterior as the PyMC graph's (every effect sampled, the whitened residuals' density)."""
    formula, structure = CASES[name]
    m = Model(formula, _data(seed=4), **structure)
    opts = dict(method="nuts", draws=1000, tune=1000, chains=2, random_seed=11, progressbar=False, warn=False)
    fast = m.fit(**opts)
    assert fast.route == "structured"
    # nutpie cannot start the graph of varPower with a correlated block ("Failed to generate a new initial
    # position": cannot set WRITEABLE flag, inside nutpie); PyMC's own NUTS samples it
    graph = m.fit(route="graph", sampler="pymc" if name == "varpower" else "nutpie", **opts)
    assert graph.route == "graph-explicit"
    _agree_within_mcse(fast, graph)
    assert "residual structure's cross-products" in str(fast.summary())


def test_effects_summary_is_refused_and_every_draw_is_kept(monkeypatch):
    """No per-level summary mode on this route: effects='summary' is refused, and past the storage default
    every draw is kept with a warning that says so (never silently)."""
    import bayeslmm.bayes.fit as fit_module

    formula, structure = CASES["ar1_rows"]
    m = Model(formula, _data(), **structure)
    opts = dict(method="nuts", draws=50, tune=50, chains=1, random_seed=1, progressbar=False)
    with pytest.raises(BayesLMMError, match="effects='summary'"):
        m.fit(effects="summary", **opts)
    monkeypatch.setattr(fit_module, "MAX_EFFECT_VALUES", 10)
    with pytest.warns(UserWarning, match="every draw of g's 12 random effects is kept"):
        fit = m.fit(warn=True, **opts)
    assert fit.posterior["g"].shape == (1, 50, 12, 1)
