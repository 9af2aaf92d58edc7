"""The command line's fixed-effect tests: lmerTest's df and p columns, --json's fixef_table, --anova.

Numbers from lmerTest 3.1-3 (tests/data/lmertest_reference.json) on the bundled ham,
carrots and sleepstudy.  Reached on ham: df 2.5e-7 relative, F 6e-8, p 1.0e-6 (the
tolerances: 1e-4, and 1e-3 for p, lmerTest's own df being numerical); on sleepstudy
1.4e-6 (1e-4).  carrots is fitted here at our optimum, 1.1e-6 below lme4's, so its F and
DenDF are 1.4e-4 and 1.8e-4 from lmerTest's (tolerance 1e-3).
"""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from bayeslmm.cli import format_anova, main, output_names

REF = json.loads((Path(__file__).resolve().parents[1] / "data" / "lmertest_reference.json").read_text())["models"]
HAM = REF["ham_product"]
HAM_F = "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)"
CARROTS = REF["carrots_sens2"]
CARROTS_F = "Preference ~ sens2*Homesize + (1 + sens2 | Consumer)"
SLEEP_F = "Reaction ~ Days + (Days | Subject)"


def _our_name(r_name: str) -> str:
    """R's ``Product2:Information2`` as formulae writes it: ``Product[2]:Information[2]``."""
    return ":".join(re.sub(r"^(Product|Information|Homesize)(\d+)$", r"\1[\2]", p) for p in r_name.split(":"))


@pytest.fixture(scope="module")
def ham_run(tmp_path_factory):
    """One REML fit of ham with --anova 3, --json and --out (the fit takes about a second)."""
    folder = tmp_path_factory.mktemp("ham")
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["fit", "ham", HAM_F, "--anova", "3", "--json", str(folder / "fit.json"),
                     "--out", str(folder / "out")])
    return code, out.getvalue(), err.getvalue(), folder


def test_summary_prints_lmertest_df_and_p_columns(ham_run):
    code, out, err, _ = ham_run
    assert code == 0 and "Traceback" not in err
    header = next(line for line in out.splitlines() if line.strip().startswith("Estimate"))
    assert header.split() == ["Estimate", "Std.", "Error", "df", "t", "value", "Pr(>|t|)"]
    row = next(line for line in out.splitlines() if line.startswith("Product[2] "))
    # lmerTest: Product2  -0.8272  0.3453  339.51  -2.395  0.0171
    assert row.split() == ["Product[2]", "-0.8272", "0.3453", "339.51", "-2.3953", "0.0171"]


def test_json_fixef_table_is_lmertests(ham_run):
    _, _, _, folder = ham_run
    result = json.loads((folder / "fit.json").read_text())
    table = result["fixef_table"]
    assert result["fixef_table_attrs"] == {"ddf": "satterthwaite", "ci_prob": 0.95}
    assert list(table) == [_our_name(n) for n in HAM["coef_satterthwaite"]]
    for r_name, ref in HAM["coef_satterthwaite"].items():
        row = table[_our_name(r_name)]
        assert set(row) == {"estimate", "std_error", "lower", "upper", "t_value", "df", "p_value"}
        assert row["estimate"] == pytest.approx(ref["Estimate"], rel=1e-6)
        assert row["std_error"] == pytest.approx(ref["Std. Error"], rel=1e-5)
        assert row["df"] == pytest.approx(ref["df"], rel=1e-4)
        assert row["t_value"] == pytest.approx(ref["t value"], rel=1e-5)
        assert row["p_value"] == pytest.approx(ref["Pr(>|t|)"], rel=1e-3)
        assert row["lower"] < row["estimate"] < row["upper"]
    assert result["fixef"] == pytest.approx({k: v["estimate"] for k, v in table.items()})  # the old keys stay


def test_anova_is_printed_as_lmertest_prints_it(ham_run):
    _, out, _, _ = ham_run
    lines = out.splitlines()
    start = lines.index("Type III Analysis of Variance Table with Satterthwaite's method")
    assert lines[start + 1].split() == ["Sum", "Sq", "Mean", "Sq", "NumDF", "DenDF", "F", "value", "Pr(>F)"]
    # lmerTest: Product  19.155  6.3850  3  240.00  3.8291  0.01048
    assert lines[start + 2].split() == ["Product", "19.155", "6.385", "3", "240.00", "3.8291", "0.0105"]
    assert lines[start + 3].split()[0] == "Information" and lines[start + 4].split()[0] == "Product:Information"


def test_anova_in_json_and_out_folder(ham_run):
    _, out, _, folder = ham_run
    result = json.loads((folder / "fit.json").read_text())
    assert result["anova_attrs"] == {"type": 3, "ddf": "satterthwaite"}
    assert list(result["anova"]) == list(HAM["anova_type3_satterthwaite"])
    for term, ref in HAM["anova_type3_satterthwaite"].items():
        row = result["anova"][term]
        assert row["num_df"] == ref["NumDF"] and isinstance(row["num_df"], int)
        assert row["den_df"] == pytest.approx(ref["DenDF"], rel=1e-4)
        assert row["f_value"] == pytest.approx(ref["F value"], rel=1e-4)
        assert row["sum_sq"] == pytest.approx(ref["Sum Sq"], rel=1e-4)
        assert row["p_value"] == pytest.approx(ref["Pr(>F)"], rel=1e-3)
    csv = pd.read_csv(folder / "out" / "anova.csv", index_col="term")
    assert csv.loc["Product", "f_value"] == pytest.approx(result["anova"]["Product"]["f_value"], rel=1e-12)
    assert json.loads((folder / "out" / "reml.json").read_text())["anova"] == result["anova"]
    summary = (folder / "out" / "summary.txt").read_text()
    assert "Type III Analysis of Variance Table" in summary
    assert "anova.csv" in out.splitlines()[-1]  # "Wrote N files to ...: ..., anova.csv, ..."


