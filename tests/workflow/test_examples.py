"""Every script in examples/ runs, says what it claims, and the tutorials quote what the scripts print.

The tutorial scripts run with BAYESLMM_QUICK=1 (2 chains × 200 draws) and write their
figures to a temporary folder.  Their REML numbers do not depend on the sampler, so the
lines of the tutorials quoting them are checked against the quick run here; the slow
test runs every script with the tutorials' settings and checks every quoted output
line, NUTS numbers included.
"""

import contextlib
import io
import re
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest

from bayeslmm.bayes.diagnostics import SamplingWarning

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TUTORIALS = ROOT / "docs" / "tutorials"

#: tutorial script -> its page in docs/tutorials
PAGES = {"exam_tutorial.py": "exam.md", "sleepstudy_bayes_vs_reml.py": "sleepstudy.md",
         "doctors_tutorial.py": "doctors.md", "partial_pooling.py": "partial_pooling.md",
         "ovary_tutorial.py": "ovary.md"}

#: tutorial scripts that fit by REML/ML only (no NUTS settings to check)
REML_ONLY = {"ovary_tutorial.py"}

#: output lines the tutorials quote that come from REML fits or the data alone (identical in a quick run)
REML_LINES = {
    "exam_tutorial.py": [
        "4,059 students in 65 schools (2 to 198 students, median 60)",
        "complete pooling (OLS): intercept -0.001191, slope 0.595057 (SE 0.012730), residual sd 0.8054",
        "REML criterion at convergence: 9368.7653",
        "intraclass correlation: 0.142",
        "school sds: intercept 0.3035, slope 0.1223; their correlation 0.494",
        "  x = +2: Var(y) = 0.7790, ICC = 0.289",
        "slope         6  9328.9  9366.7  -4658.4   9316.9  40.372  2  1.7111e-09",
        "school 48 (2 students): own line -3.272 + -6.901·x, mixed model -0.053 + 0.550·x (shrinkage of the slope "
        "0.999)",
    ],
    "sleepstudy_bayes_vs_reml.py": [
        "REML criterion at convergence: 1743.6283",
        "Days          10.4673      1.5458  17.00   6.7715  3.26e-06",
    ],
    "doctors_tutorial.py": [
        "407 doctors, 8,525 patients, 2 to 40 per doctor (mean 20.9)",
        "REML criterion at convergence: 55790.4488",
        "wbc           -0.3108      0.0372  8238.69  -8.3484   < 2e-16",
    ],
    "partial_pooling.py": [
        "48       2      32.811      31.256      32.202       0.623",
        "complete pooling: the mean of all 8,525 patients, 32.811; population β0 = 32.776, the doctors' means "
        "weighted by 1 / (σ²_u + σ²/n_j) (by hand: 32.776)",
        "  n = 40: shrinkage 0.076",
        "308      10      251.41  10.47      244.19  21.76      253.66  19.67        1.31  0.19",
        "  the line stays near the subject's data at their mean day 4.5: own line there 342.1, mixed model 342.2",
    ],
    "ovary_tutorial.py": [
        "308 days of 11 mares (25 to 31 per mare)",
        "REML criterion at convergence: 1626.0817",
        "REML criterion at convergence: 1549.4479",
        "  Phi 0.572187",
        "REML log-likelihood: sigma^2 I -813.0409, AR(1) -774.7240",
        "m2        7  1563.4  1589.6  -774.72   1549.4  76.634  1  2.0579e-18",
        "1      0.3795 -0.1210  0.5722    297",
        "lags outside ±1.96/sqrt(pairs): sigma^2 I [1, 2], AR(1) [1]",
    ],
}

FIGURES = {
    "exam_tutorial.py": {"exam_variance_function.png", "exam_shrinkage.png", "exam_variance_components.png"},
    "sleepstudy_bayes_vs_reml.py": {"sleepstudy_variance_components.png", "sleepstudy_caterpillar.png",
                                    "sleepstudy_predictions.png", "sleepstudy_ppc.png"},
    "doctors_tutorial.py": {"doctors_caterpillar.png", "doctors_variance_components.png"},
    "partial_pooling.py": {"pooling_doctors_by_n.png", "pooling_shrinkage_factor.png", "pooling_sleepstudy_2d.png",
                           "pooling_sleepstudy_nuts.png"},
    "ovary_tutorial.py": {"ovary_acf.png"},
}


def run(name, *args):
    return runpy.run_path(str(EXAMPLES / name))["main"](*args)


