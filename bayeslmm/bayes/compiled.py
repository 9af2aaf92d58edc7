"""numba-compiled building blocks below the kernel: where the machine code is cached, and the exact effect draws.

Two modules compile with numba: :mod:`.kernel` (the collapsed log-posterior) and
this one.  Both compile through :func:`cached_njit`, so the machine code is written
once to an on-disk cache and loaded by every later process.  The exact draws of the
integrated-out effects for q ≤ 2 (:func:`draw_effects_small`) live here rather than
in the kernel because :func:`bayeslmm.bayes.collapsed.draw_first_block` calls them,
and the kernel reads :class:`~bayeslmm.bayes.collapsed.CollapsedData`: the algebra
(:mod:`.collapsed`) sits on this module, the kernel on both.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile

from numba import cfunc, njit
from numba.core import config as numba_config


def private_cache_dir(kind: str) -> str | None:
    """A ``kind`` cache folder in the temporary directory that only this user can write, or ``None``.

    Compiled caches (numba's, PyTensor's) are loaded as code: a folder another user
    could write to would let them run code in this process, so one that is not ours
    alone is not used.
    """
    path = os.path.join(tempfile.gettempdir(), f"bayeslmm-{kind}-cache-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return None
    mine = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022
    return path if mine and os.access(path, os.W_OK | os.X_OK) else None


def cached_njit(**options):
    """``njit(cache=True)``, falling back where numba finds no writable place for its cache.

    numba writes the machine code into ``__pycache__`` beside the decorated function's
    file or into the user's cache folder; a read-only install with no writable home
    has neither, and numba then refuses at import ("no locator available").  The
    fallback is a private folder in the temporary directory (set only while
    decorating, so other numba code in the process keeps its own setting), else no
    cache: each process then compiles the function again.
    """
    def wrap(func):
        try:
            return njit(cache=True, **options)(func)
        except RuntimeError as exc:
            if "no locator available" not in str(exc):
                raise
        folder = private_cache_dir("numba")
        if folder is None:
            return njit(**options)(func)
        saved = numba_config.CACHE_DIR
        numba_config.CACHE_DIR = folder
        try:
            return njit(cache=True, **options)(func)
        finally:
            numba_config.CACHE_DIR = saved
    return wrap


def cfunc_cache_dir(sources) -> str | None:
    """A private folder for C callbacks' caches, named by the contents of the files ``sources`` (or ``None``).

    numba checks only the decorated function's own file before it loads cached machine
    code, but a C callback carries the code of every jitted function it calls: naming
    the folder by a hash of the files those functions live in means an edit to any of
    them compiles the callback again instead of running stale code.  It lies in the
    private temporary folder of :func:`private_cache_dir`, so a read-only install caches too.
    """
    parent = private_cache_dir("numba")
    if parent is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(sources):
        with open(path, "rb") as fh:
            digest.update(fh.read())
    folder = os.path.join(parent, "cfunc-" + digest.hexdigest()[:16])
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def cached_cfunc(signature, sources=()):
    """``numba.cfunc(signature, cache=True)`` with its cache in :func:`cfunc_cache_dir` of ``sources``;
    where there is no such folder, each process compiles anew."""
    def wrap(func):
        folder = cfunc_cache_dir(sources)
        if folder is None:
            return cfunc(signature)(func)
        saved = numba_config.CACHE_DIR
        numba_config.CACHE_DIR = folder
        try:
            return cfunc(signature, cache=True)(func)
        finally:
            numba_config.CACHE_DIR = saved
    return wrap


@cached_njit(nogil=True, error_model="numpy")
def draw_effects_small(G, H, g, gamma, L, s2, eps, out):
    """Exact draws of the first block's effects for q ≤ 2, fused over (draws, levels).

    The exact conditional draw of :func:`bayeslmm.bayes.collapsed.draw_first_block` for q ≤ 2: for draw s and
    level j, u = g_j − H_jγ_s, M = I + LᵀG_jL/σ², v = M⁻¹Lᵀu/σ² + C⁻ᵀε (C = chol M),
    b = Lv.  ``eps`` is (q, S, J) standard normals, ``out`` is (S, J, q); the
    tests compare it with the same formula written in numpy.
    """
    S = gamma.shape[0]
    J = G.shape[0]
    q = G.shape[1]
    r = H.shape[2]
    for s in range(S):
        a = L[s, 0, 0]
        inv_s2 = 1.0 / s2[s]
        if q == 1:
            for j in range(J):
                u = g[j, 0]
                for k in range(r):
                    u -= H[j, 0, k] * gamma[s, k]
                M = 1.0 + a * a * G[j, 0, 0] * inv_s2
                v = a * u * inv_s2 / M + eps[0, s, j] / math.sqrt(M)
                out[s, j, 0] = a * v
            continue
        b = L[s, 1, 0]
        c = L[s, 1, 1]
        for j in range(J):
            u0 = g[j, 0]
            u1 = g[j, 1]
            for k in range(r):
                u0 -= H[j, 0, k] * gamma[s, k]
                u1 -= H[j, 1, k] * gamma[s, k]
            g11 = G[j, 0, 0]
            g12 = G[j, 0, 1]
            g22 = G[j, 1, 1]
            m11 = 1.0 + (a * a * g11 + 2.0 * a * b * g12 + b * b * g22) * inv_s2
            m12 = c * (a * g12 + b * g22) * inv_s2
            m22 = 1.0 + c * c * g22 * inv_s2
            det = m11 * m22 - m12 * m12
            w1 = (a * u0 + b * u1) * inv_s2
            w2 = c * u1 * inv_s2
            mean1 = (m22 * w1 - m12 * w2) / det
            mean2 = (m11 * w2 - m12 * w1) / det
            c11 = math.sqrt(m11)
            c21 = m12 / c11
            c22 = math.sqrt(m22 - c21 * c21)
            n2 = eps[1, s, j] / c22
            n1 = (eps[0, s, j] - c21 * n2) / c11
            v1 = mean1 + n1
            v2 = mean2 + n2
            out[s, j, 0] = a * v1
            out[s, j, 1] = b * v1 + c * v2
