"""Decoder-only transformer (Llama, Mistral, Qwen2 and Qwen3 families) in flax.nnx.

Why our own: transformers 5 ships no Flax models, and the student, the embedded
teachers and the committee all run forward/backward passes thousands of times on a
CPU, so the model has to be a plain JAX function XLA can compile. The architecture is
the one the families share — RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP, optionally tied embeddings. What differs per family (biases on q/k/v, o or
the MLP; Qwen3's per-head q/k RMSNorm; which config field switches a sliding window on)
is data in ``families.py``; the rotary variants (default, linear, dynamic, llama3, yarn)
are computed once on the host in ``rope.py``. Module attribute names follow the Hugging
Face parameter names (``layers[i].self_attn.q_proj``), so the checkpoint key map is short.
Checkpoint I/O lives in ``checkpoint.py`` (``from_pretrained``/``save_pretrained`` below
only forward to it).

Positions come from the attention mask (``cumsum(mask) - 1``), as transformers'
``generate`` does, so a left-padded row gives the same logits as the unpadded row.

Pure forward for vmapping (a committee of LoRA students over one frozen base)::

    graphdef, lora, base = split_lora(model)            # nnx.split(model, nnx.LoRAParam, ...)
    fwd = functools.partial(apply, graphdef)             # apply(graphdef, lora, base, ids, mask)
    logits = jax.vmap(fwd, in_axes=(0, None, None, None))(stacked_lora, base, ids, mask)

where ``stacked_lora`` is a pytree of LoRA states stacked on a leading axis (e.g.
``jax.tree.map(lambda *xs: jnp.stack(xs), *loras)``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qbudget.errors import QBudgetError
from qbudget.models.families import family
from qbudget.models.rope import rope_from_config



@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """The hashable subset of a transformers config that defines the computation."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    initializer_range: float = 0.02
    qk_norm: bool = False                       # Qwen3: RMSNorm(head_dim) on q, k before rotary
    rope_type: str = "default"
    rope_inv_freq: tuple[float, ...] | None = None   # None: default rope, computed in-graph
    rope_attention_scale: float = 1.0           # yarn's factor on cos/sin
    rope_max_len: int | None = None             # dynamic rope: longest sequence it holds for

    @classmethod
    def from_config(cls, config) -> "DecoderSpec":
        """Validate a transformers config; refuse what this implementation does not compute."""
        fam = family(getattr(config, "model_type", None))
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise QBudgetError(f"unsupported hidden_act {act!r}; supported: silu")
        _check_sliding_window(config, fam)
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            raise QBudgetError("unsupported pretraining_tp != 1; supported: 1")
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        if heads % kv:
            raise QBudgetError(f"num_attention_heads={heads} is not a multiple of "
                               f"num_key_value_heads={kv}")
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        if head_dim % 2:
            raise QBudgetError(f"unsupported odd head_dim={head_dim}; rotary needs an even one")
        rope = rope_from_config(config, head_dim)
        return cls(
            model_type=fam.model_type, vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size), intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers), num_heads=heads, num_kv_heads=kv,
            head_dim=head_dim, rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=rope.theta,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=fam.switch(config, fam.qkv_bias), o_bias=fam.switch(config, fam.o_bias),
            mlp_bias=fam.switch(config, fam.mlp_bias),
            initializer_range=float(getattr(config, "initializer_range", 0.02) or 0.02),
            qk_norm=fam.qk_norm, rope_type=rope.rope_type, rope_inv_freq=rope.inv_freq,
            rope_attention_scale=rope.attention_scale, rope_max_len=rope.max_len)


