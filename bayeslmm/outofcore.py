"""Models from data larger than memory: the cross-products by Dask, partition by partition.

The profiled deviance (REML/ML) and the collapsed likelihood (NUTS) read only the
cross-product blocks of ``[Z X y]`` (:mod:`bayeslmm.crossprod`), and every block is a
sum over rows.  So a Dask DataFrame is read twice, a partition at a time, and never
held whole:

1. **Levels.**  Each partition reports its rows with missing values, the distinct
   values (or value combinations, for ``a:b``) of every grouping factor, and the
   categories of the categorical columns the formula uses; a tree reduction merges
   them.  The grouping factors' levels and codes then come from the in-memory code
   (:func:`bayeslmm.formula.core.group_codes`) run on the distinct values, so they
   are exactly the in-memory model's.
2. **Sums.**  Each partition builds its design with the in-memory code (formulae,
   through :mod:`bayeslmm.formula.core`) with the levels held fixed — a few
   *padding* rows carrying every level of every categorical column are appended
   before the design is built and dropped after it, so that formulae encodes every
   partition with the same contrasts — and returns its partial sums: ``Z₁ⱼᵀZ₁ⱼ``,
   ``Z₁ⱼᵀ[X y]`` per level of the largest factor, ``[Z_rest X y]ᵀ[Z_rest X y]``,
   ``[Z_rest X y]ᵀZ₁``, and the moments (count, mean, sum of squared deviations) of y
   and of each design column for the default priors.  A tree reduction adds them.

The result is an ordinary :class:`~bayeslmm.crossprod.CrossProducts` and a
:class:`~bayeslmm.spec.ModelSpec` that keeps no per-row arrays (``spec.n_rows`` is
the number of rows, ``spec.rows_in_memory`` is False): REML/ML fits and collapsed
NUTS fits read nothing else.  Fitted values and residuals, which need the rows,
raise a :class:`~bayeslmm.errors.DataError` saying so.

The graph runs on Dask's default scheduler (the local threaded one) or, when the
user has created a ``distributed.Client``, on that cluster; nothing here starts
one.  See ``docs/scale.md`` for the ceiling and what grows with what.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .crossprod import MAX_REST_COLUMNS, CrossProducts, per_level_products, block_Z
from .errors import DataError, FormulaError, ModelError
from .formula.core import (
    INTERCEPT,
    bar_factors,
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
    design_matrix,
    fixed_design,
    formulae_frame,
    group_codes,
    lhs_design,
    lme4_order,
    missing_mask,
    note_dropped_columns,
    parse_mixed_formula,
    report_missing,
    response_values,
    value_expressions,
    warn_far_slope,
    warn_offset,
)
from .formula.parse import referenced_names
from .spec import Moments, ModelSpec, RandomBlock, RowMoments

__all__ = ["is_dask_dataframe", "is_parquet_source", "read_parquet", "build_out_of_core"]

log = logging.getLogger(__name__)

#: partial results merged per node of the tree reduction
SPLIT_EVERY = 8
#: formulae's stateful transforms: their parameters would be computed per partition
_STATEFUL = ("center", "scale", "standardize", "poly", "bs", "cr", "cc", "tp")
#: formulae calls that make a categorical from their first argument
_CATEGORICAL_CALLS = ("C", "S", "T")


# -- what counts as out-of-core input ----------------------------------------------------

def is_dask_dataframe(obj) -> bool:
    """True for a ``dask.dataframe`` DataFrame (without importing Dask for other inputs)."""
    mod = type(obj).__module__ or ""
    return mod.startswith(("dask.", "dask_expr")) and hasattr(obj, "to_delayed") and hasattr(obj, "npartitions")


def is_parquet_source(source) -> bool:
    """True for a string or path naming a Parquet file, a folder of them, or a glob."""
    if not isinstance(source, (str, Path)):
        return False
    s = str(source)
    if any(ch in s for ch in "*?["):
        return True
    if s.lower().endswith((".parquet", ".pq")):
        return True
    p = Path(s)
    return p.is_dir() and any(p.glob("*.parquet"))


def read_parquet(source, columns: Sequence[str] | None = None):
    """A lazy Dask DataFrame over a Parquet file, folder or glob (nothing is read yet)."""
    try:
        import dask.dataframe as dd
    except ImportError as exc:  # pragma: no cover - dask is a test dependency
        raise DataError("reading data out of memory needs Dask: pip install 'bayeslmm[dask]'") from exc
    s = str(source)
    if any(ch in s for ch in "*?["):
        paths = sorted(glob.glob(s))
        if not paths:
            raise DataError(f"data {s!r}: no Parquet file matches this pattern")
    elif not Path(s).exists():
        raise DataError(f"data {s!r}: no such Parquet file or folder")
    else:
        paths = s
    try:
        return dd.read_parquet(paths, columns=list(columns) if columns is not None else None)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise DataError(f"data {s!r}: could not read it as Parquet ({exc})") from exc


# -- the tree reduction -------------------------------------------------------------------

def _tree_reduce(parts: list, combine, split_every: int = SPLIT_EVERY):
    """A Delayed that folds ``parts`` (in order) with ``combine``, ``split_every`` at a node."""
    import dask

    level = list(parts)
    while len(level) > 1:
        level = [dask.delayed(_fold, pure=True)(level[i : i + split_every], combine)
                 for i in range(0, len(level), split_every)]
    return level[0] if level else dask.delayed(lambda: None)()


def _fold(items: list, combine):
    out = None
    for item in items:
        if item is None:
            continue
        out = item if out is None else combine(out, item)
    return out


def _compute(delayed):
    import dask

    (result,) = dask.compute(delayed)
    return result


# -- pass 1: rows, missing values, levels ---------------------------------------------------

@dataclasses.dataclass
class _Scan:
    """What pass 1 learns from some partitions."""

    rows: int
    kept: int
    missing: dict
    combos: list            # per factor: DataFrame of distinct value combinations
    categories: dict        # categorical column -> categories, in order of first appearance
    values: dict            # other categorical-in-the-formula column -> distinct values
    head: pd.DataFrame | None

    def combine(self, other: "_Scan") -> "_Scan":
        missing = dict(self.missing)
        for k, v in other.missing.items():
            missing[k] = missing.get(k, 0) + v
        combos = [pd.concat([a, b], ignore_index=True).drop_duplicates(ignore_index=True)
                  for a, b in zip(self.combos, other.combos)]
        cats = {k: _ordered_union(v, other.categories[k]) for k, v in self.categories.items()}
        values = {k: pd.unique(np.concatenate([v, other.values[k]])) for k, v in self.values.items()}
        head = self.head if self.head is not None and len(self.head) else other.head
        return _Scan(self.rows + other.rows, self.kept + other.kept, missing, combos, cats, values, head)


def _ordered_union(a: list, b: list) -> list:
    seen = set(a)
    return list(a) + [x for x in b if x not in seen]


def _scan_partition(part: pd.DataFrame, used: list[str], missing: str, factors: list[tuple[str, ...]],
                    categorical: list[str], value_cols: list[str]) -> _Scan:
    rows = len(part)
    bad, counts = missing_mask(part, used)
    kept = rows - int(bad.sum())
    if missing == "drop" and bad.any():
        part = part.loc[~bad]
    elif bad.any():
        part = part.iloc[:0]  # an error is raised after the pass; nothing else is needed
    combos = []
    for factor in factors:
        u = part[list(factor)].drop_duplicates(ignore_index=True)
        for col in factor:
            if isinstance(u[col].dtype, pd.CategoricalDtype):
                u[col] = u[col].astype(object)
        combos.append(u)
    cats = {col: list(part[col].cat.categories) for col in categorical}
    # the values that occur (for categoricals, the used categories; their order comes from `cats`)
    values = {col: np.asarray(_present_values(part[col]), dtype=object) for col in value_cols}
    return _Scan(rows, kept, counts, combos, cats, values, part.head(5))


def _present_values(s: pd.Series):
    """The distinct values of a column (for a categorical: the categories that occur)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes = s.cat.codes.to_numpy()
        return s.cat.categories[np.unique(codes[codes >= 0])]
    return pd.unique(s)


