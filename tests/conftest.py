import json
from pathlib import Path

import pytest

# lme4 1.1-31 reference fits, copied from ../shared/reference (provenance in tests/data/lme4_reference_README.md)
REFERENCE = Path(__file__).resolve().parent / "data" / "lme4_reference.json"


def load_reference() -> dict:
    return json.loads(REFERENCE.read_text())["models"]


# nlme 3.1-162 reference fits of residual structures (provenance in tests/data; a copy of ../shared's)
NLME_MODELS = json.loads((REFERENCE.parent / "nlme_reference.json").read_text())["models"]


def nlme_reference_data(ref):
    """A reference model's CSV (``ref``: its record or its key in NLME_MODELS) with its factors as nlme has
    them: strings, and the level order where the reference sets it (Orthodont's Sex is Male first)."""
    import pandas as pd

    ref = NLME_MODELS[ref] if isinstance(ref, str) else ref
    data = pd.read_csv(REFERENCE.parent / f"{ref['dataset']}.csv")
    for col, levels in ref["categorical"].items():
        data[col] = data[col].astype(str)
        if levels is not None:
            data[col] = pd.Categorical(data[col], categories=levels)
    return data


def residual_small_data(seed: int = 0, groups: int = 8, per: int = 6):
    """Groups with integer times with gaps (t), jittered times (tc), a two-level factor s, a positive
    covariate v and weights w: the residual-structure tests' small data."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{k}" for k in range(groups)], per)
    t = np.concatenate([np.sort(rng.choice(12, per, replace=False)) for _ in range(groups)]).astype(float)
    return pd.DataFrame({"y": rng.normal(10, 2, groups * per), "x": rng.normal(size=groups * per), "g": g, "t": t,
                         "tc": t + rng.uniform(0, 0.5, groups * per), "s": rng.choice(["a", "b"], groups * per),
                         "v": rng.uniform(0.5, 3.0, groups * per), "w": rng.uniform(0.5, 2.0, groups * per)})


def thinned_rank(draws, truth: float, n_ranks: int) -> int:
    """SBC's rank of the truth among ``n_ranks`` evenly thinned draws (all chains flattened)."""
    import numpy as np

    flat = np.asarray(draws).reshape(-1)
    keep = np.floor((np.arange(n_ranks) + 0.5) * flat.size / n_ranks).astype(int)
    return int(np.sum(flat[keep] < truth))


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
