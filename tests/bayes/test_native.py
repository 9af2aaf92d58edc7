"""The kernels' C callbacks (bayeslmm.bayes.native): the same log-density as the kernels, the same draws as
the Python route, and the Python route still there when a callback cannot be built."""

import gc
import warnings

import arviz as az
import numpy as np
import pytest
from numba import types

from bayeslmm import Model
from bayeslmm.bayes import compiled, native
from bayeslmm.bayes.fit import compiled_model, kernel_model, one_blas_thread, sample_kernel
from bayeslmm.bayes.priors import resolve_priors
from test_blocked import PRIORS, STRUCTURES, _crossed_data
from test_partial import _setup as partial_setup
from test_structured import _setup as structured_setup


def _one_factor():
    m = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    return kernel_model(m.spec, m.crossprods, resolve_priors(m.spec, None))[1]


def _compiled(route, formula):
    m = Model(formula, _crossed_data())
    return compiled_model(m.spec, m.crossprods, resolve_priors(m.spec, PRIORS), route=route)[1]


KERNELS = {
    "one-factor": _one_factor,
    "blocked": lambda: _compiled("blocked", STRUCTURES["crossed_maximal"]),
    "partial": lambda: partial_setup(STRUCTURES["crossed_maximal"])[2],
    "structured": lambda: structured_setup("ar1_gaps_varident")[2],
}


@pytest.fixture(scope="module", params=list(KERNELS))
def kd(request):
    return KERNELS[request.param]()


def test_the_callback_gives_the_kernels_value_and_gradient(kd):
    callback, table, _kept = native.callback_for(kd)
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = kd.initial_point(rng) + rng.normal(scale=0.5, size=kd.ndim)
        code, lp, grad = native.call(callback, table, x)
        want_lp, want_grad = kd.logp_and_grad(x)
        assert code == 0 and np.isfinite(lp)
        # the same machine code up to inlining: numba compiles the callback and the kernel separately, and
        # LLVM may order a sum differently in each (a fresh clone differed in the last bits, 1e-14)
        assert lp == pytest.approx(want_lp, rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-11, atol=1e-11 * np.abs(want_grad).max())


def test_a_rejected_point_is_a_positive_code_with_minus_infinity(kd):
    """σ and the sds e^800 overflow: the kernel says −inf, the callback says so too and returns nutpie's code 4."""
    callback, table, _kept = native.callback_for(kd)
    x = np.full(kd.ndim, 800.0)
    assert kd.logp_and_grad(x)[0] == -np.inf
    code, lp, grad = native.call(callback, table, x)
    assert code == native.NONFINITE_LOGP and lp == -np.inf
    assert np.all(np.isfinite(grad))


def test_a_point_of_the_wrong_size_stops_the_sampler(kd):
    callback, table, _kept = native.callback_for(kd)
    code, _, _ = native.call(callback, table, np.zeros(kd.ndim + 1))
    assert code == native.WRONG_SIZE < 0


def test_arguments_a_table_cannot_describe_are_refused():
    kd = _one_factor()
    _, args = kd.compiled()
    for bad, why in ((np.zeros(3, dtype=bool), "bool, 1 dimensions"), (np.zeros((1,) * 5), "float64, 5 dimensions"),
                     ("text", "<U4, 0 dimensions"), (np.zeros(2, dtype=complex), "complex128, 1 dimensions")):
        with pytest.raises(native.NativeUnavailable, match=f"argument 2 \\({why}\\)"):
            native.argument_table(args[:2] + (bad,) + args[3:], kd.ndim)


def test_the_table_describes_each_argument():
    kd = _one_factor()
    _, args = kd.compiled()
    G = np.asfortranarray(args[0])
    table, kept, codes = native.argument_table((G,) + args[1:], kd.ndim)
    assert codes == ("f3", "f3", "f2", "f2", "f1", "f0", "i0", "f2", "f1", "f1", "i0", "f1", "i0", "f2", "f0", "b0")
    assert list(table[0, :2]) == [kd.ndim, len(args)]
    assert kept[0].flags.c_contiguous and table[1, 0] == kept[0].ctypes.data   # copied, C order
    np.testing.assert_array_equal(kept[0], args[0])
    assert list(table[1, 1:5]) == [3, *args[0].shape] and list(table[7, 1:3]) == [0, 0]
    assert kept[6][0] == kd.n and kept[15][0] == kd.correlated


