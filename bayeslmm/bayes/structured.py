"""The collapsed log-posterior of a model with a residual structure, R = σ²Λ_R(ρ), compiled once.

Every random effect is integrated out, as in :mod:`.blocked`, and NUTS samples β, σ, the
blocks' sds and correlations and the residual parameters ρ.  The cost of a gradient is free
of the number of rows wherever R⁻¹ splits into a few fixed pieces:

    Λ_R⁻¹ = S⁻¹C⁻¹S⁻¹ = Σ_k c_k(ρ) E_k,   so   Mᵀ Λ_R⁻¹ M = Σ_k c_k(ρ) (Mᵀ E_k M),   M = [Z X y],

each Mᵀ E_k M (a *component*) computed once in the cross-products' layout.  With the
whitening W of :mod:`bayeslmm.residual` (WᵀW = Λ_R⁻¹) the log-likelihood is the σ²I one of
the whitened data, whose cross-products these are, minus ½ log|Λ_R|:

    ℓ(β, θ, σ, ρ) = ℓ_σ²I(β, θ, σ; Σ_k c_k S_k) − ½ log|Λ_R(ρ)|.

The pieces.  S = diag(s_i), s_i = exp(g_{a(i)}) · f_i: a row's *stratum* a(i) carries the
variance function's log sd g_a, linear in its parameters u (g = G u: ``VarIdent`` g_a = log of
level a's ratio; ``VarPower`` g_a = δ log|v_a| and ``VarExp`` g_a = δ v_a over the covariate's
distinct values v_a), and f_i is known (``VarFixed``, precision weights 1/√w_i: folded into
the rows).  C⁻¹, block diagonal by correlation group:

* none: I;
* AR(1) and CAR(1), correlation φ^Δ between a row and its predecessor Δ apart (Markov):
  the Prais–Winsten rows give C⁻¹ = Σ_first e eᵀ + Σ_t [e_t e_tᵀ + φ^{2Δ}e_p e_pᵀ − φ^Δ(e_t e_pᵀ + e_p e_tᵀ)]
  / (1 − φ^{2Δ}), one set of three pieces per distinct lag Δ; log|C| = Σ_t log(1 − φ^{2Δ_t});
* compound symmetry ρ in groups of n rows: C_g⁻¹ = [I − ρ/(1 + (n−1)ρ) J]/(1 − ρ), one J piece
  per distinct group size; log|C_g| = (n−1) log(1−ρ) + log(1 + (n−1)ρ).

Each piece is split by the strata of its two rows, (a, b), so its coefficient is
γ_k(ρ) exp(−g_a − g_b).  A structure with too many pieces (a continuous covariate with many
distinct values, CAR(1) with many distinct lags) is sampled on the PyMC graph instead
(O(N) per gradient, :mod:`.model`).

Gradient in ρ and u, by the chain rule through the cross-products: with A = Σ_k c_k S_k,
dℓ/dc_k = ⟨∂ℓ/∂A, S_k⟩, and ∂ℓ/∂A is what the blocked kernel's reverse pass already forms
(:func:`.blocked.crossproduct_adjoint`): H_j on each level's A_j, −2G_D B_jW_j on the coupling,
G_D on the dense rest.

Coordinates: the blocked kernel's, then u (a ``VarIdent`` ratio as its log, a power or
exponent as itself) and, for a correlation with prior Uniform(lo, hi), y with
ρ = lo + (hi − lo)·logistic(y) (PyMC's interval transform; prior and Jacobian give
log p(y) = log σ(y) + log(1 − σ(y))).  After sampling, every block's effects are drawn
exactly from their joint conditional at each draw's ρ (:func:`draw_effects`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..crossprod import CrossProducts, block_Z
from ..residual import CorCompSymm, VarExp, VarFixed, VarIdent, VarPower
from ..spec import ModelSpec
from .blocked import (DENSE_COUPLING, CompiledKernel, PriorArrays, crossproduct_adjoint, first_block_weights,
                      likelihood_backprop, loglik_stages, per_level_coupling, prior_logp, relative_factors,
                      rest_effect_draws, small_cholesky, unsupported_prior)
from .compiled import cached_njit
from .densities import SCALE_FAMILIES, finite_or_rejected, scale_logp, scale_params
from .priors import PriorSet

#: distinct values of a variance covariate (strata) and distinct lags of a Markov correlation
#: up to which the pieces are kept; above, the PyMC graph samples the model (O(N) per gradient)
MAX_STRATA = 64
MAX_LAGS = 32
#: pieces (components) at most: each is one copy of the cross-products
MAX_COMPONENTS = 400

# piece kinds, with their coefficient γ(ρ) (see the module docstring)
ONE, CUR, PREV, LAG, CS_I, CS_J = range(6)
# correlation kinds
NO_CORR, MARKOV, COMPSYMM = range(3)
# residual-parameter priors: a Normal on the coordinate, a scale family on exp(coordinate), Uniform (interval)
RES_NORMAL, RES_SCALE, RES_UNIFORM = range(3)


# ----------------------------------------------------------------------------- which models

def unsupported_reason(spec: ModelSpec, priors: PriorSet) -> str | None:
    """Why this kernel cannot sample ``spec`` (``None`` when it can)."""
    res = spec.residual
    if res is None:
        return "the model has no residual structure"
    if not spec.rows_in_memory:
        return "the residual pieces are computed from the rows, and this model was built out of memory"
    reason = unsupported_prior(priors)
    if reason is not None:
        return reason
    for name, prior in priors.residual:
        if _residual_prior_code(prior) is None:
            return f"the structured kernel does not implement a {prior.family} prior on {name}"
    try:
        pieces = residual_pieces(spec)
    except _TooMany as exc:
        return str(exc)
    if len(pieces.kind) > MAX_COMPONENTS:
        return f"the residual structure splits into {len(pieces.kind)} pieces (at most {MAX_COMPONENTS})"
    return None


def _residual_prior_code(prior) -> tuple[int, np.ndarray] | None:
    """(kind, parameters) of a residual parameter's prior as the kernel reads it, None if not implemented."""
    if prior.family == "Uniform":
        return RES_UNIFORM, np.array([prior.params["lower"], prior.params["upper"]], dtype=float)
    if prior.family in ("Normal", "LogNormal"):   # LogNormal on a ratio = Normal on its log
        return RES_NORMAL, np.array([prior.params.get("mu", 0.0), prior.params["sigma"]], dtype=float)
    if prior.family in SCALE_FAMILIES:
        fam, par = scale_params(prior, 1)
        return RES_SCALE + 10 * fam, par[0]
    return None


