"""Classic mixed-model data sets, bundled with the package (no network needed).

Eight data sets exported from the R packages lme4 1.1-31, mlmRev 1.0-8, lmerTest
3.1-3 and nlme 3.1-162: ``sleepstudy``, ``exam``, ``Dyestuff``, ``Penicillin``,
``InstEval``, ``ham``, ``carrots`` and ``Ovary``.  Columns that are factors in R come
back as :class:`pandas.Categorical` with R's level order, so that conditional modes,
level listings and reference fits line up with lme4's, lmerTest's and nlme's.  Missing
values stay missing: ``carrots`` has 3 rows without a ``Preference`` (fit it with
``missing="drop"``).  The provenance of each data set (source, citation, columns,
licence) is in this package's ``README.md`` and is returned by :func:`dataset_info`.

Examples
--------
>>> from bayeslmm.datasets import list_datasets, load_dataset
>>> list_datasets()
['sleepstudy', 'exam', 'Dyestuff', 'Penicillin', 'InstEval', 'ham', 'carrots', 'Ovary']
>>> load_dataset("sleepstudy").shape
(180, 3)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pandas as pd

from bayeslmm.errors import DataError, did_you_mean

__all__ = ["list_datasets", "load_dataset", "dataset_info"]


@dataclass(frozen=True)
class _Factor:
    """How one R factor column is rebuilt: explicit R levels, or sorted values."""

    levels: tuple | None = None  # None: R's default, the sorted distinct values
    ordered: bool = False  # True for R's ordered factors


@dataclass(frozen=True)
class _Dataset:
    name: str
    filename: str
    r_package: str
    r_name: str
    shape: tuple[int, int]
    factors: dict[str, _Factor] = field(default_factory=dict)


_BANDS = ("bottom 25%", "mid 50%", "top 25%")

_REGISTRY: tuple[_Dataset, ...] = (
    _Dataset(
        "sleepstudy", "sleepstudy.csv", "lme4 1.1-31", "sleepstudy", (180, 3),
        {"Subject": _Factor()},
    ),
    _Dataset(
        "exam", "exam.csv", "mlmRev 1.0-8", "Exam", (4059, 10),
        {
            "school": _Factor(),
            "schgend": _Factor(("mixed", "boys", "girls")),
            "vr": _Factor(_BANDS),
            "intake": _Factor(_BANDS),
            "sex": _Factor(("F", "M")),
            "type": _Factor(("Mxd", "Sngl")),
            "student": _Factor(),
        },
    ),
    _Dataset(
        "Dyestuff", "Dyestuff.csv", "lme4 1.1-31", "Dyestuff", (30, 2),
        {"Batch": _Factor()},
    ),
    _Dataset(
        "Penicillin", "Penicillin.csv", "lme4 1.1-31", "Penicillin", (144, 3),
        {"plate": _Factor(), "sample": _Factor()},
    ),
    _Dataset(
        "InstEval", "InstEval.csv.gz", "lme4 1.1-31", "InstEval", (73421, 7),
        {
            "s": _Factor(),
            "d": _Factor(),
            "studage": _Factor((2, 4, 6, 8), ordered=True),
            "lectage": _Factor((1, 2, 3, 4, 5, 6), ordered=True),
            "service": _Factor((0, 1)),
            "dept": _Factor(),
        },
    ),
    _Dataset(
        "ham", "ham.csv", "lmerTest 3.1-3", "ham", (648, 6),
        {name: _Factor() for name in ("Consumer", "Product", "Information", "Gender")},
    ),
    _Dataset(
        "carrots", "carrots.csv", "lmerTest 3.1-3", "carrots", (1236, 14),
        {
            name: _Factor()
            for name in ("Consumer", "Frequency", "Gender", "Age", "Homesize", "Work", "Income", "Product")
        },
    ),
    _Dataset(  # nlme's groupedData orders the mares by their largest count (an ordered factor in R)
        "Ovary", "Ovary.csv", "nlme 3.1-162", "Ovary", (308, 3),
        {"Mare": _Factor((4, 2, 11, 7, 5, 9, 1, 6, 10, 3, 8), ordered=True)},
    ),
)

_BY_KEY = {d.name.lower(): d for d in _REGISTRY}


def list_datasets() -> list[str]:
    """Names of the bundled data sets.

    Returns
    -------
    list of str
        ``["sleepstudy", "exam", "Dyestuff", "Penicillin", "InstEval", "ham",
        "carrots", "Ovary"]``.  Any of them, in any letter case, is accepted by
        :func:`load_dataset`.
    """
    return [d.name for d in _REGISTRY]


def _lookup(name: str) -> _Dataset:
    if not isinstance(name, str):
        raise DataError(
            f"Dataset name must be a string, got {type(name).__name__}. "
            f"Available: {', '.join(list_datasets())}."
        )
    try:
        return _BY_KEY[name.strip().lower()]
    except KeyError:
        hint = did_you_mean(name.strip().lower(), _BY_KEY)
        raise DataError(
            f"Unknown dataset {name!r}. Available (case-insensitive): "
            f"{', '.join(list_datasets())}.{hint}"
        ) from None


def _as_factor(column: pd.Series, spec: _Factor, where: str) -> pd.Categorical:
    """Rebuild an R factor: categories in R's level order, values as in the CSV.

    Missing values stay missing (R's NA in a factor).  A numeric-code column with
    missing values reads as float; its levels are the integers the CSV holds.
    """
    if spec.levels is None:
        levels = np.sort(column.dropna().unique())  # numeric codes sort numerically
        if levels.dtype.kind == "f" and np.all(levels == np.round(levels)):
            levels = levels.astype(np.int64)  # "1","2",... with NAs: pandas read floats
    else:
        levels = np.asarray(spec.levels)
        unknown = set(column.unique()) - set(spec.levels)
        if unknown:  # a damaged or edited data file, not user error
            raise RuntimeError(
                f"{where}: values {sorted(map(str, unknown))} are not among the R levels "
                f"{list(spec.levels)}; the bundled data file looks damaged."
            )
    return pd.Categorical(column, categories=levels, ordered=spec.ordered)


def load_dataset(name: str) -> pd.DataFrame:
    """Load a bundled data set as a new DataFrame.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`, in any letter case (``"dyestuff"`` works).

    Returns
    -------
    pandas.DataFrame
        A fresh frame (changing it does not affect later loads).  Columns that are
        factors in R are :class:`pandas.Categorical` with R's level order and the
        values as written in the CSV (integers for numeric codes such as
        ``sleepstudy["Subject"]``, strings for letter codes such as
        ``Dyestuff["Batch"]``); R's ordered factors (``InstEval`` ``studage`` and
        ``lectage``, ``Ovary`` ``Mare``) are ordered.  Other columns keep the type read from the CSV
        (a numeric column with missing values, such as ``carrots["Preference"]``,
        is float with NaN; nothing is dropped or filled in).

    Raises
    ------
    bayeslmm.errors.DataError
        If `name` is not a bundled data set; the message lists the available names.

    Notes
    -----
    Sizes: sleepstudy 180 x 3, exam 4,059 x 10, Dyestuff 30 x 2, Penicillin
    144 x 3, InstEval 73,421 x 7, ham 648 x 6, carrots 1,236 x 14, Ovary 308 x 3.  Only carrots has
    missing values, as lmerTest's has: 3 rows without Preference, 3 without
    Sweetness, 3 without Crisp (8 rows in all), and the 72 rows of 6 consumers
    without Income.  See :func:`dataset_info` for the provenance.

    Examples
    --------
    >>> df = load_dataset("sleepstudy")
    >>> df["Subject"].cat.categories[:3].tolist()
    [308, 309, 310]
    """
    spec = _lookup(name)
    resource = resources.files(__name__) / "data" / spec.filename
    compression = "gzip" if spec.filename.endswith(".gz") else None
    with resource.open("rb") as handle:
        frame = pd.read_csv(handle, compression=compression)
    if frame.shape != spec.shape:
        raise RuntimeError(
            f"Bundled {spec.filename} has shape {frame.shape}, expected {spec.shape}; "
            "the installation looks damaged."
        )
    for column, factor in spec.factors.items():
        frame[column] = _as_factor(frame[column], factor, f"{spec.name}.{column}")
    return frame


def _readme_section(name: str) -> str:
    text = (resources.files(__name__) / "README.md").read_text(encoding="utf-8")
    match = re.search(
        rf"^### {re.escape(name)} .*?(?=^### |\Z)", text, flags=re.MULTILINE | re.DOTALL
    )
    if match is None:  # pragma: no cover - the README ships with the package
        raise RuntimeError(f"No provenance note for {name!r} in the datasets README.")
    return match.group(0).removeprefix("### ").strip()


def dataset_info(name: str) -> str:
    """Provenance note of a bundled data set.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`, in any letter case.

    Returns
    -------
    str
        The source R package and version, the original citation, the number of rows,
        each column and its meaning, and the licence (GPL, as distributed with lme4,
        mlmRev, lmerTest and nlme).  The same text is in ``bayeslmm/datasets/README.md``.

    Raises
    ------
    bayeslmm.errors.DataError
        If `name` is not a bundled data set.
    """
    spec = _lookup(name)
    rows, cols = spec.shape
    return (
        f"{_readme_section(spec.name)}\n\n"
        f"Source: R package {spec.r_package}, data set `{spec.r_name}`, exported with "
        f"write.csv(..., row.names = FALSE); {rows:,} rows x {cols} columns.\n"
        f"Licence: GPL (>= 2), as distributed with the R package "
        f"{spec.r_package.split()[0]}; cite the original source above."
    )
