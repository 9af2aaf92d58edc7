"""Save a fit to one file and load it back, without pickling.

``fit.save("fit.nc")`` writes a netCDF-4 file (through h5netcdf), ``fit.save("fit.zarr")``
a zarr folder; :func:`load` reads either back as the same kind of fit.  Nothing is
pickled: a file holds arrays and one JSON record, so it opens in any netCDF or zarr
reader and never runs code when loaded.

What a file holds
-----------------
* the root attributes ``bayeslmm_format`` (``"bayeslmm-fit"``), ``bayeslmm_format_version``
  and ``bayeslmm_record``: a JSON record with the bayeslmm version, the kind of fit, the
  formula and the options ``build_spec`` was called with (``missing``,
  ``rank_deficient``), the notes, the data's name, and a description of every data
  column;
* the group ``bayeslmm_data``: the rows and columns the model used (``spec.data``),
  one variable per column — numbers as they are, categoricals as codes plus their
  categories in order, strings as strings — and the row index;
* for a Bayesian fit, every group of its DataTree (``posterior``, ``sample_stats``,
  ``observed_data``, ``constant_data``, ``log_likelihood``, ...), and in the record the
  priors (every family and parameter), the block names, parameterisation, sampler,
  seed and timings;
* for a REML / ML fit, in the record: the method, θ, the objective and the
  optimizer's record.

On loading, the :class:`~bayeslmm.spec.ModelSpec` is rebuilt from the stored data and
formula by :func:`~bayeslmm.formula.build_spec` and checked against what was saved
(names, levels, and for a Bayesian fit the stored response and design); a REML / ML
fit's estimates are recomputed at the stored θ (the factorisation is deterministic, so
every number equals the saved fit's), and the deviance there must equal the stored
objective.  JSON writes floats with Python's shortest round-trip repr, so θ and the
objective come back bit for bit.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import BayesLMMError, DataError

#: the value of the root attribute ``bayeslmm_format`` that marks a bayeslmm save
FORMAT_NAME = "bayeslmm-fit"
#: incremented whenever what a file holds changes; files of a higher version are refused
FORMAT_VERSION = 1
DATA_GROUP = "bayeslmm_data"
_ROW_DIM = "row"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: the attribute that marks string ("U") and object ("O") arrays, which netCDF reads back as object
_DTYPE_ATTR = "bayeslmm_dtype"
_NONE_SUFFIX = "__bayeslmm_none"


class SaveError(OSError):
    """A save could not be completed (disk full, read-only folder, no permission, no memory).

    An ``OSError`` with the cause's ``errno``; its message names the path and what to do.
    The previous save at the path, if any, is left unchanged and no temporary file stays.
    """

    def __init__(self, code: int, message: str, filename: str | None = None):
        super().__init__(code, message)
        self.filename = filename

    def __str__(self) -> str:
        return self.strerror


# -- public API -----------------------------------------------------------------------------
def save_fit(fit, path) -> Path:
    """Write ``fit`` (a ``FreqFit`` or a ``BayesFit``) to ``path``; see the module docstring.

    ``path`` ending in ``.zarr`` writes a zarr folder; any other name a single netCDF-4
    file (``.nc`` is the usual suffix).  The new save is written under a temporary name
    in the same folder and renamed into place once complete, so an existing save is
    replaced only then.  A save that fails part-way (disk full, read-only folder, no
    permission) raises :class:`SaveError` (an ``OSError``), removes what it wrote and
    leaves the previous save unchanged.  Returns the path written.
    """
    from .bayes.results import BayesFit
    from .reml.results import FreqFit

    path = _as_path(path, "path")
    if not isinstance(fit, (BayesFit, FreqFit)):
        raise BayesLMMError(f"save expects a FreqFit or a BayesFit, got {type(fit).__name__}")
    try:
        tree = _fit_tree(fit)
        if _is_zarr_name(path):
            _write_zarr(tree, path)
        else:
            _write_netcdf(tree, path)
    except RecursionError as exc:
        raise DataError(f"cannot save to {path}: the fit holds values nested too deeply to store as JSON "
                        "(in its attributes or extra fields); flatten them first") from exc
    except MemoryError as exc:
        raise SaveError(errno.ENOMEM, f"could not save to {path}: not enough memory to assemble the file; free "
                        "memory and save again (the previous save, if any, is unchanged)", str(path)) from exc
    except SaveError:
        raise
    except OSError as exc:
        raise _save_error(path, exc) from exc
    return path


def _fit_tree(fit):
    """The DataTree a save writes: the fit's groups, its data and the JSON record."""
    from .bayes.results import BayesFit

    if isinstance(fit, BayesFit):
        record, groups = _bayes_record(fit), _idata_groups(fit.idata)
    else:
        record, groups = _freq_record(fit), {}
    data_ds, record["data"] = encode_frame(fit.spec)
    groups[DATA_GROUP] = data_ds
    return _make_tree(groups, record)


