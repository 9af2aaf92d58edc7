"""pooling_table on models with group-level predictors and nested factors (issue 14).

nlme's Orthodont (Sex constant within a child) and BodyWeight (Diet constant within a
rat) used to give no-pooling intercepts of 1e13 to 1e15, and nested cells lines without
their parent's effect.  Every line is checked here against an independent computation:
per-level ``numpy.linalg.lstsq`` of the response (no pooling), of the fit's own fitted
values (partial pooling) and of ``X β`` (population, complete pooling).
The data files are copies of ``write.csv`` exports of nlme 3.1-162's data sets
(Potthoff & Roy 1964; Crowder & Hand 1990), GPL like nlme.
"""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model
from bayeslmm.errors import ModelError
from bayeslmm.pooling import least_squares, pooling_table

DATA = Path(__file__).parents[1] / "data"


def orthodont(reference="Female"):
    d = pd.read_csv(DATA / "Orthodont.csv")
    sexes = [reference] + [s for s in ("Female", "Male") if s != reference]
    d["Sex"] = pd.Categorical(d["Sex"], categories=sexes)
    d["Subject"] = d["Subject"].astype("category")
    return d


def bodyweight():
    d = pd.read_csv(DATA / "BodyWeight.csv")
    d["Rat"] = pd.Categorical(d["Rat"].astype(str), categories=[str(r) for r in sorted(d["Rat"].unique())])
    d["Diet"] = d["Diet"].astype(str).astype("category")
    return d


def machines(seed=4):
    """A Machines-like design: 6 workers × 3 machines × 3 replicates, scores near 60."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(6):
        worker = rng.normal(0, 5)
        for m, machine in zip("ABC", (0.0, 3.0, 8.0)):
            cell = rng.normal(0, 3)
            rows += [(f"W{w}", m, 60 + machine + worker + cell + rng.normal(0, 1)) for _ in range(3)]
    d = pd.DataFrame(rows, columns=["Worker", "Machine", "score"])
    return d.astype({"Worker": "category", "Machine": "category"})


def within(frame, lo, hi) -> bool:
    values = frame.to_numpy(float)
    return bool(np.all((values > lo) & (values < hi)))


def per_level_fit(values, group, Z):
    """Each level's least-squares coefficients of ``values`` on the columns ``Z`` (numpy.lstsq)."""
    out = {}
    for level in group.cat.categories:
        rows = np.flatnonzero(group.to_numpy() == level)
        out[str(level)] = np.linalg.lstsq(Z[rows], values[rows], rcond=None)[0]
    return pd.DataFrame(out).T


@pytest.fixture(scope="module")
def ortho_fit():
    d = orthodont()
    return d, Model("distance ~ age + Sex + (age | Subject)", d).fit()


@pytest.fixture(scope="module")
def body_fit():
    d = bodyweight()
    return d, Model("weight ~ Time * Diet + (Time | Rat)", d).fit()


def check_lines(table, fit, d, group, Z, y, beta_ols, parent=0.0):
    """No pooling, partial, population and complete pooling against per-level lstsq.

    ``parent``: the fitted values' part from the factors the group is nested in (they
    belong to the population line, the shrinkage target).
    """
    X = fit.spec.X
    expected = {"no_pooling": per_level_fit(y, d[group], Z),
                "partial": per_level_fit(fit.fitted.to_numpy(), d[group], Z),
                "population": per_level_fit(X @ fit.fixef.to_numpy() + parent, d[group], Z),
                "complete": per_level_fit(X @ beta_ols, d[group], Z)}
    for kind, frame in expected.items():
        np.testing.assert_allclose(table[kind].to_numpy(), frame.loc[table.index].to_numpy(), rtol=1e-8,
                                   atol=1e-8, err_msg=kind)
    npool, part, pop = (table[k].to_numpy() for k in ("no_pooling", "partial", "population"))
    np.testing.assert_allclose(table["shrinkage"].to_numpy(), (npool - part) / (npool - pop), rtol=1e-10)


