"""Rotary-embedding variants, computed once on the host from a transformers config.

transformers' ``modeling_rope_utils`` is the reference: each variant is an array of
inverse frequencies (``_compute_*_parameters``) plus a factor its rotary module multiplies
cos and sin by (``attention_scaling``; only yarn's differs from 1). The arithmetic below is
theirs, in float32 where theirs is a float32 tensor and in Python floats where theirs is.

- ``default``: ``1 / theta^(2i/d)``. Returned as ``inv_freq=None``: the decoder computes it
  in-graph exactly as it always has, so today's models stay bit-identical.
- ``linear``: default / ``factor``.
- ``dynamic`` (NTK): transformers recomputes the frequencies once a sequence grows past
  ``max_position_embeddings``; up to that length they equal its init-time (static) value,
  which is what we compute. Longer sequences are refused when the forward is traced
  (``max_len`` on the result), never computed with the wrong frequencies.
- ``llama3``: Llama 3.1's smoothed per-band scaling.
- ``yarn``: NTK-by-parts interpolation, with the attention factor (mscale) on cos/sin.

Anything else (``longrope``, ``proportional``, per-layer-type rope, ``partial_rotary_factor``
other than 1: the supported families' rotary modules rotate the whole head) is refused
with the field named.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qbudget.errors import QBudgetError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
    """What the decoder needs: ``inv_freq`` (None: the default, computed in-graph from
    ``theta``), the cos/sin factor, and for ``dynamic`` the longest sequence it holds for."""

    rope_type: str
    theta: float
    inv_freq: tuple[float, ...] | None = None
    attention_scale: float = 1.0
    max_len: int | None = None


def rope_parameters(config) -> dict:
    """The flat rope dict of a config: ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` (older configs); {} when neither is set."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        raise QBudgetError(f"malformed rope_parameters {rope!r}; expected a mapping")
    if "rope_type" not in rope and "type" not in rope and len(rope) and all(
            isinstance(v, dict) for v in rope.values()):
        raise QBudgetError(f"unsupported rope_parameters per layer type ({', '.join(rope)}); "
                           "supported: one rope_parameters for all layers")
    return rope


def _need(rope: dict, key: str, rope_type: str):
    value = rope.get(key)
    if value is None:
        raise QBudgetError(f"rope_parameters (rope_type {rope_type!r}) lacks {key!r}")
    return value


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``1 / (base ** (arange(0, dim, 2) / dim))`` in float32, as transformers computes it."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exps)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, rope: dict) -> np.ndarray:
    factor = float(_need(rope, "factor", "llama3"))
    low = float(_need(rope, "low_freq_factor", "llama3"))
    high = float(_need(rope, "high_freq_factor", "llama3"))
    old = float(_need(rope, "original_max_position_embeddings", "llama3"))
    if high == low:
        raise QBudgetError("rope_parameters (rope_type 'llama3'): high_freq_factor must differ "
                           f"from low_freq_factor, both are {low}")
    low_wavelen, high_wavelen = old / low, old / high
    f32 = np.float32
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > f32(low_wavelen), inv_freq / f32(factor), inv_freq)
    smooth = (f32(old) / wavelen - f32(low)) / f32(high - low)
    smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < f32(high_wavelen)) & ~(wavelen > f32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, rope: dict, max_position_embeddings: int):
    orig = _need(rope, "original_max_position_embeddings", "yarn")
    factor = rope.get("factor")
    if factor is None:
        if not max_position_embeddings:
            raise QBudgetError("rope_parameters (rope_type 'yarn') lacks 'factor' (and the config "
                               "has no max_position_embeddings to infer it from)")
        factor = max_position_embeddings / orig
    factor = float(factor)

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    f32 = np.float32
    pos_freqs = np.power(f32(theta), np.arange(0, dim, 2).astype(np.float32) / f32(dim))
    extrapolation = f32(1.0) / pos_freqs
    interpolation = f32(1.0) / (f32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - f32(low)) / f32(high - low), 0, 1)
    extra_factor = f32(1) - ramp.astype(np.float32)
    inv = interpolation * (f32(1) - extra_factor) + extrapolation * extra_factor
    return inv.astype(np.float32), float(attention_factor)


def rope_from_config(config, head_dim: int) -> Rope:
    """The rotary variant of ``config`` (QBudgetError naming the field if unsupported)."""
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise QBudgetError(f"unsupported rope_parameters / rope_scaling rope_type {rope_type!r}; "
                           f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise QBudgetError(f"unsupported partial_rotary_factor={partial}; supported: 1.0 "
                           "(rotary on the whole head)")
    if rope_type == "default":
        return Rope("default", theta)
    max_pos = getattr(config, "max_position_embeddings", None)
    if rope_type == "linear":
        factor = float(_need(rope, "factor", rope_type))
        inv = _default_inv_freq(theta, head_dim) / np.float32(factor)
        return Rope(rope_type, theta, tuple(float(x) for x in inv))
    if rope_type == "dynamic":
        factor = float(_need(rope, "factor", rope_type))
        if not max_pos:
            raise QBudgetError("rope_type 'dynamic' needs max_position_embeddings in the config")
        # transformers' init-time value (seq_len = max_position_embeddings): it holds for
        # every sequence up to that length; longer ones are refused at trace time.
        seq_len = max_pos
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
        inv = _default_inv_freq(base, head_dim)
        return Rope(rope_type, theta, tuple(float(x) for x in inv), max_len=int(max_pos))
    if rope_type == "llama3":
        inv = _llama3(_default_inv_freq(theta, head_dim), rope)
        return Rope(rope_type, theta, tuple(float(x) for x in inv))
    inv, scale = _yarn(theta, head_dim, rope, max_pos)
    return Rope(rope_type, theta, tuple(float(x) for x in inv), attention_scale=scale)
