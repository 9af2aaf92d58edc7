"""Exceptions raised for bad input.

Every error a user can provoke derives from :class:`BayesLMMError`, itself a
``ValueError``, so ``except ValueError`` keeps working for callers that do not
know this package.  Messages name the column or argument at fault and say what
to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BayesLMMError(ValueError):
    """Base class of every error raised for bad input."""


class FormulaError(BayesLMMError):
    """The formula does not parse, or asks for something that cannot be fitted."""


class DataError(BayesLMMError):
    """The data do not fit the formula: a missing or unusable column, missing values, ..."""


class ModelError(BayesLMMError):
    """The model cannot be estimated from these data (unidentifiable, rank deficient, ...)."""


class InsufficientMemoryError(BayesLMMError, MemoryError):
    """The fit needs more memory than this process may use; the message says what to reduce."""


class IncompleteTraceError(RuntimeError):
    """The sampler handed back chains with missing draws; no fit is made from them."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``" Did you mean 'x'?"`` suffix naming the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
