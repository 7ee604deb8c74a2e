"""Shape buckets and padding, so jitted code compiles a few shapes whatever the data.

A jitted function compiles once per input shape. Callers therefore pad a batch to a
bucketed size (a power of two, a length bucket), run it, and drop the padding
afterwards. These are the one copy of those helpers (numpy only, no JAX import).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two that is >= ``n`` (1 for n <= 1), and at least ``floor``."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def bucket(n: int, buckets: Sequence[int], beyond: int | None = None) -> int:
    """The first of the ascending ``buckets`` that is >= ``n``. Past the last one:
    ``n`` rounded up to a multiple of ``beyond``, or the last bucket if ``beyond`` is None
    (for callers that never exceed it, e.g. lengths already truncated to it)."""
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1] if beyond is None else round_up(n, beyond)


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` with rows of zeros appended up to ``n`` rows (same dtype)."""
    out = np.zeros((n,) + x.shape[1:], x.dtype)
    out[: len(x)] = x
    return out


def pad_cols(x: np.ndarray, k: int) -> np.ndarray:
    """2-D ``x`` with columns of zeros appended up to ``k`` columns (same dtype)."""
    return np.pad(x, ((0, 0), (0, k - x.shape[1])))


def left_pad(seqs: Sequence[Sequence[int]], width: int, pad: int,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences right-aligned in a [rows, width] int32 array filled with ``pad``,
    and the int32 mask (1 on their tokens). ``rows`` defaults to ``len(seqs)``; rows past
    the sequences stay all ``pad`` with a zero mask."""
    n = len(seqs) if rows is None else rows
    ids = np.full((n, width), pad, np.int32)
    mask = np.zeros((n, width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def fine_bucket(n: int, steps_per_octave: int = 16, floor: int = 1024) -> int:
    """``n`` rounded up to one of ``steps_per_octave`` sizes per power of two (at least
    ``floor``): at most 1/steps_per_octave of padding, and still few distinct shapes, for
    jitted work whose cost grows with the padded size (unlike :func:`pow2_at_least`'s 2x)."""
    return max(floor, round_up(n, max(1, pow2_at_least(n) // steps_per_octave)))
