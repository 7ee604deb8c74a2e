"""Seeds, keys and generators derived from the run seed: the one place randomness starts.

Every random choice in qbudget takes an explicit JAX key or numpy Generator. They are
derived from ``(seed, purpose...)`` by hashing, never from hidden state, so a resumed run
replays an interrupted round with exactly the keys it had (see :mod:`qbudget.loop`), and
a value depends only on what it is for, not on what was drawn before it.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any printable parts; stable across processes and machines."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rng_for(seed: int, *purpose: object) -> np.random.Generator:
    """A numpy Generator for one purpose of a run (``rng_for(seed, "distill", round)``)."""
    return np.random.default_rng(stable_seed(seed, *purpose))


def key_for(seed: int, *purpose: object):
    """A JAX key for one purpose of a run (``key_for(seed, "select", round)``)."""
    import jax  # lazily: this module is imported by light, jax-free code paths too

    return jax.random.key(stable_seed(seed, *purpose))


def numpy_rng(key) -> np.random.Generator:
    """A numpy Generator derived deterministically from a JAX key (typed or raw uint32)."""
    import jax

    typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key).ravel()
    return np.random.default_rng([int(x) for x in data.astype(np.uint32)])


def as_rng(rng) -> np.random.Generator | None:
    """A Generator from a Generator, an int seed or a JAX key (None stays None)."""
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    return numpy_rng(rng)