def load(path):
    """Read a fit written by ``fit.save(path)``: a ``FreqFit`` or a ``BayesFit``.

    Raises
    ------
    DataError
        The path does not exist or cannot be read, is not a bayeslmm save (checked from
        the file's header and root attributes, before anything else is read), was written
        by a newer bayeslmm (a higher format version), its data do not rebuild the saved
        model, its priors are not ones a fit accepts, or it does not fit in memory.
    """
    path = _as_path(path, "path")
    attrs, engine = _read_root_attrs(path)
    record = _read_record(attrs, path)
    tree = _read_tree(path, engine)
    try:
        groups = {name: _decode_dataset(tree[name].to_dataset()) for name in tree.children}
        if DATA_GROUP not in groups:
            raise DataError(f"{path}: the file has no {DATA_GROUP!r} group; it is not a complete bayeslmm save")
        data = decode_frame(groups.pop(DATA_GROUP), record["data"], path)
        spec = _rebuild_spec(record, data, path)
        if record["kind"] == "BayesFit":
            return _load_bayes(record, spec, groups, path)
        return _load_freq(record, spec, path)
    except BayesLMMError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, np.linalg.LinAlgError, RecursionError) as exc:
        raise DataError(f"cannot load {path}: the save is incomplete or damaged ({type(exc).__name__}: {exc})") from exc
    except MemoryError as exc:
        raise DataError(f"cannot load {path}: not enough memory to rebuild the fit; free memory or load it on a "
                        "machine with more") from exc


# -- paths and files --------------------------------------------------------------------------
def _as_path(path, argument: str) -> Path:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise BayesLMMError(f"{argument} must be a file path (str or pathlib.Path), got {type(path).__name__}")
    return Path(os.fspath(path)).expanduser()


def _is_zarr_name(path: Path) -> bool:
    return path.suffix.lower() == ".zarr"


def _writable_parent(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DataError(f"cannot save to {path}: the folder {parent} does not exist; create it first")


def _write_netcdf(tree, path: Path) -> None:
    """Assemble the file in memory, then write it under a temporary name and rename it.

    HDF5 writing straight to a full disk raises, and then crashes the process when it
    closes the half-written file (h5py/h5netcdf); in memory HDF5 cannot fail that way,
    and the bytes go to disk by plain Python I/O, which fails cleanly.  The peak memory
    is the fit plus one copy of the file.
    """
    _writable_parent(path)
    if path.is_dir():
        raise DataError(f"cannot save to {path}: it is a folder; give a file name such as {path / 'fit.nc'}")
    try:
        import h5py  # noqa: F401  (h5netcdf writes through h5py)
    except ImportError as exc:
        raise BayesLMMError(
            f"saving {path} as netCDF needs the h5py package (h5netcdf writes through it): "
            "pip install h5py, or save to a zarr folder (a path ending in '.zarr')"
        ) from exc
    content = tree.to_netcdf(None, engine="h5netcdf", mode="w")
    write_atomically(path, lambda tmp: tmp.write_bytes(content))


def _write_zarr(tree, path: Path) -> None:
    """Write a complete zarr folder under a temporary name, then swap it in by renames.

    The previous save stays in place, untouched, until the new one is complete; only
    then is it renamed aside, the new folder renamed to ``path``, and the old removed.
    """
    _writable_parent(path)
    if path.exists() and not (path.is_dir() and _looks_like_zarr(path)):
        raise DataError(f"cannot save to {path}: something that is not a zarr folder is already there; "
                        "remove it or choose another name")
    tmp = _temp_name(path, "folder")
    try:
        with warnings.catch_warnings():
            # zarr 3 warns that consolidated metadata is not part of its specification yet
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            tree.to_zarr(tmp, mode="w", consolidated=True)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomically(path, write) -> None:
    """Call ``write(tmp)`` on a fresh temporary path beside ``path``, then rename it to ``path``.

    ``path`` is thus either left as it was or replaced by a complete file, never
    half-written; on any failure or interrupt the temporary file is removed and the
    exception raised again.  The file gets the usual permissions (``0o666`` less the umask).
    """
    path = Path(path)
    tmp = _temp_name(path, "file")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_name(path: Path, kind: str) -> Path:
    """A fresh file or folder beside ``path`` (same folder, so the final rename stays on one file system).

    Made with ``os.open``/``os.mkdir`` rather than ``tempfile``, whose 0o600/0o700
    modes the renamed save would keep.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            if kind == "file":
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            else:
                os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def _swap_in(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is renamed aside first and removed last."""
    if not path.exists():
        os.rename(new, path)
        return
    old = _temp_name(path, "folder")
    os.rmdir(old)  # only the fresh name is wanted: rename needs it free
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)  # put the previous save back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_error(path: Path, exc: OSError) -> "SaveError":
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free space within your disk quota",
            errno.EFBIG: "the file system or a limit on file size refuses files this large; save elsewhere",
            errno.EROFS: "the file system is read-only; save elsewhere",
            errno.EACCES: "you may not write there; save elsewhere or change the folder's permissions",
            errno.EPERM: "you may not write there; save elsewhere or change the folder's permissions",
            }.get(exc.errno, "check the folder and save again")
    return SaveError(exc.errno or errno.EIO, f"could not save to {path}: {reason}; {hint} (the previous save, "
                     "if any, is unchanged)", str(path))


