"""Every script in examples/ runs, and says what it claims."""

import runpy
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name):
    return runpy.run_path(str(EXAMPLES / name))["main"]()


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"exam_reml.py", "doctors_reml.py"}


def test_exam_example(capsys):
    out = run("exam_reml.py")
    assert 0.1 < out["icc"] < 0.2  # school variance 0.094 vs residual 0.566
    assert 0.4 < out["corr"] < 0.6
    assert out["lr"] > 30
    assert "intraclass correlation" in capsys.readouterr().out


def test_doctors_example_recovers_truth(capsys):
    out = run("doctors_reml.py")
    fit, truth = out["fit"], out["truth"]
    for name, value in truth["beta"].items():
        est, se = fit.fixef[name], fit.fixef_se[name]
        assert abs(est - value) < 4 * se, name
    sd = fit.varcorr.loc[fit.varcorr.grp == "doctor", "sdcor"].item()
    assert abs(sd - truth["sd_intercept"]) < 0.15 * truth["sd_intercept"]
    assert np.isclose(fit.sigma, truth["sigma"], rtol=0.03)
