"""The stages every spec builder runs, with their checks and messages written once.

A :class:`~bayeslmm.spec.ModelSpec` is built in the same order whether the rows sit
in one DataFrame (:func:`bayeslmm.formula.design.build_spec`) or are read chunk by
chunk (:func:`bayeslmm.outofcore.build_out_of_core`):

1. options and formula: :func:`check_options`, :func:`parse_mixed_formula`;
2. columns and their types: :func:`check_columns`, :func:`check_no_datetimes`,
   :func:`check_response_type`;
3. rows: :func:`missing_mask`, :func:`report_missing`, :func:`check_rows`;
4. designs (formulae): :func:`formulae_frame`, :func:`response_values`,
   :func:`fixed_design`, :func:`lhs_design`;
5. value checks from a column's extent and moments, so that the in-memory builder
   (from the column) and the out-of-core one (from summed moments) say the same:
   :func:`check_response_spread`, :func:`check_scale`, :func:`warn_offset`,
   :func:`warn_far_slope`, :func:`check_rank_deficient`, :func:`note_dropped_columns`,
   :func:`check_fixed_count`;
6. grouping factors: :func:`bar_factors`, :func:`group_codes`, :func:`check_levels`,
   :func:`lme4_order`.

What differs between the builders is only how a stage's input is gathered: one
frame, or levels, categories and sums merged over chunks.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from formulae import design_matrices

from ..errors import DataError, FormulaError, ModelError, did_you_mean
from ..spec import RandomBlock
from .parse import BarTerm, ParsedFormula, parse_formula, referenced_names

INTERCEPT = "(Intercept)"

#: names formulae understands that are not columns (modules, constants, contrasts)
NON_COLUMNS = frozenset({"np", "numpy", "math", "True", "False", "None", "Treatment", "Sum", "Helmert",
                         "Diff", "Poly", "pi", "inf", "nan"})

#: |mean| / sd above which a column's cross-products lose too many digits (about 2·log10 of it)
OFFSET_RATIO = 1e3

#: a random slope whose |mean| / sd exceeds this puts the random intercept far outside the data
SLOPE_OFFSET_RATIO = 20.0

#: values beyond these magnitudes make sums of squares overflow or underflow double precision
_HUGE, _TINY = 1e150, 1e-150

# warnings name the user's line that built the model, however deep the builder's stages are
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn, attributed to the first caller outside bayeslmm (the user's code)."""
    warnings.warn(message, category, skip_file_prefixes=(_PACKAGE_DIR,))


# -- 1. options and formula ------------------------------------------------------------------

def check_options(missing: str, rank_deficient: str) -> None:
    """Refuse values of ``missing`` and ``rank_deficient`` that no builder knows."""
    if missing not in ("raise", "drop"):
        raise DataError(f"missing must be 'raise' or 'drop', got {missing!r}")
    if rank_deficient not in ("drop", "error"):
        raise DataError(f"rank_deficient must be 'drop' or 'error', got {rank_deficient!r}")


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


def parse_mixed_formula(formula: str, groups=None) -> tuple[str, ParsedFormula]:
    """The full formula (groups= folded in) and its parse; it must have a random-effect term."""
    formula_full = formula_with_groups(formula, groups)
    parsed = parse_formula(formula_full)
    if not parsed.bars:
        raise FormulaError(
            f"formula {formula_full!r} has no random-effect term such as '(1 | group)'; "
            "add one, or use groups={'column': '1'}"
        )
    return formula_full, parsed


# -- 2. columns and their types (a frame's dtypes suffice: an empty chunk will do) ------------

def check_columns(parsed: ParsedFormula, frame: pd.DataFrame) -> list[str]:
    """All data columns the formula uses, in order of use; unknown or duplicated names raise a DataError."""
    cols = set(map(str, frame.columns))
    duplicated = set(map(str, frame.columns[frame.columns.duplicated()]))
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
        if known_functions and name in NON_COLUMNS:
            return
        raise DataError(
            f"unknown column {name!r} in {where} of the formula; the data have columns "
            f"{sorted(cols)}.{did_you_mean(name, cols)}"
        )

    for expr, where in value_expressions(parsed)[:2]:
        for name, _ in referenced_names(expr):
            need(name, where)
    for bar in parsed.bars:  # a term's left side, then its factors (the order of spec.data's columns)
        for name, _ in referenced_names(bar.lhs):
            need(name, f"the term {bar.text}")
        for factor in bar.factors:
            for name in factor:
                need(name, f"the grouping factor of {bar.text}", known_functions=False)
    return used


def value_expressions(parsed: ParsedFormula) -> list[tuple[str, str]]:
    """(expression, where it is) for the response, the fixed effects and each term's left side."""
    parts = [(parsed.response, "the response"), (parsed.fixed, "the fixed effects")]
    return parts + [(bar.lhs, f"the term {bar.text}") for bar in parsed.bars]


def check_no_datetimes(parsed: ParsedFormula, frame: pd.DataFrame) -> None:
    """Refuse dates and durations as values (formulae cannot use them); as grouping factors they are fine."""
    for expr, where in value_expressions(parsed):
        for name, _ in referenced_names(expr):
            if name not in frame.columns:
                continue
            s = frame[name]
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


