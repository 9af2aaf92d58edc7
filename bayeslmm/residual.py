"""Residual structures: y = Xβ + Zb + ε with ε ~ N(0, R), R = σ² Λ_R(ρ) instead of σ² I.

The structures read as nlme's (Pinheiro & Bates 2000, ch. 5): a *variance function*
(the relative sd of each row, ``weights =`` in ``lme``), a *correlation structure*
within groups (``correlation =``), and known precision weights (lme4's ``weights``).

The maths.  Write Λ_R = S C S with S the diagonal of relative sds s_i (variance
function times 1/√w_i) and C block diagonal, one correlation block per group of the
correlation structure.  A whitening W = C^{-1/2} S^{-1} (any W with W Λ_R Wᵀ = I)
turns the model for Wy into the σ²I model with X̃ = WX, Z̃ = WZ, so

    REML(θ, ρ) = REML_σ²I(θ; Wy, WX, WZ) + log|Λ_R(ρ)|          (ML likewise),

log|Λ_R| = 2 Σ log s_i + Σ_g log|C_g|; β̂, b̂, σ̂ and vcov(β̂) are the σ²I fit's on the
whitened data, the fitted values Xβ̂ + Zb̂ on the original rows.  Where W keeps every
row inside one level of every random-effect factor (a variance function: W diagonal;
a correlation group nested in, or equal to, every grouping factor), the whitened data
are a :class:`~bayeslmm.spec.ModelSpec` with the same codes and levels, and the
cross-products and profiled deviance of the σ²I model are reused unchanged.  Each
evaluation at a new ρ re-forms the cross-products: one pass over the rows, O(n·k²)
for k = p + Σq columns.

Whitenings used: AR(1) and CAR(1) by the Prais–Winsten recursion in time order (the
correlation φ^|Δt| is Markov, so e'_t = (e_t − φ^Δ e_{t−1}) / √(1 − φ^{2Δ}) and
log|C_g| = Σ log(1 − φ^{2Δ})); compound symmetry by its symmetric inverse square root
(1−ρ)^{-1/2}(I − J/n) + (1+(n−1)ρ)^{-1/2} J/n, all O(n).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import DataError, ModelError
from .spec import nesting_map


# -- the structures a user writes --------------------------------------------------------------
@dataclass(frozen=True)
class VarIdent:
    """A residual sd per level of ``by``: nlme's ``varIdent(form = ~ 1 | by)``.

    Parameters σ_level / σ_reference for every level but the first (the reference,
    as nlme: the first level of a categorical column, else the sorted first value).
    """

    by: str
    kind = "variance"


@dataclass(frozen=True)
class VarPower:
    """Residual sd ∝ |v|^δ: nlme's ``varPower(form = ~ covariate)``; parameter ``power`` δ.

    A covariate with a zero value is refused (its sd would be 0 or infinite)."""

    covariate: str
    kind = "variance"


@dataclass(frozen=True)
class VarExp:
    """Residual sd ∝ exp(δ v): nlme's ``varExp(form = ~ covariate)``; parameter ``expon`` δ."""

    covariate: str
    kind = "variance"


@dataclass(frozen=True)
class VarFixed:
    """Known residual variance ∝ v (v > 0): nlme's ``varFixed(~ covariate)``, i.e. weights 1/v."""

    covariate: str
    kind = "variance"


@dataclass(frozen=True)
class CorAR1:
    """AR(1) within each level of ``group``: nlme's ``corAR1(form = ~ 1 | group)``; parameter ``Phi``.

    Without ``time`` the rows' order within a group is the time order (nlme's
    default); with an integer ``time`` column, consecutive times are one step apart
    and a gap of d steps has correlation φ^d (nlme's ``corAR1(form = ~ time | group)``).
    """

    group: str
    time: str | None = None
    kind = "correlation"


@dataclass(frozen=True)
class CorCAR1:
    """Continuous-time AR(1): corr φ^|Δt| for a numeric ``time``, 0 < φ < 1; nlme's
    ``corCAR1(form = ~ time | group)``; parameter ``Phi``."""

    group: str
    time: str
    kind = "correlation"


@dataclass(frozen=True)
class CorCompSymm:
    """One correlation ρ between any two rows of a group: nlme's ``corCompSymm(form = ~ 1 | group)``;
    parameter ``Rho``, −1/(m−1) < ρ < 1 for the largest group size m."""

    group: str
    kind = "correlation"


