"""Profile-likelihood confidence intervals for the variance parameters (sds, correlations, σ).

As lme4's ``confint(fit, method = "profile")`` does (``devfun2`` in lme4's profile.R),
the profile is of the maximum-likelihood deviance, a REML fit being refitted by ML
first, with β profiled out and σ kept as a parameter:

    D(θ, σ) = log|L_θ|² + r²(θ)/σ² + n log(2πσ²),

(Bates et al. 2015, eq. 32 before σ is profiled out; log|L_θ|² and the penalised
residual sum of squares r²(θ) come from :class:`~bayeslmm.reml.deviance.ProfiledDeviance`).
For a parameter ψ (an sd σ‖T_k‖, a correlation of two rows of T, or σ) and a value v,
the profile D_ψ(v) minimises D over everything else subject to ψ = v; the interval is
the stretch around ψ̂ where D_ψ(v) − D(θ̂, σ̂) ≤ χ²₁(ci_prob), the χ²₁ quantile of probability ci_prob.

Each end is found by walking out from ψ̂ through a fixed ladder of values (fractions of
the way to a boundary — an sd's 0, a correlation's ±1 — or growing multiples of ψ̂
upward), every profile point warm-started from the previous one, until the profile
crosses the cutoff; Brent's method then solves between the last two points.  A point
that seems past the cutoff is minimised again from the estimate's point (and, for a
correlation, with either row shrunk: as an sd goes to 0 the correlation stops mattering,
so its profile can have a lower branch there — Orthodont's does, and without this its
end would be −0.93 instead of lme4's −1).  A profile that never reaches the cutoff ends
at the boundary, or at ``inf`` upward, with a note, as lme4 does.

The constraint is built into the parameterisation, so each profile point is an
unconstrained BOBYQA minimisation over a minimal set of free values:

* σ = v: θ free;
* sd of effect k: row k of T is (v/σ)·(z, 1)/‖(z, 1)‖, z (the row's off-diagonal entries
  over its diagonal) and log σ free;
* correlation r of rows k < l: row l of T is |λ|(r·û + √(1−r²)·ŵ), û the direction of
  row k and ŵ a unit vector orthogonal to û with last entry > 0, λ and ŵ's free entries
  free; σ is profiled out analytically (a correlation does not involve it).

Every T here is lower triangular, so θ (lme4's layout) is read off it directly; the
sign convention of lme4 (a non-negative diagonal) is not needed for Σ = σ²TTᵀ.

With a residual structure R = σ²Λ_R(ρ) the deviance is the σ²I one on the data whitened at ρ
plus log|Λ_R(ρ)| (:class:`~bayeslmm.reml.residual_fit.JointCriterion`, ML), the optimum is
the joint one in (θ, ρ) (a REML fit refitted by ML), and every profile point re-optimises ρ
(unconstrained) with the rest.  The structure's parameters are profiled too, on nlme's scale
(Phi, Rho, a power or exponent, VarIdent's sd ratios): ψ = v fixes that entry of ρ, the others
and T are free and σ is profiled out.  Their ranges are open where Λ_R turns singular (φ = ±1,
a ratio of 0, ρ at −1/(m−1) or 1), so the walk toward such a bound stops 1e-6 of the way short,
and a profile still below the cutoff there ends at the bound with a note; a power's or
exponent's may be unbounded either way (±inf).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ..deprecation import renamed_kwargs
from ..errors import BayesLMMError
from ..residual import VarIdent
from .deviance import ProfiledDeviance
from .optimize import blas_threads, minimize_bobyqa
from .residual_fit import JointCriterion, residual_optimum


@dataclass(frozen=True)
class VarParam:
    """One variance parameter: an sd (``i == j``), a correlation (``i > j``, rows of T), σ (``block``
    None), or entry ``residual`` of a residual structure's parameters (``block`` None)."""

    label: str
    block: int | None
    i: int = 0
    j: int = 0
    residual: int | None = None


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


def profiled_parameters(spec) -> list[VarParam]:
    """What the profiles cover: :func:`variance_parameters`, then a residual structure's parameters
    (Phi, Rho, a power, VarIdent's sd ratios) on nlme's scale."""
    residual = getattr(spec, "residual", None)
    extra = [] if residual is None else [VarParam(name, None, residual=k) for k, name in enumerate(residual.names)]
    return variance_parameters(spec) + extra


