"""The container of a saved fit: one netCDF-4 file or zarr folder, arrays plus one JSON record.

This module knows the file and its encoding, not the fits: a fit gives
:func:`save` its own record and datasets (``fit.to_record()``) and is rebuilt by
its class's ``from_record`` (:func:`bayeslmm.io.load` picks the class by the record's
``kind``).  Nothing is pickled, so a save opens in any netCDF or zarr reader and never
runs code when loaded.  What the file holds is described in :mod:`bayeslmm.io`.

Here are: the format's name and version (root attributes ``bayeslmm_format``,
``bayeslmm_format_version``, ``bayeslmm_record``), writing under a temporary name and
renaming (:func:`write_atomically`), reading the header before anything else (so a
file that is not a save is refused at once), string and object arrays that come back
exactly, the model's data as a dataset (:func:`encode_frame` / :func:`decode_frame`),
the spec's record and its rebuilding, and JSON-safe values.  It imports no results or
engine module.
"""

from __future__ import annotations

import contextlib
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
from .version import __version__

#: the value of the root attribute ``bayeslmm_format`` that marks a bayeslmm save
FORMAT_NAME = "bayeslmm-fit"
#: incremented whenever what a file holds changes; files of a higher version are refused
FORMAT_VERSION = 1
#: the group that holds the rows and columns the model used
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


# -- writing -----------------------------------------------------------------------------------
def save(fit, path) -> Path:
    """Write ``fit`` (anything with ``spec`` and ``to_record()``) to ``path``; returns the path.

    ``fit.to_record()`` gives the JSON record of the fit's own fields (with its
    ``kind``) and the datasets to store beside it; the model's data and the format's
    header are added here.  ``path`` ending in ``.zarr`` writes a zarr folder; any
    other name a single netCDF-4 file (``.nc`` is the usual suffix).  The new save is
    written under a temporary name in the same folder and renamed into place once
    complete, so an existing save is replaced only then.  A save that fails part-way
    (disk full, read-only folder, no permission) raises :class:`SaveError` (an
    ``OSError``), removes what it wrote and leaves the previous save unchanged.
    """
    path = as_path(path, "path")
    try:
        record, groups = fit.to_record()
        tree = _fit_tree(record, groups, fit.spec)
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


def _fit_tree(record: dict, groups: dict, spec):
    """The DataTree a save writes: the fit's groups, its data and the JSON record."""
    if DATA_GROUP in groups:
        raise DataError(f"the fit's DataTree has a group named {DATA_GROUP!r}, which save needs for itself")
    data_ds, data_meta = encode_frame(spec)
    return _make_tree({**groups, DATA_GROUP: data_ds}, {**record, "data": data_meta})


# -- reading -----------------------------------------------------------------------------------
def read_header(path) -> tuple[dict, str]:
    """The JSON record of a save and the engine that reads it, from the file's header alone.

    Only the first bytes of a file (the HDF5 signature, then the root attributes) or a
    zarr folder's root metadata are read, so a large file that is not a save is refused
    at once.  Raises :class:`~bayeslmm.errors.DataError` for a path that does not exist
    or cannot be read, a file that is not a bayeslmm save, a newer format version, or a
    record that is not valid JSON.
    """
    path = as_path(path, "path")
    attrs, engine = _read_root_attrs(path)
    return _read_record(attrs, path), engine


def read_body(path, engine: str, record: dict) -> tuple:
    """The rebuilt :class:`~bayeslmm.spec.ModelSpec` and the fit's stored datasets ``{group: Dataset}``.

    The spec is rebuilt from the stored data and formula and checked against the
    record's (:func:`rebuild_spec`).  Call inside :func:`reading` so a damaged file
    gives a :class:`~bayeslmm.errors.DataError`.
    """
    path = as_path(path, "path")
    tree = _read_tree(path, engine)
    groups = {name: _decode_dataset(tree[name].to_dataset()) for name in tree.children}
    if DATA_GROUP not in groups:
        raise DataError(f"{path}: the file has no {DATA_GROUP!r} group; it is not a complete bayeslmm save")
    data = decode_frame(groups.pop(DATA_GROUP), record["data"], path)
    return rebuild_spec(record, data, path), groups


@contextlib.contextmanager
def reading(path):
    """Turn the errors of a damaged or incomplete save, met while rebuilding a fit, into a DataError."""
    try:
        yield
    except BayesLMMError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, np.linalg.LinAlgError, RecursionError) as exc:
        raise DataError(f"cannot load {path}: the save is incomplete or damaged ({type(exc).__name__}: {exc})") from exc
    except MemoryError as exc:
        raise DataError(f"cannot load {path}: not enough memory to rebuild the fit; free memory or load it on a "
                        "machine with more") from exc


# -- paths and files --------------------------------------------------------------------------
def as_path(path, argument: str) -> Path:
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
    if not isinstance(record, dict):
        raise DataError(f"cannot load {path}: its bayeslmm record is not a JSON object, so no kind of fit is named")
    return record


def _make_tree(groups: dict, record: dict):
    import xarray as xr

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
    """Undo :func:`encode_frame`: the data frame described by ``meta`` from the dataset ``ds``."""
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
def spec_record(spec) -> dict:
    """What rebuilds a :class:`~bayeslmm.spec.ModelSpec` from its data, and what checks the rebuilt one."""
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


def rebuild_spec(record: dict, data: pd.DataFrame, path: Path):
    """The spec of ``record["spec"]`` built again from ``data``; a DataError where it differs from the saved one."""
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
    now = spec_record(spec)
    for key in ("fixed_names", "blocks", "n_obs"):
        if now[key] != saved[key]:
            raise DataError(f"{path}: the model rebuilt from the stored data differs from the saved one in its "
                            f"{key} ({now[key]} instead of {saved[key]}); was it saved by another bayeslmm version "
                            f"({record.get('bayeslmm_version')})?")
    return spec


# -- JSON-safe values and the fields a record does not name --------------------------------------
def extra_fields(fit, known: set[str]) -> dict:
    """The dataclass fields of ``fit`` outside ``known``, as JSON: a field added to a class later is
    stored under the record's ``"extra"`` without each class's record having to name it."""
    return {f.name: jsonable(getattr(fit, f.name), f"the fit's {f.name}")
            for f in dataclasses.fields(fit) if f.name not in known}


def known_extra(cls, record: dict) -> dict:
    """The stored extra fields that ``cls`` still has (a field since removed is ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in record.get("extra", {}).items() if k in names}


def jsonable(value, what: str):
    """A JSON-ready copy of a dict of numbers and strings (numpy scalars become Python ones)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, what) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DataError(f"cannot save {what}: it holds a {type(value).__name__}")