VARIANCES = (VarIdent, VarPower, VarExp, VarFixed)
CORRELATIONS = (CorAR1, CorCAR1, CorCompSymm)
_BY_NAME = {c.__name__: c for c in VARIANCES + CORRELATIONS}


def describe(structure) -> dict | None:
    """A JSON description of a structure (what a save stores)."""
    if structure is None:
        return None
    return {"type": type(structure).__name__, **structure.__dict__}


def from_description(record: dict | None):
    """The structure of :func:`describe`."""
    if record is None:
        return None
    args = {k: v for k, v in record.items() if k != "type"}
    return _BY_NAME[record["type"]](**args)


def columns_of(variance, correlation, weights) -> list[str]:
    """The data columns the structures read."""
    cols = []
    if variance is not None:
        cols.append(variance.by if isinstance(variance, VarIdent) else variance.covariate)
    if correlation is not None:
        cols.append(correlation.group)
        if getattr(correlation, "time", None) is not None:
            cols.append(correlation.time)
    if isinstance(weights, str):
        cols.append(weights)
    return list(dict.fromkeys(cols))


# -- bound to the rows ------------------------------------------------------------------------
def _numeric(frame: pd.DataFrame, col: str, what: str) -> np.ndarray:
    s = frame[col]
    if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        raise DataError(f"the {what} column {col!r} must be numeric, got dtype {s.dtype}")
    v = s.to_numpy(dtype=float)
    if not np.all(np.isfinite(v)):
        raise DataError(f"the {what} column {col!r} has {int(np.sum(~np.isfinite(v)))} missing or infinite "
                        "values; drop those rows before building the model")
    return v


def _codes(frame: pd.DataFrame, col: str, what: str) -> tuple[np.ndarray, tuple[str, ...]]:
    s = frame[col]
    if s.isna().any():
        raise DataError(f"the {what} column {col!r} has {int(s.isna().sum())} missing values; drop those rows "
                        "before building the model")
    if isinstance(s.dtype, pd.CategoricalDtype):
        cat = s.cat.remove_unused_categories()
        return cat.cat.codes.to_numpy().astype(np.intp), tuple(map(str, cat.cat.categories))
    levels, codes = np.unique(s.to_numpy(), return_inverse=True)
    return codes.astype(np.intp), tuple(map(str, levels))


@dataclass(frozen=True, eq=False)
class _Variance:
    """A variance function on the rows: relative sd s(δ) per row."""

    structure: object
    names: tuple[str, ...]
    values: np.ndarray          # covariate, or level codes for VarIdent
    start: np.ndarray

    def sd(self, u: np.ndarray) -> np.ndarray:
        s = self.structure
        if isinstance(s, VarIdent):
            return np.exp(np.concatenate([[0.0], u]))[self.values.astype(np.intp)]
        if isinstance(s, VarPower):
            return np.abs(self.values) ** u[0]
        if isinstance(s, VarExp):
            return np.exp(u[0] * self.values)
        return np.sqrt(self.values)  # VarFixed

    def natural(self, u: np.ndarray) -> np.ndarray:
        return np.exp(u) if isinstance(self.structure, VarIdent) else np.asarray(u, float)

    def unconstrained(self, v: np.ndarray) -> np.ndarray:
        return np.log(v) if isinstance(self.structure, VarIdent) else np.asarray(v, float)


def bind_variance(structure, frame: pd.DataFrame) -> _Variance:
    if isinstance(structure, VarIdent):
        codes, levels = _codes(frame, structure.by, "varIdent")
        counts = np.bincount(codes, minlength=len(levels))
        if np.any(counts < 2):
            few = [lv for lv, c in zip(levels, counts) if c < 2]
            raise DataError(f"VarIdent({structure.by!r}): the level(s) {few} have a single observation; a "
                            "variance per level needs at least two. Merge those levels or drop the rows")
        return _Variance(structure, levels[1:], codes.astype(float), np.zeros(len(levels) - 1))
    if not isinstance(structure, VARIANCES):
        raise ModelError(f"variance= takes one of {[c.__name__ for c in VARIANCES]}, got {structure!r}")
    name = type(structure).__name__
    v = _numeric(frame, structure.covariate, name)
    if isinstance(structure, VarPower) and np.any(v == 0):
        raise DataError(f"VarPower({structure.covariate!r}): the covariate is 0 in {int(np.sum(v == 0))} rows, "
                        "where |v|^δ is 0 or infinite (nlme fails there too). Shift the covariate or use VarExp")
    if isinstance(structure, VarFixed) and np.any(v <= 0):
        raise DataError(f"VarFixed({structure.covariate!r}): the variance covariate must be positive; it is ≤ 0 "
                        f"in {int(np.sum(v <= 0))} rows")
    names = {VarPower: ("power",), VarExp: ("expon",), VarFixed: ()}[type(structure)]
    return _Variance(structure, names, v, np.zeros(len(names)))


