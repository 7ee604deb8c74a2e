"""Hugging Face checkpoint folders <-> :class:`~qbudget.models.decoder.CausalLM`.

The key mapping is data (``KEY_TABLE``: regex on the HF key -> path in our module,
whether to transpose), in the spirit of google/tunix loaders. Loading builds the model
abstractly with ``nnx.eval_shape`` (shapes only, no weights), then fills each leaf from
the safetensors files one tensor at a time — weights are materialised once.

Supported layouts: a single ``model.safetensors``, or sharded ``*.safetensors`` with a
``model.safetensors.index.json``. ``save_pretrained`` writes ``config.json`` +
``model.safetensors`` that transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
load directly (LoRA adapters, if attached, are folded into the saved weights; use
``qbudget.models.lora.save_adapter`` to save them separately).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qbudget.errors import QBudgetError
from qbudget.models.decoder import SUPPORTED_MODEL_TYPES, CausalLM, DecoderSpec
from qbudget.models.lora import ATTN_TARGETS, MLP_TARGETS, lora_block, lora_linears

#: The HF key <-> module path table: (HF key template, our path template, transpose).
#: Placeholders: {layer} a layer index, {attn} / {mlp} a projection name of that block.
KEY_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens.embedding", False),
    ("model.layers.{layer}.self_attn.{attn}.weight", "model.layers.{layer}.self_attn.{attn}.kernel", True),
    ("model.layers.{layer}.self_attn.{attn}.bias", "model.layers.{layer}.self_attn.{attn}.bias", False),
    ("model.layers.{layer}.mlp.{mlp}.weight", "model.layers.{layer}.mlp.{mlp}.kernel", True),
    ("model.layers.{layer}.mlp.{mlp}.bias", "model.layers.{layer}.mlp.{mlp}.bias", False),
    ("model.layers.{layer}.input_layernorm.weight", "model.layers.{layer}.input_layernorm.scale", False),
    ("model.layers.{layer}.post_attention_layernorm.weight",
     "model.layers.{layer}.post_attention_layernorm.scale", False),
    ("model.norm.weight", "model.norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
)
_PLACEHOLDERS = {"layer": r"\d+", "attn": "|".join(ATTN_TARGETS), "mlp": "|".join(MLP_TARGETS)}
#: HF keys that carry no weights we need (buffers some exporters write).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq\Z")


def _template_regex(template: str) -> re.Pattern:
    rx = re.escape(template)
    for name, alt in _PLACEHOLDERS.items():
        rx = rx.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alt})")
    return re.compile(rx + r"\Z")


_FORWARD = tuple((_template_regex(hf), ours, tr) for hf, ours, tr in KEY_TABLE)
_BACKWARD = tuple((_template_regex(ours), hf, tr) for hf, ours, tr in KEY_TABLE)


def hf_to_path(key: str) -> tuple[tuple, bool] | None:
    """Our state path (tuple, ints for layer indices) and transpose flag for an HF key."""
    for rx, template, transpose in _FORWARD:
        m = rx.match(key)
        if m:
            parts = template.format(**m.groupdict()).split(".")
            return tuple(int(p) if p.isdigit() else p for p in parts), transpose
    return None


def path_to_hf(path: tuple) -> tuple[str, bool] | None:
    """Inverse of :func:`hf_to_path` for base (non-LoRA) parameters."""
    dotted = ".".join(str(p) for p in path)
    for rx, template, transpose in _BACKWARD:
        m = rx.match(dotted)
        if m:
            return template.format(**m.groupdict()), transpose
    return None


def load_config(path):
    """The transformers config of an HF folder, validated (QBudgetError on anything unsupported)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise QBudgetError(f"model folder not found: {path}")
    if not cfg_file.is_file():
        raise QBudgetError(f"no config.json in model folder {path}")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QBudgetError(f"malformed {cfg_file}: {e}") from None
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise QBudgetError(f"unsupported model_type {mt!r} in {cfg_file}; supported: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if raw.get("rope_scaling"):
        raise QBudgetError(f"unsupported rope_scaling {raw['rope_scaling']!r} in {cfg_file}; "
                           "supported: null (default rope)")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    DecoderSpec.from_config(config)
    return config


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise QBudgetError(f"malformed {index}: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise QBudgetError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    raise QBudgetError(f"no model.safetensors (or sharded *.safetensors + "
                       f"model.safetensors.index.json) in {path}")


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def load_pretrained(path, dtype=jnp.float32) -> CausalLM:
    """Read an HF Llama/Qwen2 folder into a :class:`CausalLM` (weights cast to ``dtype``)."""
    from safetensors import safe_open

    path = Path(path)
    config = load_config(path)
    files = _weight_files(path)
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    expected = {tuple(p): leaf for p, leaf in _flatten(shapes)}
    filled: dict[tuple, jax.Array] = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            for key in sf.keys():
                target = hf_to_path(key)
                if target is None:
                    if _IGNORED.match(key):
                        continue
                    raise QBudgetError(f"unexpected tensor {key!r} in {f.name}; not a "
                                       f"{config.model_type} parameter we know")
                p, transpose = target
                if p not in expected:
                    if p[0] == "lm_head" and config.tie_word_embeddings:
                        continue   # tied: some exporters still write lm_head.weight
                    raise QBudgetError(f"unexpected tensor {key!r} in {f.name} for this config")
                arr = _read(sf, key)
                if transpose:
                    arr = arr.T
                want = expected[p]
                if tuple(arr.shape) != tuple(want.shape):
                    raise QBudgetError(f"shape mismatch for {key!r} in {f.name}: checkpoint has "
                                       f"{tuple(arr.shape[::-1] if transpose else arr.shape)}, "
                                       f"config implies "
                                       f"{tuple(want.shape[::-1] if transpose else want.shape)}")
                filled[p] = jnp.asarray(arr, dtype=want.dtype)
                del arr
    missing = [p for p in expected if p not in filled]
    if missing:
        names = [path_to_hf(p)[0] if path_to_hf(p) else ".".join(map(str, p)) for p in missing]
        raise QBudgetError(f"checkpoint {path} lacks {len(missing)} tensor(s), e.g. {names[0]!r}")
    for p, v in filled.items():
        _set(shapes, p, v)
    nnx.replace_by_pure_dict(state, shapes)
    return nnx.merge(graphdef, state)


def _read(sf, key: str) -> np.ndarray:
    try:
        return sf.get_tensor(key)
    except (TypeError, ValueError):
        # bfloat16 has no numpy dtype: refuse with a clear message rather than a traceback.
        raise QBudgetError(f"cannot read tensor {key!r} as numpy (bfloat16?); "
                           "convert the checkpoint to float32/float16") from None


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def effective_weights(model: CausalLM) -> dict[str, np.ndarray]:
    """HF-named float32/float16 numpy tensors of the model, LoRA folded in."""
    out: dict[str, np.ndarray] = {}
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # adapted kernels, kernel + scale * A @ B
    merged = {("model", "layers", i, lora_block(t), t, "kernel"): lin.merged_kernel()
              for i, t, lin in lora_linears(model)}
    for p, v in _flatten(state):
        if "lora" in p:
            continue
        hf = path_to_hf(p)
        if hf is None:
            raise RuntimeError(f"no HF name for parameter {p}")
        key, transpose = hf
        arr = np.asarray(merged.get(p, v))
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def save_pretrained(model: CausalLM, path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (HF names, torch layout)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.architectures = ["Qwen2ForCausalLM" if config.model_type == "qwen2"
                            else "LlamaForCausalLM"]
    config.dtype = model.dtype
    config.save_pretrained(str(path))
    tensors = effective_weights(model)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
