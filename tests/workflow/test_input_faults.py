"""Small input faults a new user met: non-ASCII names, polars, dates, mixed-type groups, icc's hint, HTML counts."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model
from bayeslmm.errors import DataError, ModelError

DATA = Path(__file__).resolve().parents[1] / "data"  # tests/data: copies of ../shared/data's files


@pytest.fixture(scope="module")
def orthodont():
    return pd.read_csv(DATA / "Orthodont.csv")


def _people(n_people=10, per=6, seed=0):
    rng = np.random.default_rng(seed)
    person = np.repeat([f"p{i}" for i in range(n_people)], per)
    tag = np.tile(np.arange(per), n_people).astype(float)
    bump = rng.normal(0, 5, n_people)[np.repeat(np.arange(n_people), per)]
    return pd.DataFrame({"Größe": 170 + bump + 0.5 * tag + rng.normal(0, 1, len(tag)), "Tag": tag,
                         "Person": person})


def test_non_ascii_names_need_no_backticks():
    df = _people()
    plain = Model("Größe ~ Tag + (1 | Person)", df).fit()
    quoted = Model("`Größe` ~ Tag + (1 | Person)", df).fit()
    assert plain.spec.response == "Größe"
    np.testing.assert_allclose(plain.objective, quoted.objective, rtol=1e-12)
    # a misspelt non-ASCII name is reported whole (it used to be 'Gr', cut at the 'ö')
    with pytest.raises(DataError, match=r"unknown column 'Täg' .*Did you mean 'Tag'"):
        Model("Größe ~ Täg + (1 | Person)", df)
    renamed = df.rename(columns={"Person": "Persön"})
    assert Model("Größe ~ Tag + (1 | Persön)", renamed).spec.blocks[0].group == "Persön"


def test_polars_dataframe_is_accepted_as_pandas():
    pl = pytest.importorskip("polars")
    pytest.importorskip("pyarrow")
    df = _people()
    via_polars = Model("Größe ~ Tag + (1 | Person)", pl.from_pandas(df)).fit()
    via_pandas = Model("Größe ~ Tag + (1 | Person)", df).fit()
    np.testing.assert_allclose(via_polars.objective, via_pandas.objective, rtol=1e-12)
    np.testing.assert_allclose(via_polars.fixef, via_pandas.fixef, rtol=1e-10)
    # predictions for polars rows too
    new = pl.DataFrame({"Tag": [0.0, 2.5], "Person": ["p1", "p2"]})
    np.testing.assert_allclose(via_polars.predict(new).to_numpy(),
                               via_pandas.predict(new.to_pandas()).to_numpy())
    with pytest.raises(DataError, match=r"LazyFrame: call \.collect\(\) first"):
        Model("Größe ~ Tag + (1 | Person)", pl.from_pandas(df).lazy())
    with pytest.raises(DataError, match="must be a pandas DataFrame, got builtins.list; a polars DataFrame is accepted"):
        Model("Größe ~ Tag + (1 | Person)", [1, 2, 3])


def test_dates_as_predictors_get_a_conversion_hint():
    df = _people()
    df["when"] = pd.Timestamp("2024-03-01") + pd.to_timedelta(df["Tag"], unit="D")
    with pytest.raises(DataError, match=r"'when' \(used in the fixed effects\) holds dates.*days since the first"):
        Model("Größe ~ when + (1 | Person)", df)
    with pytest.raises(DataError, match=r"holds dates"):  # datetime.date objects in an object column
        Model("Größe ~ Tag + (1 + when | Person)", df.assign(when=df["when"].dt.date))
    with pytest.raises(DataError, match=r"'took' .*durations.*total_seconds\(\) / 86400"):
        Model("Größe ~ took + (1 | Person)", df.assign(took=pd.to_timedelta(df["Tag"], unit="h")))
    # the suggested conversion fits, and a date is a fine grouping factor
    df["days"] = (pd.to_datetime(df["when"]) - pd.to_datetime(df["when"]).min()).dt.days
    np.testing.assert_allclose(Model("Größe ~ days + (1 | Person)", df).fit().fixef["days"],
                               Model("Größe ~ Tag + (1 | Person)", df).fit().fixef["Tag"], rtol=1e-8)
    assert Model("Größe ~ Tag + (1 | when)", df).spec.blocks[0].n_levels == 6


def test_group_column_mixing_1_and_string_1_is_refused():
    df = _people()
    codes = np.repeat(np.arange(10), 6)
    df["g"] = [int(c) if i % 2 else str(c) for i, c in enumerate(codes)]  # 1 and "1" both there
    with pytest.raises(DataError, match=r"grouping column 'g' mixes types.*'0' is there as int and as str"):
        Model("Größe ~ Tag + (1 | g)", df)
    # one type, or types that do not print alike, are fine
    assert Model("Größe ~ Tag + (1 | g)", df.assign(g=df["g"].astype(str))).spec.blocks[0].n_levels == 10
    distinct = [int(c) if c < 5 else f"x{c}" for c in codes]
    assert Model("Größe ~ Tag + (1 | g)", df.assign(g=distinct)).spec.blocks[0].n_levels == 10


def test_icc_on_a_slope_model_suggests_a_point_inside_the_data(orthodont):
    fit = Model("distance ~ age + (age | Subject)", orthodont).fit()
    with pytest.raises(ModelError) as info:
        fit.icc()
    at = re.search(r"at=\{'age': ([0-9.]+)\}", str(info.value))
    assert at is not None, str(info.value)
    age = float(at.group(1))
    assert age == pytest.approx(orthodont["age"].mean()) == 11.0  # ages 8 to 14 (it used to say 0)
    icc = fit.icc(at={"age": age})
    assert 0 < icc["Subject"] < 1


def test_reml_html_summary_has_the_group_counts(orthodont):
    fit = Model("distance ~ age + (age | Subject)", orthodont).fit()
    line = "Number of obs: 108, groups:  Subject, 27"
    assert line in str(fit.summary())
    assert line in fit.summary()._repr_html_()
    sleep = Model("Reaction ~ Days + (1 | Subject)", "sleepstudy").fit()
    assert "Number of obs: 180, groups:  Subject, 18" in sleep._repr_html_()