def _looks_like_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs"))


def _read_root_attrs(path: Path) -> tuple[dict, str]:
    """The root attributes of a save and the engine that reads it, from the header alone.

    Only the first bytes of a file (the HDF5 signature, then the root attributes) or a
    zarr folder's root metadata are read, so a large file that is not a save is refused
    at once.
    """
    try:
        if not path.exists():
            raise DataError(f"cannot load {path}: no such file or folder")
        if path.is_dir():
            return _zarr_root_attrs(path), "zarr"
        with open(path, "rb") as fh:
            head = fh.read(len(_HDF5_SIGNATURE))
        if head != _HDF5_SIGNATURE:
            raise DataError(_not_a_save(path, head))
        return _hdf5_root_attrs(path), "h5netcdf"
    except PermissionError as exc:
        raise DataError(f"cannot load {path}: permission denied ({exc.strerror}); make it readable or copy it "
                        "somewhere you can read") from exc
    except OSError as exc:
        raise DataError(f"cannot load {path}: it could not be read ({exc.strerror or exc})") from exc


def _not_a_save(path: Path, head: bytes) -> str:
    what = "it is not a netCDF-4 file"
    if path.suffix.lower() == ".json" or head.lstrip()[:1] in (b"{", b"["):
        what = ("it is a JSON file (the command line's reml.json / nuts.json hold a fit's numbers, not the fit); "
                "load the '.nc' file saved beside it")
    return f"cannot load {path}: {what}, so not a bayeslmm save (fit.save writes a '.nc' file or a '.zarr' folder)"


def _hdf5_root_attrs(path: Path) -> dict:
    try:
        import h5py
    except ImportError as exc:
        raise BayesLMMError(f"loading {path} needs the h5py package: pip install h5py") from exc
    keys = ("bayeslmm_format", "bayeslmm_format_version", "bayeslmm_record")
    try:
        with h5py.File(path, "r") as fh:
            return {k: _attr_value(fh.attrs[k]) for k in keys if k in fh.attrs}
    except OSError:
        raise
    except Exception as exc:  # h5py raises its own kinds for a damaged header
        raise DataError(f"cannot load {path}: its header could not be read ({type(exc).__name__}: {exc})") from exc


