"""The command line's residual structures: --variance, --correlation, --weights.

Reference numbers: tests/data/nlme_reference.json (nlme 3.1-162), the same file the engine's
parity tests read.  A CLI fit must equal the Python fit of the same structure exactly (one
code path; checked to 1e-12 relative), and so nlme's numbers to the engine's tolerance.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm import CorAR1, CorCAR1, CorCompSymm, Model, VarExp, VarFixed, VarIdent, VarPower
from bayeslmm.cli import main, parse_correlation, parse_variance

DATA = Path(__file__).resolve().parents[1] / "data"
REF = json.loads((DATA / "nlme_reference.json").read_text())["models"]
OVARY = REF["ovary_ar1"]["formula_py"]
OVARY_CSV = str(DATA / "Ovary.csv")


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``bayeslmm fit ...``."""
    code = main(["fit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text, structure", [
    ("ident(Sex)", VarIdent("Sex")),
    ("power(Time)", VarPower("Time")),
    (" exp( x ) ", VarExp("x")),
    ("fixed(Time)", VarFixed("Time")),
    ("IDENT(Sex)", VarIdent("Sex")),  # names are case-insensitive, columns are not
])
def test_parse_variance(text, structure):
    assert parse_variance(text) == structure


@pytest.mark.parametrize("text, structure", [
    ("ar1(Mare)", CorAR1("Mare")),
    ("ar1(Mare, time=Day)", CorAR1("Mare", "Day")),
    ("car1(Subject, time=t)", CorCAR1("Subject", "t")),
    ("car1( Subject ,time = t )", CorCAR1("Subject", "t")),
    ("compsymm(Subject)", CorCompSymm("Subject")),
])
def test_parse_correlation(text, structure):
    assert parse_correlation(text) == structure


def test_nothing_given_is_sigma2_identity():
    assert parse_variance(None) is None and parse_correlation(None) is None


def test_ovary_ar1_equals_the_python_fit_and_nlme(capsys, tmp_path):
    out_json = tmp_path / "fit.json"
    code, out, err = run(capsys, OVARY_CSV, OVARY, "--correlation", "ar1(Mare)", "--json", str(out_json))
    assert code == 0, err
    assert "Correlation Structure: corAR1(form = ~1 | Mare)  (AR(1))" in out
    got = json.loads(out_json.read_text())
    data = pd.read_csv(OVARY_CSV)  # as the command line reads it (Mare as integers)
    fit = Model(OVARY, data, correlation=CorAR1("Mare")).fit()
    assert got["residual_params"].keys() == {"Phi"}
    assert got["residual_params"]["Phi"] == pytest.approx(fit.residual_params["Phi"], rel=1e-12)
    assert got["logLik"] == pytest.approx(fit.loglik, rel=1e-12)
    np.testing.assert_allclose(list(got["fixef"].values()), fit.fixef.to_numpy(), rtol=1e-12)
    assert got["residual_structure"] == {"variance": None, "weights": None,
                                         "correlation": {"type": "CorAR1", "group": "Mare", "time": None}}
    ref = REF["ovary_ar1"]  # nlme: Phi 0.5721866, logLik -774.724 (reached 7.6e-7 and 5e-14 relative)
    assert got["residual_params"]["Phi"] == pytest.approx(ref["corStruct"]["Phi"], rel=1e-4)
    assert got["logLik"] == pytest.approx(ref["logLik"], rel=1e-6)


def test_weights_column_is_varfixed_of_its_inverse(capsys, tmp_path):
    """Precision weights 1/Time are nlme's varFixed(~Time): both give the reference fit."""
    data = pd.read_csv(DATA / "BodyWeight.csv")
    data["w"] = 1.0 / data["Time"]
    path = tmp_path / "bw.csv"
    data.to_csv(path, index=False)
    ref = REF["bodyweight_varfixed_time"]
    formula = "weight ~ Time*C(Diet) + (Time | Rat)"  # Diet is a factor in nlme's fit, integers in the CSV
    results = {}
    for option in (["--weights", "w"], ["--variance", "fixed(Time)"]):
        out_json = tmp_path / f"{option[0][2:]}.json"
        code, out, err = run(capsys, str(path), formula, *option, "--json", str(out_json))
        assert code == 0, err
        results[option[0]] = json.loads(out_json.read_text())
    weights, fixed = results["--weights"], results["--variance"]
    assert weights["residual_structure"]["weights"] == "w"
    assert fixed["residual_structure"]["variance"] == {"type": "VarFixed", "covariate": "Time"}
    assert weights["logLik"] == pytest.approx(fixed["logLik"], rel=1e-10)
    # nlme 3.1-162 (reached: logLik 2.5e-12, sigma 1.5e-7 relative)
    assert weights["logLik"] == pytest.approx(ref["logLik"], rel=1e-6)
    assert weights["sigma"] == pytest.approx(ref["sigma"], rel=1e-4)


def test_variance_ident_on_the_command_line(capsys, tmp_path):
    ref = REF["orthodont_varident"]
    out_json = tmp_path / "o.json"
    code, out, err = run(capsys, str(DATA / "Orthodont.csv"), ref["formula_py"], "--variance", "ident(Sex)",
                         "--json", str(out_json))
    assert code == 0, err
    got = json.loads(out_json.read_text())
    # the CSV's Sex reads as strings, Female first: the ratio is σ_Male/σ_Female, nlme's inverted
    (level, ratio), = got["residual_params"].items()
    assert level == "Male" and ratio == pytest.approx(1 / ref["varStruct"]["Female"], rel=1e-4)  # reached 1.1e-6
    assert got["logLik"] == pytest.approx(ref["logLik"], rel=1e-6)
    assert "Variance function: varIdent(form = ~1 | Sex)" in out


@pytest.mark.parametrize("option, text, needle", [
    ("--correlation", "ar1(Mare", "is not an expression like"),
    ("--correlation", "ar1 Mare", "is not an expression like"),
    ("--correlation", "ar2(Mare)", "unknown correlation structure 'ar2'"),
    ("--correlation", "car1(Mare)", "needs a numeric time column"),
    ("--correlation", "ar1(Mare, lag=2)", "does not take lag="),
    ("--correlation", "compsymm(Mare, time=Time)", "does not take time="),
    ("--correlation", "ar1()", "an empty argument"),
    ("--correlation", "ar1(Mare,)", "an empty argument"),
    ("--correlation", "ar1(time=Time)", "needs exactly one column first"),
    ("--correlation", "ar1(Mare, Time)", "needs exactly one column first"),
    ("--correlation", "ar1(Mare, time=Time, time=Time)", "given once"),
    ("--variance", "sqrt(Time)", "unknown variance function 'sqrt'"),
    ("--variance", "power(Time, by=Mare)", "takes one column and no keywords"),
    ("--variance", "power", "is not an expression like"),
    ("--correlation", "ar1(Nope)", "name column(s) ['Nope'] that DATA does not have; its columns: Mare, Time"),
    ("--weights", "Nope", "name column(s) ['Nope'] that DATA does not have"),
    ("--weights", " ", "--weights needs the name of a column"),
    # the engine's own checks come through as one line too
    ("--correlation", "ar1(Mare, time=Time)", "must hold integers"),
    ("--variance", "fixed(Time)", "must be positive"),
])
def test_bad_expressions_exit_2_with_one_line(capsys, tmp_path, option, text, needle):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, OVARY_CSV, OVARY, option, text, "--out", str(out_dir))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bayeslmm: error: ") and "Traceback" not in err
    assert needle in err
    assert "REML criterion" not in out and not out_dir.exists()  # refused before fitting, nothing left


