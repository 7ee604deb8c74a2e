"""LoRA adapters and training: identity at init, frozen base, merge, PEFT format parity."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

# transformers' config classes need no torch; the PEFT parity test asks for torch and peft
# through fixtures (skipped without them), so every JAX-only test here always runs.
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qbudget.errors import QBudgetError
from qbudget.models import CausalLM, load_tokenizer
from qbudget.models.lora import attach_lora, load_adapter, merge_lora, save_adapter
from qbudget.models.text import encode_prompt
from qbudget.models.train import PairBatcher, make_optimizer, train_steps

PROMPTS = ["what is the cat", "why a big dog", "how the mat", "what is red", "is blue a big dog"]
ANSWERS = ["the cat sat on a mat", "yes big dog ran fast", "no", "red and blue",
           "no small green dog"]


def config(kind="llama", vocab=38):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def peft(torch):
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def params(model):
    return {k: np.array(v) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            if "lora" not in jax.tree_util.keystr(k)}


def ids_batch():
    return np.random.default_rng(0).integers(3, 38, (3, 12))


def test_fresh_adapters_leave_logits_unchanged():
    model = CausalLM.from_config(config(), key=jax.random.key(0))
    ids = ids_batch()
    before = np.asarray(model(ids))
    attach_lora(model, rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"),
                key=jax.random.key(1))
    assert np.array_equal(np.asarray(model(ids)), before)
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 2 * 7 * 2


def test_pair_batcher_masks_only_response(tok):
    b = PairBatcher(tok, PROMPTS, ANSWERS, batch_size=4, max_len=40, bucket=8)
    batch = b.batch([0, 2])
    assert batch["input_ids"].shape == (2, 16)   # longest pair 11 tokens -> bucket 16
    p = encode_prompt(tok, PROMPTS[0])
    r = tok.encode(ANSWERS[0], add_special_tokens=False) + [tok.eos_token_id]
    row = batch["input_ids"][0]
    assert row[:len(p) + len(r)].tolist() == p + r
    assert batch["loss_mask"][0].tolist() == [0] * len(p) + [1] * len(r) + [0] * (16 - len(p) - len(r))
    assert batch["attention_mask"][0].sum() == len(p) + len(r)
    # same generator seed -> same batches
    a1 = b.sample(np.random.default_rng(3))["input_ids"]
    assert np.array_equal(a1, b.sample(np.random.default_rng(3))["input_ids"])
    # pairs form and truncation keep some response
    short = PairBatcher(tok, list(zip(PROMPTS, ANSWERS)), batch_size=2, max_len=6, bucket=4)
    for i in range(len(short)):
        bt = short.batch([i])
        assert bt["attention_mask"].sum() <= 6 and bt["loss_mask"].sum() >= 1
    with pytest.raises(QBudgetError):
        PairBatcher(tok, PROMPTS, ANSWERS[:2], batch_size=2, max_len=8)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lora_training_lowers_loss_and_keeps_base_bit_identical(tok, kind):
    model = CausalLM.from_config(config(kind), key=jax.random.key(2))
    base = params(model)
    attach_lora(model, rank=4, alpha=16, key=jax.random.key(3))
    batcher = PairBatcher(tok, PROMPTS, ANSWERS, batch_size=5, max_len=32)
    fixed = batcher.batch(range(5))
    from qbudget.models.train import batch_loss

    loss0 = batch_loss(model, fixed)
    opt = make_optimizer(model, 1e-2)
    losses = train_steps(model, opt, batcher, 12, rng=np.random.default_rng(0))
    assert losses.shape == (12,) and np.all(np.isfinite(losses))
    assert batch_loss(model, fixed) < loss0 - 0.05
    after = params(model)
    assert base.keys() == after.keys()
    assert all(np.array_equal(base[k], after[k]) for k in base)
    # merging folds the adapters in without changing the function
    ids = fixed["input_ids"]
    with_lora = np.asarray(model(ids))
    merge_lora(model)
    assert not nnx.state(model, nnx.LoRAParam)
    assert np.abs(np.asarray(model(ids)) - with_lora).max() <= 1e-5


@pytest.mark.parametrize("wrt", ["lora", "full"])
def test_target_only_head_trains_exactly_like_the_full_head(tok, monkeypatch, wrt):
    """At a real vocabulary the step runs the lm head only at the target positions
    (``head_rows``); forced on for a tiny model, it must give the full-head step's losses
    and parameters (same arithmetic on fewer rows), for adapters and full training."""
    from qbudget.models import train

    def trained(gather: bool):
        monkeypatch.setattr(train, "GATHER_HEAD_MIN_VOCAB", 0 if gather else 10**9)
        model = CausalLM.from_config(config("qwen2"), key=jax.random.key(6))
        if wrt == "lora":
            attach_lora(model, rank=4, alpha=16, key=jax.random.key(7))
        opt = make_optimizer(model, 1e-2, wrt=nnx.LoRAParam if wrt == "lora" else nnx.Param)
        batcher = PairBatcher(tok, PROMPTS, ANSWERS, batch_size=5, max_len=32)
        rows = train.head_rows(model, batcher.batch(range(5))["loss_mask"])
        losses = train_steps(model, opt, batcher, 6, rng=np.random.default_rng(0))
        leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return rows, losses, [np.asarray(x) for x in leaves]

    rows, gathered, g_params = trained(True)
    no_rows, full, f_params = trained(False)
    mask = PairBatcher(tok, PROMPTS, ANSWERS, batch_size=5, max_len=32).batch(range(5))["loss_mask"]
    assert no_rows is None and rows is not None
    assert np.count_nonzero(mask[:, 1:]) <= rows < mask.size   # fewer rows, every target kept
    np.testing.assert_allclose(gathered, full, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(g_params, f_params)) <= 1e-5


def test_full_training_moves_all_params(tok):
    model = CausalLM.from_config(config(), key=jax.random.key(4))
    batcher = PairBatcher(tok, PROMPTS, ANSWERS, batch_size=5, max_len=32)
    before = params(model)
    opt = make_optimizer(model, 3e-3, wrt=nnx.Param)
    losses = train_steps(model, opt, batcher, 8, jax.random.key(0))   # a jax key also works
    assert losses[-1] < losses[0]
    after = params(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_decayed_schedule_warms_up_from_zero_then_trains(tok):
    # the worlds' pretraining schedule: linear warm-up from 0, cosine decay over the run
    model = CausalLM.from_config(config(), key=jax.random.key(4))
    batcher = PairBatcher(tok, PROMPTS, ANSWERS, batch_size=5, max_len=32)
    before = params(model)
    opt = make_optimizer(model, 3e-3, wrt=nnx.Param, decay_steps=40)
    train_steps(model, opt, batcher, 1, rng=np.random.default_rng(0))
    first = params(model)
    assert all(np.array_equal(before[k], first[k]) for k in before)   # step 0 has rate 0
    losses = train_steps(model, opt, batcher, 39, rng=np.random.default_rng(1))
    assert losses[-5:].mean() < losses[:5].mean()
    after = params(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_optimizer_needs_adapters():
    model = CausalLM.from_config(config(), key=jax.random.key(0))
    with pytest.raises(QBudgetError, match="attach_lora"):
        make_optimizer(model, 1e-3)


@pytest.mark.parametrize("kind,targets", [("llama", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                          ("qwen2", ("q_proj", "v_proj", "up_proj", "down_proj"))])
def test_peft_adapter_matches_torch(tmp_path, kind, targets, torch, peft):
    model = CausalLM.from_config(config(kind), key=jax.random.key(5))
    model.save_pretrained(tmp_path / "base")
    attach_lora(model, rank=4, alpha=12, targets=targets, key=jax.random.key(6))
    # random B so the adapter actually changes the function
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["peft_type"] == "LORA"

    torch_cls = Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM
    tm = peft.PeftModel.from_pretrained(torch_cls.from_pretrained(str(tmp_path / "base")),
                                        str(tmp_path / "adapter")).eval()
    # A projection applies its adapter as x @ (W + s A B) on many rows and as
    # x W + s (x A) B on few (fewer rows than its width): 5 rows take the second form
    # everywhere, 96 the first, 36 a mix. Each must match peft.
    for shape in [(1, 5), (4, 24), (3, 12)]:
        ids = np.random.default_rng(1).integers(3, 38, shape)
        with torch.no_grad():
            ref = tm(torch.tensor(ids)).logits.numpy()
        assert np.abs(np.asarray(model(ids)) - ref).max() <= 1e-4, shape
    ours = np.asarray(model(ids))
    plain = np.asarray(CausalLM.from_pretrained(tmp_path / "base")(ids))
    assert np.abs(ours - plain).max() > 1e-3      # the adapter matters

    # and it loads back into a fresh base
    fresh = load_adapter(CausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert np.abs(np.asarray(fresh(ids)) - ours).max() <= 1e-6


def test_adapter_refusals(tmp_path):
    model = CausalLM.from_config(config(), key=jax.random.key(0))
    with pytest.raises(QBudgetError, match="no LoRA adapters"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(QBudgetError, match="not a PEFT adapter"):
        load_adapter(model, tmp_path)
    with pytest.raises(QBudgetError, match="target module"):
        attach_lora(model, targets=("qkv",), key=jax.random.key(0))
    attach_lora(model, rank=4, key=jax.random.key(0))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(QBudgetError, match="already has LoRA"):
        attach_lora(model, key=jax.random.key(0))
    other = attach_lora(CausalLM.from_config(config(), key=jax.random.key(0)), rank=2,
                        key=jax.random.key(0))
    with pytest.raises(QBudgetError, match="does not match"):
        load_adapter(other, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QBudgetError, match="use_dora"):
        load_adapter(CausalLM.from_config(config(), key=jax.random.key(0)), tmp_path / "a")


def test_vmapped_committee_over_one_frozen_base():
    """The documented pure forward: K LoRA states stacked on axis 0, one shared base."""
    import functools

    import jax.numpy as jnp

    from qbudget.models.decoder import apply, split_lora

    members = []
    for seed in (1, 2):
        m = CausalLM.from_config(config(), key=jax.random.key(0))
        attach_lora(m, rank=2, key=jax.random.key(seed))
        lora = nnx.state(m, nnx.LoRAParam)
        nnx.update(m, jax.tree.map(lambda x: x + 0.3, lora))   # make B non-zero
        members.append(m)
    graphdef, _, base = split_lora(members[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[split_lora(m)[1] for m in members])
    ids = jnp.asarray(ids_batch())
    mask = jnp.ones_like(ids)
    fwd = functools.partial(apply, graphdef)
    out = jax.jit(jax.vmap(fwd, in_axes=(0, None, None, None)))(stacked, base, ids, mask)
    assert out.shape == (2, 3, 12, 38)
    for k, m in enumerate(members):
        assert np.abs(np.asarray(out[k]) - np.asarray(m(ids))).max() <= 1e-5
    assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3
