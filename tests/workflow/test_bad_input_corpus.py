"""The bad-input corpus: every case through every entry point it applies to.

Each case is one row of a table: the data (built from sleepstudy), the formula, the
argument at fault, the error class (or, for what lme4 fits with a warning, the
warning) and patterns its message must contain — the column or argument it names and
what to do.  The entry points are

* ``Model(...)``, then ``.fit(method="reml")``, ``"ml"`` and ``"nuts"`` on it;
* ``.fit(method="nuts")`` must fail before any model is built, compiled or sampled
  (the builders and samplers are replaced by tripwires) and within seconds;
* the command line, ``bayeslmm.cli.main`` on a CSV written to ``tmp_path``: exit code
  2 and the message on stderr, no traceback (argparse's own checks exit with 2 too).

The detailed Model-level checks of many of these cases (counts of rows, carets, lists
of columns) are in ``tests/formula/test_bad_input.py``; this table adds the other entry points.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from bayeslmm import Model, Prior
from bayeslmm.cli import main
from bayeslmm.datasets import load_dataset
from bayeslmm.errors import BayesLMMError, DataError, FormulaError, ModelError

F = "Reaction ~ Days + (Days | Subject)"
F1 = "Reaction ~ Days + (1 | Subject)"
SLEEP = load_dataset("sleepstudy")


def sleep(**columns) -> Callable[[], pd.DataFrame]:
    """sleepstudy with some columns replaced or added (a builder, so every test gets a fresh copy)."""
    def build() -> pd.DataFrame:
        return SLEEP.assign(**{k: (v() if callable(v) else v) for k, v in columns.items()})
    return build


def with_values(column: str, rows: list[int], value) -> Callable[[], pd.DataFrame]:
    def build() -> pd.DataFrame:
        d = SLEEP.astype({"Days": float})
        d.loc[rows, column] = value
        return d
    return build


def full_rank_xz() -> pd.DataFrame:
    """10 rows, 9 fixed-effect columns and 5 groups: [X Z] has rank 10."""
    rng = np.random.default_rng(0)
    d = pd.DataFrame(rng.normal(size=(10, 8)), columns=[f"x{i}" for i in range(8)])
    return d.assign(y=rng.normal(size=10), g=np.repeat(np.arange(5), 2))


@dataclass(frozen=True)
class Case:
    id: str
    data: Callable[[], pd.DataFrame]
    formula: str
    error: type | None            # None: a warning case (lme4 fits it and warns)
    patterns: tuple[str, ...]     # regexes the message must contain (the argument, what to do)
    model_kwargs: dict = field(default_factory=dict)
    csv: bool = True              # whether the case survives a round trip through CSV
    cli_patterns: tuple[str, ...] | None = None  # where the command line words it differently


# --------------------------------------------------------------------------------------
# cases caught when the model is built: Model() raises, so no fit method gets further
# --------------------------------------------------------------------------------------

MODEL_CASES = [
    Case("nan-response", with_values("Reaction", [3, 10], np.nan), F, DataError,
         (r"missing or infinite values", r"'Reaction': 2 rows", r"missing='drop'")),
    Case("inf-response", with_values("Reaction", [5], np.inf), F, DataError,
         (r"infinite", r"'Reaction': 1 row\b", r"missing='drop'")),
    Case("nan-predictor", with_values("Days", [1, 2, 3], np.nan), F, DataError,
         (r"'Days': 3 rows", r"missing='drop'")),
    Case("inf-predictor", with_values("Days", [6], -np.inf), F, DataError, (r"infinite", r"'Days': 1 row\b")),
    Case("nan-group", with_values("Subject", [7], np.nan), F, DataError, (r"'Subject': 1 row\b", r"missing='drop'")),
    Case("unknown-response", sleep(), "Reaktion ~ Days + (1 | Subject)", DataError,
         (r"unknown column 'Reaktion' in the response", r"Did you mean 'Reaction'\?")),
    Case("unknown-predictor", sleep(), "Reaction ~ Dayz + (1 | Subject)", DataError,
         (r"unknown column 'Dayz' in the fixed effects", r"Did you mean 'Days'\?")),
    Case("unknown-slope", sleep(), "Reaction ~ Days + (Dayz || Subject)", DataError,
         (r"unknown column 'Dayz' in the term \(Dayz \|\| Subject\)", r"Did you mean 'Days'\?")),
    Case("unknown-group", sleep(), "Reaction ~ Days + (1 | Subjekt)", DataError,
         (r"unknown column 'Subjekt' in the grouping factor", r"Did you mean 'Subject'\?")),
    Case("string-response", sleep(Reaction=lambda: SLEEP["Reaction"].map("{:.0f} ms".format)), F, DataError,
         (r"the response 'Reaction' is not numeric", r"convert it")),
    Case("bool-response", sleep(Reaction=lambda: SLEEP["Reaction"] > 300), F, DataError,
         (r"the response 'Reaction' is not numeric",)),
    Case("complex-response", sleep(Reaction=lambda: SLEEP["Reaction"] + 1j), F, DataError,
         (r"the response 'Reaction' is not numeric", r"real numeric response")),
    Case("constant-response", sleep(Reaction=250.0), F, DataError,
         (r"the response 'Reaction' is constant", r"nothing to model")),
    Case("overflowing-response", sleep(Reaction=lambda: SLEEP["Reaction"] * 1e200), F, DataError,
         (r"the response 'Reaction' has values as large as", r"overflow", r"Rescale it \(divide by 1e202\)")),
    Case("overflowing-predictor", sleep(Days=lambda: SLEEP["Days"] * 1e160), F1, DataError,
         (r"the fixed-effect column 'Days'", r"overflow", r"Rescale it")),
    Case("one-level-group", sleep(site="A"), "Reaction ~ Days + (1 | site)", ModelError,
         (r"grouping factor 'site'", r"only one level \('A'\)", r"drop the term or use a fixed effect")),
    Case("levels-equal-observations", sleep(obs=np.arange(180)), "Reaction ~ Days + (1 | obs)", ModelError,
         (r"grouping factor 'obs'", r"180 levels for 180 observations", r"must be smaller")),
    Case("random-effects-exceed-observations", sleep(pair=np.arange(180) // 2), "Reaction ~ Days + (Days | pair)",
         ModelError, (r"\(Days \| pair\) has 180 random effects \(90 levels × 2\) for 180", r"Simplify the term")),
    Case("float-group", sleep(dose=np.linspace(0, 1, 180) % 0.3), "Reaction ~ Days + (1 | dose)", DataError,
         (r"grouping column 'dose' holds non-integer numbers", r"convert it to strings or integer codes")),
    Case("p-equals-n", sleep(id=lambda: [f"r{i}" for i in range(180)]), "Reaction ~ id + (1 | Subject)", ModelError,
         (r"180 linearly independent columns for 180 observations", r"Use fewer predictors")),
    Case("effects-reproduce-every-row", full_rank_xz, "y ~ " + " + ".join(f"x{i}" for i in range(8)) + " + (1 | g)",
         ModelError, (r"\[X Z\] has rank 10 for 10 observations", r"9 fixed-effect columns and 5 random effects",
                      r"nothing to estimate the residual variance")),
    Case("empty-data", lambda: SLEEP.iloc[:0], F, DataError, (r"data is empty",)),
    Case("unclosed-parenthesis", sleep(), "Reaction ~ Days + (Days | Subject", FormulaError,
         (r"unclosed '\('", r"add the missing '\)'", r"\n  Reaction ~ Days \+ \(Days \| Subject\n {20}\^")),
    Case("missing-operator", sleep(), "Reaction ~ Days Subject + (1 | Subject)", FormulaError,
         (r"unexpected 'Subject' in the fixed effects", r"is a '\+' or an operator missing\?",
          r"\n  Reaction ~ Days Subject \+ \(1 \| Subject\)\n {18}\^")),
    Case("empty-term", sleep(), "Reaction ~ Days + + (1 | Subject)", FormulaError,
         (r"empty term: two '\+' in a row",)),
    Case("no-random-term", sleep(), "Reaction ~ Days", FormulaError,
         (r"no random-effect term such as '\(1 \| group\)'", r"add one")),
    Case("unknown-function", sleep(), "Reaction ~ log(Days + 1) + (1 | Subject)", FormulaError,
         (r"unknown function or name 'log'", r"np\.log")),
    Case("log-of-zero", sleep(), "Reaction ~ np.log(Days) + (1 | Subject)", DataError,
         (r"np\.log\(Days\)", r"non-finite values after transformation", r"transform the data first")),
    Case("no-fixed-effects", sleep(), "Reaction ~ 0 + (Days | Subject)", ModelError,
         (r"no fixed effects", r"keep the intercept")),
    Case("empty-bar-left-side", sleep(), "Reaction ~ Days + (0 | Subject)", FormulaError,
         (r"the term \(0 \| Subject\) has no random effects on its left side",)),
    # Python-only arguments: no command-line form
    Case("duplicated-column", lambda: pd.concat([SLEEP, SLEEP[["Days"]]], axis=1), F, DataError,
         (r"more than one column named 'Days'", r"rename or drop the duplicates"), csv=False),
    Case("missing-argument", sleep(), F, BayesLMMError, (r"missing must be 'raise' or 'drop', got 'omit'",),
         model_kwargs={"missing": "omit"}, csv=False),
    Case("rank-deficient-argument", sleep(), F, BayesLMMError,
         (r"rank_deficient must be 'drop' or 'error', got 'ignore'",), model_kwargs={"rank_deficient": "ignore"},
         csv=False),
    Case("collinear-predictor-refused", sleep(weeks=lambda: SLEEP["Days"] / 7), "Reaction ~ Days + weeks + (1 | Subject)",
         ModelError, (r"rank deficient: \['weeks'\]", r"rank_deficient='drop'"),
         model_kwargs={"rank_deficient": "error"}, csv=False),
]

# what lme4 fits with a warning: the model is built and fitted, and the warning says what was done
WARNING_CASES = [
    Case("constant-predictor", sleep(const=3.0), "Reaction ~ Days + const + (Days | Subject)", None,
         (r"rank deficient so dropping 1 column: \['const'\]",)),
    Case("collinear-predictors", sleep(weeks=lambda: SLEEP["Days"] / 7), "Reaction ~ Days + weeks + (Days | Subject)",
         None, (r"rank deficient so dropping 1 column: \['weeks'\]",)),
    Case("slope-constant-within-groups", sleep(age=lambda: SLEEP["Subject"].cat.codes.astype(float) + 20),
         "Reaction ~ Days + age + (1 + age | Subject)", None,
         (r"the slope 'age' in \(1 \+ age \| Subject\) does not vary within any level of 'Subject'",
          r"drop it from the term, e\.g\. \(1 \| Subject\)")),
    Case("slope-far-from-zero", sleep(Days=lambda: SLEEP["Days"] + 2000), F, None,
         (r"the random slope 'Days' in \(Days \| Subject\) has mean 2004\.5", r"Centre the variable")),
    # a response far from zero is no longer warned about: it is shifted inside the cross-products
    # (crossprod.response_shift; tests/reml/test_centring.py)
]


def message_matches(message: str, patterns) -> None:
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


@pytest.fixture
def no_sampling(monkeypatch):
    """Tripwires on everything that builds, compiles or samples a Bayesian model."""
    import bayeslmm.bayes.fit as bayes_fit

    def tripwire(*args, **kwargs):
        raise AssertionError("a model was built or sampled before the bad input was reported")

    names = ["build_pymc_model", "kernel_model", "_sample", "sample_kernel", "_run_sampler"]
    patched = [n for n in names if hasattr(bayes_fit, n)]
    assert "build_pymc_model" in patched
    for n in patched:
        monkeypatch.setattr(bayes_fit, n, tripwire)
    return patched


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# --------------------------------------------------------------------------------------
# entry points for the cases caught when the model is built
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.id)
def test_model_entry(case: Case, no_sampling):
    data = case.data()
    options = {"reml": {}, "ml": {}, "nuts": {"draws": 10, "tune": 10, "chains": 1, "progressbar": False}}
    for method, kwargs in options.items():
        t0 = time.perf_counter()
        with pytest.raises(case.error) as info:
            Model(case.formula, data, **case.model_kwargs).fit(method=method, **kwargs)
        assert time.perf_counter() - t0 < 10
        assert isinstance(info.value, BayesLMMError)
        message_matches(str(info.value), case.patterns)


@pytest.mark.parametrize("method", ["reml", "nuts"])
@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c.csv], ids=lambda c: c.id)
def test_command_line_entry(case: Case, method, tmp_path, capsys, no_sampling):
    path = tmp_path / "data.csv"
    case.data().to_csv(path, index=False)
    code, err = run_cli(["fit", str(path), case.formula, "--method", method, "--draws", "10", "--tune", "10",
                         "--chains", "1"], capsys)
    assert code == 2
    assert err.startswith("bayeslmm: error: ")
    message_matches(err, case.cli_patterns or case.patterns)


@pytest.mark.parametrize("case", WARNING_CASES, ids=lambda c: c.id)
def test_warning_cases_fit_and_say_why(case: Case):
    with pytest.warns(UserWarning) as record:
        model = Model(case.formula, case.data())
    message_matches(" | ".join(str(w.message) for w in record), case.patterns)
    fit = model.fit(method="reml")
    assert np.isfinite(fit.objective) and np.all(np.isfinite(fit.theta)) and np.isfinite(fit.sigma)
    assert np.all(np.isfinite(fit.fixef.to_numpy()))


@pytest.mark.parametrize("case", WARNING_CASES, ids=lambda c: c.id)
def test_warning_cases_on_the_command_line(case: Case, tmp_path, capsys):
    path = tmp_path / "data.csv"
    case.data().to_csv(path, index=False)
    code, err = run_cli(["fit", str(path), case.formula], capsys)
    assert code == 0
    warned = [line for line in err.splitlines() if line.startswith("bayeslmm: warning: ")]
    assert warned, err
    message_matches(" | ".join(warned), case.patterns)
    assert "UserWarning" not in err and ".py:" not in err  # one line per warning, no source path


def test_slope_constant_within_groups_is_flagged_singular():
    d = WARNING_CASES[2].data()
    with pytest.warns(UserWarning, match="does not vary within any level"):
        fit = Model("Reaction ~ Days + age + (1 + age | Subject)", d).fit(method="reml")
    assert fit.singular


# --------------------------------------------------------------------------------------
# arguments of the fit: caught before anything is built or sampled
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(F, SLEEP)


NUTS_CASES = [
    ("draws-zero", {"draws": 0}, r"draws must be an integer ≥ 1, got 0", ["--draws", "0"]),
    ("draws-fraction", {"draws": 2.5}, r"draws must be an integer ≥ 1, got 2\.5", None),
    ("chains-negative", {"chains": -1}, r"chains must be an integer ≥ 1, got -1", ["--chains", "-1"]),
    ("tune-negative", {"tune": -1}, r"tune must be an integer ≥ 0, got -1", ["--tune", "-1"]),
    ("cores-zero", {"cores": 0}, r"cores must be an integer ≥ 1, got 0", None),
    ("sampler-unknown", {"sampler": "foo"}, r"sampler must be one of \['auto', 'pymc', 'nutpie'\], got 'foo'",
     ["--sampler", "foo"]),
    ("target-accept-above-one", {"target_accept": 1.5}, r"target_accept must be a number strictly between 0 and 1, "
     r"got 1\.5", None),
    ("target-accept-string", {"target_accept": "high"}, r"target_accept must be a number", None),
    ("parameterization-unknown", {"parameterization": "centred"},
     r"parameterization must be one of \['collapsed', 'explicit'\], got 'centred'", None),
    ("route-unknown", {"route": "stan"}, r"route must be one of \['auto', 'kernel', 'one-factor', 'blocked', "
     r"'partial', 'structured', 'graph', 'graph-explicit'\], got 'stan'", None),
    ("route-kernel-on-pymc", {"route": "blocked", "sampler": "pymc"},
     r"route='blocked' is a compiled kernel, which runs on nutpie's NUTS only", ["--route", "blocked", "--sampler",
                                                                                "pymc"]),
    ("route-structured-without-structure", {"route": "structured"},
     r"route='structured' cannot fit this model: the structured kernel is for models with a residual structure",
     ["--route", "structured"]),
    ("max-treedepth-zero", {"max_treedepth": 0}, r"max_treedepth must be an integer ≥ 1, got 0", None),
    ("seed-negative", {"random_seed": -3}, r"random_seed must be a non-negative integer or None, got -3",
     ["--seed", "-3"]),
    ("progressbar-string", {"progressbar": "yes"}, r"progressbar must be True or False, got 'yes'", None),
    ("warn-number", {"warn": 3}, r"warn must be True or False, got 3", None),
    ("unknown-option", {"iterations": 100}, r"unknown fit option\(s\) \['iterations'\]", None),
    ("prior-negative-scale", {"priors": {"Days": Prior("Normal", mu=0, sigma=-1)}},
     r"prior for coefficient 'Days': parameter sigma=-1 must be positive", None),
    ("prior-unknown-distribution", {"priors": {"Days": Prior("Wobbly", mu=0)}},
     r"prior for coefficient 'Days': unknown or unsuitable distribution 'Wobbly'; use one of \[", None),
    ("prior-scale-distribution-for-location", {"priors": {"sigma": Prior("Normal", mu=0, sigma=1)}},
     r"prior for sigma: unknown or unsuitable distribution 'Normal'; use one of \['Exponential'", None),
    ("prior-unknown-parameter", {"priors": {"Days": Prior("Normal", mu=0, sigma=1, scale=2)}},
     r"prior for coefficient 'Days': Normal takes the parameters \['mu', 'sigma'\], not 'scale'", None),
    ("prior-missing-parameter", {"priors": {"Days": Prior("Normal", mu=0)}},
     r"Normal needs the parameter 'sigma'", None),
    ("prior-non-finite", {"priors": {"Intercept": Prior("Normal", mu=np.nan, sigma=1)}},
     r"prior for coefficient 'Intercept': parameter mu=nan must be finite", None),
    ("prior-unknown-key", {"priors": {"Dayz": Prior("Normal", mu=0, sigma=1)}},
     r"prior key 'Dayz' names nothing in the model; use a coefficient", None),
    ("prior-negative-eta", {"priors": {"Subject": {"eta": -1}}}, r"LKJ eta must be a positive number, got -1", None),
    ("prior-eta-bool", {"priors": {"Subject": {"eta": True}}}, r"LKJ eta must be a positive number, got True", None),
    ("prior-sd-wrong-length", {"priors": {"Subject": {"sd": Prior("HalfNormal", sigma=[1, 2, 3])}}},
     r"Subject sd sigma: give one value or 2 \(one per random-effect column\)", None),
    ("prior-sd-negative", {"priors": {"Subject|Days": Prior("HalfNormal", sigma=-2)}},
     r"prior for Subject\|Days: parameter sigma=-2 must be positive", None),
    ("prior-not-a-prior", {"priors": {"Days": 3}}, r"must be a bayeslmm\.Prior, e\.g\. Prior\('Normal'", None),
    ("priors-not-a-dict", {"priors": [1, 2]}, r"priors must be a dict such as", None),
]


@pytest.mark.parametrize("name, kwargs, pattern, cli", NUTS_CASES, ids=[c[0] for c in NUTS_CASES])
def test_nuts_arguments_fail_fast(model, no_sampling, name, kwargs, pattern, cli):
    args = {"draws": 10, "tune": 10, "chains": 1, "progressbar": False, **kwargs}
    t0 = time.perf_counter()
    with pytest.raises(BayesLMMError, match=pattern):
        model.fit(method="nuts", **args)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("name, kwargs, pattern, cli", [c for c in NUTS_CASES if c[3]], ids=[c[0] for c in NUTS_CASES if c[3]])
def test_nuts_arguments_on_the_command_line(no_sampling, capsys, name, kwargs, pattern, cli):
    code, err = run_cli(["fit", "sleepstudy", F, "--method", "nuts", *cli], capsys)
    assert code == 2
    if cli[0] == "--sampler":  # argparse knows the choices
        assert "argument --sampler: invalid choice: 'foo'" in err
    else:
        assert err.startswith("bayeslmm: error: ")
        assert re.search(pattern, err)


REML_CASES = [
    ("start-wrong-length", {"start": [1.0, 0.0]}, r"start must have 3 entries \(one per θ\), got shape \(2,\)"),
    ("start-below-bound", {"start": [-1.0, 0.0, 1.0]}, r"start: θ entries \[0\] are below their lower bounds"),
    ("start-not-finite", {"start": [np.nan, 0.0, 1.0]}, r"start must be finite, got \[nan, 0\.0, 1\.0\]"),
    ("start-not-numbers", {"start": ["a", "b", "c"]}, r"start must be a sequence of numbers"),
    ("maxeval-zero", {"maxeval": 0}, r"maxeval must be an integer ≥ 1, got 0"),
    ("maxeval-string", {"maxeval": "many"}, r"maxeval must be an integer ≥ 1, got 'many'"),
    ("ftol-negative", {"ftol_rel": -1.0}, r"ftol_rel must be a finite number ≥ 0, got -1\.0"),
    ("xtol-nan", {"xtol_abs": np.nan}, r"xtol_abs must be a finite number ≥ 0, got nan"),
    ("restarts-negative", {"restarts": -1}, r"restarts must be an integer ≥ 0, got -1"),
    ("initial-step-zero", {"initial_step": 0}, r"initial_step must be a positive finite number or None, got 0"),
    ("nuts-option-for-reml", {"draws": 100}, r"unknown fit option\(s\) \['draws'\] for this method"),
    ("method-unknown", {"method": "bayes"}, r"method must be one of \['reml', 'ml', 'nuts'\], got 'bayes'"),
]


@pytest.mark.parametrize("name, kwargs, pattern", REML_CASES, ids=[c[0] for c in REML_CASES])
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_reml_arguments(model, name, kwargs, pattern, method):
    args = {"method": method, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning and a fit
        with pytest.raises(BayesLMMError, match=pattern):
            model.fit(**args)


def test_method_on_the_command_line(capsys):
    code, err = run_cli(["fit", "sleepstudy", F, "--method", "bayes"], capsys)
    assert code == 2 and "argument --method: invalid choice: 'bayes'" in err


# --------------------------------------------------------------------------------------
# the command line's own input: files and paths
# --------------------------------------------------------------------------------------

FILE_CASES = [
    ("empty-file", b"", r"is empty \(no header, no rows\); give a CSV file with a header"),
    ("header-only", b"Reaction,Days,Subject\n", r"data is empty: it has no rows to fit"),
    ("ragged-rows", b"Reaction,Days,Subject\n1,2,3\n4,5,6,7,8\n", r"is not a well-formed CSV file .*Expected 3 fields "
     r"in line 3, saw 5.*as many comma-separated fields as the header"),
    ("not-utf8", b"\xff\xfe\x00R\x00e", r"is not UTF-8 text .*save it as UTF-8 CSV"),
    ("semicolons", b"Reaction;Days;Subject\n1;2;3\n", r"unknown column 'Reaction' in the response.*\['Reaction;Days;Subject'\]"),
]


@pytest.mark.parametrize("name, content, pattern", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unreadable_files(tmp_path, capsys, name, content, pattern):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    code, err = run_cli(["fit", str(path), F], capsys)
    assert code == 2
    assert err.startswith("bayeslmm: error: ")
    assert re.search(pattern, err, re.S), err


def test_unknown_file_type_and_missing_file(tmp_path, capsys):
    path = tmp_path / "data.txt"
    path.write_text("Reaction,Days,Subject\n")
    code, err = run_cli(["fit", str(path), F], capsys)
    assert code == 2 and "unknown file type '.txt'; give a .csv, .csv.gz or .parquet file" in err
    code, err = run_cli(["fit", str(tmp_path / "nope.csv"), F], capsys)
    assert code == 2 and "is neither an existing file nor a bundled dataset" in err and "sleepstudy" in err


def test_json_into_a_missing_folder_fails_before_fitting(tmp_path, capsys, monkeypatch):
    import bayeslmm.model

    monkeypatch.setattr(bayeslmm.model.Model, "fit", lambda *a, **k: pytest.fail("fitted before checking --json"))
    code, err = run_cli(["fit", "sleepstudy", F, "--json", str(tmp_path / "no" / "such" / "fit.json")], capsys)
    assert code == 2
    assert "--json" in err and "does not exist; create it or give another path" in err


def test_unknown_bundled_dataset_name(capsys):
    with pytest.raises(DataError, match=r"sleepstudi.*Did you mean 'sleepstudy'"):
        Model(F, "sleepstudi")
    code, err = run_cli(["fit", "sleepstudi", F], capsys)
    assert code == 2 and "neither an existing file nor a bundled dataset" in err


def test_corpus_size():
    """The issue asks for at least 25 distinct cases; each is a row above."""
    n = len(MODEL_CASES) + len(WARNING_CASES) + len(NUTS_CASES) + len(REML_CASES) + len(FILE_CASES)
    assert n >= 25
    ids = [c.id for c in MODEL_CASES + WARNING_CASES] + [c[0] for c in NUTS_CASES + REML_CASES + FILE_CASES]
    assert len(ids) == len(set(ids))


def test_tripwires_catch_a_valid_fit(model, no_sampling):
    """The fail-fast tests above mean something: with valid arguments the tripwire is hit."""
    with pytest.raises(AssertionError, match="built or sampled"):
        model.fit(method="nuts", draws=10, tune=10, chains=1, progressbar=False, route="graph")
    with pytest.raises(AssertionError, match="built or sampled"):
        model.fit(method="nuts", draws=10, tune=10, chains=1, progressbar=False)
