"""Tokenizer loading and the one prompt format shared by training, generation and evaluation.

A student trained on ``encode_prompt(p) + response + eos`` must be queried with exactly
``encode_prompt(p)`` — any drift between training and generation framing silently
degrades every measurement, so this is the only place that decides it.
"""

from __future__ import annotations

import os
from pathlib import Path

from qbudget.errors import QBudgetError


def load_tokenizer(path):
    """A transformers fast tokenizer from a local folder; left padding, pad token set.

    If the tokenizer has no pad token, the eos token is used for padding.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = Path(path)
    if not path.is_dir():
        raise QBudgetError(f"tokenizer folder not found: {path}")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                               "vocab.json", "tokenizer.model")):
        raise QBudgetError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise QBudgetError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise QBudgetError(f"tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it before its answer.

    With a chat template: the user turn plus the generation prompt. Without one: bos (if
    the tokenizer has one) + tokens of ``text + "\\n"``.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids = tokenizer.encode(text + "\n", add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return [int(i) for i in ids]


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of an answer followed by eos (the training target)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return [int(i) for i in ids] + ([int(eos)] if eos is not None else [])
