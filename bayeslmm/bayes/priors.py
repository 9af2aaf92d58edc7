"""Priors: weakly informative defaults scaled to the data, every one overridable.

Defaults (after rstanarm's autoscaling, Gabry & Goodrich, *Prior distributions for
rstanarm models*; predictors are centred internally when the model has an
intercept, as rstanarm, brms and bambi do):

* intercept (at the predictors' means): ``Normal(mean(y), 2.5·sd(y))``
* coefficient of column k:           ``Normal(0, 2.5·sd(y)/sd(x_k))``
  (``rms(x_k)`` instead of ``sd`` for columns of a model without intercept)
* residual sd σ:                     ``Exponential(rate = 1/sd(y))``
* sd of random-effect column c:      ``HalfNormal(sd(y)/s_c)``, s_c the column's sd
  (1 for an intercept; its rms when it does not vary)
* correlation of a correlated block: ``LKJ(η = 1)``, uniform over correlation matrices
  (brms' default); the block is one ``pm.LKJCholeskyCov``.
* a residual structure's parameters (:mod:`bayeslmm.residual`; variables ``residual_{name}``,
  all scale-free, so the same in standardised units):

  - ``VarIdent``: each level's sd ratio σ_level/σ_reference ``LogNormal(0, 1)`` (log-ratio ~ N(0, 1));
  - ``VarPower``: ``power`` ~ ``Normal(0, 1)``; ``VarExp``: ``expon`` ~ ``Normal(0, 1/sd(v))``
    (δ·v in the exponent: a unit-free prior on the covariate's own scale);
  - ``CorAR1``: ``Phi`` ~ ``Uniform(−1, 1)``; ``CorCAR1``: ``Phi`` ~ ``Uniform(0, 1)``;
    ``CorCompSymm``: ``Rho`` ~ ``Uniform(−1/(m−1), 1)`` (m the largest group), its whole range.

Override with a dict passed to ``Model.fit(method="nuts", priors=...)``::

    {"Days": Prior("Normal", mu=0, sigma=10),          # one coefficient
     "Intercept": Prior("Normal", mu=250, sigma=100),   # "(Intercept)" works too
     "sigma": Prior("HalfStudentT", nu=3, sigma=50),
     "Subject": {"sd": Prior("HalfNormal", sigma=[30, 10]), "eta": 2.0},
     "Subject|Days": Prior("HalfNormal", sigma=8),      # one random-effect sd
     "residual_Phi": Prior("Uniform", lower=0, upper=1)}  # a residual structure's parameter

A residual parameter takes a prior of its kind: a ``VarIdent`` ratio a positive family
(``LogNormal``, ``HalfNormal``, ...), ``power``/``expon`` a real-line family (``Normal``,
``StudentT``, ...), a correlation ``Uniform(lower, upper)`` inside its range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import BayesLMMError, DataError
from ..residual import VarExp, VarIdent
from ..spec import ModelSpec
from . import naming

#: distributions a prior may name, with the parameters that must be positive
LOCATION_FAMILIES = {"Normal": ("sigma",), "StudentT": ("nu", "sigma"), "Cauchy": ("beta",),
                     "Laplace": ("b",), "Logistic": ("s",)}
SCALE_FAMILIES = {"HalfNormal": ("sigma",), "HalfStudentT": ("nu", "sigma"), "HalfCauchy": ("beta",),
                  "Exponential": ("lam",), "Gamma": ("alpha", "beta"), "InverseGamma": ("alpha", "beta"),
                  "LogNormal": ("sigma",), "Weibull": ("alpha", "beta")}
#: the family a correlation parameter may take: Uniform inside the parameter's range
INTERVAL_FAMILIES = {"Uniform": ("lower", "upper")}
#: parameters a family may also take (any real value): its location
OPTIONAL_PARAMETERS = {"Normal": ("mu",), "StudentT": ("mu",), "Cauchy": ("alpha",), "Laplace": ("mu",),
                       "Logistic": ("mu",), "LogNormal": ("mu",)}


@dataclass(frozen=True)
class Prior:
    """A prior distribution by PyMC name and parameters, e.g. ``Prior("Normal", mu=0, sigma=10)``."""

    family: str
    params: dict = field(default_factory=dict)

    def __init__(self, family: str, **params):
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "params", params)

    def check(self, where: str, kind: str) -> "Prior":
        """Validate against the allowed families of ``kind`` ("location", "scale" or, for a
        correlation of the residual structure, ``("interval", lower, upper)``)."""
        if isinstance(kind, tuple):
            return self._check_interval(where, *kind[1:])
        families = LOCATION_FAMILIES if kind == "location" else SCALE_FAMILIES
        if self.family not in families:
            raise BayesLMMError(
                f"prior for {where}: unknown or unsuitable distribution {self.family!r}; "
                f"use one of {sorted(families)}"
            )
        for name in families[self.family]:
            if name not in self.params:
                raise BayesLMMError(f"prior for {where}: {self.family} needs the parameter {name!r}")
        takes = list(families[self.family]) + list(OPTIONAL_PARAMETERS.get(self.family, ()))
        for name in self.params:
            if name not in takes:
                raise BayesLMMError(
                    f"prior for {where}: {self.family} takes the parameters {sorted(takes)}, not {name!r}"
                )
        for name, value in self.params.items():
            arr = np.asarray(value, dtype=float)
            if not np.all(np.isfinite(arr)):
                raise BayesLMMError(f"prior for {where}: parameter {name}={value!r} must be finite")
            if name in families[self.family] and np.any(arr <= 0):
                raise BayesLMMError(f"prior for {where}: parameter {name}={value!r} must be positive")
        return self

    def _check_interval(self, where: str, lower: float, upper: float) -> "Prior":
        if self.family not in INTERVAL_FAMILIES or set(self.params) != {"lower", "upper"}:
            raise BayesLMMError(f"prior for {where}: a correlation parameter takes Uniform(lower=..., upper=...) "
                                f"inside ({lower:.4g}, {upper:.4g}); got {self}")
        lo, hi = (float(np.asarray(self.params[k], dtype=float)) for k in ("lower", "upper"))
        if not (np.isfinite(lo) and np.isfinite(hi) and lower <= lo < hi <= upper):
            raise BayesLMMError(f"prior for {where}: Uniform(lower={lo:.4g}, upper={hi:.4g}) must lie inside the "
                                f"parameter's range ({lower:.4g}, {upper:.4g}) with lower < upper")
        return self

    def __str__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"{self.family}({args})"

    def dist(self, **shape):
        """The PyMC distribution object (``pm.X.dist``)."""
        import pymc as pm

        return getattr(pm, self.family).dist(**self.params, **shape)

    def variable(self, name: str, **kwargs):
        import pymc as pm

        return getattr(pm, self.family)(name, **self.params, **kwargs)


def _short(v) -> str:
    if np.ndim(v) == 0:
        return f"{float(v):.4g}"
    return "[" + ", ".join(f"{float(x):.4g}" for x in np.ravel(v)) + "]"


@dataclass(frozen=True)
class BlockPriors:
    """Priors of one random-effect block: a shared sd family with per-column parameters, and η."""

    sd: Prior
    eta: float


@dataclass(frozen=True)
class PriorSet:
    """All priors of a model, on the scale the sampler sees (centred predictors)."""

    beta: tuple[Prior, ...]           # per fixed-effect column (centred intercept first if any)
    sigma: Prior
    blocks: tuple[BlockPriors, ...]
    centred: bool                      # predictors centred at their means (model has an intercept)
    x_means: np.ndarray                # means used for centring (0 for the intercept)
    residual: tuple[tuple[str, Prior], ...] = ()   # (variable name, prior) per residual parameter

    def standardised(self, shift: float, scale: float, intercept: int) -> "PriorSet":
        """The same priors for the response (y − shift)/scale: for β' = (β − shift·e_intercept)/scale,
        σ/scale and sd/scale (``bayes.collapsed.ResponseScale``), each a change of variables."""
        beta = tuple(_moved(pr, shift if k == intercept else 0.0, scale) for k, pr in enumerate(self.beta))
        blocks = tuple(BlockPriors(sd=_moved(bp.sd, 0.0, scale), eta=bp.eta) for bp in self.blocks)
        # the residual parameters (sd ratios, powers, correlations) have no units: unchanged
        return PriorSet(beta=beta, sigma=_moved(self.sigma, 0.0, scale), blocks=blocks, centred=self.centred,
                        x_means=self.x_means, residual=self.residual)

    def table(self, spec: ModelSpec) -> pd.DataFrame:
        """One row per prior: parameter, distribution, and what it is on."""
        rows = []
        for name, prior in zip(spec.fixed_names, self.beta):
            note = "at the predictors' means" if (self.centred and name == "(Intercept)") else ""
            rows.append(("fixed", name, str(prior), note))
        rows.append(("residual", "sigma", str(self.sigma), ""))
        for block, bp in zip(spec.blocks, self.blocks):
            for c, col in enumerate(block.columns):
                params = {k: (np.ravel(v)[c] if np.ndim(v) else v) for k, v in bp.sd.params.items()}
                rows.append(("sd", f"{block.group}|{col}", str(Prior(bp.sd.family, **params)), ""))
            if block.correlated and block.q > 1:
                rows.append(("correlation", block.group, f"LKJ(eta={bp.eta:g})", "pm.LKJCholeskyCov"))
        for (name, prior), note in zip(self.residual, residual_notes(spec)):
            rows.append(("residual structure", name, str(prior), note))
        return pd.DataFrame(rows, columns=["class", "parameter", "prior", "note"])

    # -- the record a save stores ------------------------------------------------------
    def to_record(self) -> dict:
        """A JSON-ready record of every family and parameter (numpy values keep their dtype)."""
        return {
            "beta": [_prior_record(p, "a fixed effect") for p in self.beta],
            "sigma": _prior_record(self.sigma, "sigma"),
            "blocks": [{"sd": _prior_record(b.sd, "a random-effect sd"), "eta": float(b.eta)} for b in self.blocks],
            "centred": bool(self.centred),
            "x_means": _param_record(np.asarray(self.x_means), "the centring"),
            "residual": [{"name": n, "prior": _prior_record(p, n)} for n, p in self.residual],
        }

    @classmethod
    def from_record(cls, record: dict, spec: ModelSpec, source: str = "the record") -> "PriorSet":
        """The priors of :meth:`to_record`, checked as a fit checks a user's priors and against ``spec``.

        A record that is incomplete, or holds priors no fit accepts, gives a
        :class:`~bayeslmm.errors.DataError` naming ``source`` (the file it came from).
        """
        try:
            priors = cls(beta=tuple(_prior_from_record(p) for p in record["beta"]),
                         sigma=_prior_from_record(record["sigma"]),
                         blocks=tuple(BlockPriors(sd=_prior_from_record(b["sd"]), eta=float(b["eta"]))
                                      for b in record["blocks"]),
                         centred=bool(record["centred"]), x_means=_param_from_record(record["x_means"]),
                         residual=tuple((str(r["name"]), _prior_from_record(r["prior"]))
                                        for r in record.get("residual", [])))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{source}: the stored priors are incomplete ({type(exc).__name__}: {exc})") from exc
        try:
            priors.check_for(spec)
        except BayesLMMError as exc:
            raise DataError(f"{source}: the stored priors are not ones a fit accepts: {exc}; the file was altered "
                            "or damaged") from exc
        return priors

    def check_for(self, spec: ModelSpec) -> None:
        """The checks a fit applies to a user's priors, and their count and shapes for ``spec``."""
        if len(self.beta) != spec.n_fixed or len(self.blocks) != len(spec.blocks):
            raise BayesLMMError(f"{len(self.beta)} fixed-effect and {len(self.blocks)} block priors stored, the "
                                f"model has {spec.n_fixed} and {len(spec.blocks)}")
        for name, prior in zip(spec.fixed_names, self.beta):
            prior.check(f"coefficient {name!r}", "location")
            _check_prior_shape(prior, (), f"coefficient {name!r}")
        self.sigma.check("sigma", "scale")
        _check_prior_shape(self.sigma, (), "sigma")
        for block, bp in zip(spec.blocks, self.blocks):
            bp.sd.check(f"{block.group} sd", "scale")
            _check_prior_shape(bp.sd, (block.q,), f"{block.group} sd")
            if not (np.isfinite(bp.eta) and bp.eta > 0):
                raise BayesLMMError(f"prior for block {block.group!r}: LKJ eta must be a positive number, "
                                    f"got {bp.eta!r}")
        if np.shape(self.x_means) != (spec.n_fixed,) or not np.all(np.isfinite(self.x_means)):
            raise BayesLMMError(f"the centring means must be {spec.n_fixed} finite numbers")
        kinds = residual_kinds(spec)
        if [n for n, _ in self.residual] != list(kinds):
            raise BayesLMMError(f"residual priors {[n for n, _ in self.residual]} stored, the model's residual "
                                f"parameters are {list(kinds)}")
        for name, prior in self.residual:
            prior.check(name, kinds[name])
            _check_prior_shape(prior, (), name)


