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

Who does what
-------------
The container and its encoding are :mod:`bayeslmm.store`'s; each fit writes and reads
its own record (``FreqFit.to_record`` / ``from_record``, ``BayesFit.to_record`` /
``from_record``); this module's :func:`load` reads the header, picks the class by the
record's ``kind`` (:func:`record_classes`), never by a Python type, and lets it rebuild itself.
"""

from __future__ import annotations

from pathlib import Path

from . import store
from .errors import BayesLMMError, DataError
# the container's public names, importable from here as before the container moved to .store
from .store import (  # noqa: F401
    DATA_GROUP,
    FORMAT_NAME,
    FORMAT_VERSION,
    SaveError,
    decode_frame,
    encode_frame,
    write_atomically,
)


def record_classes() -> dict:
    """The classes a save's ``kind`` names, ``{kind: class}``; each has ``from_record`` and ``to_record``."""
    from .bayes.results import BayesFit
    from .reml.results import FreqFit

    return {"FreqFit": FreqFit, "BayesFit": BayesFit}


def save_fit(fit, path) -> Path:
    """Write ``fit`` (a ``FreqFit`` or a ``BayesFit``) to ``path``: the same as ``fit.save(path)``.

    See :func:`bayeslmm.store.save` for the file and its failures (:class:`SaveError`).
    """
    path = store.as_path(path, "path")
    if not isinstance(fit, tuple(record_classes().values())):
        raise BayesLMMError(f"save expects a FreqFit or a BayesFit, got {type(fit).__name__}")
    return fit.save(path)


def load(path):
    """Read a fit written by ``fit.save(path)``: a ``FreqFit`` or a ``BayesFit``.

    Raises
    ------
    DataError
        The path does not exist or cannot be read, is not a bayeslmm save (checked from
        the file's header and root attributes, before anything else is read), was written
        by a newer bayeslmm (a higher format version), names a kind of fit this bayeslmm
        does not know, its data do not rebuild the saved model, its priors are not ones a
        fit accepts, or it does not fit in memory.
    """
    path = store.as_path(path, "path")
    record, engine = store.read_header(path)
    cls = record_classes().get(record.get("kind"))
    if cls is None:
        raise DataError(f"cannot load {path}: unknown kind of fit {record.get('kind')!r}; this bayeslmm reads "
                        f"{sorted(record_classes())}")
    with store.reading(path):
        spec, groups = store.read_body(path, engine, record)
        return cls.from_record(record, spec, groups, path)