class _TooMany(Exception):
    pass


# ----------------------------------------------------------------------------- the pieces

@dataclass(frozen=True, eq=False)
class ResidualPieces:
    """Λ_R⁻¹ = Σ_k γ_k(ρ) exp(−g_{a_k} − g_{b_k}) E_k with each E_k given by the rows it pairs."""

    kind: np.ndarray        # (K,) ONE, CUR, PREV, LAG, CS_I, CS_J
    d: np.ndarray           # (K,) the lag Δ (Markov) or the group size n (CS_J)
    a: np.ndarray           # (K,) strata of the piece's two rows
    b: np.ndarray
    left: list              # K sparse (r × N) row maps: E_k = leftᵀ right (+ its transpose when sym)
    right: list
    sym: np.ndarray         # (K,) 1 where E_k = leftᵀright + rightᵀleft
    G: np.ndarray           # (strata, n_var) g = G u
    n_stratum: np.ndarray   # (strata,) rows per stratum
    fixed: np.ndarray       # (N,) known relative sd f_i
    corr_kind: int
    corr_d: np.ndarray      # distinct lags (Markov) or group sizes (compound symmetry)
    corr_count: np.ndarray  # how many predecessor pairs with that lag / groups of that size
    n_var: int


def _strata(res, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stratum per row, G, known relative sd f per row)."""
    fixed = np.ones(n)
    if res.weights is not None:
        fixed = fixed / np.sqrt(res.weights)
    var = res.variance
    if var is None or isinstance(var.structure, VarFixed):
        if var is not None:
            fixed = fixed * np.sqrt(var.values)
        return np.zeros(n, dtype=np.int64), np.zeros((1, 0)), fixed
    if isinstance(var.structure, VarIdent):
        codes = var.values.astype(np.int64)
        k = len(var.names) + 1
        return codes, np.vstack([np.zeros((1, k - 1)), np.eye(k - 1)]), fixed
    values, codes = np.unique(var.values, return_inverse=True)
    if len(values) > MAX_STRATA:
        raise _TooMany(f"the variance covariate {var.structure.covariate!r} has {len(values)} distinct values "
                       f"(the structured kernel keeps up to {MAX_STRATA})")
    g = np.log(np.abs(values)) if isinstance(var.structure, VarPower) else values
    assert isinstance(var.structure, (VarPower, VarExp))
    return codes.astype(np.int64), g[:, None].astype(float), fixed


#: each spec's pieces, kept while the spec lives (the route's check and the build both read them)
_PIECES: "weakref.WeakKeyDictionary[ModelSpec, ResidualPieces]" = weakref.WeakKeyDictionary()


def residual_pieces(spec: ModelSpec) -> ResidualPieces:
    """The pieces of ``spec``'s residual structure on its rows (see the module docstring), computed once."""
    if spec not in _PIECES:
        _PIECES[spec] = _pieces_of(spec)
    return _PIECES[spec]


