"""Profile intervals on nlme's Orthodont and BodyWeight against lme4 1.1-31, and compare() beside them.

Both used to stop with scipy's "f(a) and f(b) must have different signs": Orthodont's sds
have profiles that never reach the χ² cutoff before 0 (and its correlation's none before
±1), and on BodyWeight a far warm start left a profile point at a local minimum.  The
reference intervals are R 4.2 / lme4 1.1-31's

    confint(lmer(f, data), method = "profile", oldNames = FALSE)

on the REML fits (lme4 profiles the ML deviance).  lme4 reads its ends off a spline
through a grid of profile points; ours are roots of the profile itself, so they differ by
the spline's error: at most 1.8e-4 relative (Orthodont's σ upper end, where the profile
at lme4's end is 0.0063 above the cutoff); the tests hold 1e-3.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import Model, compare
from bayeslmm.reml.profile import Profiler, profile_intervals

DATA = Path(__file__).resolve().parents[1] / "data"
ORTHODONT = "distance ~ age + Sex + (age | Subject)"
BODYWEIGHT = "weight ~ Time * Diet + (Time | Rat)"


@pytest.fixture(scope="module")
def orthodont():
    return Model(ORTHODONT, pd.read_csv(DATA / "Orthodont.csv"))


@pytest.fixture(scope="module")
def orthodont_reml(orthodont):
    return orthodont.fit(method="reml")


@pytest.fixture(scope="module")
def orthodont_ci(orthodont_reml):
    return profile_intervals(orthodont_reml)


def test_orthodont_matches_lme4(orthodont_ci):
    ci = orthodont_ci
    # lme4: sd_(Intercept) [0, 4.691522916300], cor [-1, 1], sd_age [0, 0.392861461399],
    #       sigma [1.097031940424, 1.602348203546]
    assert ci.loc["sd_(Intercept)|Subject", "lower"] == 0.0
    assert ci.loc["sd_age|Subject", "lower"] == 0.0
    assert tuple(ci.loc["cor_age.(Intercept)|Subject", ["lower", "upper"]]) == (-1.0, 1.0)
    assert ci.loc["sd_(Intercept)|Subject", "upper"] == pytest.approx(4.691522916300, rel=1e-3)  # reached 1e-6
    assert ci.loc["sd_age|Subject", "upper"] == pytest.approx(0.392861461399, rel=1e-3)  # reached 1e-6
    assert ci.loc["sigma", "lower"] == pytest.approx(1.097031940424, rel=1e-3)  # reached 1e-6
    assert ci.loc["sigma", "upper"] == pytest.approx(1.602348203546, rel=1e-3)  # reached 1.8e-4
    # every boundary end is said to be one
    notes = " ".join(ci.attrs["notes"])
    for label in ("sd_(Intercept)|Subject", "sd_age|Subject", "cor_age.(Intercept)|Subject"):
        assert f"{label}: the profile stays below the cutoff up to its boundary" in notes
    assert "sigma" not in notes


def test_orthodont_ends_are_on_the_profile(orthodont_reml, orthodont_ci):
    """Our σ end is on the cutoff; lme4's (its spline's) is past it — why the two differ."""
    prof = Profiler(orthodont_reml)
    sigma = prof.params[-1]
    cutoff = stats.chi2.ppf(0.95, 1)
    assert prof.profile(sigma, orthodont_ci.loc["sigma", "upper"]) == pytest.approx(cutoff, abs=1e-4)
    assert prof.profile(sigma, 1.602348203546) - cutoff == pytest.approx(0.0063, abs=5e-4)
    # at an sd's boundary the profile is still below the cutoff: the interval does end at 0
    assert prof.profile(prof.params[0], 0.0) < cutoff - 0.1


def test_bodyweight_matches_lme4():
    # Diet and Rat are factors, as in nlme
    data = pd.read_csv(DATA / "BodyWeight.csv", dtype={"Rat": str, "Diet": str})
    ci = Model(BODYWEIGHT, data).fit(method="reml").confint(0.95)
    lme4 = pd.DataFrame({"lower": [24.32221864479708, 0.15564104925119, -0.58465341687357, 3.97591275533983],
                         "upper": [49.310888477228, 0.336765162115, 0.358507622007, 5.010725053475]},
                        index=["sd_(Intercept)|Rat", "sd_Time|Rat", "cor_Time.(Intercept)|Rat", "sigma"])
    # reached: 1.0e-4 relative (the correlation's upper end), 5e-6 or less elsewhere
    np.testing.assert_allclose(ci.loc[lme4.index, ["lower", "upper"]], lme4, rtol=1e-3)
    assert ci.attrs["notes"] == []  # every end is a crossing of the cutoff


def test_crossed_penicillin_matches_lme4():
    # two crossed factors: the second block's sd is profiled through the dense part
    ci = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin").fit(method="reml").confint()
    lme4 = pd.DataFrame({"lower": [0.633565966955, 1.095789302358, 0.485845400185],
                         "upper": [1.182103975969, 3.556290952608, 0.629453478451]},
                        index=["sd_(Intercept)|plate", "sd_(Intercept)|sample", "sigma"])
    np.testing.assert_allclose(ci.loc[lme4.index, ["lower", "upper"]], lme4, rtol=1e-3)  # reached 3.9e-5


@pytest.mark.slow
def test_three_correlated_effects_match_lme4():
    """A 3×3 block: every sd and correlation, the latter with a free direction for row i."""
    from bayeslmm.datasets import load_dataset

    data = load_dataset("sleepstudy").copy()
    data["D2"] = (data["Days"] - 4.5) ** 2 / 10
    fit = Model("Reaction ~ Days + (Days + D2 | Subject)", data).fit(method="reml")
    ci = profile_intervals(fit)
    # confint(lmer(Reaction ~ Days + (Days + D2 | Subject), s), method = "profile"), s$D2 as above
    lme4 = pd.DataFrame({"lower": [18.996948194145, 4.018547054312, 8.235279092791, -0.492513379609,
                                   -0.861984013869, -0.577752419366, 20.217593921747],
                         "upper": [45.583253737253, 8.847342193306, 23.193826813252, 0.572500944538,
                                   0.031091957440, 0.541617787982, 25.891206344221]},
                        index=["sd_(Intercept)|Subject", "sd_Days|Subject", "sd_D2|Subject",
                               "cor_Days.(Intercept)|Subject", "cor_D2.(Intercept)|Subject",
                               "cor_D2.Days|Subject", "sigma"])
    sds = ["sd_(Intercept)|Subject", "sd_Days|Subject", "sd_D2|Subject", "sigma"]
    np.testing.assert_allclose(ci.loc[sds, ["lower", "upper"]], lme4.loc[sds], rtol=1e-3)  # reached 5.7e-5
    # lme4 warns 14 times here, and its correlation ends are off its own profile: at its
    # -0.861984 our profile is 0.089 below the cutoff.  Ours are on it (reached 6e-7), and
    # within 1e-2 of lme4's (reached 2.2e-3)
    cors = lme4.index[3:6]
    np.testing.assert_allclose(ci.loc[cors, ["lower", "upper"]], lme4.loc[cors], atol=1e-2)
    prof = Profiler(fit)
    cutoff = stats.chi2.ppf(0.95, 1)
    for p in prof.params:
        if p.label in cors:
            for end in ci.loc[p.label, ["lower", "upper"]]:
                assert prof.profile(p, end) == pytest.approx(cutoff, abs=1e-4), (p.label, end)


# -- compare() keeps both fits whatever the profile does -----------------------------------------

@pytest.fixture(scope="module")
def orthodont_bayes(orthodont):
    return orthodont.fit(method="nuts", chains=2, draws=200, tune=200, random_seed=3, progressbar=False,
                         warn=False)


def test_compare_orthodont_profiles_with_boundary_notes(orthodont_bayes, orthodont_reml, orthodont_ci):
    table = compare(orthodont_bayes, orthodont_reml, ci_prob=0.95, intervals="profile")
    assert table.loc["sd[Subject|(Intercept)]", "lower"] == 0.0
    assert table.loc["sigma", "upper"] == orthodont_ci.loc["sigma", "upper"]
    assert any(n.startswith("profile: cor_age.(Intercept)|Subject: the profile stays below") for n in table.notes)
    # "auto" is "profile" for a model this size: the same table
    auto = compare(orthodont_bayes, orthodont_reml, ci_prob=0.95)
    pd.testing.assert_frame_equal(auto.to_frame(), table.to_frame())


def test_compare_falls_back_where_a_profile_fails(orthodont_bayes, orthodont, monkeypatch):
    fit = orthodont.fit(method="reml")  # a fresh fit: profiles are cached per fit
    real = Profiler.interval

    def failing(self, p, level):
        if p.label == "sd_age|Subject":
            raise ValueError("f(a) and f(b) must have different signs")
        return real(self, p, level)

    monkeypatch.setattr(Profiler, "interval", failing)
    with pytest.warns(UserWarning, match="sd_age.Subject: the profile could not be computed"):
        table = compare(orthodont_bayes, fit, ci_prob=0.95, intervals="profile")
    assert table.loc["sd[Subject|age]", ["lower", "upper"]].isna().all()
    assert table.loc["sigma", ["lower", "upper"]].notna().all()  # the others are kept
    assert np.isfinite(table.loc["beta[age]", "lower"])  # and the fixed effects' Wald intervals
    assert any("sd_age|Subject: the profile could not be computed (ValueError" in n for n in table.notes)
