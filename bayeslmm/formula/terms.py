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


def factor_levels(spec: ModelSpec, terms: list[FixedTerm]) -> dict[str, list]:
    """Every factor of the fixed effects with its levels in the fit's order (reference first)."""
    out = {}
    for f in sorted({f for t in terms for f in t.factors}):
        s = spec.data[f]
        if isinstance(s.dtype, pd.CategoricalDtype):
            out[f] = [c for c in s.cat.categories if (s == c).any()]
        else:
            out[f] = sorted(pd.unique(s.dropna()).tolist())
    return out


def covariate_means(spec: ModelSpec, terms: list[FixedTerm]) -> dict[str, float]:
    """The mean of every covariate of the fixed effects over the rows fitted (emmeans' default)."""
    return {c: float(np.mean(spec.data[c].to_numpy(dtype=float)))
            for c in sorted({c for t in terms for c in t.covariates})}


def grid_design(spec: ModelSpec, grid: pd.DataFrame) -> np.ndarray:
    """X on the rows of ``grid`` (one column per variable of the fixed effects), the fit's coding."""
    return new_data_design(spec, grid, random=False, groups=False, argument="the reference grid").X
