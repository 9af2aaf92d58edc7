"""The contract both fits keep: the same questions answered the same way, in one vocabulary.

Parametrised over a REML fit, a (small) NUTS fit, and each of them reloaded from a
file.  Every result-level feature that both engines offer belongs here.  Known
difference left for later: ``FreqFit.fixef``/``varcorr`` are properties (a Series /
a frame with ``vcov, sdcor``), ``BayesFit.fixef()``/``varcorr()`` methods returning
posterior summaries; :func:`fixef_names` and :func:`varcorr_of` bridge that here.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import BayesLMMError, Model, load
from bayeslmm.bayes.results import BayesFit

SPLIT = "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)"
CROSSED = "diameter ~ 1 + (1 | plate) + (1 | sample)"
MODELS = {SPLIT: "sleepstudy", CROSSED: "Penicillin"}
# what each model's ranef()/coef() hold: group -> (ranef columns, coef columns, number of levels)
SHAPES = {SPLIT: {"Subject": (["(Intercept)", "Days"], ["(Intercept)", "Days"], 18)},
          CROSSED: {"plate": (["(Intercept)"], ["(Intercept)"], 24),
                    "sample": (["(Intercept)"], ["(Intercept)"], 6)}}
# as.data.frame(VarCorr(.))'s grp/var1/var2, with the group as written (lme4 itself says "Subject.1")
VARCORR_ROWS = {SPLIT: [("Subject", "(Intercept)", None), ("Subject", "Days", None), ("Residual", None, None)],
                CROSSED: [("plate", "(Intercept)", None), ("sample", "(Intercept)", None),
                          ("Residual", None, None)]}
NUTS = dict(method="nuts", chains=2, draws=200, tune=200, progressbar=False, random_seed=11, warn=False)
KINDS = ["reml", "nuts", "reml-reloaded", "nuts-reloaded"]

_FITS: dict = {}


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contract")

    def get(formula: str, kind: str):
        key = (formula, kind)
        if key not in _FITS:
            engine, _, reloaded = kind.partition("-")
            if reloaded:
                path = folder / f"{len(_FITS)}.nc"
                get(formula, engine).save(path)
                _FITS[key] = load(path)
            else:
                model = Model(formula, MODELS[formula])
                _FITS[key] = model.fit(method="reml") if engine == "reml" else model.fit(**NUTS)
        return _FITS[key]

    return get


def fixef_names(fit) -> list[str]:
    return list((fit.fixef() if isinstance(fit, BayesFit) else fit.fixef).index)


def varcorr_of(fit) -> pd.DataFrame:
    return fit.varcorr() if isinstance(fit, BayesFit) else fit.varcorr


def _none(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


@pytest.mark.parametrize("formula", [SPLIT, CROSSED])
@pytest.mark.parametrize("kind", KINDS)
def test_ranef_and_coef_have_one_frame_per_grouping_factor(fits, formula, kind):
    fit = fits(formula, kind)
    ranef, coef = fit.ranef(), fit.coef()
    assert list(ranef) == list(coef) == list(SHAPES[formula])
    for group, (re_cols, coef_cols, n_levels) in SHAPES[formula].items():
        for frame, cols in ((ranef[group], re_cols), (coef[group], coef_cols)):
            assert list(frame.columns) == cols
            assert frame.index.name == group and len(frame) == n_levels
            assert np.isfinite(frame.to_numpy()).all()
    assert set(fit.ranef_table().grpvar) == set(SHAPES[formula])


@pytest.mark.parametrize("kind", KINDS)
def test_coef_is_fixef_plus_ranef(fits, kind):
    fit = fits(SPLIT, kind)
    fe = fit.fixef()["mean"] if isinstance(fit, BayesFit) else fit.fixef
    re, coef = fit.ranef()["Subject"], fit.coef()["Subject"]
    np.testing.assert_allclose(coef.to_numpy(), re.to_numpy() + fe.to_numpy(), rtol=1e-12)


@pytest.mark.parametrize("formula", [SPLIT, CROSSED])
@pytest.mark.parametrize("kind", KINDS)
def test_varcorr_rows_and_fixef_names_agree(fits, formula, kind):
    fit = fits(formula, kind)
    vc = varcorr_of(fit)
    assert [(g, _none(a), _none(b)) for g, a, b in zip(vc.grp, vc.var1, vc.var2)] == VARCORR_ROWS[formula]
    assert fixef_names(fit) == (["(Intercept)", "Days"] if formula == SPLIT else ["(Intercept)"])


@pytest.mark.parametrize("kind", KINDS)
def test_ranef_intervals_honour_ci_prob(fits, kind):
    fit = fits(SPLIT, kind)
    est = "mean" if isinstance(fit, BayesFit) else "estimate"
    wide, narrow = fit.ranef(ci_prob=0.9)["Subject"], fit.ranef(ci_prob=0.5)["Subject"]
    assert wide.attrs["ci_prob"] == 0.9 and list(wide.columns.get_level_values(0).unique()) == [est, "lower", "upper"]
    pd.testing.assert_frame_equal(wide[est], fit.ranef()["Subject"])
    assert (narrow["upper"] - narrow["lower"] < wide["upper"] - wide["lower"]).all().all()
    table = fit.ranef_table(ci_prob=0.9)
    first = table[table.term == "Days"]
    np.testing.assert_allclose(first.lower.to_numpy(), wide["lower"]["Days"].to_numpy(), rtol=1e-12)
    if isinstance(fit, BayesFit):  # equal-tailed: the draws' 5 % and 95 % quantiles
        d = fit.effect_draws("Subject.1").to_numpy().reshape(-1, 18)
        np.testing.assert_allclose(wide["upper"]["Days"].to_numpy(), np.quantile(d, 0.95, axis=0), rtol=1e-12)
    else:  # lme4's condVar interval: mode ± z·condsd, z = 1.645 for 90 %
        z = stats.norm.ppf(0.95)
        np.testing.assert_allclose(first.upper.to_numpy(), first.condval + z * first.condsd, rtol=1e-12)
    with pytest.raises(BayesLMMError, match="ci_prob"):
        fit.ranef(ci_prob=1.5)


@pytest.mark.parametrize("kind", ["reml", "nuts"])
def test_reloaded_fit_answers_as_the_saved_one(fits, kind):
    a, b = fits(SPLIT, kind), fits(SPLIT, f"{kind}-reloaded")
    for group in a.ranef():
        pd.testing.assert_frame_equal(a.ranef()[group], b.ranef()[group])
        pd.testing.assert_frame_equal(a.coef()[group], b.coef()[group])
    pd.testing.assert_frame_equal(a.ranef_table(ci_prob=0.9), b.ranef_table(ci_prob=0.9))


@pytest.mark.parametrize("kind", KINDS)
def test_predict_gives_one_value_per_new_row(fits, kind):
    fit = fits(SPLIT, kind)
    new = pd.DataFrame({"Days": [0.0, 4.5, 9.0], "Subject": ["308", "309", "not-seen"]})
    pred = fit.predict(new)
    assert len(pred) == 3 and np.isfinite(np.asarray(pred, dtype=float)).all()


@pytest.mark.parametrize("formula", [SPLIT, CROSSED])
@pytest.mark.parametrize("kind", KINDS)
def test_summary_prints_every_group(fits, formula, kind):
    text = str(fits(formula, kind).summary())
    for group in SHAPES[formula]:
        assert group in text


def test_summary_kept_effects_give_only_their_stored_intervals():
    # effects="summary" keeps 2.5/5/25/50/75/95/97.5 % quantiles of the first block, not draws
    fit = Model(SPLIT, "sleepstudy").fit(effects="summary", **NUTS)
    ok = fit.ranef(ci_prob=0.9)["Subject"]
    assert list(ok.columns.get_level_values(1)[:2]) == ["(Intercept)", "Days"]
    with pytest.raises(BayesLMMError, match="effects='summary'"):
        fit.ranef(ci_prob=0.8)
