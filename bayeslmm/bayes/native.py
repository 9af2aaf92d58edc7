"""The compiled kernels as C callbacks, so that nutpie's threads sample without entering Python.

nutpie's own numba backend (``nutpie.compile_pymc``) hands its Rust sampler a C function
``int64 logp(uint64 dim, double* x, double* grad, double* logp, void* user_data)`` and an
``int64 expand(uint64 dim, uint64 n_expanded, double* x, double* out, void* user_data)``,
each returning 0 on success.  Called that way a gradient costs no Python call and no GIL
hand-over, so the chains' threads pay off even on sleepstudy (through
``nutpie.compiled_pyfunc.from_pyfunc`` 2 threads were slower than 1 on it).

A kernel (:mod:`.kernel`, :mod:`.blocked`, :mod:`.partial`, :mod:`.structured`:
anything with ``compiled() -> (function, arguments)``) gets one callback, compiled once and
cached on disk (:func:`.compiled.cached_cfunc`).  It closes over no model: ``user_data``
points at a table, one int64 row per argument — (address, ndim, shape…) — from which the
callback rebuilds the arrays and scalars, so a new model only builds a new table.  The
callback's source is written out from the arguments' kinds (float64, int64 or bool; scalar
or array), so a kernel whose arguments change needs no edit here: numba caches functions
that live in a file, and each source lives in a file named by its hash.
:class:`NativeModel` holds the table and every array it points at while nutpie may call it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from numba import carray, types
from numba.extending import intrinsic
from nutpie.sample import CompiledModel

from .compiled import cached_cfunc, cached_njit, cfunc_cache_dir

LOGP_SIGNATURE = types.int64(types.uint64, types.CPointer(types.float64), types.CPointer(types.float64),
                             types.CPointer(types.float64), types.voidptr)
EXPAND_SIGNATURE = types.int64(types.uint64, types.uint64, types.CPointer(types.float64),
                               types.CPointer(types.float64), types.voidptr)
#: nutpie's return codes (its ``_make_c_logp_func``): positive rejects the point (a divergence), negative stops
WRONG_SIZE, NONFINITE_GRADIENT, NONFINITE_LOGP = -1, 3, 4
#: a table row: address, ndim, then up to four extents
ROW = 6
MAX_DIMS = ROW - 2
#: an argument's numpy kind (the letter of its code) → the dtype the callback reads (a bool as a byte)
KINDS = {"f": np.float64, "i": np.int64, "b": np.uint8}

# the files whose jitted functions the callbacks carry: an edit to any compiles them again
SOURCES = tuple(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py")))


class NativeUnavailable(RuntimeError):
    """No C callback can serve this kernel (an argument of a kind the table cannot describe)."""


def argument_code(arg, position: int) -> str:
    """How the callback reads an argument: its kind's letter and its ndim ("f2": a float64 matrix; "i0": an int)."""
    value = np.asarray(arg)
    kind = value.dtype.kind
    if kind not in KINDS or value.ndim > MAX_DIMS or (kind == "b" and value.ndim):
        raise NativeUnavailable(f"argument {position} ({value.dtype}, {value.ndim} dimensions) cannot be "
                                "passed to a C callback")
    return f"{kind}{value.ndim}"


def argument_table(args: tuple, ndim: int) -> tuple[np.ndarray, list, tuple]:
    """(the int64 table the callback reads — row 0: ndim and the argument count —, the arrays it points at,
    the arguments' codes).  Scalars become one-element arrays; arrays are made C-contiguous."""
    table = np.zeros((1 + len(args), ROW), dtype=np.int64)
    table[0, :2] = ndim, len(args)
    kept, codes = [], []
    for k, arg in enumerate(args, start=1):
        code = argument_code(arg, k - 1)
        dims = int(code[1:])
        value = np.ascontiguousarray(np.reshape(arg, -1) if dims == 0 else arg, dtype=KINDS[code[0]])
        kept.append(value)
        codes.append(code)
        table[k, :2] = value.ctypes.data, dims
        table[k, 2 : 2 + dims] = value.shape
    return table, kept, tuple(codes)


