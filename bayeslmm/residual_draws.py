"""Draws from a residual structure: ε ~ N(0, σ² Λ_R(ρ)) and the relative sds, one per posterior draw.

:mod:`bayeslmm.residual` whitens (W Λ_R Wᵀ = I); this module goes the other way and
*colours* i.i.d. standard normals z into draws with covariance Λ_R = S C S:

* AR(1) and CAR(1): the inverse of the Prais–Winsten whitening, forward in time order,
  e_t = φ^Δ e_{t−1} + √(1 − φ^{2Δ}) z_t, a group's first row e = z (so Var e_t = 1 and
  Corr(e_s, e_t) = φ^|t−s|, the chain being Markov);
* compound symmetry: C^{1/2} z in closed form, C^{1/2} = √(1−ρ) (I − J/m) + √(1+(m−1)ρ) J/m
  within a group of m rows (C's eigenvalues are 1−ρ and 1+(m−1)ρ);
* a variance function and precision weights: times the relative sd s_i of each row.

Parameters come as the posterior stores them, on nlme's scale (sd ratios, powers, Phi,
Rho), keyed by the structure's names (``ResidualModel.names``), one value per draw.
For new rows (``frame``) the variance function is evaluated by the structure's own
function on those rows, and the correlation is the structure's on the new rows alone
(their groups and times): the draws of new rows are a fresh series, independent of the
training rows' residuals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import DataError
from .residual import CorCompSymm, VarIdent, bind_correlation, bind_residual, columns_of, variance_columns


def relative_sd_draws(residual, natural: dict[str, np.ndarray], frame: pd.DataFrame | None = None):
    """The relative sd s_i of every row per draw, (draws, rows), or (1, rows) when no parameter
    varies it (VarFixed, weights); None when every s_i is 1.

    ``natural`` maps the structure's parameter names to their draws (draws,); ``frame``
    gives new rows (the fitted rows when None).
    """
    model, start = _variance_model(residual, frame)
    if model is None:
        return None
    if model.n_params == 0:  # fixed variances and weights: one s for every draw
        return model.sd(np.zeros(0))[None, start:]
    n_draws = len(natural[model.names[0]])
    out = np.empty((n_draws, len(model.frame) - start))
    for k in range(n_draws):  # the structure's own function, one draw at a time (O(n) each)
        u = model.unconstrained({n: float(natural[n][k]) for n in model.names})
        out[k] = model.sd(u)[start:]
    return out


def _variance_model(residual, frame: pd.DataFrame | None):
    """(the residual model of the variance function and weights alone, the first row asked for).

    New rows are bound after the fitted ones, so a VarIdent keeps the fitted levels and
    reference whatever levels the new rows have.
    """
    variance = residual.variance.structure if residual.variance is not None else None
    if variance is None and residual.weights is None:
        return None, 0
    weights = residual.weights_name if residual.weights_name is not None else residual.weights
    if frame is None:
        return bind_residual(variance, None, weights, residual.frame), 0
    if residual.weights is not None and residual.weights_name is None:
        raise DataError("the fit's precision weights were an array, so new rows have none: predictive draws of "
                        "new rows need weights given as a column (weights='column'); the training rows' "
                        "draws (newdata omitted) are available")
    cols = variance_columns(residual)
    _require_columns(frame, cols)
    fitted = residual.frame.reset_index(drop=True)
    combined = {c: _appended(fitted[c], frame[c].reset_index(drop=True), isinstance(variance, VarIdent)
                             and c == variance.by) for c in cols}
    model = bind_residual(variance, None, weights, pd.DataFrame(combined))
    return model, len(fitted)


def _appended(fitted: pd.Series, new: pd.Series, levels: bool) -> pd.Series:
    """The fitted column followed by the new rows' values; a level column must hold fitted levels only."""
    if not levels:
        return pd.concat([fitted, new], ignore_index=True)
    known = {}
    for v in (fitted.cat.categories if isinstance(fitted.dtype, pd.CategoricalDtype) else fitted.unique()):
        known.setdefault(str(v), v)
    unseen = sorted({str(v) for v in new} - set(known))
    if unseen:
        raise DataError(f"newdata has levels {unseen[:10]} of the variance column {fitted.name!r} that the fit has "
                        f"not seen; its residual sd is estimated for {sorted(known)} only")
    values = list(fitted) + [known[str(v)] for v in new]
    if isinstance(fitted.dtype, pd.CategoricalDtype):
        return pd.Series(pd.Categorical(values, categories=fitted.cat.categories), name=fitted.name)
    return pd.Series(values, name=fitted.name)