def test_orthodont_lines_are_each_childs_own(ortho_fit):
    d, fit = ortho_fit
    table = pooling_table(fit)
    Z = np.column_stack([np.ones(len(d)), d["age"]])
    beta_ols = np.linalg.lstsq(fit.spec.X, d["distance"].to_numpy(), rcond=None)[0]
    check_lines(table, fit, d, "Subject", Z, d["distance"].to_numpy(), beta_ols)
    assert table.attrs["group_level"] == ["Sex[Male]"] and table.attrs["shared"] == {}
    # the bug: 2e13..2e14 intercepts and shrinkage 1.0 for every boy; distances are 16.5 to 31.5 mm
    values = table[["complete", "no_pooling", "partial", "population"]]
    assert np.isfinite(values.to_numpy()).all() and (table["note"] == "").all()
    assert values.xs("(Intercept)", axis=1, level=1).abs().max().max() < 40
    assert values.xs("age", axis=1, level=1).abs().max().max() < 3
    # a boy's population line has the boys' intercept: β0 + β_Male
    beta = fit.fixef
    boys = table.index.str.startswith("M")
    assert table.loc[boys, ("population", "(Intercept)")].to_numpy() == pytest.approx(
        beta["(Intercept)"] + beta["Sex[Male]"], rel=1e-12)
    assert table.loc[~boys, ("population", "(Intercept)")].to_numpy() == pytest.approx(beta["(Intercept)"], rel=1e-12)
    # no covariates: "separate" (lmList) is the same fit
    separate = pooling_table(fit, no_pooling="separate")
    np.testing.assert_allclose(separate["no_pooling"].to_numpy(), table["no_pooling"].to_numpy(), rtol=1e-10)


def test_orthodont_does_not_depend_on_the_reference_sex(ortho_fit):
    _, fit = ortho_fit
    table = pooling_table(fit)
    other = pooling_table(Model("distance ~ age + Sex + (age | Subject)", orthodont("Male")).fit())
    assert other.attrs["group_level"] == ["Sex[Female]"]
    np.testing.assert_allclose(other["no_pooling"].to_numpy(), table["no_pooling"].to_numpy(), rtol=1e-10)
    for kind in ("partial", "population", "complete"):  # the same model: REML agrees to its optimizer
        np.testing.assert_allclose(other[kind].to_numpy(), table[kind].to_numpy(), rtol=1e-4, err_msg=kind)


def test_bodyweight_diet_two_and_three_rats(body_fit):
    d, fit = body_fit
    table = pooling_table(fit)
    Z = np.column_stack([np.ones(len(d)), d["Time"]])
    beta_ols = np.linalg.lstsq(fit.spec.X, d["weight"].to_numpy(float), rcond=None)[0]
    check_lines(table, fit, d, "Rat", Z, d["weight"].to_numpy(float), beta_ols)
    assert sorted(table.attrs["group_level"]) == ["Diet[2]", "Diet[3]", "Time:Diet[2]", "Time:Diet[3]"]
    # the bug: 4.5e15 for the Diet 2 and 3 rats; weights are 225 to 628 g
    lines = table[["complete", "no_pooling", "partial", "population"]]
    assert np.isfinite(lines.to_numpy()).all()
    assert lines.xs("(Intercept)", axis=1, level=1).stack().between(150, 700).all()
    beta = fit.fixef
    diet = d.groupby("Rat", observed=True)["Diet"].first().astype(str).loc[table.index]
    for k in ("2", "3"):
        rats = (diet == k).to_numpy()
        assert table.loc[rats, ("population", "Time")].to_numpy() == pytest.approx(
            beta["Time"] + beta[f"Time:Diet[{k}]"], rel=1e-10)
        assert table.loc[rats, ("population", "(Intercept)")].to_numpy() == pytest.approx(
            beta["(Intercept)"] + beta[f"Diet[{k}]"], rel=1e-10)


