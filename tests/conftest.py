import json
from pathlib import Path

import pytest

# lme4 1.1-31 reference fits, copied from ../shared/reference (provenance in tests/data/lme4_reference_README.md)
REFERENCE = Path(__file__).resolve().parent / "data" / "lme4_reference.json"


def load_reference() -> dict:
    return json.loads(REFERENCE.read_text())["models"]


def scale_logpdf(prior, value, c=0):
    """scipy's log density of a scale prior (its c-th value where the parameters are per column)."""
    import numpy as np
    import scipy.stats as st

    par = {k: np.ravel(v)[c] if np.ndim(v) else v for k, v in prior.params.items()}
    if prior.family == "HalfNormal":
        return st.halfnorm(scale=par["sigma"]).logpdf(value)
    if prior.family == "Exponential":
        return st.expon(scale=1 / par["lam"]).logpdf(value)
    if prior.family == "HalfStudentT":
        return np.log(2) + st.t(df=par["nu"], scale=par["sigma"]).logpdf(value)
    if prior.family == "HalfCauchy":
        return st.halfcauchy(scale=par["beta"]).logpdf(value)
    raise AssertionError(prior.family)


@pytest.fixture(scope="session")
def lme4_reference() -> dict:
    return load_reference()


@pytest.fixture(scope="session")
def sleep_model():
    """sleepstudy's ``Reaction ~ Days + (Days | Subject)`` (shared; a test file may define its own)."""
    from bayeslmm import Model

    return Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")


@pytest.fixture(scope="session")
def sleep_reml(sleep_model):
    return sleep_model.fit(method="reml")