@dataclass(frozen=True, eq=False)
class _Correlation:
    """A correlation structure on the rows: groups, and the predecessor and lag of each row."""

    structure: object
    group: np.ndarray   # group code per row
    prev: np.ndarray    # the row before in time order within the group, −1 for a group's first
    lag: np.ndarray     # time since that row (1 in row order)
    sizes: np.ndarray   # rows per group
    lower: float        # the natural parameter's lower bound
    names: tuple[str, ...] = field(default=())

    @property
    def start(self) -> np.ndarray:
        start = 0.2 if isinstance(self.structure, CorCAR1) else 0.0  # nlme's default starts
        return self.unconstrained(np.array([start]))

    def natural(self, u: np.ndarray) -> np.ndarray:
        if isinstance(self.structure, CorAR1):
            return np.tanh(u)
        return self.lower + (1.0 - self.lower) / (1.0 + np.exp(-np.asarray(u, float)))

    def unconstrained(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, float)
        if isinstance(self.structure, CorAR1):
            return np.arctanh(v)
        p = (v - self.lower) / (1.0 - self.lower)
        return np.log(p) - np.log1p(-p)

    def whiten(self, values: np.ndarray, u: np.ndarray) -> np.ndarray:
        r = float(self.natural(u)[0])
        if isinstance(self.structure, CorCompSymm):
            return _whiten_compsymm(values, r, self.group, self.sizes)
        return _whiten_markov(values, r, self.prev, self.lag)

    def log_det(self, u: np.ndarray) -> float:
        r = float(self.natural(u)[0])
        if isinstance(self.structure, CorCompSymm):
            m = self.sizes.astype(float)
            return float(np.sum((m - 1) * np.log1p(-r) + np.log1p((m - 1) * r)))
        c = r ** self.lag[self.prev >= 0]
        return float(np.sum(np.log1p(-c * c)))


def _whiten_markov(values: np.ndarray, phi: float, prev: np.ndarray, lag: np.ndarray) -> np.ndarray:
    """Prais–Winsten: e'_t = (e_t − φ^Δ e_{t−1}) / √(1 − φ^{2Δ}); a group's first row unchanged."""
    out = np.array(values, dtype=float, copy=True)
    has = prev >= 0
    c = phi ** lag[has]
    s = np.sqrt(1.0 - c * c)
    if out.ndim == 2:
        c, s = c[:, None], s[:, None]
    out[has] = (values[has] - c * values[prev[has]]) / s
    return out


