"""The fixed-effect formula's terms, their columns, and its design on a grid of new values.

What tests per term (type II/III) and marginal means need from the formula: which
columns of X each term owns, which variables are factors (and their levels, in the
fit's order) and which are covariates, and X evaluated on a reference grid with the
training data's contrasts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from formulae import design_matrices

from ..errors import ModelError
from ..hypotheses import FixedTerm
from ..spec import ModelSpec
from .core import INTERCEPT, formulae_frame
from .design import new_data_design
from .parse import parse_formula


def _training(spec: ModelSpec):
    if spec.data is None:
        raise ModelError("this model did not keep its data (cross-products computed out of memory), so its "
                         "terms cannot be re-evaluated: refit from a DataFrame for tests per term and "
                         "marginal means")
    parsed = parse_formula(spec.formula)
    frame = formulae_frame(spec.data, [str(c) for c in spec.data.columns])
    return design_matrices(parsed.fixed, frame, na_action="error").common


def fixed_terms(spec: ModelSpec) -> list[FixedTerm]:
    """The fixed-effect terms in formula order, each with its columns in ``spec.fixed_names``.

    A column dropped as rank deficient belongs to no term; a term left with no column
    is left out.
    """
    common = _training(spec)
    position = {name: j for j, name in enumerate(spec.fixed_names)}
    out = []
    for name, term in common.terms.items():
        labels = [INTERCEPT if lab == "Intercept" else lab for lab in getattr(term, "labels", [name])]
        cols = tuple(position[lab] for lab in labels if lab in position)
        if not cols:
            continue
        comps = getattr(term, "components", [])
        out.append(FixedTerm(name="(Intercept)" if name == "Intercept" else name,
                             factors=tuple(c.name for c in comps if c.kind == "categoric"),
                             covariates=tuple(c.name for c in comps if c.kind != "categoric"),
                             columns=cols))
    return out


def factor_parts(spec: ModelSpec, terms: list[FixedTerm]):
    """``cell ↦ row``: each fixed-effect column's value with its covariates' product set to 1.

    A column of a term is (its factors' indicator or contrast value) × (the product of its
    covariates' values, transformed as the formula says).  The second factor is read from
    formulae's evaluation of each covariate on the fitted rows, the first as the column
    divided by it on a row of the cell where that product is not 0 — the fit's own coding,
    whatever the contrasts.  A cell of a term's factors that no fitted row has (with a
    non-zero covariate) has no value: its hypotheses are not estimable, and it is refused.
    """
    spec.require_rows("type III tests")
    common = _training(spec)
    data, X = spec.data, spec.X
    lookups = []
    for t in terms:
        cov = np.ones(len(X))
        term = common.terms.get("Intercept" if t.is_intercept else t.name)
        for comp in getattr(term, "components", []):
            if comp.kind != "categoric":
                value = np.asarray(comp.value, dtype=float)
                if value.ndim > 1 and value.shape[1] != 1:
                    raise ModelError(f"type III tests need one column per covariate; {comp.name!r} in "
                                     f"{t.name!r} has {value.shape[1]} (a spline or polynomial basis): use "
                                     "type=2")
                cov = cov * value.reshape(len(X))
        usable = np.abs(cov) > 1e-12
        keys = data.loc[usable, list(t.factors)].astype(object) if t.factors else None
        parts = pd.DataFrame(X[usable][:, list(t.columns)] / cov[usable, None])
        first = parts.groupby([keys[f].to_numpy() for f in t.factors]).first() if t.factors else parts.iloc[:1]
        lookups.append((t, first))
    p = X.shape[1]

    def row(cell: dict) -> np.ndarray:
        out = np.zeros(p)
        for t, first in lookups:
            key = tuple(cell[f] for f in t.factors)
            try:
                values = first.loc[key if len(key) > 1 else key[0]] if t.factors else first.iloc[0]
            except KeyError:
                raise ModelError(f"the cell {dict(zip(t.factors, key))} of {t.name!r} has no fitted row: its "
                                 "type III hypotheses are not estimable; use type=2") from None
            out[list(t.columns)] = np.asarray(values, dtype=float)
        return out

    return row


def factor_levels(spec: ModelSpec, terms: list[FixedTerm]) -> dict[str, list]:
    """Every factor of the fixed effects with its levels in the fit's order (reference first)."""
    return {f: level_order(spec.data[f]) for f in sorted({f for t in terms for f in t.factors})}


def level_order(s: pd.Series) -> list:
    """A factor's levels as formulae orders them: a categorical's categories that occur, else sorted."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return [c for c in s.cat.categories if (s == c).any()]
    return sorted(pd.unique(s.dropna()).tolist())


def grid_design(spec: ModelSpec, grid: pd.DataFrame) -> np.ndarray:
    """X on the rows of ``grid`` (one column per variable of the fixed effects), the fit's coding."""
    return new_data_design(spec, grid, random=False, groups=False, argument="the reference grid").X