def test_the_callback_source_reads_each_argument_by_its_code():
    source = native.callback_source("pkg.mod", "f", ("f2", "i1", "f0", "i0", "b0"))
    assert "from pkg.mod import f as kernel_function" in source
    assert "carray(address_pointer(t[1, 0], np.float64), (t[1, 2], t[1, 3],))," in source
    assert "carray(address_pointer(t[2, 0], np.int64), (t[2, 2],))," in source
    assert "carray(address_pointer(t[3, 0], np.float64), (1,))[0]," in source
    assert "carray(address_pointer(t[5, 0], np.uint8), (1,))[0] != 0," in source


def _sample(kd, seed=5, draws=60):
    with one_blas_thread():  # as the fit samples the compiled kernels: BLAS threads would contend with the chains
        return sample_kernel(kd, draws, 200, 2, 2, seed, 0.8, 10, False)["posterior"]["x"].to_numpy()


def _no_callback(*_args, **_kwargs):
    raise native.NativeUnavailable("switched off by the test")


def test_the_native_and_python_routes_sample_the_same_posterior(kd, monkeypatch):
    """Within Monte Carlo error: the two compiled copies agree to the last bits only (see above), and NUTS's
    trajectories amplify a last-bit difference, so the draws themselves are not compared."""
    built = []
    real = native.native_model
    monkeypatch.setattr(native, "native_model", lambda *a: built.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the kernel is sampled through Python")
        fast = _sample(kd, draws=500)
    assert built == [1]
    monkeypatch.setattr(native, "native_model", _no_callback)
    with pytest.warns(RuntimeWarning, match=r"through Python calls \(slower\).*switched off by the test"):
        slow = _sample(kd, seed=6, draws=500)
    assert fast.shape == (2, 500, kd.ndim) and np.isfinite(fast).all()
    mcse = [np.array([float(az.mcse(d[..., i])) for i in range(kd.ndim)]) for d in (fast, slow)]
    z = (fast.mean((0, 1)) - slow.mean((0, 1))) / np.hypot(*mcse)
    assert np.abs(z).max() < 5.0


def test_the_model_keeps_the_arrays_its_table_points_at():
    """The kernel data may go once nutpie has the model: the model holds every array the table points at."""
    kd = _one_factor()
    want = _sample(kd, seed=9)
    model = native.native_model(_one_factor(), lambda seed: kd.initial_point(np.random.default_rng([9, seed])))
    gc.collect()
    addresses = set(model.table[1:, 0])
    assert addresses == {a.ctypes.data for a in model.kept}
    import nutpie
    got = nutpie.sample(model, draws=60, tune=200, chains=2, cores=2, seed=9, progress_bar=False, target_accept=0.8,
                        maxdepth=10)["posterior"]["x"].to_numpy()
    np.testing.assert_array_equal(got, want)


def test_a_fit_samples_when_nutpies_internals_moved(monkeypatch):
    """Model.fit through the fallback: a warning, then the usual fit."""
    monkeypatch.setattr(native, "native_model", _no_callback)
    with pytest.warns(RuntimeWarning, match="through Python calls"):
        fit = Model("Reaction ~ Days + (1 | Subject)", "sleepstudy").fit(
            method="nuts", chains=2, draws=50, tune=50, random_seed=2, progressbar=False, warn=False)
    assert fit.route == "one-factor" and np.isfinite(fit.posterior["sigma"].to_numpy()).all()


def _twice(dim, x_, grad_, logp_, user_data):
    return 0


def test_the_callbacks_cache_is_named_by_the_files_they_carry(tmp_path, monkeypatch):
    """An edit to a kernel's file must compile its callback again: numba itself checks only the callback's file."""
    monkeypatch.setattr(compiled, "private_cache_dir", lambda kind: str(tmp_path / "cache"))
    source = tmp_path / "kernel_source.py"
    signature = types.int64(types.uint64, types.CPointer(types.float64), types.CPointer(types.float64),
                            types.CPointer(types.float64), types.voidptr)
    folders = []
    for text in ("a = 1\n", "a = 2\n", "a = 1\n"):
        source.write_text(text)
        compiled.cached_cfunc(signature, [str(source)])(_twice)
        folders.append({p.name for p in (tmp_path / "cache").iterdir()})
    assert len(folders[0]) == 1 and len(folders[1]) == 2 and folders[2] == folders[1]
    for folder in (tmp_path / "cache").iterdir():
        assert any(folder.rglob("*.nbi")), folder
