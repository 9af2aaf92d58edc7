"""Profile-likelihood confidence intervals for the variance parameters (sds, correlations, σ).

As lme4's ``confint(fit, method = "profile")`` does (``devfun2`` in lme4's profile.R),
the profile is of the maximum-likelihood deviance, a REML fit being refitted by ML
first, with β profiled out and σ kept as a parameter:

    D(θ, σ) = log|L_θ|² + r²(θ)/σ² + n log(2πσ²),

(Bates et al. 2015, eq. 32 before σ is profiled out; log|L_θ|² and the penalised
residual sum of squares r²(θ) come from :class:`~bayeslmm.reml.deviance.ProfiledDeviance`).
For a parameter ψ (an sd σ‖T_k‖, a correlation of two rows of T, or σ) and a value v,
the profile D_ψ(v) minimises D over everything else subject to ψ = v; the interval is
{v : D_ψ(v) − D(θ̂, σ̂) ≤ χ²₁(level)}, its ends found by Brent's method.

The constraint is built into the parameterisation, so each profile point is an
unconstrained BOBYQA minimisation (warm-started from the previous point):

* σ = v: θ free;
* sd of effect k: row k of T is (v/σ)·w/‖w‖, with w and log σ free;
* correlation r of rows k < l: row l of T is |λ|(r·û + √(1−r²)·v̂), û the direction of
  row k and v̂ the normalised part of a free w orthogonal to û; σ is profiled out
  analytically (a correlation does not involve it).

Every T here is lower triangular, so θ (lme4's layout) is read off it directly; the
sign convention of lme4 (a non-negative diagonal) is not needed for Σ = σ²TTᵀ.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ..errors import BayesLMMError
from .deviance import ProfiledDeviance
from .optimize import minimize_bobyqa


@dataclass(frozen=True)
class VarParam:
    """One variance parameter: an sd (``i == j``), a correlation (``i > j``, rows of T) or σ (``block`` None)."""

    label: str
    block: int | None
    i: int = 0
    j: int = 0


def variance_parameters(spec) -> list[VarParam]:
    """The sds, correlations and σ, in the order of ``FreqFit.varcorr``'s rows."""
    out = []
    for b, block in enumerate(spec.blocks):
        for i, col in enumerate(block.columns):
            out.append(VarParam(f"sd_{col}|{block.group}", b, i, i))
        if block.correlated:
            for i in range(block.q):
                for j in range(i + 1, block.q):
                    out.append(VarParam(f"cor_{block.columns[j]}.{block.columns[i]}|{block.group}", b, j, i))
    out.append(VarParam("sigma", None))
    return out


_CROSSPRODUCTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def crossproducts(spec):
    """The spec's cross-products, computed once per spec (a fit does not keep them)."""
    from ..crossprod import CrossProducts

    if not getattr(spec, "rows_in_memory", True):
        raise BayesLMMError("this model was built out of memory and keeps no rows; profile intervals need "
                            "the cross-products of an in-memory model")
    try:
        return _CROSSPRODUCTS[spec]
    except KeyError:
        cp = _CROSSPRODUCTS[spec] = CrossProducts.from_spec(spec)
        return cp


def _unit(w: np.ndarray) -> np.ndarray | None:
    n = np.linalg.norm(w)
    return None if not np.isfinite(n) or n == 0 else w / n


