"""The command line: bundled names, CSV and Parquet paths, JSON output, clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bayeslmm.cli import main
from bayeslmm.datasets import load_dataset


def test_fit_bundled_dataset_prints_summary(capsys):
    assert main(["fit", "sleepstudy", "Reaction ~ Days + (Days | Subject)", "--method", "reml"]) == 0
    out = capsys.readouterr().out
    assert "REML criterion at convergence: 1743.6283" in out
    assert "Subject" in out and "Days" in out


def test_fit_csv_writes_json(tmp_path, capsys):
    path = tmp_path / "dye.csv"
    load_dataset("Dyestuff").to_csv(path, index=False)
    out_json = tmp_path / "fit.json"
    assert main(["fit", str(path), "Yield ~ 1 + (1 | Batch)", "--method", "ml", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["method"] == "ML"
    assert np.isclose(result["objective"], 327.327059881135, rtol=1e-6)  # lme4's deviance
    assert "dye.csv" in capsys.readouterr().out


def test_fit_parquet(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    path = tmp_path / "exam.parquet"
    load_dataset("exam").to_parquet(path)
    assert main(["fit", str(path), "normexam ~ standLRT + (1 | school)", "--json", "-"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert np.isclose(result["objective"], 9368.76528732895, rtol=1e-6)


def test_errors_are_messages_not_tracebacks(capsys):
    assert main(["fit", "no_such_data", "y ~ x + (1 | g)"]) == 2
    err = capsys.readouterr().err
    assert "no_such_data" in err and "sleepstudy" in err and "Traceback" not in err
    assert main(["fit", "sleepstudy", "Reaction ~ Dayz + (1 | Subject)"]) == 2
    err = capsys.readouterr().err
    assert "'Dayz'" in err and "Did you mean 'Days'?" in err


def test_invalid_method_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "sleepstudy", "Reaction ~ Days + (1 | Subject)", "--method", "bayes!"])
    assert exc.value.code == 2
    assert "--method" in capsys.readouterr().err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "bayeslmm", "datasets"], capture_output=True, text=True, check=True)
    assert "InstEval" in out.stdout


def test_fit_nuts_from_the_command_line(tmp_path, capsys):
    out_json = tmp_path / "nuts.json"
    code = main(["fit", "Dyestuff", "Yield ~ 1 + (1 | Batch)", "--method", "nuts", "--draws", "300", "--tune", "300",
                 "--chains", "2", "--seed", "1", "--json", str(out_json)])
    assert code == 0
    assert "Linear mixed model fit by NUTS" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["method"] == "NUTS" and result["seed"] == 1 and result["draws"] == 300
    assert 1450 < result["posterior"]["beta[(Intercept)]"]["mean"] < 1600  # lme4: 1527.5


# --------------------------------------------------------------------------------------
# --method both, --out, --ci-prob: the whole workflow from the command line
# --------------------------------------------------------------------------------------

SLEEP_F = "Reaction ~ Days + (Days | Subject)"
BOTH_FILES = {"summary.txt", "reml.json", "reml.nc", "nuts.json", "nuts.nc", "comparison.csv", "pooling_Subject.csv",
              "shrinkage_Subject.png", "caterpillar_Subject_reml.png", "caterpillar_Subject_nuts.png",
              "variance.png", "ppc.png"}


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
    """One `--method both --out DIR --json PATH --ci-prob 0.9` run on sleepstudy, shared by the tests below."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("cli") / "results"  # not there yet: --out creates it
    json_path = folder.parent / "both.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["fit", "sleepstudy", SLEEP_F, "--method", "both", "--draws", "300", "--tune", "300",
                     "--chains", "2", "--seed", "11", "--ci-prob", "0.9", "--out", str(folder),
                     "--json", str(json_path)])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "dir": folder, "json": json_path}


