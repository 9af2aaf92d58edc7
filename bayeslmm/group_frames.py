"""Per-grouping-factor tables of random effects, shared by both fits.

A grouping factor can carry several blocks (``(1|g) + (0 + x|g)``, or ``(x || g)``);
users ask about the factor, so ``ranef()`` and ``coef()`` of every fit return one
frame per factor, keyed by the group's name as written in the formula, its blocks'
columns side by side in model order (``spec.blocks``' order).  A column that two
blocks of one factor share (``(1|g) + (1|g)``) is kept once per block, the repeats
named ``name.1``, ``name.2`` (as lme4 and pandas do); ``coef()`` adds them up.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import BayesLMMError


def _unique_name(col: str, taken: set) -> str:
    if col not in taken:
        return col
    k = 1
    while f"{col}.{k}" in taken:
        k += 1
    return f"{col}.{k}"


def frames_by_group(spec, per_block) -> dict[str, pd.DataFrame]:
    """One (levels × columns) frame per grouping factor from one (levels × q) array per block."""
    out: dict[str, pd.DataFrame] = {}
    for block, values in zip(spec.blocks, per_block):
        frame = out.get(block.group)
        taken = set() if frame is None else set(frame.columns)
        cols = []
        for c in block.columns:
            cols.append(_unique_name(str(c), taken))
            taken.add(cols[-1])
        part = pd.DataFrame(np.asarray(values, dtype=float), index=pd.Index(block.levels, name=block.group),
                            columns=cols)
        out[block.group] = part if frame is None else frame.join(part)
    return out


def coef_frames(spec, fixef: pd.Series, per_block) -> dict[str, pd.DataFrame]:
    """lme4's ``coef``: per factor and level, the fixed effects plus the factor's random effects.

    Columns: the fixed-effect names, then any random column with no fixed
    counterpart; a column in several blocks of the factor gets their sum.
    """
    out: dict[str, pd.DataFrame] = {}
    for block, values in zip(spec.blocks, per_block):
        if block.group not in out:
            out[block.group] = pd.DataFrame(np.tile(fixef.to_numpy(dtype=float), (block.n_levels, 1)),
                                            index=pd.Index(block.levels, name=block.group), columns=fixef.index)
        frame = out[block.group]
        values = np.asarray(values, dtype=float)
        for a, col in enumerate(block.columns):
            frame[col] = (frame[col] if col in frame.columns else 0.0) + values[:, a]
    return out


def with_intervals(spec, estimate, lower, upper, estimate_name: str, ci_prob: float) -> dict[str, pd.DataFrame]:
    """Per factor, a frame with two column levels: (``estimate_name``/``lower``/``upper``, column).

    ``frame[estimate_name]`` is the frame ``ranef()`` returns without ``ci_prob``.
    """
    parts = {name: frames_by_group(spec, arrays)
             for name, arrays in ((estimate_name, estimate), ("lower", lower), ("upper", upper))}
    out = {}
    for group in parts[estimate_name]:
        frame = pd.concat({name: p[group] for name, p in parts.items()}, axis=1, names=["stat"])
        frame.attrs["ci_prob"] = float(ci_prob)
        out[group] = frame
    return out


def check_ci_prob(ci_prob, default: float) -> float:
    """``ci_prob`` as a float strictly between 0 and 1 (``default`` when None), or a clear error."""
    if ci_prob is None:
        return float(default)
    if isinstance(ci_prob, bool) or not isinstance(ci_prob, (int, float)) or not 0 < ci_prob < 1:
        raise BayesLMMError(f"ci_prob must be a probability strictly between 0 and 1, got {ci_prob!r}")
    return float(ci_prob)


def posterior_ci_prob(ci_prob) -> float:
    """``ci_prob`` checked, or ArviZ's default for posterior intervals (``stats.ci_prob``, 0.89 in ArviZ 1.x)."""
    import arviz as az

    return check_ci_prob(ci_prob, az.rcParams["stats.ci_prob"])


def normal_quantile(ci_prob: float) -> float:
    """z with P(|Z| ≤ z) = ``ci_prob``: the half-width of a Wald interval in standard errors."""
    from scipy import stats  # here, not at import: scipy.stats alone takes ~1 s to import

    return float(stats.norm.ppf((1 + ci_prob) / 2))
