"""Renamed public keywords (docs/vocabulary.md): the old name still works, warns, and means the same."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm import BayesLMMError
from bayeslmm.deprecation import renamed_kwargs
from bayeslmm.bayes.results import SUMMARY_COLUMNS
from bayeslmm.plots import effect_intervals, ellipse_points
from bayeslmm.reml.profile import profile_intervals
from bayeslmm.simulate import simulate_doctors, simulate_lmm

ROOT = Path(__file__).resolve().parents[2]


def test_old_keyword_warns_and_passes_through():
    @renamed_kwargs(prob="ci_prob")
    def f(x, ci_prob=0.5):
        return x, ci_prob

    with pytest.warns(FutureWarning, match="`prob` is renamed `ci_prob`"):
        assert f(1, prob=0.9) == (1, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(1, 0.7) == f(1, ci_prob=0.7) == (1, 0.7)
    with pytest.raises(BayesLMMError, match="both `prob` and `ci_prob`"):
        f(1, prob=0.9, ci_prob=0.9)


def test_simulators_take_random_seed_and_still_seed(recwarn):
    new = simulate_lmm(n_groups=4, n_per_group=3, random_seed=5)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    with pytest.warns(FutureWarning, match="`seed` is renamed `random_seed`"):
        old = simulate_lmm(n_groups=4, n_per_group=3, seed=5)
    pd.testing.assert_frame_equal(new, old)
    with pytest.warns(FutureWarning, match="simulate_doctors"):
        old = simulate_doctors(n_doctors=20, target_patients=None, seed=3)
    pd.testing.assert_frame_equal(old, simulate_doctors(n_doctors=20, target_patients=None, random_seed=3))


def test_confint_and_profile_take_ci_prob(sleep_reml):
    new = sleep_reml.confint(ci_prob=0.9, method="wald")
    with pytest.warns(FutureWarning, match="confint\\(\\): `level` is renamed `ci_prob`"):
        old = sleep_reml.confint(level=0.9, method="wald")
    pd.testing.assert_frame_equal(new, old)
    assert new.attrs["ci_prob"] == 0.9
    # Wald: β̂ ± 1.645·SE at 90 %
    np.testing.assert_allclose(new.loc["Days", "upper"] - new.loc["Days", "estimate"],
                               1.6448536269514722 * sleep_reml.fixef_se["Days"], rtol=1e-12)
    with pytest.warns(FutureWarning, match="profile_intervals"):
        with pytest.raises(BayesLMMError, match="ci_prob must be a probability"):
            profile_intervals(sleep_reml, level=2.0)


def test_effect_intervals_take_ci_prob(sleep_reml):
    new = effect_intervals(sleep_reml, "Subject", ci_prob=0.5)
    with pytest.warns(FutureWarning, match="`prob` is renamed `ci_prob`"):
        old = effect_intervals(sleep_reml, "Subject", prob=0.5)
    for a, b in zip(new[1:4], old[1:4]):
        np.testing.assert_array_equal(a, b)
    assert new[4] == 0.5


def test_docs_and_examples_use_the_new_names():
    # the old public keywords must not be taught (tests/workflow/test_examples runs the scripts)
    old = ["simulate_doctors(seed=", "simulate_lmm(seed=", "confint(level=", "caterpillar_plot(fit, prob=",
           "--seed ", ".fixef()", ".varcorr()", "fixef(ci_prob", "varcorr(ci_prob", "ellipse_points(prob="]
    # docs/whatchanged.md lists the old names on purpose
    files = [ROOT / "README.md", *sorted(f for f in (ROOT / "docs").rglob("*.md") if f.name != "whatchanged.md"),
             *sorted((ROOT / "examples").glob("*.py"))]
    hits = [(f.name, s) for f in files for s in old if s in f.read_text().replace("(older name `--seed`)", "")]
    assert not hits


# -- BayesFit.fixef / varcorr: properties now; the old calls still answer as before ----------------
@pytest.fixture(scope="module")
def sleep_nuts(sleep_model):
    return sleep_model.fit(method="nuts", chains=2, draws=200, tune=200, progressbar=False, random_seed=3,
                           warn=False)


def _old_call(fn, *args, **kwargs):
    with pytest.warns(FutureWarning, match="is now a property .*as FreqFit's; use .*_table\\(ci_prob\\)"):
        return fn(*args, **kwargs)


def test_old_bayes_fixef_call_warns_and_returns_the_old_summary(sleep_nuts):
    beta = sleep_nuts.posterior["beta"]
    for args, kwargs, prob in [((), {}, 0.89), ((0.95,), {}, 0.95), ((), {"ci_prob": 0.5}, 0.5)]:
        old = _old_call(sleep_nuts.fixef, *args, **kwargs)
        assert type(old) is pd.DataFrame and list(old.columns) == SUMMARY_COLUMNS
        assert list(old.index) == ["(Intercept)", "Days"] and old.attrs["interval"] == f"eti{round(prob * 100)}"
        days = beta.sel(coef="Days").to_numpy().ravel()
        assert old.loc["Days", "mean"] == pytest.approx(days.mean(), rel=1e-12)
        assert old.loc["Days", "sd"] == pytest.approx(days.std(ddof=1), rel=1e-6)
        assert old.loc["Days", "lower"] == pytest.approx(np.quantile(days, (1 - prob) / 2), rel=1e-6)
        # the same numbers as the new table, under the old names
        new = sleep_nuts.fixef_table(prob).rename(columns={"estimate": "mean", "std_error": "sd"})
        pd.testing.assert_frame_equal(old, new[SUMMARY_COLUMNS], check_like=False)


def test_old_bayes_varcorr_call_warns_and_returns_the_old_summary(sleep_nuts):
    old = _old_call(sleep_nuts.varcorr)
    assert type(old) is pd.DataFrame and list(old.columns) == ["grp", "var1", "var2", *SUMMARY_COLUMNS]
    assert old.attrs == {"interval": "eti89"}
    assert list(old.grp) == ["Subject", "Subject", "Subject", "Residual"]
    sigma = sleep_nuts.posterior["sigma"].to_numpy().ravel()
    assert old["mean"].iloc[-1] == pytest.approx(sigma.mean(), rel=1e-12)
    np.testing.assert_allclose(old["mean"], sleep_nuts.varcorr["sdcor"], rtol=1e-12)
    narrow = _old_call(sleep_nuts.varcorr, ci_prob=0.5)
    assert narrow.attrs == {"interval": "eti50"} and (narrow.upper - narrow.lower < old.upper - old.lower).all()


def test_new_bayes_point_values_do_not_warn(sleep_nuts, recwarn):
    fe, vc = sleep_nuts.fixef, sleep_nuts.varcorr
    _ = (fe * 2, fe["Days"], vc.sdcor, vc[vc.grp == "Residual"], sleep_nuts.fixef_table())
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_ellipse_points_take_ci_prob():
    cov = np.array([[4.0, 1.0], [1.0, 2.0]])
    new = ellipse_points([0.0, 0.0], cov, ci_prob=0.5)
    with pytest.warns(FutureWarning, match="`prob` is renamed `ci_prob`"):
        old = ellipse_points([0.0, 0.0], cov, prob=0.5)
    np.testing.assert_array_equal(new, old)
    # the 50 % contour of N(0, cov): Mahalanobis radius² = χ²₂ quantile = −2 log(0.5)
    d2 = np.einsum("ni,ij,nj->n", new, np.linalg.inv(cov), new)
    np.testing.assert_allclose(d2, -2 * np.log(0.5), rtol=1e-10)


def test_pandas_taking_the_new_values_for_callables_gets_the_values(sleep_nuts, recwarn):
    # pandas calls a callable given to assign()/loc with the frame: that must not reach the old method
    frame = pd.DataFrame(index=["(Intercept)", "Days"]).assign(beta=sleep_nuts.fixef)
    np.testing.assert_array_equal(frame["beta"].to_numpy(), sleep_nuts.fixef.to_numpy())
    vc = sleep_nuts.varcorr
    assert sleep_nuts.varcorr.loc[vc.grp == "Residual", "sdcor"].item() == pytest.approx(sleep_nuts.sigma)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