def _pieces_of(spec: ModelSpec) -> ResidualPieces:
    res = spec.residual
    stratum, G, fixed = _strata(res, spec.n_obs)
    pieces = _PieceList(stratum)
    corr = res.correlation
    if corr is None:
        corr_kind, corr_d, corr_count = NO_CORR, np.zeros(0), np.zeros(0)
        pieces.add(ONE, 0.0, np.arange(spec.n_obs), np.arange(spec.n_obs))
    elif isinstance(corr.structure, CorCompSymm):
        corr_kind, (corr_d, corr_count) = COMPSYMM, _compsymm_pieces(pieces, corr)
    else:
        corr_kind, (corr_d, corr_count) = MARKOV, _markov_pieces(pieces, corr)
    return ResidualPieces(kind=np.array(pieces.kind, dtype=np.int64), d=np.array(pieces.d),
                          a=np.array(pieces.a, dtype=np.int64), b=np.array(pieces.b, dtype=np.int64),
                          left=pieces.left, right=pieces.right, sym=np.array(pieces.sym, dtype=np.int64),
                          G=np.ascontiguousarray(G, dtype=float),
                          n_stratum=np.bincount(stratum, minlength=G.shape[0]).astype(float), fixed=fixed,
                          corr_kind=corr_kind, corr_d=np.asarray(corr_d, dtype=float),
                          corr_count=np.asarray(corr_count, dtype=float), n_var=G.shape[1])


class _PieceList:
    """The pieces as they are found: kind, Δ or n, the strata pair, the row maps (left, right), symmetric."""

    def __init__(self, stratum: np.ndarray):
        self.stratum, self.n = stratum, len(stratum)
        self.kind, self.d, self.a, self.b, self.left, self.right, self.sym = [], [], [], [], [], [], []

    def append(self, kind, d, a, b, left, right, sym) -> None:
        for lst, v in zip((self.kind, self.d, self.a, self.b, self.left, self.right, self.sym),
                          (kind, float(d), int(a), int(b), left, right, int(sym))):
            lst.append(v)

    def add(self, kind, d, rows_l, rows_r, sym=False) -> None:
        """One piece per stratum pair of the row pairs (rows_l[i], rows_r[i])."""
        sa, sb = self.stratum[rows_l], self.stratum[rows_r]
        lo, hi = np.minimum(sa, sb), np.maximum(sa, sb)
        for a, b in sorted(set(zip(lo.tolist(), hi.tolist()))):
            keep = (lo == a) & (hi == b)
            self.append(kind, d, a, b, _selector(rows_l[keep], self.n), _selector(rows_r[keep], self.n), sym)


def _markov_pieces(pieces: _PieceList, corr) -> tuple[np.ndarray, np.ndarray]:
    """AR(1)/CAR(1): the groups' first rows, then per distinct lag the current, previous and cross pieces;
    returns (the distinct lags, how many predecessor pairs have each)."""
    has = corr.prev >= 0
    first = np.flatnonzero(~has)
    pieces.add(ONE, 0.0, first, first)
    t, prev, lag = np.flatnonzero(has), corr.prev[has], corr.lag[has]
    lags, counts = np.unique(lag, return_counts=True)
    if len(lags) > MAX_LAGS:
        raise _TooMany(f"the correlation's times have {len(lags)} distinct lags (the structured kernel keeps "
                       f"up to {MAX_LAGS})")
    for d in lags:
        sel = lag == d
        pieces.add(CUR, d, t[sel], t[sel])
        pieces.add(PREV, d, prev[sel], prev[sel])
        pieces.add(LAG, d, t[sel], prev[sel], sym=True)
    return lags, counts


def _compsymm_pieces(pieces: _PieceList, corr) -> tuple[np.ndarray, np.ndarray]:
    """Compound symmetry: I, then per group size n_g and strata pair Σ_g 1_{g,a} 1_{g,b}ᵀ (+ transpose);
    returns (the distinct group sizes, how many groups have each)."""
    rows = np.arange(pieces.n)
    pieces.add(CS_I, 0.0, rows, rows)
    stratum, size = pieces.stratum, corr.sizes[corr.group]
    for ng in np.unique(corr.sizes):
        strata = np.unique(stratum[size == ng])
        sums = {}
        for a in strata:
            sel = np.flatnonzero((size == ng) & (stratum == a))
            sums[a] = sp.csr_matrix((np.ones(len(sel)), (corr.group[sel], sel)), shape=(len(corr.sizes), pieces.n))
        for i, a in enumerate(strata):
            for b in strata[i:]:
                pieces.append(CS_J, ng, a, b, sums[a], sums[b], a != b)
    return np.unique(corr.sizes, return_counts=True)