def _check_sliding_window(config, fam) -> None:
    """Accept sliding-window attention only where it cannot change the result: no window
    (null) or one at least ``max_position_embeddings`` long. Everything else is refused with
    the field and value named (the window itself is not implemented)."""
    layer_types = getattr(config, "layer_types", None) or ()
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise QBudgetError(f"unsupported layer_types {unknown}; supported: full_attention "
                           "(and sliding_attention with a window >= max_position_embeddings)")
    if not fam.has_sliding_window:
        if "sliding_attention" in layer_types:
            raise QBudgetError(f"unsupported layer_types sliding_attention for model_type "
                               f"{fam.model_type!r}; supported: full_attention")
        return
    switch = fam.sliding_window_switch
    on = bool(getattr(config, switch, False)) if switch else True
    on = on or "sliding_attention" in layer_types
    window = getattr(config, "sliding_window", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    if not on or window is None or (max_pos is not None and int(window) >= int(max_pos)):
        return
    field = f"{switch}=true with sliding_window={window}" if switch else f"sliding_window={window}"
    raise QBudgetError(f"unsupported {field} (< max_position_embeddings={max_pos}): sliding-window "
                       "attention is not implemented; supported: sliding_window null or >= "
                       f"max_position_embeddings" + (f", or {switch}=false" if switch else ""))


class _Opaque:
    """Holds a non-hashable object (the transformers config) as a static nnx attribute.

    Static attributes are part of the model's graphdef, which jitted functions take as a
    static argument. Two holders of equal configs compare equal (by the config's JSON),
    so a model loaded again from the same checkpoint (every cell of a sweep loads its
    student afresh) reuses the compiled generation and training code instead of compiling
    it again: with identity equality a sweep recompiled generation in every cell (~45 s of
    a tiny-world cell on a 2-core machine). Nothing computed depends on the config beyond
    what the graphdef's ``DecoderSpec`` holds; it is kept for saving.
    """

    __slots__ = ("value", "_key")

    def __init__(self, value):
        self.value = value
        to_json = getattr(value, "to_json_string", None)
        self._key = to_json(use_diff=False) if to_json is not None else None

    def __hash__(self):
        return hash(self._key) if self._key is not None else id(self)

    def __eq__(self, other):
        if not isinstance(other, _Opaque):
            return NotImplemented
        if self._key is None or other._key is None:
            return self is other
        return self._key == other._key


class Linear(nnx.Module):
    """``x @ kernel (+ bias)``, plus an optional LoRA branch ``scale * x @ A @ B``.

    The kernel is stored [in, out] (transposed w.r.t. torch). ``lora`` is an ``nnx.LoRA``
    attached by :func:`qbudget.models.lora.attach_lora`; nnx.LoRA has no alpha, so the
    alpha / rank scale is kept here as a static float.
    """

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, init_std: float, rngs: nnx.Rngs):
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None
        self.lora = nnx.data(None)   # data attribute: may later hold an nnx.LoRA
        self.lora_scale = 0.0
        self.in_features, self.out_features = din, dout

    def merged_kernel(self):
        """``kernel + scale * A @ B``: the adapted weight (the kernel itself without LoRA)."""
        if self.lora is None:
            return self.kernel[...]
        delta = self.lora_scale * (self.lora.lora_a[...] @ self.lora.lora_b[...])
        return self.kernel[...] + delta.astype(self.kernel[...].dtype)

    def __call__(self, x):
        if self.lora is not None and merge_lora_branch(x, (self,)):
            y = x @ self.merged_kernel()
        else:
            y = x @ self.kernel[...]
            if self.lora is not None:
                y = y + lora_delta(self, x, y.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


FUSE_PROJECTIONS = True


def merge_lora_branch(x, linears) -> bool:
    """Whether to apply LoRA as ``x @ (W + scale * A B)`` rather than ``x W + scale * (x A) B``.

    Why: on many rows (training, prefill, scoring) the two rank-r products and their
    gradients are skinny GEMMs (one side 8 wide) that XLA:CPU runs far below its matmul
    rate, while the merged form costs one [in, r] @ [r, out] product and, in the backward,
    one ordinary ``x^T dy`` GEMM from which dA and dB follow. perf_models' LoRA step, paired
    A/B in one process: -5% wall time from this alone. On a few rows (a decode step) the
    skinny form is cheaper than rebuilding the weight, so it stays. Same math either way
    (float32 rounding differs by ~1e-6 relative).
    """
    if any(lin.kernel[...].dtype != jnp.float32 for lin in linears):
        return False   # a low-precision base: see lora_delta
    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    return rows >= max(max(lin.in_features, lin.out_features) for lin in linears)


def lora_delta(lin: Linear, x, out_dtype):
    """``scale * x A B`` in the adapter's dtype (float32), cast to the base output's dtype.

    Why never merged into a bfloat16 kernel: a fresh adapter's update (B starts at 0,
    learning rate ~3e-4) is far below bfloat16's resolution of a base weight (2^-8
    relative), so ``W + scale * A B`` rounded to bfloat16 would drop it and its gradient.
    Computing the branch in float32 and adding it to the base output is what PEFT does
    for a bfloat16 base.
    """
    return (lin.lora_scale * lin.lora(x.astype(lin.lora.lora_a[...].dtype))).astype(out_dtype)


def fused_linear(x, linears):
    """Several Linears on the same input as one wide matmul (bigger GEMMs run faster on
    CPU); LoRA branches, if any, are merged into the kernel or added per projection (see
    :func:`merge_lora_branch`). Same math as calling each."""
    if not FUSE_PROJECTIONS:
        return tuple(lin(x) for lin in linears)
    merge = any(lin.lora is not None for lin in linears) and merge_lora_branch(x, linears)
    kernel = jnp.concatenate([lin.merged_kernel() if merge else lin.kernel[...]
                              for lin in linears], axis=1)
    y = x @ kernel
    if any(lin.bias is not None for lin in linears):
        y = y + jnp.concatenate([lin.bias[...] if lin.bias is not None
                                 else jnp.zeros((lin.out_features,), y.dtype) for lin in linears])
    # jnp.split, not slices: its transpose is one concatenate, where each slice's is a
    # zero pad of the whole width plus an add (-4% on the LoRA training step, paired A/B).
    bounds = list(itertools.accumulate(lin.out_features for lin in linears))[:-1]
    outs = jnp.split(y, bounds, axis=-1)
    return tuple(o + lora_delta(lin, x, o.dtype) if lin.lora is not None and not merge else o
                 for o, lin in zip(outs, linears))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, inv_freq=None, scale: float = 1.0):
    """cos/sin [B, T, head_dim] for integer positions [B, T] (HF's non-interleaved layout).

    ``inv_freq`` (head_dim / 2 floats, from :mod:`qbudget.models.rope`) replaces the
    default ``1 / theta^(2i/d)``, which is otherwise computed here exactly as it always
    was; ``scale`` multiplies cos and sin (yarn's attention factor).
    """
    if inv_freq is None:
        inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    else:
        inv = jnp.asarray(np.asarray(inv_freq, np.float32))
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if scale != 1.0:
        cos, sin = cos * jnp.float32(scale), sin * jnp.float32(scale)
    return cos, sin