def crossproducts(spec):
    """The spec's cross-products, computed once per spec (a fit does not keep them)."""
    from ..crossprod import crossproducts_of

    return crossproducts_of(spec, "profile intervals")


def _unit(w: np.ndarray) -> np.ndarray | None:
    n = np.linalg.norm(w)
    return None if not np.isfinite(n) or n == 0 else w / n


class Profiler:
    """Profiles of the ML deviance of one model (see the module docstring)."""

    def __init__(self, fit, crossprods=None):
        spec = fit.spec
        self.spec, self.n, self.params = spec, spec.n_obs, profiled_parameters(spec)
        if spec.residual is None:
            theta, self.u_hat, objective, sigma = self._sigma2_identity_ml(fit, crossprods)
        else:
            theta, self.u_hat, objective, sigma = self._structured_ml(fit)
        self.base, self.sigma_hat = float(objective), float(sigma)
        self.T_hat = [block.T(t) for block, t in zip(spec.blocks, spec.split_theta(theta))]

    def _sigma2_identity_ml(self, fit, crossprods):
        from .solve import optimum  # below the results: a FreqFit's confint refits by ML here

        spec = fit.spec
        if crossprods is None:
            crossprods = crossproducts(spec)
        if fit.method != "ML":
            fit = optimum(spec, reml=False, crossprods=crossprods)  # θ, objective and σ are all it needs
        self.ml_fit = fit
        self.dev = ProfiledDeviance(spec, crossprods, reml=False)
        self._criterion = None
        return fit.theta, np.zeros(0), fit.objective, fit.sigma

    def _structured_ml(self, fit):
        """The ML optimum in (θ, u) (a REML fit refitted from its own θ); the profiles re-optimise u
        with the rest, on the data whitened at each u (:class:`~.residual_fit.JointCriterion`)."""
        spec = fit.spec
        self._criterion = JointCriterion(spec, reml=False)
        if fit.method == "ML":
            theta, u, objective, sigma = fit.theta, spec.residual.unconstrained(fit.residual_params), \
                fit.objective, fit.sigma
        else:
            theta, u, objective, est, _ = residual_optimum(spec, reml=False, start=fit.theta)
            sigma = est.sigma
        self.ml_fit, self.dev = None, None  # the ML optimum is (θ, u) here; the deviance is the criterion's
        return theta, np.asarray(u, float), objective, sigma

    # -- the deviance in (T, σ) ----------------------------------------------------
    def theta_of(self, Ts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([T[block.theta_index] for block, T in zip(self.spec.blocks, Ts)])

    def deviance(self, Ts: list[np.ndarray], sigma: float | None, u: np.ndarray | None = None) -> float:
        """D(θ, σ) (and the residual parameters u, unconstrained: D on the data whitened at u plus
        log|Λ_R(u)|); with ``sigma=None``, σ profiled out (the ML profiled deviance d(θ))."""
        theta = self.theta_of(Ts)
        dev, logdet = self.dev, 0.0
        if self._criterion is not None:
            with np.errstate(all="ignore"):
                logdet = self.spec.residual.log_det(u)
                if not np.isfinite(logdet):
                    return np.inf
                try:
                    dev = self._criterion.deviance(u)
                except (FloatingPointError, ValueError, np.linalg.LinAlgError, BayesLMMError):
                    return np.inf
        if sigma is None:
            val = dev(theta) + logdet
            return float(val) if np.isfinite(val) else np.inf
        if not (np.isfinite(sigma) and sigma > 0):
            return np.inf
        try:
            f = dev.factor(theta)
        except (np.linalg.LinAlgError, ValueError):
            return np.inf
        val = f.logdet_Z + f.pwrss / sigma**2 + self.n * np.log(2 * np.pi * sigma**2) + logdet
        return float(val) if np.isfinite(val) else np.inf

    def value(self, p: VarParam, Ts: list[np.ndarray], sigma: float, u: np.ndarray | None = None) -> float:
        """ψ at (T, σ, u)."""
        if p.residual is not None:
            return self._natural(p, self.u_hat if u is None else u)
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

    # -- the residual parameters: unconstrained u, all free but the one profiled ----------------------
    def _natural(self, p: VarParam, u: np.ndarray) -> float:
        return self.spec.residual.natural(u)[p.label]

    def _u_free(self, p: VarParam) -> np.ndarray:
        """Which entries of u a profile point re-optimises: all but the one ψ fixes."""
        return np.arange(len(self.u_hat)) != (-1 if p.residual is None else p.residual)

    def _u_at(self, p: VarParam, v: float, free: np.ndarray) -> np.ndarray:
        """u with its free entries ``free`` and, for a residual ψ, ψ = v (natural scale)."""
        u = self.u_hat.copy()
        u[self._u_free(p)] = free
        if p.residual is not None:
            natural = self.spec.residual.natural(u)
            natural[p.label] = v
            with np.errstate(all="ignore"):
                u = self.spec.residual.unconstrained(natural)
        return u

    def _pack(self, p: VarParam, Ts: list[np.ndarray], sigma: float, u: np.ndarray | None = None) -> np.ndarray:
        """The free vector φ of (T, σ, u): that of (T, σ) (:meth:`_pack_variances`), then u's free entries."""
        u = self.u_hat if u is None else u
        return np.concatenate([self._pack_variances(p, Ts, sigma), u[self._u_free(p)]])

    def _unpack(self, p: VarParam, v: float, phi: np.ndarray):
        """(T list, σ or None, u) with ψ = v from the free vector φ; None when undefined."""
        n_u = int(self._u_free(p).sum())
        head, tail = phi[: len(phi) - n_u], phi[len(phi) - n_u:]
        got = self._unpack_variances(p, v, head)
        if got is None:
            return None
        Ts, sigma = got
        if p.residual is not None:
            sigma = None  # σ is profiled out analytically, as for a correlation
        return Ts, sigma, self._u_at(p, v, tail)

    def _pack_variances(self, p: VarParam, Ts: list[np.ndarray], sigma: float) -> np.ndarray:
        """The free vector φ of (T, σ); see :meth:`_unpack_variances` for its layout."""
        layout = self._free_layout(p)
        parts = [T[r, c] for T, (r, c) in zip(Ts, layout)]
        if p.block is not None:
            row = Ts[p.block][p.i, : p.i + 1]
            if p.i == p.j:
                z = row[:-1] / max(row[-1], 1e-6 * np.linalg.norm(row), 1e-300)
                parts += [z if self.spec.blocks[p.block].correlated else [], [np.log(sigma)]]
            else:
                u = _unit(np.pad(Ts[p.block][p.j, : p.j + 1], (0, p.i - p.j)))
                perp = row - (row @ u) * u
                w = perp / perp[-1] if perp[-1] > 1e-8 * np.linalg.norm(row) else np.zeros_like(perp)
                parts += [[np.linalg.norm(row)], np.delete(w[:-1], self._pivot(p))]
        return np.concatenate([np.asarray(x, float) for x in parts])

    def _pivot(self, p: VarParam) -> int:
        """For a correlation: the entry of row j's direction u that the orthogonality solves for."""
        return int(np.argmax(np.abs(self.T_hat[p.block][p.j, : p.i])))

    def _unpack_variances(self, p: VarParam, v: float, phi: np.ndarray):
        """(T list, σ or None) with ψ = v, from the free vector φ; None when undefined.

        φ holds every stored entry of T outside the row i that ψ constrains, then

        * for an sd: the row's direction as (z, 1)/‖(z, 1)‖ (the diagonal, which lme4 keeps
          ≥ 0, set to 1: no direction is counted twice) and log σ;
        * for a correlation: the row's length λ and the direction of its part orthogonal to
          û, again with the diagonal set to 1 and the pivot entry solved from orthogonality.

        Each is a minimal parameterisation: BOBYQA sees no flat directions.
        """
        layout = self._free_layout(p)
        Ts, k = [], 0
        for block, (r, c) in zip(self.spec.blocks, layout):
            T = np.zeros((block.q, block.q))
            T[r, c] = phi[k : k + len(r)]
            k += len(r)
            Ts.append(T)
        if p.block is None:
            return Ts, v
        T = Ts[p.block]
        if p.i == p.j:
            width = p.i if self.spec.blocks[p.block].correlated else 0
            sigma = float(np.exp(phi[k + width]))
            if not (np.isfinite(sigma) and sigma > 0):
                return None
            w = np.append(phi[k : k + width], 1.0)
            T[p.i, p.i - width : p.i + 1] = (v / sigma) * w / np.linalg.norm(w)
            return Ts, sigma
        lam = abs(phi[k])
        u = _unit(np.pad(T[p.j, : p.j + 1], (0, p.i - p.j)))
        piv = self._pivot(p)
        if u is None or u[piv] == 0:
            return None
        w = np.zeros(p.i + 1)
        w[-1] = 1.0
        w[np.delete(np.arange(p.i), piv)] = phi[k + 1 : k + p.i]
        w[piv] = -(u @ w) / u[piv]  # w ⊥ u (u's last entry is 0, and w[piv] was 0)
        T[p.i, : p.i + 1] = lam * (v * u + np.sqrt(max(0.0, 1 - v * v)) * w / np.linalg.norm(w))
        return Ts, None

    def profile_at(self, p: VarParam, v: float, start: np.ndarray) -> tuple[float, np.ndarray]:
        """min D subject to ψ = v, from the free vector ``start``; returns (D, φ at the minimum)."""

        def fun(phi):
            got = self._unpack(p, v, phi)
            return np.inf if got is None else self.deviance(*got)

        rec = minimize_bobyqa(fun, start, np.full(len(start), -np.inf), ftol_rel=0.0, ftol_abs=1e-8,
                              xtol_abs=1e-6, restarts=0, initial_step=0.1)
        return float(rec.objective), rec.end

    def profile(self, p: VarParam, v: float) -> float:
        """D_ψ(v) − D(θ̂, σ̂): the profile at ψ = v above the ML optimum (searched from the optimum)."""
        d, _ = self.profile_at(p, v, self._pack(p, self.T_hat, self.sigma_hat))
        return d - self.base

    # -- intervals ------------------------------------------------------------------------
    @renamed_kwargs(level="ci_prob")
    def interval(self, p: VarParam, ci_prob: float) -> tuple[float, float, list[str]]:
        """ψ's profile interval of probability ``ci_prob`` (lme4's ``confint(method = "profile")``) and notes.

        Each end is found by walking out from the estimate (every profile point warm-started
        from the previous one) until the profile crosses the χ²₁ cutoff, then solving for
        the crossing between the last two points.  Where the profile stays below the cutoff
        up to a boundary (an sd at 0, a correlation at ±1) the interval ends there, and
        where it never reaches it upward the end is ``inf``; both are noted, as lme4 warns.
        """
        cutoff = float(stats.chi2.ppf(ci_prob, 1))
        est = self.value(p, self.T_hat, self.sigma_hat)
        if p.block is not None and p.i != p.j:
            T = self.T_hat[p.block]
            if min(np.linalg.norm(T[p.i]), np.linalg.norm(T[p.j])) < 1e-8:
                return np.nan, np.nan, [f"{p.label}: not identified (an sd of its block is estimated as 0), "
                                        "so no interval"]
        phi_hat = self._pack(p, self.T_hat, self.sigma_hat)
        notes: list[str] = []
        lower = self._end(p, est, phi_hat, -1, cutoff, notes)
        upper = self._end(p, est, phi_hat, 1, cutoff, notes)
        return lower, upper, notes

    def _path(self, p: VarParam, est: float, direction: int) -> tuple[np.ndarray, float | None]:
        """Values of ψ to walk through from ``est``, and the boundary they end on (None: unbounded)."""
        if p.residual is not None:
            return self._residual_path(p, est, direction)
        if p.block is not None and p.i != p.j:  # a correlation, bounded by ±1
            edge = float(direction)
            return est + _BOUNDED_STEPS * (edge - est), edge
        if direction < 0:  # an sd or σ toward 0 (σ = 0 is not a model: stop just short of it)
            steps = _BOUNDED_STEPS if p.block is not None else np.minimum(_BOUNDED_STEPS, 1 - 1e-6)
            return est * (1 - steps), 0.0
        scale = est if est > 0 else self.sigma_hat
        return est + scale * _UNBOUNDED_STEPS, None

    def _residual_path(self, p: VarParam, est: float, direction: int) -> tuple[np.ndarray, float | None]:
        """As :meth:`_path` for a residual parameter on nlme's scale.  Its range is open (at φ = ±1 or a
        ratio of 0, Λ_R is singular): the walk stops 1e-6 of the way short of a bound."""
        res = self.spec.residual
        if p.residual >= len(res.variance.names if res.variance else ()):
            edge = 1.0 if direction > 0 else float(res.correlation.lower)  # Phi, Rho
        elif isinstance(res.variance.structure, VarIdent):
            edge = 0.0 if direction < 0 else None                          # a ratio of sds
        else:
            edge = None                                                    # a power or exponent
        if edge is None:
            scale = max(abs(est), 0.1)
            return est + direction * scale * _UNBOUNDED_STEPS, None
        return est + np.minimum(_BOUNDED_STEPS, 1 - 1e-6) * (edge - est), edge

    def _g(self, p: VarParam, v: float, starts: list[np.ndarray], cutoff: float) -> tuple[float, np.ndarray]:
        """Profile deviance above the cutoff at ψ = v, minimised from each start (the best kept)."""
        best = (np.inf, starts[0])
        for start in starts:
            d, phi = self.profile_at(p, v, start)
            if d < best[0]:
                best = (d, phi)
        return best[0] - self.base - cutoff, best[1]

    def _restarts(self, p: VarParam, phi_hat: np.ndarray, phi: np.ndarray) -> list[np.ndarray]:
        """Further starts for a point that seems past the cutoff: the estimate's, and, for a
        correlation, ones with either of its two rows shrunk toward 0 (as an sd goes to 0 the
        correlation stops mattering, so its profile can have a second, lower branch there)."""
        out = [phi_hat]
        if p.block is not None and p.i != p.j:
            layout = self._free_layout(p)
            shrink_i = phi.copy()
            shrink_i[sum(len(r) for r, _ in layout)] *= 1e-3  # λ, the length of row i
            out.append(shrink_i)
            offset = sum(len(r) for r, _ in layout[: p.block])
            shrink_j = phi.copy()
            shrink_j[offset + np.flatnonzero(layout[p.block][0] == p.j)] *= 1e-3  # row j's stored entries
            out.append(shrink_j)
        return out

    def _end(self, p: VarParam, est: float, phi_hat: np.ndarray, direction: int, cutoff: float,
             notes: list[str]) -> float:
        """One end of ψ's interval (see :meth:`interval`); appends a note where it is not a crossing."""
        path, edge = self._path(p, est, direction)
        if edge is not None and abs(est - edge) <= 1e-12 * max(1.0, abs(edge)):
            return edge  # the estimate is on the boundary
        inner = (est, -cutoff, phi_hat)
        lowest, outer = 0.0, None
        for v in path:
            g, phi = self._g(p, v, [inner[2]], cutoff)
            restarted = False
            if g > 0:  # past the cutoff, unless the warm start led to a local minimum only
                g2, phi2 = self._g(p, v, self._restarts(p, phi_hat, inner[2]), cutoff)
                if g2 < g - 1e-9:
                    g, phi, restarted = g2, phi2, True
            lowest = min(lowest, g + cutoff)
            if g > 0:
                outer = (v, g)
                break
            inner = (v, g, phi)
        if lowest < -1e-6:  # lme4 warns of such a dip too
            notes.append(f"{p.label}: the profile dips {-lowest:.3g} below the ML fit's deviance (the fit is not "
                         "quite at the optimum); the cutoff is counted from the fit's deviance")
        if outer is not None:
            # between the two points, warm-start from the inner one, and from the outer one too
            # where that lies on another branch of the profile
            return self._crossing(p, inner, outer, [inner[2], phi] if restarted else [inner[2]], cutoff)
        if edge is None and direction < 0:  # a power or exponent of a variance function
            notes.append(f"{p.label}: the profile stays below the cutoff however small it gets: no lower end (-inf)")
            return -np.inf
        if edge is None:
            notes.append(f"{p.label}: the profile stays below the cutoff however large it gets: no upper end (inf)")
            return np.inf
        notes.append(f"{p.label}: the profile stays below the cutoff up to its boundary, so the interval "
                     f"ends there ({edge:g}), as lme4's")
        return float(edge)

    def _crossing(self, p: VarParam, inner: tuple, outer: tuple, starts: list[np.ndarray], cutoff: float) -> float:
        """ψ where the profile crosses the cutoff between ``inner`` (below) and ``outer`` (above),
        each a (ψ, g, ...) point already evaluated."""
        known = {inner[0]: inner[1], outer[0]: min(outer[1], 1e300)}  # brentq needs finite values

        def h(v):
            if v in known:
                return known[v]
            g, _ = self._g(p, v, starts, cutoff)
            return g if np.isfinite(g) else 1e300

        lo, hi = sorted((inner[0], outer[0]))
        scale = max(abs(lo), abs(hi), 1e-12)
        return float(optimize.brentq(h, lo, hi, xtol=1e-7 * scale, rtol=1e-7))


#: the walk toward a bounded end: fractions of the way from the estimate to the boundary
_BOUNDED_STEPS = np.array([0.05, 0.2, 0.4, 0.6, 0.75, 0.87, 0.95, 0.99, 1.0])
#: the walk upward (an sd or σ): multiples of the estimate added to it, doubling up to ~5e10
_UNBOUNDED_STEPS = 0.05 * 2.0 ** np.arange(41)


@renamed_kwargs(level="ci_prob")
def profile_intervals(fit, ci_prob: float = 0.95, crossprods=None) -> pd.DataFrame:
    """Profile-likelihood intervals of every sd, correlation and σ; rows as ``FreqFit.varcorr``.

    Columns ``estimate`` (of this fit), ``lower``, ``upper``; the interval comes from
    the ML profile (a REML fit is refitted by ML, as lme4 does).  An end where the
    profile stays below the cutoff is the boundary (sd 0, correlation ±1) or ``inf``
    upward; a parameter whose profile cannot be computed gets NaN and a warning.
    ``attrs["notes"]`` says which ends are of these kinds.
    """
    if isinstance(ci_prob, bool) or not isinstance(ci_prob, (int, float)) or not 0 < ci_prob < 1:
        raise BayesLMMError(f"ci_prob must be a probability strictly between 0 and 1, got {ci_prob!r}")
    cache = _INTERVALS.setdefault(fit, {})
    if float(ci_prob) in cache:
        return _copy(cache[float(ci_prob)])
    prof = _PROFILERS.get(fit)
    if prof is None:
        with blas_threads():  # a REML fit is refitted by ML here
            prof = _PROFILERS[fit] = Profiler(fit, crossprods)
    res = fit.spec.residual
    estimates = list(fit.varcorr["sdcor"]) + ([] if res is None else [fit.residual_params[n] for n in res.names])
    rows, notes = [], []
    for p, est in zip(prof.params, estimates):
        try:
            with blas_threads():
                lo, hi, more = prof.interval(p, ci_prob)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
            # one parameter's failure must not lose the others' intervals (nor a finished fit)
            lo, hi, more = np.nan, np.nan, [f"{p.label}: the profile could not be computed "
                                            f"({type(exc).__name__}: {exc}); no interval"]
            warnings.warn(more[0], stacklevel=2)
        rows.append((p.label, float(est), lo, hi))
        notes += more
    out = pd.DataFrame(rows, columns=["parameter", "estimate", "lower", "upper"]).set_index("parameter")
    out.attrs.update(ci_prob=ci_prob, method="profile (ML deviance)", notes=notes)
    cache[float(ci_prob)] = out
    return _copy(out)


def profile_work(fit) -> float:
    """The size of a full profile: variance parameters × operations of one deviance evaluation.

    Counted from the model alone (levels × q³ of the first block, the sparse product's
    nonzeros, m³/3 for the dense Cholesky of the rest), so any rule built on it gives the
    same answer on every machine and under any load; ``inf`` for a model without rows.
    sleepstudy's is 2.3e3, InstEval's 2.0e9.
    """
    try:
        cp = crossproducts(fit.spec)
    except BayesLMMError:
        return np.inf
    per_evaluation = cp.first.n_levels * cp.first.q ** 3 + cp.P.nnz + cp.m ** 3 / 3
    return float(len(variance_parameters(fit.spec)) * per_evaluation)


def _copy(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out.attrs["notes"] = list(frame.attrs["notes"])  # a list in attrs is shared by a shallow copy
    return out


#: profiles and intervals already computed, per fit (fits are immutable)
_PROFILERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INTERVALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