def _selector(rows: np.ndarray, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(len(rows)), (np.arange(len(rows)), rows)), shape=(len(rows), n))


# ----------------------------------------------------------------------------- the arrays

@dataclass(frozen=True, eq=False)
class StructuredData(CompiledKernel):
    """The pieces' cross-products in the blocked kernel's layout (one slice per piece), and the priors."""

    cA11: np.ndarray       # (K, n1, q1, q1)
    ptr: np.ndarray
    rows: np.ndarray
    cvals: np.ndarray      # (K, nnz, q1) on the union of the pieces' coupling patterns
    cBd: np.ndarray        # (K, m, n1·q1) when the coupling is dense, else (K, 0, 0)
    cArr: np.ndarray       # (K, m, m)
    kind: np.ndarray
    d: np.ndarray
    a: np.ndarray
    b: np.ndarray
    G: np.ndarray
    n_stratum: np.ndarray
    log_det_fixed: float   # 2 Σ log f_i
    corr_kind: int
    corr_d: np.ndarray
    corr_count: np.ndarray
    res_fam: np.ndarray    # (n_res,) RES_NORMAL, RES_UNIFORM, or RES_SCALE + 10·(scale family code)
    res_par: np.ndarray    # (n_res, 2)
    res_ratio: np.ndarray  # (n_res,) True where the coordinate is a VarIdent ratio's log
    rest_off: np.ndarray
    rest_nlev: np.ndarray
    n: int
    priors: PriorArrays

    @property
    def n_res(self) -> int:
        return self.res_fam.shape[0]

    @property
    def res_x0(self) -> int:
        return self.priors.size

    @property
    def ndim(self) -> int:
        return self.priors.size + self.n_res

    @property
    def work(self) -> int:
        m = self.cArr.shape[1]
        K = self.cArr.shape[0]
        return int(m * m * (m if self.cBd.shape[1] else 1) + K * (self.cvals[0].size + m * m + self.cA11[0].size))

    @classmethod
    def build(cls, spec: ModelSpec, cp: CrossProducts, priors: PriorSet, Cm: np.ndarray,
              scale: float = 1.0) -> "StructuredData":
        """The pieces' arrays for ``spec`` (its y − ``cp.y_shift``, divided by ``scale``) under ``priors``."""
        pieces = residual_pieces(spec)
        M = _design(spec, cp, scale, pieces.fixed)
        first = spec.blocks[0]
        n1, q1 = first.n_levels, first.q
        grams = [_gram(M, L, R, s) for L, R, s in zip(pieces.left, pieces.right, pieces.sym)]
        f = n1 * q1
        Bs = [S[f:, :f].tocsr() for S in grams]
        union = abs(Bs[0])
        for B in Bs[1:]:
            union = union + abs(B)
        union = sp.csc_matrix(union)
        ptr, rows, _ = per_level_coupling(union, n1, q1)
        dense = union.nnz > DENSE_COUPLING * union.shape[0] * union.shape[1]
        level = np.repeat(np.arange(n1), np.diff(ptr))
        cvals = np.stack([_on_pattern(B, rows, level, q1) for B in Bs])
        m = union.shape[0]
        cBd = np.stack([B.toarray() for B in Bs]) if dense else np.zeros((len(Bs), 0, 0))
        fams, pars = zip(*[_residual_prior_code(pr) for _, pr in priors.residual]) if priors.residual else ((), ())
        return cls(cA11=np.stack([_level_blocks(S[:f, :f], n1, q1) for S in grams]), ptr=ptr, rows=rows,
                   cvals=np.ascontiguousarray(cvals), cBd=np.ascontiguousarray(cBd),
                   cArr=np.ascontiguousarray(np.stack([S[f:, f:].toarray() for S in grams]).reshape(-1, m, m)),
                   kind=pieces.kind, d=pieces.d, a=pieces.a, b=pieces.b, G=pieces.G, n_stratum=pieces.n_stratum,
                   log_det_fixed=float(2.0 * np.sum(np.log(pieces.fixed))), corr_kind=pieces.corr_kind,
                   corr_d=pieces.corr_d, corr_count=pieces.corr_count,
                   res_fam=np.array(fams, dtype=np.int64), res_par=np.array(pars, dtype=float).reshape(-1, 2),
                   res_ratio=np.array([isinstance(getattr(spec.residual.variance, "structure", None), VarIdent)
                                       and i < pieces.n_var for i in range(len(fams))], dtype=bool),
                   rest_off=np.array((0,) + tuple(cp.rest_offsets), dtype=np.int64),
                   rest_nlev=np.array([blk.n_levels for blk in spec.blocks], dtype=np.int64), n=int(spec.n_obs),
                   priors=PriorArrays.of(spec, priors, Cm))

    def arrays(self) -> tuple:
        """The pieces and the structure's description, in the order the compiled functions take them."""
        return (self.cA11, self.ptr, self.rows, self.cvals, self.cBd, self.cArr, self.kind, self.d, self.a, self.b,
                self.G, self.n_stratum, self.log_det_fixed, self.corr_kind, self.corr_d, self.corr_count,
                self.res_fam, self.res_par, self.rest_off, self.rest_nlev, self.n)

    def compiled(self):
        return logp_grad, self.arrays() + self.priors.args()

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        x = self.priors.initial_point(rng, self.ndim)
        # near the prior's centre: a ratio near 1, a power or exponent within its prior's sd of its mean
        # (an exponent's prior sd is 1/sd(v): δ·v stays O(1)), a correlation mid-range
        jitter = rng.uniform(-0.5, 0.5, self.n_res)
        normal = self.res_fam == RES_NORMAL
        x[self.res_x0:] = np.where(normal, self.res_par[:, 0] + jitter * np.minimum(self.res_par[:, 1], 1.0), jitter)
        return x

    def constrain(self, x: np.ndarray) -> dict:
        """Draws (..., ndim) → the blocked kernel's variables and ``residual``: the parameters on nlme's scale."""
        out = self.priors.constrain(x)
        u = x[..., self.res_x0:]
        nat = np.empty_like(u)
        for i, fam in enumerate(self.res_fam):
            if fam == RES_UNIFORM:
                lo, hi = self.res_par[i]
                nat[..., i] = lo + (hi - lo) / (1.0 + np.exp(-u[..., i]))
            elif self.res_ratio[i]:
                nat[..., i] = np.exp(u[..., i])
            else:
                nat[..., i] = u[..., i]
        out["residual"] = nat
        return out