# -- pass 2: the sums ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _FactorLookup:
    """Maps a partition's grouping values to the in-memory level codes."""

    columns: tuple[str, ...]
    values: tuple            # per column: pandas Index of the distinct values
    strides: np.ndarray
    table: np.ndarray | None  # dense key -> code (or None: use sorted keys)
    keys: np.ndarray | None
    key_codes: np.ndarray | None

    @classmethod
    def build(cls, factor: tuple[str, ...], distinct: pd.DataFrame, codes: np.ndarray) -> "_FactorLookup":
        values = tuple(pd.Index(np.asarray(distinct[c].astype(object).unique(), dtype=object))
                       if isinstance(distinct[c].dtype, pd.CategoricalDtype) else pd.Index(distinct[c].unique())
                       for c in factor)
        sizes = np.array([len(v) for v in values], dtype=np.int64)
        strides = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)
        keys = sum(cls._column_codes(distinct[c], v) * s for c, v, s in zip(factor, values, strides))
        total = int(np.prod(sizes.astype(float)))
        if total <= 50_000_000:
            table = np.full(int(np.prod(sizes)), -1, dtype=np.int64)
            table[keys] = codes
            return cls(tuple(factor), values, strides, table, None, None)
        order = np.argsort(keys)
        return cls(tuple(factor), values, strides, None, keys[order], codes[order])

    @staticmethod
    def _column_codes(s: pd.Series, values: pd.Index) -> np.ndarray:
        if isinstance(s.dtype, pd.CategoricalDtype):
            per_cat = values.get_indexer(pd.Index(s.cat.categories.astype(object)))
            per_cat = np.append(per_cat, -1)  # code -1 (missing) maps to -1
            return per_cat[s.cat.codes.to_numpy()]
        return values.get_indexer(s)

    def codes(self, part: pd.DataFrame) -> np.ndarray:
        cols = [self._column_codes(part[c], v) for c, v in zip(self.columns, self.values)]
        if any((c < 0).any() for c in cols):
            raise DataError(
                f"grouping factor {':'.join(self.columns)!r}: a partition holds a value that the first "
                "pass over the data did not see; did the data change between the two passes?"
            )
        key = sum(c.astype(np.int64) * s for c, s in zip(cols, self.strides))
        if self.table is not None:
            out = self.table[key]
        else:
            pos = np.searchsorted(self.keys, key)
            pos = np.minimum(pos, len(self.keys) - 1)
            out = np.where(self.keys[pos] == key, self.key_codes[pos], -1)
        if (out < 0).any():
            raise DataError(f"grouping factor {':'.join(self.columns)!r}: a value combination the first pass "
                            "did not see; did the data change between the two passes?")
        return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a partition needs to build its design and sums (shipped to each task)."""

    used: list[str]
    missing: str
    cat_dtypes: dict          # categorical column -> CategoricalDtype with the global categories
    pad: pd.DataFrame | None  # rows carrying every level, appended before the design is built
    response: str
    fixed: str
    fixed_names: list[str]
    lhs_names: dict           # lhs expression -> its design columns
    lookups: list             # per factor
    blocks: list              # per final block: (factor index, lhs expression, columns)
    n_levels: list
    block_terms: list         # per final block: its bar term as written


@dataclasses.dataclass
class _Sums:
    """Partial sums of some partitions."""

    n: int
    XyXy: np.ndarray
    A11: np.ndarray
    Bxy: np.ndarray           # (n1, p+1, q1)
    ZrZr: sp.csr_matrix | None
    ZrXy: np.ndarray | None
    ZrZ1: sp.csr_matrix | None
    mom_y: Moments
    mom_X: Moments
    mom_Z: list

    def combine(self, o: "_Sums") -> "_Sums":
        return _Sums(
            self.n + o.n, self.XyXy + o.XyXy, self.A11 + o.A11, self.Bxy + o.Bxy,
            None if self.ZrZr is None else self.ZrZr + o.ZrZr,
            None if self.ZrXy is None else self.ZrXy + o.ZrXy,
            None if self.ZrZ1 is None else self.ZrZ1 + o.ZrZ1,
            self.mom_y.combine(o.mom_y), self.mom_X.combine(o.mom_X),
            [a.combine(b) for a, b in zip(self.mom_Z, o.mom_Z)],
        )


def _formula_frame(part: pd.DataFrame, plan: _Plan) -> pd.DataFrame:
    """The partition with the global categories, the padding rows appended, as formulae sees it."""
    part = part.copy(deep=False)
    for col, dtype in plan.cat_dtypes.items():
        part[col] = part[col].cat.set_categories(dtype.categories)
    if plan.pad is not None:
        part = pd.concat([part, plan.pad], ignore_index=True)
    return formulae_frame(part, plan.used)


def _check_names(got: list[str], expected: list[str], where: str) -> None:
    if got != expected:
        raise ModelError(
            f"{where}: a partition's design has columns {got}, another's {expected}; a term takes its "
            "levels or parameters from the rows it sees. Make such columns pandas Categoricals (or "
            "transform them) in the Dask DataFrame before building the model"
        )


def _partition_sums(part: pd.DataFrame, plan: _Plan) -> _Sums | None:
    part = part[plan.used]
    bad, _ = missing_mask(part, plan.used)
    if bad.any():
        part = part.loc[~bad]
    n = len(part)
    if n == 0:
        return None
    fdata = _formula_frame(part, plan)
    y = response_values(plan.response, fdata)[:n]  # the padding rows come last
    Xf = design_matrix(plan.fixed, fdata, "the fixed effects")
    _check_names(list(map(str, Xf.columns)), plan.fixed_names, "the fixed effects")
    X = Xf.to_numpy()[:n]
    lhs = {}
    for expr, names in plan.lhs_names.items():
        frame = design_matrix(expr, fdata, f"the random-effect term ({expr} | ...)")
        _check_names(list(map(str, frame.columns)), names, f"the random-effect term ({expr} | ...)")
        lhs[expr] = frame.iloc[:n]
    codes = [lk.codes(part) for lk in plan.lookups]
    Zs = [np.ascontiguousarray(lhs[expr][list(cols)].to_numpy()) for _, expr, cols in plan.blocks]
    cs = [codes[f] for f, _, _ in plan.blocks]

    Xy = np.column_stack([X, y])
    n1 = plan.n_levels[0]
    A11 = per_level_products(cs[0], Zs[0], Zs[0], n1)
    Bxy = per_level_products(cs[0], Xy, Zs[0], n1)
    ZrZr = ZrXy = ZrZ1 = None
    if len(plan.blocks) > 1:
        mats = []
        for (_, _, cols), c, Z, nl in zip(plan.blocks[1:], cs[1:], Zs[1:], plan.n_levels[1:]):
            mats.append(block_Z(RandomBlock(group="", codes=c, levels=tuple(range(nl)), Z=Z, columns=tuple(cols))))
        Zr = sp.hstack(mats, format="csc")
        Z1 = block_Z(RandomBlock(group="", codes=cs[0], levels=tuple(range(n1)), Z=Zs[0], columns=()))
        ZrZr = sp.csr_matrix(Zr.T @ Zr)
        ZrXy = np.asarray(Zr.T @ Xy)
        ZrZ1 = sp.csr_matrix(Zr.T @ Z1)
    mom_X = Moments.of(X)
    return _Sums(n, Xy.T @ Xy, A11, Bxy, ZrZr, ZrXy, ZrZ1, Moments.of(y), mom_X,
                 [_block_moments(Z, cols, X, plan.fixed_names, mom_X) for (_, _, cols), Z in zip(plan.blocks, Zs)])


def _block_moments(Z: np.ndarray, cols, X: np.ndarray, names: list[str], mom_X: Moments) -> Moments:
    """Moments of a block's columns, taken from X's where they are the same columns (1 + x)."""
    pos = [names.index(c) if c in names else -1 for c in cols]
    if all(k >= 0 and np.array_equal(Z[:, a], X[:, k]) for a, k in enumerate(pos)):
        return mom_X.take(pos)
    return Moments.of(Z)


# -- the model ---------------------------------------------------------------------------------

def _check_transforms(parsed) -> None:
    """Refuse stateful transforms and categorical calls on expressions (they would differ per partition)."""
    for expr, where in value_expressions(parsed):
        for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_.]*)\s*\(", expr):
            name = m.group(1).split(".")[-1]
            if name in _STATEFUL:
                raise FormulaError(
                    f"{where}: {m.group(1)}() computes its parameters (means, sds, knots) from the rows "
                    "it sees, which out of memory would be one partition at a time; compute the "
                    "transformed column in the Dask DataFrame first (ddf['x_c'] = ddf.x - ddf.x.mean())"
                )


def _categorical_call_columns(parsed, columns: set[str]) -> list[str]:
    """Columns wrapped in C(), S() or T(); anything else inside them is refused."""
    out = []
    for expr, _ in value_expressions(parsed):
        for m in re.finditer(r"(?<![A-Za-z0-9_.])([CST])\s*\(\s*(`[^`]+`|[A-Za-z_][A-Za-z0-9_.]*)\s*([,)])", expr):
            name = m.group(2).strip("`")
            if name in columns and name not in out:
                out.append(name)
        for m in re.finditer(r"(?<![A-Za-z0-9_.])([CST])\s*\(", expr):
            rest = expr[m.end():]
            mm = re.match(r"\s*(`[^`]+`|[A-Za-z_][A-Za-z0-9_.]*)\s*[,)]", rest)
            if not mm or mm.group(1).strip("`") not in columns:
                raise FormulaError(
                    f"{m.group(1)}() in {expr!r} must wrap a column name when the model is built out of "
                    "memory (its levels are collected in a first pass); make the expression a column of "
                    "the Dask DataFrame first"
                )
    return out


def build_out_of_core(
    formula: str,
    data,
    groups: Mapping[str, str] | Sequence[str] | str | None = None,
    missing: str = "raise",
    rank_deficient: str = "drop",
    split_every: int = SPLIT_EVERY,
) -> tuple[ModelSpec, CrossProducts]:
    """The model specification and cross-products of a Dask DataFrame, in two passes.

    The stages of :mod:`bayeslmm.formula.core`, as :func:`bayeslmm.formula.build_spec`
    runs them, with each stage's input gathered over the partitions.

    Parameters
    ----------
    formula, groups, missing, rank_deficient
        As for :class:`bayeslmm.Model`; the same checks and messages as in memory.
    data : dask.dataframe.DataFrame, or a Parquet file, folder or glob
    split_every : int
        Partial results merged at each node of the tree reduction.

    Returns
    -------
    (ModelSpec, CrossProducts)
        The spec has no per-row arrays (``spec.rows_in_memory`` is False); the
        cross-products equal :meth:`CrossProducts.from_spec` of the in-memory model
        to rounding.
    """
    check_options(missing, rank_deficient)
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise DataError(f"split_every must be an integer ≥ 2, got {split_every!r}")
    data = _dask_frame(data)
    formula_full, parsed = parse_mixed_formula(formula, groups)
    roles = _column_roles(parsed, data._meta)
    ddf = data[roles.used]
    scan = _first_pass(ddf, roles, missing, split_every)
    notes = report_missing(scan.missing, scan.rows - scan.kept, scan.rows, missing)
    check_rows(scan.kept, after_missing=True)
    levels = _Levels.of(scan, roles, data._meta)
    plan, blocks = _plan(parsed, roles, levels, scan, missing)
    sums = _second_pass(ddf, plan, split_every, scan.kept)
    _check_values(parsed.response, plan, sums)
    keep, dropped = _independent_columns(sums.XyXy[:-1, :-1], plan.fixed_names, rank_deficient)
    notes += note_dropped_columns(dropped)
    _check_fixed_columns(plan, sums, keep, scan.kept)
    _check_block_values(plan, sums)
    spec = ModelSpec(
        formula=formula_full, response=parsed.response, y=np.zeros(0), X=np.zeros((0, len(keep))),
        fixed_names=tuple(plan.fixed_names[k] for k in keep), blocks=tuple(blocks),
        row_index=np.zeros(0, dtype=np.int64), notes=tuple(notes), dropped_fixed=tuple(dropped),
        fixed_formula=parsed.fixed, data=None, missing=missing, rank_deficient=rank_deficient,
        n_rows=scan.kept, moments=RowMoments(y=sums.mom_y, X=sums.mom_X.take(keep), Z=tuple(sums.mom_Z)),
    )
    return spec, _crossproducts(sums, keep, blocks)


# -- the stages -------------------------------------------------------------------------------------

def _dask_frame(data):
    """``data`` as a Dask DataFrame with string column names (a Parquet path is opened lazily)."""
    if is_parquet_source(data):
        data = read_parquet(data)
    if not is_dask_dataframe(data):
        raise DataError(f"data must be a Dask DataFrame or a Parquet path, got {type(data).__name__}")
    if not all(isinstance(c, str) for c in data.columns):
        data = data.rename(columns={c: str(c) for c in data.columns})
    return data


@dataclasses.dataclass(frozen=True)
class _Roles:
    """What the formula does with each column, read from the columns' types alone."""

    used: list[str]
    factors: list[tuple[str, ...]]   # the distinct grouping factors
    categorical: list[str]           # pandas Categorical columns: their categories are merged
    value_cols: list[str]            # columns formulae turns into contrasts: their levels are gathered


