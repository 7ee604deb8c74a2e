"""The LoRA committee and the student's own continuation: signals ``disagreement`` and ``entropy``.

A committee is one frozen base (the student's) plus a stacked member axis of LoRA
states: members are trained together by one vmapped Adam step on the training loss
(:func:`qbudget.models.train.masked_ce`), and scored together along one greedy
continuation through the model's KV cache. ``entropy`` is the same scorer with a
committee of one — the student itself.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbudget.models.generate import stop_ids
from qbudget.padding import pow2_at_least
from qbudget.reductions import first_argmax
from qbudget.seeding import numpy_rng
from qbudget.signals.batching import left_pad, pad_id, pair_batch, prompt_ids, round_up
from qbudget.signals.common import (CandidateScores, bought_pairs, candidate_subset,
                                    split_student, stack_members)


@functools.lru_cache(maxsize=8)
def _adam(learning_rate: float):
    """One optax transformation per learning rate, so the jitted step is compiled once."""
    import optax

    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _member_steps(graphdef, tx, lora, opt_state, rest, ids, mask, loss_mask):
    """One optimisation step for every member at once (vmapped over the member axis)."""
    import optax

    from qbudget.models.decoder import apply
    from qbudget.models.train import masked_ce

    def loss(lora, ids, mask, loss_mask):
        return masked_ce(apply(graphdef, lora, rest, ids, mask), ids, loss_mask)

    def one(lora, opt_state, ids, mask, loss_mask):
        value, grads = jax.value_and_grad(loss)(lora, ids, mask, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    return jax.vmap(one)(lora, opt_state, ids, mask, loss_mask)


def train_committee(student, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                    members: int, steps: int, batch_size: int, learning_rate: float, key):
    """Train M LoRA members on bootstrap resamples of the bought (prompt, answer) pairs.

    Every member starts from the student's current adapters; member m draws its own
    bootstrap resample (n pairs with replacement) and takes ``steps`` Adam steps on
    minibatches of it. All members share the student's frozen base weights: only the
    LoRA pytree gets a member axis, and one vmapped step trains them all. Returns the
    stacked LoRA state ``[M, ...]`` (and the per-member final losses).
    """
    graphdef, lora, rest = split_student(student)
    stacked = stack_members(lora, members)
    n = len(prompts)
    if n == 0 or steps <= 0:
        return stacked, np.zeros(members, np.float32)
    ids, mask, lmask = pair_batch(tokenizer, prompts, responses)
    rng = numpy_rng(key)
    boot = rng.integers(0, n, size=(members, n))                 # bootstrap resamples
    tx = _adam(float(learning_rate))
    opt_state = jax.vmap(tx.init)(stacked)
    losses = np.zeros(members, np.float32)
    lengths = mask.sum(1)
    b = min(batch_size, n)
    for _ in range(steps):
        rows = np.take_along_axis(boot, rng.integers(0, n, size=(members, b)), axis=1)
        w = min(ids.shape[1], round_up(int(lengths[rows].max()), 32))   # few compiled widths
        stacked, opt_state, losses = _member_steps(graphdef, tx, stacked, opt_state, rest,
                                                   jnp.asarray(ids[rows, :w]), jnp.asarray(mask[rows, :w]),
                                                   jnp.asarray(lmask[rows, :w]))
    return stacked, np.asarray(losses)


def _step_stats(logits):
    """Per-step statistics from member logits [M, B, V]: H(p̄), mean H(p_m), vote entropy, argmax p̄."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    pbar = p.mean(0)
    h_mean = -(pbar * jnp.log(jnp.maximum(pbar, 1e-30))).sum(-1)
    h_each = -(p * logp).sum(-1).mean(0)
    votes = jax.nn.one_hot(first_argmax(logp), logp.shape[-1]).mean(0)
    vote_h = -(votes * jnp.log(jnp.maximum(votes, 1e-30))).sum(-1)
    return h_mean, h_each, vote_h, first_argmax(pbar)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _continuation_stats(graphdef, stacked, rest, ids, mask, tokens, eos):
    """Greedy continuation of the members' mean distribution, with per-step statistics.

    ``stacked`` has a leading member axis (M ≥ 1); the base weights ``rest`` are shared.
    At each of ``tokens`` steps every member gives p_m = softmax(logits) for the next
    token; p̄ = mean_m p_m; the continuation takes argmax p̄ (for M = 1: the model's own
    greedy token). Per step we record H(p̄), mean_m H(p_m) and the vote entropy of the
    members' argmax tokens; steps after the continuation emits a stop token (any of
    ``eos``) are masked out.
    One prefill plus ``tokens − 1`` single-token decode steps per member, through the
    model's KV cache. Returns per-prompt means over live steps.
    """
    from flax import nnx

    from qbudget.models.decoder import positions_from_mask

    b, width = ids.shape
    kv = jnp.concatenate([mask, jnp.ones((b, tokens), mask.dtype)], axis=1)
    positions = positions_from_mask(mask)

    def prefill(lora):
        model = nnx.merge(graphdef, lora, rest)
        cache = model.init_cache(b, width + tokens)
        logits, cache = model.decode(ids, positions, cache, 0, kv)
        return logits[:, -1], cache

    def decode(lora, cache, tok, pos, index):
        model = nnx.merge(graphdef, lora, rest)
        logits, cache = model.decode(tok[:, None], pos[:, None], cache, index, kv)
        return logits[:, 0], cache

    logits, cache = jax.vmap(prefill)(stacked)
    pos = positions[:, -1] + 1
    alive = jnp.ones((b,), bool)
    acc = jnp.zeros((4, b), jnp.float32)
    for t in range(tokens):
        h_mean, h_each, vote_h, nxt = _step_stats(logits)
        w = alive.astype(jnp.float32)
        acc = acc + jnp.stack([h_mean * w, h_each * w, vote_h * w, w])
        alive = alive & ~jnp.isin(nxt, eos)
        if t + 1 < tokens:
            logits, cache = jax.vmap(decode, in_axes=(0, 0, None, None, None))(
                stacked, cache, nxt, pos + t, width + t)
    live = jnp.maximum(acc[3], 1.0)
    h_mean, h_each, vote_h = acc[0] / live, acc[1] / live, acc[2] / live
    return {"entropy": h_mean, "js": jnp.maximum(h_mean - h_each, 0.0), "vote_entropy": vote_h,
            "mean_member_entropy": h_each}


