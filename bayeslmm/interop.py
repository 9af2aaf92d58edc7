"""Moving a model between bambi and bayeslmm: ``Model.from_bambi(bmb_model)`` and ``model.to_bambi()``.

This module sits below :class:`~bayeslmm.Model`: it reads and builds formulas, data,
specs and bambi models; ``Model.from_bambi`` and ``Model.to_bambi`` call it.

Both packages read formulas with formulae, so a Gaussian model with an identity
link moves with its formula and data.  One difference in meaning matters: bambi
fits the effects of a term ``(x | g)`` *uncorrelated* (one sd per column, no
correlation), which is lme4's and bayeslmm's ``(x || g)``; so ``from_bambi``
writes ``||`` and ``to_bambi`` refuses a correlated block unless asked to drop the
correlations.  Both directions check what they built against the other package's
design (response, fixed-effect columns, each block's columns), so a model that
does not move exactly raises an error instead of moving approximately.

Priors: bayeslmm's priors are not part of a ``Model`` (they are given to
``fit``), so ``from_bambi`` moves the model and :func:`bambi_priors` moves
bambi's priors (``fit(method="nuts", priors=bambi_priors(bmb_model))``);
``to_bambi`` sets every bambi prior to the one bayeslmm would use (its defaults,
or ``priors=``), so both packages sample the same posterior.

bambi is optional: it is imported only here, on first use.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .bayes.priors import LOCATION_FAMILIES, SCALE_FAMILIES, Prior, resolve_priors
from .errors import BayesLMMError, ModelError
from .formula import build_spec, parse_formula

INTERCEPT = "(Intercept)"


def _import_bambi():
    try:
        import bambi
    except ImportError as exc:
        raise ImportError("this needs bambi: pip install bambi (it installs beside bayeslmm)") from exc
    return bambi


def _column(label: str) -> str:
    """A formulae column label in bayeslmm's spelling (formulae's ``Intercept`` is lme4's ``(Intercept)``)."""
    return INTERCEPT if label == "Intercept" else str(label)


def _factor_name(factor: tuple[str, ...]) -> str:
    return ":".join(name if name.isidentifier() else f"`{name}`" for name in factor)


# -- bambi -> bayeslmm -------------------------------------------------------------------

def _check_bambi_model(bm) -> None:
    """Refuse, with the reason, what bayeslmm cannot fit: it fits Gaussian linear mixed models."""
    bambi = _import_bambi()
    if not isinstance(bm, bambi.Model):
        raise BayesLMMError(f"expected a bambi.Model, got {type(bm).__name__}")
    family = bm.family.name
    link = bm.family.link[bm.family.likelihood.parent].name
    if family != "gaussian" or link != "identity":
        raise ModelError(f"bayeslmm fits Gaussian models with the identity link; this bambi model has family "
                         f"{family!r} with link {link!r}: fit it with bambi")
    if bm.formula.additionals:
        raise ModelError(f"this bambi model gives {', '.join(bm.formula.additionals_lhs)} its own formula "
                         f"({', '.join(bm.formula.additionals)}); bayeslmm has one residual sd for every row")
    if bm.potentials:
        raise ModelError("this bambi model has potentials (extra terms in the log density), which bayeslmm "
                         "cannot express")
    mu = bm.parameters[bm.family.likelihood.parent]
    extra = list(mu.offset_terms) + list(mu.hsgp_terms)
    if extra:
        raise ModelError(f"bayeslmm has no offset or Gaussian-process terms; this bambi model has {extra}")
    if not mu.group_specific_terms:
        raise ModelError("this bambi model has no group-specific term such as (1 | g); bayeslmm fits mixed "
                         "models only")


def _bambi_frame(data: pd.DataFrame) -> pd.DataFrame:
    """bambi's data with the level order formulae gives an unordered categorical (sorted, present levels).

    bayeslmm keeps a categorical's own level order (as R does); formulae, and so bambi,
    sorts the levels of an unordered one.  Fixing the order here gives bayeslmm
    bambi's reference levels, hence the same coefficients.
    """
    out = data.copy(deep=False)
    for col in out.columns:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype) and not s.cat.ordered:
            present = sorted(np.unique(s.dropna().to_numpy()).tolist())
            out[col] = pd.Categorical(s, categories=present, ordered=True)
    return out


def lme4_formula_of_bambi(formula: str) -> str:
    """bambi's formula in lme4's meaning: each ``(x | g)`` (uncorrelated in bambi) becomes ``(x || g)``."""
    parsed = parse_formula(formula)
    bars = " + ".join(f"({bar.lhs} {'|' if bar.lhs.strip() == '1' else '||'} {_factor_name(f)})"
                      for bar in parsed.bars for f in bar.factors)
    return f"{parsed.response} ~ {parsed.fixed} + {bars}"


