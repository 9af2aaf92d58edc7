"""The collapsed log-posterior with the largest factor integrated out and the other effects sampled, compiled once.

Where the other factors have many effects (InstEval's 1,128 lecturers, 500 items each
seen by a few hundred subjects) integrating them out too (:mod:`.blocked`) costs a dense
m³ factorisation per gradient.  Here they are sampled instead — the partial collapse of
Lai, Domke & Sheldon (2024), the PyMC graph's ``collapsed`` parameterisation — but in
compiled code, cached, with the sparse coupling, so a gradient costs
O(J q₁³ + nnz(H) q₁ + nnz(X̃ᵀX̃)) and nothing is compiled per model.

With γ = [b_R; β] the coefficients of X̃ = [Z_R X], T₁ = C₁/σ (C₁ the first block's absolute
Cholesky factor), per level j of the first block u_j = g_j − H_jγ, M_j = T₁ᵀA_jT₁ + I,
P_j = M_j⁻¹, c_j = T₁ᵀu_j, v_j = P_jc_j, and rᵀr = yᵀy − 2γᵀX̃ᵀy + γᵀX̃ᵀX̃γ:

    ℓ = −½[N log 2πσ² + Σ_j log|M_j| + (rᵀr − Σ_j c_jᵀv_j)/σ²]
    ∂ℓ/∂γ = [X̃ᵀy − X̃ᵀX̃γ − Σ_j H_jᵀT₁v_j]/σ²
    ∂ℓ/∂T₁ = Σ_j −A_jT₁P_j + (u_jv_jᵀ − A_jT₁v_jv_jᵀ)/σ²
    ∂ℓ/∂σ |_T = −N/σ + (rᵀr − Σ_j c_jᵀv_j)/σ³

(from d log|M| = tr(P dM) and d(cᵀPc) = 2vᵀdc − vᵀdM v), then T₁ = C₁/σ as in :mod:`.blocked`.

Each other block's effects are sampled non-centred, b = C_k z with z ~ N(0, I), except a
block whose levels average at least 20 rows, which is centred, b ~ N(0, C_kC_kᵀ) (:func:`centred`).
A centred block's coordinates are moreover hierarchically centred (Gelfand, Sahu & Carlin
1995; :func:`hierarchy`): each holds the level's *total* t = b + (its parent's total), where the
parent is the same column of the block it is nested in (InstEval's lecturers in departments,
whose total is b_dept + β₀; a block with a centred block nested in it is sampled non-centred)
or, for the outermost such block, the fixed effect of that column (the intercept).  With b
centred, the common mean of many effects and the intercept are otherwise two coordinates that
the data tie together only through their sum — a ridge a diagonal mass matrix follows slowly
(InstEval's and the 1,000 × 500 design's R-hat above 1.01 at 4 × 1000 draws).  The map
x → b is linear and unit triangular, so the log-density is unchanged (no Jacobian).  The totals
whose parent is a fixed effect are then seen in an orthonormal basis whose first vector is their
common mean (a Householder reflection per column, :func:`mean_directions`): that mean is tied to
the integrated block's own mean (the subjects' of a subjects × items design) and moves as one
coordinate, which a diagonal mass matrix scales, instead of as every level at once.
Coordinates: x = [β_c, log σ, per block log sd and partial correlations (as :mod:`.blocked`),
the other blocks' z or (reflected) t, level-major].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..crossprod import CrossProducts
from ..spec import ModelSpec, nesting_map
from .blocked import CompiledKernel, PriorArrays, block_backprop, first_block_weights, per_level_coupling, prior_logp
from .compiled import cached_njit
from .densities import LOG_2PI, finite_or_rejected
from .priors import PriorSet

#: a sampled block is centred when its levels average at least this many rows
CENTRED_MIN_ROWS = 20


def centred(spec: ModelSpec, block) -> bool:
    """The rows rule for a sampled block's effects: centred, b ~ N(0, CCᵀ), rather than b = Cz.

    Betancourt & Girolami (2015): non-centred suits weakly informed effects, centred strongly
    informed ones; here any block whose levels average ≥ 20 rows (InstEval's lecturers; the
    items of a subjects × items design with 80 rows per item).  :func:`hierarchy` makes a block
    non-centred after all when a centred one is nested in it (InstEval's departments).  The
    PyMC graph centres only one-column blocks by this rule (:func:`.model.centred_block`).
    """
    return spec.n_obs / block.n_levels >= CENTRED_MIN_ROWS


def _nested_in(inner, outer) -> np.ndarray | None:
    """Each level of ``inner``'s level of ``outer``, when every level of ``inner`` lies in one of ``outer``'s."""
    levels = nesting_map(inner.codes, inner.n_levels, outer.codes)
    return None if levels is None or np.any(levels < 0) else levels


def _nest_parents(spec: ModelSpec, candidates) -> dict:
    """block k → (j, each level of k's level of j): among ``candidates``, the block with the most levels
    (fewer than k's) in which k is nested."""
    blocks = spec.blocks
    out = {}
    for k in candidates:
        outer = sorted((blocks[j].n_levels, j) for j in candidates if blocks[j].n_levels < blocks[k].n_levels)
        for _, j in reversed(outer):
            if (levels := _nested_in(blocks[k], blocks[j])) is not None:
                out[k] = (j, levels)
                break
    return out


def _column_places(blocks, offsets, k: int, a: int) -> np.ndarray:
    """Where column a of block k's levels sit among the other blocks' effects (level-major)."""
    return offsets[k] + np.arange(blocks[k].n_levels) * blocks[k].q + a


def hierarchy(spec: ModelSpec, offsets) -> tuple[list[int], np.ndarray]:
    """Which other blocks are sampled centred, and per coordinate of their effects (γ's first part,
    level-major) the parent of a centred one.

    A block is centred by :func:`centred`'s rule unless a centred block is nested in it: its effects
    are then known through its children's, whose spread is not known in advance, and it is sampled
    non-centred (with a centred parent, InstEval's 14 departments meet a funnel at a small sd).
    Parent −1: none; i < mR: coordinate i of the (non-centred) block the level is nested in, the
    same column, whose total is b_i plus its own parent; i ≥ mR: γ's β entry of the fixed effect of
    the same name (a column the nesting block lacks, too), the parent of one block only — the
    coarsest block with that column.
    """
    blocks = spec.blocks
    rule = [k for k in range(1, len(blocks)) if centred(spec, blocks[k])]
    nests = _nest_parents(spec, rule)
    inner = {j for j, _ in nests.values()}
    is_centred = [0] + [int(k in rule and k not in inner) for k in range(1, len(blocks))]
    # the non-centred blocks whose totals are a base (with three nested levels the outermost is none)
    bases = {nests[k][0] for k in nests if is_centred[k]}
    mR = sum(b.n_effects for b in blocks[1:])
    parent = np.full(mR, -1, dtype=np.int64)
    claimed: set[str] = set()
    for k in sorted(range(1, len(blocks)), key=lambda k: blocks[k].n_levels):
        if not (is_centred[k] or k in bases):
            continue
        block, nest = blocks[k], nests.get(k) if is_centred[k] else None
        for a, column in enumerate(block.columns):
            places = _column_places(blocks, offsets, k, a)
            if nest is not None and column in blocks[nest[0]].columns:
                j, levels = nest
                parent[places] = offsets[j] + levels * blocks[j].q + blocks[j].columns.index(column)
            elif column in spec.fixed_names and column not in claimed:
                claimed.add(column)
                parent[places] = mR + spec.fixed_names.index(column)
    return is_centred, parent


def mean_directions(parent: np.ndarray, is_centred, offsets, blocks) -> tuple[np.ndarray, np.ndarray]:
    """The groups of totals reflected together (CSR: ptr, idx): per centred block column whose parent is β."""
    mR = parent.shape[0]
    groups = []
    for k in (k for k in range(1, len(blocks)) if is_centred[k]):
        for a in range(blocks[k].q):
            places = _column_places(blocks, offsets, k, a)
            if blocks[k].n_levels > 1 and np.all(parent[places] >= mR):
                groups.append(places)
    ptr = np.cumsum([0] + [len(g) for g in groups]).astype(np.int64)
    idx = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, dtype=np.int64)
    return ptr, idx


def reflect(values: np.ndarray, ptr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``values`` (..., mR) with each group's entries u mapped to Hu, H = I − 2vvᵀ/vᵀv, v = e₁ − 1/√n
    (orthonormal and its own inverse; Hu's mean is u₁/√n): :func:`_reflect` on every row of a copy."""
    out = np.array(values, dtype=float, copy=True)
    # rows counted, not −1: with no other blocks' effects (mR = 0) the size is 0 and −1 is undefined
    _reflect_rows(out.reshape(math.prod(out.shape[:-1]), out.shape[-1]), ptr, idx)
    return out


@cached_njit(error_model="numpy")
def _reflect(values, ptr, idx):
    """:func:`reflect` in place on a vector (the kernel's totals x → t, and their gradient back)."""
    for g in range(ptr.shape[0] - 1):
        n = ptr[g + 1] - ptr[g]
        s = 1.0 / math.sqrt(n)
        vu = values[idx[ptr[g]]]
        total = 0.0
        for i in range(ptr[g], ptr[g + 1]):
            total += values[idx[i]]
        vu -= s * total
        f = vu * 2.0 / (2.0 - 2.0 * s)
        for i in range(ptr[g], ptr[g + 1]):
            values[idx[i]] += f * s
        values[idx[ptr[g]]] -= f


@cached_njit(error_model="numpy")
def _reflect_rows(values, ptr, idx):
    """:func:`_reflect` on each row of a 2-D array, in place."""
    for i in range(values.shape[0]):
        _reflect(values[i], ptr, idx)


@dataclass(frozen=True, eq=False)
class PartialData(CompiledKernel):
    """Everything the compiled log-posterior reads (the response already divided by its scale)."""

    A11: np.ndarray        # (n1, q1, q1)
    ptr: np.ndarray        # level j's coupling to γ: rows[ptr[j]:ptr[j+1]], H_jᵀ rows in vals
    rows: np.ndarray
    vals: np.ndarray       # (nnz, q1)
    g: np.ndarray          # (n1, q1) Z_1jᵀy
    xptr: np.ndarray       # X̃ᵀX̃ in CSR
    xidx: np.ndarray
    xval: np.ndarray
    Xty: np.ndarray        # (r,)
    yty: float
    n: int
    rest_off: np.ndarray   # (K,) where each block's effects start in γ (first: unused)
    rest_nlev: np.ndarray
    centred: np.ndarray    # (K,) 1 when the block's effects are sampled centred
    parent: np.ndarray     # (mR,) each effect coordinate's parent (:func:`hierarchy`)
    spin_ptr: np.ndarray   # the totals reflected together (:func:`mean_directions`)
    spin_idx: np.ndarray
    priors: PriorArrays

    @property
    def z0(self) -> int:
        """Where the effects' coordinates start in x."""
        return self.priors.size

    @property
    def ndim(self) -> int:
        return self.z0 + self.Xty.shape[0] - self.p

    @property
    def work(self) -> int:
        """Array elements one gradient touches, roughly (chooses threads for the chains)."""
        return int(self.vals.size + self.xval.size + self.A11.size)

    @classmethod
    def build(cls, spec: ModelSpec, cp: CrossProducts, priors: PriorSet, Cm: np.ndarray,
              scale: float = 1.0) -> "PartialData":
        """The arrays of ``cp`` (its y column divided by ``scale``) under ``priors`` (already in those units)."""
        r = cp.m - 1
        Arr = np.asarray(cp.Arr)
        B = sp.csr_matrix(cp.B)
        g = np.asarray(B[r, :].todense()).reshape(cp.first.n_levels, cp.first.q) / scale
        ptr, rows, vals = per_level_coupling(B[:r, :], cp.first.n_levels, cp.first.q)
        XtX = sp.csr_matrix(Arr[:r, :r])
        XtX.eliminate_zeros()
        blocks = spec.blocks
        offsets = (0,) + tuple(cp.rest_offsets)
        is_centred, parent = hierarchy(spec, offsets)
        spin_ptr, spin_idx = mean_directions(parent, is_centred, offsets, blocks)
        return cls(A11=np.ascontiguousarray(cp.A11), ptr=ptr, rows=rows, vals=vals, g=np.ascontiguousarray(g),
                   xptr=XtX.indptr.astype(np.int64), xidx=XtX.indices.astype(np.int64), xval=XtX.data.copy(),
                   Xty=Arr[:r, r] / scale, yty=float(Arr[r, r]) / scale**2, n=int(cp.n_obs),
                   rest_off=np.array(offsets, dtype=np.int64),
                   rest_nlev=np.array([b.n_levels for b in blocks], dtype=np.int64),
                   centred=np.array(is_centred, dtype=np.int64), parent=parent, spin_ptr=spin_ptr, spin_idx=spin_idx,
                   priors=PriorArrays.of(spec, priors, Cm))

    def compiled(self):
        return logp_grad, (self.A11, self.ptr, self.rows, self.vals, self.g, self.xptr, self.xidx, self.xval,
                           self.Xty, self.yty, self.n, self.rest_off, self.rest_nlev, self.centred,
                           self.parent, self.spin_ptr, self.spin_idx, self.z0) + self.priors.args()

    @property
    def totals(self) -> np.ndarray:
        """(mR,) whether each effect coordinate is a centred block's total t (else a non-centred z)."""
        return np.repeat(self.centred[1:].astype(bool), np.diff(np.append(self.rest_off[1:], self.parent.shape[0])))

    def _effects_and_bases(self, x: np.ndarray):
        """The priors' values, x's effect coordinates u (t after the reflection, or z), the non-centred
        blocks' effects b = C z (elsewhere u) and each total's base (its parent's total or β; else 0)."""
        out = self.priors.constrain(x)
        mR, total = self.parent.shape[0], self.totals
        u = reflect(x[..., self.z0 : self.z0 + mR], self.spin_ptr, self.spin_idx)
        b = u.copy()
        for k in range(1, len(self.rest_nlev)):
            if not self.centred[k]:
                q, nlev, start = int(self.priors.blk_q[k]), int(self.rest_nlev[k]), self.rest_off[k]
                z = u[..., start : start + nlev * q].reshape(x.shape[:-1] + (nlev, q))
                b[..., start : start + nlev * q] = np.einsum("...ab,...lb->...la", out["factor"][k], z).reshape(
                    x.shape[:-1] + (nlev * q,))
        # a non-centred parent's total is its b plus its own parent (β)
        pool = np.concatenate([b, out["beta"], np.zeros(x.shape[:-1] + (1,))], -1)
        up = (~total) & (self.parent >= mR)
        pool[..., np.flatnonzero(up)] += pool[..., self.parent[up]]
        bases = np.where(total, pool[..., self.parent], 0.0)       # parent −1 reads the trailing zero
        return out, u, b, bases

    def constrain(self, x: np.ndarray) -> dict:
        """Draws (..., ndim) → β, σ, per block its sds, correlation and factor, and the other blocks' effects."""
        out, u, b, bases = self._effects_and_bases(x)
        b = np.where(self.totals, u - bases, b)
        out["effects"] = []
        for k in range(1, len(self.rest_nlev)):
            q, nlev, start = int(self.priors.blk_q[k]), int(self.rest_nlev[k]), self.rest_off[k]
            out["effects"].append(b[..., start : start + nlev * q].reshape(x.shape[:-1] + (nlev, q)))
        return out

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        """The priors' jittered start, with each total started at its base (b = the jitter)."""
        x = self.priors.initial_point(rng, self.ndim)
        _, u, _, bases = self._effects_and_bases(x)    # the bases read only β and the z, not the totals
        x[self.z0 : self.z0 + u.shape[-1]] = reflect(u + bases, self.spin_ptr, self.spin_idx)
        return x


@cached_njit(error_model="numpy")
def _whiten(C, k, q, b, z, w):
    """z = C_k⁻¹b and w = C_k⁻ᵀz (C_k lower triangular)."""
    for a in range(q):
        acc = b[a]
        for c in range(a):
            acc -= C[k, a, c] * z[c]
        z[a] = acc / C[k, a, a]
    for a in range(q - 1, -1, -1):
        acc = z[a]
        for c in range(a + 1, q):
            acc -= C[k, c, a] * w[c]
        w[a] = acc / C[k, a, a]


@cached_njit(error_model="numpy")
def _rest_effects(x, tot, z0, C, rest_off, rest_nlev, blk_q, centred, parent, gamma, ggam, grad):
    """γ's first part, the other blocks' effects, from x (into ``gamma``, whose β part is set); returns their
    log prior.

    Non-centred b = C_k z, z ~ N(0, I) (first, as they are the centred ones' parents); centred
    b = t − base ~ N(0, C_kC_kᵀ), base the parent's total (b + β) or β, i.e. −½zᵀz − Σ log C_aa with
    z = C_k⁻¹b, whose gradient in b, −C_k⁻ᵀz, goes to ``ggam`` (carried to t and the parents by
    :func:`_chain_rule`, which also adds its gradient in C_k).
    """
    lp = 0.0
    z = np.empty(8)
    w = np.empty(8)
    mR = parent.shape[0]
    for phase in range(2):
        for k in range(1, blk_q.shape[0]):
            if centred[k] != phase:
                continue
            q = blk_q[k]
            if z.shape[0] < q:
                z = np.empty(q)
                w = np.empty(q)
            logdiag = 0.0
            for a in range(q):
                logdiag += math.log(C[k, a, a])
            for lev in range(rest_nlev[k]):
                c0 = rest_off[k] + lev * q
                if centred[k]:
                    for a in range(q):
                        gamma[c0 + a] = tot[c0 + a] - _base(parent, c0 + a, gamma, mR)
                    _whiten(C, k, q, gamma[c0 : c0 + q], z, w)
                    for a in range(q):
                        lp += -0.5 * z[a] * z[a] - 0.5 * LOG_2PI
                        ggam[c0 + a] -= w[a]
                    lp -= logdiag
                    continue
                for a in range(q):
                    zc = x[z0 + c0 + a]
                    lp += -0.5 * zc * zc - 0.5 * LOG_2PI
                    grad[z0 + c0 + a] -= zc
                for a in range(q):
                    acc = 0.0
                    for b2 in range(a + 1):
                        acc += C[k, a, b2] * x[z0 + c0 + b2]
                    gamma[c0 + a] = acc
    return lp


@cached_njit(error_model="numpy")
def _base(parent, c, gamma, mR):
    """A total's base: 0, β (γ's entry), or a non-centred parent's total b + (its parent β, if any)."""
    src = parent[c]
    if src < 0:
        return 0.0
    if src >= mR:
        return gamma[src]
    up = parent[src]
    return gamma[src] + (gamma[up] if up >= mR else 0.0)


@cached_njit(error_model="numpy")
def _levels_one_column(A11, ptr, rows, vals, g, gamma, a, s2, ggam, gT1):
    """:func:`_levels` for q₁ = 1 ((1 | g), InstEval's students), written out: M_j = a²A_j + 1."""
    logdet = 0.0
    quad = 0.0
    acc_t = 0.0
    for j in range(A11.shape[0]):
        u = g[j, 0]
        for ia in range(ptr[j], ptr[j + 1]):
            u -= vals[ia, 0] * gamma[rows[ia]]
        A = A11[j, 0, 0]
        M = a * a * A + 1.0
        c = a * u
        v = c / M
        logdet += math.log(M)
        quad += c * v
        t = a * v / s2
        for ia in range(ptr[j], ptr[j + 1]):
            ggam[rows[ia]] -= vals[ia, 0] * t
        acc_t += -A * a / M + (u * v - A * a * v * v) / s2
    gT1[0, 0] += acc_t
    return logdet, quad


@cached_njit(error_model="numpy")
def _levels_two_columns(A11, ptr, rows, vals, g, gamma, T1, P, s2, ggam, gT1):
    """:func:`_levels`' per-level loop for q₁ = 2 ((1 + x | subject)), written out with P_j from
    :func:`.blocked.first_block_weights`: the coupling rows' gather and scatter in scalars (1,000 × 500:
    0.68 → 0.2 ms per gradient); returns Σ_j c_jᵀv_j."""
    t00, t10, t11 = T1[0, 0], T1[1, 0], T1[1, 1]
    quad = 0.0
    g00 = 0.0
    g10 = 0.0
    g11 = 0.0
    for j in range(A11.shape[0]):
        a00, a01, a11 = A11[j, 0, 0], A11[j, 0, 1], A11[j, 1, 1]
        at00 = a00 * t00 + a01 * t10           # A_jT₁ (T₁ lower triangular)
        at01 = a01 * t11
        at10 = a01 * t00 + a11 * t10
        at11 = a11 * t11
        p00, p01, p11 = P[j, 0, 0], P[j, 0, 1], P[j, 1, 1]
        u0, u1 = g[j, 0], g[j, 1]
        for ia in range(ptr[j], ptr[j + 1]):
            gr = gamma[rows[ia]]
            u0 -= vals[ia, 0] * gr
            u1 -= vals[ia, 1] * gr
        c0 = t00 * u0 + t10 * u1               # c_j = T₁ᵀu_j
        c1 = t11 * u1
        v0 = p00 * c0 + p01 * c1
        v1 = p01 * c0 + p11 * c1
        quad += c0 * v0 + c1 * v1
        w0 = t00 * v0 / s2                     # T₁v_j / σ²
        w1 = (t10 * v0 + t11 * v1) / s2
        for ia in range(ptr[j], ptr[j + 1]):
            ggam[rows[ia]] -= vals[ia, 0] * w0 + vals[ia, 1] * w1
        atv0 = at00 * v0 + at01 * v1
        atv1 = at10 * v0 + at11 * v1
        g00 += -(at00 * p00 + at01 * p01) + (u0 * v0 - atv0 * v0) / s2
        g10 += -(at10 * p00 + at11 * p01) + (u1 * v0 - atv1 * v0) / s2
        g11 += -(at10 * p01 + at11 * p11) + (u1 * v1 - atv1 * v1) / s2
    gT1[0, 0] += g00
    gT1[1, 0] += g10
    gT1[1, 1] += g11
    return quad


@cached_njit(error_model="numpy")
def _levels(A11, ptr, rows, vals, g, gamma, T1, q1, s2, ggam, gT1):
    """Σ_j log|M_j| and Σ_j c_jᵀv_j; adds −Σ_j H_jᵀT₁v_j/σ² to ggam and ∂ℓ/∂T₁ to gT1 (module docstring)."""
    if q1 == 1:
        return _levels_one_column(A11, ptr, rows, vals, g, gamma, T1[0, 0], s2, ggam, gT1)
    n1 = A11.shape[0]
    P = np.empty((n1, q1, q1))
    W = np.empty((n1, q1, q1))
    logdet = first_block_weights(A11, T1, q1, W, P)
    if logdet == -math.inf:
        return logdet, 0.0
    if q1 == 2:
        return logdet, _levels_two_columns(A11, ptr, rows, vals, g, gamma, T1, P, s2, ggam, gT1)
    quad = 0.0
    u = np.empty(q1)
    c = np.empty(q1)
    v = np.empty(q1)
    t = np.empty(q1)
    AT = np.empty((q1, q1))
    for j in range(n1):
        for a in range(q1):
            u[a] = g[j, a]
        for ia in range(ptr[j], ptr[j + 1]):
            gr = gamma[rows[ia]]
            for a in range(q1):
                u[a] -= vals[ia, a] * gr
        for a in range(q1):
            acc = 0.0
            for b in range(a, q1):
                acc += T1[b, a] * u[b]
            c[a] = acc
        for a in range(q1):
            acc = 0.0
            for b in range(q1):
                acc += P[j, a, b] * c[b]
            v[a] = acc
            quad += c[a] * acc
        for a in range(q1):
            acc = 0.0
            for b in range(a + 1):
                acc += T1[a, b] * v[b]
            t[a] = acc                       # T₁v_j
        for ia in range(ptr[j], ptr[j + 1]):
            acc = 0.0
            for a in range(q1):
                acc += vals[ia, a] * t[a]
            ggam[rows[ia]] -= acc / s2
        for a in range(q1):                  # A_jT₁
            for b in range(q1):
                acc = 0.0
                for k in range(q1):
                    acc += A11[j, a, k] * T1[k, b]
                AT[a, b] = acc
        for a in range(q1):
            for b in range(a + 1):
                atp = 0.0
                atv = 0.0
                for k in range(q1):
                    atp += AT[a, k] * P[j, k, b]
                    atv += AT[a, k] * v[k]
                gT1[a, b] += -atp + (u[a] * v[b] - atv * v[b]) / s2
    return logdet, quad


@cached_njit(nogil=True, error_model="numpy")
def logp_grad(x, A11, ptr, rows, vals, g, xptr, xidx, xval, Xty, yty, n, rest_off, rest_nlev, centred, parent,
              spin_ptr, spin_idx, z0, blk_q,
              blk_corr, blk_x0, Cm, mu_b, s_b, fam_sigma, par_sigma, fam_sd, par_sd, eta, lkj_const, grad):
    """The log-posterior at the unconstrained point x; its gradient is written into ``grad``."""
    p = Cm.shape[0]
    r = Xty.shape[0]
    mR = r - p
    q1 = blk_q[0]
    lp, sigma, sd, Lc, C = prior_logp(x, blk_q, blk_corr, blk_x0, Cm, mu_b, s_b, fam_sigma, par_sigma, fam_sd,
                                      par_sd, eta, lkj_const, grad)
    gamma = np.empty(r)
    beta = Cm @ x[:p]
    for i in range(p):
        gamma[mR + i] = beta[i]
    ggam = np.zeros(r)       # ∂ℓ/∂γ: the centred effects' prior, then the likelihood
    tot = x[z0 : z0 + mR].copy()                  # the centred blocks' totals t
    _reflect(tot, spin_ptr, spin_idx)
    lp += _rest_effects(x, tot, z0, C, rest_off, rest_nlev, blk_q, centred, parent, gamma, ggam, grad)
    s2 = sigma * sigma
    # rᵀr and X̃ᵀy − X̃ᵀX̃γ (sparse)
    rtr = yty
    for i in range(r):
        acc = 0.0
        for k in range(xptr[i], xptr[i + 1]):
            acc += xval[k] * gamma[xidx[k]]
        rtr += -2.0 * gamma[i] * Xty[i] + gamma[i] * acc
        ggam[i] += (Xty[i] - acc) / s2
    T1 = np.zeros((q1, q1))
    for a in range(q1):
        for b in range(a + 1):
            T1[a, b] = C[0, a, b] / sigma
    gT1 = np.zeros((q1, q1))
    logdet, quad = _levels(A11, ptr, rows, vals, g, gamma, T1, q1, s2, ggam, gT1)
    if logdet == -math.inf:
        for i in range(grad.shape[0]):
            grad[i] = 0.0
        return -math.inf
    lp += -0.5 * (n * (LOG_2PI + math.log(s2)) + logdet + (rtr - quad) / s2)
    dsigma = -n / sigma + (rtr - quad) / (s2 * sigma)
    _chain_rule(x, gamma, ggam, gT1, C, T1, sd, Lc, sigma, dsigma, z0, rest_off, rest_nlev, blk_q, blk_corr, blk_x0,
                centred, parent, spin_ptr, spin_idx, Cm, grad)
    return finite_or_rejected(lp, grad)


@cached_njit(error_model="numpy")
def _chain_rule(x, gamma, ggam, gT1, C, T1, sd, Lc, sigma, dsigma, z0, rest_off, rest_nlev, blk_q, blk_corr,
                blk_x0, centred, parent, spin_ptr, spin_idx, Cm, grad):
    """∂ℓ/∂γ and ∂ℓ/∂T₁ onto the coordinates: β_c, the effects' z (or t), every block's sds and correlations, σ."""
    p = Cm.shape[0]
    K = blk_q.shape[0]
    mR = ggam.shape[0] - p
    for k in range(1, K):        # b = t − base: the gradient in b moves the base (β, a parent's b) the other way
        if centred[k]:
            for c in range(rest_off[k], rest_off[k] + rest_nlev[k] * blk_q[k]):
                src = parent[c]
                if src >= 0:
                    ggam[src] -= ggam[c]
                    if src < mR and parent[src] >= mR:
                        ggam[parent[src]] -= ggam[c]
    gtot = np.zeros(mR)          # ∂ℓ/∂t of the centred blocks' totals
    for i in range(p):
        acc = 0.0
        for k in range(p):
            acc += Cm[k, i] * ggam[mR + k]
        grad[i] += acc
    q1 = blk_q[0]
    gC1 = np.zeros((q1, q1))
    for a in range(q1):
        for b in range(a + 1):
            if blk_corr[0] == 0 and a != b:
                continue
            dsigma -= gT1[a, b] * T1[a, b] / sigma
            gC1[a, b] = gT1[a, b] / sigma
    block_backprop(x, blk_x0[0], q1, blk_corr[0], sd[0], Lc[0], gC1, grad)
    for k in range(1, K):
        q = blk_q[k]
        gC = np.zeros((q, q))
        z = np.empty(q)
        w = np.empty(q)
        for lev in range(rest_nlev[k]):
            c0 = rest_off[k] + lev * q
            if centred[k]:                       # the prior's ∂/∂C_k = w zᵀ − diag(1/C_aa) per level
                _whiten(C, k, q, gamma[c0 : c0 + q], z, w)
                for a in range(q):
                    gtot[c0 + a] += ggam[c0 + a]
                    for b2 in range(a + 1):
                        gC[a, b2] += w[a] * z[b2]
                    gC[a, a] -= 1.0 / C[k, a, a]
                continue
            for a in range(q):
                acc = 0.0
                for b2 in range(a, q):
                    acc += C[k, b2, a] * ggam[c0 + b2]
                grad[z0 + c0 + a] += acc                   # Cᵀ ∂ℓ/∂b
                for b2 in range(a + 1):
                    gC[a, b2] += ggam[c0 + a] * x[z0 + c0 + b2]
        for a in range(q):
            for b2 in range(a):
                if blk_corr[k] == 0:
                    gC[a, b2] = 0.0
        block_backprop(x, blk_x0[k], q, blk_corr[k], sd[k], Lc[k], gC, grad)
    _reflect(gtot, spin_ptr, spin_idx)         # H is symmetric: ∂ℓ/∂u = H ∂ℓ/∂t
    for c in range(mR):
        grad[z0 + c] += gtot[c]
    grad[p] += dsigma * sigma