#: how each parameter of a family moves when the variable becomes (v − shift)/scale:
#: "loc" (minus shift, over scale), "scale" (over scale), "rate" (times scale), "log" (minus log scale);
#: shape parameters (nu, alpha of Gamma, InverseGamma, Weibull) do not move
_PARAMETER_ROLES = {"mu": "loc", "sigma": "scale", "b": "scale", "s": "scale", "lam": "rate"}
_FAMILY_ROLES = {"Cauchy": {"alpha": "loc", "beta": "scale"}, "HalfCauchy": {"beta": "scale"},
                 "Gamma": {"beta": "rate"}, "InverseGamma": {"beta": "scale"}, "Weibull": {"beta": "scale"},
                 "LogNormal": {"mu": "log", "sigma": None}}


def _moved(prior: Prior, shift: float, scale: float) -> Prior:
    """``prior`` of a variable v as the prior of (v − shift)/scale (a location-scale change of variables)."""
    params = {}
    for name, value in prior.params.items():
        role = _FAMILY_ROLES.get(prior.family, {}).get(name, _PARAMETER_ROLES.get(name))
        v = np.asarray(value, dtype=float)
        if role == "loc":
            v = (v - shift) / scale
        elif role == "scale":
            v = v / scale
        elif role == "rate":
            v = v * scale
        elif role == "log":
            v = v - np.log(scale)
        params[name] = v if v.ndim else float(v)
    if shift and prior.family not in LOCATION_FAMILIES:
        raise BayesLMMError(f"a {prior.family} prior cannot be moved by {shift:g}: it is not a location family")
    return Prior(prior.family, **params)