def model_arguments(bm) -> dict:
    """The arguments of :class:`~bayeslmm.Model` for the same formula and data as a ``bambi.Model``.

    ``Model(**model_arguments(bm))`` is the model; :meth:`bayeslmm.Model.from_bambi` builds it
    and then checks it with :func:`check_same_design`.  bambi's ``(x | g)`` has
    uncorrelated effects, so the formula reads ``(x || g)``.  Refused (``ModelError``):
    a family other than Gaussian with the identity link, a formula for ``sigma``
    (distributional model), potentials, offsets, Gaussian-process terms and no
    group-specific term.
    """
    _check_bambi_model(bm)
    return {"formula": lme4_formula_of_bambi(bm.formula.main), "data": _bambi_frame(bm.data),
            "missing": "drop" if bm.dropna else "raise"}


def _gs_columns(term) -> list[str]:
    """The columns of a bambi group-specific term, spelled as bayeslmm's block columns."""
    return [_column(c) for c in term.term.expr.labels]


def check_same_design(spec, bm) -> None:
    """Raise ``ModelError`` unless ``spec`` and the bambi model have the same response, fixed columns and blocks.

    The model moves exactly or not at all: a term whose columns bayeslmm would build
    differently (a coding, a dropped rank-deficient column) is caught here, column by column.
    """
    mu = bm.parameters[bm.family.likelihood.parent]
    y = np.asarray(bm.response_term.data, dtype=float).reshape(-1)
    if y.shape != spec.y.shape or not np.allclose(y, spec.y, rtol=1e-12, atol=0):
        raise ModelError(f"bambi's response ({bm.response_term.name}) is not bayeslmm's {spec.response!r} row for "
                         "row; the model cannot move")
    common = mu.design.common
    bambi_fixed = [_column(c) for c in common.as_dataframe().columns] if common is not None else []
    if bambi_fixed != list(spec.fixed_names):
        raise ModelError(f"the fixed-effect columns differ: bambi {bambi_fixed}, bayeslmm {list(spec.fixed_names)} "
                         "(a dropped rank-deficient column, or a different coding); the model cannot move")
    X = np.asarray(common.design_matrix, dtype=float)
    if not np.allclose(X, spec.X, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(spec.X))))):
        raise ModelError("bambi's and bayeslmm's fixed-effect columns have the same names but different values; "
                         "the model cannot move")
    for block, terms in _block_terms(spec, mu).items():
        cols = [c for t in terms for c in _gs_columns(t)]
        b = spec.blocks[block]
        if sorted(cols) != sorted(b.columns):
            raise ModelError(f"the group-specific terms of {b.group!r} have columns {cols} in bambi and "
                             f"{list(b.columns)} in bayeslmm (formulae codes a categorical left side "
                             "differently in the two); write the term with numeric columns")


def _block_terms(spec, mu) -> dict[int, list]:
    """bambi's group-specific terms by the index of the bayeslmm block of their grouping factor."""
    groups = [b.group for b in spec.blocks]
    if len(set(groups)) != len(groups):
        raise ModelError(f"bayeslmm has two blocks with one grouping factor ({groups}); write the group's "
                         "effects as one term, e.g. (1 + x || g)")
    out: dict[int, list] = {}
    for name, term in mu.group_specific_terms.items():
        factor = name.split("|", 1)[1]
        if factor not in groups:
            raise ModelError(f"bambi's term {name!r} has no grouping factor among bayeslmm's {groups}")
        out.setdefault(groups.index(factor), []).append(term)
    if len(out) != len(groups):
        raise ModelError(f"bambi has group-specific terms for {sorted(groups[k] for k in out)}, bayeslmm for {groups}")
    return out


def _prior_from_bambi(prior, where: str, kind: str) -> Prior:
    """A bambi prior (PyMC name and arguments) as a bayeslmm ``Prior``; refuse what bayeslmm lacks."""
    families = LOCATION_FAMILIES if kind == "location" else SCALE_FAMILIES
    if not hasattr(prior, "args") or prior.name not in families:
        raise ModelError(f"bambi's prior for {where} is {prior}; bayeslmm's {kind} priors are "
                         f"{sorted(families)}: set one of those in bambi, or let bayeslmm's defaults apply")
    if any(hasattr(v, "args") for v in prior.args.values()):
        raise ModelError(f"bambi's prior for {where} ({prior}) has a hyperprior; bayeslmm's priors have fixed "
                         "parameters")
    params = {k: np.asarray(v, dtype=float) for k, v in prior.args.items()}
    return Prior(prior.name, **{k: float(v) if v.ndim == 0 else v for k, v in params.items()}).check(where, kind)


