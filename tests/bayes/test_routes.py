"""``fit(method="nuts", route=...)``: one argument chooses how the posterior is computed (issue 10).

Every route name either fits a small model or raises a BayesLMMError that says why; ``fit.route``
records what ran, is saved and loaded with the fit (inferred for files saved before it was), and is
printed in the summary's header; the older ``backend=`` and ``parameterization=`` still work, with a
FutureWarning naming the route they spell.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from bayeslmm import CorAR1, Model, Prior, load
from bayeslmm import cli
from bayeslmm.bayes.fit import BACKEND_OF_ROUTE, ROUTES, resolve_route, route_from_old_keywords
from bayeslmm.bayes.priors import resolve_priors
from bayeslmm.bayes.results import RAN_ROUTES, BayesFit, route_of
from bayeslmm.bayes.summary import ROUTE_NOTES
from bayeslmm.errors import BayesLMMError

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(method="nuts", draws=20, tune=20, chains=1, random_seed=5, progressbar=False, warn=False)

#: what each route does on Dyestuff's one factor (σ²I): the route that runs, or the error's words
PLAIN = {"auto": "one-factor", "kernel": "one-factor", "one-factor": "one-factor", "blocked": "blocked",
         "partial": "partial", "graph": "graph", "graph-explicit": "graph-explicit",
         "structured": "route='structured' cannot fit this model: the structured kernel is for models with a "
                       "residual structure"}
#: and on Ovary with AR(1) residuals
AR1 = {"auto": "structured", "kernel": "structured", "structured": "structured",
       "graph": "graph-explicit", "graph-explicit": "graph-explicit",
       **{r: f"route='{r}' cannot fit this model: the one-factor, blocked and partly collapsed kernels sample "
             "R = σ²I" for r in ("one-factor", "blocked", "partial")}}


@pytest.fixture(scope="module")
def dyestuff():
    return Model("Yield ~ 1 + (1 | Batch)", "Dyestuff")


@pytest.fixture(scope="module")
def ovary():
    return Model("follicles ~ 1 + (1 | Mare)", "Ovary", correlation=CorAR1("Mare"))


def _fit_or_refuse(model, route: str, outcome: str):
    if outcome in ROUTES:
        fit = model.fit(route=route, **TINY)
        assert fit.route == outcome
        return fit
    with pytest.raises(BayesLMMError, match=re.escape(outcome)):
        model.fit(route=route, **TINY)
    return None


def test_the_tables_cover_every_route():
    assert set(PLAIN) == set(AR1) == set(ROUTES)
    assert set(BACKEND_OF_ROUTE) == set(ROUTE_NOTES) == set(RAN_ROUTES) == set(ROUTES) - {"auto", "kernel"}


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_fits_or_says_why_on_one_factor(dyestuff, route):
    fit = _fit_or_refuse(dyestuff, route, PLAIN[route])
    if fit is not None:   # every route gives the same variables: the effects of the factor included
        assert {"beta", "sigma", "Batch_sd", "Batch"} <= set(fit.posterior.data_vars)


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_fits_or_says_why_with_a_residual_structure(ovary, route):
    fit = _fit_or_refuse(ovary, route, AR1[route])
    if fit is not None:
        assert {"beta", "sigma", "Mare", "residual_Phi"} <= set(fit.posterior.data_vars)


def test_a_kernel_the_priors_rule_out_says_why(dyestuff):
    student = {"(Intercept)": Prior("StudentT", nu=3, mu=1500, sigma=100)}
    for route in ("kernel", "one-factor", "blocked", "partial"):
        with pytest.raises(BayesLMMError, match=f"route='{route}' cannot fit this model: .*Normal priors"):
            dyestuff.fit(route=route, priors=student, **TINY)
    priors = resolve_priors(dyestuff.spec, student)
    assert resolve_route(dyestuff.spec, priors) == "graph"   # auto falls back to the graph


def test_the_samplers_and_the_routes(dyestuff):
    """sampler= says which NUTS runs a graph route; the kernels run on nutpie only."""
    priors = resolve_priors(dyestuff.spec, None)
    assert resolve_route(dyestuff.spec, priors, "auto", "pymc") == "graph"
    assert resolve_route(dyestuff.spec, priors, "graph-explicit", "pymc") == "graph-explicit"
    assert resolve_route(dyestuff.spec, priors, "auto", "nutpie") == "one-factor"
    for route in ("kernel", "one-factor", "blocked", "partial", "structured"):
        with pytest.raises(BayesLMMError, match=f"route='{route}' is a compiled kernel, which runs on nutpie's "
                                                "NUTS only: use sampler='nutpie' or 'auto'"):
            resolve_route(dyestuff.spec, priors, route, "pymc")
    fit = dyestuff.fit(sampler="pymc", **TINY)
    assert (fit.route, fit.sampler) == ("graph", "pymc")
    assert (fit.parameterization, fit.timings["backend"]) == ("collapsed", "pytensor")   # the older names


def test_the_older_names_of_what_ran(dyestuff):
    one = dyestuff.fit(**TINY)
    explicit = dyestuff.fit(route="graph-explicit", **TINY)
    assert (one.route, one.parameterization, one.timings["backend"]) == ("one-factor", "collapsed", "kernel")
    assert (explicit.route, explicit.parameterization, explicit.timings["backend"]) == \
        ("graph-explicit", "explicit", "pytensor")
    for fit in (one, explicit):   # what fits recorded before the route gives it back
        assert route_of(fit.timings["backend"], fit.parameterization) == fit.route
    assert "Route: graph-explicit (PyMC graph: every random effect sampled)" in str(explicit.summary())
    assert one.to_dict()["route"] == "one-factor"


# -- saved and loaded -------------------------------------------------------------------------------
def test_the_route_round_trips_through_save_and_load(dyestuff, ovary, tmp_path):
    for i, fit in enumerate([dyestuff.fit(route="blocked", **TINY), ovary.fit(**TINY)]):
        fit.save(tmp_path / f"fit{i}.nc")
        back = load(tmp_path / f"fit{i}.nc")
        assert back.route == fit.route and back.timings == fit.timings
        route_line = [line for line in str(back.summary()).splitlines() if line.startswith("Route: ")]
        assert route_line == [f"Route: {fit.route} ({ROUTE_NOTES[fit.route]})"]


@pytest.mark.parametrize("backend, parameterization, route", [
    ("kernel", "collapsed", "one-factor"), ("blocked", "collapsed", "blocked"), ("partial", "collapsed", "partial"),
    ("structured", "collapsed", "structured"), ("pytensor", "collapsed", "graph"),
    ("pytensor", "explicit", "graph-explicit"), (None, "explicit", "graph-explicit"), (None, "collapsed", "graph"),
])
def test_a_record_saved_before_the_route_loads_with_it_inferred(dyestuff, backend, parameterization, route):
    fit = dyestuff.fit(**TINY)
    record, groups = fit.to_record()
    record = json.loads(json.dumps(record))
    del record["route"]
    record["parameterization"] = parameterization
    record["timings"] = {k: v for k, v in record["timings"].items() if k != "backend"}
    if backend is not None:
        record["timings"]["backend"] = backend
    assert BayesFit.from_record(record, fit.spec, groups).route == route


# -- the older keywords ------------------------------------------------------------------------------
@pytest.mark.parametrize("old, route", [
    (dict(backend="auto"), "auto"), (dict(backend="kernel"), "kernel"), (dict(backend="blocked"), "blocked"),
    (dict(backend="partial"), "partial"), (dict(backend="structured"), "structured"),
    (dict(backend="pytensor"), "graph"), (dict(parameterization="collapsed"), "auto"),
    (dict(parameterization="explicit"), "graph-explicit"),
    (dict(backend="pytensor", parameterization="explicit"), "graph-explicit"),
    (dict(backend="pytensor", parameterization="collapsed"), "graph"),
    (dict(backend="kernel", parameterization="collapsed"), "kernel"),
])
def test_the_older_keywords_spell_a_route_and_say_which(old, route):
    spelt = ", ".join(f"{k}={v!r}" for k, v in old.items())
    with pytest.warns(FutureWarning, match=re.escape(f"fit(): `{spelt}` is now `route={route!r}`")):
        assert route_from_old_keywords("auto", old.get("backend"), old.get("parameterization")) == route


@pytest.mark.parametrize("old, route, names", [
    (dict(backend="kernel", parameterization="explicit"), "auto", "backend='kernel' and parameterization='explicit'"),
    (dict(backend="pytensor"), "blocked", "backend='pytensor' and route='blocked'"),
    (dict(backend="blocked"), "partial", "backend='blocked' and route='partial'"),
    (dict(parameterization="explicit"), "graph", "parameterization='explicit' and route='graph'"),
    (dict(parameterization="collapsed"), "graph-explicit", "parameterization='collapsed' and route='graph-explicit'"),
])
def test_older_keywords_that_disagree_are_an_error(old, route, names):
    with pytest.raises(BayesLMMError, match=re.escape(f"{names} choose different routes: pass route= alone")):
        route_from_old_keywords(route, old.get("backend"), old.get("parameterization"))


def test_older_keywords_that_agree_with_route_are_accepted():
    with pytest.warns(FutureWarning):
        assert route_from_old_keywords("graph", "pytensor", None) == "graph"
    with pytest.warns(FutureWarning):   # backend='pytensor' was the PyMC graph, either parameterisation
        assert route_from_old_keywords("graph-explicit", "pytensor", "explicit") == "graph-explicit"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert route_from_old_keywords("blocked", None, None) == "blocked"


def test_the_older_keywords_still_fit_and_warn_at_the_callers_line(dyestuff):
    with pytest.warns(FutureWarning, match=re.escape("`backend='pytensor', parameterization='explicit'` is now "
                                                     "`route='graph-explicit'`")) as record:
        fit = dyestuff.fit(backend="pytensor", parameterization="explicit", **TINY)
    assert fit.route == "graph-explicit"
    assert {Path(w.filename).name for w in record if issubclass(w.category, FutureWarning)} == {"test_routes.py"}
    with pytest.warns(FutureWarning, match=re.escape("`backend='blocked'` is now `route='blocked'`")):
        assert dyestuff.fit(backend="blocked", **TINY).route == "blocked"
    with pytest.raises(BayesLMMError, match="choose different routes"):
        dyestuff.fit(backend="blocked", route="partial", **TINY)
    with pytest.raises(BayesLMMError, match=r"backend must be one of \['auto', 'kernel', 'blocked', 'partial', "
                                            r"'structured', 'pytensor'\], got 'jax'"):
        dyestuff.fit(backend="jax", **TINY)


def test_new_spellings_do_not_warn(dyestuff, recwarn):
    dyestuff.fit(route="one-factor", **TINY)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


# -- the command line and the docs ---------------------------------------------------------------------
def test_the_command_line_offers_every_route():
    assert cli.ROUTES == list(ROUTES)


def test_docs_and_examples_choose_routes_by_route():
    """No fit is taught with backend= or parameterization= (``Model.pymc_model(parameterization=)`` builds a
    graph, not a fit, and keeps its argument); whatchanged.md and vocabulary.md list the old names on purpose."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").glob("*.py"))]
    hits = []
    for f in files:
        if f.name in ("whatchanged.md", "vocabulary.md"):
            continue
        text = f.read_text()
        for m in re.finditer(r"\b(backend|parameterization)=[\"']", text):   # a value given: a call taught
            if "pymc_model(" not in text[max(m.start() - 60, 0):m.start()]:
                hits.append(f"{f.name}: {text[max(m.start() - 40, 0):m.end() + 12]!r}")
    assert not hits
