"""Build a :class:`~bayeslmm.spec.ModelSpec` from a formula and a DataFrame.

formulae builds the fixed-effect design (contrasts, transformations, ``0 +``) and
each bar term's left side; the grouping factors are turned into integer codes
directly, so a random-effect term is a few value columns plus codes rather than
formulae's whole group-specific matrix (which took seconds on InstEval).

:func:`build_spec` is the stages of :mod:`bayeslmm.formula.core` run on one frame
that holds every row; :func:`bayeslmm.outofcore.build_out_of_core` runs the same
stages over chunks.  What only the rows allow (a QR for rank, per-level ranks, the
rank of [X Z]) is here.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from formulae import design_matrices

from ..errors import DataError, ModelError, did_you_mean
from ..spec import ModelSpec, RandomBlock
from .core import (
    INTERCEPT,
    NON_COLUMNS,
    OFFSET_RATIO,
    SLOPE_OFFSET_RATIO,
    check_columns,
    check_fixed_count,
    check_levels,
    check_no_datetimes,
    check_options,
    check_rank_deficient,
    check_response_spread,
    check_response_type,
    check_rows,
    check_scale,
    fixed_design,
    formula_with_groups,
    formulae_frame,
    group_codes,
    largest_magnitude,
    lhs_design,
    lme4_order,
    missing_mask,
    note_dropped_columns,
    parse_mixed_formula,
    report_missing,
    response_values,
    warn_far_slope,
    warn_offset,
    warn_user,
)
from .parse import BarTerm, parse_formula, referenced_names

__all__ = ["INTERCEPT", "NON_COLUMNS", "OFFSET_RATIO", "SLOPE_OFFSET_RATIO", "NewDesign", "as_pandas",
           "build_spec", "check_levels", "formula_with_groups", "group_labels",
           "new_data_design", "parse_mixed_formula"]


def as_pandas(data, argument: str = "data", alternatives: str = "") -> pd.DataFrame:
    """``data`` as a pandas DataFrame: a polars DataFrame is converted (``.to_pandas()``), others refused."""
    if isinstance(data, pd.DataFrame):
        return data
    kind = f"{type(data).__module__.split('.')[0]}.{type(data).__name__}"
    if kind == "polars.DataFrame":
        try:
            return data.to_pandas()
        except ImportError as exc:  # polars converts through pyarrow
            raise DataError(f"converting the polars DataFrame {argument} to pandas needs pyarrow: "
                            "pip install pyarrow (or pass data.to_pandas() yourself)") from exc
    hint = " (a LazyFrame: call .collect() first)" if kind == "polars.LazyFrame" else ""
    alt = f" {alternatives}" if alternatives else ""
    raise DataError(f"{argument} must be a pandas DataFrame, got {kind}{hint}; a polars DataFrame{alt} "
                    "is accepted too")


def build_spec(
    formula: str,
    data: pd.DataFrame,
    groups: Mapping[str, str] | Sequence[str] | str | None = None,
    missing: str = "raise",
    rank_deficient: str = "drop",
) -> ModelSpec:
    """Parse ``formula`` against ``data`` and return the frozen model specification.

    Parameters
    ----------
    formula : str
        An lme4 formula, e.g. ``"y ~ x + (1 + x | g)"``.
    data : pandas.DataFrame
    groups : dict, list or str, optional
        Grouping-columns form: ``{"school": "1 + x"}`` adds ``(1 + x | school)``.
    missing : {"raise", "drop"}
        What to do with rows that have missing or infinite values in a used column.
    rank_deficient : {"drop", "error"}
        Drop fixed-effect columns that are linear combinations of others (with a
        warning, as lme4 does), or raise.

    Returns
    -------
    ModelSpec
    """
    check_options(missing, rank_deficient)
    data = _input_frame(data)
    formula_full, parsed = parse_mixed_formula(formula, groups)
    used = check_columns(parsed, data)
    check_no_datetimes(parsed, data)
    data, notes = _drop_missing(data, used, missing)
    fdata = formulae_frame(data, used)
    y = _response(parsed.response, fdata)
    X, dropped = _fixed_effects(parsed, fdata, rank_deficient)
    notes += note_dropped_columns(dropped)
    _check_fixed_columns(X, len(data))
    blocks = _random_blocks(parsed, fdata, data)
    _check_residual_identifiable(X.to_numpy(), blocks, len(data))
    return ModelSpec(
        formula=formula_full,
        response=parsed.response,
        y=y,
        X=np.ascontiguousarray(X.to_numpy()),
        fixed_names=tuple(map(str, X.columns)),
        blocks=tuple(lme4_order(blocks)),
        row_index=data.index.to_numpy(),
        notes=tuple(notes),
        dropped_fixed=tuple(map(str, dropped)),
        fixed_formula=parsed.fixed,
        data=data[list(used)],
        missing=missing,
        rank_deficient=rank_deficient,
    )


# -- the stages on one frame ------------------------------------------------------------------

def _input_frame(data) -> pd.DataFrame:
    """The data as a pandas DataFrame with string column names (formulas name columns by strings)."""
    data = as_pandas(data, "data")
    check_rows(len(data))
    if not all(isinstance(c, str) for c in data.columns):
        data = data.rename(columns=str)
    return data


def _drop_missing(data: pd.DataFrame, used: list[str], missing: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows without missing values in a used column, and the note of dropping the others."""
    bad, counts = missing_mask(data, used)
    notes = report_missing(counts, int(bad.sum()), len(data), missing)
    if notes:
        data = data.loc[~bad]
        check_rows(len(data), after_missing=True)
    return data, notes