def _rope_halves(x, cos, sin):
    half = x.shape[-1] // 2
    c = cos[:, :, None, :half].astype(x.dtype)
    s = sin[:, :, None, :half].astype(x.dtype)
    return x[..., :half], x[..., half:], c, s


@jax.custom_vjp
def apply_rope(x, cos, sin):
    """x [B, T, H, D]; rotate_half convention, computed per half.

    ``x * cos + rotate_half(x) * sin`` with cos/sin equal on both halves is
    ``[x1 c - x2 s, x2 c + x1 s]``; writing it that way avoids materialising the rotated
    copy (a concatenate of negated slices), whose backward XLA:CPU ran slowly: the LoRA
    training step of perf_models was ~8% faster in a paired A/B. cos/sin are constants
    of the positions (their cotangent is zero).
    """
    x1, x2, c, s = _rope_halves(x, cos, sin)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _apply_rope_fwd(x, cos, sin):
    return apply_rope(x, cos, sin), (cos, sin)


def _apply_rope_bwd(res, g):
    """The inverse rotation of the cotangent, as one concatenate of the two halves.

    Why by hand: autodiff transposes the two half-slices into two zero pads of the full
    width plus an add, and XLA:CPU fused those with the attention gradient's transpose
    into a slow loop (~1.3 ms per q or k per layer). The products and sums are written in
    autodiff's operand order (``g2 s + g1 c``, ``g2 c + (-g1) s``) so the compiled
    arithmetic, fused multiply-adds included, is bit-identical to autodiff's: paired A/B
    on the perf_models LoRA step, -3.8% with gradients equal bit for bit.
    """
    cos, sin = res
    g1, g2, c, s = _rope_halves(g, cos, sin)
    dx = jnp.concatenate([g2 * s + g1 * c, g2 * c + (-g1) * s], axis=-1)
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin)


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


