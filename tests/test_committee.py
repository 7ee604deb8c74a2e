"""LoRA committee: training on bootstrap resamples, and its disagreement measures.

Also home of :func:`tiny_student`, the tiny random CausalLM + tokenizer the model-based
strategy tests share (imported by test_strategies.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qbudget import signals

WORDS = ("alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(n)]


def tiny_student(folder, seed: int = 0):
    """A random 1-layer Llama-style CausalLM with LoRA attached, and a trained BPE tokenizer."""
    from transformers import LlamaConfig

    from qbudget.models import CausalLM
    from qbudget.models.lora import attach_lora
    from qbudget.models.text import load_tokenizer
    from qbudget.worlds.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(make_texts(400, seed=99) + WORDS * 3, vocab_size=160)
    save_tokenizer(tok, folder, model_max_length=64)
    tokenizer = load_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=128, tie_word_embeddings=True)
    lm = CausalLM.from_config(cfg, key=jax.random.key(seed))
    attach_lora(lm, rank=4, alpha=8, key=jax.random.key(seed + 1))
    return lm, tokenizer


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny"))


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def test_members_differ_after_training_and_student_untouched(student):
    lm, tok = student
    before = signals.lora_snapshot(lm)
    prompts, answers = make_texts(12, 1), make_texts(12, 2)
    stacked, losses = signals.train_committee(lm, tok, prompts, answers, members=3, steps=6,
                                              batch_size=4, learning_rate=1e-2, key=jax.random.key(0))
    leaves = _leaves(stacked)
    assert all(a.shape[0] == 3 for a in leaves)
    for m in (1, 2):
        assert any(not np.allclose(a[0], a[m]) for a in leaves), f"member {m} equals member 0"
    # members moved away from the student's adapters, which stay as they were
    assert any(not np.allclose(a[0], b) for a, b in zip(leaves, before))
    for a, b in zip(signals.lora_snapshot(lm), before):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(losses).all() and losses.shape == (3,)
    # deterministic per key
    again, _ = signals.train_committee(lm, tok, prompts, answers, members=3, steps=6,
                                       batch_size=4, learning_rate=1e-2, key=jax.random.key(0))
    for a, b in zip(leaves, _leaves(again)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_identical_members_have_zero_disagreement(student):
    lm, tok = student
    _, lora, _ = signals.split_student(lm)
    texts = make_texts(8, 3)
    res = signals.committee_scores(lm, tok, signals.stack_members(lora, 3), texts, tokens=2)
    assert res["js"].shape == (8,)
    np.testing.assert_allclose(res["js"], 0.0, atol=1e-6)
    np.testing.assert_array_equal(res["vote_entropy"], 0.0)


def _reference_scores(lm, stacked, tok, texts, tokens):
    """Full-sequence forwards (no KV cache) along the greedy mean continuation, in numpy."""
    graphdef, _, rest = signals.split_student(lm)
    ids, mask, _ = signals.left_padded(tok, texts)
    members = jax.tree.leaves(stacked)[0].shape[0]
    js, ve, live = np.zeros(len(texts)), np.zeros(len(texts)), np.zeros(len(texts))
    alive = np.ones(len(texts), bool)
    for _ in range(tokens):
        p = []
        for m in range(members):
            member = jax.tree.map(lambda a: a[m], stacked)
            logits = nnx.merge(graphdef, member, rest)(jnp.asarray(ids), jnp.asarray(mask))[:, -1]
            p.append(np.asarray(jax.nn.softmax(logits.astype(jnp.float32), -1), np.float64))
        p = np.stack(p)
        pbar = p.mean(0)
        kl = (p * (np.log(p) - np.log(pbar))).sum(-1).mean(0)        # mean KL to the mean
        votes = p.argmax(-1)
        vote_h = []
        for col in votes.T:
            _, c = np.unique(col, return_counts=True)
            f = c / c.sum()
            vote_h.append(-(f * np.log(f)).sum())
        js += kl * alive
        ve += np.asarray(vote_h) * alive
        live += alive
        nxt = pbar.argmax(-1)
        alive &= nxt != tok.eos_token_id
        ids = np.concatenate([ids, nxt[:, None].astype(np.int32)], axis=1)
        mask = np.concatenate([mask, np.ones((len(texts), 1), np.int32)], axis=1)
    return js / live, ve / live


@pytest.mark.slow
def test_js_is_mean_kl_to_mean_along_the_continuation(student):
    lm, tok = student
    stacked, _ = signals.train_committee(lm, tok, make_texts(12, 4), make_texts(12, 5), members=3,
                                         steps=6, batch_size=4, learning_rate=3e-2,
                                         key=jax.random.key(1))
    texts = make_texts(8, 6)
    res = signals.committee_scores(lm, tok, stacked, texts, tokens=2)
    js, ve = _reference_scores(lm, stacked, tok, texts, tokens=2)
    np.testing.assert_allclose(res["js"], js, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(res["vote_entropy"], ve, atol=1e-5)
    assert (res["js"] > 0).all()


@pytest.mark.slow
def test_disagreement_signal_is_seeded_and_absent_before_any_purchase(student):
    from test_strategies import model_context

    lm, tok = student
    ctx0 = model_context(lm, tok, n_bought=0)
    assert signals.compute_signals(["disagreement[members=3,candidates=8,steps=2]"], ctx0,
                                   jax.random.key(0))["disagreement"] is None
    ctx = model_context(lm, tok, n_bought=10)
    spec = "disagreement[members=3,candidates=16,tokens=2,steps=2]"
    a = signals.compute_signals([spec], ctx, jax.random.key(0))["disagreement"]
    b = signals.compute_signals([spec], ctx, jax.random.key(0))["disagreement"]
    assert a.indices.size == 16 and not ctx.bought_mask[a.indices].any()
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.values["js"], b.values["js"], rtol=1e-5, atol=1e-7)
    c = signals.compute_signals([spec], ctx, jax.random.key(1))["disagreement"]
    assert not np.array_equal(a.indices, c.indices)
