"""Batched KV-cache generation, jitted end to end.

One compiled call per batch does the prefill and the whole decode loop
(``lax.while_loop`` that exits as soon as every row has produced eos), so the per-token
cost is one XLA loop iteration, not a Python round trip. Prompts are left-padded; the
batch size and prompt length are rounded up to a few buckets so a long run compiles a
bounded set of shapes (rows added to fill a batch bucket are dropped afterwards).

Sampling: greedy when ``temperature == 0``; otherwise softmax(logits / temperature)
restricted to the top-p nucleus. Row ``i``'s randomness is ``fold_in(key(seeds[i]),
step)``, so a prompt's sample depends only on its seed, never on its batch-mates or on
where the batch boundaries fall.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qbudget.errors import QBudgetError
from qbudget.models.decoder import positions_from_mask
from qbudget.models.text import encode_prompt
from qbudget.padding import bucket, left_pad, pow2_at_least
from qbudget.reductions import first_argmax

#: Prompt-length buckets (tokens); longer prompts round up to a multiple of 128.
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def _bucket_batch(n: int, cap: int) -> int:
    return min(pow2_at_least(n), cap) if n <= cap else n


def _ordered_keys(x):
    """float32 -> uint32 keys in the same order (IEEE-754 sign-magnitude -> offset binary):
    negative floats have every bit flipped, non-negative ones the sign bit set."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def nucleus_mask(logits, top_p):
    """Top-p nucleus of each row of ``logits`` [B, V]: a bool mask of the tokens kept.

    The textbook nucleus ranks tokens by logit (ties by lower index) and keeps a rank when
    the probability mass of the ranks before it is below ``top_p``, so the top token
    always is. The kept ranks are a prefix, so the kept set is {logit > t} plus the
    lowest-index ties at t, where t is the smallest logit whose mass strictly above it,
    S(t), is below ``top_p`` (S falls as t rises). Why search for t instead of sorting:
    on XLA:CPU sorting a 1,024-token row costs ~3x a whole decode step of the embedded
    worlds' students, and the nucleus at their sampling settings is often hundreds of
    tokens wide, so a top-k shortcut rarely applies; a bisection on the order-preserving
    integer keys takes at most 32 masked row sums. Within a tie group each token adds
    the same probability, so the j-th tie (0-based) is kept when S(t) + j·p(t) < top_p.
    Masses are summed in row order rather than ranked order, so where a boundary mass
    equals ``top_p`` to within rounding either choice may come out; elsewhere the mask
    is the textbook one.
    """
    keys = _ordered_keys(logits)
    probs = jax.nn.softmax(logits, axis=-1)

    def mass_above(k):
        return jnp.sum(jnp.where(keys > k[:, None], probs, 0.0), axis=-1)

    # invariant: mass_above(hi) < top_p (true at the row's maximum, where it is 0);
    # lo is below the answer (starts one under the row's minimum, never evaluated there)
    hi = jnp.max(keys, axis=-1)
    lo = jnp.min(keys, axis=-1) - jnp.uint32(1)

    def open_(c):
        return jnp.any(c[1] - c[0] > 1)

    def halve(c):
        lo, hi = c
        gap = hi - lo
        mid = lo + gap // 2
        inside = mass_above(mid) < top_p
        move = gap > 1
        return jnp.where(move & ~inside, mid, lo), jnp.where(move & inside, mid, hi)

    _, t = jax.lax.while_loop(open_, halve, (lo, hi))
    # t is a key present in the row (S only changes at present keys); the tie group is
    # decided on float values, where -0.0 == 0.0, as a ranking by logit has it
    t_val = jnp.max(jnp.where(keys == t[:, None], logits, -jnp.inf), axis=-1, keepdims=True)
    above = logits > t_val
    ties = logits == t_val
    before_ties = jnp.sum(jnp.where(above, probs, 0.0), axis=-1, keepdims=True)
    p_t = jnp.max(jnp.where(ties, probs, 0.0), axis=-1, keepdims=True)
    tie_rank = (jnp.cumsum(ties, axis=-1) - 1).astype(jnp.float32)
    return above | (ties & (before_ties + tie_rank * p_t < top_p))


