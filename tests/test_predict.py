"""Predictions of both fits, on sleepstudy: training rows, new data, new groups, bad input."""

import numpy as np
import pytest

from bayeslmm import Model


@pytest.fixture(scope="module")
def sleep_model():
    return Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")


@pytest.fixture(scope="module")
def sleep_bayes(sleep_model):
    return sleep_model.fit(method="nuts", draws=300, tune=300, chains=2, random_seed=11, progressbar=False,
                           warn=False)


def test_posterior_predictive_training_rows(sleep_bayes, sleep_model):
    yrep = sleep_bayes.posterior_predictive()
    assert yrep.dims == ("chain", "draw", "obs")
    assert yrep.shape == (2, 300, sleep_model.spec.n_obs)
    # the default seed comes from the fit: the same draws twice; another seed differs
    np.testing.assert_array_equal(yrep.to_numpy(), sleep_bayes.posterior_predictive().to_numpy())
    assert not np.allclose(yrep.to_numpy(), sleep_bayes.posterior_predictive(random_seed=5).to_numpy())
    # replicated data reproduce the observed mean and spread (the model fits sleepstudy)
    y = sleep_model.spec.y
    assert abs(float(yrep.mean()) - y.mean()) < 3.0
    assert abs(float(yrep.std()) / y.std() - 1) < 0.05
    # the residual noise is there: per-row replicate sd is about σ (plus the uncertainty of the mean)
    sigma = float(sleep_bayes.posterior["sigma"].mean())
    per_row_sd = yrep.std(("chain", "draw")).to_numpy()
    assert sigma < np.median(per_row_sd) < 1.3 * sigma
