"""Models: the decoder (Llama/Qwen2 ``CausalLM``), its tokenizer, and the sentence encoder.

``SentenceEncoder`` is imported lazily so importing the decoder stack never pays for
(or depends on) the encoder module.
"""

from __future__ import annotations

from qbudget.models.decoder import CausalLM
from qbudget.models.text import load_tokenizer

__all__ = ["CausalLM", "SentenceEncoder", "load_tokenizer"]


def __getattr__(name: str):
    if name == "SentenceEncoder":
        from qbudget.models.encoder import SentenceEncoder

        return SentenceEncoder
    raise AttributeError(f"module 'qbudget.models' has no attribute {name!r}")
