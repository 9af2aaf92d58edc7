"""Build a :class:`~bayeslmm.spec.ModelSpec` from a formula and a DataFrame.

formulae builds the fixed-effect design (contrasts, transformations, ``0 +``) and
each bar term's left side; the grouping factors are turned into integer codes
directly, so a random-effect term is a few value columns plus codes rather than
formulae's whole group-specific matrix (which took seconds on InstEval).
"""

from __future__ import annotations

import dataclasses
import warnings
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
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
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
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            raise DataError(
                f"the response {expr!r} is not numeric (dtype {s.dtype}); a linear mixed model "
                "needs a numeric response: convert it, or choose another column"
            )
        y = s.to_numpy(dtype=float)
    else:
        frame = _design(f"0 + {expr}", data, "the response")
        if frame.shape[1] != 1:
            raise DataError(f"the response {expr!r} is not a single numeric column")
        y = frame.iloc[:, 0].to_numpy()
    if np.ptp(y) == 0:
        raise DataError(f"the response {expr!r} is constant ({float(y[0])!r} in every row); nothing to model")
    return y


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
            except TypeError:  # mixed types (strings and numbers): compare as strings
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
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError("data is empty: it has no rows to fit")
    if not all(isinstance(c, str) for c in data.columns):
        data = data.rename(columns=str)  # formulas name columns by strings
    formula_full = formula_with_groups(formula, groups)
    parsed = parse_formula(formula_full)
    if not parsed.bars:
        raise FormulaError(
            f"formula {formula_full!r} has no random-effect term such as '(1 | group)'; "
            "add one, or use groups={'column': '1'}"
        )
    used = _check_columns(parsed, data)
    data, notes = _check_missing(data, used, missing)
    if len(data) == 0:
        raise DataError("no rows left after dropping rows with missing values")
    n = len(data)

    fdata = _formulae_frame(data, used)
    y = _response(parsed.response, fdata)
    X = _design(parsed.fixed, fdata, "the fixed effects")
    if X.shape[1] == 0:
        raise ModelError("the model has no fixed effects; keep the intercept (remove '0 +' / '- 1')")
    X, dropped = _drop_rank_deficient(X, rank_deficient)
    if dropped:
        msg = (f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
               f"column{'s' if len(dropped) > 1 else ''}: {dropped}")
        notes.append(msg)
        warnings.warn(msg, stacklevel=3)

    blocks: list[RandomBlock] = []
    for bar in parsed.bars:
        lhs = _design(bar.lhs, fdata, f"the term {bar.text}")
        if lhs.shape[1] == 0:
            raise FormulaError(f"the term {bar.text} has no random effects on its left side")
        for factor in bar.factors:
            blocks.append(_make_block(bar, factor, lhs, data, n))
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


def _make_block(bar: BarTerm, factor: tuple[str, ...], lhs: pd.DataFrame, data: pd.DataFrame, n: int) -> RandomBlock:
    group = ":".join(factor)
    codes, levels = _group_codes(factor, data)
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
    q = lhs.shape[1]
    if n_levels * q >= n:
        raise ModelError(
            f"the term {bar.text} has {n_levels * q} random effects ({n_levels} levels × {q}) for "
            f"{n} observations; the random effects and the residual variance are unidentifiable. "
            "Simplify the term (fewer slopes) or use more data"
        )
    return RandomBlock(
        group=group,
        codes=codes,
        levels=levels,
        Z=np.ascontiguousarray(lhs.to_numpy()),
        columns=tuple(map(str, lhs.columns)),
        correlated=not bar.independent or q == 1,
    )
