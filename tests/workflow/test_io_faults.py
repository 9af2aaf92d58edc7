"""Saves that fail part-way keep the previous save; load() checks a file's header before reading it.

A full disk is provoked for real in a subprocess by a limit on file size
(``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored: a write past it fails with ``EFBIG``, as a
write to a full disk fails with ``ENOSPC``).  Before this was fixed the ``.nc`` save
raised and then crashed the process (SIGSEGV, exit -11) and the ``.zarr`` save left the
previous save destroyed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

from bayeslmm import DataError, Model, Prior, load
from bayeslmm.io import SaveError, write_atomically

h5py = pytest.importorskip("h5py")

DYE = ("Yield ~ 1 + (1 | Batch)", "Dyestuff")


@pytest.fixture(scope="module")
def reml_fit():
    return Model(*DYE).fit(method="reml")


@pytest.fixture(scope="module")
def bayes_fit(sleep_model):
    priors = {"Subject": {"sd": Prior("HalfNormal", sigma=[40, 12])}}
    return sleep_model.fit(method="nuts", draws=100, tune=100, chains=2, random_seed=2, priors=priors,
                           progressbar=False, warn=False)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- a full disk -------------------------------------------------------------------------------------
FULL_DISK = """
    import resource, signal, sys
    from bayeslmm import Model, load
    from bayeslmm.io import SaveError

    path = sys.argv[1]
    fit = Model("Yield ~ 1 + (1 | Batch)", "Dyestuff").fit(method="reml")
    fit.save(path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # the save is about 8 kB
    try:
        fit.save(path)
    except SaveError as exc:
        print("SaveError", exc.errno, exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    print("reloaded", load(path).objective)
"""


@pytest.mark.parametrize("name", ["fit.nc", "fit.zarr"])
def test_a_save_on_a_full_disk_raises_and_keeps_the_previous_save(tmp_path, name):
    path = tmp_path / name
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FULL_DISK), str(path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stderr  # before: -11 (SIGSEGV) for .nc
    lines = result.stdout.splitlines()
    assert lines[0] == (f"SaveError {errno.EFBIG} could not save to {path}: File too large; the file system or a "
                        "limit on file size refuses files this large; save elsewhere (the previous save, if any, "
                        "is unchanged)")
    assert lines[1].startswith("reloaded ")  # the first save, intact: lme4's REML criterion 319.6543
    assert float(lines[1].split()[1]) == pytest.approx(319.6543, abs=1e-4)
    assert os.listdir(tmp_path) == [name] and "Traceback" not in result.stderr


def test_a_zarr_save_failing_midway_keeps_the_previous_one(reml_fit, tmp_path, monkeypatch):
    """The writer fails after writing part of the new store (ENOSPC): the old store is untouched."""
    path = tmp_path / "fit.zarr"
    reml_fit.save(path)
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    real = xr.DataTree.to_zarr

    def fail_midway(self, store, *args, **kwargs):
        real(self, store, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.DataTree, "to_zarr", fail_midway)
    with pytest.raises(SaveError, match="No space left on device; free disk space") as info:
        reml_fit.save(path)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    monkeypatch.undo()
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before and _leftovers(tmp_path) == []
    assert load(path).objective == reml_fit.objective


@pytest.mark.parametrize("name", ["fit.nc", "fit.zarr"])
def test_an_interrupted_save_leaves_no_temporary_and_the_old_save(reml_fit, tmp_path, monkeypatch, name):
    path = tmp_path / name
    reml_fit.save(path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.DataTree, "to_zarr" if name.endswith("zarr") else "to_netcdf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reml_fit.save(path)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == [] and load(path).objective == reml_fit.objective


def test_write_atomically_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(OSError):
        write_atomically(path, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(OSError(28, "full"))))
    assert path.read_text() == "old" and _leftovers(tmp_path) == []
    write_atomically(path, lambda tmp: tmp.write_text("new"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_a_save_into_a_folder_that_cannot_be_written_is_a_save_error(reml_fit, tmp_path, monkeypatch):
    real_open = os.open

    def refuse(p, *args, **kwargs):  # a read-only folder, also for root (who ignores permissions)
        if str(p).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(SaveError, match=r"could not save to .*fit\.nc: Permission denied; you may not write there"):
        reml_fit.save(tmp_path / "fit.nc")


# -- load checks the header first ---------------------------------------------------------------------
def test_load_refuses_a_large_non_bayeslmm_file_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "big.nc"
    xr.Dataset({"a": ("x", np.zeros(2_000_000))}).to_netcdf(path, engine="h5netcdf")  # 16 MB of data
    monkeypatch.setattr(xr, "load_datatree", lambda *a, **k: pytest.fail("read the whole file"))
    with pytest.raises(DataError, match=r"big\.nc: it is not a bayeslmm save \(no 'bayeslmm_format' mark\)"):
        load(path)
    store = tmp_path / "big.zarr"
    xr.Dataset({"a": ("x", np.zeros(1000))}).to_zarr(store, consolidated=False)
    with pytest.raises(DataError, match=r"big\.zarr: it is not a bayeslmm save"):
        load(store)


def test_load_of_the_command_lines_json_says_to_load_the_nc(reml_fit, tmp_path):
    path = tmp_path / "reml.json"
    path.write_text(json.dumps(reml_fit.to_dict()))
    with pytest.raises(DataError, match=r"reml\.json: it is a JSON file .* load the '\.nc' file saved beside it"):
        load(path)
    other = tmp_path / "fit.dat"
    other.write_text('  {"not": "a save"}')
    with pytest.raises(DataError, match=r"fit\.dat: it is a JSON file"):
        load(other)


def test_load_errors_of_the_environment_are_data_errors(reml_fit, tmp_path, monkeypatch):
    path = tmp_path / "fit.nc"
    reml_fit.save(path)
    monkeypatch.setattr(xr, "load_datatree", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(DataError, match=r"fit\.nc: not enough memory to read it"):
        load(path)
    monkeypatch.undo()
    import builtins

    real_open = builtins.open

    def refuse(p, *args, **kwargs):
        if str(p) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(DataError, match=r"fit\.nc: permission denied \(Permission denied\); make it readable"):
        load(path)


def _edit_record(path, edit) -> None:
    with h5py.File(path, "r+") as fh:
        record = json.loads(fh.attrs["bayeslmm_record"])
        edit(record)
        fh.attrs["bayeslmm_record"] = json.dumps(record)


def test_a_deeply_nested_record_is_a_data_error_not_a_recursion_error(reml_fit, tmp_path):
    path = tmp_path / "deep.nc"
    reml_fit.save(path)
    with h5py.File(path, "r+") as fh:
        fh.attrs["bayeslmm_record"] = "[" * 200_000 + "]" * 200_000
    with pytest.raises(DataError, match=r"deep\.nc: its bayeslmm record is not valid JSON"):
        load(path)


# -- priors are checked on load as a fit checks them ----------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda r: r["priors"]["sigma"].update(family="Normal"),
     r"prior for sigma: unknown or unsuitable distribution 'Normal'"),
    (lambda r: r["priors"]["beta"][1]["params"].update(sigma=-1.0),
     r"prior for coefficient 'Days': parameter sigma=-1.0 must be positive"),
    (lambda r: r["priors"]["blocks"][0]["sd"]["params"]["sigma"].update(ndarray=[40.0, 12.0, 3.0]),
     r"prior for Subject sd: parameter sigma has shape \(3,\), not \(2,\)"),
    (lambda r: r["priors"]["blocks"][0].update(eta=0.0), r"prior for block 'Subject': LKJ eta must be a positive number, got 0.0"),
    (lambda r: r["priors"]["beta"][0].update(family="__class__"),
     r"prior for coefficient '\(Intercept\)': unknown or unsuitable distribution '__class__'"),
    (lambda r: r["priors"]["beta"].pop(), r"1 fixed-effect and 1 block priors stored, the model has 2 and 1"),
])
def test_bad_stored_priors_are_refused_naming_the_prior(bayes_fit, tmp_path, edit, message):
    path = tmp_path / "fit.nc"
    bayes_fit.save(path)
    assert load(path).priors.sigma == bayes_fit.priors.sigma  # unaltered, it loads
    _edit_record(path, edit)
    with pytest.raises(DataError, match=r"fit\.nc: the stored priors are not ones a fit accepts: " + message):
        load(path)
