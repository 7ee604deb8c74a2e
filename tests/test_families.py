"""Model families (llama incl. Llama 3.x, mistral, qwen2, qwen3) and rotary variants
(default, linear, dynamic, llama3, yarn): logit, greedy-generation and PEFT-adapter parity
with transformers' PyTorch models, and the refusals of what is not computed."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

# transformers' config classes need no torch; the parity tests ask for it through fixtures.
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from qbudget.errors import QBudgetError
from qbudget.models import CausalLM
from qbudget.models.checkpoint import hf_to_path, path_to_hf
from qbudget.models.families import FAMILIES, SUPPORTED_MODEL_TYPES
from qbudget.models.generate import generate
from qbudget.models.lora import ALL_TARGETS, attach_lora, save_adapter
from qbudget.models.rope import SUPPORTED_ROPE_TYPES, rope_from_config

pytestmark = pytest.mark.torch_parity

VOCAB = 128
MAX_POS = 64

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 2.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}

#: (id, config class, extra config fields): each keeps its family's distinguishing features.
CASES = [
    ("llama", LlamaConfig, {}),
    ("llama-bias", LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    ("llama3", LlamaConfig, {"rope_scaling": LLAMA3, "rope_theta": 10000.0}),
    ("llama-linear", LlamaConfig, {"rope_scaling": LINEAR}),
    ("llama-dynamic", LlamaConfig, {"rope_scaling": DYNAMIC}),
    ("llama-yarn", LlamaConfig, {"rope_scaling": YARN}),
    ("mistral", MistralConfig, {"sliding_window": MAX_POS}),   # a window nothing can exceed
    ("mistral-nowindow", MistralConfig, {"sliding_window": None, "head_dim": 24}),
    ("qwen2", Qwen2Config, {"tie_word_embeddings": True}),
    ("qwen2-yarn", Qwen2Config, {"rope_scaling": YARN}),
    ("qwen3", Qwen3Config, {"head_dim": 24, "tie_word_embeddings": True}),
    ("qwen3-yarn", Qwen3Config, {"head_dim": 24, "rope_scaling": YARN, "attention_bias": True}),
]


def make_config(cls, extra, init=0.02):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, initializer_range=init)
    kw.update(extra)
    return cls(**kw)


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="module")
def peft(torch):
    return pytest.importorskip("peft")


def torch_model(torch, cls, extra, seed, init=0.02):
    """transformers' model with every parameter random (norms and biases included)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tm = AutoModelForCausalLM.from_config(make_config(cls, extra, init),
                                          attn_implementation="eager")
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return tm.eval()


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def saved(request, torch, tmp_path_factory):
    """(case id, transformers model, folder it saved, our model loaded from it)."""
    name, cls, extra = request.param
    tm = torch_model(torch, cls, extra, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    tm.save_pretrained(str(folder))
    assert (folder / "model.safetensors").is_file()
    return name, tm, folder, CausalLM.from_pretrained(folder)


def padded_batch(rng, lengths, total):
    ids = rng.integers(3, VOCAB, (len(lengths), total))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, total - n:] = 1
        ids[i, :total - n] = 0
    return ids, mask