def attention(q, k, v, mask, *, head_major: bool = False):
    """Grouped-query attention. q [B,T,H,D]; k, v [B,S,Hkv,D], or [B,Hkv,S,D] with
    ``head_major`` (the KV cache's layout); mask [B,T,S] bool.

    Why the cache is head-major: the batched products then have their batch dimensions
    (b, kv head) leading, so XLA:CPU reads the cache in place instead of transposing all
    of it at every decode step (greedy generation of the perf_models checkpoint, A/B in
    one session: 2,648 -> 3,424 new tokens/s, same tokens). Training keeps [B,S,Hkv,D]:
    there the extra transposes of k and v made the step slower, not faster.

    Without a cache (training, scoring) k and v are repeated to all heads and the products
    are plain 4-D einsums: the grouped 5-D form's backward is full of layout copies, and
    attention's forward+backward took 25-40% longer that way (microbenchmark at the
    training shapes with 1, 2 and 4 query heads per KV head).
    """
    b, t, h, d = q.shape
    if not head_major:
        g = h // k.shape[2]
        if g > 1:
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * (d ** -0.5)
        s = jnp.where(mask[:, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h * d)
    hkv = k.shape[1]
    q = q.reshape(b, t, hkv, h // hkv, d)
    s = jnp.einsum("btkgd,bksd->bkgts", q, k).astype(jnp.float32) * (d ** -0.5)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", p, v).reshape(b, t, h * d)


class Attention(nnx.Module):
    def __init__(self, spec: DecoderSpec, dtype, rngs: nnx.Rngs):
        h, kv, d, e = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
        std = spec.initializer_range
        self.q_proj = Linear(e, h * d, bias=spec.qkv_bias, dtype=dtype, init_std=std, rngs=rngs)
        self.k_proj = Linear(e, kv * d, bias=spec.qkv_bias, dtype=dtype, init_std=std, rngs=rngs)
        self.v_proj = Linear(e, kv * d, bias=spec.qkv_bias, dtype=dtype, init_std=std, rngs=rngs)
        self.o_proj = Linear(h * d, e, bias=spec.o_bias, dtype=dtype, init_std=std, rngs=rngs)
        if spec.qk_norm:   # Qwen3: per-head RMSNorm on q and k, before the rotation
            self.q_norm = RMSNorm(d, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps, dtype)
        self.qk_norm = spec.qk_norm
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d

    def __call__(self, x, cos, sin, mask, cache=None, index=None):
        b, t, _ = x.shape
        q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            kc, vc = cache
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, Hkv, T, D]
            k = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, 0, index, 0))
            cache = (k, v)
        return self.o_proj(attention(q, k, v, mask, head_major=cache is not None)), cache


class MLP(nnx.Module):
    def __init__(self, spec: DecoderSpec, dtype, rngs: nnx.Rngs):
        e, i, std = spec.hidden_size, spec.intermediate_size, spec.initializer_range
        self.gate_proj = Linear(e, i, bias=spec.mlp_bias, dtype=dtype, init_std=std, rngs=rngs)
        self.up_proj = Linear(e, i, bias=spec.mlp_bias, dtype=dtype, init_std=std, rngs=rngs)
        self.down_proj = Linear(i, e, bias=spec.mlp_bias, dtype=dtype, init_std=std, rngs=rngs)

    def __call__(self, x):
        gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, spec: DecoderSpec, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = MLP(spec, dtype, rngs)

    def __call__(self, x, cos, sin, mask, cache=None, index=None):
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, init_std: float, rngs: nnx.Rngs):
        self.embedding = nnx.Param(init_std * jax.random.normal(rngs.params(), (vocab, dim), dtype))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


