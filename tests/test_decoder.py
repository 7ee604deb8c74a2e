"""CausalLM: logit parity with transformers' PyTorch models, checkpoint I/O, refusals."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

# transformers' config classes need no torch; its model classes (the references) do, and
# only the tests that use them ask for the ``torch`` fixture, which skips without PyTorch.
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qbudget.errors import QBudgetError
from qbudget.models import CausalLM
from qbudget.models.checkpoint import KEY_TABLE, hf_to_path, path_to_hf
from qbudget.models.decoder import logits as jit_logits

VOCAB = 61


def tiny_config(kind: str, tied: bool, kv_heads: int = 2, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, rope_theta=500.0, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, **extra)
    return Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)


def randomized(config, seed: int) -> CausalLM:
    """A model whose every parameter (norm scales and biases included) is random."""
    model = CausalLM.from_config(config, key=jax.random.key(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


CASES = [("llama", False, 2), ("llama", True, 1), ("qwen2", False, 2), ("qwen2", True, 4)]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'tied' if c[1] else 'untied'}-kv{c[2]}")
def saved_jax(request, tmp_path_factory):
    """(model, folder): a randomized CausalLM and its checkpoint, written without torch."""
    kind, tied, kv = request.param
    model = randomized(tiny_config(kind, tied, kv), seed=len(kind) + kv)
    folder = tmp_path_factory.mktemp(f"{kind}{int(tied)}{kv}")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def saved(saved_jax, torch):
    """(model, folder, transformers' PyTorch model loaded from the same checkpoint)."""
    model, folder = saved_jax
    torch_cls = Qwen2ForCausalLM if model.config.model_type == "qwen2" else LlamaForCausalLM
    return model, folder, torch_cls.from_pretrained(str(folder)).eval()


def torch_logits(tm, ids, mask=None, position_ids=None):
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return tm(torch.tensor(ids), **kw).logits.numpy()


def test_logit_parity_with_transformers(saved):
    model, folder, tm = saved
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, 13))
    ours = np.asarray(model(ids))
    assert ours.shape == (3, 13, VOCAB) and ours.dtype == np.float32
    assert np.abs(ours - torch_logits(tm, ids)).max() <= 1e-4
    # the loaded copy computes the same function (also through the jitted split forward)
    loaded = CausalLM.from_pretrained(folder)
    assert np.abs(np.asarray(jit_logits(loaded, ids)) - ours).max() <= 1e-5


def test_left_padding_matches_transformers_with_positions(saved):
    model, _, tm = saved
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 9))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = np.asarray(model(ids, mask))
    ref = torch_logits(tm, ids, mask, pos)
    assert np.abs(ours[0, 4:] - ref[0, 4:]).max() <= 1e-4
    assert np.abs(ours[1] - ref[1]).max() <= 1e-4
    # a left-padded row equals the same row unpadded
    assert np.abs(ours[0, 4:] - np.asarray(model(ids[:1, 4:]))[0]).max() <= 1e-5


def test_rope_theta_and_tied_head_follow_config(saved_jax):
    model, folder = saved_jax
    assert model.spec.rope_theta == 500.0
    assert model.config.model_type in ("llama", "qwen2")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        has_head = "lm_head.weight" in f.keys()
    assert has_head == (not model.config.tie_word_embeddings)


def test_rope_gradient_matches_autodiff_of_rotate_half():
    """apply_rope's hand-written backward is the transpose of HF's rotate_half rotation."""
    import jax.numpy as jnp

    from qbudget.models.decoder import apply_rope, rope_tables

    def rotate_half_rope(x, cos, sin):
        half = x.shape[-1] // 2
        rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[:, :, None] + rot * sin[:, :, None]

    keys = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(keys[0], (3, 7, 4, 16))
    g = jax.random.normal(keys[1], (3, 7, 4, 16))
    positions = jax.random.randint(keys[2], (3, 7), 0, 300)
    cos, sin = rope_tables(positions, 16, 10000.0)
    y, vjp = jax.vjp(apply_rope, x, cos, sin)
    y_ref, vjp_ref = jax.vjp(rotate_half_rope, x, cos, sin)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-6)
    dx, dcos, dsin = vjp(g)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(vjp_ref(g)[0]), atol=1e-6)
    assert not np.asarray(dcos).any() and not np.asarray(dsin).any()   # positions: constants
    dx_jit = jax.jit(jax.grad(lambda x: jnp.sum(apply_rope(x, cos, sin) * g)))(x)
    np.testing.assert_allclose(np.asarray(dx_jit), np.asarray(dx), atol=1e-6)


def test_sharded_checkpoint_loads(tmp_path, torch):
    model = randomized(tiny_config("llama", False), seed=7)
    model.save_pretrained(tmp_path / "single")
    tm = LlamaForCausalLM.from_pretrained(str(tmp_path / "single"))
    tm.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = np.arange(10)[None] % VOCAB
    got = np.asarray(CausalLM.from_pretrained(tmp_path / "sharded")(ids))
    assert np.abs(got - np.asarray(model(ids))).max() <= 1e-5


def test_key_table_round_trips():
    assert len(KEY_TABLE) >= 8
    for key in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.bias",
                "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.11.post_attention_layernorm.weight"):
        path, transpose = hf_to_path(key)
        assert path_to_hf(path) == (key, transpose)
    assert hf_to_path("model.layers.0.self_attn.gate_proj.weight") is None


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path):
    randomized(tiny_config("llama", False), seed=3).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_refuses_unknown_model_type(folder):
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(QBudgetError, match=r"model_type 'gpt2'.*llama, qwen2"):
        CausalLM.from_pretrained(folder)


def test_refuses_rope_scaling(folder):
    # linear, dynamic, llama3 and yarn are supported (tests/test_families.py); longrope is not
    _edit_config(folder, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                       "long_factor": [2.0] * 4,
                                       "original_max_position_embeddings": 16})
    with pytest.raises(QBudgetError, match="rope"):
        CausalLM.from_pretrained(folder)


def test_refuses_sliding_window(tmp_path):
    cfg = tiny_config("qwen2", False)
    cfg.use_sliding_window = True
    cfg.sliding_window = 4
    with pytest.raises(QBudgetError, match="use_sliding_window"):
        CausalLM.from_config(cfg, key=jax.random.key(0))


def test_refuses_missing_safetensors(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(QBudgetError, match="no model.safetensors"):
        CausalLM.from_pretrained(folder)


def test_refuses_missing_folder_and_config(tmp_path):
    with pytest.raises(QBudgetError, match="not found"):
        CausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QBudgetError, match="config.json"):
        CausalLM.from_pretrained(tmp_path / "empty")


def test_refuses_mismatched_shapes(folder):
    _edit_config(folder, intermediate_size=40)
    with pytest.raises(QBudgetError, match=r"shape mismatch for 'model\.layers\.0\.mlp\.\w+_proj"):
        CausalLM.from_pretrained(folder)


def test_refuses_missing_tensor(folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QBudgetError, match="model.norm.weight"):
        CausalLM.from_pretrained(folder)


def test_refuses_missing_shard(tmp_path, torch):
    model = randomized(tiny_config("llama", True), seed=5)
    model.save_pretrained(tmp_path / "one")
    LlamaForCausalLM.from_pretrained(str(tmp_path / "one")).save_pretrained(
        str(tmp_path / "sh"), max_shard_size="20KB")
    victim = sorted((tmp_path / "sh").glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(QBudgetError, match="missing"):
        CausalLM.from_pretrained(tmp_path / "sh")
    shutil.rmtree(tmp_path / "sh")