def test_nested_cells_include_their_workers_effect():
    d = machines()
    fit = Model("score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", d).fit()
    table = pooling_table(fit, group="Worker:Machine")
    cell = (d["Worker"].astype(str) + ":" + d["Machine"].astype(str)).astype("category")
    ones = np.ones((len(d), 1))
    beta_ols = np.linalg.lstsq(fit.spec.X, d["score"].to_numpy(), rcond=None)[0]
    b_worker = fit.ranef()["Worker"]["(Intercept)"]
    worker_part = b_worker.loc[d["Worker"].astype(str)].to_numpy()
    check_lines(table, fit, d.assign(cell=cell), "cell", ones, d["score"].to_numpy(), beta_ols, parent=worker_part)
    # the bug: −1.4 and 10.3 against scores near 60, shrinkage 3.70 and −6.35
    means = d.groupby(cell, observed=True)["score"].mean()
    np.testing.assert_allclose(table[("no_pooling", "(Intercept)")], means.loc[table.index], rtol=1e-12)
    assert within(table[["no_pooling", "partial", "population"]], 40, 85)
    # the cell's line is its worker's line (its population line: where it is pulled) plus its own effect
    b_cell = fit.ranef()["Worker:Machine"]["(Intercept)"]
    np.testing.assert_allclose(table[("partial", "(Intercept)")] - table[("population", "(Intercept)")],
                               b_cell.loc[table.index].to_numpy(), atol=1e-9)
    # a cell's own mean is pulled towards its worker's line, part of the way
    s = table[("shrinkage", "(Intercept)")]
    assert np.isfinite(s).all() and ((s > 0) & (s < 1)).all()


def test_nested_parent_with_the_machines_as_shared_covariates():
    d = machines()
    fit = Model("score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", d).fit()
    table = pooling_table(fit, group="Worker")
    assert set(table.attrs["shared"]) == {"Machine[B]", "Machine[C]"}
    # Gelman & Hill's indicator regression: one intercept per worker, machine effects common
    codes = d["Worker"].cat.codes.to_numpy()
    A = np.column_stack([np.eye(6)[codes], fit.spec.X[:, 1:]])
    sol = np.linalg.lstsq(A, d["score"].to_numpy(), rcond=None)[0]
    np.testing.assert_allclose(table[("no_pooling", "(Intercept)")], sol[:6], rtol=1e-10)
    # partial: the fitted values with the machines' fixed part taken out, averaged per worker
    adjusted = fit.fitted.to_numpy() - fit.spec.X[:, 1:] @ fit.fixef.to_numpy()[1:]
    expected = pd.Series(adjusted).groupby(d["Worker"].astype(str).to_numpy()).mean()
    np.testing.assert_allclose(table[("partial", "(Intercept)")], expected.loc[table.index], rtol=1e-10)
    assert within(table[["no_pooling", "partial"]], 40, 85)


def test_exam_school_average_is_a_group_level_predictor():
    """The case that raised before: schavg is constant within a school, so it is in the school's line."""
    fit = Model("normexam ~ standLRT + schavg + (1 | school)", "exam").fit()
    table = pooling_table(fit)
    assert table.attrs["group_level"] == ["schavg"] and list(table.attrs["shared"]) == ["standLRT"]
    df = fit.spec.data
    codes = pd.Categorical(df["school"].astype(str), categories=list(table.index)).codes
    A = np.column_stack([np.eye(len(table))[codes], df["standLRT"].to_numpy(float)])
    sol = np.linalg.lstsq(A, df["normexam"].to_numpy(float), rcond=None)[0]
    np.testing.assert_allclose(table[("no_pooling", "(Intercept)")], sol[:-1], rtol=1e-8)
    assert table.attrs["shared"]["standLRT"] == pytest.approx(sol[-1], rel=1e-8)
    assert np.isfinite(table[["no_pooling", "partial", "population", "shrinkage"]].to_numpy()).all()


# ------------------------------------------------------------------ the rank guard
def test_rank_guard_sees_a_column_reduced_to_rounding():
    """Orthodont's Sex with each child's (1, age) projected out is rounding noise: not a column."""
    d = orthodont()
    male = (d["Sex"] == "Male").to_numpy(float)
    noise = male.copy()
    for _, rows in d.groupby("Subject", observed=True).indices.items():
        Z = np.column_stack([np.ones(len(rows)), d["age"].to_numpy(float)[rows]])
        noise[rows] -= Z @ np.linalg.lstsq(Z, male[rows], rcond=None)[0]
    assert 0 < np.abs(noise).max() < 1e-13  # what made the old fit give 2e14
    _, ok, rank = least_squares(noise[:, None], d["distance"].to_numpy(), norms=[np.linalg.norm(male)])
    assert rank == 0 and not ok.any()
    # a real but small column still counts: 1e-6 of the original length is far above rounding
    small = noise + 1e-6 * np.sin(np.arange(len(d)))
    assert least_squares(small[:, None], d["distance"].to_numpy(), norms=[np.linalg.norm(male)])[2] == 1