def _element(prior: Prior, k: int, n: int) -> Prior:
    """Column k of a prior whose parameters are one value or one per column (n columns)."""
    params = {}
    for name, v in prior.params.items():
        v = np.asarray(v, dtype=float)
        params[name] = float(v) if v.ndim == 0 else float(np.broadcast_to(v, (n,))[k])
    return Prior(prior.family, **params)


def bambi_priors(bm) -> dict:
    """bambi's priors, defaults included, as a ``priors=`` dict for bayeslmm's ``fit(method="nuts")``.

    Keys follow :mod:`bayeslmm.bayes.priors`: a coefficient per fixed-effect column,
    ``"sigma"``, and ``{"group": {"sd": ...}}`` per block.  Refused (``ModelError``):
    a prior family bayeslmm does not take for that parameter, a hyperprior on a
    coefficient, a group-specific prior other than ``Normal(mu=0, sigma=<scale prior>)``,
    sds of one group from different families (bayeslmm's block shares one family), and
    ``center_predictors=False`` with an intercept (bambi's intercept prior is then on
    x = 0, bayeslmm's on the predictors' means).
    """
    spec = build_spec(**model_arguments(bm))   # the spec Model.from_bambi(bm) has
    check_same_design(spec, bm)                 # the model moves; the blocks' column order
    mu = bm.parameters[bm.family.likelihood.parent]
    out: dict = {}
    if mu.intercept_term is not None:
        if not bm.center_predictors and len(spec.fixed_names) > 1:
            raise ModelError("this bambi model has center_predictors=False, so its intercept prior is on x = 0; "
                             "bayeslmm's is on the predictors' means: build it with center_predictors=True")
        out[INTERCEPT] = _prior_from_bambi(mu.intercept_term.prior, "the intercept", "location")
    cols = mu.design.common.as_dataframe().columns
    for name, term in mu.common_terms.items():
        labels = [_column(c) for c in cols[mu.design.common.slices[name]]]
        prior = _prior_from_bambi(term.prior, f"{name!r}", "location")
        for k, label in enumerate(labels):
            out[label] = _element(prior, k, len(labels))
    sigma = bm.parameters["sigma"].prior
    out["sigma"] = _prior_from_bambi(sigma, "sigma", "scale")
    for block, terms in _block_terms(spec, mu).items():
        out[spec.blocks[block].group] = {"sd": _block_sd_prior(spec.blocks[block], terms)}
    return out


def _block_sd_prior(block, terms) -> Prior:
    """One bayeslmm sd prior (per-column parameters) from bambi's terms on one grouping factor."""
    per_column: dict[str, Prior] = {}
    for term in terms:
        p = term.prior
        where = f"the group-specific term {term.name!r}"
        mu = np.asarray(p.args.get("mu", 0.0), dtype=float)
        if p.name != "Normal" or set(p.args) != {"mu", "sigma"} or np.any(mu != 0) or not hasattr(p.args["sigma"], "args"):
            raise ModelError(f"bambi's prior for {where} is {p}; bayeslmm's effects are Normal(0, sd) with a "
                             "prior on sd: set Normal(mu=0, sigma=<prior on the sd>) in bambi")
        sd = _prior_from_bambi(p.args["sigma"], f"the sd of {term.name!r}", "scale")
        labels = _gs_columns(term)
        for k, label in enumerate(labels):
            per_column[label] = _element(sd, k, len(labels))
    families = {(p.family, tuple(sorted(p.params))) for p in per_column.values()}
    if len(families) > 1:
        raise ModelError(f"bambi's sds of {block.group!r} have different prior families "
                         f"({', '.join(f'{c}: {p}' for c, p in per_column.items())}); a bayeslmm block shares one: "
                         "give them one family in bambi")
    family, names = families.pop()
    return Prior(family, **{n: np.array([per_column[c].params[n] for c in block.columns]) for n in names})


# -- bayeslmm -> bambi -------------------------------------------------------------------