def run_capturing(name, folder):
    """main(folder) of an example, with its stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run(name, folder)
    return result, buf.getvalue()


def quoted_output(page: Path) -> list[str]:
    """Every line of the page's ```text blocks (the script's output the page quotes)."""
    blocks = re.findall(r"^```text\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    return [line.rstrip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Each tutorial script run once with short chains: {name: (result, stdout, figure folder)}."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BAYESLMM_QUICK", "1")
    mp.delenv("BAYESLMM_FIGURES", raising=False)
    out = {}
    try:
        for name in PAGES:
            folder = tmp_path_factory.mktemp(name.removesuffix(".py"))
            with warnings.catch_warnings():  # 2 × 200 draws: low-ESS warnings are expected here
                warnings.simplefilter("ignore", SamplingWarning)
                result, text = run_capturing(name, folder)
            out[name] = (result, text, folder)
    finally:
        mp.undo()
    return out


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}  # _tutorial.py: shared helpers
    assert scripts == {"exam_reml.py", "doctors_reml.py", *PAGES}
    assert {p.name for p in TUTORIALS.glob("*.md")} == set(PAGES.values())


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


@pytest.mark.parametrize("name", list(PAGES))
def test_tutorial_script_writes_its_figures(quick, name):
    from matplotlib.image import imread

    result, text, folder = quick[name]
    assert {p.name for p in folder.iterdir()} == FIGURES[name]
    for fig in FIGURES[name]:
        img = imread(folder / fig)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05, fig
    assert f"figures written to {folder}" in text


@pytest.mark.parametrize("name", list(PAGES))
def test_tutorial_quotes_the_scripts_reml_output(quick, name):
    _, text, _ = quick[name]
    printed = {line.rstrip() for line in text.splitlines()}
    quoted = set(quoted_output(TUTORIALS / PAGES[name]))
    for line in REML_LINES[name]:
        assert line in printed, f"{name} no longer prints {line!r}"
        assert line in quoted, f"{PAGES[name]} does not quote {line!r}"


def test_exam_tutorial_numbers(quick):
    out, _, _ = quick["exam_tutorial.py"]
    # complete pooling is the seed's lm(normexam ~ standLRT)
    np.testing.assert_allclose(out["ols"], [-0.001191, 0.595057], atol=5e-7)
    assert out["ols_se"][1] == pytest.approx(0.012730, abs=5e-7)
    assert out["ols_sigma"] == pytest.approx(0.8054, abs=5e-5)
    # lme4: VarCorr of the intercept model 0.09384 / 0.5659, the slope model's correlation 0.494
    assert out["icc"] == pytest.approx(0.09384 / (0.09384 + 0.5659), abs=2e-4)
    assert out["corr"] == pytest.approx(0.494, abs=1e-3)
    assert out["lr"] == pytest.approx(40.372, abs=1e-3)
    assert out["icc_at"][-2.0] < out["icc_at"][0.0] < out["icc_at"][2.0]  # positive slope-intercept covariance
    table = out["compare"]
    np.testing.assert_allclose(table["estimate"], [out["slope"].fixef.iloc[0], out["slope"].fixef.iloc[1],
                                                   *out["slope"].varcorr["sdcor"]], rtol=1e-12)
    assert abs(table.loc["sd[school|standLRT]", "post_mean"] - 0.1223) < 0.03
    assert table.loc["corr[school|(Intercept),standLRT]", "post_mean"] > 0.2
    school48 = out["pooling"].loc["48"]
    assert school48[("n", "")] == 2 and school48[("shrinkage", "standLRT")] > 0.99


def test_sleepstudy_tutorial_numbers(quick):
    out, _, _ = quick["sleepstudy_bayes_vs_reml.py"]
    pred = out["predictions"]
    assert pred.loc[0, "REML 308"] == pytest.approx(253.6637, abs=1e-3)  # lme4's coef(fm)$Subject["308", 1]
    assert pred.loc[9, "REML 308"] == pytest.approx(253.6637 + 9 * 19.6663, abs=1e-2)
    assert np.all(np.abs(pred["NUTS 308"] - pred["REML 308"]) < 5)
    mean_width = pred["308 mean upper"] - pred["308 mean lower"]
    obs_width = pred["308 new obs upper"] - pred["308 new obs lower"]
    new_width = pred["new subject upper"] - pred["new subject lower"]
    assert np.all(obs_width > mean_width) and new_width.iloc[-1] > obs_width.iloc[-1]
    pop = out["population"]
    assert np.all(pop["upper"] - pop["lower"] < new_width.to_numpy())
    assert out["r2"].loc["marginal", "REML"] < out["r2"].loc["conditional", "REML"]
    assert np.isfinite(float(out["loo"].elpd))
    assert out["reloaded_same"]


def test_doctors_tutorial_numbers(quick):
    out, _, _ = quick["doctors_tutorial.py"]
    truth = out["against_truth"]
    covered = (truth["REML lower"] <= truth["truth"]) & (truth["truth"] <= truth["REML upper"])
    assert covered.all()
    assert np.all(np.abs(truth["posterior mean"] - truth["REML"]) < 0.5 * out["compare"]["post_sd"])
    assert out["icc"]["truth"] == pytest.approx(16 / 52)
    pred = out["predictions"]
    assert list(pred["doctor"]) == ["1", "new"]
    assert pred["new patient upper"].iloc[1] - pred["new patient lower"].iloc[1] > \
        pred["mean upper"].iloc[1] - pred["mean lower"].iloc[1]


def test_partial_pooling_tutorial_numbers(quick):
    out, _, _ = quick["partial_pooling.py"]
    assert out["closed_form_gap"] < 1e-8
    table = out["doctors"]
    n = table[("n", "")]
    shrink = table[("shrinkage", "(Intercept)")]
    assert np.all(np.diff(shrink.to_numpy()[np.argsort(n.to_numpy(), kind="stable")]) <= 1e-12)  # fewer, further
    both = out["reml_vs_nuts"]
    assert np.max(np.abs(both["NUTS Days"] - both["REML Days"])) < 1.0


def test_ovary_tutorial_numbers(quick):
    """nlme 3.1-162 (R, on the same data): logLik −813.0409 and −774.7240 (Pinheiro & Bates 2000: −813, −775),
    L.Ratio 76.63382, Phi 0.5721866, and ACF(fit, maxLag = 10, resType = "normalized").

    The AR(1) fit's ACF is nlme's on the rows sorted by Mare's level order: on Ovary as shipped
    (rows by mare 1..11, levels 4, 2, 11, ...) nlme's normalised residuals carry each mare's
    first row over from the mare before it, 16 rows in all (lag 1 −0.1003 there).  Reached:
    ACF within 2.3e-7, Phi within 4.5e-7, LR within 1e-6.
    """
    out, _, _ = quick["ovary_tutorial.py"]
    assert out["base"].loglik == pytest.approx(-813.040868529423, abs=1e-5)
    assert out["ar1"].loglik == pytest.approx(-774.723958148737, abs=1e-5)
    assert out["anova"].to_frame()["Chisq"].iloc[1] == pytest.approx(76.63382, abs=1e-4)
    assert out["phi"] == pytest.approx(0.5721866, abs=1e-5)
    before = [1.0, 0.3794801284, 0.1797220250, 0.0356927489, 0.0597788805, 0.0020969526, 0.0643271009,
              0.0716348615, 0.0485782475, 0.0277824878, -0.0342759792]
    after = [1.0, -0.1209774458, 0.0312972709, -0.0527981412, 0.0825915180, -0.0178057731, 0.0623084356,
             0.0386035206, 0.0174506555, 0.0383259600, -0.0157584772]
    np.testing.assert_allclose(out["acf"]["sigma2 I"], before, atol=1e-5)
    np.testing.assert_allclose(out["acf"]["AR(1)"], after, atol=1e-5)
    assert out["acf"]["pairs"].tolist() == [308 - 11 * k for k in range(11)]  # every mare has > 10 days


@pytest.mark.parametrize("name", list(PAGES))
def test_scripts_settings_and_figure_folder(name, tmp_path, monkeypatch):
    """BAYESLMM_QUICK picks the short chains; the folder is the argument, else BAYESLMM_FIGURES, else a new temp dir."""
    ns = runpy.run_path(str(EXAMPLES / name))
    monkeypatch.delenv("BAYESLMM_QUICK", raising=False)
    monkeypatch.delenv("BAYESLMM_FIGURES", raising=False)
    if name not in REML_ONLY:
        assert ns["settings"]() == {"draws": 1000, "tune": 1000, "chains": 4}
        monkeypatch.setenv("BAYESLMM_QUICK", "1")
        assert ns["settings"]() == {"draws": 200, "tune": 200, "chains": 2}
    fresh = ns["figure_dir"]()
    assert fresh.is_dir() and not any(fresh.iterdir())
    fresh.rmdir()
    monkeypatch.setenv("BAYESLMM_FIGURES", str(tmp_path / "env"))
    assert ns["figure_dir"]() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert ns["figure_dir"](tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAGES))
def test_tutorials_quote_the_full_runs(name, tmp_path, monkeypatch):
    """With the tutorials' settings (4 chains × 1000 draws, fixed seeds) every quoted output line is printed."""
    monkeypatch.delenv("BAYESLMM_QUICK", raising=False)
    _, text = run_capturing(name, tmp_path)
    printed = {line.rstrip() for line in text.splitlines()}
    missing = [line for line in quoted_output(TUTORIALS / PAGES[name]) if line not in printed]
    assert not missing, f"{PAGES[name]} quotes lines the script no longer prints: {missing}"
