"""varcorr_rows: the one walker of varcorr's rows behind lme4's confint names and compare's row names."""

import numpy as np
import pandas as pd
import pytest

from bayeslmm.results_api import confint_labels, varcorr_rows


def _varcorr(missing):
    # the rows of lme4's as.data.frame(VarCorr(lmer(Reaction ~ Days + (Days | Subject), sleepstudy)))
    return pd.DataFrame({"grp": ["Subject", "Subject", "Subject", "Residual"],
                         "var1": ["(Intercept)", "Days", "(Intercept)", None],
                         "var2": [missing, missing, "Days", missing],
                         "vcov": [612.10, 35.07, 9.60, 654.94], "sdcor": [24.74, 5.92, 0.066, 25.59]})


@pytest.mark.parametrize("missing", [None, np.nan], ids=["None", "NaN"])
def test_rows_and_lme4_names(missing):
    vc = _varcorr(missing)
    assert list(varcorr_rows(vc)) == [("sd", "Subject", "(Intercept)", None), ("sd", "Subject", "Days", None),
                                      ("cor", "Subject", "(Intercept)", "Days"), ("sigma", "Residual", None, None)]
    # confint(m, oldNames = FALSE) in lme4 1.1-31
    assert confint_labels(vc) == ["sd_(Intercept)|Subject", "sd_Days|Subject", "cor_Days.(Intercept)|Subject",
                                  "sigma"]
