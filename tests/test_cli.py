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