def _response(expr: str, fdata: pd.DataFrame) -> np.ndarray:
    check_response_type(expr, fdata)
    y = response_values(expr, fdata)
    check_response_spread(expr, float(np.min(y)), float(np.max(y)), largest_magnitude(y))
    return y


def _fixed_effects(parsed, fdata: pd.DataFrame, rank_deficient: str) -> tuple[pd.DataFrame, list[str]]:
    """The fixed-effect design without its linearly dependent columns, and the names of those."""
    X = fixed_design(parsed, fdata)
    for col in X.columns:
        check_scale(f"the fixed-effect column {col!r}", largest_magnitude(X[col].to_numpy()))
    return _drop_rank_deficient(X, rank_deficient)


def _check_fixed_columns(X: pd.DataFrame, n: int) -> None:
    if INTERCEPT in X.columns:  # then a shift of y or of a column changes only the intercept
        # (the response itself is shifted inside the cross-products: crossprod.response_shift)
        for col in X.columns:
            if col != INTERCEPT:
                v = X[col].to_numpy()
                warn_offset(f"the fixed-effect column {col!r}", float(np.mean(v)), float(np.std(v)))
    check_fixed_count(X.shape[1], n)


def _drop_rank_deficient(X: pd.DataFrame, rank_deficient: str) -> tuple[pd.DataFrame, list[str]]:
    """Keep columns left to right while each adds a new direction (R's pivoting QR)."""
    A = X.to_numpy()
    kept: list[int] = []
    Q = np.zeros((A.shape[0], 0))
    scale = np.linalg.norm(A, axis=0)
    for j in range(A.shape[1]):
        col = A[:, j]
        res = col - Q @ (Q.T @ col)
        res = res - Q @ (Q.T @ res)  # re-orthogonalise once for stability
        nrm = np.linalg.norm(res)
        if scale[j] > 0 and nrm > 1e-7 * scale[j]:
            kept.append(j)
            Q = np.column_stack([Q, res / nrm])
    dropped = [X.columns[j] for j in range(A.shape[1]) if j not in kept]
    check_rank_deficient(dropped, rank_deficient)
    return X.iloc[:, kept], dropped


def _random_blocks(parsed, fdata: pd.DataFrame, data: pd.DataFrame) -> list[RandomBlock]:
    """One block per bar term and grouping factor, in order of writing."""
    blocks: list[RandomBlock] = []
    for bar in parsed.bars:
        lhs = lhs_design(bar, fdata)
        for factor in bar.factors:
            blocks.append(_make_block(bar, factor, lhs, data))
    return blocks


def _make_block(bar: BarTerm, factor: tuple[str, ...], lhs: pd.DataFrame, data: pd.DataFrame) -> RandomBlock:
    group = ":".join(factor)
    codes, levels = group_codes(factor, data)
    q = lhs.shape[1]
    check_levels(bar, group, levels, q, len(data))
    for col in lhs.columns:
        check_scale(f"the column {col!r} of {bar.text}", largest_magnitude(lhs[col].to_numpy()))
    if q > 1:
        _warn_not_varying_within(bar, group, codes, len(levels), lhs)
        if INTERCEPT in lhs.columns:
            _warn_far_slopes(bar, lhs)
    return RandomBlock(
        group=group,
        codes=codes,
        levels=levels,
        Z=np.ascontiguousarray(lhs.to_numpy()),
        columns=tuple(map(str, lhs.columns)),
        correlated=not bar.independent or q == 1,
    )


