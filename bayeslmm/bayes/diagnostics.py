"""The convergence checks a careful statistician reads, surfaced as warnings.

Thresholds follow Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021, *Bayesian
Analysis* 16:667), and Betancourt (2017) for E-BFMI: R-hat > 1.01, bulk or tail
ESS < 400, any divergence, any draw at the maximum tree depth, E-BFMI < 0.3.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

RHAT_MAX = 1.01
ESS_MIN = 400
EBFMI_MIN = 0.3


class SamplingWarning(UserWarning):
    """A convergence diagnostic failed its threshold."""


@dataclass(frozen=True)
class Diagnostics:
    """What was checked, and the messages for what failed."""

    divergences: int
    max_treedepth_hits: int
    ebfmi: np.ndarray
    max_rhat: float
    min_ess_bulk: float
    min_ess_tail: float
    messages: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.messages


def _treedepth_hits(stats) -> int:
    for name in ("reached_max_treedepth", "maxdepth_reached"):
        if name in stats:
            return int(np.asarray(stats[name]).sum())
    return 0


def ebfmi(energy: np.ndarray) -> np.ndarray:
    """Energy Bayesian fraction of missing information, per chain (energy: chain × draw)."""
    energy = np.asarray(energy, dtype=float)
    num = np.sum(np.diff(energy, axis=1) ** 2, axis=1) / energy.shape[1]
    den = np.var(energy, axis=1)
    return num / np.where(den > 0, den, np.nan)


def check(summary: pd.DataFrame, sample_stats, n_draws: int) -> Diagnostics:
    """Run every check on a posterior summary (R-hat, ESS) and the sampler's statistics."""
    msgs = []
    div = int(np.asarray(sample_stats["diverging"]).sum()) if "diverging" in sample_stats else 0
    if div:
        msgs.append(f"{div} divergent transitions after tuning: the posterior has regions the sampler "
                    "cannot follow; raise target_accept (e.g. 0.95) or reparameterise")
    hits = _treedepth_hits(sample_stats)
    if hits:
        msgs.append(f"{hits} draws hit the maximum tree depth: the sampler's trajectories were cut short; "
                    "efficiency suffers, raise max_treedepth")
    e = ebfmi(np.asarray(sample_stats["energy"])) if "energy" in sample_stats else np.array([np.nan])
    low = np.flatnonzero(e < EBFMI_MIN)
    if low.size:
        msgs.append(f"E-BFMI below {EBFMI_MIN} in chain(s) {low.tolist()} ({np.round(e[low], 3).tolist()}): "
                    "the momentum resampling explores the energy poorly; consider a reparameterisation")
    rhat = summary["r_hat"].astype(float)
    n_chains = int(np.asarray(sample_stats["diverging"]).shape[0]) if "diverging" in sample_stats else 0
    undefined = rhat[~np.isfinite(rhat)]
    if n_chains >= 2 and len(undefined):
        msgs.append(f"R-hat could not be computed for {len(undefined)} parameter(s) (e.g. {undefined.index[0]}): "
                    "a chain may be stuck on one value; check the trace and the model")
    bad = rhat[rhat > RHAT_MAX]
    if len(bad):
        msgs.append(f"R-hat above {RHAT_MAX} for {len(bad)} parameter(s) (worst {bad.idxmax()}: {bad.max():.3f}): "
                    "the chains disagree; run longer or check the model")
    ess_b, ess_t = summary["ess_bulk"].astype(float), summary["ess_tail"].astype(float)
    for kind, ess in (("bulk", ess_b), ("tail", ess_t)):
        low_ess = ess[ess < ESS_MIN]
        if len(low_ess):
            msgs.append(f"{kind} ESS below {ESS_MIN} for {len(low_ess)} parameter(s) (lowest {low_ess.idxmin()}: "
                        f"{low_ess.min():.0f}): draw more samples before trusting intervals")
    return Diagnostics(divergences=div, max_treedepth_hits=hits, ebfmi=e,
                       max_rhat=_finite(rhat, np.max), min_ess_bulk=_finite(ess_b, np.min),
                       min_ess_tail=_finite(ess_t, np.min),
                       messages=tuple(msgs))


def _finite(values, reduce) -> float:
    """max/min over the finite values (NaN, without numpy's all-NaN warning, when there are none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(reduce(v)) if v.size else float("nan")


def warn(diag: Diagnostics, stacklevel: int = 3) -> None:
    for msg in diag.messages:
        warnings.warn(msg, SamplingWarning, stacklevel=stacklevel)
