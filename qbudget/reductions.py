"""Reductions XLA:CPU runs slowly in their textbook form, written as plain reductions.

``jnp.argmax`` lowers to one variadic (value, index) reduce that XLA:CPU does not
vectorise. Where an argmax sits in a hot loop — the greedy pick of every decode step
(~150 us of a ~2.3 ms step over a 2,048-token vocabulary), the lazy greedy k-center's
refresh over all N points — a max followed by the smallest index that reaches it gives
the same index several times faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def first_argmax(x, *, nan_free: bool = False):
    """``jnp.argmax(x, axis=-1)`` as int32: the first index of the maximum.

    A row holding NaN gives its first NaN, as ``jnp.argmax`` does (XLA:CPU's max reduce
    may skip NaNs, so they are looked for separately); ``nan_free=True`` skips that pass
    when the caller knows there are none.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = x == top
    if not nan_free:
        nan = jnp.isnan(x)
        hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, hit)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)
