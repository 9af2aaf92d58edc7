"""The posterior's variable names and layout, in one place: how they are written and read back.

A NUTS fit's posterior (``fit.idata["posterior"]``) holds

* ``beta`` (dim ``coef``) and ``sigma``;
* ``residual_{name}`` for each parameter of a residual structure (``residual_Phi``,
  ``residual_power``, ``residual_Female``: :func:`residual_var`), on nlme's scale;
* for each random-effect block, named by :func:`block_names` (its grouping factor, then
  ``g.1``, ``g.2`` … for a factor's further blocks):

  - ``{g}_sd`` (dim ``{g}_effect``): the block's standard deviations;
  - ``{g}_corr`` (dim ``{g}_pair``), for a correlated block of two or more columns: the
    q(q − 1)/2 *distinct* correlations, labelled ``"a,b"`` for columns a before b (the
    order of lme4's ``VarCorr``);
  - ``{g}`` (dims ``{g}_level``, ``{g}_effect``): the effects, when stored as draws.

The full correlation matrix is not stored: its diagonal is 1 and its upper triangle
repeats the lower, which gave ``az.summary`` NaN R-hats with RuntimeWarnings and flat
trace lines at 1.  Files saved before this layout hold the matrix (dims ``{g}_effect``,
``{g}_effect_``); :func:`correlation_matrices` reads both, :func:`upgrade` rewrites the
old layout.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["block_names", "residual_var", "residual_vars",
           "sd_var", "corr_var", "effect_dim", "level_dim", "pair_dim", "pair_index", "pair_labels",
           "pairs_of", "matrices_of", "correlation_matrices", "cholesky_factors", "corr_data", "upgrade"]


def block_names(spec) -> list[str]:
    """Unique variable names for the blocks: the group, then group.1, group.2 ..."""
    names, seen = [], {}
    for b in spec.blocks:
        k = seen.get(b.group, 0)
        names.append(b.group if k == 0 else f"{b.group}.{k}")
        seen[b.group] = k + 1
    return names


def residual_var(name: str) -> str:
    """The posterior variable of a residual-structure parameter (``Phi``, a VarIdent level, ``power``)."""
    return f"residual_{name}"


def residual_vars(spec) -> list[str]:
    """The posterior variables of ``spec``'s residual parameters (none for R = σ²I)."""
    res = getattr(spec, "residual", None)
    return [] if res is None else [residual_var(n) for n in res.names]


def sd_var(name: str) -> str:
    return f"{name}_sd"


def corr_var(name: str) -> str:
    return f"{name}_corr"


def effect_dim(name: str) -> str:
    return f"{name}_effect"


def level_dim(name: str) -> str:
    return f"{name}_level"


def pair_dim(name: str) -> str:
    return f"{name}_pair"


def pair_index(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each distinct correlation (column i before j: (i, j), i < j), in storage order."""
    i, j = np.triu_indices(q, k=1)
    return i, j


def pair_labels(columns) -> list[str]:
    """``"a,b"`` for each distinct correlation of the columns, in storage order."""
    i, j = pair_index(len(columns))
    return [f"{columns[a]},{columns[b]}" for a, b in zip(i, j)]


def pairs_of(corr: np.ndarray) -> np.ndarray:
    """The distinct correlations (…, q(q−1)/2) of correlation matrices (…, q, q)."""
    i, j = pair_index(corr.shape[-1])
    return corr[..., i, j]


def matrices_of(pairs: np.ndarray, q: int) -> np.ndarray:
    """Correlation matrices (…, q, q) from their distinct correlations (…, q(q−1)/2)."""
    i, j = pair_index(q)
    out = np.broadcast_to(np.eye(q), pairs.shape[:-1] + (q, q)).copy()
    out[..., i, j] = pairs
    out[..., j, i] = pairs
    return out


def correlation_matrices(post: xr.Dataset, name: str, q: int) -> np.ndarray:
    """Block ``name``'s correlation matrices (…, q, q) from the posterior, in either layout."""
    values = post[corr_var(name)]
    if pair_dim(name) in values.dims:
        return matrices_of(values.to_numpy(), q)
    return values.to_numpy()  # the layout of files saved before: the whole matrix


def corr_data(name: str, columns, pairs: np.ndarray, leading=("chain", "draw")) -> tuple[dict, dict]:
    """``(data_vars, coords)`` entries for a block's distinct correlations (…, P) in an ``xr.Dataset``."""
    dim = pair_dim(name)
    return {corr_var(name): (tuple(leading) + (dim,), pairs)}, {dim: pair_labels(list(columns))}


def upgrade(post: xr.Dataset, names, blocks) -> xr.Dataset:
    """The posterior with any whole correlation matrix (the old layout) replaced by its distinct correlations."""
    for name, block in zip(names, blocks):
        var = corr_var(name)
        if var not in post or pair_dim(name) in post[var].dims:
            continue
        values = post[var]
        leading = values.dims[:-2]
        data, coords = corr_data(name, block.columns, pairs_of(values.to_numpy()), leading)
        post = post.drop_vars(var)
        extra = f"{effect_dim(name)}_"
        if extra in post.coords and not any(extra in v.dims for v in post.data_vars.values()):
            post = post.drop_vars(extra)
        post = post.assign_coords(coords).assign({k: (d, v) for k, (d, v) in data.items()})
    return post


def cholesky_factors(post: xr.Dataset, name: str, block) -> np.ndarray:
    """Per-draw absolute Cholesky factor L (…, q, q) of block ``name``'s covariance Σ = L Lᵀ."""
    sd = post[sd_var(name)].to_numpy()
    if block.correlated and block.q > 1:
        return sd[..., :, None] * np.linalg.cholesky(correlation_matrices(post, name, block.q))
    return sd[..., :, None] * np.eye(block.q)