def _sample(logits, keys, step, temperature, top_p, *, greedy: bool, nucleus: bool):
    """Next token per row from float32 logits [B, V].

    ``greedy``/``nucleus`` are static (they change the program); ``temperature`` and
    ``top_p`` are traced, so changing their values does not recompile.
    """
    if greedy:
        return first_argmax(logits)   # jnp.argmax's ids, vectorised (qbudget.reductions)
    logits = logits / temperature
    if nucleus:
        logits = jnp.where(nucleus_mask(logits, top_p), logits, -jnp.inf)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    # jax.random.categorical is argmax(gumbel + logits); the same gumbel noise with
    # first_argmax gives the same tokens without XLA:CPU's slow paired argmax reduction
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(step_keys)
    return first_argmax(noise + logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy", "nucleus"))
def _generate_batch(state, ids, mask, seeds, eos, pad, temperature, top_p, *, graphdef,
                    max_new: int, greedy: bool, nucleus: bool):
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    keys = jax.vmap(jax.random.key)(seeds)
    cache = model.init_cache(b, p + max_new)
    kv_mask = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)
    positions = positions_from_mask(mask)
    logits, cache = model.decode(ids, positions, cache, 0, kv_mask, last_only=True)
    tok = _sample(logits[:, -1], keys, 0, temperature, top_p, greedy=greedy, nucleus=nucleus)
    out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)
    pos = positions[:, -1] + 1

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, pos, cache, done, out = carry
        logits, cache = model.decode(tok[:, None], pos[:, None], cache, p + i - 1, kv_mask)
        nxt = _sample(logits[:, 0], keys, i, temperature, top_p, greedy=greedy,
                      nucleus=nucleus)
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, pos + 1, cache, done | jnp.isin(nxt, eos), out

    carry = (jnp.int32(1), tok, pos, cache, done, out)
    *_, out = jax.lax.while_loop(cond, body, carry)
    return out


def as_id_list(ids) -> list[int]:
    """One token id, several, or None as a list of ints (config fields take all three)."""
    if ids is None:
        return []
    if isinstance(ids, (list, tuple, np.ndarray)):
        return [int(i) for i in ids]
    return [int(ids)]


def stop_ids(model, tokenizer) -> list[int]:
    """Where generation of an answer stops: the tokenizer's eos (the token training appends
    to every answer) and every eos id of the model's config and generation config (Llama 3
    Instruct stops at <|eot_id|>, <|end_of_text|> and <|eom_id|>)."""
    ids = (as_id_list(tokenizer.eos_token_id) + as_id_list(model.config.eos_token_id)
           + list(getattr(model, "generation_eos", ())))
    return list(dict.fromkeys(ids))


def generate(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, seeds: Sequence[int] | None = None,
             batch_size: int = 64, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None) -> list[list[int]]:
    """New token ids for each prompt (up to, not including, the first stop token).

    ``seeds[i]`` fixes row ``i``'s sampling randomness (default: ``i``); ignored when
    greedy. ``eos_token_id`` is one id or several (Llama 3 configs list three: a row stops
    at whichever comes first); it defaults to the model config's.
    """
    n = len(prompt_ids)
    if n == 0:
        return []
    if max_new_tokens < 1:
        raise QBudgetError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise QBudgetError(f"bad sampling settings: temperature={temperature} (>= 0), "
                           f"top_p={top_p} (in (0, 1])")
    if seeds is not None and len(seeds) != n:
        raise QBudgetError(f"{len(seeds)} seeds for {n} prompts")
    if any(len(p) == 0 for p in prompt_ids):
        raise QBudgetError("empty prompt (no tokens); every prompt needs at least one token")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    stops = as_id_list(eos_token_id)
    eos = np.asarray(stops or [-1], np.int32)
    pad = int(pad_token_id if pad_token_id is not None else (stops[0] if stops else 0))
    seeds = np.arange(n) if seeds is None else np.asarray(seeds, dtype=np.int64)
    seeds = (seeds % (2**32)).astype(np.uint32)
    graphdef, state = nnx.split(model)
    order = np.argsort([len(p) for p in prompt_ids], kind="stable")
    results: list[list[int] | None] = [None] * n
    temperature, top_p = float(temperature), float(top_p)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        bsz = _bucket_batch(len(rows), batch_size)
        plen = bucket(max(len(prompt_ids[r]) for r in rows), LENGTH_BUCKETS, beyond=128)
        ids, mask = left_pad([prompt_ids[r] for r in rows], plen, pad, rows=bsz)
        row_seeds = np.zeros((bsz,), np.uint32)
        row_seeds[:len(rows)] = seeds[rows]
        for j in range(len(rows), bsz):   # filler rows: copy of the first row, discarded
            ids[j], mask[j] = ids[0], mask[0]
        out = np.asarray(_generate_batch(state, ids, mask, row_seeds, eos,
                                         np.int32(pad), np.float32(max(temperature, 1e-6)),
                                         np.float32(top_p), graphdef=graphdef,
                                         max_new=int(max_new_tokens),
                                         greedy=temperature == 0.0, nucleus=top_p < 1.0))
        for j, r in enumerate(rows):
            toks = out[j].tolist()
            ends = [k for k, t in enumerate(toks) if t in stops]
            results[r] = toks[:ends[0]] if ends else toks
    return results  # type: ignore[return-value]


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_p: float = 1.0,
                  seeds: Sequence[int] | None = None, batch_size: int = 64) -> list[str]:
    """Answers to ``prompts`` (framed by :func:`encode_prompt`), special tokens removed."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, seeds=seeds, batch_size=batch_size,
                   eos_token_id=stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in out]