def test_both_prints_reml_then_nuts_then_the_comparison(both_run):
    assert both_run["code"] == 0
    out = both_run["out"]
    reml_at = out.index("REML criterion at convergence: 1743.6283")
    nuts_at = out.index("Linear mixed model fit by NUTS")
    table_at = out.index("Posterior (NUTS, 2 chains × 300 draws) beside REML")
    assert reml_at < nuts_at < table_at
    assert "90 % equal-tailed interval" in out[nuts_at:table_at]  # --ci-prob reaches the posterior summary
    assert "Intervals at 90%" in out[table_at:]
    assert f"Wrote {len(BOTH_FILES)} files to {both_run['dir']}" in out
    assert "Traceback" not in both_run["err"]


def test_out_folder_holds_every_result(both_run):
    folder = both_run["dir"]
    assert {p.name for p in folder.iterdir()} == BOTH_FILES
    printed = both_run["out"]
    summary = (folder / "summary.txt").read_text()
    assert summary.strip() and printed.startswith(summary.rstrip("\n"))  # the file is what was printed
    reml = json.loads((folder / "reml.json").read_text())
    assert reml["method"] == "REML" and np.isclose(reml["objective"], 1743.628273, rtol=1e-7)  # lme4's REMLcrit
    nuts = json.loads((folder / "nuts.json").read_text())
    assert nuts["method"] == "NUTS" and nuts["seed"] == 11 and nuts["chains"] == 2 and nuts["draws"] == 300
    assert nuts["interval"] == "eti90"


def test_comparison_csv_against_lme4_and_the_draws(both_run):
    import pandas as pd

    from bayeslmm import load

    table = pd.read_csv(both_run["dir"] / "comparison.csv", index_col="parameter")
    assert list(table.index) == ["beta[(Intercept)]", "beta[Days]", "sd[Subject|(Intercept)]", "sd[Subject|Days]",
                                 "corr[Subject|(Intercept),Days]", "sigma"]
    # the REML column is lme4's fit (lme4 1.1-31: fixef, sds, correlation, sigma)
    np.testing.assert_allclose(table["estimate"], [251.405105, 10.467286, 24.740448, 5.922138, 0.065551, 25.591796],
                               rtol=1e-4)
    np.testing.assert_allclose(table.loc["beta[Days]", "se"], 1.545790, rtol=1e-4)
    assert table.loc["sigma", ["se"]].isna().all()  # no Wald SE for variance parameters
    assert (table["lower"] < table["estimate"]).all() and (table["estimate"] < table["upper"]).all()
    # Wald interval at 90 %: estimate ± 1.6449 SE
    np.testing.assert_allclose(table.loc["beta[Days]", "upper"] - table.loc["beta[Days]", "estimate"],
                               1.6448536 * 1.545790, rtol=1e-4)
    # posterior columns are the saved draws' mean and 5 % / 95 % quantiles
    fit = load(both_run["dir"] / "nuts.nc")
    days = fit.posterior["beta"].sel(coef="Days").to_numpy().ravel()
    np.testing.assert_allclose(table.loc["beta[Days]", ["post_mean", "post_lower", "post_upper"]],
                               [days.mean(), *np.quantile(days, [0.05, 0.95])], rtol=1e-6)
    sigma = fit.posterior["sigma"].to_numpy().ravel()
    assert np.isclose(table.loc["sigma", "post_mean"], sigma.mean(), rtol=1e-9)
    assert 22 < table.loc["sigma", "post_mean"] < 30 and 7 < table.loc["beta[Days]", "post_mean"] < 14
    np.testing.assert_allclose(table["diff_sd"], (table["post_mean"] - table["estimate"]) / table["post_sd"])


def test_json_of_both_fits_and_the_comparison(both_run):
    import pandas as pd

    result = json.loads(both_run["json"].read_text())  # strict JSON: NaN written as null
    assert set(result) == {"reml", "nuts", "comparison", "comparison_ci_prob"}
    assert result["comparison_ci_prob"] == 0.9
    assert result["reml"] == json.loads((both_run["dir"] / "reml.json").read_text())
    table = pd.read_csv(both_run["dir"] / "comparison.csv", index_col="parameter")
    for name, row in result["comparison"].items():
        for col in ("post_mean", "estimate", "upper"):
            assert np.isclose(row[col], table.loc[name, col], rtol=1e-12)
    assert result["comparison"]["sigma"]["se"] is None
    # the NUTS fit's JSON has its intervals at --ci-prob too, equal to the comparison's posterior ones
    assert result["nuts"]["interval"] == "eti90"
    days = result["nuts"]["posterior"]["beta[Days]"]
    assert np.isclose(days["lower"], table.loc["beta[Days]", "post_lower"], rtol=1e-12)
    assert np.isclose(days["upper"], table.loc["beta[Days]", "post_upper"], rtol=1e-12)