def _require_columns(frame: pd.DataFrame, cols: list[str]) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise DataError(f"newdata lacks the column(s) {missing} that the residual structure reads; predictive "
                        "draws of new rows need each row's variance covariate or level, weight, correlation "
                        "group and time")


def correlation_on(residual, frame: pd.DataFrame | None = None):
    """The correlation structure bound to the fitted rows, or to ``frame``'s rows (their groups and
    times, as the structure defines them); None without one."""
    corr = residual.correlation
    if corr is None or frame is None:
        return corr
    _require_columns(frame, columns_of(None, corr.structure, None))
    return bind_correlation(corr.structure, frame.reset_index(drop=True))


def colour(z: np.ndarray, corr, r: np.ndarray) -> np.ndarray:
    """C(r)^{1/2}-coloured draws of the i.i.d. standard normals ``z`` (draws, rows); ``r`` (draws,) is
    the correlation parameter (Phi or Rho) of each draw, ``corr`` the bound structure."""
    r = np.asarray(r, dtype=float)
    if isinstance(corr.structure, CorCompSymm):
        return _colour_compsymm(z, corr.group, corr.sizes, r)
    return _colour_markov(z, corr.prev, corr.lag, r)


def _colour_markov(z: np.ndarray, prev: np.ndarray, lag: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """e_t = φ^Δ e_{t−1} + √(1 − φ^{2Δ}) z_t, one step of every chain at a time (as many steps as the
    longest group has rows)."""
    e = np.array(z, dtype=float, copy=True)
    depth = np.where(prev < 0, 0, -1)
    step = 0
    while np.any(depth < 0):
        step += 1
        rows = np.flatnonzero((depth < 0) & (depth[np.maximum(prev, 0)] == step - 1) & (prev >= 0))
        if rows.size == 0:  # every row has a predecessor chain back to a group's first row: never here
            raise ValueError("the correlation structure's time order has a cycle")
        depth[rows] = step
        c = phi[:, None] ** lag[rows][None, :]
        e[:, rows] = c * e[:, prev[rows]] + np.sqrt(1.0 - c * c) * z[:, rows]
    return e


def _colour_compsymm(z: np.ndarray, group: np.ndarray, sizes: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """√(1−ρ) z + (√(1+(m−1)ρ) − √(1−ρ)) · (the group mean of z)."""
    big = 1.0 + (sizes[None, :] - 1.0) * rho[:, None]           # (draws, groups)
    if np.any(big <= 0):
        raise DataError(f"compound symmetry: a group of {int(sizes.max())} rows needs Rho > "
                        f"{-1.0 / (sizes.max() - 1):.4g}, and some posterior draws of Rho are below (the fit's "
                        "groups were smaller); predict groups no larger than the fitted ones")
    from scipy import sparse

    member = sparse.csr_matrix((np.ones(len(group)), (group, np.arange(len(group)))), shape=(len(sizes), len(group)))
    means = np.asarray(member @ z.T).T / sizes[None, :]
    a = np.sqrt(1.0 - rho)[:, None]
    return a * z + ((np.sqrt(big) - a) * means)[:, group]


def noise_draws(rng: np.random.Generator, residual, natural: dict[str, np.ndarray], sigma: np.ndarray,
                frame: pd.DataFrame | None = None) -> np.ndarray:
    """ε = σ S C^{1/2} z per draw, (draws, rows): the fitted rows, or ``frame``'s rows.

    ``sigma`` (draws,) and ``natural`` (each name's draws) come from the posterior.
    """
    sigma = np.asarray(sigma, dtype=float).reshape(-1)
    s = relative_sd_draws(residual, natural, frame)
    corr = correlation_on(residual, frame)
    n_rows = len(residual.frame) if frame is None else len(frame)
    z = rng.standard_normal((len(sigma), n_rows))
    if corr is not None:
        z = colour(z, corr, natural[corr.names[0]])
    if s is not None:
        z = s * z
    return sigma[:, None] * z