def _warn_far_slopes(bar: BarTerm, lhs: pd.DataFrame) -> None:
    for col in lhs.columns:
        if col != INTERCEPT:
            v = lhs[col].to_numpy()
            warn_far_slope(bar.text, col, float(np.mean(v)), float(np.std(v)))


def _level_ranks(codes: np.ndarray, n_levels: int, Zs: np.ndarray) -> np.ndarray:
    """The rank of each level's rows of the (scaled) columns Zs."""
    q = Zs.shape[1]
    gram = np.empty((n_levels, q, q))
    for a in range(q):
        for b in range(a, q):
            gram[:, a, b] = gram[:, b, a] = np.bincount(codes, weights=Zs[:, a] * Zs[:, b], minlength=n_levels)
    ev = np.linalg.eigvalsh(gram)                                  # ascending, per level
    return np.sum(ev > 1e-10 * np.maximum(ev[:, -1:], 1e-300), axis=1)


def _warn_not_varying_within(bar: BarTerm, group: str, codes: np.ndarray, n_levels: int, lhs: pd.DataFrame) -> None:
    """Warn unless a term's columns are linearly independent within at least one level of its factor.

    When every level's rows Z_j have rank < q — typically a slope on a variable that is
    constant within each group, such as a group-level covariate in ``(1 + x | g)`` — the
    random effects of the dependent columns cannot be told apart from the others'
    (only between-group heteroscedasticity would separate them), and the fit runs to a
    singular boundary.  Random slopes belong to variables that vary within the groups
    (Snijders & Bosker 2012, *Multilevel Analysis*, 2nd ed., §5.1).  lme4 fits such a
    term without a word (and reports the singular fit); we fit it too, and say why.
    """
    columns = [str(c) for c in lhs.columns]
    Zs = lhs.to_numpy().copy()
    q = Zs.shape[1]
    for c in range(q):
        if INTERCEPT in columns and columns[c] != INTERCEPT:
            Zs[:, c] -= Zs[:, c].mean()  # a shift by the intercept changes no level's rank, and keeps
                                         # a variable far from zero (a year) from looking constant
        scale = np.sqrt(np.mean(Zs[:, c] ** 2))
        Zs[:, c] /= scale if scale > 0 else 1.0
    rank = _level_ranks(codes, n_levels, Zs)
    if rank.max() == q:
        return
    counts = np.bincount(codes, minlength=n_levels)
    means = np.stack([np.bincount(codes, weights=Zs[:, c], minlength=n_levels) for c in range(q)], axis=1)
    means /= np.maximum(counts, 1)[:, None]
    within = np.sum((Zs - means[codes]) ** 2, axis=0) / len(Zs)    # within-level share of the variance
    fixed = [c for c, w in zip(columns, within) if c != INTERCEPT and w <= 1e-10]
    if INTERCEPT in columns and fixed:
        which = ", ".join(repr(c) for c in fixed)
        message = (
            f"the slope{'s' if len(fixed) > 1 else ''} {which} in {bar.text} do{'' if len(fixed) > 1 else 'es'} "
            f"not vary within any level of {group!r}: a random slope on a variable that is constant "
            "within each group cannot be told apart from the random intercept, and the fit will be "
            f"singular. Keep it as a fixed effect and drop it from the term, e.g. (1 | {group})"
        )
    else:
        message = (
            f"the columns {columns} of {bar.text} are linearly dependent within every level of {group!r} "
            f"(rank at most {int(rank.max())} of {q} in any level), so their variances and correlations "
            "cannot be told apart and the fit will be singular: drop a column from the term"
        )
    warn_user(message)


#: [X Z] is checked for full row rank (a dense SVD) only up to this many observations
_MAX_RANK_CHECK_ROWS = 1000


