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