def test_covariates_that_combine_into_a_group_level_column_are_refused():
    rng = np.random.default_rng(8)
    g = np.repeat(np.arange(10), 6)
    x1 = rng.normal(size=60)
    level = rng.normal(size=10)[g]
    d = pd.DataFrame({"g": pd.Categorical(g.astype(str)), "x1": x1, "x2": level - x1,
                      "y": level + x1 + rng.normal(size=60)})
    fit = Model("y ~ x1 + x2 + (1 | g)", d).fit()
    with pytest.raises(ModelError, match=r"\['x1', 'x2'\].*no_pooling='separate'"):
        pooling_table(fit)
    table = pooling_table(fit, no_pooling="separate")  # each group's own lmList fit: x2 = level − x1 there
    assert table[("no_pooling", "(Intercept)")].isna().all()
    assert table["note"].str.contains("collinear").all()
    assert np.isfinite(table[["partial", "population"]].to_numpy()).all()


# ---------------------------------------------------------------------- Bayesian
def test_orthodont_nuts_lines_are_posterior_mean_lines(ortho_fit):
    d, reml = ortho_fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = Model("distance ~ age + Sex + (age | Subject)", d).fit(
            method="nuts", chains=2, draws=200, tune=200, random_seed=5, progressbar=False)
    table = pooling_table(fit)
    post = fit.posterior
    beta = post["beta"].mean(("chain", "draw")).sel(coef=list(fit.spec.fixed_names)).to_numpy()
    b = fit.effect_means(0)
    Z = np.column_stack([np.ones(len(d)), d["age"]])
    codes = d["Subject"].cat.codes.to_numpy()
    mean_fitted = fit.spec.X @ beta + np.einsum("nq,nq->n", Z, b[codes])
    np.testing.assert_allclose(table["partial"].to_numpy(),
                               per_level_fit(mean_fitted, d["Subject"], Z).loc[table.index].to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(table["population"].to_numpy(),
                               per_level_fit(fit.spec.X @ beta, d["Subject"], Z).loc[table.index].to_numpy(),
                               rtol=1e-8)
    assert table.attrs["method"] == "NUTS"
    reml_table = pooling_table(reml)
    pd.testing.assert_frame_equal(table["no_pooling"], reml_table["no_pooling"])
    # posterior means near REML's modes where the data are (age 11); the intercepts (age 0) are far
    # extrapolations, where the outlying M13 differs by 3.8 mm
    at_11 = {k: t[("partial", "(Intercept)")] + 11 * t[("partial", "age")] for k, t in (("nuts", table),
                                                                                      ("reml", reml_table))}
    assert np.abs(at_11["nuts"] - at_11["reml"]).max() < 0.5  # reached 0.12 (seed 5)
    assert np.abs(table[("partial", "age")] - reml_table[("partial", "age")]).max() < 1.0  # reached 0.34 (M13)


def test_a_one_row_child_keeps_its_model_lines():
    """A child measured once: no own line, but its population and partial lines (Sex included) are exact."""
    d = orthodont()
    d = d[(d["Subject"] != "M05") | (d["age"] == 8)]
    fit = Model("distance ~ age + Sex + (age | Subject)", d).fit()
    table = pooling_table(fit)
    row = table.loc["M05"]
    assert row["n"].item() == 1 and row["no_pooling"].isna().all() and "fewer observations (1)" in row["note"].item()
    beta, b = fit.fixef, fit.ranef()["Subject"].loc["M05"]
    assert row[("population", "(Intercept)")] == pytest.approx(beta["(Intercept)"] + beta["Sex[Male]"], rel=1e-12)
    assert row[("partial", "(Intercept)")] == pytest.approx(
        beta["(Intercept)"] + beta["Sex[Male]"] + b["(Intercept)"], rel=1e-12)
    assert row[("partial", "age")] == pytest.approx(beta["age"] + b["age"], rel=1e-12)
    assert table.attrs["group_level"] == ["Sex[Male]"]