def _scale(values: np.ndarray) -> float:
    sd = float(np.std(values))
    if sd > 1e-12 * max(1.0, float(np.max(np.abs(values)))):
        return sd
    rms = float(np.sqrt(np.mean(values**2)))
    return rms if rms > 0 else 1.0


def _scale_from_moments(mom, c: int) -> float:
    """:func:`_scale` of column ``c`` from its moments (a spec built out of memory keeps no rows)."""
    sd = float(mom.std[c])
    if sd > 1e-12 * max(1.0, float(mom.max_abs[c])):
        return sd
    rms = float(mom.rms[c])
    return rms if rms > 0 else 1.0


def default_priors(spec: ModelSpec) -> PriorSet:
    """The documented defaults for ``spec``."""
    if spec.rows_in_memory:
        y = spec.y
        y_mean, sy = float(np.mean(y)), float(np.std(y))
        x_mean = lambda k: float(np.mean(spec.X[:, k]))  # noqa: E731
        x_scale = lambda k: _scale(spec.X[:, k])  # noqa: E731
        x_rms = lambda k: float(np.sqrt(np.mean(spec.X[:, k] ** 2)))  # noqa: E731
        z_scale = lambda i, c: _scale(spec.blocks[i].Z[:, c])  # noqa: E731
    else:  # built out of memory: the same statistics from the moments summed over the rows
        mom = spec.moments
        y_mean, sy = float(mom.y.mean[0]), float(mom.y.std[0])
        x_mean = lambda k: float(mom.X.mean[k])  # noqa: E731
        x_scale = lambda k: _scale_from_moments(mom.X, k)  # noqa: E731
        x_rms = lambda k: float(mom.X.rms[k])  # noqa: E731
        z_scale = lambda i, c: _scale_from_moments(mom.Z[i], c)  # noqa: E731
    names = list(spec.fixed_names)
    centred = "(Intercept)" in names
    means = np.zeros(spec.n_fixed)
    beta = []
    for k, name in enumerate(names):
        if name == "(Intercept)":
            beta.append(Prior("Normal", mu=y_mean if centred else 0.0, sigma=2.5 * sy))
            continue
        if centred:
            means[k] = x_mean(k)
            s = x_scale(k)
        else:
            s = x_rms(k) or 1.0
        beta.append(Prior("Normal", mu=0.0, sigma=2.5 * sy / s))
    blocks = []
    for i, block in enumerate(spec.blocks):
        scales = [sy / z_scale(i, c) if block.columns[c] != "(Intercept)" else sy for c in range(block.q)]
        blocks.append(BlockPriors(sd=Prior("HalfNormal", sigma=np.array(scales)), eta=1.0))
    return PriorSet(beta=tuple(beta), sigma=Prior("Exponential", lam=1.0 / sy), blocks=tuple(blocks),
                    centred=centred, x_means=means, residual=_default_residual_priors(spec))


