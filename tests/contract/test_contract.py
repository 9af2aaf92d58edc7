"""The contract both fits keep: the same questions answered the same way, in one vocabulary.

Parametrised over a REML fit, a (small) NUTS fit, and each of them reloaded from a
file.  Every result-level feature that both engines offer belongs here; the members
are listed in :class:`bayeslmm.results_api.MixedFit`.
"""

import inspect

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bayeslmm import BayesLMMError, Model, load
from bayeslmm.bayes.results import BayesFit
from bayeslmm.reml.results import FreqFit
from bayeslmm.results_api import (CONFINT_COLUMNS, FIXEF_TABLE_COLUMNS, RANEF_TABLE_COLUMNS, VARCORR_COLUMNS,
                                  VARCORR_TABLE_COLUMNS, MixedFit)

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
    fe = fit.fixef
    re, coef = fit.ranef()["Subject"], fit.coef()["Subject"]
    np.testing.assert_allclose(coef.to_numpy(), re.to_numpy() + fe.to_numpy(), rtol=1e-12)


@pytest.mark.parametrize("formula", [SPLIT, CROSSED])
@pytest.mark.parametrize("kind", KINDS)
def test_varcorr_rows_and_fixef_names_agree(fits, formula, kind):
    fit = fits(formula, kind)
    vc = fit.varcorr
    assert [(g, _none(a), _none(b)) for g, a, b in zip(vc.grp, vc.var1, vc.var2)] == VARCORR_ROWS[formula]
    assert list(fit.fixef.index) == (["(Intercept)", "Days"] if formula == SPLIT else ["(Intercept)"])


@pytest.mark.parametrize("kind", KINDS)
def test_ranef_intervals_honour_ci_prob(fits, kind):
    fit = fits(SPLIT, kind)
    est = "estimate"
    wide, narrow = fit.ranef(ci_prob=0.9)["Subject"], fit.ranef(ci_prob=0.5)["Subject"]
    assert wide.attrs["ci_prob"] == 0.9 and list(wide.columns.get_level_values(0).unique()) == [est, "lower", "upper"]
    pd.testing.assert_frame_equal(wide[est], fit.ranef()["Subject"])
    assert (narrow["upper"] - narrow["lower"] < wide["upper"] - wide["lower"]).all().all()
    table = fit.ranef_table(ci_prob=0.9)
    assert list(table.columns[:7]) == RANEF_TABLE_COLUMNS + ["lower", "upper"]
    np.testing.assert_allclose(table["estimate"].to_numpy(), np.concatenate(
        [wide["estimate"][c].to_numpy() for c in ["(Intercept)", "Days"]]), rtol=1e-12)
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


# -- one protocol: the same members, types, columns and keys on every fit ----------------------
def _protocol_members() -> list[str]:
    return sorted(n for n in dir(MixedFit) if not n.startswith("_")
                  and n not in dir(object)) + sorted(MixedFit.__annotations__)


@pytest.mark.parametrize("cls", [FreqFit, BayesFit])
def test_both_classes_have_every_member_with_the_protocol_parameters(cls):
    members = _protocol_members()
    assert {"fixef", "varcorr", "fixef_table", "varcorr_table", "confint", "nobs", "sigma", "fitted",
            "residuals", "point_estimate", "ranef"} <= set(members)
    for name in members:
        assert hasattr(cls, name) or name in getattr(cls, "__dataclass_fields__", {}) or name == "method", name
        want = getattr(MixedFit, name, None)
        if not callable(want) or isinstance(want, property):
            assert not callable(getattr(cls, name, None)) or isinstance(getattr(cls, name), property), name
            continue
        got = inspect.signature(getattr(cls, name)).parameters
        shared = list(inspect.signature(want).parameters)
        # the protocol's parameters first, same names; an engine's extras after them, with defaults
        assert list(got)[: len(shared)] == shared, (name, list(got))
        assert all(p.default is not inspect.Parameter.empty for p in list(got.values())[len(shared):]), name


