"""``diversity``: greedy k-center (farthest-first traversal) on MiniLM prompt embeddings.

Each pick is the unbought prompt farthest (Euclidean) from its nearest already-chosen
prompt — bought ones and earlier picks of this round — i.e. the classic core-set
heuristic of Sener & Savarese, which 2-approximates the minimax covering radius.

:func:`k_center_greedy` is exact and jitted, with memory O(N·d): it never forms an N×N
(or N×labeled) matrix. The textbook loop reads the whole N×d matrix once per pick; this
one reads it once in total, then works on per-point *upper bounds* of the nearest-centre
distance:

1. One blocked matmul pass gives every point ``u_i = min_c E_ic + eps_i``, where ``E`` is
   the dot-product formula ``|x|² + |c|² − 2x·c`` in float32 and ``eps_i`` a rigorous
   floating-point error bound ``4(d+4)·2⁻²⁴·(|x_i| + max|c|)²`` (standard γ_d bounds for
   the dot products and for the exact formula), so ``u_i`` is never below the exact
   value. These bounds are marked *inexact*.
2. Distances only shrink as centres are added, so bounds stay valid forever ("lazy
   greedy"). Each pick takes ``j = argmax u`` (lowest index among maxima); if ``u_j`` is
   exact for the current centre set, ``j`` is the true farthest point (every other
   point's exact value is ≤ its bound ≤ ``u_j``, and lower indices are strictly below);
   otherwise ``u_j`` is refreshed *exactly* — ``Σ(x−c)²`` in float32 against only the
   centres added since its last refresh (all of them the first time) — and we retry.

The "exact" distance is the float32 ``Σ_j (x_j − c_j)²`` (squared, which orders points
like the distance). It is a function of the two vectors alone, so duplicates get
identical values and ties fall to the lowest index, as in a brute-force farthest-first.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qbudget.reductions import first_argmax
from qbudget.strategy import SelectionContext, Strategy, stateless

_BLOCK = 128    # centres per block in the initial matmul pass (memory N x _BLOCK)
_WINDOW = 64    # centres per step of an exact refresh
_U = 2.0 ** -24


def _bucket(n: int) -> int:
    """Pad the labeled count to a power-of-two number of blocks: few compiled shapes."""
    blocks = max(1, math.ceil(n / _BLOCK))
    return _BLOCK * (1 << (blocks - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("k",))
def _greedy(x, center_idx, n0, excluded, k):
    n, d = x.shape
    sqn = jnp.sum(x * x, axis=1)
    nblocks = (center_idx.shape[0] - k - _WINDOW) // _BLOCK
    hi = jax.lax.Precision.HIGHEST

    # 1. initial upper bounds from the first n0 centres, in blocks of _BLOCK centres
    def block(b, carry):
        u, cmax = carry
        idx = jax.lax.dynamic_slice(center_idx, (b * _BLOCK,), (_BLOCK,))
        valid = (jnp.arange(_BLOCK) + b * _BLOCK) < n0
        c = x[jnp.clip(idx, 0)]
        sqc = jnp.sum(c * c, axis=1)
        e = sqn[:, None] + sqc[None, :] - 2.0 * jnp.dot(x, c.T, precision=hi)
        e = jnp.where(valid[None, :], e, jnp.inf)
        cmax = jnp.maximum(cmax, jnp.max(jnp.where(valid, sqc, 0.0)))
        return jnp.minimum(u, jnp.min(e, axis=1)), cmax

    u, cmax = jax.lax.fori_loop(0, nblocks, block, (jnp.full((n,), jnp.inf, jnp.float32), jnp.float32(0.0)))
    eps = 4.0 * (d + 4) * _U * (jnp.sqrt(sqn) + jnp.sqrt(cmax)) ** 2
    u = jnp.maximum(u, 0.0) + eps
    u = jnp.where(excluded, -1.0, u)
    exact_n = jnp.full((n,), -1, jnp.int32)        # -1: bound from the matmul pass

    # 2. lazy greedy picks; centres live in `cidx` (carried), picks appended as made
    def pick_with_centres(i, carry):
        u, exact_n, cidx, n_centers, out = carry

        def cond(c):            # is the current maximum a stale bound?
            _, exact_n, j = c
            return exact_n[j] != n_centers

        def step(c):            # refresh it exactly against the centres added since
            u, exact_n, j = c
            start0 = jnp.maximum(exact_n[j], 0)
            val0 = jnp.where(exact_n[j] < 0, jnp.inf, u[j])
            xj = x[j]

            def body(s):
                start, val = s
                idx = jax.lax.dynamic_slice(cidx, (start,), (_WINDOW,))
                valid = (jnp.arange(_WINDOW) + start) < n_centers
                diff = xj[None, :] - x[jnp.clip(idx, 0)]
                dd = jnp.sum(diff * diff, axis=1)
                return start + _WINDOW, jnp.minimum(val, jnp.min(jnp.where(valid, dd, jnp.inf)))

            _, val = jax.lax.while_loop(lambda s: s[0] < n_centers, body, (start0, val0))
            u = u.at[j].set(val)
            return u, exact_n.at[j].set(n_centers), first_argmax(u, nan_free=True)

        first = first_argmax(u, nan_free=True)
        u, exact_n, j = jax.lax.while_loop(cond, step, (u, exact_n, first))
        cidx = cidx.at[n_centers].set(j)
        return (u.at[j].set(-1.0), exact_n, cidx, n_centers + 1, out.at[i].set(j))

    init = (u, exact_n, center_idx, jnp.asarray(n0, jnp.int32), jnp.zeros((k,), jnp.int32))
    _, _, _, _, out = jax.lax.fori_loop(0, k, pick_with_centres, init)
    return out


def k_center_greedy(embeddings, labeled_mask, k: int, *, key) -> np.ndarray:
    """Greedy farthest-first selection of ``k`` unlabeled rows of ``embeddings``.

    ``labeled_mask`` (bool [N]) marks the existing centres. Returns ``min(k, unlabeled)``
    distinct int64 row indices in pick order. Ties go to the lowest index. When nothing is
    labeled, the first pick is a uniformly random row chosen with ``key`` (the only use
    of the key), and the rest follow greedily.
    """
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    mask = np.asarray(labeled_mask, dtype=bool)
    if x.ndim != 2 or mask.shape != (x.shape[0],):
        raise ValueError(f"embeddings {x.shape} and labeled_mask {mask.shape} do not match")
    n = x.shape[0]
    k = min(int(k), int((~mask).sum()))
    if k <= 0:
        return np.zeros((0,), np.int64)
    first = []
    centres = np.flatnonzero(mask)
    if centres.size == 0:
        first = [int(jax.random.randint(key, (), 0, n))]
        centres = np.asarray(first)
        mask = mask.copy()
        mask[first[0]] = True
        k -= 1
        if k == 0:
            return np.asarray(first, np.int64)
    size = _bucket(centres.size)
    cidx = np.full(size + k + _WINDOW, -1, np.int32)
    cidx[: centres.size] = centres
    out = _greedy(jnp.asarray(x), jnp.asarray(cidx), np.int32(centres.size), jnp.asarray(mask), k=k)
    return np.concatenate([np.asarray(first, np.int64), np.asarray(out, np.int64)])


def make() -> Strategy:
    """Greedy k-center (farthest-first) on MiniLM prompt embeddings; bought prompts are the initial centres."""

    def select(signals, ctx: SelectionContext, k: int, key):
        return k_center_greedy(signals["embeddings"], ctx.bought_mask, k, key=key)

    return stateless("diversity", make.__doc__, ("embeddings",), {}, select)