def _column_roles(parsed, meta: pd.DataFrame) -> _Roles:
    """The in-memory column and type checks on the (empty) meta frame, and each column's role."""
    used = check_columns(parsed, meta)
    check_no_datetimes(parsed, meta)
    _check_transforms(parsed)
    check_response_type(parsed.response, meta)
    expr_cols = {name for expr, _ in value_expressions(parsed) for name, _ in referenced_names(expr)
                 if name in meta.columns}
    call_cols = _categorical_call_columns(parsed, set(map(str, meta.columns)))
    value_cols = [c for c in used if c in expr_cols and (c in call_cols or not (
        pd.api.types.is_numeric_dtype(meta[c]) or pd.api.types.is_bool_dtype(meta[c])))]
    categorical = [c for c in used if isinstance(meta[c].dtype, pd.CategoricalDtype)]
    return _Roles(used, bar_factors(parsed), categorical, value_cols)


def _first_pass(ddf, roles: _Roles, missing: str, split_every: int) -> _Scan:
    """Pass 1: rows, missing values, distinct grouping values, categories."""
    import dask

    t0 = time.perf_counter()
    parts = [dask.delayed(_scan_partition, pure=True)(p, roles.used, missing, roles.factors, roles.categorical,
                                                      roles.value_cols)
             for p in ddf.to_delayed()]
    scan: _Scan | None = _compute(_tree_reduce(parts, _Scan.combine, split_every))
    log.info("pass 1 (rows, missing values, levels): %d partitions, %d rows, %.2f s", len(parts),
             0 if scan is None else scan.rows, time.perf_counter() - t0)
    check_rows(0 if scan is None else scan.rows)
    return scan