def _check_residual_identifiable(X: np.ndarray, blocks: list[RandomBlock], n: int) -> None:
    """Refuse fixed and random effects that together reproduce every observation.

    If [X Z] has rank n, the profiled ML deviance has no minimum (σ → 0 as the random
    effects' variance grows) and REML has no residual degree of freedom left.  That can
    only happen when the columns are at least as many as the rows, which is checked first.
    """
    n_re = sum(b.n_effects for b in blocks)
    p = X.shape[1]
    if p + n_re < n or n > _MAX_RANK_CHECK_ROWS:
        return
    cols = [X]
    for b in blocks:
        Zd = np.zeros((n, b.n_effects))
        rows = np.arange(n)
        for c in range(b.q):
            Zd[rows, b.codes * b.q + c] = b.Z[:, c]
        cols.append(Zd)
    A = np.hstack(cols)
    norms = np.linalg.norm(A, axis=0)
    rank = np.linalg.matrix_rank(A / np.where(norms > 0, norms, 1.0))  # unit columns: the rank ignores scale
    if rank >= n:
        terms = ", ".join(f"{b.group}: {b.n_effects}" for b in blocks)
        raise ModelError(
            f"the fixed and random effects together fit every observation exactly ([X Z] has rank {rank} "
            f"for {n} observations: {p} fixed-effect columns and {n_re} random effects, {terms}), which "
            "leaves nothing to estimate the residual variance. Use fewer predictors or random-effect "
            "terms, or more data"
        )


# -- designs for new data (prediction) -------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class NewDesign:
    """The fixed-effect design and each block's columns and codes for new rows.

    Attributes
    ----------
    index : pandas.Index
        The new data's row labels.
    X : ndarray (m, p) or None
        Fixed-effect design, columns as ``spec.fixed_names`` (None when not asked for).
    Z : tuple of ndarray (m, q) or None
        Each block's value columns, in ``spec.blocks`` order and column order.
    codes : tuple of ndarray of int or None
        Each block's level index of every row; a level not seen in fitting has a
        negative code, ``-1 - k`` for the k-th entry of ``new_levels``.
    new_levels : tuple of tuple of str
        Per block, the levels of the new data that the fit has not seen, in order of appearance.
    """

    index: pd.Index
    X: np.ndarray | None
    Z: tuple
    codes: tuple
    new_levels: tuple

    @property
    def n_rows(self) -> int:
        return len(self.index)


class _TrainingDesigns:
    """formulae designs of the training data, kept to evaluate new data with their levels and state."""

    def __init__(self, spec: ModelSpec):
        data = spec.data
        self.parsed = parse_formula(spec.formula)
        self.columns = [str(c) for c in data.columns]
        self.fdata = formulae_frame(data, self.columns)
        self._fixed = None
        self._lhs: dict[str, object] = {}

    def fixed(self):
        if self._fixed is None:
            self._fixed = self._build(self.parsed.fixed)
        return self._fixed

    def lhs(self, expr: str):
        if expr not in self._lhs:
            self._lhs[expr] = self._build(expr)
        return self._lhs[expr]

    def _build(self, rhs: str):
        with np.errstate(divide="ignore", invalid="ignore"):
            return design_matrices(rhs, self.fdata, na_action="error").common


_TRAINING_CACHE: "weakref.WeakKeyDictionary[ModelSpec, _TrainingDesigns]" = weakref.WeakKeyDictionary()


def _training_designs(spec: ModelSpec) -> _TrainingDesigns:
    try:
        return _TRAINING_CACHE[spec]
    except KeyError:
        out = _TRAINING_CACHE[spec] = _TrainingDesigns(spec)
        return out


def group_labels(factor: Sequence[str], data: pd.DataFrame) -> np.ndarray:
    """Level labels of a grouping factor for each row, spelled as :func:`~bayeslmm.formula.core.group_codes` spells levels."""

    def spell(s: pd.Series) -> np.ndarray:
        if isinstance(s.dtype, pd.CategoricalDtype):
            return np.array([str(v) for v in s.to_numpy()], dtype=object)
        if pd.api.types.is_float_dtype(s):
            v = s.to_numpy(dtype=float)
            if np.all(v == np.round(v)):
                return np.array([str(int(x)) for x in v], dtype=object)
        return np.array([str(int(v)) if isinstance(v, (float, np.floating)) and float(v).is_integer() else str(v)
                         for v in s.to_numpy()], dtype=object)

    parts = [spell(data[name]) for name in factor]
    if len(parts) == 1:
        return parts[0]
    return np.array([":".join(p) for p in zip(*parts)], dtype=object)