def test_saved_fits_reload_to_the_printed_numbers(both_run):
    from bayeslmm import load

    reml = load(both_run["dir"] / "reml.nc")
    assert np.isclose(reml.objective, 1743.628273, rtol=1e-7)
    nuts = load(both_run["dir"] / "nuts.nc")
    record = json.loads((both_run["dir"] / "nuts.json").read_text())
    beta = nuts.posterior["beta"].mean(("chain", "draw"))
    assert np.isclose(float(beta.sel(coef="Days")), record["posterior"]["beta[Days]"]["mean"], rtol=1e-12)


def test_pooling_table_csv(both_run):
    import pandas as pd

    t = pd.read_csv(both_run["dir"] / "pooling_Subject.csv", index_col="Subject")
    assert len(t) == 18 and (t["n"] == 10).all()
    assert t.loc[308, "partial[(Intercept)]"] == pytest.approx(253.6637, abs=1e-3)  # lme4's coef(fm)$Subject
    assert t.loc[308, "partial[Days]"] == pytest.approx(19.6663, abs=1e-3)
    # no pooling is each subject's own OLS line
    d = load_dataset("sleepstudy")
    s = d[d.Subject.astype(str) == "308"]
    slope, intercept = np.polyfit(s.Days, s.Reaction, 1)
    assert t.loc[308, "no_pooling[Days]"] == pytest.approx(slope, rel=1e-9)
    assert t.loc[308, "no_pooling[(Intercept)]"] == pytest.approx(intercept, rel=1e-9)


def test_plots_are_png_images_of_the_expected_layout(both_run):
    from matplotlib.image import imread

    folder = both_run["dir"]
    for name in BOTH_FILES:
        if name.endswith(".png"):
            assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # variance overlay: 4 parameters in 3 columns of 3.8 × 2.9 in panels at 100 dpi
    h, w = imread(folder / "variance.png").shape[:2]
    assert (w, h) == (1140, 580)
    # caterpillar: one panel per random-effect column (2 × 4 in wide)
    assert imread(folder / "caterpillar_Subject_reml.png").shape[1] == 800
    img = imread(folder / "ppc.png")
    assert img.shape[:2] == (420, 650) and img[..., :3].std() > 0.05  # not blank


