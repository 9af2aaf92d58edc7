"""Bundled data sets: shapes, R-faithful dtypes and level orders, errors, provenance."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm.datasets import dataset_info, list_datasets, load_dataset
from bayeslmm.errors import BayesLMMError, DataError

SHAPES = {
    "sleepstudy": (180, 3),
    "exam": (4059, 10),
    "Dyestuff": (30, 2),
    "Penicillin": (144, 3),
    "InstEval": (73421, 7),
    "ham": (648, 6),
    "carrots": (1236, 14),
    "Ovary": (308, 3),
}

# missing values per column, as in lmerTest's own data (R's NA); every other column has none
MISSING = {"carrots": {"Income": 72, "Preference": 3, "Sweetness": 3, "Crisp": 3}}

# column -> (number of levels, first levels in R's order, category dtype kind, ordered)
FACTORS = {
    "sleepstudy": {"Subject": (18, [308, 309, 310, 330], "i", False)},
    "exam": {
        "school": (65, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "i", False),
        "student": (650, [1, 2, 3], "i", False),
        "schgend": (3, ["mixed", "boys", "girls"], "O", False),
        "vr": (3, ["bottom 25%", "mid 50%", "top 25%"], "O", False),
        "intake": (3, ["bottom 25%", "mid 50%", "top 25%"], "O", False),
        "sex": (2, ["F", "M"], "O", False),
        "type": (2, ["Mxd", "Sngl"], "O", False),
    },
    "Dyestuff": {"Batch": (6, list("ABCDEF"), "O", False)},
    "Penicillin": {
        "plate": (24, list("abcdefghijklmnopqrstuvwx"), "O", False),
        "sample": (6, list("ABCDEF"), "O", False),
    },
    "InstEval": {
        "s": (2972, [1, 2, 3], "i", False),
        "d": (1128, [1, 6, 7, 8, 12], "i", False),
        "studage": (4, [2, 4, 6, 8], "i", True),
        "lectage": (6, [1, 2, 3, 4, 5, 6], "i", True),
        "service": (2, [0, 1], "i", False),
        "dept": (14, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15], "i", False),
    },
    "ham": {  # R: factor levels "1".."81", "1".."4", "1","2", "1","2"
        "Consumer": (81, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "i", False),
        "Product": (4, [1, 2, 3, 4], "i", False),
        "Information": (2, [1, 2], "i", False),
        "Gender": (2, [1, 2], "i", False),
    },
    "carrots": {  # levels as str(carrots) in R with lmerTest 3.1-3 prints them
        "Consumer": (103, [168, 169, 171, 172], "i", False),
        "Frequency": (5, [1, 2, 3, 4, 5], "i", False),
        "Gender": (2, [1, 2], "i", False),
        "Age": (4, [1, 2, 3, 4], "i", False),
        "Homesize": (2, [1, 3], "i", False),
        "Work": (7, [1, 2, 3, 4, 5, 6, 7], "i", False),
        "Income": (4, [1, 2, 3, 4], "i", False),
        "Product": (12, ["Bolero_E", "Bolero_L", "Major_E", "Major_L", "Navar_E", "Navar_L", "Nelson_E",
                         "Nelson_L", "Turbo_E", "Turbo_L", "Yukon_E", "Yukon_L"], "O", False),
    },
    # R: levels(nlme::Ovary$Mare), an ordered factor by each mare's largest count
    "Ovary": {"Mare": (11, [4, 2, 11, 7, 5, 9, 1, 6, 10, 3, 8], "i", True)},
}

NUMERIC = {
    "sleepstudy": {"Reaction": "f", "Days": "i"},
    "exam": {"normexam": "f", "schavg": "f", "standLRT": "f"},
    "Dyestuff": {"Yield": "i"},
    "Penicillin": {"diameter": "i"},
    "InstEval": {"y": "i"},
    "ham": {"Informed.liking": "i", "Age": "i"},
    # integer scores in R; float here because of the missing values
    "carrots": {"Preference": "f", "Sweetness": "f", "Bitter": "i", "Crisp": "f", "sens1": "f", "sens2": "f"},
    "Ovary": {"Time": "f", "follicles": "i"},
}


def _kind(index: pd.Index) -> str:
    """'i' for integer categories, 'O' for string categories (object or str dtype)."""
    if pd.api.types.is_integer_dtype(index.dtype):
        return "i"
    assert pd.api.types.is_string_dtype(index.dtype), index.dtype
    return "O"


def test_list_datasets():
    assert list_datasets() == ["sleepstudy", "exam", "Dyestuff", "Penicillin", "InstEval", "ham", "carrots",
                               "Ovary"]


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_and_columns(name):
    df = load_dataset(name)
    assert isinstance(df, pd.DataFrame)
    assert df.shape == SHAPES[name]
    missing = df.isna().sum()
    assert missing[missing > 0].to_dict() == MISSING.get(name, {})
    assert set(FACTORS[name]) | set(NUMERIC[name]) == set(df.columns)


@pytest.mark.parametrize("name", list(SHAPES))
def test_factor_columns_are_categorical_in_r_order(name):
    df = load_dataset(name)
    for column, (n_levels, first, kind, ordered) in FACTORS[name].items():
        dtype = df[column].dtype
        assert isinstance(dtype, pd.CategoricalDtype), column
        cats = dtype.categories
        assert len(cats) == n_levels, column
        assert cats[: len(first)].tolist() == first, column
        assert _kind(cats) == kind, column
        assert dtype.ordered is ordered, column
        assert df[column].nunique() == n_levels  # no unused levels
        if kind == "i" and not ordered:  # numeric codes: sorted numerically, not as text
            assert np.all(np.diff(cats.to_numpy()) > 0), column


@pytest.mark.parametrize("name", list(SHAPES))
def test_numeric_columns_keep_csv_types(name):
    df = load_dataset(name)
    for column, kind in NUMERIC[name].items():
        assert df[column].dtype.kind == kind, column


def test_values_match_known_summaries():
    # Figures any lme4 user can reproduce: grand means and counts.
    assert load_dataset("Dyestuff")["Yield"].mean() == pytest.approx(1527.5)
    sleep = load_dataset("sleepstudy")
    assert sleep["Reaction"].mean() == pytest.approx(298.50789, abs=1e-5)
    assert (sleep.groupby("Subject", observed=True).size() == 10).all()
    pen = load_dataset("Penicillin")
    assert (pd.crosstab(pen["plate"], pen["sample"]) == 1).all().all()  # fully crossed
    inst = load_dataset("InstEval")
    assert inst["y"].between(1, 5).all()
    assert inst["d"].cat.categories.max() == 2160
    exam = load_dataset("exam")
    assert exam["school"].value_counts().sort_index().iloc[0] == 73  # school 1
    # the first row keeps its values, e.g. Subject stays the integer 308
    assert sleep.loc[0, "Subject"] == 308 and sleep.loc[0, "Reaction"] == 249.56


def test_insteval_service_codes_as_service1_in_formulae():
    formulae = pytest.importorskip("formulae")
    inst = load_dataset("InstEval").head(200)
    dm = formulae.design_matrices("y ~ 1 + service", inst)
    assert dm.common.terms["service"].labels == ["service[1]"]


@pytest.mark.parametrize("spelling", ["dyestuff", "DYESTUFF", " Dyestuff ", "dYeStUfF"])
def test_names_are_case_insensitive(spelling):
    assert load_dataset(spelling).shape == (30, 2)


def test_exam_mlmrev_name_works():
    assert load_dataset("Exam").shape == (4059, 10)


def test_loads_are_independent():
    first = load_dataset("Dyestuff")
    first.loc[0, "Yield"] = -1
    assert load_dataset("Dyestuff").loc[0, "Yield"] == 1545


def test_unknown_name_lists_choices_and_suggests():
    with pytest.raises(DataError) as info:
        load_dataset("sleepstudi")
    message = str(info.value)
    assert "'sleepstudi'" in message
    for name in list_datasets():
        assert name in message
    assert "Did you mean 'sleepstudy'?" in message
    assert isinstance(info.value, BayesLMMError) and isinstance(info.value, ValueError)


def test_unknown_name_without_close_match():
    with pytest.raises(DataError, match="Unknown dataset 'iris'") as info:
        load_dataset("iris")
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize("bad", [None, 3, ["sleepstudy"]])
def test_non_string_name(bad):
    with pytest.raises(DataError, match="must be a string"):
        load_dataset(bad)


@pytest.mark.parametrize(
    "name, package, needles",
    [
        ("sleepstudy", "lme4 1.1-31", ["Belenky", "Journal of Sleep Research", "180 rows"]),
        ("exam", "mlmRev 1.0-8", ["Goldstein", "Oxford Review of Education", "4,059 rows"]),
        ("dyestuff", "lme4 1.1-31", ["Davies", "Goldsmith", "30 rows"]),
        ("Penicillin", "lme4 1.1-31", ["Davies", "144 rows"]),
        ("InstEval", "lme4 1.1-31", ["ETH", "73,421 rows"]),
        ("ham", "lmerTest 3.1-3", ["Næs", "Food Quality and Preference", "648 rows"]),
        ("carrots", "lmerTest 3.1-3", ["Brockhoff", "1,236 rows", "missing"]),
        ("ovary", "nlme 3.1-162", ["Pierson", "Animal Reproduction Science", "308 rows"]),
    ],
)
def test_dataset_info(name, package, needles):
    info = dataset_info(name)
    assert package in info
    assert "GPL" in info
    for needle in needles:
        assert needle in info
    for column in load_dataset(name).columns:  # every column is described
        assert f"| {column} |" in info


def test_dataset_info_unknown():
    with pytest.raises(DataError, match="Available"):
        dataset_info("nope")


def test_data_files_ship_with_the_package():
    data = resources.files("bayeslmm.datasets") / "data"
    names = {p.name for p in data.iterdir()}
    assert {"sleepstudy.csv", "exam.csv", "Dyestuff.csv", "Penicillin.csv",
            "InstEval.csv.gz", "ham.csv", "carrots.csv", "Ovary.csv"} <= names
    gz = (data / "InstEval.csv.gz").read_bytes()
    assert len(gz) < 500_000  # kept small: about 375 kB
    header = gzip.decompress(gz).split(b"\n", 1)[0]
    assert header == b'"s","d","studage","lectage","service","dept","y"'
    assert (resources.files("bayeslmm.datasets") / "README.md").is_file()


def test_lmertest_data_match_their_known_values():
    ham = load_dataset("ham")
    assert (pd.crosstab(ham["Consumer"], [ham["Product"], ham["Information"]]) == 1).all().all()  # 4 x 2 each
    assert ham["Informed.liking"].between(1, 9).all()
    carrots = load_dataset("carrots")
    assert (carrots.groupby("Consumer", observed=True).size() == 12).all()  # 103 consumers x 12 carrots
    # the rows R has NA in, kept with their other values (R: which(is.na(carrots$Preference)) 235 631 1204)
    assert carrots.index[carrots["Preference"].isna()].tolist() == [234, 630, 1203]
    assert carrots.loc[234, "Product"] == "Nelson_E" and carrots.loc[234, "Sweetness"] == 3
    assert carrots.groupby("Consumer", observed=True)["Income"].apply(lambda s: s.isna().all()).sum() == 6
    assert carrots["sens2"].iloc[0] == pytest.approx(-2.541967427, abs=1e-12)


def test_ovary_matches_nlme():
    # R (nlme 3.1-162): range(table(Ovary$Mare)) is 25 31; the values are those of the copy in tests/data
    ovary = load_dataset("Ovary")
    sizes = ovary.groupby("Mare", observed=True).size()
    assert sizes.min() == 25 and sizes.max() == 31
    assert (ovary.groupby("Mare", observed=True)["Time"].apply(lambda t: t.is_monotonic_increasing)).all()
    assert ovary.groupby("Mare", observed=True)["follicles"].max().is_monotonic_increasing  # nlme's level order
    copy = pd.read_csv(Path(__file__).resolve().parents[1] / "data" / "Ovary.csv")
    assert np.array_equal(ovary["follicles"], copy["follicles"]) and np.array_equal(ovary["Time"], copy["Time"])
    assert ovary["Mare"].astype(int).tolist() == copy["Mare"].tolist()


LMERTEST = json.loads((Path(__file__).resolve().parents[1] / "data" / "lmertest_reference.json").read_text())


def test_ham_fit_reproduces_lmertest():
    """The bundled ham, as loaded, gives lmerTest 3.1-3's REML fit (lme4 1.1-31 inside).

    Reached: REML criterion 1.4e-14 relative (and not above lme4's), θ 3e-7, σ 8e-9,
    Product's type III F (3.829) 6e-8; the tolerances are 1e-9, 1e-5, 1e-5 and 1e-3.
    """
    from bayeslmm import Model

    ref = LMERTEST["models"]["ham_product"]
    assert ref["formula"] == "Informed.liking ~ Product*Information + (1 | Consumer) + (1 | Product:Consumer)"
    formula = "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)"
    fit = Model(formula, load_dataset("ham")).fit(method="reml")
    assert fit.objective == pytest.approx(ref["REMLcrit"], rel=1e-9)
    assert fit.objective <= ref["REMLcrit"] + 1e-9
    # lme4's θ order: the 324-level Consumer:Product term first, then Consumer (81 levels)
    np.testing.assert_allclose(fit.theta, ref["theta"], rtol=1e-5)
    assert fit.sigma == pytest.approx(ref["sigma"], rel=1e-5)
    f_product = ref["anova_type3_satterthwaite"]["Product"]["F value"]
    assert fit.anova().loc["Product", "f_value"] == pytest.approx(f_product, rel=1e-3)
