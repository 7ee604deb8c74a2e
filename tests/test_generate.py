"""Generation: greedy parity with transformers' generate, seeded sampling, text API."""

from __future__ import annotations

import jax
import numpy as np
import pytest

# transformers' config classes need no torch; only the parity test with transformers'
# generate asks for the ``torch`` fixture (skipped without it), the rest always run.
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qbudget.errors import QBudgetError
from qbudget.models import CausalLM, load_tokenizer
from qbudget.models.generate import generate, generate_text, nucleus_mask
from qbudget.models.text import encode_prompt
from qbudget.reductions import first_argmax

VOCAB = 38


def make(kind: str, tied: bool, seed: int, eos: int = 2) -> CausalLM:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=eos, pad_token_id=0, rope_theta=1000.0,
                  initializer_range=0.3)   # large init: peaky, diverse greedy continuations
    cfg = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    return CausalLM.from_config(cfg, key=jax.random.key(seed))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def hf_greedy(folder, torch_cls, prompts, max_new, eos, pad=0):
    import torch

    tm = torch_cls.from_pretrained(str(folder)).eval()
    p = max(map(len, prompts))
    ids = np.full((len(prompts), p), pad)
    mask = np.zeros_like(ids)
    for i, row in enumerate(prompts):
        ids[i, p - len(row):] = row
        mask[i, p - len(row):] = 1
    with torch.no_grad():
        out = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                          pad_token_id=pad)[:, p:].tolist()
    return [row[:row.index(eos)] if eos in row else row for row in out]


@pytest.mark.parametrize("kind,tied,cls", [("llama", False, LlamaForCausalLM),
                                           ("qwen2", True, Qwen2ForCausalLM)])
def test_greedy_matches_transformers_generate(tmp_path, kind, tied, cls, torch):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (3, 9, 1, 17, 6)]
    model = make(kind, tied, seed=11)
    # pick an eos that some row actually produces mid-way, so early stopping is exercised
    free = generate(model, prompts, max_new_tokens=12, eos_token_id=-1)
    eos = free[1][4]
    model.config.eos_token_id = eos
    model.save_pretrained(tmp_path)
    ours = generate(model, prompts, max_new_tokens=12)
    assert ours == hf_greedy(tmp_path, cls, prompts, 12, eos)
    assert len(ours[1]) <= 4 and any(len(r) == 12 for r in ours)
    # batch composition and batch size do not change greedy output
    assert generate(model, prompts, max_new_tokens=12, batch_size=2) == ours
    assert model.generate([prompts[3]], max_new_tokens=12) == [ours[3]]


@pytest.mark.slow
def test_sampling_is_per_row_seeded_and_top_p_narrows():
    model = make("llama", False, seed=3, eos=-1)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (4, 7, 2, 11)]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = generate(model, prompts, seeds=[5, 6, 7, 8], **kw)
    assert a == generate(model, prompts, seeds=[5, 6, 7, 8], **kw)
    # a prompt's sample depends on its seed only, not its batch-mates or batch boundaries
    assert generate(model, prompts[2:], seeds=[7, 8], **kw) == a[2:]
    assert generate(model, prompts, seeds=[5, 6, 7, 8], batch_size=1, **kw) == a
    assert generate(model, prompts, seeds=[9, 6, 7, 8], **kw)[0] != a[0]
    # a tiny nucleus keeps only the top token: sampling becomes greedy
    greedy = generate(model, prompts, max_new_tokens=10)
    assert generate(model, prompts, temperature=1.0, top_p=1e-6, seeds=[1, 2, 3, 4],
                    max_new_tokens=10) == greedy
    # high temperature really samples (differs from greedy somewhere)
    assert generate(model, prompts, temperature=2.0, seeds=[1, 2, 3, 4],
                    max_new_tokens=10) != greedy


def _nucleus_by_argsort(logits, top_p):
    """The textbook nucleus: stable sort by logit, keep ranks whose preceding mass < top_p.
    Also returns each token's preceding mass (in its own position)."""
    import jax.numpy as jnp

    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(before < top_p)
    return keep, jnp.zeros_like(logits).at[rows, order].set(before)