@pytest.mark.parametrize("formula", [SPLIT, CROSSED])
@pytest.mark.parametrize("kind", KINDS)
def test_point_values_have_one_layout(fits, formula, kind):
    fit = fits(formula, kind)
    assert isinstance(fit, MixedFit)
    names = ["(Intercept)", "Days"] if formula == SPLIT else ["(Intercept)"]
    fe, vc = fit.fixef, fit.varcorr
    assert isinstance(fe, pd.Series) and fe.name == "estimate" and list(fe.index) == names
    assert np.isfinite(fe.to_numpy(dtype=float)).all()
    assert isinstance(vc, pd.DataFrame) and list(vc.columns) == VARCORR_COLUMNS
    assert vc.grp.iloc[-1] == "Residual" and vc.sdcor.iloc[-1] == pytest.approx(fit.sigma, rel=1e-12)
    sd_rows = vc.var2.isna().to_numpy()
    # vcov of an sd row is the variance (REML: sd²; NUTS: the mean of sd², ≥ (mean sd)² by Jensen)
    if fit.point_estimate == "conditional mode":
        np.testing.assert_allclose(vc.vcov[sd_rows], vc.sdcor[sd_rows] ** 2, rtol=1e-12)
    else:
        assert (vc.vcov[sd_rows] >= vc.sdcor[sd_rows] ** 2).all()
    assert fit.nobs == (180 if formula == SPLIT else 144)
    assert fit.point_estimate in ("conditional mode", "posterior mean")
    # arithmetic and slicing give plain pandas objects (the NUTS values' call shim does not leak)
    assert type(fe * 2) is pd.Series and type(vc[["grp", "sdcor"]]) is pd.DataFrame


@pytest.mark.parametrize("kind", KINDS)
def test_tables_have_the_core_columns_first(fits, kind):
    fit = fits(SPLIT, kind)
    ft, vt = fit.fixef_table(ci_prob=0.9), fit.varcorr_table(ci_prob=0.9)
    assert list(ft.columns[:4]) == FIXEF_TABLE_COLUMNS and ft.attrs["ci_prob"] == 0.9
    assert list(ft.index) == list(fit.fixef.index)
    np.testing.assert_allclose(ft["estimate"], fit.fixef, rtol=1e-12)
    assert (ft["lower"] < ft["estimate"]).all() and (ft["estimate"] < ft["upper"]).all()
    assert (ft["std_error"] > 0).all()
    assert list(vt.columns[:6]) == VARCORR_TABLE_COLUMNS and vt.attrs["ci_prob"] == 0.9
    pd.testing.assert_frame_equal(vt[["grp", "var1", "var2"]], fit.varcorr[["grp", "var1", "var2"]],
                                  check_frame_type=False)
    np.testing.assert_allclose(vt["estimate"], fit.varcorr["sdcor"], rtol=1e-12)
    assert (vt["lower"] < vt["upper"]).all()
    wide = fit.fixef_table(ci_prob=0.99)
    assert (wide["upper"] - wide["lower"] > ft["upper"] - ft["lower"]).all()
    assert fit.fixef_table().attrs["ci_prob"] == fit.default_ci_prob
    if fit.point_estimate == "conditional mode":  # β̂ ± t(0.95; Satterthwaite df)·SE, and lme4's t value
        np.testing.assert_allclose(ft["upper"] - ft["estimate"], stats.t.ppf(0.95, ft["df"]) * ft["std_error"],
                                   rtol=1e-12)
        np.testing.assert_allclose(ft["t_value"], ft["estimate"] / ft["std_error"], rtol=1e-12)
        wald = fit.fixef_table(ci_prob=0.9, ddf="none")  # lme4 without lmerTest: β̂ ± 1.645·SE
        np.testing.assert_allclose(wald["upper"] - wald["estimate"], stats.norm.ppf(0.95) * wald["std_error"],
                                   rtol=1e-12)
    else:  # the posterior's mean, sd and 5 % / 95 % quantiles
        days = fit.posterior["beta"].sel(coef="Days").to_numpy().ravel()
        assert ft.loc["Days", "std_error"] == pytest.approx(days.std(ddof=1), rel=1e-6)
        assert ft.loc["Days", "upper"] == pytest.approx(np.quantile(days, 0.95), rel=1e-6)
        assert {"median", "r_hat", "ess_bulk", "ess_tail"} <= set(ft.columns) <= set(vt.columns)
    with pytest.raises(BayesLMMError, match="ci_prob"):
        fit.fixef_table(ci_prob=1.5)


