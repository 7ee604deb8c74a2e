"""The decoder families qbudget computes, as data (in the spirit of google/tunix's
per-family ``params.py``).

A family is what distinguishes one Hugging Face ``model_type`` from the shared
architecture in :mod:`qbudget.models.decoder` (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU MLP): which projections carry biases, whether q and k get a per-head
RMSNorm before the rotation, which config field switches sliding-window attention on,
the extra checkpoint tensors it has, and the class transformers loads it with. The
config fields each family reads are listed for documentation and for refusals.

This module imports nothing from qbudget's model code: the decoder reads the switches
(``DecoderSpec.from_config``), the checkpoint I/O reads the key map.
"""

from __future__ import annotations

import dataclasses

from qbudget.errors import QBudgetError

#: Fields every family reads from its transformers config.
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act",
    "tie_word_embeddings", "initializer_range", "max_position_embeddings",
    "rope_parameters (rope_scaling, rope_theta)", "layer_types",
)

#: The HF key <-> module path table shared by all families:
#: (HF key template, our path template, transpose). Placeholders: {layer} a layer index,
#: {attn} / {mlp} a projection of that block, {qk_norm} q_norm or k_norm.
COMMON_KEYS: tuple[tuple[str, str, bool], ...] = (
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

#: Per-head q/k RMSNorm weights (Qwen3).
QK_NORM_KEYS: tuple[tuple[str, str, bool], ...] = (
    ("model.layers.{layer}.self_attn.{qk_norm}.weight",
     "model.layers.{layer}.self_attn.{qk_norm}.scale", False),
)

#: What each placeholder of a key template matches (a regex alternative).
PLACEHOLDERS = {
    "layer": r"\d+",
    "attn": "q_proj|k_proj|v_proj|o_proj",
    "mlp": "gate_proj|up_proj|down_proj",
    "qk_norm": "q_norm|k_norm",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """One ``model_type``. A bias switch is ``True``/``False`` or the name of the boolean
    config field that sets it."""

    model_type: str
    architecture: str                      # the transformers class written to config.json
    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str
    qk_norm: bool = False                  # RMSNorm(head_dim) on q and k, before rotary
    sliding_window_switch: str | None = None   # field that turns sliding_window on (None:
    #                                            the family has no sliding window; or the
    #                                            window is on whenever sliding_window is set)
    has_sliding_window: bool = False
    extra_fields: tuple[str, ...] = ()
    extra_keys: tuple[tuple[str, str, bool], ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """The config fields this family reads."""
        return COMMON_FIELDS + self.extra_fields

    @property
    def keys(self) -> tuple[tuple[str, str, bool], ...]:
        """This family's HF key <-> module path table."""
        return COMMON_KEYS + self.extra_keys

    def switch(self, config, value: bool | str) -> bool:
        """Resolve a bias switch against ``config``."""
        if isinstance(value, bool):
            return value
        return bool(getattr(config, value, False) or False)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
           mlp_bias="mlp_bias", extra_fields=("attention_bias", "mlp_bias", "pretraining_tp")),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, o_bias=False, mlp_bias=False,
           has_sliding_window=True, sliding_window_switch="use_sliding_window",
           extra_fields=("use_sliding_window", "sliding_window", "max_window_layers")),
    Family("qwen3", "Qwen3ForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
           mlp_bias=False, qk_norm=True, has_sliding_window=True,
           sliding_window_switch="use_sliding_window", extra_keys=QK_NORM_KEYS,
           extra_fields=("attention_bias", "use_sliding_window", "sliding_window",
                         "max_window_layers")),
    Family("mistral", "MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False,
           has_sliding_window=True, extra_fields=("sliding_window",)),
)}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

#: Every family's keys together (the union table; a key of another family maps to a path
#: the model lacks and is refused at load time as an unexpected tensor).
ALL_KEYS: tuple[tuple[str, str, bool], ...] = tuple(dict.fromkeys(
    k for f in FAMILIES.values() for k in f.keys))


def family(model_type, where: str = "") -> Family:
    """The family of ``model_type``; QBudgetError naming the supported ones otherwise."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise QBudgetError(f"unsupported model_type {model_type!r}{where}; supported: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return fam
