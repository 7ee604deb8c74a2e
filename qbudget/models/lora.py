"""LoRA adapters on a :class:`~qbudget.models.decoder.CausalLM`, in PEFT's on-disk format.

Each targeted projection ``y = x W (+ b)`` gains ``scale * x A B`` with ``A`` [in, r]
(PEFT's kaiming-uniform init) and ``B`` [r, out] = 0, so a fresh adapter leaves the
model's outputs unchanged; ``scale = alpha / r`` as in PEFT. The adapter weights are
``nnx.LoRAParam`` (inside an ``nnx.LoRA``), so ``make_optimizer(model, lr,
wrt=nnx.LoRAParam)`` trains them and nothing else.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with
PEFT's key names (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``,
A as [r, in], B as [out, r]), so ``peft.PeftModel.from_pretrained(hf_model, dir)``
reproduces our student in PyTorch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qbudget.errors import QBudgetError
from qbudget.models.decoder import CausalLM, Linear

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS


def lora_block(name: str) -> str:
    """The block (``self_attn`` or ``mlp``) that holds projection ``name``."""
    return "self_attn" if name in ATTN_TARGETS else "mlp"


def _targets(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(dict.fromkeys(targets))
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        raise QBudgetError(f"unsupported LoRA target module(s) {bad or '[]'}; supported: "
                           f"{', '.join(ALL_TARGETS)}")
    return tuple(t for t in ALL_TARGETS if t in targets)


def lora_linears(model: CausalLM):
    """Yield (layer index, target name, Linear) for every adapted projection."""
    if model.lora_info is None:
        return
    _, _, targets = model.lora_info
    for i, layer in enumerate(model.model.layers):
        for t in targets:
            yield i, t, getattr(getattr(layer, lora_block(t)), t)


def _kaiming_uniform_a(key, shape, dtype=jnp.float32):
    """PEFT's lora_A init: kaiming_uniform(a=sqrt(5)) on the [r, in] torch weight."""
    fan_in = shape[0]                          # our A is [in, r]
    bound = 1.0 / math.sqrt(fan_in)            # gain sqrt(2/(1+5)) * sqrt(3/fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def attach_lora(model: CausalLM, rank: int = 8, alpha: float = 16,
                targets: Sequence[str] = ATTN_TARGETS, *, key) -> CausalLM:
    """Add fresh adapters (B = 0) to ``targets`` in every layer; returns ``model``."""
    if model.lora_info is not None:
        raise QBudgetError("the model already has LoRA adapters; merge_lora first or reload it")
    if int(rank) < 1:
        raise QBudgetError(f"LoRA rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise QBudgetError(f"LoRA alpha must be > 0, got {alpha}")
    targets = _targets(targets)
    rank = int(rank)
    dtype = jnp.float32   # adapters train in float32 whatever the base's compute dtype
    keys = iter(jax.random.split(key, model.spec.num_layers * len(targets)))
    for layer in model.model.layers:
        for t in targets:
            lin: Linear = getattr(getattr(layer, lora_block(t)), t)
            lin.lora = nnx.data(nnx.LoRA(lin.in_features, rank, lin.out_features, dtype=dtype,
                                param_dtype=dtype, a_initializer=_kaiming_uniform_a,
                                rngs=nnx.Rngs(params=next(keys))))
            lin.lora_scale = float(alpha) / rank
    model.lora_info = (rank, float(alpha), targets)
    return model


def merge_lora(model: CausalLM) -> CausalLM:
    """Fold ``scale * A B`` into each base kernel and remove the adapters; returns ``model``."""
    for _, _, lin in list(lora_linears(model)):
        lin.kernel[...] = lin.merged_kernel()
        lin.lora = nnx.data(None)
        lin.lora_scale = 0.0
    model.lora_info = None
    return model


def _peft_key(i: int, target: str, ab: str) -> str:
    return f"base_model.model.model.layers.{i}.{lora_block(target)}.{target}.lora_{ab}.weight"


def save_adapter(model: CausalLM, path, base_model_name_or_path: str | None = None) -> None:
    """Write PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` into ``path``."""
    from safetensors.numpy import save_file

    if model.lora_info is None:
        raise QBudgetError("the model has no LoRA adapters to save")
    rank, alpha, targets = model.lora_info
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, t, lin in lora_linears(model):
        tensors[_peft_key(i, t, "A")] = np.ascontiguousarray(np.asarray(lin.lora.lora_a[...]).T)
        tensors[_peft_key(i, t, "B")] = np.ascontiguousarray(np.asarray(lin.lora.lora_b[...]).T)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": alpha if alpha != int(alpha) else int(alpha),
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                              encoding="utf-8")


def load_adapter(model: CausalLM, path) -> CausalLM:
    """Load a PEFT LoRA adapter folder into ``model`` (attaching adapters if it has none)."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise QBudgetError(f"{path} is not a PEFT adapter folder (needs adapter_config.json "
                           "and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QBudgetError(f"malformed {cfg_file}: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QBudgetError(f"unsupported peft_type {cfg.get('peft_type')!r}; supported: LORA")
    for field, ok in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False)):
        if cfg.get(field, ok) not in (ok, None):
            raise QBudgetError(f"unsupported adapter {field}={cfg[field]!r}; supported: {ok}")
    if cfg.get("bias", "none") != "none":
        raise QBudgetError(f"unsupported adapter bias={cfg['bias']!r}; supported: 'none'")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("layers_to_transform"):
        raise QBudgetError("unsupported adapter rank_pattern/alpha_pattern/layers_to_transform; "
                           "supported: uniform rank and alpha on all layers")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise QBudgetError(f"unsupported regex target_modules {targets!r}; supported: a list of "
                           f"{', '.join(ALL_TARGETS)}")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    targets = _targets(targets)
    if model.lora_info is None:
        attach_lora(model, rank, alpha, targets, key=jax.random.key(0))
    elif (model.lora_info[0], model.lora_info[2]) != (rank, targets):
        raise QBudgetError(f"adapter (r={rank}, targets={list(targets)}) does not match the "
                           f"model's adapters (r={model.lora_info[0]}, "
                           f"targets={list(model.lora_info[2])})")
    else:
        for _, _, lin in lora_linears(model):
            lin.lora_scale = alpha / rank
        model.lora_info = (rank, alpha, targets)
    with safe_open(str(weights), framework="numpy") as sf:
        keys = set(sf.keys())
        for i, t, lin in list(lora_linears(model)):
            for ab, var in (("A", lin.lora.lora_a), ("B", lin.lora.lora_b)):
                k = _peft_key(i, t, ab)
                if k not in keys:
                    k2 = k.replace(".weight", ".default.weight")
                    if k2 not in keys:
                        raise QBudgetError(f"adapter {weights.name} lacks {k!r}")
                    k = k2
                arr = sf.get_tensor(k).T
                if arr.shape != var[...].shape:
                    raise QBudgetError(f"shape mismatch for {k!r}: adapter has "
                                       f"{arr.shape[::-1]}, model expects {var[...].shape[::-1]}")
                var[...] = jnp.asarray(arr, var[...].dtype)
    return model