def check_response_type(expr: str, frame: pd.DataFrame) -> None:
    """Refuse a response column that is not real numbers (an expression is checked by formulae)."""
    if expr not in frame.columns:
        return
    s = frame[expr]
    if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_complex_dtype(s):
        raise DataError(
            f"the response {expr!r} is not numeric (dtype {s.dtype}); a linear mixed model "
            "needs a real numeric response: convert it, or choose another column"
        )


# -- 3. rows --------------------------------------------------------------------------------

def check_rows(n_rows: int, after_missing: bool = False) -> None:
    """Refuse data without rows (before or after dropping rows with missing values)."""
    if n_rows == 0:
        raise DataError("no rows left after dropping rows with missing values" if after_missing
                        else "data is empty: it has no rows to fit")


def missing_mask(frame: pd.DataFrame, used: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Rows with a missing or infinite value in a used column, and how many per column."""
    bad = np.zeros(len(frame), dtype=bool)
    counts: dict[str, int] = {}
    for col in used:
        s = frame[col]
        miss = s.isna().to_numpy()
        if pd.api.types.is_complex_dtype(s):  # refused as a response later; no cast to float here
            miss = miss | ~np.isfinite(s.to_numpy())
        elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            miss = miss | ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        k = int(miss.sum())
        if k:
            counts[col] = k
            bad |= miss
    return bad, counts


def report_missing(counts: dict[str, int], n_bad: int, n_rows: int, missing: str) -> list[str]:
    """Raise for rows with missing values (``missing='raise'``), or warn and return the note of dropping them."""
    if not counts:
        return []
    detail = ", ".join(f"{c!r}: {k} row{'s' if k != 1 else ''}" for c, k in counts.items())
    if missing == "raise":
        raise DataError(
            f"missing or infinite values in the columns the model uses ({detail}; "
            f"{n_bad} of {n_rows} rows in all). Clean them, or pass "
            "missing='drop' to drop those rows (the fit then reports how many it dropped)."
        )
    note = f"dropped {n_bad} of {n_rows} rows with missing or infinite values ({detail})"
    warn_user(note)
    return [note]


# -- 4. designs (formulae) ----------------------------------------------------------------------

def formulae_frame(data: pd.DataFrame, used: list[str]) -> pd.DataFrame:
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


def design_matrix(rhs: str, data: pd.DataFrame, where: str) -> pd.DataFrame:
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


def response_values(expr: str, frame: pd.DataFrame) -> np.ndarray:
    """The response of every row of ``frame``: a column, or an expression of one column's values."""
    if expr in frame.columns:
        return frame[expr].to_numpy(dtype=float)
    design = design_matrix(f"0 + {expr}", frame, "the response")
    if design.shape[1] != 1:
        raise DataError(f"the response {expr!r} is not a single numeric column")
    return design.iloc[:, 0].to_numpy()


def fixed_design(parsed: ParsedFormula, frame: pd.DataFrame) -> pd.DataFrame:
    """The fixed-effect design of ``frame``; a model without fixed effects is refused."""
    X = design_matrix(parsed.fixed, frame, "the fixed effects")
    if X.shape[1] == 0:
        raise ModelError("the model has no fixed effects; keep the intercept (remove '0 +' / '- 1')")
    return X


def lhs_design(bar: BarTerm, frame: pd.DataFrame) -> pd.DataFrame:
    """The value columns of a bar term's left side; a term without any is refused."""
    lhs = design_matrix(bar.lhs, frame, f"the term {bar.text}")
    if lhs.shape[1] == 0:
        raise FormulaError(f"the term {bar.text} has no random effects on its left side")
    return lhs


# -- 5. value checks from extents and moments ----------------------------------------------------

def check_response_spread(expr: str, lowest: float, highest: float, largest: float) -> None:
    """Refuse a constant response, or one whose squares overflow or whose spread underflows."""
    if lowest == highest:
        raise DataError(f"the response {expr!r} is constant ({float(lowest)!r} in every row); nothing to model")
    check_scale(f"the response {expr!r}", largest, spread=highest - lowest)


def check_scale(what: str, largest: float, spread: float | None = None) -> None:
    """Refuse a column whose cross-products would overflow or underflow (inf or 0 in ZᵀZ, XᵀX, yᵀy).

    ``largest`` is the column's largest magnitude; with ``spread`` (its range) the
    column is refused when its variation underflows, else when its values do.
    """
    if largest > _HUGE:
        raise DataError(
            f"{what} has values as large as {largest:.3g}: their squares overflow double precision. "
            f"Rescale it (divide by 1e{int(np.log10(largest))}) and fit again"
        )
    small = largest if spread is None else spread
    if 0 < small < _TINY:
        raise DataError(
            f"{what} {'has values' if spread is None else 'varies'} only by {small:.3g}: their squares "
            f"underflow double precision. Rescale it (multiply by 1e{-int(np.log10(small))}) and fit again"
        )


def largest_magnitude(values: np.ndarray) -> float:
    return float(np.max(np.abs(values))) if len(values) else 0.0


def warn_offset(what: str, mean: float, sd: float) -> None:
    """Warn when a column sits far from zero compared with its spread.

    The engines work from cross-products of the raw columns, so a mean that is R times
    the standard deviation costs about 2·log10(R) of double precision's 16 digits in the
    variance parameters (sleepstudy with 10⁸ added to Reaction moves σ̂ by 1 %).
    """
    if sd > 0 and abs(mean) > OFFSET_RATIO * sd:
        ratio = abs(mean) / sd
        warn_user(
            f"{what} has mean {mean:.6g} and standard deviation {sd:.3g} ({ratio:.2g} times smaller): the "
            f"cross-products lose about {round(2 * np.log10(ratio))} of double precision's 16 digits and the "
            "estimates may be inaccurate. Subtract a constant (its mean, say) first: with an intercept in "
            "the model only the intercept changes"
        )


def warn_far_slope(term: str, col: str, mean: float, sd: float) -> None:
    """Warn when a term's random intercept describes x = 0, far outside the data.

    With ``(1 + x | g)`` and x around a year (2010 ± 5) the intercept's sd is an
    extrapolation thousands of times the slope's, the correlation is near ±1 and the
    profiled deviance is so badly scaled that BOBYQA in the raw coordinates stops short
    of the optimum (sleepstudy with 200 added to Days: REML criterion 2.3 above it;
    ``reml.fit.centring_shifts`` now optimises such correlated terms centred).  lme4
    warns here too ("Rescale variables?").
    """
    if sd > 0 and abs(mean) > SLOPE_OFFSET_RATIO * sd:
        warn_user(
            f"the random slope {str(col)!r} in {term} has mean {mean:.6g} and standard deviation "
            f"{sd:.3g}: the random intercept then describes {col} = 0, {abs(mean) / sd:.0f} standard "
            "deviations away from the data, and its sd and correlation describe an extrapolation (the "
            "REML engine optimises a correlated term like this one in centred coordinates and maps the "
            "result back; NUTS samples the badly scaled parameters as written). Centre the variable "
            "(subtract its mean) before fitting; for a correlated term this is the same model, re-expressed"
        )


def check_rank_deficient(dropped: list[str], rank_deficient: str) -> None:
    """Refuse dependent fixed-effect columns when ``rank_deficient='error'``."""
    if dropped and rank_deficient == "error":
        raise ModelError(
            f"the fixed-effect design is rank deficient: {dropped} are linear combinations of "
            "other columns (or constant); remove them, or pass rank_deficient='drop'"
        )


def note_dropped_columns(dropped: list[str]) -> list[str]:
    """Warn about dropped fixed-effect columns (as lme4 does) and return the note, if any."""
    if not dropped:
        return []
    note = (f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
            f"column{'s' if len(dropped) > 1 else ''}: {dropped}")
    warn_user(note)
    return [note]


def check_fixed_count(p: int, n: int) -> None:
    """Refuse as many independent fixed-effect columns as observations."""
    if p >= n:
        raise ModelError(
            f"the fixed effects have {p} linearly independent columns for {n} observations: "
            "they fit the response exactly and leave nothing to estimate the variances. Use fewer "
            "predictors (or fewer levels of a categorical predictor), or more data"
        )


# -- 6. grouping factors ---------------------------------------------------------------------------

def bar_factors(parsed: ParsedFormula) -> list[tuple[str, ...]]:
    """The distinct grouping factors of the bar terms, in order of writing."""
    out: list[tuple[str, ...]] = []
    for bar in parsed.bars:
        for factor in bar.factors:
            if factor not in out:
                out.append(factor)
    return out


def check_mixed_labels(name: str, s: pd.Series) -> None:
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


def column_codes(name: str, s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of one grouping column and its level labels (categories in order, else sorted)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.cat.remove_unused_categories()
        return s.cat.codes.to_numpy().astype(np.int64), np.array([str(v) for v in s.cat.categories], dtype=object)
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
        check_mixed_labels(name, s)
        uniq, c = np.unique(s.astype(str).to_numpy(), return_inverse=True)
    return c, np.array([str(v) for v in uniq], dtype=object)


def group_codes(factor: tuple[str, ...], data: pd.DataFrame) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes and level labels of a grouping factor (an interaction for ``a:b``)."""
    codes, labels = None, []
    for name in factor:
        c, lab = column_codes(name, data[name])
        if codes is None:
            codes, labels = c, [lab]
        else:  # the interaction's levels are the combinations that occur, sorted as R's
            uniq, codes = np.unique(codes * len(lab) + c, return_inverse=True)
            labels = [o[uniq // len(lab)] for o in labels] + [lab[uniq % len(lab)]]
    assert codes is not None
    levels = tuple(labels[0]) if len(labels) == 1 else tuple(":".join(parts) for parts in zip(*labels))
    return codes.astype(np.int64), levels


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


def lme4_order(blocks: list[RandomBlock]) -> list[RandomBlock]:
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
