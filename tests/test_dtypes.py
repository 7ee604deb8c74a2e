"""Checkpoint dtypes and the compute dtype: float16/bfloat16 files load, bfloat16 compute
stays close to float32, and adapters on a bfloat16 base train in float32."""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_families import (CASES, VOCAB, max_real_diff, padded_batch, torch_logits,  # noqa: F401
                           torch, torch_model)

from qbudget.errors import QBudgetError
from qbudget.models import CausalLM
from qbudget.models import safetensors_stream
from qbudget.models.lora import ALL_TARGETS, attach_lora
from qbudget.models.train import make_optimizer

pytestmark = pytest.mark.torch_parity

BY_NAME = {c[0]: c for c in CASES}
ONE_PER_FAMILY = ["llama3", "mistral", "qwen2", "qwen3-yarn"]


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
@pytest.mark.parametrize("file_dtype", ["bfloat16", "float16"])
def test_half_precision_files_load_exactly(name, file_dtype, tmp_path, torch):
    """A bf16/f16 checkpoint read into float32 equals transformers in float32 on the same
    rounded weights (<= 1e-4, like the float32 parity tests)."""
    _, cls, extra = BY_NAME[name]
    tm = torch_model(torch, cls, extra, seed=11)
    half = getattr(torch, file_dtype)
    tm.to(half).save_pretrained(str(tmp_path))
    header = safetensors_stream.read_header(tmp_path / "model.safetensors")
    assert {e.dtype.name for e in header} == {file_dtype}
    from transformers import AutoModelForCausalLM

    # the rounded weights, computed in float32 (loaded afresh: tm.to(half) also rounded
    # its rotary buffers, which from_pretrained recomputes)
    tm = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    model = CausalLM.from_pretrained(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}
    ids, mask = padded_batch(np.random.default_rng(0), [40, 17], 40)
    assert max_real_diff(np.asarray(model(ids, mask)), torch_logits(tm, ids, mask), mask) <= 1e-4


def test_chunked_reads_equal_whole_reads(tmp_path, torch, monkeypatch):
    """Tensors read in many small chunks (transposed or not) equal one-piece reads."""
    _, cls, extra = BY_NAME["qwen2"]
    torch_model(torch, cls, extra, seed=3).to(torch.bfloat16).save_pretrained(str(tmp_path))
    whole = nnx.state(CausalLM.from_pretrained(tmp_path))
    monkeypatch.setattr(safetensors_stream, "CHUNK_BYTES", 100)   # a few rows per chunk
    chunked = nnx.state(CausalLM.from_pretrained(tmp_path))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_bfloat16_compute_stays_close_to_float32(name, tmp_path, torch):
    """Computing in bfloat16 (weights, activations; norms, softmax and logits in float32)
    stays within what bfloat16's 8-bit mantissa allows.

    Tolerance: each rounding is within 2^-9 relative; through two layers of matmuls
    (sums of 64-96 products, errors adding like a random walk), the relative error of the
    logits is a few times 2^-8. The logits here have a standard deviation of ~1, so 0.1
    in the largest deviation (and 0.02 in the mean) allows ~25x / 5x 2^-8 at most and
    still fails for any structural mistake (a wrong cast of the residual stream or of
    the attention scores gives O(1) errors). The greedy choice is the same on >= 90% of
    positions.
    """
    _, cls, extra = BY_NAME[name]
    torch_model(torch, cls, extra, seed=5, init=0.1).save_pretrained(str(tmp_path))
    f32 = CausalLM.from_pretrained(tmp_path)
    bf16 = CausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {np.dtype(jnp.bfloat16)}
    ids, mask = padded_batch(np.random.default_rng(1), [48, 21, 9], 48)
    a, b = np.asarray(f32(ids, mask)), np.asarray(bf16(ids, mask))
    assert b.dtype == np.float32
    real = mask.astype(bool)
    err = np.abs(a - b)[real]
    assert 0.5 < a[real].std() < 3
    assert err.max() <= 0.1 and err.mean() <= 0.02, (err.max(), err.mean())
    assert err.max() > 0           # it really computed in bfloat16
    assert (a.argmax(-1) == b.argmax(-1))[real].mean() >= 0.9


def test_adapters_on_a_bfloat16_base_train_in_float32(tmp_path, torch):
    """LoRA parameters and optimiser state are float32 on a bf16 base, and training moves
    the loss (the update is not lost to bf16 rounding of the base weights)."""
    from qbudget.models.train import loss_fn

    _, cls, extra = BY_NAME["qwen3"]
    torch_model(torch, cls, extra, seed=2).save_pretrained(str(tmp_path))
    model = CausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    attach_lora(model, rank=4, alpha=8, targets=ALL_TARGETS, key=jax.random.key(0))
    lora = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert lora and {x.dtype for x in lora} == {np.dtype(np.float32)}
    opt = make_optimizer(model, 3e-3, wrt=nnx.LoRAParam)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(opt, nnx.OptState))
            if jnp.issubdtype(x.dtype, jnp.floating)} == {np.dtype(np.float32)}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (4, 24))
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones((4, 24), jnp.int32),
             "loss_mask": jnp.ones((4, 24), jnp.int32)}

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model, batch)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, batch)) for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5, losses


def _write_raw(path, header: dict, payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


@pytest.mark.parametrize("header,payload,needle", [
    ({"w": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0", "unsupported dtype I8"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "'w' has 16 bytes"),
    ({"w": {"dtype": "F32"}}, b"", "entry 'w'"),
])
def test_malformed_or_unsupported_tensor_files_are_refused(tmp_path, header, payload, needle):
    f = tmp_path / "model.safetensors"
    _write_raw(f, header, payload)
    with pytest.raises(QBudgetError, match=needle):
        safetensors_stream.read_header(f)
    f.write_bytes(b"\x05")
    with pytest.raises(QBudgetError, match="shorter than its header"):
        safetensors_stream.read_header(f)