@dataclasses.dataclass(frozen=True)
class _Levels:
    """The levels pass 1 found: categories, contrast levels, grouping factors' levels and codes."""

    cat_dtypes: dict      # categorical column -> CategoricalDtype with the global categories
    levels_of: dict       # value column -> its levels, in the order formulae would use
    lookups: list         # per factor: _FactorLookup
    factor_levels: list   # per factor: level labels (the in-memory ones)

    @classmethod
    def of(cls, scan: _Scan, roles: _Roles, meta: pd.DataFrame) -> "_Levels":
        # categories: the union in order of appearance (as concatenating the partitions gives)
        cat_dtypes = {c: pd.CategoricalDtype(scan.categories[c], ordered=meta[c].dtype.ordered)
                      for c in roles.categorical}
        levels_of: dict[str, list] = {}
        for c in roles.value_cols:
            present = scan.values[c]
            if c in cat_dtypes:
                keep = set(present.tolist())
                levels_of[c] = [v for v in scan.categories[c] if v in keep]
            else:
                levels_of[c] = sorted(np.unique(present).tolist())
        # grouping factors: the in-memory code on the distinct values gives the levels and codes
        lookups, factor_levels = [], []
        for factor, distinct in zip(roles.factors, scan.combos):
            distinct = distinct.copy()
            for c in factor:
                if c in cat_dtypes:
                    distinct[c] = pd.Categorical(distinct[c], dtype=cat_dtypes[c])
            codes, levels = group_codes(factor, distinct)
            lookups.append(_FactorLookup.build(factor, distinct, codes))
            factor_levels.append(levels)
        return cls(cat_dtypes, levels_of, lookups, factor_levels)