class Backbone(nnx.Module):
    def __init__(self, spec: DecoderSpec, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embed(spec.vocab_size, spec.hidden_size, dtype,
                                  spec.initializer_range, rngs)
        self.layers = nnx.List([DecoderLayer(spec, dtype, rngs) for _ in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


def positions_from_mask(mask):
    """Position ids as transformers' generate computes them: cumsum(mask) - 1, pads at 0."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class CausalLM(nnx.Module):
    """A Llama/Mistral/Qwen2/Qwen3 causal LM. ``lm(input_ids, attention_mask=None) -> logits [B,T,V]``.

    Build with :meth:`from_pretrained` (HF folder), :meth:`from_config` (random init), and
    write back with :meth:`save_pretrained` (loadable by transformers' PyTorch classes).
    """

    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        spec = DecoderSpec.from_config(config)
        self.spec = spec
        self._config = _Opaque(config)
        self.dtype = jnp.dtype(dtype).name
        self.model = Backbone(spec, dtype, rngs)
        self.lm_head = None if spec.tie_word_embeddings else Linear(
            spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype,
            init_std=spec.initializer_range, rngs=rngs)
        self.lora_info = None   # (rank, alpha, targets) once adapters are attached
        self.generation_eos: tuple[int, ...] = ()   # generation_config.json's eos ids, if any

    # -- construction / I/O (implemented in checkpoint.py) ----------------------------------

    @property
    def config(self):
        """The transformers config object this model was built from."""
        return self._config.value

    @classmethod
    def from_config(cls, config, *, key, dtype=jnp.float32) -> "CausalLM":
        """Random initialisation (normal(initializer_range) weights, unit norms, zero biases)."""
        return cls(config, dtype=dtype, rngs=nnx.Rngs(params=key))

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32) -> "CausalLM":
        from qbudget.models.checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype)

    def save_pretrained(self, path) -> None:
        from qbudget.models.checkpoint import save_pretrained

        save_pretrained(self, path)

    def generate(self, prompt_ids, **kwargs):
        """Token-level generation; see :func:`qbudget.models.generate.generate`."""
        from qbudget.models.generate import generate

        return generate(self, prompt_ids, **kwargs)

    # -- computation --------------------------------------------------------------------------

    def logits_from_hidden(self, h):
        if self.lm_head is None:
            return (h @ self.model.embed_tokens.embedding[...].T).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def hidden(self, input_ids, positions, mask, cache=None, index=None):
        """Final hidden states [B,T,E]; ``mask`` [B,T,S] says which keys each query sees."""
        spec = self.spec
        if spec.rope_max_len is not None and mask.shape[-1] > spec.rope_max_len:
            # dynamic rope: transformers recomputes its frequencies past this length
            raise QBudgetError(f"sequence of {mask.shape[-1]} positions exceeds "
                               f"max_position_embeddings={spec.rope_max_len}, beyond which "
                               f"rope_type {spec.rope_type!r} is not static; supported: "
                               "sequences up to max_position_embeddings")
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_tables(positions, spec.head_dim, spec.rope_theta, spec.rope_inv_freq,
                               spec.rope_attention_scale)
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            x, c = layer(x, cos, sin, mask, None if cache is None else cache[i], index)
            new_cache.append(c)
        return self.model.norm(x), (new_cache if cache is not None else None)

    def __call__(self, input_ids, attention_mask=None):
        """Logits [B,T,V] float32. Outside a jax transformation this runs as one jitted
        call (eager op-by-op dispatch would compile every primitive separately)."""
        if not isinstance(input_ids, jax.core.Tracer) and not isinstance(
                attention_mask, jax.core.Tracer):
            return logits(self, input_ids, attention_mask)
        return self.forward(input_ids, attention_mask)

    def forward(self, input_ids, attention_mask=None):
        """The un-jitted forward (what :meth:`__call__` computes); use inside jit/vmap."""
        return self.logits_from_hidden(self.forward_hidden(input_ids, attention_mask))

    def forward_hidden(self, input_ids, attention_mask=None):
        """The final hidden states [B,T,E] of :meth:`forward` (before the lm head): for
        callers that need the logits at only some positions (the training loss)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None] & attention_mask[:, None, :]
        h, _ = self.hidden(input_ids, positions_from_mask(attention_mask), mask)
        return h

    def init_cache(self, batch: int, length: int):
        """Zeroed KV cache: a list over layers of (k, v) [B, Hkv, S, D] (head-major)."""
        shape = (batch, self.spec.num_kv_heads, length, self.spec.head_dim)
        dt = jnp.dtype(self.dtype)
        return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(self.spec.num_layers)]

    def decode(self, input_ids, positions, cache, index, kv_mask, last_only: bool = False):
        """Run ``input_ids`` [B,T] written at cache slots index..index+T-1.

        ``kv_mask`` [B,S] marks real (non-pad) cache slots; a query at slot ``index+t``
        sees slots ``<= index+t``. Returns (logits [B,T,V] — [B,1,V] with ``last_only`` —,
        new cache).
        """
        t = input_ids.shape[1]
        s = kv_mask.shape[1]
        q_slot = index + jnp.arange(t)
        mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & kv_mask.astype(bool)[:, None, :]
        h, cache = self.hidden(input_ids, positions, mask, cache, index)
        if last_only:
            h = h[:, -1:]
        return self.logits_from_hidden(h), cache


# -- pure functional forward (for jit / vmap over split states) ------------------------------


def split_lora(model: CausalLM):
    """``(graphdef, lora_state, base_state)``: LoRA params split before everything else."""
    return nnx.split(model, nnx.LoRAParam, ...)


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(graphdef, states, input_ids, attention_mask):
    return nnx.merge(graphdef, *states).forward(input_ids, attention_mask)


def apply(graphdef, *states_and_inputs: Any):
    """Pure forward: ``apply(graphdef, *states, input_ids, attention_mask) -> logits``.

    ``states`` are what ``nnx.split(model, ...)`` returned after the graphdef (e.g. the
    ``lora_state, base_state`` of :func:`split_lora`). Not jitted itself, so it can be
    wrapped in ``jax.vmap``/``jax.jit`` by the caller.
    """
    *states, input_ids, attention_mask = states_and_inputs
    return nnx.merge(graphdef, *states).forward(input_ids, attention_mask)


def logits(model: CausalLM, input_ids, attention_mask=None):
    """Jitted forward through ``nnx.split`` (no per-call nnx graph traversal inside jit)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    graphdef, state = nnx.split(model)
    return _apply_jit(graphdef, (state,), input_ids, jnp.asarray(attention_mask, jnp.int32))