def test_type_two_on_carrots_with_missing_rows_dropped(tmp_path, capsys):
    """Type II differs from type III for sens2 (54.83 against 55.82): the option reaches the test."""
    path = tmp_path / "fit.json"
    code = main(["fit", "carrots", CARROTS_F, "--missing", "drop", "--anova", "2", "--json", str(path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Type II Analysis of Variance Table with Satterthwaite's method" in captured.out
    result = json.loads(path.read_text())
    assert result["nobs"] == 1233  # the 3 rows without Preference dropped, as lmerTest does
    assert result["anova_attrs"]["type"] == 2
    for term, ref in CARROTS["anova_type2_satterthwaite"].items():
        # compared at our optimum (1.1e-6 below lme4's): F within 1e-3 of lmerTest's
        assert result["anova"][term]["f_value"] == pytest.approx(ref["F value"], rel=1e-3)
        assert result["anova"][term]["den_df"] == pytest.approx(ref["DenDF"], rel=1e-3)
    assert result["anova"]["sens2"]["f_value"] == pytest.approx(54.834, rel=1e-4)


def test_without_anova_nothing_is_added(tmp_path, capsys):
    path = tmp_path / "fit.json"
    assert main(["fit", "sleepstudy", SLEEP_F, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Analysis of Variance" not in out
    result = json.loads(path.read_text())
    assert "anova" not in result and "fixef_table" in result
    assert result["fixef_table"]["Days"]["df"] == pytest.approx(16.9999837255917, rel=1e-4)  # lmerTest


def test_ml_fit_gets_the_tests_too(tmp_path, capsys):
    path = tmp_path / "fit.json"
    assert main(["fit", "sleepstudy", SLEEP_F, "--method", "ml", "--anova", "3", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["method"] == "ML" and result["anova"]["Days"]["num_df"] == 1
    # one coefficient: the F test of Days is the square of its t test
    days = result["fixef_table"]["Days"]
    assert result["anova"]["Days"]["f_value"] == pytest.approx(days["t_value"] ** 2, rel=1e-10)
    assert result["anova"]["Days"]["den_df"] == pytest.approx(days["df"], rel=1e-10)


def test_anova_with_nuts_only_is_refused_before_fitting(capsys, monkeypatch):
    import bayeslmm.model

    monkeypatch.setattr(bayeslmm.model.Model, "fit", lambda *a, **k: pytest.fail("fitted before checking"))
    code = main(["fit", "sleepstudy", SLEEP_F, "--method", "nuts", "--anova", "3"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("bayeslmm: error: --anova tests the fixed effects of a REML or ML fit")
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("bad", ["4", "III", "1"])
def test_anova_type_must_be_3_or_2(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "sleepstudy", SLEEP_F, "--anova", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--anova" in err and "Traceback" not in err


def test_anova_that_cannot_be_made_is_warned_about_and_skipped(tmp_path, capsys):
    """A model read out of memory has no rows for the terms' hypotheses: warned, listed, exit 0."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("dask")
    from bayeslmm.datasets import load_dataset

    d = load_dataset("sleepstudy")
    d.iloc[:90].to_parquet(tmp_path / "p0.parquet")
    d.iloc[90:].to_parquet(tmp_path / "p1.parquet")
    folder = tmp_path / "ooc"
    code = main(["fit", str(tmp_path / "*.parquet"), SLEEP_F, "--anova", "3", "--out", str(folder)])
    captured = capsys.readouterr()
    assert code == 0
    assert "bayeslmm: warning: the F tests per term (--anova) were not made" in captured.err
    assert "anova.csv" in captured.out.splitlines()[-1]  # "Skipped (...): anova.csv, ..."
    assert not (folder / "anova.csv").exists() and (folder / "reml.json").exists()


def test_both_keeps_the_tests_on_the_reml_fit(tmp_path, capsys):
    path = tmp_path / "both.json"
    code = main(["fit", "sleepstudy", SLEEP_F, "--method", "both", "--anova", "3", "--draws", "200", "--tune",
                 "200", "--chains", "2", "--random-seed", "1", "--intervals", "wald", "--json", str(path)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(path.read_text())
    assert "anova" in result["reml"] and "fixef_table" in result["reml"]
    assert "anova" not in result["nuts"] and "fixef_table" not in result["nuts"]
    assert result["reml"]["anova"]["Days"]["f_value"] == pytest.approx(45.8529615558586, rel=1e-4)  # lmerTest


def test_output_names_and_format_anova():
    assert "anova.csv" in output_names(["reml"], ["g"], False, anova=True)
    assert "anova.csv" not in output_names(["reml"], ["g"], False)
    assert "anova.csv" not in output_names(["nuts"], ["g"], False, anova=True)
    table = pd.DataFrame({"sum_sq": [1.0], "mean_sq": [1.0], "num_df": [1], "den_df": [float("inf")],
                          "f_value": [4.0], "p_value": [0.0455]}, index=["x"])
    table.attrs.update(type=2, ddf="none")
    text = format_anova(table)
    assert text.splitlines()[0] == "Type II Analysis of Variance Table with Wald tests (no denominator df)"
    assert text.splitlines()[2].split() == ["x", "1", "1", "1", "Inf", "4.0000", "0.0455"]