def _padding_rows(head: pd.DataFrame, levels: _Levels) -> pd.DataFrame:
    """Rows carrying every level of every categorical column, other columns from a real row."""
    head = head.reset_index(drop=True)
    L = max([len(v) for v in levels.levels_of.values()] + [1])
    pad = head.iloc[[0] * L].reset_index(drop=True)
    for c, dtype in levels.cat_dtypes.items():
        pad[c] = pad[c].astype(dtype)
    for c, lev in levels.levels_of.items():
        vals = np.resize(np.array(lev, dtype=object), L)
        if c in levels.cat_dtypes:
            pad[c] = pd.Categorical(vals, dtype=levels.cat_dtypes[c])
        else:
            pad[c] = pd.Series(vals).astype(head[c].dtype)
    return pad


def _plan(parsed, roles: _Roles, levels: _Levels, scan: _Scan, missing: str) -> tuple["_Plan", list[RandomBlock]]:
    """The designs' columns (from the padding rows), the blocks in lme4's order, and what pass 2 needs."""
    pad = _padding_rows(scan.head, levels)
    proto = formulae_frame(pad, roles.used)
    response_values(parsed.response, proto)  # an expression must give one column
    fixed_names = list(map(str, fixed_design(parsed, proto).columns))
    lhs_names: dict[str, list[str]] = {}
    for bar in parsed.bars:
        if bar.lhs not in lhs_names:
            lhs_names[bar.lhs] = list(map(str, lhs_design(bar, proto).columns))
    blocks, plan_blocks, block_bars = _block_layout(parsed, roles.factors, levels.factor_levels, lhs_names,
                                                    scan.kept)
    _check_dense_size(blocks, len(fixed_names))
    plan = _Plan(used=roles.used, missing=missing, cat_dtypes=levels.cat_dtypes,
                 pad=pad if levels.levels_of else None, response=parsed.response, fixed=parsed.fixed,
                 fixed_names=fixed_names, lhs_names=lhs_names, lookups=levels.lookups, blocks=plan_blocks,
                 n_levels=[b.n_levels for b in blocks], block_terms=[bar.text for bar in block_bars])
    return plan, blocks