def _zarr_root_attrs(path: Path) -> dict:
    for name in ("zarr.json", ".zattrs"):  # zarr 3, zarr 2
        meta = path / name
        if meta.is_file():
            try:
                doc = json.loads(meta.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise DataError(f"cannot load {path}: its {name} is not valid JSON ({exc})") from exc
            attrs = doc.get("attributes", {}) if name == "zarr.json" and isinstance(doc, dict) else doc
            return attrs if isinstance(attrs, dict) else {}
    raise DataError(f"cannot load {path}: the folder is not a zarr store, so not a bayeslmm save "
                    "(fit.save writes a '.nc' file or a '.zarr' folder)")


def _attr_value(value):
    """An HDF5 attribute as a Python value: bytes as text, a one-element array as its element."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.ravel()[0]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value


def _read_tree(path: Path, engine: str):
    import xarray as xr

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            return xr.load_datatree(path, engine=engine)
    except MemoryError as exc:
        raise DataError(f"cannot load {path}: not enough memory to read it; free memory or load it on a machine "
                        "with more") from exc
    except Exception as exc:  # h5py, h5netcdf, zarr and xarray each raise their own kinds
        raise DataError(f"cannot load {path}: it could not be read as a bayeslmm save "
                        f"({type(exc).__name__}: {exc})") from exc


def _read_record(attrs: dict, path: Path) -> dict:
    if attrs.get("bayeslmm_format") != FORMAT_NAME or "bayeslmm_record" not in attrs:
        raise DataError(f"cannot load {path}: it is not a bayeslmm save (no 'bayeslmm_format' mark); "
                        "only files written by fit.save can be loaded")
    try:
        version = int(attrs["bayeslmm_format_version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"cannot load {path}: its format version is missing or unreadable") from exc
    if version > FORMAT_VERSION:
        raise DataError(
            f"cannot load {path}: it was saved in bayeslmm file format {version}, newer than this "
            f"bayeslmm reads (up to {FORMAT_VERSION}); upgrade bayeslmm to load it"
        )
    if version < 1:
        raise DataError(f"cannot load {path}: unknown format version {version}")
    try:
        record = json.loads(attrs["bayeslmm_record"])
    except (TypeError, ValueError, RecursionError) as exc:
        raise DataError(f"cannot load {path}: its bayeslmm record is not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("kind") not in ("BayesFit", "FreqFit"):
        kind = record.get("kind") if isinstance(record, dict) else None
        raise DataError(f"cannot load {path}: unknown kind of fit {kind!r}")
    return record


def _make_tree(groups: dict, record: dict):
    import xarray as xr

    from . import __version__

    record = {"format_version": FORMAT_VERSION, "bayeslmm_version": __version__, **record}
    root = xr.Dataset(attrs={"bayeslmm_format": FORMAT_NAME, "bayeslmm_format_version": FORMAT_VERSION,
                             "bayeslmm_record": json.dumps(record, allow_nan=True)})
    return xr.DataTree.from_dict({"/": root, **{f"/{k}": _encode_dataset(v, k) for k, v in groups.items()}})


# -- datasets with string and object arrays ----------------------------------------------------
def _encode_dataset(ds, group: str):
    """String and object arrays in a form netCDF and zarr hold, marked so they come back exactly.

    netCDF reads every string array back as ``object``; the attribute ``bayeslmm_dtype``
    (``"U"`` or ``"O"``) says which it was.  Object arrays (nutpie's divergence
    messages) may have gaps (``None`` or NaN): those are marked in a companion int8 variable.
    """
    import xarray as xr

    ds = ds.copy()
    for name in list(ds.variables):
        var = ds[name].variable
        if var.dtype.kind not in "OU":
            continue
        if _DTYPE_ATTR in var.attrs:
            raise DataError(f"cannot save the variable {name!r} of the {group!r} group: its attribute "
                            f"{_DTYPE_ATTR!r} is reserved for save")
        attrs = {**var.attrs, _DTYPE_ATTR: var.dtype.kind}
        is_none = None
        if var.dtype.kind == "O":
            flat = var.values.ravel()
            gaps = np.array([_gap_code(v) for v in flat], dtype=np.int8)
            bad = [v for v, c in zip(flat, gaps) if c == 0 and not isinstance(v, str)]
            if bad:
                raise DataError(f"cannot save the variable {name!r} of the {group!r} group: it holds "
                                f"{type(bad[0]).__name__} objects ({bad[0]!r}); only numbers and strings "
                                "(with None or NaN for gaps) can be stored")
            is_none = gaps.reshape(var.shape)
            strings = np.array(["" if c else v for v, c in zip(flat, gaps)], dtype=str).reshape(var.shape)
        else:
            strings = var.values
        new = xr.Variable(var.dims, strings, attrs)
        if name in ds.coords:
            if is_none is not None and is_none.any():
                raise DataError(f"cannot save the coordinate {name!r} of the {group!r} group: it holds None")
            ds = ds.assign_coords({name: new})
        else:
            ds[name] = new
            if is_none is not None and is_none.any():
                ds[name + _NONE_SUFFIX] = xr.Variable(var.dims, is_none)
    return ds


def _gap_code(v) -> int:
    """0 for a value, 1 for None, 2 for a float NaN (xarray turns None into NaN in object arrays)."""
    if v is None:
        return 1
    if isinstance(v, float) and np.isnan(v):
        return 2
    return 0


def _decode_dataset(ds):
    """Undo :func:`_encode_dataset`."""
    import xarray as xr

    for name in list(ds.variables):
        if name not in ds.variables or _DTYPE_ATTR not in ds[name].attrs:
            continue
        var = ds[name].variable
        kind = var.attrs[_DTYPE_ATTR]
        strings = [str(v) for v in np.asarray(var.values).ravel()]
        if kind == "U":
            values = np.array(strings, dtype=str).reshape(var.shape)
        else:
            values = np.empty(len(strings), dtype=object)
            values[:] = strings
            values = values.reshape(var.shape)
            mask_name = name + _NONE_SUFFIX
            if mask_name in ds.variables:
                gaps = np.asarray(ds[mask_name].values)
                values[gaps == 1] = None
                values[gaps == 2] = np.nan
                ds = ds.drop_vars(mask_name)
        attrs = {k: v for k, v in var.attrs.items() if k != _DTYPE_ATTR}
        new = xr.Variable(var.dims, values, attrs)
        if name in ds.coords:
            ds = ds.assign_coords({name: new})
        else:
            ds[name] = new
    return ds


def _idata_groups(idata) -> dict:
    out = {}
    for name in idata.children:
        if name == DATA_GROUP:
            raise DataError(f"the fit's DataTree has a group named {DATA_GROUP!r}, which save needs for itself")
        out[name] = idata[name].to_dataset()
    return out


# -- the model's data --------------------------------------------------------------------------
def encode_frame(spec) -> tuple:
    """``spec.data`` as an xarray Dataset plus a JSON description of each column and the index."""
    import xarray as xr

    data = spec.data
    if data is None:
        raise DataError(
            "this fit cannot be saved: its model keeps no rows (the cross-products were computed out of "
            "memory), and a saved fit is rebuilt from its data. Fit a model built from a pandas DataFrame"
        )
    variables, columns = {}, []
    for k, name in enumerate(data.columns):
        var = f"c{k}"
        meta = _encode_values(data[name], var, f"column {name!r}", variables)
        columns.append({"name": _json_name(name, "a column"), **meta})
    index = data.index
    if isinstance(index, pd.RangeIndex):
        index_meta = {"range": [int(index.start), int(index.stop), int(index.step)],
                      "names": [_json_name(index.name, "the index")]}
    else:
        levels = []
        for k in range(index.nlevels):
            levels.append(_encode_values(pd.Series(index.get_level_values(k)), f"i{k}",
                                         f"level {k} of the row index", variables))
        index_meta = {"levels": levels, "names": [_json_name(n, "the index") for n in index.names]}
    ds = xr.Dataset({k: v for k, v in variables.items()})
    return ds, {"columns": columns, "index": index_meta, "n_rows": len(data)}


def _json_name(name, what: str):
    if name is None or isinstance(name, (str, int, float, bool)):
        return name
    raise DataError(f"cannot save {what} named {name!r}: save keeps names that are strings or numbers; "
                    "rename it before fitting")


def _encode_values(s: pd.Series, var: str, what: str, variables: dict) -> dict:
    """Store one column as ``variables[var]`` (dim ``row``); return what restores it."""
    import xarray as xr

    dtype = s.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        cats = pd.Series(dtype.categories)
        arr, cat_meta = _plain_array(cats, f"the categories of {what}")
        variables[f"{var}_categories"] = xr.Variable(f"{var}_cat", arr)
        codes = s.cat.codes.to_numpy()
        variables[var] = xr.Variable(_ROW_DIM, codes)
        return {"kind": "categorical", "ordered": bool(dtype.ordered), "categories": cat_meta,
                "codes_dtype": str(codes.dtype)}
    arr, meta = _plain_array(s, what)
    variables[var] = xr.Variable(_ROW_DIM, arr)
    return {"kind": "plain", **meta}


def _plain_array(s: pd.Series, what: str) -> tuple[np.ndarray, dict]:
    """A numpy array netCDF and zarr can hold, and how to get ``s``'s values and dtype back."""
    dtype = s.dtype
    name = str(dtype)
    if isinstance(dtype, np.dtype):
        if dtype.kind in "biuf":
            return s.to_numpy(), {"store": "native", "dtype": name}
        if dtype.kind in "mM":
            return s.to_numpy().view("i8"), {"store": "i8", "dtype": name}
        if dtype == object:
            inferred = pd.api.types.infer_dtype(s, skipna=False)
            if inferred in ("string", "empty"):
                return np.array(s.tolist(), dtype=str), {"store": "string", "dtype": "object"}
            if inferred in ("integer", "floating", "boolean", "mixed-integer-float"):
                return np.asarray(s.tolist()), {"store": "native-object", "dtype": "object"}
            raise DataError(
                f"cannot save {what}: it holds values of mixed or unsupported types ({inferred}); convert "
                "it to strings, numbers or a pandas Categorical before fitting"
            )
    if s.isna().any():
        raise DataError(f"cannot save {what}: it holds missing values in a {name} column")
    if isinstance(dtype, pd.StringDtype):
        return np.array(s.tolist(), dtype=str), {"store": "string", "dtype": name,
                                                 "storage": dtype.storage, "na_is_nan": dtype.na_value is not pd.NA}
    if pd.api.types.is_bool_dtype(dtype):
        return s.to_numpy(dtype=bool), {"store": "extension", "dtype": name}
    if pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_float_dtype(dtype):
        return s.to_numpy(dtype=np.dtype(dtype.numpy_dtype)), {"store": "extension", "dtype": name}
    raise DataError(f"cannot save {what}: its dtype {name} is not one save can store (numbers, booleans, "
                    "strings, categoricals, dates); convert it before fitting")


def _restore_values(arr: np.ndarray, meta: dict):
    """The values (a numpy array or pandas ExtensionArray) of a column stored by :func:`_plain_array`."""
    store, dtype = meta["store"], meta["dtype"]
    if store == "native":
        return np.asarray(arr).astype(np.dtype(dtype), copy=False)
    if store == "i8":
        return np.asarray(arr, dtype="i8").view(np.dtype(dtype))
    if store == "native-object":
        return np.asarray(arr).astype(object)
    if store == "string":
        values = [str(v) for v in np.asarray(arr).ravel()]
        if dtype == "object":
            out = np.empty(len(values), dtype=object)
            out[:] = values
            return out
        sdtype = pd.StringDtype(storage=meta["storage"], na_value=np.nan if meta["na_is_nan"] else pd.NA)
        return pd.array(values, dtype=sdtype)
    if store == "extension":
        return pd.array(np.asarray(arr), dtype=dtype)
    raise DataError(f"unknown storage {store!r} for a data column")


def _decode_column(ds, var: str, meta: dict, path: Path):
    if var not in ds:
        raise DataError(f"{path}: the data group lacks the variable {var!r}; the file is incomplete")
    if meta["kind"] == "categorical":
        cats = _restore_values(ds[f"{var}_categories"].values, meta["categories"])
        codes = np.asarray(ds[var].values).astype(np.dtype(meta["codes_dtype"]), copy=False)
        dtype = pd.CategoricalDtype(pd.Index(cats), ordered=meta["ordered"])
        return pd.Categorical.from_codes(codes, dtype=dtype)
    return _restore_values(ds[var].values, meta)


def decode_frame(ds, meta: dict, path: Path) -> pd.DataFrame:
    imeta = meta["index"]
    if "range" in imeta:
        index = pd.RangeIndex(*imeta["range"], name=imeta["names"][0])
    else:
        levels = [_decode_column(ds, f"i{k}", m, path) for k, m in enumerate(imeta["levels"])]
        if len(levels) == 1:
            index = pd.Index(levels[0], name=imeta["names"][0])
        else:
            index = pd.MultiIndex.from_arrays(levels, names=imeta["names"])
    cols = {}
    for k, cmeta in enumerate(meta["columns"]):
        values = _decode_column(ds, f"c{k}", cmeta, path)
        # an object array must stay object (pandas would infer its string dtype)
        dtype = object if isinstance(values, np.ndarray) and values.dtype == object else None
        cols[cmeta["name"]] = pd.Series(values, index=index, dtype=dtype, copy=False)
    frame = pd.DataFrame(cols, index=index)
    if len(frame) != meta["n_rows"]:
        raise DataError(f"{path}: the stored data have {len(frame)} rows, the record says {meta['n_rows']}")
    return frame


# -- the spec ---------------------------------------------------------------------------------------
def _spec_record(spec) -> dict:
    return {
        "formula": spec.formula,
        "missing": spec.missing,
        "rank_deficient": spec.rank_deficient,
        "notes": list(spec.notes),
        "fixed_names": list(spec.fixed_names),
        "blocks": [{"group": b.group, "columns": list(b.columns), "n_levels": b.n_levels,
                    "correlated": bool(b.correlated)} for b in spec.blocks],
        "n_obs": spec.n_obs,
    }


def _rebuild_spec(record: dict, data: pd.DataFrame, path: Path):
    from .formula import build_spec

    saved = record["spec"]
    try:
        with warnings.catch_warnings():
            # rank-deficiency and dropped-row warnings were given when the fit was made;
            # the notes that record them are restored below
            warnings.simplefilter("ignore")
            spec = build_spec(saved["formula"], data, missing=saved["missing"],
                              rank_deficient=saved["rank_deficient"])
    except BayesLMMError as exc:
        raise DataError(f"{path}: the stored data and formula no longer build the saved model ({exc})") from exc
    spec = dataclasses.replace(spec, notes=tuple(saved["notes"]))
    now = _spec_record(spec)
    for key in ("fixed_names", "blocks", "n_obs"):
        if now[key] != saved[key]:
            raise DataError(f"{path}: the model rebuilt from the stored data differs from the saved one in its "
                            f"{key} ({now[key]} instead of {saved[key]}); was it saved by another bayeslmm version "
                            f"({record.get('bayeslmm_version')})?")
    return spec


# -- REML / ML fits -------------------------------------------------------------------------------
def _freq_record(fit) -> dict:
    opt = fit.optimization
    return {
        "kind": "FreqFit",
        "data_name": fit.data_name,
        "spec": _spec_record(fit.spec),
        "method": fit.method,
        "theta": [float(t) for t in fit.theta],
        "objective": float(fit.objective),
        "optimization": {
            "optimizer": opt.optimizer,
            "start": [float(t) for t in opt.start],
            "end": [float(t) for t in opt.end],
            "objective": float(opt.objective),
            "n_evaluations": int(opt.n_evaluations),
            "tolerances": _jsonable(opt.tolerances, "the optimizer's tolerances"),
            "message": opt.message,
            "warnings": list(opt.warnings),
            "seconds": float(opt.seconds),
        },
        "extra": _extra_fields(fit, _FREQ_FIELDS),
    }


def _load_freq(record: dict, spec, path: Path):
    from .crossprod import CrossProducts
    from .reml.fit import estimates_at
    from .reml.optimize import OptimizationRecord
    from .reml.results import FreqFit

    theta = np.array(record["theta"], dtype=float)
    if theta.shape != (spec.n_theta,):
        raise DataError(f"{path}: θ has {theta.size} entries, the model needs {spec.n_theta}")
    # the fit's own route (centred coordinates where the fit used them), so every number is the saved one
    again, estimates = estimates_at(spec, theta, reml=record["method"] == "REML",
                                    crossprods=CrossProducts.from_spec(spec))
    objective = float(record["objective"])
    if not abs(again - objective) <= 1e-8 * max(1.0, abs(objective)):
        raise DataError(f"{path}: the stored data give the objective {again!r} at the stored θ, not the saved "
                        f"{objective!r}; the file's data or θ were altered")
    o = record["optimization"]
    opt = OptimizationRecord(optimizer=o["optimizer"], start=np.array(o["start"], dtype=float),
                             end=np.array(o["end"], dtype=float), objective=float(o["objective"]),
                             n_evaluations=int(o["n_evaluations"]), tolerances=dict(o["tolerances"]),
                             message=o["message"], warnings=tuple(o["warnings"]), seconds=float(o["seconds"]))
    return FreqFit(spec=spec, method=record["method"], theta=theta, objective=objective,
                   estimates=estimates, optimization=opt, data_name=record["data_name"],
                   **_known_extra(FreqFit, record))


# -- Bayesian fits -----------------------------------------------------------------------------------
def _bayes_record(fit) -> dict:
    return {
        "kind": "BayesFit",
        "data_name": fit.data_name,
        "spec": _spec_record(fit.spec),
        "priors": _priors_record(fit.priors),
        "names": list(fit.names),
        "parameterization": fit.parameterization,
        "sampler": fit.sampler,
        "seed": int(fit.seed),
        "timings": _jsonable(fit.timings, "the timings"),
        "groups": list(fit.idata.children),
        "extra": _extra_fields(fit, _BAYES_FIELDS),
    }


def _load_bayes(record: dict, spec, groups: dict, path: Path):
    import xarray as xr

    from .bayes.results import BayesFit

    missing = [g for g in record["groups"] if g not in groups]
    if missing:
        raise DataError(f"{path}: the groups {missing} of the saved posterior are missing from the file")
    from .bayes.naming import upgrade

    idata = xr.DataTree.from_dict({f"/{g}": groups[g] for g in record["groups"]})
    # files saved before the distinct-correlation layout hold whole matrices: read them as today's
    idata["posterior"] = xr.DataTree(upgrade(idata["posterior"].to_dataset(), record["names"], spec.blocks))
    _check_draws_match_spec(idata, spec, path)
    return BayesFit(spec=spec, idata=idata, priors=_priors_from_record(record["priors"], spec, path),
                    names=list(record["names"]), parameterization=record["parameterization"],
                    sampler=record["sampler"], seed=int(record["seed"]), data_name=record["data_name"],
                    timings=dict(record["timings"]), **_known_extra(BayesFit, record))


def _check_draws_match_spec(idata, spec, path: Path) -> None:
    """The rebuilt response and design must be the ones the draws were made from."""
    checks = [("observed_data", "y", spec.y), ("constant_data", "X", spec.X)]
    for group, var, value in checks:
        if group in idata.children and var in idata[group].dataset:
            stored = np.asarray(idata[group].dataset[var].values)
            if stored.shape != value.shape or not np.array_equal(stored, value):
                raise DataError(f"{path}: the {var} rebuilt from the stored data differs from the {group} the "
                                "draws were made from; the file was altered or saved by another bayeslmm version")


# -- priors -------------------------------------------------------------------------------------------
def _param_record(value, where: str):
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return {"scalar": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_param_record(v, where) for v in value]}
    if isinstance(value, (bool, int, float)):
        return value
    raise DataError(f"cannot save the prior for {where}: a parameter is a {type(value).__name__}; give numbers")