# -- the residual structure's parameters -------------------------------------------------------------
def residual_kinds(spec: ModelSpec) -> dict:
    """``{variable name: kind}`` of the residual parameters, in the order of ``spec.residual.names``:
    "scale" (a VarIdent sd ratio), "location" (power, expon), ``("interval", lower, upper)`` (a correlation)."""
    res = getattr(spec, "residual", None)
    if res is None:
        return {}
    out = {}
    if res.variance is not None:
        ratio = isinstance(res.variance.structure, VarIdent)
        for n in res.variance.names:
            out[naming.residual_var(n)] = "scale" if ratio else "location"
    if res.correlation is not None:
        for n in res.correlation.names:
            out[naming.residual_var(n)] = ("interval", float(res.correlation.lower), 1.0)
    return out


def residual_notes(spec: ModelSpec) -> list[str]:
    """What each residual parameter is, for :meth:`PriorSet.table`."""
    res = getattr(spec, "residual", None)
    if res is None:
        return []
    notes = []
    if res.variance is not None:
        st = res.variance.structure
        if isinstance(st, VarIdent):
            notes += [f"sd ratio {lv}/reference ({st.by})" for lv in res.variance.names]
        else:
            notes += [f"{type(st).__name__} of {st.covariate}" for _ in res.variance.names]
    if res.correlation is not None:
        st = res.correlation.structure
        notes += [f"{type(st).__name__} within {st.group}, on ({res.correlation.lower:.4g}, 1)"
                  for _ in res.correlation.names]
    return notes