def _block_layout(parsed, factors, factor_levels, lhs_names, n):
    """Block templates (no rows) in lme4's order, checked as in memory; per block its factor, term and columns."""
    templates, sources = [], []
    for bar in parsed.bars:
        cols = tuple(lhs_names[bar.lhs])
        q = len(cols)
        for factor in bar.factors:
            f = factors.index(factor)
            levels = factor_levels[f]
            check_levels(bar, ":".join(factor), levels, q, n)
            block = RandomBlock(group=":".join(factor), codes=np.zeros(0, dtype=np.int64), levels=levels,
                                Z=np.zeros((0, q)), columns=cols, correlated=not bar.independent or q == 1)
            templates.append(block)
            sources.append((f, bar, block))
    blocks = lme4_order(templates)
    plan_blocks, block_bars = [], []
    for b in blocks:
        k = next(i for i, (_, _, t) in enumerate(sources)
                 if t.group == b.group and set(t.columns) == set(b.columns) and t.correlated == b.correlated)
        f, bar, _ = sources.pop(k)
        plan_blocks.append((f, bar.lhs, b.columns))
        block_bars.append(bar)
    return blocks, plan_blocks, block_bars


def _check_dense_size(blocks: list[RandomBlock], p_all: int) -> None:
    n_rest = sum(b.n_effects for b in blocks[1:])
    if n_rest + p_all + 1 > MAX_REST_COLUMNS:
        raise ModelError(
            f"the random-effect blocks after the one with the most levels have {n_rest} effects, so the "
            f"dense part of the factorisation would be {n_rest + p_all + 1}×{n_rest + p_all + 1}; bayeslmm "
            f"handles up to {MAX_REST_COLUMNS}. Reduce the levels or slopes of the smaller grouping factors"
        )