# ----------------------------------------------------------------------------- in the callbacks

@intrinsic
def address_pointer(typingctx, address, dtype):
    """A pointer to ``dtype`` (a numpy scalar type) at ``address`` (an integer or a void pointer)."""
    target = types.CPointer(dtype.instance_type)

    def codegen(context, builder, signature, args):
        as_pointer = context.get_value_type(target)
        if isinstance(address, types.Integer):
            return builder.inttoptr(args[0], as_pointer)
        return builder.bitcast(args[0], as_pointer)

    return target(address, dtype), codegen


@cached_njit(inline="always")
def table_at(user_data):
    """The argument table behind ``user_data`` (its row 0 holds its own length)."""
    head = carray(address_pointer(user_data, np.int64), (ROW,))
    return carray(address_pointer(user_data, np.int64), (1 + head[1], ROW))


@cached_njit(inline="always")
def report(lp, grad, logp_out):
    """Store lp and say, as nutpie's own callback does, whether the value and gradient are finite."""
    logp_out[0] = lp
    for k in range(grad.shape[0]):
        if not np.isfinite(grad[k]):
            return NONFINITE_GRADIENT
    return 0 if np.isfinite(lp) else NONFINITE_LOGP


def _expand_identity(dim, n_expanded, x_, out_, user_data):
    """The draws nutpie stores are the unconstrained point itself."""
    if n_expanded != dim:
        return WRONG_SIZE
    x = carray(x_, (dim,))
    out = carray(out_, (dim,))
    for k in range(dim):
        out[k] = x[k]
    return 0


@functools.cache
def expand_callback():
    return cached_cfunc(EXPAND_SIGNATURE, SOURCES)(_expand_identity)


CALLBACK_SOURCE = '''"""The C callback of {module}.{name} for arguments {codes} (written by bayeslmm.bayes.native)."""
import numpy as np
from numba import carray

from bayeslmm.bayes.native import WRONG_SIZE, address_pointer, report, table_at
from {module} import {name} as kernel_function


def callback(dim, x_, grad_, logp_, user_data):
    t = table_at(user_data)
    if dim != t[0, 0]:
        return WRONG_SIZE
    grad = carray(grad_, (dim,))
    lp = kernel_function(
        carray(x_, (dim,)),
{arguments}
        grad)
    return report(lp, grad, carray(logp_, (1,)))
'''


def _reading(code: str, row: int) -> str:
    """The expression that reads argument ``row`` of the table, of kind and ndim ``code``."""
    dtype = f"np.{np.dtype(KINDS[code[0]]).name}"
    dims = int(code[1:])
    pointer = f"address_pointer(t[{row}, 0], {dtype})"
    if dims == 0:
        return f"carray({pointer}, (1,))[0]" + (" != 0" if code[0] == "b" else "")
    return f"carray({pointer}, ({', '.join(f't[{row}, {2 + d}]' for d in range(dims))},))"


def callback_source(module: str, name: str, codes: tuple) -> str:
    """The source of the callback calling ``module.name`` on arguments of kinds ``codes``."""
    arguments = "\n".join(f"        {_reading(code, row)}," for row, code in enumerate(codes, start=1))
    return CALLBACK_SOURCE.format(module=module, name=name, codes=" ".join(codes), arguments=arguments)


def _public_name(func) -> tuple[str, str]:
    """(module, name) under which ``func`` can be imported, preferring a name without a leading underscore."""
    module = sys.modules[func.__module__]
    names = [n for n, v in vars(module).items() if v is func]
    public = [n for n in names if not n.startswith("_")]
    return func.__module__, (public or names or [func.__name__])[0]


def _holds(path: str, text: str) -> bool:
    try:
        with open(path) as fh:
            return fh.read() == text
    except OSError:
        return False