def _default_residual_priors(spec: ModelSpec) -> tuple[tuple[str, Prior], ...]:
    """The documented defaults (module docstring) for the residual parameters."""
    out = []
    for name, kind in residual_kinds(spec).items():
        if kind == "scale":
            out.append((name, Prior("LogNormal", mu=0.0, sigma=1.0)))
        elif isinstance(kind, tuple):
            out.append((name, Prior("Uniform", lower=kind[1], upper=kind[2])))
        elif isinstance(spec.residual.variance.structure, VarExp):
            v = spec.residual.variance.values
            out.append((name, Prior("Normal", mu=0.0, sigma=1.0 / _scale(v))))
        else:
            out.append((name, Prior("Normal", mu=0.0, sigma=1.0)))
    return tuple(out)


def resolve_priors(spec: ModelSpec, overrides: dict | None) -> PriorSet:
    """Defaults with the user's overrides applied and checked."""
    base = default_priors(spec)
    if not overrides:
        return base
    if not isinstance(overrides, dict):
        raise BayesLMMError("priors must be a dict such as {'Days': Prior('Normal', mu=0, sigma=10)}")
    beta = list(base.beta)
    sigma = base.sigma
    blocks = list(base.blocks)
    residual = dict(base.residual)
    kinds = residual_kinds(spec)
    names = list(spec.fixed_names)
    groups = [b.group for b in spec.blocks]
    for key, value in overrides.items():
        fixed_key = "(Intercept)" if key == "Intercept" else key
        if key in kinds:
            residual[key] = _as_prior(value, key).check(key, kinds[key])
            _check_prior_shape(residual[key], (), key)
        elif fixed_key in names:
            beta[names.index(fixed_key)] = _as_prior(value, f"coefficient {key!r}").check(f"coefficient {key!r}", "location")
        elif key == "sigma":
            sigma = _as_prior(value, "sigma").check("sigma", "scale")
        elif key in groups:
            i = groups.index(key)
            blocks[i] = _block_override(key, value, blocks[i], spec.blocks[i].q)
        elif "|" in key and key.split("|", 1)[0] in groups:
            group, col = key.split("|", 1)
            i = groups.index(group)
            blocks[i] = _one_sd_override(key, col, value, blocks[i], list(spec.blocks[i].columns))
        else:
            extra = f", a residual parameter {list(kinds)}" if kinds else ""
            raise BayesLMMError(
                f"prior key {key!r} names nothing in the model; use a coefficient {names}, 'sigma', "
                f"a grouping factor {groups} (with 'sd'/'eta'), 'group|column' for one sd{extra}"
            )
    return PriorSet(beta=tuple(beta), sigma=sigma, blocks=tuple(blocks), centred=base.centred, x_means=base.x_means,
                    residual=tuple(residual.items()))