def _whiten_compsymm(values: np.ndarray, rho: float, group: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(1−ρ)^{-1/2} v + ((1+(n−1)ρ)^{-1/2} − (1−ρ)^{-1/2}) · (group mean of v)."""
    v = values if values.ndim == 2 else values[:, None]
    sums = np.stack([np.bincount(group, weights=v[:, k], minlength=len(sizes)) for k in range(v.shape[1])], axis=1)
    means = sums / sizes[:, None]
    a = 1.0 / np.sqrt(1.0 - rho)
    c = 1.0 / np.sqrt(1.0 + (sizes - 1.0) * rho)
    out = a * v + ((c - a)[:, None] * means)[group]
    return out if values.ndim == 2 else out[:, 0]


def bind_correlation(structure, frame: pd.DataFrame) -> _Correlation:
    if not isinstance(structure, CORRELATIONS):
        raise ModelError(f"correlation= takes one of {[c.__name__ for c in CORRELATIONS]}, got {structure!r}")
    name = type(structure).__name__
    group, _ = _codes(frame, structure.group, f"{name} group")
    n = len(group)
    time = getattr(structure, "time", None)
    t = np.arange(n, dtype=float) if time is None else _numeric(frame, time, f"{name} time")
    if isinstance(structure, CorAR1) and time is not None and np.any(t != np.round(t)):
        raise DataError(f"CorAR1: the time column {time!r} must hold integers (consecutive times one step "
                        "apart); for real-valued times use CorCAR1")
    order = np.lexsort((t, group))
    same = group[order][1:] == group[order][:-1]
    lag_sorted = np.diff(t[order])
    if time is not None and np.any(same & (lag_sorted == 0)):
        raise DataError(f"{name}: the time column {time!r} repeats a time within a level of {structure.group!r}; "
                        "times must be distinct within a group")
    prev = np.full(n, -1, dtype=np.intp)
    lag = np.ones(n)
    prev[order[1:][same]] = order[:-1][same]
    # without a time column the order within a group is the rows' order: one step apart, however
    # the groups' rows interleave (nlme's corAR1(form = ~ 1 | g))
    lag[order[1:][same]] = lag_sorted[same] if time is not None else 1.0
    sizes = np.bincount(group)
    lower = -1.0 if isinstance(structure, CorAR1) else 0.0
    if isinstance(structure, CorCompSymm):
        lower = -1.0 / (max(int(sizes.max()), 2) - 1)
    names = ("Rho",) if isinstance(structure, CorCompSymm) else ("Phi",)
    return _Correlation(structure, group, prev, lag, sizes.astype(float), lower, names)


# -- the residual model of a spec ----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ResidualModel:
    """R = σ² Λ_R(ρ) on a model's rows: a variance function, a correlation structure and/or
    known precision weights, with the unconstrained parameters ρ in that order."""

    variance: _Variance | None
    correlation: _Correlation | None
    weights: np.ndarray | None          # precision weights per row (Var = σ²/w)
    weights_name: str | None            # the column, or None for an array
    frame: pd.DataFrame = field(repr=False)  # the columns read, aligned with the rows (what a save keeps)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.variance.names if self.variance else ()) + tuple(
            self.correlation.names if self.correlation else ())

    @property
    def n_params(self) -> int:
        return len(self.names)

    @property
    def start(self) -> np.ndarray:
        parts = [p.start for p in (self.variance, self.correlation) if p is not None]
        return np.concatenate(parts) if parts else np.zeros(0)

    def _split(self, u: np.ndarray):
        k = len(self.variance.names) if self.variance else 0
        u = np.asarray(u, dtype=float)
        return u[:k], u[k:]

    def natural(self, u: np.ndarray) -> dict[str, float]:
        """The parameters on nlme's scale (sd ratios, powers, Phi, Rho), by name."""
        uv, uc = self._split(u)
        vals = []
        if self.variance is not None:
            vals += list(self.variance.natural(uv))
        if self.correlation is not None:
            vals += list(self.correlation.natural(uc))
        return {n: float(v) for n, v in zip(self.names, vals)}

    def unconstrained(self, natural: dict[str, float]) -> np.ndarray:
        v = np.array([natural[n] for n in self.names], dtype=float)
        k = len(self.variance.names) if self.variance else 0
        parts = []
        if self.variance is not None:
            parts.append(self.variance.unconstrained(v[:k]))
        if self.correlation is not None:
            parts.append(self.correlation.unconstrained(v[k:]))
        return np.concatenate(parts) if parts else np.zeros(0)

    def sd(self, u: np.ndarray) -> np.ndarray | None:
        """Relative sd per row (None where every row's is 1)."""
        uv, _ = self._split(u)
        s = None if self.variance is None else self.variance.sd(uv)
        if self.weights is not None:
            w = 1.0 / np.sqrt(self.weights)
            s = w if s is None else s * w
        return s

    def whiten(self, values: np.ndarray, u: np.ndarray) -> np.ndarray:
        """W values: divided by the relative sds, then decorrelated within groups."""
        s = self.sd(u)
        out = values if s is None else (values / s if values.ndim == 1 else values / s[:, None])
        if self.correlation is not None:
            out = self.correlation.whiten(out, self._split(u)[1])
        return out

    def log_det(self, u: np.ndarray) -> float:
        """log|Λ_R(ρ)| = 2 Σ log s_i + Σ_g log|C_g|."""
        s = self.sd(u)
        out = 0.0 if s is None else 2.0 * float(np.sum(np.log(s)))
        if self.correlation is not None:
            out += self.correlation.log_det(self._split(u)[1])
        return out

    def describe(self) -> dict:
        """What rebuilds this model (:func:`from_record`): the structures and the columns they read."""
        columns = {}
        for c in self.frame.columns:
            s = self.frame[c]
            cats = list(map(str, s.cat.categories)) if isinstance(s.dtype, pd.CategoricalDtype) else None
            values = s.astype(str) if cats is not None else s
            columns[c] = {"values": values.tolist(), "categories": cats}
        return {"variance": describe(self.variance.structure if self.variance else None),
                "correlation": describe(self.correlation.structure if self.correlation else None),
                "weights": self.weights_name if self.weights_name is not None else
                (None if self.weights is None else self.weights.tolist()),
                "columns": columns}

    def lines(self, u: np.ndarray) -> list[str]:
        """The estimates as nlme's ``print(summary(fit))`` shows them."""
        nat, out = self.natural(u), []
        if self.variance is not None:
            s = self.variance.structure
            out += [f"Variance function: {_nlme_call(s)}"]
            if isinstance(s, VarIdent):
                levels = ("reference",) + self.variance.names
                out += [" Parameter estimates:", "  " + "  ".join(f"{lv:>10}" for lv in levels),
                        "  " + "  ".join(f"{v:>10.6g}" for v in [1.0] + [nat[n] for n in self.variance.names])]
            elif self.variance.names:
                out += [" Parameter estimates:", "  " + "  ".join(f"{n} {nat[n]:.6g}" for n in self.variance.names)]
        if self.correlation is not None:
            c = self.correlation
            out += [f"Correlation Structure: {_nlme_call(c.structure)}", " Parameter estimate(s):",
                    "  " + "  ".join(f"{n} {nat[n]:.6g}" for n in c.names)]
        if self.weights_name is not None or (self.weights is not None and self.variance is None):
            out += [f"Precision weights: {self.weights_name or 'an array'} (Var = σ²/w)"]
        return out


def _nlme_call(s) -> str:
    if isinstance(s, VarIdent):
        return f"varIdent(form = ~1 | {s.by})"
    if isinstance(s, (VarPower, VarExp, VarFixed)):
        return f"{type(s).__name__[0].lower()}{type(s).__name__[1:]}(form = ~{s.covariate})"
    if isinstance(s, CorCompSymm):
        return f"corCompSymm(form = ~1 | {s.group})  (compound symmetry)"
    time = getattr(s, "time", None) or "1"
    label = "AR(1)" if isinstance(s, CorAR1) else "continuous AR(1)"
    return f"{type(s).__name__[0].lower()}{type(s).__name__[1:]}(form = ~{time} | {s.group})  ({label})"


def bind_residual(variance, correlation, weights, frame: pd.DataFrame) -> ResidualModel | None:
    """The residual model on the rows of ``frame`` (aligned with the spec's rows); None for σ²I."""
    if variance is None and correlation is None and weights is None:
        return None
    missing = [c for c in columns_of(variance, correlation, weights) if c not in frame.columns]
    if missing:
        raise DataError(f"the residual structure names column(s) {missing} that the data do not have; "
                        f"columns: {list(frame.columns)[:20]}")
    w, wname = None, None
    if weights is not None:
        if isinstance(weights, str):
            w, wname = _numeric(frame, weights, "weights"), weights
        else:
            w = np.asarray(weights, dtype=float).ravel()
            if len(w) != len(frame):
                raise DataError(f"weights has {len(w)} values for {len(frame)} rows used")
            if not np.all(np.isfinite(w)):
                raise DataError("weights has missing or infinite values")
        if np.any(w <= 0):
            raise DataError(f"precision weights must be positive; {int(np.sum(w <= 0))} are ≤ 0")
    used = frame[columns_of(variance, correlation, weights)]
    return ResidualModel(variance=None if variance is None else bind_variance(variance, frame),
                         correlation=None if correlation is None else bind_correlation(correlation, frame),
                         weights=w, weights_name=wname, frame=used)


def from_record(record: dict) -> ResidualModel:
    """The residual model of :meth:`ResidualModel.describe`, on the saved rows."""
    cols = {}
    for name, c in record["columns"].items():
        cols[name] = c["values"] if c["categories"] is None else pd.Categorical(c["values"], categories=c["categories"])
    frame = pd.DataFrame(cols) if cols else pd.DataFrame(index=range(len(record["weights"])))
    return bind_residual(from_description(record["variance"]), from_description(record["correlation"]),
                         record["weights"], frame)


def check_nested(residual: ResidualModel, blocks) -> None:
    """Refuse a correlation group that is not nested in every random-effect grouping factor.

    The whitening mixes the rows of a correlation group; the whitened data are a model with
    the same random-effect codes only where each group's rows share one level of each factor.
    """
    corr = residual.correlation
    if corr is None:
        return
    for block in blocks:
        if nesting_map(corr.group, len(corr.sizes), block.codes) is None:
            raise ModelError(
                f"the correlation group {corr.structure.group!r} is not nested in the random-effect grouping "
                f"factor {block.group!r}: some of its groups span several levels of {block.group!r}. In this "
                f"release a correlation structure's group must be a grouping factor or nested in each one "
                f"(e.g. {type(corr.structure).__name__}({block.group!r})); crossed layouts are not covered yet")


# -- R on a few rows, and one row's variance (marginal covariances, variance decomposition) ----------
def relative_covariance(residual: ResidualModel, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Λ_R(u) = S C S on ``rows`` (whole groups of the correlation structure), dense: R / σ².

    C is read off the correlation's definition on the rows as fitted: φ^|t_i − t_j| for
    AR(1) and CAR(1) (t accumulated along the fitted time order and lags), ρ for compound
    symmetry, within a group; 0 between groups.
    """
    rows = np.asarray(rows, dtype=np.intp)
    s = residual.sd(u)
    s = np.ones(len(rows)) if s is None else s[rows]
    C = np.eye(len(rows))
    corr = residual.correlation
    if corr is not None and len(rows):
        r = float(corr.natural(residual._split(u)[1])[0])
        g = corr.group[rows]
        same = g[:, None] == g[None, :]
        if isinstance(corr.structure, CorCompSymm):
            C = np.where(same, r, 0.0)
        else:
            t = _chain_times(corr, rows)
            C = np.where(same, r ** np.abs(t[:, None] - t[None, :]), 0.0)
        np.fill_diagonal(C, 1.0)
    return s[:, None] * C * s[None, :]


def _chain_times(corr: _Correlation, rows: np.ndarray) -> np.ndarray:
    """Each row's time since its group's first row: the lags summed along the predecessors."""
    where = {int(r): k for k, r in enumerate(rows)}
    prev = corr.prev[rows]
    if np.any((prev >= 0) & ~np.isin(prev, rows)):
        raise ModelError("the rows asked for split a group of the correlation structure")
    t = np.full(len(rows), np.nan)
    t[prev < 0] = 0.0
    while np.isnan(t).any():  # at most the largest group's size passes over the rows asked for
        todo = np.flatnonzero(np.isnan(t))
        before = np.array([where[int(p)] for p in prev[todo]])
        ready = ~np.isnan(t[before])
        t[todo[ready]] = t[before[ready]] + corr.lag[rows[todo[ready]]]
    return t


def variance_columns(residual: ResidualModel) -> list[str]:
    """The columns that set a row's residual variance: the variance function's and the weights'
    (a correlation structure leaves every row's variance σ²)."""
    return columns_of(residual.variance.structure if residual.variance else None, None, residual.weights_name)


def relative_variance_at(residual: ResidualModel, u: np.ndarray, values: dict) -> float:
    """Var(ε) / σ² of a row with the given values of :func:`variance_columns` (s² of that row)."""
    s2 = 1.0
    var = residual.variance
    if var is not None:
        st = var.structure
        col = st.by if isinstance(st, VarIdent) else st.covariate
        v = values[col]
        if isinstance(st, VarIdent):
            _, levels = _codes(residual.frame, st.by, "varIdent")
            if str(v) not in levels:
                raise DataError(f"{v!r} is not a level of the variance column {st.by!r} (levels: {list(levels)})")
            s2 = (1.0 if str(v) == levels[0] else residual.natural(u)[str(v)]) ** 2
        else:
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise DataError(f"the variance covariate {col!r} needs a number, got {v!r}") from None
            s2 = _covariate_sd(st, x, residual._split(u)[0]) ** 2
    if residual.weights_name is not None:
        w = float(values[residual.weights_name])
        if not w > 0:
            raise DataError(f"a precision weight must be positive, got {residual.weights_name}={w!r}")
        s2 /= w
    return s2


def _covariate_sd(structure, x: float, uv: np.ndarray) -> float:
    if isinstance(structure, VarPower):
        if x == 0:
            raise DataError(f"VarPower({structure.covariate!r}): the residual sd is 0 or infinite at 0")
        return abs(x) ** uv[0]
    if isinstance(structure, VarExp):
        return float(np.exp(uv[0] * x))
    if not x > 0:
        raise DataError(f"VarFixed({structure.covariate!r}): the variance covariate must be positive, got {x!r}")
    return float(np.sqrt(x))