def _block_terms(spec: ModelSpec, designs: _TrainingDesigns) -> list[BarTerm]:
    """The bar term (as written) behind each of ``spec.blocks``."""
    out = []
    for block in spec.blocks:
        candidates = [bar for bar in designs.parsed.bars if block.group in (":".join(f) for f in bar.factors)]
        if len(candidates) > 1:
            wanted = set(block.columns)
            candidates = [bar for bar in candidates if set(_rename(designs.lhs(bar.lhs).as_dataframe().columns))
                          == wanted] or candidates
        if not candidates:  # cannot happen for a spec built by build_spec
            raise ModelError(f"cannot find the term of block {block.group!r} in {spec.formula!r}")
        out.append(candidates[0])
    return out


def _rename(cols) -> list[str]:
    return [INTERCEPT if c == "Intercept" else str(c) for c in cols]


def new_data_design(spec: ModelSpec, newdata, *, fixed: bool = True, random: bool = True,
                    groups: bool = True, argument: str = "newdata") -> NewDesign:
    """Evaluate the model's design on new rows with the training data's contrasts and levels.

    The fixed-effect columns are formulae's design of the training data evaluated on
    ``newdata`` (same reference levels, same stateful transforms); each block's value
    columns likewise; grouping factors become codes into the fitted levels (negative
    for a level the fit has not seen, see :class:`NewDesign`).

    Parameters
    ----------
    spec : ModelSpec
        A spec that kept its data (``spec.data``).
    newdata : pandas.DataFrame or dict of columns
    fixed, random, groups : bool
        Which parts to build: the fixed-effect design, the blocks' value columns, the
        blocks' level codes.  Only the columns the requested parts use are required.
    argument : str
        The argument's name in error messages.

    Raises
    ------
    DataError
        ``newdata`` is not a table, lacks a column the model uses, has missing or
        non-finite values in one, or has a category of a fixed-effect factor that
        the training data did not have.
    """
    if spec.data is None:
        raise ModelError("this model did not keep its data (cross-products computed out of memory), so it "
                         "cannot build designs for new data; refit from a DataFrame to predict")
    newdata = _new_frame(newdata, argument)
    designs = _training_designs(spec)
    terms = _block_terms(spec, designs)
    need, value_cols = _needed_columns(spec, designs, terms, fixed, random, groups)
    _check_new_columns(newdata, need, argument)
    new_f = newdata[list(need)].copy()
    for name in sorted(value_cols):
        new_f[name] = _match_training_column(name, newdata[name], designs.fdata[name], argument)

    X = None
    if fixed:
        X = _evaluate(designs.fixed(), new_f, list(spec.fixed_names), "the fixed effects", argument)
    Z, codes, new_levels = [], [], []
    for block, term in zip(spec.blocks, terms):
        Z.append(_evaluate(designs.lhs(term.lhs), new_f, list(block.columns), f"the term {term.text}", argument)
                 if random else None)
        c, unseen = _new_codes(block, newdata) if groups else (None, ())
        codes.append(c)
        new_levels.append(unseen)
    return NewDesign(index=newdata.index, X=X, Z=tuple(Z), codes=tuple(codes), new_levels=tuple(new_levels))


def _new_frame(newdata, argument: str) -> pd.DataFrame:
    """New data as a non-empty DataFrame with string column names (a dict of columns or scalars too)."""
    if isinstance(newdata, Mapping):
        try:
            newdata = pd.DataFrame(dict(newdata))
        except ValueError:  # all scalars
            newdata = pd.DataFrame({k: [v] for k, v in newdata.items()})
    newdata = as_pandas(newdata, argument, "(or a dict of columns)")
    if len(newdata) == 0:
        raise DataError(f"{argument} has no rows")
    if not all(isinstance(c, str) for c in newdata.columns):
        newdata = newdata.rename(columns=str)
    return newdata


def _needed_columns(spec: ModelSpec, designs: "_TrainingDesigns", terms: list[BarTerm], fixed: bool,
                    random: bool, groups: bool) -> tuple[dict[str, str], set[str]]:
    """The columns the requested parts use (column -> where), and those used as values."""
    train_cols = set(designs.columns)
    need: dict[str, str] = {}
    value_cols: set[str] = set()

    def add(expr: str, where: str) -> None:
        for name, _ in referenced_names(expr):
            if name in train_cols:
                need.setdefault(name, where)
                value_cols.add(name)

    if fixed:
        add(designs.parsed.fixed, "the fixed effects")
    if random:
        for term in terms:
            add(term.lhs, f"the term {term.text}")
    if groups:
        for block, term in zip(spec.blocks, terms):
            for name in block.group.split(":"):
                need.setdefault(name, f"the grouping factor of {term.text}")
    return need, value_cols