def _param_from_record(value):
    if isinstance(value, dict):
        if "ndarray" in value:
            return np.array(value["ndarray"], dtype=np.dtype(value["dtype"]))
        if "scalar" in value:
            return np.dtype(value["dtype"]).type(value["scalar"])
        if "list" in value:
            return [_param_from_record(v) for v in value["list"]]
        if "tuple" in value:
            return tuple(_param_from_record(v) for v in value["tuple"])
        raise DataError(f"unreadable prior parameter {value!r}")
    return value


def _prior_record(prior, where: str) -> dict:
    return {"family": prior.family, "params": {k: _param_record(v, where) for k, v in prior.params.items()}}


def _prior_from_record(rec: dict):
    from .bayes.priors import Prior

    return Prior(rec["family"], **{k: _param_from_record(v) for k, v in rec["params"].items()})


def _priors_record(priors) -> dict:
    return {
        "beta": [_prior_record(p, "a fixed effect") for p in priors.beta],
        "sigma": _prior_record(priors.sigma, "sigma"),
        "blocks": [{"sd": _prior_record(b.sd, "a random-effect sd"), "eta": float(b.eta)} for b in priors.blocks],
        "centred": bool(priors.centred),
        "x_means": _param_record(np.asarray(priors.x_means), "the centring"),
    }