class Profiler:
    """Profiles of the ML deviance of one model (see the module docstring)."""

    def __init__(self, fit, crossprods=None):
        from .fit import fit_frequentist

        spec = fit.spec
        if crossprods is None:
            crossprods = crossproducts(spec)
        if fit.method != "ML":
            fit = fit_frequentist(spec, reml=False, crossprods=crossprods)
        self.spec = spec
        self.ml_fit = fit
        self.dev = ProfiledDeviance(spec, crossprods, reml=False)
        self.n = spec.n_obs
        self.base = float(fit.objective)
        self.sigma_hat = float(fit.sigma)
        self.T_hat = [block.T(t) for block, t in zip(spec.blocks, spec.split_theta(fit.theta))]
        self.params = variance_parameters(spec)

    # -- the deviance in (T, σ) ----------------------------------------------------
    def theta_of(self, Ts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([T[block.theta_index] for block, T in zip(self.spec.blocks, Ts)])

    def deviance(self, Ts: list[np.ndarray], sigma: float | None) -> float:
        """D(θ, σ); with ``sigma=None``, σ profiled out (the ML profiled deviance d(θ))."""
        theta = self.theta_of(Ts)
        if sigma is None:
            return self.dev(theta)
        if not (np.isfinite(sigma) and sigma > 0):
            return np.inf
        try:
            f = self.dev.factor(theta)
        except (np.linalg.LinAlgError, ValueError):
            return np.inf
        val = f.logdet_Z + f.pwrss / sigma**2 + self.n * np.log(2 * np.pi * sigma**2)
        return float(val) if np.isfinite(val) else np.inf

    def value(self, p: VarParam, Ts: list[np.ndarray], sigma: float) -> float:
        """ψ at (T, σ)."""
        if p.block is None:
            return sigma
        T = Ts[p.block]
        if p.i == p.j:
            return sigma * float(np.linalg.norm(T[p.i]))
        a, b = T[p.j], T[p.i]  # rows j < i
        d = np.linalg.norm(a) * np.linalg.norm(b)
        return float(a @ b / d) if d > 0 else 0.0

    # -- parameterisations with ψ held fixed -------------------------------------------
    def _free_layout(self, p: VarParam):
        """Which entries of each T are free: every stored entry except the row ψ fixes."""
        layout = []
        for b, block in enumerate(self.spec.blocks):
            rows, cols = block.theta_index
            keep = np.ones(len(rows), bool)
            if p.block == b:
                keep &= rows != p.i
            layout.append((rows[keep], cols[keep]))
        return layout

    def _pack(self, p: VarParam, Ts: list[np.ndarray], sigma: float) -> np.ndarray:
        layout = self._free_layout(p)
        parts = [T[r, c] for T, (r, c) in zip(Ts, layout)]
        if p.block is not None:
            row = Ts[p.block][p.i, : p.i + 1] if self.spec.blocks[p.block].correlated else Ts[p.block][p.i, p.i:p.i + 1]
            if p.i == p.j:
                parts += [row, [np.log(sigma)]]
            else:
                parts += [[np.linalg.norm(row)], row]
        return np.concatenate([np.asarray(x, float) for x in parts])

    def _unpack(self, p: VarParam, v: float, phi: np.ndarray):
        """(T list, σ or None) with ψ = v, from the free vector φ; None when undefined."""
        layout = self._free_layout(p)
        Ts, k = [], 0
        for block, (r, c) in zip(self.spec.blocks, layout):
            T = np.zeros((block.q, block.q))
            T[r, c] = phi[k : k + len(r)]
            k += len(r)
            Ts.append(T)
        if p.block is None:
            return Ts, v
        block = self.spec.blocks[p.block]
        T = Ts[p.block]
        if p.i == p.j:
            width = p.i + 1 if block.correlated else 1
            w = _unit(phi[k : k + width])
            sigma = float(np.exp(phi[k + width]))
            if w is None or not np.isfinite(sigma):
                return None
            if block.correlated:
                T[p.i, : p.i + 1] = (v / sigma) * w
            else:
                T[p.i, p.i] = (v / sigma) * w[0]
            return Ts, sigma
        lam, w = abs(phi[k]), phi[k + 1 : k + 2 + p.i]
        u = _unit(np.pad(T[p.j, : p.j + 1], (0, p.i - p.j)))
        if u is None:
            return None
        perp = _unit(w - (w @ u) * u)
        if perp is None:
            return None
        T[p.i, : p.i + 1] = lam * (v * u + np.sqrt(max(0.0, 1 - v * v)) * perp)
        return Ts, None

    def profile_at(self, p: VarParam, v: float, start: np.ndarray) -> tuple[float, np.ndarray]:
        """min D subject to ψ = v, from the free vector ``start``; returns (D, φ at the minimum)."""

        def fun(phi):
            got = self._unpack(p, v, phi)
            return np.inf if got is None else self.deviance(*got)

        rec = minimize_bobyqa(fun, start, np.full(len(start), -np.inf), ftol_rel=0.0, ftol_abs=1e-10,
                              xtol_abs=1e-9, restarts=0, initial_step=0.1)
        return float(rec.objective), rec.end

    # -- intervals ------------------------------------------------------------------------
    def interval(self, p: VarParam, level: float) -> tuple[float, float]:
        """The profile interval of ψ at ``level`` (lme4's ``confint(method = "profile")``)."""
        cutoff = stats.chi2.ppf(level, 1)
        est = self.value(p, self.T_hat, self.sigma_hat)
        phi_hat = self._pack(p, self.T_hat, self.sigma_hat)
        is_corr = p.block is not None and p.i != p.j
        if is_corr:
            T = self.T_hat[p.block]
            if min(np.linalg.norm(T[p.i]), np.linalg.norm(T[p.j])) < 1e-8:
                return np.nan, np.nan  # an sd on its boundary at 0: the correlation is not identified
        ends = []
        for direction in (-1, 1):
            state = {"phi": phi_hat.copy()}

            def g(v):
                d, phi = self.profile_at(p, v, state["phi"])
                if np.isfinite(d):
                    state["phi"] = phi
                return d - self.base - cutoff

            if is_corr:
                edge = direction * (1 - 1e-9)
                if g(edge) <= 0:
                    ends.append(float(direction))
                    continue
                state["phi"] = phi_hat.copy()
                ends.append(self._bracketed_root(g, est, edge, direction, lambda a, b: (a + b) / 2))
                continue
            if direction < 0:
                if est <= 0:
                    ends.append(0.0)
                    continue
                tiny = est * 1e-6
                if p.block is not None and g(tiny) <= 0:
                    ends.append(0.0)  # the profile stays below the cutoff down to 0: a boundary interval
                    continue
                state["phi"] = phi_hat.copy()
                ends.append(self._bracketed_root(g, est, tiny, direction, lambda a, b: np.sqrt(a * b)))
            else:
                scale = est if est > 0 else self.sigma_hat
                hi, prev = est + 0.25 * scale, est
                for _ in range(60):
                    if g(hi) > 0:
                        break
                    prev, hi = hi, est + 2 * (hi - est)
                else:
                    ends.append(np.inf)
                    continue
                ends.append(self._root(g, prev, hi))
        return ends[0], ends[1]

    def _bracketed_root(self, g, est, edge, direction, mid):
        """Walk from ``est`` toward ``edge`` (where g > 0) in halving steps, then refine."""
        inner, outer = est, edge
        # move the inner point out while g stays negative, to keep warm starts close
        for _ in range(40):
            m = mid(inner, outer)
            if g(m) > 0:
                outer = m
                break
            inner = m
            if abs(outer - inner) < 1e-10 * max(1.0, abs(edge)):
                break
        return self._root(g, inner, outer)

    @staticmethod
    def _root(g, a, b):
        lo, hi = sorted((a, b))
        scale = max(abs(lo), abs(hi), 1e-12)
        return float(optimize.brentq(g, lo, hi, xtol=1e-9 * scale, rtol=1e-10))


def profile_intervals(fit, level: float = 0.95, crossprods=None) -> pd.DataFrame:
    """Profile-likelihood intervals of every sd, correlation and σ; rows as ``FreqFit.varcorr``.

    Columns ``estimate`` (of this fit), ``lower``, ``upper``; the interval comes from
    the ML profile (a REML fit is refitted by ML, as lme4 does).
    """
    if not 0 < level < 1:
        raise BayesLMMError(f"level must be strictly between 0 and 1, got {level!r}")
    cache = _INTERVALS.setdefault(fit, {})
    if float(level) in cache:
        return cache[float(level)].copy()
    prof = _PROFILERS.get(fit)
    if prof is None:
        prof = _PROFILERS[fit] = Profiler(fit, crossprods)
    vc = fit.varcorr
    rows = []
    for p, est in zip(prof.params, vc["sdcor"]):
        lo, hi = prof.interval(p, level)
        rows.append((p.label, float(est), lo, hi))
    out = pd.DataFrame(rows, columns=["parameter", "estimate", "lower", "upper"]).set_index("parameter")
    out.attrs["level"] = level
    out.attrs["method"] = "profile (ML deviance)"
    cache[float(level)] = out
    return out.copy()


#: profiles and intervals already computed, per fit (fits are immutable)
_PROFILERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INTERVALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