def _second_pass(ddf, plan: "_Plan", split_every: int, n: int) -> "_Sums":
    """Pass 2: each partition's design and partial sums, added up."""
    import dask

    t0 = time.perf_counter()
    parts = [dask.delayed(_partition_sums, pure=True)(p, plan) for p in ddf.to_delayed()]
    sums: _Sums = _compute(_tree_reduce(parts, _Sums.combine, split_every))
    log.info("pass 2 (design and cross-products): %d partitions, %.2f s", len(parts), time.perf_counter() - t0)
    if sums.n != n:
        raise DataError(f"the second pass over the data saw {sums.n} rows, the first {n}; did the data change?")
    return sums


def _check_values(response: str, plan: "_Plan", sums: "_Sums") -> None:
    """The in-memory checks of the response's and the fixed-effect columns' values, from their moments."""
    y = sums.mom_y
    check_response_spread(response, float(y.minimum[0]), float(y.maximum[0]), float(y.max_abs[0]))
    for j, col in enumerate(plan.fixed_names):
        check_scale(f"the fixed-effect column {col!r}", float(sums.mom_X.max_abs[j]))


def _check_block_values(plan: "_Plan", sums: "_Sums") -> None:
    """The in-memory checks of the blocks' columns, from their moments (after the fixed effects', as there)."""
    for (_, _, cols), term, mom in zip(plan.blocks, plan.block_terms, sums.mom_Z):
        for j, col in enumerate(cols):
            check_scale(f"the column {col!r} of {term}", float(mom.max_abs[j]))
        if len(cols) > 1 and INTERCEPT in cols:
            for j, col in enumerate(cols):
                if col != INTERCEPT:
                    warn_far_slope(term, col, float(mom.mean[j]), float(np.sqrt(mom.m2[j] / mom.n)))


