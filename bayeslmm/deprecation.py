"""Renamed keyword arguments: the old name keeps working for a while, with a warning.

The package uses one name per idea (see ``docs/vocabulary.md``): ``ci_prob`` for an
interval's probability, ``random_seed`` for a seed.  Where a public function used
another name, it is decorated with :func:`renamed_kwargs`, so old code still runs and
is told, by a ``FutureWarning`` (shown to users by default, unlike
``DeprecationWarning``), which name to use instead.
"""

from __future__ import annotations

import functools
import warnings

import pandas as pd

from .errors import BayesLMMError


def renamed_kwargs(**renames: str):
    """Decorator: accept each old keyword ``old=new`` as ``new``, warning once per call.

    Passing both the old and the new name is an error (which one was meant is
    unknowable).  Positional calls are untouched: the parameter keeps its position.
    """
    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise BayesLMMError(f"{func.__qualname__}() got both `{old}` and `{new}`; `{old}` is the "
                                        f"old name of `{new}`: pass only `{new}`")
                warnings.warn(f"{func.__qualname__}(): `{old}` is renamed `{new}`; the old name will be "
                              f"removed in a future release (see docs/vocabulary.md)", FutureWarning,
                              stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        wrapper.renamed_kwargs = dict(renames)
        return wrapper

    return decorate


def warn_replaced(where: str, old: str, new: str, stacklevel: int = 2) -> None:
    """A ``FutureWarning`` that the old keyword as given (``old``, e.g. ``backend='pytensor'``) is now
    spelt ``new`` (``route='graph'``): for a keyword whose values, not only its name, changed.

    ``stacklevel`` counts from the caller of this function, as ``warnings.warn``'s does.
    """
    warnings.warn(f"{where}: `{old}` is now `{new}`; the old spelling will be removed in a future release "
                  "(see docs/vocabulary.md)", FutureWarning, stacklevel=stacklevel + 1)


class _OldCallSeries(pd.Series):
    """A Series that, called like the method it replaces, warns and answers as that method did."""

    # pandas builds the results of arithmetic, slicing and copies with ``_constructor``: plain
    # objects, so the shim never leaks past the attribute that returned it
    @property
    def _constructor(self):
        return pd.Series

    @property
    def _constructor_expanddim(self):
        return pd.DataFrame

    def __call__(self, *args, **kwargs):
        return _answer_call(self, pd.Series, args, kwargs)


class _OldCallFrame(pd.DataFrame):
    """A DataFrame that, called like the method it replaces, warns and answers as that method did."""

    @property
    def _constructor(self):
        return pd.DataFrame

    @property
    def _constructor_sliced(self):
        return pd.Series

    def __call__(self, *args, **kwargs):
        return _answer_call(self, pd.DataFrame, args, kwargs)


def _answer_call(value, plain, args, kwargs):
    # pandas calls any callable it is given as a value or key with the frame at hand
    # (``df.assign(beta=fit.fixef)``, ``df.loc[...]``): answer those as the value itself.  The
    # old methods never took a pandas object, so this cannot hide an old call.
    if len(args) == 1 and not kwargs and isinstance(args[0], (pd.Series, pd.DataFrame)):
        return plain(value)
    warnings.warn(value._old_message, FutureWarning, stacklevel=3)
    return value._old_call(*args, **kwargs)


def callable_for_old_calls(value, old_call, message: str):
    """``value`` (a Series or DataFrame) that old code may still call as the method it was.

    For a method turned into a property: ``fit.fixef`` is the new value; ``fit.fixef()``
    (any arguments) issues a ``FutureWarning`` with ``message`` and returns
    ``old_call(...)``, exactly the old answer.  Arithmetic, slicing and copies of the
    value are plain pandas objects.
    """
    kinds = {pd.Series: _OldCallSeries, pd.DataFrame: _OldCallFrame}
    cls = kinds.get(type(value))
    if cls is None:
        raise TypeError(f"callable_for_old_calls takes a plain Series or DataFrame, got {type(value).__name__}")
    out = cls(value)
    out.attrs = dict(value.attrs)
    # object.__setattr__: pandas would take a new attribute of a frame for a column
    object.__setattr__(out, "_old_call", old_call)
    object.__setattr__(out, "_old_message", message)
    return out
