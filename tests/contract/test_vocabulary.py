"""Renamed public keywords (docs/vocabulary.md): the old name still works, warns, and means the same."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm import BayesLMMError
from bayeslmm.deprecation import renamed_kwargs
from bayeslmm.plots import effect_intervals
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
           "--seed "]
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").glob("*.py"))]
    hits = [(f.name, s) for f in files for s in old if s in f.read_text().replace("(older name `--seed`)", "")]
    assert not hits
