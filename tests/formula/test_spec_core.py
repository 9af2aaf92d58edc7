"""One spec-building core: the in-memory and the out-of-core builders agree on real data.

Both builders run the stages of ``bayeslmm.formula.core``; here they are fed the same
rows (a pandas frame, and the same frame as a Dask DataFrame in several partitions)
and must give the same spec, the same cross-products and the same error messages.
Data: nlme's Orthodont (a string fixed-effect factor, Sex), nlme's BodyWeight (rats
nested in diets), lmerTest's carrots (consumers crossed with products; 72 rows lack
Income and 3 lack Preference).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

dd = pytest.importorskip("dask.dataframe")

from bayeslmm.crossprod import CrossProducts  # noqa: E402
from bayeslmm.errors import BayesLMMError  # noqa: E402
from bayeslmm.formula import build_spec  # noqa: E402
from bayeslmm.outofcore import build_out_of_core  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"  # tests/data: copies of ../shared/data's files
#: the largest entrywise difference reached is 3.3e-14 relative (carrots' B; summation order only)
RTOL = 1e-12


def read(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / f"{name}.csv")


CASES = {
    # a string fixed-effect factor and its interaction with a slope; correlated random slope
    "orthodont": ("distance ~ age * Sex + (age | Subject)", "Orthodont", {}, 3),
    # nested: (1 | Diet/Rat) is (1 | Diet) + (1 | Diet:Rat)
    "bodyweight_nested": ("weight ~ Time + (1 | Diet/Rat)", "BodyWeight", {}, 4),
    # crossed, with a categorical call and rows with missing values dropped
    "carrots_missing": ("Preference ~ sens1 + sens2 + C(Homesize) + Income + (1 | Consumer) + (1 | Product)",
                        "carrots", {"missing": "drop"}, 5),
}


def both(formula: str, df: pd.DataFrame, nparts: int, **kw):
    """The spec of each builder, and the warnings each gave."""
    with warnings.catch_warnings(record=True) as w_mem:
        warnings.simplefilter("always")
        mem = build_spec(formula, df, **kw)
    with warnings.catch_warnings(record=True) as w_ooc:
        warnings.simplefilter("always")
        ooc, cp = build_out_of_core(formula, dd.from_pandas(df, npartitions=nparts), **kw)
    return mem, (ooc, cp), [str(w.message) for w in w_mem], [str(w.message) for w in w_ooc]


def relative_gap(a, b) -> float:
    a = a.toarray() if hasattr(a, "toarray") else np.asarray(a, dtype=float)
    b = b.toarray() if hasattr(b, "toarray") else np.asarray(b, dtype=float)
    assert a.shape == b.shape
    scale = np.abs(b) + 1e-3 * (np.max(np.abs(b)) if b.size else 0.0)  # a floor for entries near 0
    return float(np.max(np.abs(a - b) / np.where(scale > 0, scale, 1.0))) if b.size else 0.0


@pytest.fixture(scope="module", params=list(CASES))
def built(request):
    formula, name, kw, nparts = CASES[request.param]
    return request.param, *both(formula, read(name), nparts, **kw)


def test_same_spec(built):
    name, mem, (ooc, _), w_mem, w_ooc = built
    assert ooc.n_obs == mem.n_obs and ooc.fixed_names == mem.fixed_names
    assert (ooc.formula, ooc.response, ooc.fixed_formula) == (mem.formula, mem.response, mem.fixed_formula)
    assert ooc.notes == mem.notes and ooc.dropped_fixed == mem.dropped_fixed
    assert [(b.group, b.levels, b.columns, b.correlated, b.n_levels) for b in ooc.blocks] == \
           [(b.group, b.levels, b.columns, b.correlated, b.n_levels) for b in mem.blocks]
    assert w_ooc == w_mem
    # y and X as the out-of-core spec keeps them: their moments
    m = ooc.moments
    assert m.y.n == len(mem.y) and m.y.minimum[0] == mem.y.min() and m.y.maximum[0] == mem.y.max()
    assert relative_gap(m.y.mean, [mem.y.mean()]) < RTOL
    assert relative_gap(m.X.mean, mem.X.mean(axis=0)) < RTOL
    assert relative_gap(m.X.max_abs, np.abs(mem.X).max(axis=0)) < RTOL


def test_same_crossproducts(built):
    name, mem, (_, cp), _, _ = built
    ref = CrossProducts.from_spec(mem)
    assert (cp.n_obs, cp.m, cp.rest_offsets) == (ref.n_obs, ref.m, ref.rest_offsets)
    for part in ("A11", "Arr", "B", "P"):
        assert relative_gap(getattr(cp, part), getattr(ref, part)) < RTOL, part
    assert np.array_equal(cp.S_rows, ref.S_rows) and np.array_equal(cp.S_cols, ref.S_cols)


def test_the_cases_cover_what_they_claim():
    carrots = read("carrots")
    lacking = carrots[["Preference", "Income"]].isna().any(axis=1).sum()
    with pytest.warns(UserWarning, match=f"dropped {lacking} of {len(carrots)} rows"):
        spec = build_spec(CASES["carrots_missing"][0], carrots, missing="drop")
    assert lacking > 0 and spec.n_obs == len(carrots) - lacking
    orthodont = read("Orthodont")
    assert orthodont["Sex"].dtype == object or pd.api.types.is_string_dtype(orthodont["Sex"])
    assert any(name.startswith("Sex") for name in build_spec(CASES["orthodont"][0], orthodont).fixed_names)
    groups = [b.group for b in build_spec(CASES["bodyweight_nested"][0], read("BodyWeight")).blocks]
    assert groups == ["Diet:Rat", "Diet"]


def _error(builder, formula, df, **kw) -> tuple[type, str]:
    with pytest.raises(BayesLMMError) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            builder(formula, df, **kw)
    return type(info.value), str(info.value)


BAD = {
    "unknown column": ("distance ~ agee + (1 | Subject)", "Orthodont", {}, "unknown column 'agee'"),
    "missing values": ("Preference ~ sens1 + Income + (1 | Consumer)", "carrots", {},
                       "missing or infinite values in the columns the model uses ('Preference': 3 rows, "
                       "'Income': 72 rows; 75 of 1236 rows in all)"),
    # a categorical (a string column's dtype is named differently by pandas and by Dask)
    "categorical response": ("Sex ~ age + (1 | Subject)", "Orthodont",
                             {"data": lambda d: d.assign(Sex=d.Sex.astype("category"))},
                             "the response 'Sex' is not numeric (dtype category); a linear mixed model needs a "
                             "real numeric response"),
    "one level": ("distance ~ age + (1 | Sex)", "Orthodont", {"data": lambda d: d[d.Sex == "Male"]},
                  "grouping factor 'Sex' in (1 | Sex) has only one level ('Male')"),
    "dates as values": ("distance ~ when + (1 | Subject)", "Orthodont",
                        {"data": lambda d: d.assign(when=pd.to_datetime("2020-01-01") + pd.to_timedelta(d.age, "D"))},
                        "holds dates or times"),
    # checked in memory from the column, out of core from the summed moments
    "huge response": ("distance ~ age + (1 | Subject)", "Orthodont",
                      {"data": lambda d: d.assign(distance=d.distance * 1e160)},
                      "the response 'distance' has values as large as 3.15e+161: their squares overflow"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_same_error_for_bad_input(case):
    formula, name, extra, expected = BAD[case]
    df = read(name)
    if "data" in extra:
        df = extra["data"](df).reset_index(drop=True)
    kind_mem, msg_mem = _error(build_spec, formula, df)
    kind_ooc, msg_ooc = _error(build_out_of_core, formula, dd.from_pandas(df, npartitions=3))
    assert expected in msg_mem
    assert (kind_ooc, msg_ooc) == (kind_mem, msg_mem)


def test_warnings_name_the_callers_line():
    """A builder's warning points at the code that called it, however deep the stage that warns."""
    df = read("carrots")
    with pytest.warns(UserWarning, match="dropped 75 of 1236") as rec:
        build_spec("Preference ~ sens1 + Income + (1 | Consumer)", df, missing="drop")
    assert rec[0].filename == __file__
    with pytest.warns(UserWarning, match="dropped 75 of 1236") as rec:
        build_out_of_core("Preference ~ sens1 + Income + (1 | Consumer)", dd.from_pandas(df, npartitions=2),
                          missing="drop")
    assert rec[0].filename == __file__


def test_same_warning_for_a_slope_far_from_zero():
    """Out of core the warning comes from the slope's summed mean and variance, in memory from the column."""
    df = read("Orthodont").assign(age=lambda d: d.age + 2000.0)
    _, _, w_mem, w_ooc = both("distance ~ age + (age | Subject)", df, 3)
    assert any("the random slope 'age' in (age | Subject) has mean 2011" in m for m in w_mem)
    assert w_ooc == w_mem