def _design(spec: ModelSpec, cp: CrossProducts, scale: float, fixed: np.ndarray) -> sp.csr_matrix:
    """diag(1/f) [Z_1 Z_rest X (y − shift)/scale], columns in the cross-products' order."""
    y = (spec.y - cp.y_shift) / scale
    parts = [block_Z(blk) for blk in spec.blocks] + [sp.csc_matrix(spec.X), sp.csc_matrix(y[:, None])]
    M = sp.hstack(parts, format="csr")
    return sp.diags(1.0 / fixed) @ M


def _gram(M: sp.csr_matrix, L: sp.csr_matrix, R: sp.csr_matrix, sym: int) -> sp.csr_matrix:
    """Mᵀ E M for E = Lᵀ R (+ Rᵀ L)."""
    LM, RM = L @ M, R @ M
    S = (LM.T @ RM).tocsr()
    if sym:
        S = S + S.T
    return S.tocsr()


def _level_blocks(S: sp.spmatrix, n1: int, q1: int) -> np.ndarray:
    """The per-level diagonal blocks of the first block's part; off-block entries would mean the structure
    couples two of its levels (refused earlier by residual.check_nested)."""
    coo = sp.coo_matrix(S)
    out = np.zeros((n1, q1, q1))
    lev = coo.row // q1
    if np.any(lev != coo.col // q1):
        raise ValueError("a residual piece couples two levels of the first grouping factor")
    np.add.at(out, (lev, coo.row % q1, coo.col % q1), coo.data)
    return out


def _on_pattern(B: sp.csr_matrix, rows: np.ndarray, level: np.ndarray, q1: int) -> np.ndarray:
    """B's values at the union pattern's (row, level) slots, (nnz, q1)."""
    out = np.empty((len(rows), q1))
    for a in range(q1):
        out[:, a] = np.asarray(B[rows, level * q1 + a]).ravel()
    return out


# ----------------------------------------------------------------------------- compiled stages

@cached_njit(error_model="numpy")
def piece_gamma(kind, d, r):
    """γ(ρ) of a piece and its derivative in ρ (module docstring)."""
    if kind == CUR or kind == PREV:
        r2d = r ** (2.0 * d)
        den = 1.0 - r2d
        dg = 2.0 * d * r ** (2.0 * d - 1.0) / (den * den)
        return (1.0 / den if kind == CUR else r2d / den), dg
    if kind == LAG:
        rd = r ** d
        den = 1.0 - rd * rd
        return -rd / den, -d * r ** (d - 1.0) * (1.0 + rd * rd) / (den * den)
    if kind == CS_I:
        return 1.0 / (1.0 - r), 1.0 / ((1.0 - r) * (1.0 - r))
    if kind == CS_J:
        h = (1.0 - r) * (1.0 + (d - 1.0) * r)
        dh = (d - 1.0) * (1.0 - r) - (1.0 + (d - 1.0) * r)
        return -r / h, -(h - r * dh) / (h * h)
    return 1.0, 0.0


@cached_njit(error_model="numpy")
def corr_log_det(corr_kind, corr_d, corr_count, r):
    """log|C| over every correlation group and its derivative in ρ."""
    out, dout = 0.0, 0.0
    for i in range(corr_d.shape[0]):
        d, cnt = corr_d[i], corr_count[i]
        if corr_kind == MARKOV:
            r2d = r ** (2.0 * d)
            out += cnt * math.log1p(-r2d)
            dout -= cnt * 2.0 * d * r ** (2.0 * d - 1.0) / (1.0 - r2d)
        elif corr_kind == COMPSYMM:
            out += cnt * ((d - 1.0) * math.log1p(-r) + math.log1p((d - 1.0) * r))
            dout += cnt * (d - 1.0) * (1.0 / (1.0 + (d - 1.0) * r) - 1.0 / (1.0 - r))
    return out, dout


@cached_njit(error_model="numpy")
def residual_prior(x, res_x0, res_fam, res_par, grad):
    """The residual parameters' priors on their coordinates (with the Jacobians); gradient added to ``grad``."""
    lp = 0.0
    for i in range(res_fam.shape[0]):
        u = x[res_x0 + i]
        fam = res_fam[i]
        if fam == RES_NORMAL:
            z = (u - res_par[i, 0]) / res_par[i, 1]
            lp += -0.5 * z * z - math.log(res_par[i, 1]) - 0.5 * math.log(2.0 * math.pi)
            grad[res_x0 + i] -= z / res_par[i, 1]
        elif fam == RES_UNIFORM:     # log σ(u) + log(1 − σ(u)), without overflow
            au = abs(u)
            lp += -au - 2.0 * math.log1p(math.exp(-au))
            grad[res_x0 + i] += 1.0 - 2.0 / (1.0 + math.exp(-u))
        else:
            v = math.exp(u)
            val, dv = scale_logp((fam - RES_SCALE) // 10, res_par[i, 0], res_par[i, 1], v)
            lp += val + u
            grad[res_x0 + i] += dv * v + 1.0
    return lp


@cached_njit(error_model="numpy")
def piece_coefficients(x, res_x0, G, kind, d, a, b, res_par, corr_kind):
    """(c_k, ∂c_k/∂ρ, g per stratum, ρ, dρ/dy) at x."""
    n_var = G.shape[1]
    g = np.zeros(G.shape[0])
    for s in range(G.shape[0]):
        for l in range(n_var):
            g[s] += G[s, l] * x[res_x0 + l]
    r, drdy = 0.0, 0.0
    if corr_kind != NO_CORR:
        lo, hi = res_par[n_var, 0], res_par[n_var, 1]
        sg = 1.0 / (1.0 + math.exp(-x[res_x0 + n_var]))
        r = lo + (hi - lo) * sg
        drdy = (hi - lo) * sg * (1.0 - sg)
    K = kind.shape[0]
    c = np.empty(K)
    dc = np.empty(K)
    for k in range(K):
        e = math.exp(-g[a[k]] - g[b[k]])
        gam, dgam = piece_gamma(kind[k], d[k], r)
        c[k] = gam * e
        dc[k] = dgam * e
    return c, dc, g, r, drdy


@cached_njit(error_model="numpy")
def _weighted_sum(c, pieces, out):
    """out = Σ_k c_k pieces[k], over the flattened arrays (no temporaries)."""
    flat = pieces.reshape(pieces.shape[0], -1)
    o = out.reshape(-1)
    for i in range(o.shape[0]):
        o[i] = 0.0
    for k in range(c.shape[0]):     # piece by piece: each read contiguously
        ck = c[k]
        for i in range(o.shape[0]):
            o[i] += ck * flat[k, i]


@cached_njit(error_model="numpy")
def _inner_products(G, pieces, out):
    """out[k] += ⟨G, pieces[k]⟩ over the flattened arrays."""
    flat = pieces.reshape(pieces.shape[0], -1)
    g = G.reshape(-1)
    for k in range(out.shape[0]):
        acc = 0.0
        for i in range(g.shape[0]):
            acc += g[i] * flat[k, i]
        out[k] += acc


@cached_njit(error_model="numpy")
def combine(c, cA11, cvals, cBd, cArr):
    """A = Σ_k c_k S_k in each of the layout's arrays (the coupling in the form the kernel reads: dense or
    on its pattern, the other left empty)."""
    A11 = np.empty(cA11.shape[1:])
    Arr = np.empty(cArr.shape[1:])
    _weighted_sum(c, cA11, A11)
    _weighted_sum(c, cArr, Arr)
    if cBd.shape[1] > 0:
        Bd = np.empty(cBd.shape[1:])
        _weighted_sum(c, cBd, Bd)
        return A11, np.zeros((0, cvals.shape[2])), Bd, Arr
    vals = np.empty(cvals.shape[1:])
    _weighted_sum(c, cvals, vals)
    return A11, vals, np.zeros((0, 0)), Arr


@cached_njit(error_model="numpy")
def piece_derivatives(H, GB, GD, cA11, cvals, cBd, cArr):
    """dℓ/dc_k = ⟨∂ℓ/∂A, S_k⟩ for every piece."""
    out = np.zeros(cA11.shape[0])
    _inner_products(H, cA11, out)
    _inner_products(GD, cArr, out)
    _inner_products(GB, cBd if cBd.shape[1] > 0 else cvals, out)
    return out


@cached_njit(nogil=True, error_model="numpy")
def logp_grad(x, cA11, ptr, rows, cvals, cBd, cArr, kind, d, a, b, G, n_stratum, log_det_fixed, corr_kind, corr_d,
              corr_count, res_fam, res_par, rest_off, rest_nlev, n, blk_q, blk_corr, blk_x0, Cm, mu_b, s_b, fam_sigma,
              par_sigma, fam_sd, par_sd, eta, lkj_const, grad):
    """The log-posterior at the unconstrained point x; its gradient is written into ``grad``."""
    p = Cm.shape[0]
    q1 = blk_q[0]
    n_var = G.shape[1]
    res_x0 = x.shape[0] - res_fam.shape[0]
    lp, sigma, sd, Lc, C = prior_logp(x, blk_q, blk_corr, blk_x0, Cm, mu_b, s_b, fam_sigma, par_sigma, fam_sd,
                                      par_sd, eta, lkj_const, grad)
    lp += residual_prior(x, res_x0, res_fam, res_par, grad)
    c, dc, g, r, drdy = piece_coefficients(x, res_x0, G, kind, d, a, b, res_par, corr_kind)
    A11, vals, Bd, Arr = combine(c, cA11, cvals, cBd, cArr)
    T = C / sigma
    gT = np.zeros_like(C)
    ll, gbeta, dsigma, GD, Gb, W, P = loglik_stages(Cm @ x[:p], sigma, T, A11, ptr, rows, vals, Bd, Arr, rest_off,
                                                    rest_nlev, blk_q, n, gT)
    if not math.isfinite(ll):
        return finite_or_rejected(-math.inf, grad)
    log_c, dlog_c = corr_log_det(corr_kind, corr_d, corr_count, r)
    log_s = 0.0
    for s in range(g.shape[0]):
        log_s += n_stratum[s] * g[s]
    lp += ll - 0.5 * (log_det_fixed + 2.0 * log_s + log_c)
    likelihood_backprop(x, Cm, gbeta, gT, dsigma, T, sigma, sd, Lc, blk_q, blk_corr, blk_x0, grad)
    H, GB = crossproduct_adjoint(GD, Gb, W, P, np.ascontiguousarray(T[0, :q1, :q1]), ptr, rows, vals, Bd)
    dc_k = piece_derivatives(H, GB, GD, cA11, cvals, cBd, cArr)
    for l in range(n_var):
        acc = 0.0
        for k in range(c.shape[0]):
            acc -= dc_k[k] * c[k] * (G[a[k], l] + G[b[k], l])
        for s in range(g.shape[0]):
            acc -= n_stratum[s] * G[s, l]
        grad[res_x0 + l] += acc
    if corr_kind != NO_CORR:
        acc = -0.5 * dlog_c
        for k in range(c.shape[0]):
            acc += dc_k[k] * dc[k]
        grad[res_x0 + n_var] += acc * drdy
    return finite_or_rejected(lp, grad)


@cached_njit(error_model="numpy")
def first_block_draw(beta, sigma, T1, A11, ptr, rows, vals, Bd, b_rest, eps, out):
    """Exact draws of the first block's effects given the others' (b_rest), β, θ, σ: per level
    u_j ~ N(P_jT₁ᵀc_j, σ²P_j), P_j = (T₁ᵀA_jT₁ + I)⁻¹, c_j = B_jᵀ[−b_rest; −β; 1]; b_j = T₁u_j."""
    n1, q1 = A11.shape[0], A11.shape[1]
    mR, p = b_rest.shape[0], beta.shape[0]
    w = np.empty(mR + p + 1)
    for i in range(mR):
        w[i] = -b_rest[i]
    for i in range(p):
        w[mR + i] = -beta[i]
    w[mR + p] = 1.0
    W = np.empty((n1, q1, q1))
    P = np.empty((n1, q1, q1))
    first_block_weights(A11, T1, q1, W, P)
    c = np.empty(q1)
    u = np.empty(q1)
    Lp = np.zeros((q1, q1))
    for j in range(n1):
        for a in range(q1):
            acc = 0.0
            if Bd.shape[0] > 0:
                for r in range(Bd.shape[0]):
                    acc += Bd[r, j * q1 + a] * w[r]
            else:
                for ia in range(ptr[j], ptr[j + 1]):
                    acc += vals[ia, a] * w[rows[ia]]
            c[a] = acc
        small_cholesky(P[j], q1, Lp)       # q₁ is small: loops, not a LAPACK call per level and draw
        for a in range(q1):
            acc = 0.0
            for b in range(q1):
                tc = 0.0
                for e in range(q1):
                    tc += T1[e, b] * c[e]
                acc += P[j, a, b] * tc
            for b in range(a + 1):
                acc += sigma * Lp[a, b] * eps[j, b]
            u[a] = acc
        for a in range(q1):
            acc = 0.0
            for b in range(a + 1):
                acc += T1[a, b] * u[b]
            out[j, a] = acc


@cached_njit(nogil=True, error_model="numpy")
def effect_draws(xs, betas, sigmas, Ts, eps_rest, eps_first, cA11, ptr, rows, cvals, cBd, cArr, kind, d, a, b, G,
                 res_par, corr_kind, rest_off, rest_nlev, blk_q, out_rest, out_first):
    """Every block's effects at each draw: the whitened cross-products at its ρ, the other blocks' effects
    jointly (:func:`.blocked.rest_effect_draws`), then the first block's given them."""
    res_x0 = xs.shape[1] - res_par.shape[0]
    q1 = blk_q[0]
    for s in range(xs.shape[0]):
        c, _, _, _, _ = piece_coefficients(xs[s], res_x0, G, kind, d, a, b, res_par, corr_kind)
        A11, vals, Bd, Arr = combine(c, cA11, cvals, cBd, cArr)
        rest_effect_draws(betas[s : s + 1], sigmas[s : s + 1], Ts[s : s + 1], eps_rest[s : s + 1], A11, ptr, rows,
                          vals, Bd, Arr, rest_off, rest_nlev, blk_q, out_rest[s : s + 1])
        first_block_draw(betas[s], sigmas[s], np.ascontiguousarray(Ts[s, 0, :q1, :q1]), A11, ptr, rows, vals, Bd,
                         out_rest[s], eps_first[s], out_first[s])


def draw_effects(sd: StructuredData, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exact draws of every effect given the draws x (S, ndim): (first block (S, n1, q1), the rest (S, mR)),
    in the units ``sd`` was built in."""
    x = np.ascontiguousarray(x.reshape(-1, sd.ndim))
    S = x.shape[0]
    c = sd.constrain(x)
    blk_q = sd.priors.blk_q
    Ts = relative_factors(c, blk_q)
    n1, q1 = sd.cA11.shape[1], sd.cA11.shape[2]
    mR = sd.cArr.shape[1] - sd.p - 1
    eps_rest = rng.standard_normal((S, mR))
    eps_first = rng.standard_normal((S, n1, q1))
    out_rest, out_first = np.zeros((S, mR)), np.zeros((S, n1, q1))
    effect_draws(x, np.ascontiguousarray(c["beta"]), np.ascontiguousarray(c["sigma"]), Ts, eps_rest, eps_first,
                 sd.cA11, sd.ptr, sd.rows, sd.cvals, sd.cBd, sd.cArr, sd.kind, sd.d, sd.a, sd.b, sd.G, sd.res_par,
                 sd.corr_kind, sd.rest_off, sd.rest_nlev, blk_q, out_rest, out_first)
    return out_first, out_rest