@functools.cache
def logp_callback(module: str, name: str, codes: tuple):
    """The C callback of ``module.name`` for arguments ``codes``: its source written to a file named by its
    hash (numba caches only functions that live in a file), then compiled or loaded from the disk cache."""
    source = callback_source(module, name, codes)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = cfunc_cache_dir(SOURCES) or tempfile.mkdtemp(prefix="bayeslmm-native-")
    path = os.path.join(folder, f"callback_{digest}.py")
    if not _holds(path, source):
        # written whole, then moved into place: another process may be reading the same name
        fd, partial_path = tempfile.mkstemp(dir=folder, suffix=".py")
        with os.fdopen(fd, "w") as fh:
            fh.write(source)
        os.replace(partial_path, path)
    module_name = f"bayeslmm_native_callback_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    sys.modules[module_name] = generated   # numba's cached code names its module and imports it when loaded
    return cached_cfunc(LOGP_SIGNATURE, SOURCES)(generated.callback)


# ----------------------------------------------------------------------------- for nutpie

def callback_for(kd):
    """(the kernel's C callback, its argument table, the arrays the table points at)."""
    func, args = kd.compiled()
    table, kept, codes = argument_table(args, kd.ndim)
    return logp_callback(*_public_name(func), codes), table, kept


def call(callback, table: np.ndarray, x: np.ndarray) -> tuple[int, float, np.ndarray]:
    """Call a C callback from Python as nutpie would: (return code, log-density, gradient)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    grad = np.full(x.shape[0], np.nan)
    lp = np.full(1, np.nan)
    as_double = ctypes.POINTER(ctypes.c_double)
    code = callback.ctypes(x.shape[0], x.ctypes.data_as(as_double), grad.ctypes.data_as(as_double),
                           lp.ctypes.data_as(as_double), ctypes.c_void_p(table.ctypes.data))
    return int(code), float(lp[0]), grad


def native_model(kd, initial_point: Callable[[int], np.ndarray]) -> "NativeModel":
    """The kernel ``kd`` as a nutpie model whose gradients are C calls; raises where it cannot be built."""
    from nutpie import _lib  # noqa: F401  (nutpie's Rust core: fail here, not in the sampler, if it moved)

    callback, table, kept = callback_for(kd)
    return NativeModel(dims={"x": ("x_dim",)}, logp_address=callback.address,
                       expand_address=expand_callback().address, table=table, kept=tuple(kept),
                       ndim=kd.ndim, initial_point=initial_point)


@dataclass(frozen=True)
class NativeModel(CompiledModel):
    """A nutpie model made of C function addresses and the table they read (kept alive with ``kept``).

    It builds nutpie's model as ``nutpie.compile_pymc.CompiledPyMCModel._make_model`` does, handing
    itself to nutpie as the object to keep alive while the callbacks may run.
    """

    logp_address: int = field(kw_only=True)
    expand_address: int = field(kw_only=True)
    table: np.ndarray = field(kw_only=True)
    kept: tuple = field(kw_only=True)
    ndim: int = field(kw_only=True)
    initial_point: Callable[[int], np.ndarray] = field(kw_only=True)

    @property
    def n_dim(self) -> int:
        return self.ndim

    @property
    def shapes(self) -> dict:
        return {"x": (self.ndim,)}

    @property
    def coords(self) -> dict:
        return {"x_dim": np.arange(self.ndim)}

    def _make_sampler(self, settings, init_mean, cores, progress_type, extra_callback, extra_callback_rate, store):
        from nutpie import _lib

        return _lib.PySampler.from_pymc(settings, cores, self._make_model(init_mean), progress_type, extra_callback,
                                        extra_callback_rate, store)

    def _make_model(self, init_mean):
        from nutpie import _lib

        user_data = self.table.ctypes.data
        expand = _lib.ExpandFunc(self.ndim, self.ndim, self.expand_address, user_data, self)
        logp = _lib.LogpFunc(self.logp_address, user_data, self)
        sizes = {"x_dim": self.ndim}
        variables = _lib.PyVariable.new_variables(["x"], ["float64"], [(self.ndim,)], sizes, self.dims)
        return _lib.PyMcModel(logp, expand, variables, self.ndim, sizes, self.coords, self.initial_point, None)
