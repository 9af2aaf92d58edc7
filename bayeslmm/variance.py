"""Variance decomposition, intraclass correlation and R² for both fits.

For one observation with random-effect values z (the row of a block's Z: ``1`` for
an intercept, ``(1, x)`` for an intercept and a slope on x), the marginal variance is

    Var(y) = Σ_blocks zᵀ G_block z + σ²,

which for ``(1 + x | g)`` is the seed's σ²_u0 + 2σ_u01 x + σ²_u1 x² + σ², and for a
random intercept σ²_u + σ².  The intraclass correlation of a grouping factor g is its
share, ICC_g = Σ_{blocks of g} zᵀG z / Var(y): the correlation of two observations of
one group at the same x.  With random slopes it depends on x, so ``at=`` must give the
value of every variable the random-effect terms use.

R² (both per posterior draw for a Bayesian fit, point values for a REML/ML fit):

* ``method="nakagawa"`` (default): Nakagawa & Schielzeth (2013, *Methods Ecol. Evol.*
  4:133) with Johnson's (2014, *Methods Ecol. Evol.* 5:944) extension to random
  slopes: σ²_f = Var_i(x_iᵀβ) over the fitted rows, σ²_r = Σ_blocks mean_i z_iᵀ G z_i,
  R²_marginal = σ²_f / (σ²_f + σ²_r + σ²), R²_conditional = (σ²_f + σ²_r) / (σ²_f + σ²_r + σ²).
* ``method="gelman"``: the Bayesian R² of Gelman, Goodrich, Gabry & Vehtari (2019,
  *Am. Stat.* 73:307) in its residual form (as ``brms::bayes_R2``), R² = Var_i(μ_i) /
  (Var_i(μ_i) + Var_i(y_i − μ_i)) with μ = Xβ + Zb (conditional) or μ = Xβ (marginal).

Variances over rows use the n − 1 denominator, as R's ``var``.

With a residual structure R = σ² Λ_R(ρ) (:mod:`bayeslmm.residual`) the residual variance of
a row is σ² s_i² (s the variance function's relative sd; a correlation structure leaves it
alone): :func:`residual_variance` gives it at a point ``at`` names, or its mean over the
rows (Nakagawa, Johnson & Schielzeth 2017), which is also the σ² of R²_Nakagawa.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .errors import DataError, ModelError
from .formula.design import new_data_design
from .formula.core import NON_COLUMNS
from .formula.parse import parse_formula, referenced_names
from .spec import ModelSpec

R2_METHODS = ("nakagawa", "gelman")


def random_value_columns(spec: ModelSpec) -> list[str]:
    """Data columns used by the left sides of the random-effect terms (the x of the slopes)."""
    cols = set(map(str, spec.data.columns)) if spec.data is not None else None
    out: list[str] = []
    for bar in parse_formula(spec.formula).bars:
        for name, _ in referenced_names(bar.lhs):
            known = name in cols if cols is not None else name not in NON_COLUMNS
            if known and name not in out:
                out.append(name)
    return out


def _typical_value(spec: ModelSpec, column: str) -> str:
    """A value of ``column`` inside the data to suggest for ``at``: the mean (the most common category)."""
    if spec.data is None or column not in spec.data.columns:
        return "..."  # built out of memory: no rows to look at
    s = spec.data[column]
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        return f"{float(s.mean()):.4g}"
    return repr(s.mode().iloc[0])


def z_at(spec: ModelSpec, at: Mapping | None, also: list[str] | tuple = ()) -> list[np.ndarray]:
    """Each block's row of Z at the point ``at`` (a dict of the slope variables' values); ``at``
    may also name the columns ``also`` (those that set the residual variance), which Z ignores."""
    if at is not None and also and isinstance(at, Mapping):  # a slope's column may set the variance too: kept
        slopes = random_value_columns(spec)
        at = {k: v for k, v in at.items() if k not in also or k in slopes} or None
    intercept_only = _intercept_only(spec)
    if at is None:
        if intercept_only:
            return [np.ones(1) for _ in spec.blocks]
        terms = sorted({f"{b.group}: {', '.join(b.columns)}" for b in spec.blocks if b.columns != ("(Intercept)",)})
        need = random_value_columns(spec)
        example = ", ".join(f"{c!r}: {_typical_value(spec, c)}" for c in need) or "...: 0"
        raise ModelError(f"the variance of y depends on the random slopes ({'; '.join(terms)}); pass the point "
                         f"at which to decompose it, e.g. at the data's means (most common category for a factor): "
                         f"at={{{example}}}")
    if not isinstance(at, Mapping):
        raise DataError(f"at must be a dict such as {{'Days': 3}}, got {type(at).__name__}")
    need = random_value_columns(spec)
    extra = [k for k in at if k not in need]
    if extra:
        also_line = f", the residual variance {list(also)}" if also else ""
        raise DataError(f"at names {extra}, which no random-effect term uses; the terms use {need or 'no columns'}"
                        f"{also_line}")
    for k, v in at.items():
        if not np.isscalar(v):
            raise DataError(f"at[{k!r}] must be a single value (one point x), got {v!r}; call once per point")
    if intercept_only:
        return [np.ones(1) for _ in spec.blocks]
    if spec.data is None:
        # no training data to rebuild the terms from (built out of memory): the columns
        # must be plain variables named in ``at`` (or the intercept)
        out = []
        for block in spec.blocks:
            missing = [c for c in block.columns if c != "(Intercept)" and c not in at]
            if missing:
                raise DataError(f"at lacks {missing}, columns of the random-effect term on {block.group!r}; "
                                "this model keeps no data to evaluate transformed terms, so at must name them")
            out.append(np.array([1.0 if c == "(Intercept)" else float(at[c]) for c in block.columns]))
        return out
    d = new_data_design(spec, {k: [v] for k, v in at.items()}, fixed=False, random=True, groups=False,
                        argument="at")
    return [Z[0] for Z in d.Z]


def _intercept_only(spec: ModelSpec) -> bool:
    return all(block.columns == ("(Intercept)",) for block in spec.blocks)


def residual_columns(spec: ModelSpec) -> list[str]:
    """The columns ``at`` may name to set the residual variance (a variance function's, the weights')."""
    from .residual import variance_columns

    return [] if spec.residual is None else variance_columns(spec.residual)


def residual_variance(spec: ModelSpec, sigma2: float, u: np.ndarray, at: Mapping | None) -> float:
    """The residual variance of one row, σ² s², with a residual structure's parameters ``u``.

    A variance function (or weights) makes s differ by row: at the values ``at`` gives for
    :func:`residual_columns` when it names them, else the mean of σ² s_i² over the fitted rows
    (the observation-level mean of Nakagawa, Johnson & Schielzeth 2017, *J. R. Soc. Interface*
    14:20170213).  A correlation structure leaves each row's variance alone.
    """
    from .residual import relative_variance_at

    cols = residual_columns(spec)
    named = [c for c in cols if at is not None and c in at]
    if not named:
        s = spec.residual.sd(u)
        return float(sigma2 * (1.0 if s is None else np.mean(s * s)))
    if len(named) < len(cols):
        raise DataError(f"at names {named} but not {[c for c in cols if c not in named]}: the residual variance "
                        f"needs all of {cols}, or none (then it is the mean over the rows)")
    return float(sigma2 * relative_variance_at(spec.residual, u, {c: at[c] for c in cols}))


def group_variances(spec: ModelSpec, z: list[np.ndarray], covs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """zᵀ G z summed over the blocks of each grouping factor; ``covs`` may carry leading draw axes."""
    out: dict[str, np.ndarray] = {}
    for block, zb, G in zip(spec.blocks, z, covs):
        v = np.einsum("a,...ab,b->...", zb, G, zb)
        out[block.group] = out[block.group] + v if block.group in out else v
    return out


def mean_random_variance(spec: ModelSpec, covs: list[np.ndarray]) -> np.ndarray:
    """Σ_blocks mean_i z_iᵀ G z_i over the fitted rows (Johnson 2014), for leading draw axes."""
    total = 0.0
    for block, G in zip(spec.blocks, covs):
        M = block.Z.T @ block.Z / spec.n_obs
        total = total + np.einsum("...ab,ab->...", G, M)
    return np.asarray(total)


def nakagawa_r2(spec: ModelSpec, beta: np.ndarray, covs: list[np.ndarray], sigma2: np.ndarray) -> tuple:
    """Marginal and conditional R² (Nakagawa & Schielzeth 2013; Johnson 2014); beta (..., p)."""
    var_f = np.var(beta @ spec.X.T, axis=-1, ddof=1)
    var_r = mean_random_variance(spec, covs)
    total = var_f + var_r + sigma2
    return var_f / total, (var_f + var_r) / total


def gelman_r2(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Var(μ) / (Var(μ) + Var(y − μ)) over rows (Gelman et al. 2019, residual form); mu (..., n)."""
    var_fit = np.var(mu, axis=-1, ddof=1)
    var_res = np.var(y - mu, axis=-1, ddof=1)
    return var_fit / (var_fit + var_res)


def check_r2_method(method: str) -> None:
    if method not in R2_METHODS:
        raise ModelError(f"method must be one of {list(R2_METHODS)}, got {method!r}")


def components_frame(spec: ModelSpec, parts: dict[str, float], sigma2: float, at) -> pd.DataFrame:
    """Point decomposition: variance, sd and share of each grouping factor, the residual and the total."""
    var = dict(parts)
    var["Residual"] = sigma2
    total = sum(var.values())
    var["Total"] = total
    s = pd.Series(var, dtype=float)
    out = pd.DataFrame({"variance": s, "sd": np.sqrt(s), "proportion": s / total})
    out.index.name = "component"
    out.attrs["at"] = dict(at) if at else {}
    return out
