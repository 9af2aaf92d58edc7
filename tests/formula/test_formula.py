"""lme4 formulas: the bar-term parser and the ModelSpec built from a formula and a DataFrame.

Reference numbers marked "lme4" come from lme4 1.1-31 (R) on the same data; the R code is
quoted beside each one so it can be re-run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model
from bayeslmm.datasets import load_dataset
from bayeslmm.errors import FormulaError
from bayeslmm.formula import build_spec, formula_with_groups, parse_formula


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    return load_dataset("sleepstudy")


@pytest.fixture(scope="module")
def exam() -> pd.DataFrame:
    return load_dataset("exam")


def nested_data(seed: int = 20240611) -> pd.DataFrame:
    """6 sites ``a``, each with 4 batches ``b`` labelled 1..4 *within* the site, 5 rows per batch.

    Written to CSV, this is the frame the lme4 numbers below were computed on.
    """
    rng = np.random.default_rng(seed)
    a = np.repeat(np.arange(6), 20)
    b = np.tile(np.repeat(np.arange(1, 5), 5), 6)
    x = rng.normal(size=120)
    ua = rng.normal(scale=1.0, size=6)
    uab = rng.normal(scale=0.7, size=24)
    y = 2.0 + 0.5 * x + ua[a] + uab[a * 4 + b - 1] + rng.normal(scale=0.5, size=120)
    return pd.DataFrame({"y": y, "x": x, "a": [f"s{v}" for v in a], "b": b})


@pytest.fixture(scope="module")
def nested() -> pd.DataFrame:
    return nested_data()


def spec_of(formula, data, **kw):
    return Model(formula, data, **kw).spec


# --------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------


class TestParse:
    def test_correlated_bar_is_one_term(self):
        p = parse_formula("y ~ x + (1 + x | g)")
        assert p.response == "y"
        assert p.fixed == "x"
        assert len(p.bars) == 1
        bar = p.bars[0]
        assert bar.lhs == "1 + x" and bar.factors == (("g",),) and not bar.independent

    def test_double_bar_is_independent(self):
        (bar,) = parse_formula("y ~ x + (x || g)").bars
        assert bar.independent and bar.lhs == "x"

    def test_nesting_expands_to_prefixes(self):
        (bar,) = parse_formula("y ~ (1 | a/b/c)").bars
        assert bar.factors == (("a",), ("a", "b"), ("a", "b", "c"))

    def test_interaction_is_one_factor(self):
        (bar,) = parse_formula("y ~ (1 | a:b)").bars
        assert bar.factors == (("a", "b"),)

    def test_fixed_part_defaults_to_intercept(self):
        assert parse_formula("y ~ (1 | g)").fixed == "1"

    def test_removal_after_a_bar_term_goes_to_the_fixed_part(self):
        p = parse_formula("y ~ x + (1 | g) - 1")
        assert p.fixed == "x - 1"
        assert [b.text for b in p.bars] == ["(1 | g)"]

    def test_extra_parentheses_around_a_bar_term(self):
        (bar,) = parse_formula("y ~ x + ((1 + x | g))").bars
        assert bar.lhs == "1 + x" and bar.factors == (("g",),)

    def test_backticked_grouping_column(self):
        (bar,) = parse_formula("y ~ (1 | `my school`)").bars
        assert bar.factors == (("my school",),)

    def test_braces_are_not_split(self):
        p = parse_formula("y ~ {x + 1} + (1 | g)")
        assert p.fixed == "{x + 1}"

    @pytest.mark.parametrize(
        "formula, marked",
        [
            ("y ~ x + (1 | g", "("),          # unclosed parenthesis
            ("y ~ x + + (1 | g)", "+"),       # empty term
            ("y ~ x $ z + (1 | g)", "$"),     # character formulae does not know
            ("y ~ x z + (1 | g)", "z"),       # a missing operator (formulae would drop z silently)
            ("y ~ (x + z)^2 + (1 | g)", "^"),  # R's interaction power
            ("y ~ x * * z + (1 | g)", "*"),
            ("y ~ x + (1 + x x | g)", "x"),   # bad left side of a bar
            ("y ~ x + (1 | factor(g))", "f"),  # grouping factor not a column
            ("y ~ x + ( | g)", " "),
            ("y ~ x ~ z + (1 | g)", "~"),
            ("y w ~ x + (1 | g)", "w"),
        ],
    )
    def test_unparsable_formula_points_at_the_place(self, formula, marked):
        with pytest.raises(FormulaError) as info:
            parse_formula(formula)
        lines = str(info.value).splitlines()
        assert lines[-2].strip() == formula
        caret_line = lines[-1]
        assert caret_line.strip() == "^"
        # the caret sits under the offending character (both lines share the same indent)
        col = caret_line.index("^") - lines[-2].index(formula[0])
        assert formula[col] == marked, (formula, col)

    def test_formula_must_be_a_string(self):
        with pytest.raises(FormulaError, match="formula must be a string"):
            parse_formula(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# random-effect blocks
# --------------------------------------------------------------------------------------


class TestBlocks:
    def test_correlated_term_is_one_block_with_three_theta(self, sleepstudy):
        spec = spec_of("Reaction ~ Days + (1 + Days | Subject)", sleepstudy)
        assert len(spec.blocks) == 1
        b = spec.blocks[0]
        assert b.group == "Subject" and b.n_levels == 18
        assert b.columns == ("(Intercept)", "Days")
        assert b.correlated and b.n_theta == 3 and spec.n_theta == 3
        np.testing.assert_array_equal(b.Z[:, 0], 1.0)
        np.testing.assert_array_equal(b.Z[:, 1], sleepstudy["Days"].to_numpy(dtype=float))
        np.testing.assert_array_equal(spec.theta_start, [1.0, 0.0, 1.0])
        assert spec.theta_labels() == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]

    def test_implicit_intercept_in_bar(self, sleepstudy):
        a = spec_of("Reaction ~ Days + (Days | Subject)", sleepstudy)
        b = spec_of("Reaction ~ Days + (1 + Days | Subject)", sleepstudy)
        np.testing.assert_array_equal(a.blocks[0].Z, b.blocks[0].Z)
        assert a.blocks[0].columns == b.blocks[0].columns

    def test_double_bar_is_one_diagonal_block_with_two_theta(self, sleepstudy):
        spec = spec_of("Reaction ~ Days + (Days || Subject)", sleepstudy)
        assert len(spec.blocks) == 1
        b = spec.blocks[0]
        assert not b.correlated and b.n_theta == 2
        assert b.columns == ("(Intercept)", "Days")
        assert spec.theta_labels() == ["Subject.(Intercept)", "Subject.Days"]

    def test_codes_and_levels_follow_the_factor(self, sleepstudy):
        b = spec_of("Reaction ~ Days + (1 | Subject)", sleepstudy).blocks[0]
        assert b.levels == tuple(str(c) for c in sleepstudy["Subject"].cat.categories)
        np.testing.assert_array_equal(b.codes, sleepstudy["Subject"].cat.codes.to_numpy())

    def test_nesting_expands_to_a_and_a_colon_b(self, nested):
        spec = spec_of("y ~ x + (1 | a/b)", nested)
        # b's labels repeat inside each a: a/b has 6 x 4 = 24 batches, not 4
        assert [(b.group, b.n_levels) for b in spec.blocks] == [("a:b", 24), ("a", 6)]
        ab = spec.blocks[0]
        assert ab.levels[:5] == ("s0:1", "s0:2", "s0:3", "s0:4", "s1:1")
        labels = np.array(ab.levels, dtype=object)[ab.codes]
        expected = nested["a"] + ":" + nested["b"].astype(str)
        np.testing.assert_array_equal(labels, expected.to_numpy())

    def test_nesting_is_the_explicit_interaction(self, nested):
        a = spec_of("y ~ x + (1 | a/b)", nested)
        b = spec_of("y ~ x + (1 | a) + (1 | a:b)", nested)
        assert [(x.group, x.levels) for x in a.blocks] == [(x.group, x.levels) for x in b.blocks]
        for x, y in zip(a.blocks, b.blocks):
            np.testing.assert_array_equal(x.codes, y.codes)

    def test_interaction_factor(self, nested):
        spec = spec_of("y ~ x + (1 | a:b)", nested)
        assert [(b.group, b.n_levels) for b in spec.blocks] == [("a:b", 24)]

    def test_interaction_drops_empty_cells(self):
        d = pd.DataFrame({"y": np.arange(12.0) % 5, "a": list("ppqq") * 3, "b": list("uvuw") * 3})
        spec = spec_of("y ~ 1 + (1 | a:b)", d)
        assert spec.blocks[0].levels == ("p:u", "p:v", "q:u", "q:w")

    def test_crossed_factors(self):
        d = load_dataset("Penicillin")
        spec = spec_of("diameter ~ 1 + (1 | plate) + (1 | sample)", d)
        assert [(b.group, b.n_levels) for b in spec.blocks] == [("plate", 24), ("sample", 6)]
        assert spec.n_theta == 2

    def test_several_terms_on_one_factor(self, sleepstudy):
        spec = spec_of("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", sleepstudy)
        assert [(b.group, b.columns) for b in spec.blocks] == [
            ("Subject", ("(Intercept)",)),
            ("Subject", ("Days",)),
        ]
        assert spec.group_names() == ["Subject"]

    def test_blocks_sorted_by_decreasing_levels(self):
        d = load_dataset("Penicillin")
        spec = spec_of("diameter ~ 1 + (1 | sample) + (1 | plate)", d)
        assert [b.group for b in spec.blocks] == ["plate", "sample"]  # lme4: plate (24) first

    def test_insteval_term_order(self):
        d = load_dataset("InstEval")
        spec = spec_of("y ~ 1 + service + (1 | dept) + (1 | d) + (1 | s)", d)
        assert [(b.group, b.n_levels) for b in spec.blocks] == [("s", 2972), ("d", 1128), ("dept", 14)]

    def test_ties_follow_lme4(self, nested):
        # lme4 keeps the written order when the levels never increase, else rev(order(nl)),
        # which reverses ties.  R: names(lFormula(y ~ x + (1|a) + (0+x|a) + (1|a:b), d)$reTrms$cnms)
        # gives a:b, a (x), a ((Intercept)).
        spec = spec_of("y ~ x + (1 | a) + (0 + x | a) + (1 | a:b)", nested)
        assert [(b.group, b.columns) for b in spec.blocks] == [
            ("a:b", ("(Intercept)",)), ("a", ("x",)), ("a", ("(Intercept)",))]
        # no increase: the written order stays
        spec = spec_of("y ~ x + (1 | a) + (0 + x | a)", nested)
        assert [b.columns for b in spec.blocks] == [("(Intercept)",), ("x",)]

    def test_double_bar_with_reordering_matches_lme4_theta(self, nested):
        # R: m <- lmer(y ~ x + (x||a) + (1|a:b), d); REMLcrit(m); getME(m, "theta")
        fit = Model("y ~ x + (x || a) + (1 | a:b)", nested).fit(method="reml")
        assert list(fit.theta_series.index) == ["a:b.(Intercept)", "a.x", "a.(Intercept)"]
        lme4_objective = 219.615670320797
        assert fit.objective <= lme4_objective * (1 + 1e-6)
        assert fit.objective == pytest.approx(lme4_objective, rel=1e-6)
        np.testing.assert_allclose(fit.theta, [1.213391543015, 0.321190505759, 1.671548350017], rtol=1e-4)


# --------------------------------------------------------------------------------------
# the fixed-effect design
# --------------------------------------------------------------------------------------


class TestFixed:
    def test_intercept_and_slope(self, sleepstudy):
        spec = spec_of("Reaction ~ Days + (1 | Subject)", sleepstudy)
        assert spec.fixed_names == ("(Intercept)", "Days")
        np.testing.assert_array_equal(spec.X, np.column_stack([np.ones(180), sleepstudy["Days"]]))
        np.testing.assert_array_equal(spec.y, sleepstudy["Reaction"].to_numpy())
        assert spec.response == "Reaction"

    @pytest.mark.parametrize("fixed", ["0 + Days", "Days - 1", "-1 + Days", "Days + 0"])
    def test_no_intercept_in_fixed_part(self, sleepstudy, fixed):
        spec = spec_of(f"Reaction ~ {fixed} + (1 | Subject)", sleepstudy)
        assert spec.fixed_names == ("Days",)

    def test_no_intercept_written_after_the_bar(self, sleepstudy):
        spec = spec_of("Reaction ~ Days + (1 | Subject) - 1", sleepstudy)
        assert spec.fixed_names == ("Days",)
        assert spec.blocks[0].columns == ("(Intercept)",)

    @pytest.mark.parametrize("lhs", ["0 + Days", "Days - 1", "-1 + Days"])
    def test_no_intercept_in_bar(self, sleepstudy, lhs):
        spec = spec_of(f"Reaction ~ Days + ({lhs} | Subject)", sleepstudy)
        b = spec.blocks[0]
        assert b.columns == ("Days",) and b.n_theta == 1
        assert spec.fixed_names == ("(Intercept)", "Days")

    def test_categorical_treatment_contrasts(self):
        d = pd.DataFrame({"y": [1.0, 2.0, 4.0, 3.0, 5.0, 7.0, 6.0, 8.0, 9.0],
                          "f": ["lo", "mid", "hi"] * 3, "g": list("aaabbbccc")})
        spec = spec_of("y ~ f + (1 | g)", d)
        # object column: levels sorted as R's factor() does, first is the reference
        assert spec.fixed_names == ("(Intercept)", "f[lo]", "f[mid]")
        expected = np.column_stack([np.ones(9), d["f"] == "lo", d["f"] == "mid"]).astype(float)
        np.testing.assert_array_equal(spec.X, expected)

    def test_categorical_without_intercept_gets_all_levels(self):
        d = pd.DataFrame({"y": np.arange(9.0) ** 1.5, "f": ["lo", "mid", "hi"] * 3, "g": list("aaabbbccc")})
        spec = spec_of("y ~ 0 + f + (1 | g)", d)
        assert spec.fixed_names == ("f[hi]", "f[lo]", "f[mid]")
        np.testing.assert_array_equal(spec.X.sum(axis=1), 1.0)

    def test_categorical_order_is_respected(self, exam):
        # mlmRev's Exam: schgend has levels mixed, boys, girls; R's reference is 'mixed'
        assert list(exam["schgend"].cat.categories) == ["mixed", "boys", "girls"]
        spec = spec_of("normexam ~ standLRT + schgend + (1 | school)", exam)
        assert spec.fixed_names == ("(Intercept)", "standLRT", "schgend[boys]", "schgend[girls]")
        np.testing.assert_array_equal(spec.X[:, 2], (exam["schgend"] == "boys").to_numpy(dtype=float))
        np.testing.assert_array_equal(spec.X[:, 3], (exam["schgend"] == "girls").to_numpy(dtype=float))
        # the caller's frame is not changed
        assert not exam["schgend"].cat.ordered

    def test_categorical_order_in_bar_lhs(self, exam):
        # R: getME(lmer(normexam ~ standLRT + (1 + schgend | school), Exam), "cnms")
        spec = spec_of("normexam ~ standLRT + (1 + schgend | school)", exam)
        assert spec.blocks[0].columns == ("(Intercept)", "schgend[boys]", "schgend[girls]")

    def test_categorical_order_reaches_lme4_fixef(self, exam):
        # R: Exam$schgend <- factor(Exam$schgend, c("mixed","boys","girls"))
        #    m <- lmer(normexam ~ standLRT + schgend + (1|school), Exam); fixef(m); REMLcrit(m)
        fit = Model("normexam ~ standLRT + schgend + (1 | school)", exam).fit(method="reml")
        lme4 = {"(Intercept)": -0.0872485087447, "standLRT": 0.5635787234230,
                "schgend[boys]": 0.0968712191358, "schgend[girls]": 0.2452348864371}
        assert list(fit.fixef.index) == list(lme4)
        np.testing.assert_allclose(fit.fixef.to_numpy(), list(lme4.values()), rtol=1e-4)
        assert fit.objective == pytest.approx(9366.77738897425, rel=1e-6)

    def test_unused_categories_are_dropped(self, exam):
        d = exam[exam["schgend"] != "boys"]
        spec = spec_of("normexam ~ standLRT + schgend + (1 | school)", d)
        assert spec.fixed_names == ("(Intercept)", "standLRT", "schgend[girls]")
        assert spec.dropped_fixed == ()

    def test_ordered_categorical_keeps_its_order(self):
        d = pd.DataFrame({"y": np.arange(12.0) ** 1.3, "g": list("abc") * 4,
                          "f": pd.Categorical(["z", "y", "x"] * 4, categories=["z", "y", "x"], ordered=True)})
        spec = spec_of("y ~ f + (1 | g)", d)
        assert spec.fixed_names == ("(Intercept)", "f[y]", "f[x]")

    def test_transformations(self, sleepstudy):
        spec = spec_of("Reaction ~ np.log(Days + 1) + I(Days**2) + (1 | Subject)", sleepstudy)
        assert len(spec.fixed_names) == 3
        days = sleepstudy["Days"].to_numpy(dtype=float)
        np.testing.assert_allclose(spec.X[:, 1], np.log(days + 1))
        np.testing.assert_allclose(spec.X[:, 2], days**2)

    def test_transformed_response(self, sleepstudy):
        spec = spec_of("np.log(Reaction) ~ Days + (1 | Subject)", sleepstudy)
        np.testing.assert_allclose(spec.y, np.log(sleepstudy["Reaction"].to_numpy()))

    def test_transformation_in_bar_lhs(self, sleepstudy):
        spec = spec_of("Reaction ~ Days + (1 + I(Days / 10) | Subject)", sleepstudy)
        np.testing.assert_allclose(spec.blocks[0].Z[:, 1], sleepstudy["Days"] / 10)

    def test_interaction_in_fixed_part(self):
        d = nested_data()
        spec = spec_of("y ~ x * a + (1 | b)", d)
        assert spec.fixed_names[:3] == ("(Intercept)", "x", "a[s1]")
        assert "x:a[s1]" in spec.fixed_names and len(spec.fixed_names) == 12


# --------------------------------------------------------------------------------------
# the grouping-columns form
# --------------------------------------------------------------------------------------


def assert_same_spec(a, b):
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.fixed_names == b.fixed_names
    assert len(a.blocks) == len(b.blocks)
    for x, y in zip(a.blocks, b.blocks):
        assert (x.group, x.levels, x.columns, x.correlated) == (y.group, y.levels, y.columns, y.correlated)
        np.testing.assert_array_equal(x.codes, y.codes)
        np.testing.assert_array_equal(x.Z, y.Z)


class TestGroupsForm:
    def test_dict_form_is_the_bar_formula(self, exam):
        a = spec_of("normexam ~ standLRT", exam, groups={"school": "1 + standLRT"})
        b = spec_of("normexam ~ standLRT + (1 + standLRT | school)", exam)
        assert_same_spec(a, b)
        assert a.formula == "normexam ~ standLRT + (1 + standLRT | school)"

    def test_dict_form_fits_identically(self, exam):
        a = Model("normexam ~ standLRT", exam, groups={"school": "1 + standLRT"}).fit(method="reml")
        b = Model("normexam ~ standLRT + (1 + standLRT | school)", exam).fit(method="reml")
        assert a.objective == b.objective
        np.testing.assert_array_equal(a.theta, b.theta)

    def test_string_form(self, sleepstudy):
        assert_same_spec(spec_of("Reaction ~ Days", sleepstudy, groups="Subject"),
                         spec_of("Reaction ~ Days + (1 | Subject)", sleepstudy))

    def test_list_form(self):
        d = load_dataset("Penicillin")
        assert_same_spec(spec_of("diameter ~ 1", d, groups=["plate", "sample"]),
                         spec_of("diameter ~ 1 + (1 | plate) + (1 | sample)", d))

    def test_groups_added_to_bar_terms(self, sleepstudy):
        a = spec_of("Reaction ~ Days + (0 + Days | Subject)", sleepstudy, groups="Subject")
        assert a.formula == "Reaction ~ Days + (0 + Days | Subject) + (1 | Subject)"
        # equal numbers of levels: the written order stays (lme4)
        assert [b.columns for b in a.blocks] == [("Days",), ("(Intercept)",)]

    def test_column_name_with_space(self, sleepstudy):
        d = sleepstudy.rename(columns={"Subject": "the subject"})
        assert formula_with_groups("y ~ x", {"the subject": "1"}) == "y ~ x + (1 | `the subject`)"
        spec = spec_of("Reaction ~ Days", d, groups={"the subject": "1 + Days"})
        assert spec.blocks[0].group == "the subject" and spec.blocks[0].n_levels == 18

    def test_bad_groups_argument(self, sleepstudy):
        with pytest.raises(FormulaError, match="groups"):
            Model("Reaction ~ Days", sleepstudy, groups=3)
        with pytest.raises(FormulaError, match="groups entry 'Subject'"):
            Model("Reaction ~ Days", sleepstudy, groups={"Subject": ""})


# --------------------------------------------------------------------------------------
# fits that depend on the formula machinery
# --------------------------------------------------------------------------------------


class TestFits:
    def test_uncorrelated_sleepstudy_matches_lme4(self, sleepstudy):
        fit = Model("Reaction ~ Days + (Days || Subject)", sleepstudy).fit(method="reml")
        lme4_objective = 1743.66929358148  # lme4 1.1-31, tests/data/lme4_reference.json
        assert fit.objective == pytest.approx(lme4_objective, rel=1e-6)
        assert fit.objective <= lme4_objective * (1 + 1e-6)
        np.testing.assert_allclose(fit.theta, [0.979896527914237, 0.234231225347045], rtol=1e-4)
        # no correlation row for a || term
        assert fit.varcorr["var2"].isna().all()

    def test_uncorrelated_equals_two_terms(self, sleepstudy):
        a = Model("Reaction ~ Days + (Days || Subject)", sleepstudy).fit(method="reml")
        b = Model("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", sleepstudy).fit(method="reml")
        assert a.objective == pytest.approx(b.objective, rel=1e-9)

    def test_nested_equals_explicit(self, nested):
        a = Model("y ~ x + (1 | a/b)", nested).fit(method="reml")
        b = Model("y ~ x + (1 | a) + (1 | a:b)", nested).fit(method="reml")
        assert a.objective == b.objective
        # R: m <- lmer(y ~ x + (1|a/b), d); REMLcrit(m); getME(m, "theta"); fixef(m)
        assert a.objective == pytest.approx(221.542186141022, rel=1e-6)
        np.testing.assert_allclose(a.theta, [1.21010384677, 1.59319302399], rtol=1e-4)
        np.testing.assert_allclose(a.fixef.to_numpy(), [1.688348603454, 0.470156465479], rtol=1e-4)

    def test_nested_with_integer_grouping_labels(self, nested):
        # numeric labels for a, the same fit
        d = nested.assign(a=nested["a"].str[1:].astype(int))
        a = Model("y ~ x + (1 | a/b)", d).fit(method="reml")
        assert a.objective == pytest.approx(221.542186141022, rel=1e-6)

    def test_fit_does_not_warn_on_clean_input(self, sleepstudy):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            build_spec("Reaction ~ Days + (Days | Subject)", sleepstudy)