@pytest.mark.parametrize("kind", KINDS)
def test_confint_has_one_layout(fits, kind):
    fit, reml = fits(SPLIT, kind), fits(SPLIT, "reml")
    ci = fit.confint(ci_prob=0.9)
    ref = reml.confint(ci_prob=0.9, method="wald")
    assert list(ci.columns) == CONFINT_COLUMNS and list(ci.index) == list(ref.index)
    assert ci.index.name == "parameter" and ci.attrs["ci_prob"] == 0.9 and {"method", "notes"} <= set(ci.attrs)
    assert list(ci.index) == ["sd_(Intercept)|Subject", "sd_Days|Subject", "sigma", "(Intercept)", "Days"]
    np.testing.assert_allclose(ci.loc[["(Intercept)", "Days"], "estimate"], fit.fixef, rtol=1e-12)
    np.testing.assert_allclose(ci["estimate"].iloc[:3], fit.varcorr["sdcor"], rtol=1e-12)
    if fit.point_estimate == "posterior mean":
        np.testing.assert_allclose(ci[["lower", "upper"]].iloc[:3], fit.varcorr_table(0.9)[["lower", "upper"]],
                                   rtol=1e-12)
        assert (ci["lower"] < ci["upper"]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fitted_plus_residuals_is_the_response(fits, kind):
    fit = fits(SPLIT, kind)
    fitted, resid = fit.fitted, fit.residuals
    assert isinstance(fitted, pd.Series) and fitted.name == "fitted" and resid.name == "residuals"
    assert len(fitted) == fit.nobs and fitted.index.equals(resid.index)
    np.testing.assert_allclose(fitted + resid, fit.spec.y, rtol=1e-12)
    # the fitted values are the conditional predictions of the training rows (predict()'s mean for NUTS)
    pred = fit.predict(kind="conditional")
    pred = pred["mean"] if isinstance(pred, pd.DataFrame) else pred
    np.testing.assert_allclose(fitted.to_numpy(), pred.to_numpy(), rtol=1e-10)


def test_nuts_agrees_with_reml_within_the_posterior_spread(fits):
    # sleepstudy, (1|Subject) + (0+Days|Subject): the posterior means sit close to lme4's REML values
    # (reached with random_seed=11: |Δβ| 0.11 posterior sd, |Δsd| 0.41, |Δσ| 0.16, fitted 1.8 ms; the
    # sds' posteriors are right-skewed; bounds leave a factor ≥ 3)
    reml, nuts = fits(SPLIT, "reml"), fits(SPLIT, "nuts")
    ft = nuts.fixef_table()
    assert (np.abs(nuts.fixef - reml.fixef) / ft["std_error"]).max() < 1.0
    vt = nuts.varcorr_table()
    z = (vt["estimate"] - reml.varcorr["sdcor"]) / vt["std_error"]
    assert np.abs(z).max() < 1.5
    assert abs(nuts.sigma - reml.sigma) / vt["std_error"].iloc[-1] < 1.0
    assert np.abs(nuts.fitted - reml.fitted).max() < 6.0  # ms, against residual sd ≈ 25
    for a, b in [(nuts.fixef_table(), reml.fixef_table()), (nuts.varcorr_table(), reml.varcorr_table(method="wald"))]:
        assert list(a.index) == list(b.index) and list(a.columns[:4]) == list(b.columns[:4])


@pytest.mark.parametrize("kind", ["reml", "nuts"])
def test_reloaded_fit_has_the_same_point_values_and_tables(fits, kind):
    a, b = fits(SPLIT, kind), fits(SPLIT, f"{kind}-reloaded")
    pd.testing.assert_series_equal(a.fixef, b.fixef)
    pd.testing.assert_frame_equal(a.varcorr, b.varcorr)
    pd.testing.assert_frame_equal(a.fixef_table(0.9), b.fixef_table(0.9))
    pd.testing.assert_series_equal(a.fitted, b.fitted)
    assert a.sigma == b.sigma and a.nobs == b.nobs and a.point_estimate == b.point_estimate