def bambi_formula(spec, drop_correlations: bool = False) -> str:
    """The model's formula in bambi's meaning: ``(x || g)`` (and a one-column ``(x | g)``) becomes ``(x | g)``.

    A correlated block with more than one column has no bambi equivalent: refused,
    unless ``drop_correlations=True`` (then it moves without its correlations, with a warning).
    """
    parsed = parse_formula(spec.formula)
    terms = []
    dropped = []
    for bar in parsed.bars:
        for factor in bar.factors:
            group = ":".join(factor)
            block = next(b for b in spec.blocks if b.group == group)
            if block.correlated and block.q > 1:
                dropped.append(bar.text if len(bar.factors) == 1 else f"{bar.text} (factor {group})")
            terms.append(f"({bar.lhs} | {_factor_name(factor)})")
    if dropped and not drop_correlations:
        raise ModelError(
            f"bambi fits the effects of a term uncorrelated, so {', '.join(dropped)} (correlated) has no bambi "
            "equivalent: write it with '||' (uncorrelated) in bayeslmm too, or pass drop_correlations=True to "
            "move it without its correlations"
        )
    if dropped:
        warnings.warn(f"to_bambi: the bambi model has no correlations for {', '.join(dropped)}", UserWarning,
                      stacklevel=3)
    return f"{parsed.response} ~ {parsed.fixed} + {' + '.join(terms)}"


def to_bambi(spec, priors: dict | None = None, drop_correlations: bool = False):
    """A ``bambi.Model`` of the same formula, data and priors as the bayeslmm model of ``spec`` (``Model.spec``).

    Every prior is the one ``model.fit(method="nuts", priors=priors)`` would use
    (bayeslmm's defaults with ``priors`` applied), set explicitly in bambi;
    the predictors are centred in both, so the intercept prior means the same.
    Refused (``ModelError``): a correlated block with more than one column (bambi
    has no correlations; ``drop_correlations=True`` moves it without them, with a
    warning), a model that did not keep its rows, and any term bambi would build
    with other columns (checked column by column).
    """
    bambi = _import_bambi()
    spec.require_rows("moving the model to bambi (bambi builds its model from the rows)")
    formula = bambi_formula(spec, drop_correlations)
    # bayeslmm's level order (ordered categoricals keep theirs in formulae): same coding in both
    data = spec.data.copy(deep=False)
    for col in data.columns:
        s = data[col]
        if isinstance(s.dtype, pd.CategoricalDtype) and not s.cat.ordered:
            data[col] = s.cat.remove_unused_categories().cat.as_ordered()
    with warnings.catch_warnings():  # bambi's own deprecation notices (pandas 3, its renamed attributes)
        warnings.filterwarnings("ignore", category=FutureWarning, module="bambi")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="bambi")
        bm = bambi.Model(formula, data, family="gaussian", dropna=False, center_predictors=True)
    check_same_design(spec, bm)
    bm.set_priors(priors=_bambi_prior_dict(spec, resolve_priors(spec, priors), bm, bambi))
    return bm


def _bambi_prior_dict(spec, prior_set, bm, bambi) -> dict:
    """``prior_set`` as bambi's ``priors=`` dict: per term, with each term's columns' parameters."""

    def to_bmb(prior: Prior, k=None, **extra):
        params = {n: (np.asarray(v, dtype=float)[k] if k is not None and np.ndim(v) else v)
                  for n, v in prior.params.items()}
        params = {n: (v.tolist() if isinstance(v, np.ndarray) else float(v)) for n, v in params.items()}
        return bambi.Prior(prior.family, **params, **extra)

    mu = bm.parameters[bm.family.likelihood.parent]
    names = list(spec.fixed_names)
    out = {}
    if mu.intercept_term is not None:
        out["Intercept"] = to_bmb(prior_set.beta[names.index(INTERCEPT)])
    cols = mu.design.common.as_dataframe().columns
    for name in mu.common_terms:
        idx = [names.index(_column(c)) for c in cols[mu.design.common.slices[name]]]
        out[name] = _stacked(prior_set.beta, idx, to_bmb)
    out["sigma"] = to_bmb(prior_set.sigma)
    for block, terms in _block_terms(spec, mu).items():
        b, sd = spec.blocks[block], prior_set.blocks[block].sd
        for term in terms:
            idx = np.array([list(b.columns).index(c) for c in _gs_columns(term)])
            hyper = to_bmb(sd, idx if len(idx) > 1 else int(idx[0]))
            out[term.name] = bambi.Prior("Normal", mu=0.0, sigma=hyper)
    return out


def _stacked(priors, idx: list[int], to_bmb):
    """One bambi prior for a term spanning the columns ``idx`` (one family, per-column parameters)."""
    chosen = [priors[k] for k in idx]
    if len(chosen) == 1:
        return to_bmb(chosen[0])
    if len({(p.family, tuple(sorted(p.params))) for p in chosen}) > 1:
        raise ModelError(f"bambi gives the columns of one term one prior family; these have {[str(p) for p in chosen]}")
    params = {n: np.array([float(p.params[n]) for p in chosen]) for n in chosen[0].params}
    return to_bmb(Prior(chosen[0].family, **params))
