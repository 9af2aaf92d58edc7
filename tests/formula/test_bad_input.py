"""Bad input: clear errors that name the column or argument, and no bare KeyError, LinAlgError or NaN.

Every error is a ``bayeslmm.errors`` class, all subclasses of ``ValueError``; each test checks
the class and that the message names what is at fault.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model
from bayeslmm.datasets import load_dataset
from bayeslmm.errors import BayesLMMError, DataError, FormulaError, ModelError

FORMULA = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture
def sleepstudy() -> pd.DataFrame:
    return load_dataset("sleepstudy")


def test_errors_are_value_errors():
    for cls in (BayesLMMError, DataError, FormulaError, ModelError):
        assert issubclass(cls, ValueError)
    for cls in (DataError, FormulaError, ModelError):
        assert issubclass(cls, BayesLMMError)


# --------------------------------------------------------------------------------------
# unknown columns
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "formula, wrong, right, where",
    [
        ("Reaction ~ Dayz + (1 | Subject)", "Dayz", "Days", "fixed effects"),
        ("Reaktion ~ Days + (1 | Subject)", "Reaktion", "Reaction", "response"),
        ("Reaction ~ Days + (Dayz | Subject)", "Dayz", "Days", "(Dayz | Subject)"),
        ("Reaction ~ Days + (1 | Subjekt)", "Subjekt", "Subject", "grouping factor"),
        ("Reaction ~ np.log(Dayz + 1) + (1 | Subject)", "Dayz", "Days", "fixed effects"),
        ("Reaction ~ Days + (1 | Subject:Dayz)", "Dayz", "Days", "grouping factor"),
    ],
)
def test_unknown_column_names_it_and_suggests(sleepstudy, formula, wrong, right, where):
    with pytest.raises(DataError) as info:
        Model(formula, sleepstudy)
    msg = str(info.value)
    assert f"unknown column {wrong!r}" in msg
    assert f"Did you mean {right!r}?" in msg
    assert where in msg
    assert "Reaction" in msg and "Subject" in msg  # lists the columns there are


def test_unknown_column_without_close_match(sleepstudy):
    with pytest.raises(DataError, match=r"unknown column 'zzz'") as info:
        Model("Reaction ~ zzz + (1 | Subject)", sleepstudy)
    assert "Did you mean" not in str(info.value)


def test_unknown_grouping_column_in_groups_argument(sleepstudy):
    with pytest.raises(DataError, match=r"unknown column 'Subjekt'.*Did you mean 'Subject'"):
        Model("Reaction ~ Days", sleepstudy, groups={"Subjekt": "1 + Days"})


def test_unknown_bundled_dataset_name():
    with pytest.raises(DataError, match=r"sleepstudi.*Did you mean 'sleepstudy'"):
        Model(FORMULA, "sleepstudi")


def test_duplicated_column_name(sleepstudy):
    d = pd.concat([sleepstudy, sleepstudy[["Days"]]], axis=1)
    with pytest.raises(DataError, match=r"more than one column named 'Days'"):
        Model(FORMULA, d)


def test_non_string_column_names_do_not_leak_keyerror():
    rng = np.random.default_rng(0)
    d = pd.DataFrame({0: rng.normal(size=40), "y": rng.normal(size=40), "g": np.repeat(np.arange(8), 5)})
    spec = Model("y ~ 1 + (1 | g)", d).spec
    assert spec.n_obs == 40
    with pytest.raises(DataError, match="unknown column 'x'"):
        Model("y ~ x + (1 | g)", d)


# --------------------------------------------------------------------------------------
# missing and infinite values
# --------------------------------------------------------------------------------------


def test_missing_values_raise_and_count_rows(sleepstudy):
    d = sleepstudy.copy()
    d.loc[[3, 10, 20], "Days"] = np.nan
    d.loc[[10, 50], "Reaction"] = np.nan
    with pytest.raises(DataError) as info:
        Model(FORMULA, d)
    msg = str(info.value)
    assert "'Days': 3 rows" in msg and "'Reaction': 2 rows" in msg
    assert "4 of 180 rows" in msg  # row 10 counted once
    assert "missing='drop'" in msg


def test_missing_in_grouping_column(sleepstudy):
    d = sleepstudy.copy()
    d.loc[7, "Subject"] = np.nan
    with pytest.raises(DataError, match=r"'Subject': 1 row\b"):
        Model(FORMULA, d)


def test_missing_in_unused_column_is_fine(sleepstudy):
    d = sleepstudy.assign(other=np.nan)
    assert Model(FORMULA, d).spec.n_obs == 180


def test_missing_drop_fits_and_reports(sleepstudy):
    d = sleepstudy.copy()
    d.loc[[3, 10, 20], "Days"] = np.nan
    with pytest.warns(UserWarning, match=r"dropped 3 of 180 rows.*'Days'"):
        model = Model(FORMULA, d, missing="drop")
    fit = model.fit(method="reml")
    assert fit.nobs == 177
    assert any("dropped 3 of 180 rows" in note for note in fit.spec.notes)
    assert not np.isin([3, 10, 20], fit.spec.row_index).any()
    assert len(fit.fitted) == 177 and fit.fitted.index.equals(pd.Index(fit.spec.row_index))
    assert np.isfinite(fit.objective) and np.all(np.isfinite(fit.theta))
    assert fit.to_dict()["notes"] == list(fit.spec.notes)
    # the same as fitting the cleaned data
    clean = Model(FORMULA, d.dropna()).fit(method="reml")
    assert fit.objective == pytest.approx(clean.objective, rel=1e-9)


def test_missing_drop_drops_a_level_that_empties(sleepstudy):
    d = sleepstudy.copy()
    d.loc[d["Subject"] == 308, "Reaction"] = np.nan
    with pytest.warns(UserWarning, match="dropped 10 of 180"):
        spec = Model(FORMULA, d, missing="drop").spec
    assert spec.blocks[0].n_levels == 17 and "308" not in spec.blocks[0].levels


def test_missing_drop_of_every_row(sleepstudy):
    d = sleepstudy.assign(Days=np.nan)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no rows left"):
        Model(FORMULA, d, missing="drop")


def test_infinite_values_are_named(sleepstudy):
    d = sleepstudy.astype({"Days": float})
    d.loc[5, "Reaction"] = np.inf
    d.loc[6, "Days"] = -np.inf
    with pytest.raises(DataError, match="infinite") as info:
        Model(FORMULA, d)
    assert "'Reaction': 1 row" in str(info.value) and "'Days': 1 row" in str(info.value)


def test_non_finite_after_transformation(sleepstudy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # reported by the error, not by numpy
        with pytest.raises(DataError, match=r"np\.log\(Days\)"):
            Model("Reaction ~ np.log(Days) + (1 | Subject)", sleepstudy)


def test_invalid_missing_argument(sleepstudy):
    with pytest.raises(BayesLMMError, match=r"missing must be 'raise' or 'drop', got 'omit'"):
        Model(FORMULA, sleepstudy, missing="omit")


# --------------------------------------------------------------------------------------
# the response
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "convert",
    [lambda s: s.astype(str), lambda s: s > 250, lambda s: pd.Categorical(s.round(-2))],
    ids=["strings", "bool", "categorical"],
)
def test_non_numeric_response(sleepstudy, convert):
    d = sleepstudy.assign(Reaction=convert(sleepstudy["Reaction"]))
    with pytest.raises(DataError, match=r"response 'Reaction' is not numeric"):
        Model(FORMULA, d)


def test_constant_response(sleepstudy):
    with pytest.raises(DataError, match=r"response 'Reaction' is constant \(1\.5 in every row\)"):
        Model(FORMULA, sleepstudy.assign(Reaction=1.5))


# --------------------------------------------------------------------------------------
# grouping factors and the size of the random effects
# --------------------------------------------------------------------------------------


def test_grouping_factor_with_one_level(sleepstudy):
    d = sleepstudy.assign(site="A")
    with pytest.raises(ModelError, match=r"grouping factor 'site'.*only one level \('A'\)"):
        Model("Reaction ~ Days + (1 | site)", d)


def test_grouping_factor_with_one_level_after_subsetting(sleepstudy):
    d = sleepstudy[sleepstudy["Subject"] == 308]
    with pytest.raises(ModelError, match=r"'Subject'.*only one level"):
        Model(FORMULA, d)


def test_as_many_levels_as_observations(sleepstudy):
    d = sleepstudy.assign(obs=np.arange(len(sleepstudy)))
    with pytest.raises(ModelError, match=r"grouping factor 'obs'.*180 levels for 180 observations"):
        Model("Reaction ~ Days + (1 | obs)", d)


def test_more_random_effects_than_observations(sleepstudy):
    d = sleepstudy.assign(pair=np.arange(len(sleepstudy)) // 2)
    with pytest.raises(ModelError, match=r"\(Days \| pair\) has 180 random effects \(90 levels × 2\) for 180"):
        Model("Reaction ~ Days + (Days | pair)", d)


def test_float_grouping_column_with_fractions(sleepstudy):
    d = sleepstudy.assign(dose=np.linspace(0, 1, len(sleepstudy)) % 0.3)
    with pytest.raises(DataError, match=r"grouping column 'dose' holds non-integer numbers"):
        Model("Reaction ~ Days + (1 | dose)", d)


def test_float_grouping_column_with_whole_numbers_is_accepted(sleepstudy):
    d = sleepstudy.assign(g=(np.arange(len(sleepstudy)) % 6).astype(float))
    b = Model("Reaction ~ Days + (1 | g)", d).spec.blocks[0]
    assert b.levels == ("0", "1", "2", "3", "4", "5")


def test_mixed_type_grouping_column(sleepstudy):
    g = np.where(np.arange(180) % 2 == 0, "even", None).astype(object)
    g[1::2] = 7
    d = sleepstudy.assign(g=g)
    b = Model("Reaction ~ Days + (1 | g)", d).spec.blocks[0]
    assert b.levels == ("7", "even")


# --------------------------------------------------------------------------------------
# the data argument
# --------------------------------------------------------------------------------------


def test_empty_data(sleepstudy):
    with pytest.raises(DataError, match="data is empty"):
        Model(FORMULA, sleepstudy.iloc[:0])


@pytest.mark.parametrize("data", [None, [1, 2, 3], np.zeros((5, 3)), {"Reaction": [1.0]}], ids=repr)
def test_data_not_a_dataframe(data):
    with pytest.raises(DataError, match=r"data must be a pandas DataFrame, got "):
        Model(FORMULA, data)


# --------------------------------------------------------------------------------------
# rank-deficient fixed effects
# --------------------------------------------------------------------------------------


def test_rank_deficient_columns_dropped_with_warning(sleepstudy):
    d = sleepstudy.assign(weeks=sleepstudy["Days"] / 7, const=3.0)
    with pytest.warns(UserWarning, match=r"rank deficient so dropping 2 columns: \['weeks', 'const'\]"):
        model = Model("Reaction ~ Days + weeks + const + (Days | Subject)", d)
    assert model.spec.fixed_names == ("(Intercept)", "Days")
    assert model.spec.dropped_fixed == ("weeks", "const")
    fit = model.fit(method="reml")
    ref = Model(FORMULA, sleepstudy).fit(method="reml")
    assert fit.objective == pytest.approx(ref.objective, rel=1e-9)
    assert list(fit.fixef.index) == ["(Intercept)", "Days"]
    assert any("weeks" in note for note in fit.spec.notes)


def test_rank_deficient_categorical(sleepstudy):
    # a dummy that is the sum of other dummies: lme4 drops the later column
    d = sleepstudy.assign(half=np.where(sleepstudy["Days"] < 5, "early", "late"),
                          late=(sleepstudy["Days"] >= 5).astype(float))
    with pytest.warns(UserWarning, match=r"dropping 1 column: \['late'\]"):
        spec = Model("Reaction ~ half + late + (1 | Subject)", d).spec
    assert spec.fixed_names == ("(Intercept)", "half[late]")


def test_rank_deficient_error_when_asked(sleepstudy):
    d = sleepstudy.assign(weeks=sleepstudy["Days"] / 7)
    with pytest.raises(ModelError, match=r"rank deficient: \['weeks'\]"):
        Model("Reaction ~ Days + weeks + (Days | Subject)", d, rank_deficient="error")


def test_invalid_rank_deficient_argument(sleepstudy):
    with pytest.raises(BayesLMMError, match=r"rank_deficient must be 'drop' or 'error', got 'ignore'"):
        Model(FORMULA, sleepstudy, rank_deficient="ignore")


def test_no_fixed_effects(sleepstudy):
    with pytest.raises(ModelError, match="no fixed effects"):
        Model("Reaction ~ 0 + (Days | Subject)", sleepstudy)


# --------------------------------------------------------------------------------------
# the method and the formula
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bayes", "REMLL", "", None, 3])
def test_invalid_method(sleepstudy, method):
    model = Model(FORMULA, sleepstudy)
    with pytest.raises(BayesLMMError, match=rf"method must be one of \['reml', 'ml', 'nuts'\], got {re.escape(repr(method))}"):
        model.fit(method=method)


def test_method_is_case_insensitive(sleepstudy):
    model = Model(FORMULA, sleepstudy)
    assert model.fit(method="REML").objective == model.fit(method="reml").objective


def test_unparsable_formula_has_a_caret(sleepstudy):
    with pytest.raises(FormulaError) as info:
        Model("Reaction ~ Days + (Days | Subject", sleepstudy)
    msg = str(info.value)
    assert "unclosed '('" in msg
    lines = msg.splitlines()
    assert lines[-2].strip() == "Reaction ~ Days + (Days | Subject"
    assert lines[-1].index("^") == lines[-2].index("(")


def test_formula_syntax_error_reaches_model_with_caret(sleepstudy):
    with pytest.raises(FormulaError, match=r"unexpected 'Subject' in the fixed effects") as info:
        Model("Reaction ~ Days Subject + (1 | Subject)", sleepstudy)
    lines = str(info.value).splitlines()
    assert lines[-1].index("^") == lines[-2].index("Subject")


def test_formula_without_random_term(sleepstudy):
    with pytest.raises(FormulaError, match=r"no random-effect term.*groups="):
        Model("Reaction ~ Days", sleepstudy)


def test_formula_without_tilde(sleepstudy):
    with pytest.raises(FormulaError, match="has no '~'"):
        Model("Reaction + Days + (1 | Subject)", sleepstudy)


@pytest.mark.parametrize("formula", [None, 3, ""])
def test_formula_not_a_string_or_empty(sleepstudy, formula):
    with pytest.raises(FormulaError, match="formula"):
        Model(formula, sleepstudy)


def test_bar_term_without_parentheses(sleepstudy):
    with pytest.raises(FormulaError, match="must be in parentheses"):
        Model("Reaction ~ Days + 1 | Subject", sleepstudy)


def test_grouping_factor_that_is_an_expression(sleepstudy):
    with pytest.raises(FormulaError, match=r"grouping factor 'factor\(Subject\)' is not a column name"):
        Model("Reaction ~ Days + (1 | factor(Subject))", sleepstudy)


def test_formulae_failure_is_a_formula_error(sleepstudy):
    # formulae itself fails (an unknown reference level): still a FormulaError naming the place
    with pytest.raises(FormulaError, match="could not build the fixed effects"):
        Model("Reaction ~ C(Subject, Treatment('nope')) + (1 | Subject)", sleepstudy)


# --------------------------------------------------------------------------------------
# nothing bare escapes; no NaN in results
# --------------------------------------------------------------------------------------

BAD = [
    ("Reaction ~ Dayz + (1 | Subject)", {}),
    ("Reaction ~ Days + (1 | site)", {"site": "A"}),
    ("Reaction ~ Days + (1 | obs)", {"obs": np.arange(180)}),
    ("Reaction ~ Days + (Days | pair)", {"pair": np.arange(180) // 2}),
    ("Reaction ~ Days + (1 | dose)", {"dose": np.linspace(0, 1, 180)}),
    ("Reaction ~ Days + (1 | Subject)", {"Reaction": "fast"}),
    ("Reaction ~ Days + (1 | Subject)", {"Days": np.where(np.arange(180) % 9 == 0, np.nan, 1.0)}),
    ("Reaction ~ Days + (1 | Subject", {}),
    ("Reaction ~ Days", {}),
    ("Reaction ~ np.log(Days) + (1 | Subject)", {}),
    ("Reaction ~ Days + (1 | )", {}),
    ("Reaction ~ (1 | Subject) - 1", {}),
]


@pytest.mark.parametrize("formula, columns", BAD)
def test_only_package_errors_escape(sleepstudy, formula, columns):
    d = sleepstudy.assign(**columns)
    with pytest.raises(BayesLMMError):  # not KeyError / LinAlgError / TypeError
        Model(formula, d).fit(method="reml")


def assert_all_finite(fit):
    assert np.isfinite(fit.objective) and np.isfinite(fit.loglik)
    assert np.isfinite(fit.aic) and np.isfinite(fit.bic)
    assert np.all(np.isfinite(fit.theta))
    assert np.isfinite(fit.sigma) and fit.sigma > 0
    assert np.all(np.isfinite(fit.fixef.to_numpy()))
    assert np.all(np.isfinite(fit.fixef_se.to_numpy()))
    assert np.all(np.isfinite(fit.vcov.to_numpy()))
    assert np.all(np.isfinite(fit.fitted.to_numpy()))
    assert np.all(np.isfinite(fit.residuals.to_numpy()))
    for frame in fit.ranef().values():
        assert np.all(np.isfinite(frame.to_numpy()))
    for frame in fit.coef().values():
        assert np.all(np.isfinite(frame.to_numpy()))
    vc = fit.varcorr
    assert np.all(np.isfinite(vc["vcov"].to_numpy(dtype=float)))
    assert "nan" not in str(fit.summary()).lower()


def test_singular_random_slope_is_finite(sleepstudy):
    # 6 subjects, days 0, 3, 6, 9: the slope direction of T collapses (θ₃ = 0).
    # lme4: getME(m, "theta") = 0.4791036261 0.1159940625 0; REMLcrit 250.709846102403; isSingular TRUE
    d = sleepstudy[sleepstudy["Days"].isin([0, 3, 6, 9])
                   & sleepstudy["Subject"].isin(sleepstudy["Subject"].cat.categories[:6])]
    fit = Model(FORMULA, d).fit(method="reml")
    assert fit.singular
    assert fit.theta[2] < 1e-4
    assert fit.objective <= 250.709846102403 * (1 + 1e-6)
    assert fit.objective == pytest.approx(250.709846102403, rel=1e-6)
    np.testing.assert_allclose(fit.theta[:2], [0.4791036261, 0.1159940625], rtol=1e-3)
    assert_all_finite(fit)
    assert np.all(np.isfinite(fit.varcorr["sdcor"].to_numpy(dtype=float)))
    assert fit.singular
    assert np.isfinite(fit.marginal_covariance(308).to_numpy()).all()


def test_zero_between_group_variance_is_finite():
    rng = np.random.default_rng(11)
    d = pd.DataFrame({"y": rng.normal(size=120), "x": np.tile(np.arange(12.0), 10),
                      "g": np.repeat(np.arange(10), 12)})
    fit = Model("y ~ x + (1 | g)", d).fit(method="reml")
    assert fit.singular
    assert_all_finite(fit)
    fit_ml = Model("y ~ x + (1 | g)", d).fit(method="ml")
    assert fit_ml.singular
    assert_all_finite(fit_ml)


def zero_intercept_data() -> pd.DataFrame:
    """Random slopes on a centred x and no random intercept: θ̂₁ = 0 (lme4 too)."""
    rng = np.random.default_rng(2)
    g = np.repeat(np.arange(10), 12)
    x = np.tile(np.arange(12.0) - 5.5, 10)
    y = 1 + 0.3 * x + rng.normal(scale=0.4, size=10)[g] * x + rng.normal(size=120)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def test_zero_intercept_variance_estimates_are_finite():
    # lme4: theta 0 0.1676027 0.4313194, REMLcrit 368.822619629456
    fit = Model("y ~ x + (x | g)", zero_intercept_data()).fit(method="reml")
    assert fit.singular
    assert fit.objective == pytest.approx(368.822619629456, rel=1e-6)
    assert fit.objective <= 368.822619629456 * (1 + 1e-6)
    for name in ("theta", "sigma", "objective"):
        assert np.all(np.isfinite(getattr(fit, name)))
    assert np.all(np.isfinite(fit.fixef_se.to_numpy()))
    assert np.all(np.isfinite(fit.ranef()["g"].to_numpy()))


def test_zero_intercept_variance_correlation_is_not_nan():
    fit = Model("y ~ x + (x | g)", zero_intercept_data()).fit(method="reml")
    assert np.all(np.isfinite(fit.varcorr["sdcor"].to_numpy(dtype=float)))


def test_tiny_dataset_fits_or_errors_cleanly():
    # 3 groups of 2: the smallest data the checks allow for a random intercept
    d = pd.DataFrame({"y": [1.0, 1.2, 3.1, 2.9, 2.0, 2.2], "g": list("aabbcc")})
    fit = Model("y ~ 1 + (1 | g)", d).fit(method="reml")
    assert_all_finite(fit)
    with pytest.raises(ModelError, match=r"'g' in \(1 \| g\) has 3 levels for 3 observations"):
        Model("y ~ 1 + (1 | g)", d.iloc[:3].assign(g=list("abc")))


def test_no_warning_leaks_from_numpy_on_singular_fit(sleepstudy):
    d = sleepstudy[sleepstudy["Days"].isin([0, 3, 6, 9])
                   & sleepstudy["Subject"].isin(sleepstudy["Subject"].cat.categories[:6])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit = Model(FORMULA, d).fit(method="reml")
        fit.varcorr
        str(fit.summary())