def torch_logits(tm, ids, mask):
    import torch

    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return tm(torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.numpy()


def max_real_diff(ours, ref, mask):
    return float(np.abs(ours - ref)[mask.astype(bool)].max())


def test_logit_parity_with_transformers(saved):
    name, tm, _, model = saved
    # 48 positions: past the llama3 / yarn original_max_position_embeddings (32 / 16)
    ids, mask = padded_batch(np.random.default_rng(0), [48, 30, 7], 48)
    ours = np.asarray(model(ids, mask))
    assert ours.shape == (3, 48, VOCAB)
    assert max_real_diff(ours, torch_logits(tm, ids, mask), mask) <= 1e-4, name
    # the features the case is about are really in the model we built
    spec = model.spec
    assert spec.model_type == tm.config.model_type
    assert spec.qk_norm == (spec.model_type == "qwen3")
    if "bias" in name:
        assert spec.qkv_bias and spec.o_bias and spec.mlp_bias
    if spec.model_type == "qwen2":
        assert spec.qkv_bias and not spec.o_bias
    if spec.model_type == "qwen3":
        assert spec.head_dim == 24 != spec.hidden_size // spec.num_heads
    rope_type = tm.config.rope_parameters["rope_type"]
    assert spec.rope_type == rope_type
    assert (spec.rope_inv_freq is None) == (rope_type == "default")
    if rope_type == "yarn":
        assert spec.rope_attention_scale > 1.0


def test_inverse_frequencies_match_transformers(saved, torch):
    """The host-side tables equal transformers' rotary buffers (and, for llama3, hit all
    three bands: kept, smoothed and scaled)."""
    _, tm, _, model = saved
    rot = tm.model.rotary_emb
    spec = model.spec
    if spec.rope_inv_freq is not None:
        np.testing.assert_allclose(np.asarray(spec.rope_inv_freq, np.float32),
                                   rot.inv_freq.numpy(), rtol=1e-6)
    assert spec.rope_attention_scale == pytest.approx(rot.attention_scaling, rel=1e-12)
    if spec.rope_type == "llama3":
        from qbudget.models.rope import _default_inv_freq

        plain = _default_inv_freq(spec.rope_theta, spec.head_dim)
        ratio = plain / np.asarray(spec.rope_inv_freq, np.float32)
        assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_peft_adapter_matches_torch(saved, tmp_path, torch, peft):
    """All seven projections adapted, random nonzero B: PEFT on transformers' model
    reproduces our logits, which differ from the base model's."""
    name, tm, folder, _ = saved
    model = CausalLM.from_pretrained(folder)
    attach_lora(model, rank=4, alpha=8, targets=ALL_TARGETS, key=jax.random.key(1))
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    save_adapter(model, tmp_path / "adapter", str(folder))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    rng = np.random.default_rng(3)
    # 2x20 rows take the skinny LoRA form on the widest projections, 3x40 the merged one
    for lengths, total in (([20, 13], 20), ([40, 40, 25], 40)):
        ids, mask = padded_batch(rng, lengths, total)
        ours = np.asarray(model(ids, mask))
        assert max_real_diff(ours, torch_logits(pm, ids, mask), mask) <= 1e-4, (name, total)
    plain = np.asarray(CausalLM.from_pretrained(folder)(ids, mask))
    assert max_real_diff(ours, plain, mask) > 1e-3


GREEDY = [c for c in CASES if c[0] in ("llama", "llama3", "llama-yarn", "llama-dynamic",
                                       "mistral", "qwen2", "qwen2-yarn", "qwen3")]


@pytest.mark.parametrize("name,cls,extra", GREEDY, ids=[c[0] for c in GREEDY])
def test_greedy_matches_transformers_generate(name, cls, extra, tmp_path, torch):
    tm = torch_model(torch, cls, extra, seed=7, init=0.3)   # peaky: no near-ties
    tm.save_pretrained(str(tmp_path))
    model = CausalLM.from_pretrained(tmp_path)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (5, 20, 1, 12)]
    new = 24   # 20 + 24 positions: past original_max_position_embeddings of llama3 / yarn
    ours = generate(model, prompts, max_new_tokens=new, eos_token_id=-1)
    p = max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(prompts):
        ids[i, p - len(row):] = row
        mask[i, p - len(row):] = 1
    with torch.no_grad():
        ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, p:].tolist()
    assert ours == ref
    assert len({tuple(r) for r in ours}) == len(ours)   # not a degenerate constant output


# -- the family table ---------------------------------------------------------------------------


def test_family_table_and_key_maps():
    assert SUPPORTED_MODEL_TYPES == ("llama", "qwen2", "qwen3", "mistral")
    assert {f.architecture for f in FAMILIES.values()} == {
        "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}
    assert FAMILIES["qwen3"].qk_norm and not FAMILIES["qwen2"].qk_norm
    assert "head_dim" in FAMILIES["qwen3"].fields
    key = "model.layers.3.self_attn.k_norm.weight"
    path, transpose = hf_to_path(key, "qwen3")
    assert path == ("model", "layers", 3, "self_attn", "k_norm", "scale") and not transpose
    assert path_to_hf(path, "qwen3") == (key, False)
    assert hf_to_path(key, "qwen2") is None and hf_to_path(key, "llama") is None


def test_qwen3_checkpoint_has_qk_norms_and_round_trips(tmp_path):
    model = CausalLM.from_config(make_config(Qwen3Config, {"head_dim": 24}), key=jax.random.key(0))
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.self_attn.q_norm.weight").shape == (24,)
    assert "model.layers.0.self_attn.k_norm.weight" in keys
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "Qwen3ForCausalLM"]
    ids = np.arange(1, 11)[None]
    again = CausalLM.from_pretrained(tmp_path)
    assert np.array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_default_rope_tables_unchanged():
    """rope_type default takes the in-graph path it always took (bit-identical worlds)."""
    import jax.numpy as jnp

    from qbudget.models.decoder import rope_tables

    spec = CausalLM.from_config(make_config(LlamaConfig, {"rope_theta": 500.0}),
                                key=jax.random.key(0)).spec
    assert spec.rope_type == "default" and spec.rope_inv_freq is None
    assert spec.rope_attention_scale == 1.0 and spec.rope_max_len is None

    def before(positions, head_dim, theta):   # rope_tables as it was before rope variants
        inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        ang = positions.astype(jnp.float32)[..., None] * inv
        ang = jnp.concatenate([ang, ang], axis=-1)
        return jnp.cos(ang), jnp.sin(ang)

    pos = jnp.arange(300)[None]
    now = jax.make_jaxpr(lambda p: rope_tables(p, 16, 500.0, spec.rope_inv_freq,
                                               spec.rope_attention_scale))(pos)
    assert str(now) == str(jax.make_jaxpr(lambda p: before(p, 16, 500.0))(pos))
    got = jax.jit(lambda p: rope_tables(p, 16, 500.0))(pos)
    ref = jax.jit(lambda p: before(p, 16, 500.0))(pos)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, ref))