def continuation_scores(student, tokenizer, stacked, texts: Sequence[str], *, tokens: int,
                        batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run :func:`_continuation_stats` over ``texts``; results in the order of ``texts``.

    Prompts are sorted by token length so each batch carries little padding; widths are
    bucketed to multiples of 16 and every batch is padded to the same row count
    (``batch_size``, or the next power of two for fewer texts), so XLA compiles a
    handful of shapes.
    """
    graphdef, _, rest = split_student(student)
    eos = np.asarray(stop_ids(student, tokenizer) or [-1], np.int32)
    seqs = [prompt_ids(tokenizer, t) for t in texts]
    order = np.argsort([len(s) for s in seqs], kind="stable")
    pad = pad_id(tokenizer)
    rows_per_batch = min(int(batch_size), pow2_at_least(len(texts)))
    out: dict[str, np.ndarray] = {}
    for s in range(0, len(texts), rows_per_batch):
        rows = order[s: s + rows_per_batch]
        real = len(rows)
        chunk = [seqs[i] for i in rows]
        chunk += [chunk[-1]] * (rows_per_batch - real)
        ids, mask, _ = left_pad(chunk, pad)
        res = _continuation_stats(graphdef, stacked, rest, jnp.asarray(ids), jnp.asarray(mask),
                                  tokens, eos)
        for k, v in res.items():
            out.setdefault(k, np.zeros(len(texts), np.float32))[rows] = np.asarray(v)[:real]
    return out


def committee_scores(student, tokenizer, stacked, texts: Sequence[str], *, tokens: int,
                     batch_size: int = 64) -> dict[str, np.ndarray]:
    """Disagreement of a committee (stacked LoRA members) on each prompt.

    Measured along the greedy continuation of the committee's mean next-token
    distribution p̄, over the first ``tokens`` generated tokens (stopping at EOS), averaged
    over steps:

    - ``js``: the generalised Jensen–Shannon divergence H(p̄) − (1/M)Σ H(p_m), which
      equals McCallum & Nigam's mean KL-to-the-mean (1/M)Σ KL(p_m ‖ p̄) exactly;
    - ``vote_entropy``: entropy of the distribution of the members' argmax tokens.

    Both are 0 when all members are identical.
    """
    res = continuation_scores(student, tokenizer, stacked, texts, tokens=tokens, batch_size=batch_size)
    return {"js": res["js"], "vote_entropy": res["vote_entropy"]}


def disagreement_signal(ctx, key, *, members, candidates, tokens, steps, batch_size, learning_rate,
                        score_batch):
    if ctx.student is None or len(ctx.answers) == 0 or members < 2:
        return None
    k_train, k_cand = jax.random.split(key)
    prompts, answers = bought_pairs(ctx)
    stacked, _ = train_committee(ctx.student, ctx.tokenizer, prompts, answers, members=members,
                                 steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                 key=k_train)
    idx = candidate_subset(ctx, candidates, k_cand)
    vals = committee_scores(ctx.student, ctx.tokenizer, stacked, [ctx.pool[int(i)].text for i in idx],
                            tokens=tokens, batch_size=score_batch)
    return CandidateScores(idx, vals)


def entropy_signal(ctx, key, *, candidates, tokens, batch_size):
    if ctx.student is None:
        return None
    _, lora, _ = split_student(ctx.student)
    idx = candidate_subset(ctx, candidates, key)
    res = continuation_scores(ctx.student, ctx.tokenizer, stack_members(lora, 1),
                              [ctx.pool[int(i)].text for i in idx], tokens=tokens, batch_size=batch_size)
    return CandidateScores(idx, {"entropy": res["entropy"]})
