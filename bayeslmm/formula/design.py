"""Build a :class:`~bayeslmm.spec.ModelSpec` from a formula and a DataFrame.

formulae builds the fixed-effect design (contrasts, transformations, ``0 +``) and
each bar term's left side; the grouping factors are turned into integer codes
directly, so a random-effect term is a few value columns plus codes rather than
formulae's whole group-specific matrix (which took seconds on InstEval).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from formulae import design_matrices

from ..errors import DataError, FormulaError, ModelError, did_you_mean
from ..spec import ModelSpec, RandomBlock
from .parse import BarTerm, ParsedFormula, parse_formula, referenced_names

INTERCEPT = "(Intercept)"


def formula_with_groups(formula: str, groups: Mapping[str, str] | Sequence[str] | str | None) -> str:
    """Append the grouping-columns form to a formula.

    ``groups={"school": "1 + x"}`` adds ``(1 + x | school)``; a column name or a list
    of names adds a random intercept for each.
    """
    if groups is None:
        return formula
    if isinstance(groups, str):
        groups = [groups]
    if isinstance(groups, Mapping):
        items = list(groups.items())
    elif isinstance(groups, Sequence):
        items = [(g, "1") for g in groups]
    else:
        raise FormulaError(
            "groups must be a column name, a list of column names, or a dict "
            "{column: 'random-effect formula'} such as {'school': '1 + x'}"
        )
    extra = []
    for g, lhs in items:
        if not isinstance(g, str) or not isinstance(lhs, str) or not lhs.strip():
            raise FormulaError(
                f"groups entry {g!r}: {lhs!r} must map a column name to a formula such as '1 + x'"
            )
        name = g if g.isidentifier() else f"`{g}`"
        extra.append(f"({lhs} | {name})")
    return f"{formula} + " + " + ".join(extra)


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


def _check_columns(parsed: ParsedFormula, data: pd.DataFrame) -> list[str]:
    """All data columns the formula uses; unknown names raise a DataError."""
    cols = set(map(str, data.columns))
    duplicated = set(map(str, data.columns[data.columns.duplicated()]))
    used: list[str] = []

    def need(name: str, where: str, known_functions: bool = True) -> None:
        if name in cols:
            if name in duplicated:
                raise DataError(
                    f"the data have more than one column named {name!r} (used in {where} of the "
                    "formula); rename or drop the duplicates"
                )
            if name not in used:
                used.append(name)
            return
        if known_functions and name in _NON_COLUMNS:
            return
        raise DataError(
            f"unknown column {name!r} in {where} of the formula; the data have columns "
            f"{sorted(cols)}.{did_you_mean(name, cols)}"
        )

    for name, _ in referenced_names(parsed.response):
        need(name, "the response")
    for name, _ in referenced_names(parsed.fixed):
        need(name, "the fixed effects")
    for bar in parsed.bars:
        for name, _ in referenced_names(bar.lhs):
            need(name, f"the term {bar.text}")
        for factor in bar.factors:
            for name in factor:
                need(name, f"the grouping factor of {bar.text}", known_functions=False)
    return used


def _check_no_datetimes(parsed: ParsedFormula, data: pd.DataFrame) -> None:
    """Refuse dates and durations as values (formulae cannot use them); as grouping factors they are fine."""
    parts = [(parsed.response, "the response"), (parsed.fixed, "the fixed effects")]
    parts += [(bar.lhs, f"the term {bar.text}") for bar in parsed.bars]
    for expr, where in parts:
        for name, _ in referenced_names(expr):
            if name not in data.columns:
                continue
            s = data[name]
            kind = pd.api.types.infer_dtype(s, skipna=True) if pd.api.types.is_object_dtype(s) else ""
            if pd.api.types.is_timedelta64_dtype(s) or kind == "timedelta":
                raise DataError(
                    f"the column {name!r} (used in {where}) holds durations (dtype {s.dtype}); a model needs "
                    f"numbers: convert it, e.g. to days: data[{name!r}] = data[{name!r}].dt.total_seconds() / 86400")
            if pd.api.types.is_datetime64_any_dtype(s) or kind in ("datetime", "datetime64", "date"):
                raise DataError(
                    f"the column {name!r} (used in {where}) holds dates or times (dtype {s.dtype}); a model "
                    "needs numbers: convert it, e.g. to days since the first date: "
                    f"data[{name!r}] = (pd.to_datetime(data[{name!r}]) - pd.to_datetime(data[{name!r}]).min()).dt.days")


# names formulae understands that are not columns (modules, constants, contrasts)
_NON_COLUMNS = {"np", "numpy", "math", "True", "False", "None", "Treatment", "Sum", "Helmert",
                "Diff", "Poly", "pi", "inf", "nan"}


def _check_missing(data: pd.DataFrame, used: list[str], missing: str) -> tuple[pd.DataFrame, list[str]]:
    notes: list[str] = []
    bad = pd.Series(False, index=data.index)
    counts = {}
    for col in used:
        s = data[col]
        miss = s.isna()
        if pd.api.types.is_complex_dtype(s):  # refused as a response later; no cast to float here
            miss = miss | ~np.isfinite(s.to_numpy())
        elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            miss = miss | ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        if miss.any():
            counts[col] = int(miss.sum())
            bad |= miss
    if not counts:
        return data, notes
    detail = ", ".join(f"{c!r}: {k} row{'s' if k != 1 else ''}" for c, k in counts.items())
    if missing == "raise":
        raise DataError(
            f"missing or infinite values in the columns the model uses ({detail}; "
            f"{int(bad.sum())} of {len(data)} rows in all). Clean them, or pass "
            "missing='drop' to drop those rows (the fit then reports how many it dropped)."
        )
    kept = data.loc[~bad]
    notes.append(f"dropped {int(bad.sum())} of {len(data)} rows with missing or infinite values ({detail})")
    warnings.warn(notes[-1], stacklevel=4)
    return kept, notes


def _formulae_frame(data: pd.DataFrame, used: list[str]) -> pd.DataFrame:
    """A shallow copy of ``data`` in which formulae keeps R's level order.

    formulae sorts the levels of an unordered categorical (so the reference level
    of the treatment contrasts is the alphabetically first one); R uses the factor's
    level order.  Unordered categoricals become ordered ones with the same
    categories, which formulae codes by treatment contrasts in that order; unused
    categories are dropped first, as ``model.frame(drop.unused.levels = TRUE)`` does.
    """
    out = data.copy(deep=False)
    for col in used:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.cat.remove_unused_categories()
            out[col] = s if s.cat.ordered else s.cat.as_ordered()
    return out


def _design(rhs: str, data: pd.DataFrame, where: str) -> pd.DataFrame:
    """A formulae model matrix for a right-hand side, as a float DataFrame."""
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # non-finite results are reported below
            dm = design_matrices(rhs, data, na_action="error")
    except KeyError as exc:  # a name formulae cannot resolve: columns are checked before, so a function
        name = str(exc.args[0]) if exc.args else ""
        hint = f" (numpy's is np.{name})" if name.isidentifier() and hasattr(np, name) else ""
        raise FormulaError(
            f"could not build {where} from {rhs!r}: unknown function or name {name!r}{hint}; formulas "
            "call numpy's functions as np.log, np.exp, np.sqrt, and I(...) for arithmetic"
        ) from exc
    except Exception as exc:  # formulae raises many kinds; name the place
        raise FormulaError(f"could not build {where} from {rhs!r}: {exc}") from exc
    if dm.common is None:
        return pd.DataFrame(index=data.index)
    frame = dm.common.as_dataframe()
    frame = frame.rename(columns={"Intercept": INTERCEPT})
    frame.index = data.index
    frame = frame.astype(float)
    for col in frame.columns:
        if not np.isfinite(frame[col].to_numpy()).all():
            raise DataError(
                f"{where}: the column {col!r} has non-finite values after transformation "
                "(log of zero or a negative number?); transform the data first"
            )
    return frame


def _response(expr: str, data: pd.DataFrame) -> np.ndarray:
    if expr in data.columns:
        s = data[expr]
        if (pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s)
                or pd.api.types.is_complex_dtype(s)):
            raise DataError(
                f"the response {expr!r} is not numeric (dtype {s.dtype}); a linear mixed model "
                "needs a real numeric response: convert it, or choose another column"
            )
        y = s.to_numpy(dtype=float)
    else:
        frame = _design(f"0 + {expr}", data, "the response")
        if frame.shape[1] != 1:
            raise DataError(f"the response {expr!r} is not a single numeric column")
        y = frame.iloc[:, 0].to_numpy()
    if np.ptp(y) == 0:
        raise DataError(f"the response {expr!r} is constant ({float(y[0])!r} in every row); nothing to model")
    _check_scale(y, f"the response {expr!r}", spread=True)
    return y


#: |mean| / sd above which a column's cross-products lose too many digits (about 2·log10 of it)
OFFSET_RATIO = 1e3


def _warn_offset(values: np.ndarray, what: str) -> None:
    """Warn when a column sits far from zero compared with its spread.

    The engines work from cross-products of the raw columns, so a mean that is R times
    the standard deviation costs about 2·log10(R) of double precision's 16 digits in the
    variance parameters (sleepstudy with 10⁸ added to Reaction moves σ̂ by 1 %).
    """
    sd = float(np.std(values))
    mean = float(np.mean(values))
    if sd > 0 and abs(mean) > OFFSET_RATIO * sd:
        ratio = abs(mean) / sd
        warnings.warn(
            f"{what} has mean {mean:.6g} and standard deviation {sd:.3g} ({ratio:.2g} times smaller): the "
            f"cross-products lose about {round(2 * np.log10(ratio))} of double precision's 16 digits and the "
            "estimates may be inaccurate. Subtract a constant (its mean, say) first: with an intercept in "
            "the model only the intercept changes",
            UserWarning, stacklevel=4,
        )


#: values beyond these magnitudes make sums of squares overflow or underflow double precision
_HUGE, _TINY = 1e150, 1e-150


def _check_scale(values: np.ndarray, what: str, spread: bool = False) -> None:
    """Refuse a column whose cross-products would overflow or underflow (inf or 0 in ZᵀZ, XᵀX, yᵀy)."""
    size = float(np.max(np.abs(values))) if len(values) else 0.0
    if size > _HUGE:
        raise DataError(
            f"{what} has values as large as {size:.3g}: their squares overflow double precision. "
            f"Rescale it (divide by 1e{int(np.log10(size))}) and fit again"
        )
    small = float(np.ptp(values)) if spread else size
    if 0 < small < _TINY:
        raise DataError(
            f"{what} {'varies' if spread else 'has values'} only by {small:.3g}: their squares underflow "
            f"double precision. Rescale it (multiply by 1e{-int(np.log10(small))}) and fit again"
        )


def _check_mixed_labels(name: str, s: pd.Series) -> None:
    """Refuse a grouping column in which values of different types print alike (``1`` and ``"1"``).

    Levels are named by their text, so such values would silently become one group;
    R's ``factor(c(1, "1"))`` merges them, but in Python ``1 != "1"``, so say so instead.
    """
    pairs = pd.DataFrame({"label": s.astype(str).to_numpy(),
                          "type": [type(v).__name__ for v in s.to_numpy()]}).drop_duplicates()
    clash = pairs[pairs["label"].duplicated(keep=False)]
    if len(clash):
        label = clash["label"].iloc[0]
        types = sorted(clash.loc[clash["label"] == label, "type"])
        raise DataError(
            f"grouping column {name!r} mixes types whose values print alike: {label!r} is there as "
            f"{' and as '.join(types)} ({clash['label'].nunique()} such label(s)), which would merge into one "
            f"group. Make the column one type, e.g. data[{name!r}] = data[{name!r}].astype(str), or fix the "
            "values that should differ"
        )


def _group_codes(factor: tuple[str, ...], data: pd.DataFrame) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes and level labels of a grouping factor (an interaction for ``a:b``)."""
    codes = None
    labels: list[np.ndarray] = []
    for name in factor:
        s = data[name]
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.cat.remove_unused_categories()
            c = s.cat.codes.to_numpy().astype(np.int64)
            lab = np.array([str(v) for v in s.cat.categories], dtype=object)
        else:
            if pd.api.types.is_float_dtype(s):
                v = s.to_numpy(dtype=float)
                if not np.all(v == np.round(v)):
                    raise DataError(
                        f"grouping column {name!r} holds non-integer numbers (dtype {s.dtype}); "
                        "a grouping factor names groups: convert it to strings or integer codes"
                    )
                s = pd.Series(v.astype(np.int64), index=s.index)
            try:
                uniq, c = np.unique(s.to_numpy(), return_inverse=True)
            except TypeError:  # mixed types (strings and numbers): compare as strings, if no two merge
                _check_mixed_labels(name, s)
                uniq, c = np.unique(s.astype(str).to_numpy(), return_inverse=True)
            lab = np.array([str(v) for v in uniq], dtype=object)
        if codes is None:
            codes, labels = c, [lab]
        else:
            combined = codes * len(lab) + c
            uniq, codes = np.unique(combined, return_inverse=True)
            old = labels
            labels = [o[uniq // len(lab)] for o in old] + [lab[uniq % len(lab)]]
    assert codes is not None
    if len(labels) == 1:
        levels = tuple(labels[0])
    else:
        levels = tuple(":".join(parts) for parts in zip(*labels))
    return codes.astype(np.int64), levels


def _drop_rank_deficient(X: pd.DataFrame, rank_deficient: str) -> tuple[pd.DataFrame, list[str]]:
    """Keep columns left to right while each adds a new direction (R's pivoting QR)."""
    if X.shape[1] == 0:
        return X, []
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
    if dropped and rank_deficient == "error":
        raise ModelError(
            f"the fixed-effect design is rank deficient: {dropped} are linear combinations of "
            "other columns (or constant); remove them, or pass rank_deficient='drop'"
        )
    return X.iloc[:, kept], dropped


def parse_mixed_formula(formula: str, groups=None):
    """The full formula (groups= folded in) and its parse; it must have a random-effect term."""
    formula_full = formula_with_groups(formula, groups)
    parsed = parse_formula(formula_full)
    if not parsed.bars:
        raise FormulaError(
            f"formula {formula_full!r} has no random-effect term such as '(1 | group)'; "
            "add one, or use groups={'column': '1'}"
        )
    return formula_full, parsed


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
    if missing not in ("raise", "drop"):
        raise DataError(f"missing must be 'raise' or 'drop', got {missing!r}")
    if rank_deficient not in ("drop", "error"):
        raise DataError(f"rank_deficient must be 'drop' or 'error', got {rank_deficient!r}")
    data = as_pandas(data, "data")
    if len(data) == 0:
        raise DataError("data is empty: it has no rows to fit")
    if not all(isinstance(c, str) for c in data.columns):
        data = data.rename(columns=str)  # formulas name columns by strings
    formula_full, parsed = parse_mixed_formula(formula, groups)
    used = _check_columns(parsed, data)
    _check_no_datetimes(parsed, data)
    data, notes = _check_missing(data, used, missing)
    if len(data) == 0:
        raise DataError("no rows left after dropping rows with missing values")
    n = len(data)

    fdata = _formulae_frame(data, used)
    y = _response(parsed.response, fdata)
    X = _design(parsed.fixed, fdata, "the fixed effects")
    if X.shape[1] == 0:
        raise ModelError("the model has no fixed effects; keep the intercept (remove '0 +' / '- 1')")
    for col in X.columns:
        _check_scale(X[col].to_numpy(), f"the fixed-effect column {col!r}")
    X, dropped = _drop_rank_deficient(X, rank_deficient)
    if dropped:
        msg = (f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
               f"column{'s' if len(dropped) > 1 else ''}: {dropped}")
        notes.append(msg)
        warnings.warn(msg, stacklevel=3)
    if INTERCEPT in X.columns:  # then a shift of y or of a column changes only the intercept
        # (the response itself is shifted inside the cross-products: crossprod.response_shift)
        for col in X.columns:
            if col != INTERCEPT:
                _warn_offset(X[col].to_numpy(), f"the fixed-effect column {col!r}")
    if X.shape[1] >= n:
        raise ModelError(
            f"the fixed effects have {X.shape[1]} linearly independent columns for {n} observations: "
            "they fit the response exactly and leave nothing to estimate the variances. Use fewer "
            "predictors (or fewer levels of a categorical predictor), or more data"
        )

    blocks: list[RandomBlock] = []
    for bar in parsed.bars:
        lhs = _design(bar.lhs, fdata, f"the term {bar.text}")
        if lhs.shape[1] == 0:
            raise FormulaError(f"the term {bar.text} has no random effects on its left side")
        for factor in bar.factors:
            blocks.append(_make_block(bar, factor, lhs, data, n))
    _check_residual_identifiable(X.to_numpy(), blocks, n)
    blocks = _lme4_order(blocks)
    return ModelSpec(
        formula=formula_full,
        response=parsed.response,
        y=y,
        X=np.ascontiguousarray(X.to_numpy()),
        fixed_names=tuple(map(str, X.columns)),
        blocks=tuple(blocks),
        row_index=data.index.to_numpy(),
        notes=tuple(notes),
        dropped_fixed=tuple(map(str, dropped)),
        fixed_formula=parsed.fixed,
        data=data[list(used)],
        missing=missing,
        rank_deficient=rank_deficient,
    )


def _lme4_order(blocks: list[RandomBlock]) -> list[RandomBlock]:
    """Order the terms as lme4's ``mkReTrms`` does; θ follows this order.

    lme4 leaves the terms as written when their numbers of levels never increase;
    otherwise it takes ``rev(order(nl))``: decreasing number of levels, with ties in
    reverse order of writing.  A ``||`` term is several terms in lme4 (one per
    column), so when the order is reversed its columns are reversed too.
    """
    nl = [b.n_levels for b in blocks]
    if not any(b > a for a, b in zip(nl, nl[1:])):
        return blocks
    order = sorted(range(len(blocks)), key=lambda k: nl[k])[::-1]  # R's order() is stable
    out = []
    for k in order:
        b = blocks[k]
        if not b.correlated and b.q > 1:
            b = dataclasses.replace(b, Z=np.ascontiguousarray(b.Z[:, ::-1]), columns=b.columns[::-1])
        out.append(b)
    return out


def check_levels(bar: BarTerm, group: str, levels: tuple, q: int, n: int) -> None:
    """A grouping factor needs ≥ 2 levels, fewer levels than rows, and fewer effects than rows."""
    n_levels = len(levels)
    if n_levels < 2:
        raise ModelError(
            f"grouping factor {group!r} in {bar.text} has only one level ({levels[0]!r}); a "
            "random effect needs at least two groups: drop the term or use a fixed effect"
        )
    if n_levels >= n:
        raise ModelError(
            f"grouping factor {group!r} in {bar.text} has {n_levels} levels for {n} observations; "
            "the number of levels must be smaller than the number of observations "
            "(each group its own observation leaves the residual unidentifiable)"
        )
    if n_levels * q >= n:
        raise ModelError(
            f"the term {bar.text} has {n_levels * q} random effects ({n_levels} levels × {q}) for "
            f"{n} observations; the random effects and the residual variance are unidentifiable. "
            "Simplify the term (fewer slopes) or use more data"
        )


def _make_block(bar: BarTerm, factor: tuple[str, ...], lhs: pd.DataFrame, data: pd.DataFrame, n: int) -> RandomBlock:
    group = ":".join(factor)
    codes, levels = _group_codes(factor, data)
    n_levels = len(levels)
    q = lhs.shape[1]
    check_levels(bar, group, levels, q, n)
    for col in lhs.columns:
        _check_scale(lhs[col].to_numpy(), f"the column {col!r} of {bar.text}")
    if q > 1:
        _warn_not_varying_within(bar, group, codes, n_levels, lhs)
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
    gram = np.empty((n_levels, q, q))
    for a in range(q):
        for b in range(a, q):
            gram[:, a, b] = gram[:, b, a] = np.bincount(codes, weights=Zs[:, a] * Zs[:, b], minlength=n_levels)
    ev = np.linalg.eigvalsh(gram)                                  # ascending, per level
    rank = np.sum(ev > 1e-10 * np.maximum(ev[:, -1:], 1e-300), axis=1)
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
    warnings.warn(message, UserWarning, stacklevel=5)


#: a random slope whose |mean| / sd exceeds this puts the random intercept far outside the data
SLOPE_OFFSET_RATIO = 20.0


def _warn_far_slopes(bar: BarTerm, lhs: pd.DataFrame) -> None:
    """Warn when a term's random intercept describes x = 0, far outside the data.

    With ``(1 + x | g)`` and x around a year (2010 ± 5) the intercept's sd is an
    extrapolation thousands of times the slope's, the correlation is near ±1 and the
    profiled deviance is so badly scaled that BOBYQA in the raw coordinates stops short
    of the optimum (sleepstudy with 200 added to Days: REML criterion 2.3 above it;
    ``reml.fit.centring_shifts`` now optimises such correlated terms centred).  lme4
    warns here too ("Rescale variables?").
    """
    for col in lhs.columns:
        if col == INTERCEPT:
            continue
        v = lhs[col].to_numpy()
        sd, mean = float(np.std(v)), float(np.mean(v))
        if sd > 0 and abs(mean) > SLOPE_OFFSET_RATIO * sd:
            warnings.warn(
                f"the random slope {str(col)!r} in {bar.text} has mean {mean:.6g} and standard deviation "
                f"{sd:.3g}: the random intercept then describes {col} = 0, {abs(mean) / sd:.0f} standard "
                "deviations away from the data, and its sd and correlation describe an extrapolation (the "
                "REML engine optimises a correlated term like this one in centred coordinates and maps the "
                "result back; NUTS samples the badly scaled parameters as written). Centre the variable "
                "(subtract its mean) before fitting; for a correlated term this is the same model, re-expressed",
                UserWarning, stacklevel=5,
            )


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
        self.fdata = _formulae_frame(data, self.columns)
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
    """Level labels of a grouping factor for each row, spelled as :func:`_group_codes` spells levels."""

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
    designs = _training_designs(spec)
    parsed = designs.parsed
    train_cols = set(designs.columns)
    terms = _block_terms(spec, designs)

    need: dict[str, str] = {}  # column -> where it is used
    value_cols: set[str] = set()

    def add(expr: str, where: str, values: bool) -> None:
        for name, _ in referenced_names(expr):
            if name in train_cols:
                need.setdefault(name, where)
                if values:
                    value_cols.add(name)

    if fixed:
        add(parsed.fixed, "the fixed effects", True)
    if random:
        for term in terms:
            add(term.lhs, f"the term {term.text}", True)
    if groups:
        for block, term in zip(spec.blocks, terms):
            for name in block.group.split(":"):
                need.setdefault(name, f"the grouping factor of {term.text}")
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
        if groups:
            labels = group_labels(block.group.split(":"), newdata)
            lookup = {lev: k for k, lev in enumerate(block.levels)}
            c = np.array([lookup.get(lab, -1) for lab in labels], dtype=np.int64)
            unseen = tuple(dict.fromkeys(labels[c < 0]))
            if unseen:  # unseen level k gets code -1 - k
                k = {lab: i for i, lab in enumerate(unseen)}
                c[c < 0] = [-1 - k[lab] for lab in labels[c < 0]]
            codes.append(c)
            new_levels.append(unseen)
        else:
            codes.append(None)
            new_levels.append(())
    return NewDesign(index=newdata.index, X=X, Z=tuple(Z), codes=tuple(codes), new_levels=tuple(new_levels))


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