def _block_override(key: str, value, bp: "BlockPriors", q: int) -> "BlockPriors":
    """``{group: {"sd": Prior, "eta": float}}``: a block's sd prior (per column) and/or LKJ η."""
    if not isinstance(value, dict) or not set(value) <= {"sd", "eta"}:
        raise BayesLMMError(f"prior for block {key!r} must be a dict with keys 'sd' and/or 'eta'")
    sd, eta = bp.sd, bp.eta
    if "sd" in value:
        sd = _as_prior(value["sd"], f"{key} sd").check(f"{key} sd", "scale")
        sd = Prior(sd.family, **{k: _per_column(v, q, f"{key} sd {k}") for k, v in sd.params.items()})
    if "eta" in value:
        eta = value["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not np.isfinite(eta) or eta <= 0:
            raise BayesLMMError(f"prior for block {key!r}: LKJ eta must be a positive number, got {eta!r}")
    return BlockPriors(sd=sd, eta=float(eta))


def _one_sd_override(key: str, col: str, value, bp: "BlockPriors", cols: list[str]) -> "BlockPriors":
    """``{"group|column": Prior}``: one column's sd prior, in the block's shared family."""
    group = key.split("|", 1)[0]
    col = "(Intercept)" if col in ("1", "Intercept") else col
    if col not in cols:
        raise BayesLMMError(f"prior {key!r}: {group!r} has no random effect {col!r} (it has {cols})")
    new = _as_prior(value, key).check(key, "scale")
    if new.family != bp.sd.family or set(new.params) != set(bp.sd.params):
        raise BayesLMMError(
            f"prior {key!r}: the sds of one block share a distribution ({bp.sd}); give "
            f"{bp.sd.family} parameters, or set the whole block with {{'{group}': {{'sd': ...}}}}"
        )
    params = {k: np.array(_per_column(v, len(cols), key), dtype=float) for k, v in bp.sd.params.items()}
    for k, v in new.params.items():
        params[k][cols.index(col)] = float(v)
    return BlockPriors(sd=Prior(bp.sd.family, **params), eta=bp.eta)


def _as_prior(value, where: str) -> Prior:
    if not isinstance(value, Prior):
        raise BayesLMMError(f"prior for {where} must be a bayeslmm.Prior, e.g. Prior('Normal', mu=0, sigma=1); got {value!r}")
    return value


def _per_column(v, q: int, where: str):
    arr = np.asarray(v, dtype=float)
    if arr.ndim == 0:
        return np.full(q, float(arr))
    if arr.shape != (q,):
        raise BayesLMMError(f"{where}: give one value or {q} (one per random-effect column), got shape {arr.shape}")
    return arr


# -- records of priors (what a save stores) --------------------------------------------------------
def _param_record(value, where: str):
    """A parameter as JSON; arrays and numpy scalars are tagged with their dtype so they come back alike."""
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return {"scalar": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_param_record(v, where) for v in value]}
    if isinstance(value, (bool, int, float)):
        return value
    raise DataError(f"cannot save the prior for {where}: a parameter is a {type(value).__name__}; give numbers")


def _param_from_record(value):
    if isinstance(value, dict):
        if "ndarray" in value:
            return np.array(value["ndarray"], dtype=np.dtype(value["dtype"]))
        if "scalar" in value:
            return np.dtype(value["dtype"]).type(value["scalar"])
        if "list" in value:
            return [_param_from_record(v) for v in value["list"]]
        if "tuple" in value:
            return tuple(_param_from_record(v) for v in value["tuple"])
        raise DataError(f"unreadable prior parameter {value!r}")
    return value


def _prior_record(prior: Prior, where: str) -> dict:
    return {"family": prior.family, "params": {k: _param_record(v, where) for k, v in prior.params.items()}}


def _prior_from_record(record: dict) -> Prior:
    return Prior(record["family"], **{k: _param_from_record(v) for k, v in record["params"].items()})


def _check_prior_shape(prior: Prior, shape: tuple, where: str) -> None:
    """One value (or, for a block's sds, one per column) per parameter."""
    for name, value in prior.params.items():
        if np.size(value) != 1 and np.shape(value) != shape:
            raise BayesLMMError(f"prior for {where}: parameter {name} has shape {np.shape(value)}, "
                                f"not {shape or 'one value'}")