NUTS_FAST = ("--draws", "200", "--tune", "200", "--chains", "2", "--seed", "1")


def test_nuts_with_a_correlation_writes_its_outputs_and_notes_no_loo(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, OVARY_CSV, "follicles ~ np.sin(2*3.141592653589793*Time) + (1 | Mare)",
                         "--correlation", "ar1(Mare)", "--method", "nuts", *NUTS_FAST, "--out", str(out_dir))
    assert code == 0, err
    assert "Traceback" not in err and "not written" not in err and "Skipped" not in out
    assert "Note: no LOO for this fit: under a correlation structure (CorAR1)" in out
    assert "leave-one-group-out" in (out_dir / "summary.txt").read_text()
    saved = json.loads((out_dir / "nuts.json").read_text())
    assert "residual_Phi" in saved["posterior"] and saved["residual_structure"]["correlation"]["type"] == "CorAR1"
    assert {"nuts.nc", "ppc.png", "variance.png"} <= {p.name for p in out_dir.iterdir()}


def test_both_with_a_variance_function_compares_and_keeps_loo(capsys, tmp_path):
    from bayeslmm import load

    out_dir = tmp_path / "out"
    code, out, err = run(capsys, str(DATA / "Orthodont.csv"), "distance ~ age + (1 | Subject)",
                         "--variance", "ident(Sex)", "--method", "both", *NUTS_FAST, "--out", str(out_dir))
    assert code == 0, err
    assert "Traceback" not in err
    assert "residual[Male]" in out   # the comparison table has the structure's parameter (Female the reference)
    assert "no LOO" not in out  # a variance function keeps a pointwise log-likelihood
    names = {p.name for p in out_dir.iterdir()}
    assert {"reml.nc", "nuts.nc", "ppc.png", "variance.png", "comparison.csv"} <= names
    table = pd.read_csv(out_dir / "comparison.csv", index_col=0)
    reml = json.loads((out_dir / "reml.json").read_text())
    assert table.loc["residual[Male]", "estimate"] == pytest.approx(reml["residual_params"]["Male"], rel=1e-12)
    assert abs(table.loc["residual[Male]", "diff_sd"]) < 2
    fit = load(out_dir / "nuts.nc")
    assert fit.spec.residual is not None and np.isfinite(fit.loo().elpd)


def test_ml_with_structure_and_out_folder(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, OVARY_CSV, OVARY, "--correlation", "ar1(Mare)", "--method", "ml",
                         "--out", str(out_dir))
    assert code == 0, err
    saved = json.loads((out_dir / "ml.json").read_text())
    assert saved["method"] == "ML" and 0.4 < saved["residual_params"]["Phi"] < 0.7
    assert saved["residual_structure"]["correlation"]["type"] == "CorAR1"
    assert {"summary.txt", "ml.json", "ml.nc"} <= {p.name for p in out_dir.iterdir()}


def test_help_lists_the_forms(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "--variance EXPR" in text and "--correlation EXPR" in text and "--weights COLUMN" in text
    assert "ar1(G, time=T)" in text and "ident(G)" in text