# -- refusals -----------------------------------------------------------------------------------


def _folder(tmp_path, cls=LlamaConfig, extra=None):
    model = CausalLM.from_config(make_config(cls, extra or {}), key=jax.random.key(0))
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_refuses_unknown_model_type(tmp_path):
    folder = _folder(tmp_path)
    _edit(folder, model_type="gemma")
    with pytest.raises(QBudgetError, match=r"model_type 'gemma'.*supported: llama, qwen2, "
                                           r"qwen3, mistral"):
        CausalLM.from_pretrained(folder)


@pytest.mark.parametrize("rope", [
    {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
     "original_max_position_embeddings": 16},
    {"rope_type": "proportional", "factor": 2.0},
])
def test_refuses_unsupported_rope_type(tmp_path, rope):
    folder = _folder(tmp_path)
    _edit(folder, rope_scaling=rope, rope_parameters=None)
    with pytest.raises(QBudgetError, match=rf"rope_type '{rope['rope_type']}'.*supported: "
                                           + ", ".join(SUPPORTED_ROPE_TYPES)):
        CausalLM.from_pretrained(folder)


def test_refuses_incomplete_llama3_rope_and_partial_rotary():
    cfg = make_config(LlamaConfig, {"rope_scaling": dict(LLAMA3)})
    del cfg.rope_parameters["low_freq_factor"]
    with pytest.raises(QBudgetError, match="lacks 'low_freq_factor'"):
        rope_from_config(cfg, 16)
    cfg = make_config(LlamaConfig, {})
    cfg.rope_parameters["partial_rotary_factor"] = 0.5
    with pytest.raises(QBudgetError, match=r"partial_rotary_factor=0\.5; supported: 1\.0"):
        CausalLM.from_config(cfg, key=jax.random.key(0))


@pytest.mark.parametrize("cls,extra,field", [
    (MistralConfig, {"sliding_window": 16}, r"sliding_window=16 \(< max_position_embeddings=64"),
    (Qwen2Config, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
     r"use_sliding_window=true with sliding_window=8"),
    (Qwen3Config, {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1},
     r"use_sliding_window=true with sliding_window=32"),
])
def test_refuses_sliding_window_that_could_be_exceeded(cls, extra, field):
    with pytest.raises(QBudgetError, match=field + r".*supported: sliding_window null or >= "
                                                   r"max_position_embeddings"):
        CausalLM.from_config(make_config(cls, extra), key=jax.random.key(0))
    # a window no sequence can exceed, or one switched off, is accepted
    ok = dict(extra, sliding_window=MAX_POS)
    CausalLM.from_config(make_config(cls, ok), key=jax.random.key(0))
    if "use_sliding_window" in extra:
        CausalLM.from_config(make_config(cls, dict(extra, use_sliding_window=False)),
                             key=jax.random.key(0))


def test_refuses_sliding_window_in_a_saved_config(tmp_path):
    folder = _folder(tmp_path, MistralConfig, {"sliding_window": None})
    _edit(folder, sliding_window=32)
    with pytest.raises(QBudgetError, match=r"sliding_window=32 .*config\.json"):
        CausalLM.from_pretrained(folder)


def test_dynamic_rope_refuses_sequences_past_max_position_embeddings():
    model = CausalLM.from_config(make_config(LlamaConfig, {"rope_scaling": dict(DYNAMIC)}),
                                 key=jax.random.key(0))
    model(np.ones((1, MAX_POS), np.int32))   # up to the limit: static, computed
    with pytest.raises(QBudgetError, match=r"exceeds max_position_embeddings=64.*'dynamic'"):
        model(np.ones((1, MAX_POS + 1), np.int32))


def test_refuses_missing_shard_naming_it(tmp_path, torch):
    tm = torch_model(torch, Qwen3Config, {"head_dim": 24}, seed=0)
    tm.save_pretrained(str(tmp_path / "sh"), max_shard_size="40KB")
    shards = sorted((tmp_path / "sh").glob("*.safetensors"))
    assert len(shards) > 1
    assert np.isfinite(np.asarray(CausalLM.from_pretrained(tmp_path / "sh")(
        np.arange(1, 9)[None]))).all()
    shards[1].unlink()
    with pytest.raises(QBudgetError, match=rf"shard\(s\) listed in .*index\.json are missing: "
                                           rf"{shards[1].name}"):
        CausalLM.from_pretrained(tmp_path / "sh")
