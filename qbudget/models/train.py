"""Training on (prompt, response) pairs: batching, optimiser, jitted masked-CE step.

One step is the distillation step ``distill`` runs and the pretraining step the worlds
use: next-token cross-entropy with the loss only on the response tokens and the final
eos (the prompt is context, not target). Which parameters move is chosen by the
optimiser's ``wrt`` filter: ``nnx.LoRAParam`` for adapters (base bit-identical) or
``nnx.Param`` for full pretraining.

Speed: the step is a plain ``jax.jit`` over ``nnx.split`` states (trainable / rest /
optimizer), so a step costs one XLA call; batches are padded to a few bucketed lengths
so the number of compiled shapes stays small. At a large vocabulary the lm head and
cross-entropy run only at the target positions (:func:`head_rows`), whose count is
bucketed too.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qbudget.errors import QBudgetError
from qbudget.models.text import encode_prompt, encode_response
from qbudget.padding import round_up
from qbudget.seeding import as_rng


class PairBatcher:
    """Tokenised (prompt, response) pairs sampled into fixed-size, length-bucketed batches.

    ``PairBatcher(tok, prompts, responses, batch_size, max_len)``; ``prompts`` may also be
    a list of ``(prompt, response)`` tuples with ``responses`` omitted. Sequences are
    ``encode_prompt(prompt) + tokens(response) + [eos]`` truncated to ``max_len`` (the
    prompt is cut from the left if it alone would leave no room for the answer). Each
    batch is right-padded to a multiple of ``bucket`` tokens (capped at ``max_len``).

    ``sample(rng)`` draws ``batch_size`` pairs with a numpy Generator (with replacement
    only if there are fewer pairs than ``batch_size``). ``key`` / ``seed`` give a default
    Generator for callers that do not pass one to :func:`train_steps`.
    """

    def __init__(self, tokenizer, prompts: Sequence, responses: Sequence[str] | None = None,
                 batch_size: int = 16, max_len: int = 128, bucket: int = 32, *,
                 key=None, seed: int | None = None):
        if responses is None:
            pairs = list(prompts)
            prompts = [p for p, _ in pairs]
            responses = [r for _, r in pairs]
        if len(prompts) != len(responses):
            raise QBudgetError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            raise QBudgetError("no (prompt, response) pairs to train on")
        if batch_size < 1 or max_len < 2 or bucket < 1:
            raise QBudgetError(f"bad batcher sizes: batch_size={batch_size}, max_len={max_len}, "
                               f"bucket={bucket}")
        self.batch_size, self.max_len, self.bucket = int(batch_size), int(max_len), int(bucket)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id or 0)
        self.seqs: list[np.ndarray] = []
        self.starts: list[int] = []   # index of the first target token
        for p, r in zip(prompts, responses):
            pi, ri = encode_prompt(tokenizer, p), encode_response(tokenizer, r)
            if len(pi) + len(ri) > max_len:
                keep_prompt = max(1, min(len(pi), max_len - len(ri), max_len // 2))
                keep_prompt = max(keep_prompt, max_len - len(ri))
                pi = pi[-keep_prompt:] if keep_prompt > 0 else pi[-1:]
            seq = (pi + ri)[:max_len]
            self.seqs.append(np.asarray(seq, np.int32))
            self.starts.append(len(pi))
        self.lengths = np.array([len(s) for s in self.seqs])
        if key is not None:
            seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        self.default_rng = np.random.default_rng(seed if seed is not None else 0)

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """ids / attention_mask / loss_mask [B, L] for the given pairs (L bucketed)."""
        longest = int(self.lengths[list(indices)].max())
        length = min(round_up(longest, self.bucket), self.max_len)
        b = len(indices)
        ids = np.full((b, length), self.pad_id, np.int32)
        attn = np.zeros((b, length), np.int32)
        loss = np.zeros((b, length), np.float32)
        for row, i in enumerate(indices):
            s = self.seqs[i]
            ids[row, :len(s)] = s
            attn[row, :len(s)] = 1
            loss[row, self.starts[i]:len(s)] = 1.0   # targets: response tokens and eos
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}

    def sample(self, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        rng = self.default_rng if rng is None else rng
        n = len(self.seqs)
        idx = rng.choice(n, size=self.batch_size, replace=n < self.batch_size)
        return self.batch(idx)


def make_optimizer(model, learning_rate: float, wrt=nnx.LoRAParam, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, decay_steps: int | None = None) -> nnx.Optimizer:
    """AdamW (optionally clipped) over the parameters matching ``wrt``.

    ``decay_steps``: for a run of known length (the worlds' pretraining), a 5% linear
    warm-up and a cosine decay to a tenth of ``learning_rate`` over that many steps; at a
    fixed number of steps this ends at a lower loss than a constant rate. None (the
    open-ended, warm-started distillation) keeps the rate constant.
    """
    if learning_rate <= 0:
        raise QBudgetError(f"learning_rate must be > 0, got {learning_rate}")
    if wrt is nnx.LoRAParam and not nnx.state(model, nnx.LoRAParam):
        raise QBudgetError("the model has no LoRA adapters to train; call attach_lora first")
    tx = _transformation(float(learning_rate), float(weight_decay),
                         None if not clip_norm else float(clip_norm),
                         None if not decay_steps else int(decay_steps))
    return nnx.Optimizer(model, tx, wrt=wrt)


@functools.lru_cache(maxsize=32)
def _transformation(learning_rate: float, weight_decay: float, clip_norm: float | None,
                    decay_steps: int | None) -> optax.GradientTransformation:
    """The optax transformation for these settings, one object per distinct settings.

    Why cached: the transformation (its functions) is a static part of the optimizer's
    graphdef, which the jitted training step takes as a static argument, and optax builds
    new function objects on every call. Sharing one object lets every optimizer with the
    same settings (each cell of a sweep makes its own) reuse the compiled step.
    """
    rate = learning_rate
    if decay_steps:
        rate = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps=max(1, decay_steps // 20),
            decay_steps=decay_steps, end_value=learning_rate / 10)
    tx = optax.adamw(rate, weight_decay=weight_decay)
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


def _shift_left(a):
    """``a[:, 1:]`` padded back to full length with zeros (the last position has no target)."""
    return jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)


def _target_nll(logits, input_ids, loss_mask):
    """Per-position next-token NLL ``[B, T]`` and the weight of each position's target.

    Computed at every position against the left-shifted ids, with the last position
    masked out, rather than on ``logits[:, :-1]``: slicing the [B, T, V] logits costs a
    copy forward and a zero pad backward. The target logit is picked with a one-hot
    product, which fuses with the logsumexp and its gradient (softmax - one-hot). The one
    definition of the loss: :func:`masked_ce` (training) and :func:`masked_ce_rows`
    (per-pair losses, the committee and the bandit's evidence) only reduce it.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jax.nn.one_hot(_shift_left(input_ids), logits.shape[-1], dtype=logits.dtype)
    nll = lse - jnp.sum(logits * tgt, axis=-1)
    return nll, _shift_left(loss_mask)


def masked_ce(logits, input_ids, loss_mask):
    """Mean next-token cross-entropy over positions whose *target* has loss_mask 1."""
    nll, m = _target_nll(logits, input_ids, loss_mask)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_ce_rows(logits, input_ids, loss_mask):
    """:func:`masked_ce` per row: ``[B]`` mean NLL over each sequence's target positions."""
    nll, m = _target_nll(logits, input_ids, loss_mask)
    return jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


#: Vocabularies at least this large compute the training loss's lm head only at the
#: positions whose target counts (see :func:`head_rows`); smaller ones at every position.
GATHER_HEAD_MIN_VOCAB = 32768


def head_rows(model, loss_mask) -> int | None:
    """How many rows the training step's lm head runs on, or None for every position.

    Why: only the answer's tokens are targets (the prompt is context), and at a real
    vocabulary (Qwen2.5's 151,936) the tied head and its cross-entropy are most of a
    LoRA step (~75% at 2 of 24 layers): the step gathers the hidden states of the target
    positions, padded to this bucketed count so one compiled step serves every batch
    whose count falls in the bucket (a multiple of 1/16 of the batch's positions). At a
    small vocabulary (the embedded worlds') the head is cheap and the extra compiled
    shapes would cost more than they save, so the step stays as it was. ``loss_mask`` is
    the batch's host-side [B, T] mask.
    """
    if model.spec.vocab_size < GATHER_HEAD_MIN_VOCAB:
        return None
    loss_mask = np.asarray(loss_mask)
    b, t = loss_mask.shape
    count = int(np.count_nonzero(loss_mask[:, 1:]))
    unit = max(8, round_up(b * t, 16) // 16)
    rows = max(unit, round_up(count, unit))
    return rows if rows < b * t else None


def _gathered_ce(model, h, input_ids, loss_mask, rows: int):
    """:func:`masked_ce` with the lm head applied only at the (up to ``rows``) positions
    whose target has a nonzero weight; the padding rows of the bucket weigh 0. Same value
    as the full-logits loss (float32 rounding aside)."""
    w = _shift_left(loss_mask).reshape(-1).astype(jnp.float32)
    tgt = _shift_left(input_ids).reshape(-1)
    idx = jnp.nonzero(w != 0, size=rows, fill_value=0)[0]
    valid = jnp.arange(rows) < jnp.count_nonzero(w)
    weight = jnp.where(valid, w[idx], 0.0)
    hs = h.reshape(-1, h.shape[-1])[idx]
    logits = model.logits_from_hidden(hs).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    onehot = jax.nn.one_hot(tgt[idx], logits.shape[-1], dtype=logits.dtype)
    nll = lse - jnp.sum(logits * onehot, axis=-1)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(w), 1.0)


def loss_fn(model, batch, rows: int | None = None):
    """The masked next-token loss; ``rows`` (from :func:`head_rows`) computes the lm head
    only at the target positions, gathered into that many rows."""
    if rows is None:
        logits = model.forward(batch["input_ids"], batch["attention_mask"])
        return masked_ce(logits, batch["input_ids"], batch["loss_mask"])
    h = model.forward_hidden(batch["input_ids"], batch["attention_mask"])
    return _gathered_ce(model, h, batch["input_ids"], batch["loss_mask"], rows)


@functools.partial(jax.jit, static_argnums=0)
def _loss_jit(graphdef, state, batch):
    return loss_fn(nnx.merge(graphdef, state), batch)


def batch_loss(model, batch: dict) -> float:
    """The masked next-token loss of ``model`` on one batch (jitted, no update)."""
    graphdef, state = nnx.split(model)
    return float(_loss_jit(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 6))
def _step(model_def, opt_def, wrt, rows, trainable, rest, opt_state, batch):
    def f(tr):
        return loss_fn(nnx.merge(model_def, tr, rest), batch, rows)

    loss, grads = jax.value_and_grad(f)(trainable)
    model = nnx.merge(model_def, trainable, rest)
    opt = nnx.merge(opt_def, opt_state)
    opt.update(model, grads)
    return nnx.state(model, wrt), nnx.state(opt), loss


def train_steps(model, optimizer: nnx.Optimizer, batcher: PairBatcher, steps: int,
                key_or_rng=None, *, rng=None) -> np.ndarray:
    """Run ``steps`` optimiser steps on batches from ``batcher``; returns the losses.

    Batches are drawn with ``rng`` (a numpy Generator; a jax key or int seed is turned
    into one; None = the batcher's own Generator). The model and optimizer are updated in
    place; parameters outside the optimizer's ``wrt`` filter are not touched.
    """
    rng = as_rng(rng if rng is not None else key_or_rng)
    wrt = optimizer.wrt
    model_def, trainable, rest = nnx.split(model, wrt, ...)
    opt_def, opt_state = nnx.split(optimizer)
    losses = []
    for _ in range(int(steps)):
        sample = batcher.sample(rng)
        rows = head_rows(model, sample["loss_mask"])
        batch = {k: jnp.asarray(v) for k, v in sample.items()}
        trainable, opt_state, loss = _step(model_def, opt_def, wrt, rows, trainable, rest,
                                           opt_state, batch)
        losses.append(loss)
    nnx.update(model, trainable)
    nnx.update(optimizer, opt_state)
    return np.asarray(jax.device_get(losses), dtype=np.float32).reshape(-1)
