"""Marginal means and contrasts on both engines: the same rows, the same core columns, close numbers.

ham with one grouping factor (the NUTS fit then runs on the compiled kernel: seconds),
fitted by REML and by a small NUTS run, each also saved and reloaded.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bayeslmm import BayesLMMError, Model, load
from bayeslmm.results_api import MARGINAL_COLUMNS, MixedFit

DATA = Path(__file__).resolve().parents[1] / "data"
FORMULA = "Informed.liking ~ Product*Information + (1 | Consumer)"
NUTS = dict(method="nuts", chains=2, draws=300, tune=300, progressbar=False, random_seed=5, warn=False)
KINDS = ["reml", "nuts", "reml-reloaded", "nuts-reloaded"]
_FITS: dict = {}


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marginal")

    def get(kind: str):
        if kind not in _FITS:
            engine, _, reloaded = kind.partition("-")
            if reloaded:
                get(engine).save(folder / f"{engine}.nc")
                _FITS[kind] = load(folder / f"{engine}.nc")
            else:
                data = pd.read_csv(DATA / "ham.csv")
                for c in ["Consumer", "Product", "Information"]:
                    data[c] = data[c].astype(str)
                model = Model(FORMULA, data)
                _FITS[kind] = model.fit(method="reml") if engine == "reml" else model.fit(**NUTS)
        return _FITS[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_same_rows_and_core_columns(fits, kind):
    fit = fits(kind)
    assert isinstance(fit, MixedFit)
    means = fit.marginal_means("Product", by="Information", ci_prob=0.9)
    assert list(means.columns[:6]) == ["Information", "Product", *MARGINAL_COLUMNS]
    assert list(zip(means.Information, means.Product)) == [(i, p) for i in "12" for p in "1234"]
    assert means.attrs["ci_prob"] == 0.9
    assert (means["lower"] < means["estimate"]).all() and (means["estimate"] < means["upper"]).all()
    pairs = fit.contrasts("Product")
    assert list(pairs.columns[:5]) == ["contrast", *MARGINAL_COLUMNS]
    assert list(pairs["contrast"]) == ["1 - 2", "1 - 3", "1 - 4", "2 - 3", "2 - 4", "3 - 4"]
    assert fit.marginal_means("Product").attrs["ci_prob"] == fit.default_ci_prob
    if fit.point_estimate == "conditional mode":
        assert {"t_value", "df", "p_value"} <= set(pairs.columns) and pairs.attrs["adjust"] == "tukey"
    else:
        assert {"median", "pd"} <= set(pairs.columns) and pairs.attrs["adjust"] == "none"
        assert ((pairs["pd"] >= 0.5) & (pairs["pd"] <= 1)).all()


def test_posterior_means_sit_near_the_reml_estimates(fits):
    # reached with random_seed=5: |Δ| ≤ 0.064 posterior sd for the means, ≤ 0.068 for the pairs;
    # the posterior sds within 6.6 % of the REML SEs (weak default priors, 648 rows)
    for call in (lambda f: f.marginal_means("Product", by="Information"), lambda f: f.contrasts("Product")):
        reml, nuts = call(fits("reml")), call(fits("nuts"))
        assert (np.abs(nuts["estimate"] - reml["estimate"]) < 0.5 * nuts["std_error"]).all()
        np.testing.assert_allclose(nuts["std_error"], reml["std_error"], rtol=0.25)


def test_posterior_summaries_are_the_draws_of_l_beta(fits):
    fit = fits("nuts")
    beta = fit.posterior["beta"].sel(coef=list(fit.fixef.index)).to_numpy().reshape(-1, len(fit.fixef))
    means = fit.marginal_means("Product", ci_prob=0.8)
    # Product 2: the intercept, Product 2's effect, and half of Information 2 and of its interaction
    draws = beta[:, 0] + beta[:, 1] + 0.5 * (beta[:, 4] + beta[:, 5])
    row = means.iloc[1]
    assert row["estimate"] == pytest.approx(draws.mean(), rel=1e-12)
    assert row["std_error"] == pytest.approx(draws.std(ddof=1), rel=1e-10)
    assert row["upper"] == pytest.approx(np.quantile(draws, 0.9), rel=1e-12)
    pairs = fit.contrasts("Product")
    np.testing.assert_allclose(pairs["estimate"].iloc[0], means["estimate"].iloc[0] - means["estimate"].iloc[1],
                               rtol=1e-10)
    d = -(beta[:, 1] + 0.5 * beta[:, 5])  # Product 1 − Product 2: the intercept and Information cancel
    assert pairs["pd"].iloc[0] == pytest.approx(max((d > 0).mean(), (d < 0).mean()), rel=1e-12)
    with pytest.raises(BayesLMMError, match="no multiplicity adjustment"):
        fit.contrasts("Product", adjust="tukey")
    assert fit.contrasts("Product", adjust="none").equals(pairs)


@pytest.mark.parametrize("kind", ["reml", "nuts"])
def test_reloaded_fit_answers_the_same(fits, kind):
    a, b = fits(kind), fits(f"{kind}-reloaded")
    pd.testing.assert_frame_equal(a.marginal_means("Product", by="Information"),
                                  b.marginal_means("Product", by="Information"))
    pd.testing.assert_frame_equal(a.contrasts("Product", method="trt.vs.ctrl"),
                                  b.contrasts("Product", method="trt.vs.ctrl"))