def _check_new_columns(newdata: pd.DataFrame, need: dict[str, str], argument: str) -> None:
    """Refuse new data that lack a needed column or have missing or infinite values in one."""
    have = set(map(str, newdata.columns))
    for name, where in need.items():
        if name not in have:
            raise DataError(f"{argument} lacks the column {name!r}, used in {where} of the model; "
                            f"{argument} has columns {sorted(have)}.{did_you_mean(name, have)}")
    for name, where in need.items():
        s = newdata[name]
        miss = s.isna()
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            miss = miss | ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        if miss.any():
            raise DataError(f"{argument} column {name!r} (used in {where}) has {int(miss.sum())} missing or "
                            f"infinite value(s); fill them or drop those rows before predicting")


def _new_codes(block: RandomBlock, newdata: pd.DataFrame) -> tuple[np.ndarray, tuple[str, ...]]:
    """Codes of new rows into a block's levels; the k-th level the fit has not seen gets -1 - k."""
    labels = group_labels(block.group.split(":"), newdata)
    lookup = {lev: k for k, lev in enumerate(block.levels)}
    c = np.array([lookup.get(lab, -1) for lab in labels], dtype=np.int64)
    unseen = tuple(dict.fromkeys(labels[c < 0]))
    if unseen:
        k = {lab: i for i, lab in enumerate(unseen)}
        c[c < 0] = [-1 - k[lab] for lab in labels[c < 0]]
    return c, unseen


def _match_training_column(name: str, new: pd.Series, train: pd.Series, argument: str) -> pd.Series:
    """``new`` with the training column's type and categories; unseen categories raise."""
    categorical_train = (isinstance(train.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(train)
                         or pd.api.types.is_string_dtype(train) or pd.api.types.is_bool_dtype(train))
    if not categorical_train:
        if pd.api.types.is_bool_dtype(new) or not pd.api.types.is_numeric_dtype(new):
            raise DataError(f"{argument} column {name!r} is not numeric (dtype {new.dtype}), but the model was "
                            "fitted with a numeric column of that name; convert it")
        return new.astype(float)
    known = list(train.cat.categories) if isinstance(train.dtype, pd.CategoricalDtype) else list(pd.unique(train))
    known_str = {str(k): k for k in known}
    values = new.to_numpy()
    unseen = sorted({str(v) for v in values if str(v) not in known_str})
    if unseen:
        raise DataError(f"{argument} column {name!r} has categories {unseen} that the fitted data did not have "
                        f"(known: {sorted(known_str)}); a fixed effect cannot be predicted for an unseen "
                        "category: drop those rows or refit with them")
    mapped = [known_str[str(v)] for v in values]
    if isinstance(train.dtype, pd.CategoricalDtype):
        return pd.Series(pd.Categorical(mapped, categories=train.cat.categories, ordered=train.cat.ordered),
                         index=new.index)
    return pd.Series(mapped, index=new.index, dtype=train.dtype)


def _evaluate(common, new_f: pd.DataFrame, columns: list[str], where: str, argument: str) -> np.ndarray:
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            frame = common.evaluate_new_data(new_f).as_dataframe()
    except Exception as exc:  # formulae raises many kinds; name the place
        raise DataError(f"could not evaluate {where} on {argument}: {exc}") from exc
    frame.columns = _rename(frame.columns)
    absent = [c for c in columns if c not in frame.columns]
    if absent:  # cannot happen when the types match; say so rather than misalign
        raise DataError(f"{where} evaluated on {argument} lacks the columns {absent}")
    out = frame[columns].to_numpy(dtype=float)
    bad = ~np.isfinite(out)
    if bad.any():
        col = columns[int(np.flatnonzero(bad.any(axis=0))[0])]
        raise DataError(f"{where}: the column {col!r} evaluated on {argument} has {int(bad.any(axis=1).sum())} "
                        "non-finite value(s) (log of zero or a negative number?)")
    return out