def test_nucleus_mask_equals_sort_and_scatter_including_ties():
    """The threshold search keeps the textbook nucleus; the two may differ only on a token
    whose preceding mass equals top_p to within float rounding (they sum in other orders)."""
    rng = np.random.default_rng(0)
    ours, ref = jax.jit(nucleus_mask), jax.jit(_nucleus_by_argsort)
    differing = 0
    for trial in range(60):
        vocab = int(rng.choice([5, 64, 1024]))
        x = rng.standard_normal((16, vocab)).astype(np.float32) * float(rng.choice([0.3, 3, 30]))
        if trial % 2:
            x = np.round(x).astype(np.float32)   # many exact ties, also at the boundary
        x[:, :2] = 0.0
        x[:, 2] = -0.0
        x[0, 3:] = -np.inf                        # a row with masked tokens
        for top_p in (0.05, 0.5, 0.9, 0.95, 0.99):
            got, (want, before) = np.asarray(ours(x, top_p)), map(np.asarray, ref(x, top_p))
            off = got != want
            assert (np.abs(before[off] - top_p) <= 1e-6).all(), (trial, top_p)
            differing += int(off.sum())
            assert got.any(axis=1).all()             # the top token is always kept
            # the kept set is a prefix of the ranking: nothing kept below a dropped logit
            dropped_max = np.where(got, -np.inf, x).max(axis=1)
            assert (np.where(got, x, np.inf).min(axis=1) >= dropped_max).all()
    assert differing <= 5, differing


def test_sampling_draws_the_tokens_jax_random_categorical_draws():
    """The sampler's gumbel-plus-first_argmax is jax.random.categorical's own recipe with
    a faster argmax: same keys, same tokens (nucleus-masked -inf logits included)."""
    from qbudget.models.generate import _sample

    rng = np.random.default_rng(5)
    keys = jax.vmap(jax.random.key)(np.arange(32))
    for step in range(6):
        logits = rng.standard_normal((32, 257)).astype(np.float32) * 4
        logits[rng.random(logits.shape) < 0.3] = -np.inf
        logits[:, 0] = 1.0
        got = _sample(logits, keys, step, 0.7, 0.9, greedy=False, nucleus=True)
        masked = np.where(nucleus_mask(logits / np.float32(0.7), 0.9), logits / np.float32(0.7),
                          -np.inf)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        want = jax.vmap(jax.random.categorical)(step_keys, masked)
        assert (np.asarray(got) == np.asarray(want)).all(), step


def test_first_argmax_equals_argmax_with_ties_nan_and_inf():
    rng = np.random.default_rng(1)
    ours, ref = jax.jit(first_argmax), jax.jit(lambda x: jax.numpy.argmax(x, axis=-1))
    for trial in range(40):
        vocab = int(rng.choice([1, 7, 2048]))
        x = rng.standard_normal((12, vocab)).astype(np.float32)
        if trial % 2:
            x = np.round(x).astype(np.float32)        # exact ties for the maximum
        x[0] = -np.inf                                # all -inf: index 0
        x[1, rng.integers(vocab)] = np.inf
        x[2, rng.integers(vocab, size=2)] = np.nan    # first NaN wins, as in argmax
        x[3, -1] = np.inf
        got, want = np.asarray(ours(x)), np.asarray(ref(x))
        assert got.dtype == np.int32 and (got == want).all(), trial
        finite = x[4:]                                # rows without NaN: the fast path agrees
        got = np.asarray(jax.jit(lambda a: first_argmax(a, nan_free=True))(finite))
        assert (got == np.asarray(ref(finite))).all(), trial


def test_generate_text_uses_encode_prompt(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = make("llama", False, seed=4, eos=tok.eos_token_id)
    prompts = ["what is the cat", "hello", "why big dog ran fast and slow"]
    texts = generate_text(model, tok, prompts, max_new_tokens=6)
    ids = generate(model, [encode_prompt(tok, p) for p in prompts], max_new_tokens=6,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert texts == [tok.decode(t, skip_special_tokens=True) for t in ids]
    assert all(isinstance(t, str) for t in texts)
    assert generate_text(model, tok, [], max_new_tokens=6) == []


def test_encode_prompt_formats(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny_tokenizer

    plain = load_tokenizer(build_tiny_tokenizer(tmp_path / "plain"))
    assert plain.padding_side == "left" and plain.pad_token == "<pad>"
    assert encode_prompt(plain, "the cat") == [plain.bos_token_id] + plain.encode(
        "the cat\n", add_special_tokens=False)
    template = ("{{ bos_token }}{% for m in messages %}question {{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %} answer{% endif %}")
    chat = load_tokenizer(build_tiny_tokenizer(tmp_path / "chat", chat_template=template))
    assert chat.decode(encode_prompt(chat, "the cat")) == "<bos> question the cat answer"


def test_generate_refusals():
    model = make("llama", False, seed=0)
    with pytest.raises(QBudgetError, match="seeds"):
        generate(model, [[3, 4]], seeds=[1, 2])
    with pytest.raises(QBudgetError, match="empty prompt"):
        generate(model, [[]])
    with pytest.raises(QBudgetError, match="top_p"):
        generate(model, [[3]], temperature=1.0, top_p=0.0)