def _check_fixed_columns(plan: "_Plan", sums: "_Sums", keep: list[int], n: int) -> None:
    """The in-memory offset warnings and column count for the kept fixed-effect columns."""
    names = [plan.fixed_names[k] for k in keep]
    if INTERCEPT in names:
        for k, col in zip(keep, names):
            if col != INTERCEPT:
                m = sums.mom_X
                warn_offset(f"the fixed-effect column {col!r}", float(m.mean[k]), float(np.sqrt(m.m2[k] / m.n)))
    check_fixed_count(len(keep), n)


def _crossproducts(sums: "_Sums", keep: list[int], blocks: list[RandomBlock]) -> CrossProducts:
    """The summed blocks without the dropped fixed-effect columns, as CrossProducts."""
    p_all = sums.XyXy.shape[0] - 1
    kxy = np.array(keep + [p_all])
    p = len(keep)
    XyXy = sums.XyXy[np.ix_(kxy, kxy)]
    n1, q1 = blocks[0].n_levels, blocks[0].q
    B_xy = sums.Bxy[:, kxy, :].transpose(1, 0, 2).reshape(p + 1, n1 * q1)
    if len(blocks) > 1:
        ZrXy = sums.ZrXy[:, kxy]
        Arr = np.block([[sums.ZrZr.toarray(), ZrXy], [ZrXy.T, XyXy]])
        B = sp.vstack([sums.ZrZ1, sp.csr_matrix(B_xy)], format="csr")
    else:
        Arr = XyXy
        B = sp.csr_matrix(B_xy)
    t0 = time.perf_counter()
    cp = CrossProducts.from_blocks(sums.n, p, blocks[0], tuple(blocks[1:]), sums.A11, Arr, B)
    log.info("cross-product blocks assembled (m = %d, nnz(P) = %d): %.2f s", cp.m, cp.P.nnz, time.perf_counter() - t0)
    return cp


def _independent_columns(G: np.ndarray, names: list[str], rank_deficient: str) -> tuple[list[int], list[str]]:
    """Columns kept left to right while each adds a direction, from the Gram matrix XᵀX.

    The in-memory rule (a column is kept when its residual after projection on the
    kept ones is longer than 1e-7 of its norm, as a pivoting QR decides); here the
    squared residual is the Schur complement G_jj − G_jK G_KK⁻¹ G_Kj.
    """
    kept: list[int] = []
    R = np.zeros((0, 0))  # Cholesky factor (upper) of G[kept, kept]
    for j in range(G.shape[0]):
        gjj = G[j, j]
        if gjj <= 0:
            continue
        if kept:
            r = np.linalg.solve(R.T, G[kept, j]) if len(kept) else np.zeros(0)
            res2 = gjj - r @ r
        else:
            r, res2 = np.zeros(0), gjj
        if res2 > (1e-7) ** 2 * gjj:
            d = np.sqrt(res2)
            R = np.block([[R, r[:, None]], [np.zeros((1, len(kept))), np.array([[d]])]])
            kept.append(j)
    dropped = [names[j] for j in range(G.shape[0]) if j not in kept]
    check_rank_deficient(dropped, rank_deficient)
    return kept, dropped
