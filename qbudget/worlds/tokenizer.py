"""A small byte-level BPE tokenizer for an embedded world, trained with ``tokenizers``.

Trained on the world's own prompts and answers (about 0.5-1k tokens). The pipeline is
exactly the one transformers 5 rebuilds for a ``qwen2`` checkpoint (``Qwen2Tokenizer``:
NFC, the Qwen2 split regex, byte-level BPE, byte-level decoder) -- AutoTokenizer ignores
the saved pipeline for that model type and rebuilds it from vocab and merges -- so the
same ``tokenizer.json`` behaves identically under ``Qwen2Tokenizer``, under the generic
``TokenizersBackend`` used for ``llama`` folders and under ``tokenizers`` itself.
Decoding restores spaces and newlines exactly; typo-ridden robustness prompts
tokenize into shorter pieces. Saved as ``tokenizer.json`` + ``tokenizer_config.json``
(+ ``special_tokens_map.json``).

The config also carries a ``response_template`` (transformers' declarative description of
where an assistant answer starts and ends in the decoded chat), as chat checkpoints on the
Hub do. Servers need it: ``transformers serve`` parses every chat answer with the
tokenizer's ``response_template`` and, when there is none, falls back to one chosen by
``model_type`` -- for ``qwen2`` that is ChatML's (``<|im_start|>assistant\\n`` ...
``<|im_end|>``). Our template has no ChatML markers, so that fallback never finds where
the answer starts: it returned the whole prompt, special tokens included, followed by the
answer and ``<|eos|>``. With ours, the server returns exactly the generated text up to
eos, as ``qbudget.models.generate.generate_text`` decodes it. The template is metadata
only: token ids, the chat template and the weights do not depend on it.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Iterable

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]

#: A minimal chat template: bos, the user turn, then the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: Where an answer starts and ends in the decoded chat (transformers' ``response_template``,
#: version 1): after the last ``<|assistant|>`` of the prompt, up to ``<|eos|>``. Not
#: stripped: an answer is the generated text exactly, leading or trailing spaces included.
RESPONSE_TEMPLATE = {
    "version": 1,
    "defaults": {"role": "assistant"},
    "start_anchor": ASSISTANT,
    "fields": {"content": {"close": EOS, "content": "text", "content_args": {"strip": False}}},
}


#: Qwen2's pre-tokenization regex (transformers.models.qwen2.tokenization_qwen2).
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for a given input)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Every printable ASCII character (and newline) as a base token, in byte-level form.
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    level = Tokenizer(models.BPE())
    level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted({piece for ch in string.printable.replace("\t", "").replace("\r", "")
                       .replace("\x0b", "").replace("\x0c", "")
                       for piece, _ in level.pre_tokenizer.pre_tokenize_str(ch)} & set(byte_chars))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    # No automatic bos/eos: qbudget.models.text.encode_prompt decides the framing.
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tok


def save_tokenizer(tok, folder: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "additional_special_tokens": [USER, ASSISTANT],
        "model_max_length": model_max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "response_template": RESPONSE_TEMPLATE,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json",
                {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                 "additional_special_tokens": [USER, ASSISTANT]})


def special_ids(tok) -> dict[str, int]:
    return {"pad": tok.token_to_id(PAD), "bos": tok.token_to_id(BOS), "eos": tok.token_to_id(EOS)}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")
