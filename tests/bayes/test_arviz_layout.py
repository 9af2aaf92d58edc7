"""The posterior's layout suits ArviZ: each block's distinct correlations only (bayeslmm.bayes.naming).

The issue: the whole correlation matrix was stored, so ``az.summary`` printed
RuntimeWarnings and NaN R-hats (the diagonal is constant 1) and trace plots drew flat
lines; files saved that way must still load.
"""

import warnings

import arviz as az
import numpy as np
import pytest
import xarray as xr

from bayeslmm import Model, load
from bayeslmm.bayes import naming

QUICK = dict(chains=2, draws=150, tune=150, random_seed=3, progressbar=False, warn=False)


def summary_without_warnings(idata):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning of ArviZ's fails the test
        return az.summary(idata)


@pytest.fixture(scope="module")
def kernel_fit(sleep_model):
    return sleep_model.fit(method="nuts", **QUICK)


def test_correlations_are_stored_once_each(kernel_fit):
    post = kernel_fit.posterior
    assert post["Subject_corr"].dims == ("chain", "draw", "Subject_pair")
    assert post["Subject_pair"].values.tolist() == ["(Intercept),Days"]
    table = summary_without_warnings(kernel_fit.idata)
    assert np.isfinite(table["r_hat"].astype(float)).all()
    assert "Subject_corr[(Intercept),Days]" in table.index
    # the stored pair is the varcorr row
    vc = kernel_fit.varcorr
    row = vc[(vc["grp"] == "Subject") & (vc["var2"] == "Days")]
    assert row["sdcor"].item() == pytest.approx(float(post["Subject_corr"].mean()), rel=1e-12)


def test_three_columns_on_the_pytensor_graph_have_three_pairs():
    rng = np.random.default_rng(5)
    import pandas as pd

    n, J = 240, 12
    d = pd.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n), "g": np.repeat(np.arange(J), n // J).astype(str)})
    b = rng.normal(size=(J, 3)) * [1.0, 0.5, 0.5]
    codes = np.repeat(np.arange(J), n // J)
    d["y"] = 1 + d.x + b[codes, 0] + b[codes, 1] * d.x + b[codes, 2] * d.z + rng.normal(size=n)
    fit = Model("y ~ x + z + (1 + x + z | g)", d).fit(method="nuts", route="graph", sampler="pymc", **QUICK)
    corr = fit.posterior["g_corr"]
    assert corr.dims == ("chain", "draw", "g_pair")
    assert corr["g_pair"].values.tolist() == ["(Intercept),x", "(Intercept),z", "x,z"]
    R = naming.correlation_matrices(fit.posterior, "g", 3)
    np.testing.assert_allclose(np.diagonal(R, axis1=-2, axis2=-1), 1.0)
    assert np.isfinite(summary_without_warnings(fit.idata)["r_hat"].astype(float)).all()


def test_pairs_and_matrices_round_trip():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 5, 3, 3))
    S = A @ np.swapaxes(A, -1, -2)
    d = np.sqrt(np.diagonal(S, axis1=-2, axis2=-1))
    R = S / d[..., :, None] / d[..., None, :]
    np.testing.assert_allclose(naming.matrices_of(naming.pairs_of(R), 3), R, atol=1e-15)
    assert naming.pair_labels(["a", "b", "c"]) == ["a,b", "a,c", "b,c"]


def test_files_with_whole_matrices_load_as_pairs(kernel_fit, tmp_path):
    """A save of the old layout (whole matrices, dims Subject_effect × Subject_effect_) reads as today's."""
    post = kernel_fit.posterior
    old = post.drop_vars(["Subject_corr", "Subject_pair"])
    R = naming.correlation_matrices(post, "Subject", 2)
    old["Subject_corr"] = xr.DataArray(R, dims=("chain", "draw", "Subject_effect", "Subject_effect_"),
                                       coords={"Subject_effect_": ["(Intercept)", "Days"]})
    upgraded = naming.upgrade(old, ["Subject"], kernel_fit.spec.blocks)
    assert "Subject_effect_" not in upgraded.coords
    xr.testing.assert_allclose(upgraded["Subject_corr"], post["Subject_corr"])
    # and through a real file: save, rewrite the posterior in the old layout, load
    path = tmp_path / "fit.nc"
    kernel_fit.save(path)
    tree = xr.open_datatree(path, engine="h5netcdf")
    tree = tree.load()
    tree.close()
    names = [k for k in tree.children if tree[k].to_dataset().data_vars.get("Subject_corr") is not None]
    assert names, "the saved file should hold the posterior's Subject_corr somewhere"
    node = names[0]
    ds = tree[node].to_dataset()
    ds = ds.drop_vars(["Subject_corr", "Subject_pair"])
    ds["Subject_corr"] = xr.DataArray(R, dims=("chain", "draw", "Subject_effect", "Subject_effect_"),
                                      coords={"Subject_effect_": ["(Intercept)", "Days"]})
    tree[node] = xr.DataTree(ds)
    old_path = tmp_path / "old.nc"
    tree.to_netcdf(old_path, engine="h5netcdf")
    back = load(old_path)
    assert back.posterior["Subject_corr"].dims == ("chain", "draw", "Subject_pair")
    np.testing.assert_allclose(back.varcorr["sdcor"], kernel_fit.varcorr["sdcor"], rtol=1e-12)