def test_reml_only_out_writes_no_bayesian_files(tmp_path, capsys):
    folder = tmp_path / "reml"
    assert main(["fit", "Dyestuff", "Yield ~ 1 + (1 | Batch)", "--out", str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == {"summary.txt", "reml.json", "reml.nc", "pooling_Batch.csv",
                                                  "shrinkage_Batch.png", "caterpillar_Batch_reml.png"}
    assert "Wrote 6 files" in capsys.readouterr().out
    assert json.loads((folder / "reml.json").read_text())["objective"] == pytest.approx(319.65427684, rel=1e-7)


def test_ml_out_names_files_ml(tmp_path, capsys):
    folder = tmp_path / "ml"
    assert main(["fit", "Dyestuff", "Yield ~ 1 + (1 | Batch)", "--method", "ml", "--out", str(folder)]) == 0
    assert {"ml.json", "ml.nc"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "ml.json").read_text())["objective"] == pytest.approx(327.327059881135, rel=1e-7)


def test_nuts_only_out_draws_from_the_posterior(tmp_path, capsys):
    folder = tmp_path / "nuts"
    assert main(["fit", "Dyestuff", "Yield ~ 1 + (1 | Batch)", "--method", "nuts", "--draws", "200", "--tune", "200",
                 "--chains", "2", "--seed", "3", "--out", str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == {"summary.txt", "nuts.json", "nuts.nc", "pooling_Batch.csv",
                                                  "shrinkage_Batch.png", "caterpillar_Batch_nuts.png",
                                                  "variance.png", "ppc.png"}
    import pandas as pd

    from bayeslmm import load

    table = pd.read_csv(folder / "pooling_Batch.csv", index_col="Batch")
    fit = load(folder / "nuts.nc")
    beta = float(fit.posterior["beta"].mean())
    effects = fit.posterior["Batch"].mean(("chain", "draw")).to_numpy().ravel()
    np.testing.assert_allclose(table["partial[(Intercept)]"], beta + effects, rtol=1e-10)  # posterior means


@pytest.mark.parametrize("args, message", [
    (["--ci-prob", "1.5"], "--ci-prob must be a probability strictly between 0 and 1, got 1.5"),
    (["--ci-prob", "0"], "--ci-prob must be a probability strictly between 0 and 1, got 0.0"),
    (["--ci-prob", "nan"], "--ci-prob must be a probability strictly between 0 and 1, got nan"),
    (["--out", "FILE"], "is a file, not a folder; give a folder for the results"),
])
def test_bad_options_fail_before_fitting(args, message, tmp_path, capsys, monkeypatch):
    import bayeslmm.model

    monkeypatch.setattr(bayeslmm.model.Model, "fit", lambda *a, **k: pytest.fail("fitted before checking"))
    existing_file = tmp_path / "results.txt"
    existing_file.write_text("not a folder")
    args = [str(existing_file) if a == "FILE" else a for a in args]
    code = main(["fit", "sleepstudy", SLEEP_F, "--method", "both", *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("bayeslmm: error: ") and message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_outputs_a_model_cannot_give_are_warned_about_and_listed(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    pytest.importorskip("dask")
    d = load_dataset("sleepstudy")
    d.iloc[:90].to_parquet(tmp_path / "p0.parquet")
    d.iloc[90:].to_parquet(tmp_path / "p1.parquet")
    folder = tmp_path / "ooc"
    assert main(["fit", str(tmp_path / "*.parquet"), SLEEP_F, "--out", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "bayeslmm: warning: --out: reml.nc not written: this fit cannot be saved" in captured.err
    assert "Skipped (see the warnings on stderr): reml.nc" in captured.out
    written = {p.name for p in folder.iterdir()}
    assert "reml.nc" not in written and {"summary.txt", "reml.json", "caterpillar_Subject_reml.png"} <= written


# --------------------------------------------------------------------------------------
# make demo and the README's quick start
# --------------------------------------------------------------------------------------

def _readme_demo():
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recipe = re.search(r"^demo:.*\n\t(.+)$", (root / "Makefile").read_text(), flags=re.M).group(1)
    args = shlex.split(recipe)
    readme = (root / "README.md").read_text()
    block = re.search(r"`make demo` is one command line.*?```text\n(.*?)```", readme, flags=re.S).group(1)
    return args, readme, [line.rstrip() for line in block.splitlines() if line.strip()]


def test_readme_shows_the_demo_command():
    args, readme, _ = _readme_demo()
    assert args[0] == "$(VENV)/bin/bayeslmm" and args[1:3] == ["fit", "sleepstudy"]
    assert "--method" in args and args[args.index("--method") + 1] == "both" and "--out" in args
    shown = "bayeslmm " + " ".join(a if " " not in a else f'"{a}"' for a in args[1:])
    assert shown in " ".join(readme.split())  # the README's line, wrapped or not


@pytest.mark.slow
def test_readme_quotes_what_make_demo_prints(tmp_path, capsys):
    args, _, quoted = _readme_demo()
    out_at = args.index("--out")
    args[out_at + 1] = str(tmp_path / "demo-output")
    assert main(args[1:]) == 0
    printed = {line.rstrip() for line in capsys.readouterr().out.replace(str(tmp_path / "demo-output"),
                                                                         "demo-output").splitlines()}
    missing = [line for line in quoted if line not in printed]
    assert not missing, missing