def _priors_from_record(rec: dict, spec, path: Path):
    from .bayes.priors import BlockPriors, PriorSet

    try:
        priors = PriorSet(beta=tuple(_prior_from_record(p) for p in rec["beta"]),
                          sigma=_prior_from_record(rec["sigma"]),
                          blocks=tuple(BlockPriors(sd=_prior_from_record(b["sd"]), eta=float(b["eta"]))
                                       for b in rec["blocks"]),
                          centred=bool(rec["centred"]), x_means=_param_from_record(rec["x_means"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: the stored priors are incomplete ({type(exc).__name__}: {exc})") from exc
    try:
        _check_priors(priors, spec)
    except BayesLMMError as exc:
        raise DataError(f"{path}: the stored priors are not ones a fit accepts: {exc}; the file was altered or "
                        "damaged") from exc
    return priors


def _check_priors(priors, spec) -> None:
    """The checks a fit applies to a user's priors, and their count and shapes for ``spec``."""
    if len(priors.beta) != spec.n_fixed or len(priors.blocks) != len(spec.blocks):
        raise BayesLMMError(f"{len(priors.beta)} fixed-effect and {len(priors.blocks)} block priors stored, the "
                            f"model has {spec.n_fixed} and {len(spec.blocks)}")
    for name, prior in zip(spec.fixed_names, priors.beta):
        prior.check(f"coefficient {name!r}", "location")
        _check_prior_shape(prior, (), f"coefficient {name!r}")
    priors.sigma.check("sigma", "scale")
    _check_prior_shape(priors.sigma, (), "sigma")
    for block, bp in zip(spec.blocks, priors.blocks):
        bp.sd.check(f"{block.group} sd", "scale")
        _check_prior_shape(bp.sd, (block.q,), f"{block.group} sd")
        if not (np.isfinite(bp.eta) and bp.eta > 0):
            raise BayesLMMError(f"prior for block {block.group!r}: LKJ eta must be a positive number, got {bp.eta!r}")
    if np.shape(priors.x_means) != (spec.n_fixed,) or not np.all(np.isfinite(priors.x_means)):
        raise BayesLMMError(f"the centring means must be {spec.n_fixed} finite numbers")


def _check_prior_shape(prior, shape: tuple, where: str) -> None:
    """One value (or, for a block's sds, one per column) per parameter."""
    for name, value in prior.params.items():
        if np.size(value) != 1 and np.shape(value) != shape:
            raise BayesLMMError(f"prior for {where}: parameter {name} has shape {np.shape(value)}, "
                                f"not {shape or 'one value'}")


#: the fields of each fit that this module stores in its own way; any other field (added to the
#: classes later) is stored as JSON under "extra" and given back on loading
_FREQ_FIELDS = {"spec", "method", "theta", "objective", "estimates", "optimization", "data_name"}
_BAYES_FIELDS = {"spec", "idata", "priors", "names", "parameterization", "sampler", "seed", "data_name", "timings"}


def _extra_fields(fit, known: set[str]) -> dict:
    return {f.name: _jsonable(getattr(fit, f.name), f"the fit's {f.name}")
            for f in dataclasses.fields(fit) if f.name not in known}


def _known_extra(cls, record: dict) -> dict:
    """The stored extra fields that ``cls`` still has (a field since removed is ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in record.get("extra", {}).items() if k in names}


def _jsonable(value, what: str):
    """A JSON-ready copy of a dict of numbers and strings (numpy scalars become Python ones)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, what) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DataError(f"cannot save {what}: it holds a {type(value).__name__}")
