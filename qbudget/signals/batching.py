"""Token batches for the model-based signals, framed exactly as training and generation frame them.

Prompts go through :func:`qbudget.models.text.encode_prompt` (left-padded, for scoring
continuations); (prompt, answer) pairs through the distillation step's own
:class:`qbudget.models.train.PairBatcher`, so a committee member or a bandit loss sees
exactly what training sees. Widths are bucketed so XLA compiles a handful of shapes.
"""

from __future__ import annotations

from typing import Sequence

from qbudget import padding


def prompt_ids(tok, text: str) -> list[int]:
    from qbudget.models.text import encode_prompt

    return list(encode_prompt(tok, text))


def pad_id(tok) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def round_up(n: int, m: int = 16) -> int:
    """``n`` rounded up to a multiple of ``m``, at least ``m`` (one compiled width per step)."""
    return max(m, padding.round_up(n, m))


def left_padded(tok, texts: Sequence[str]):
    """Framed prompt ids, left-padded to a width bucketed to a multiple of 16.

    Returns ``ids`` [B, W] int32, ``mask`` [B, W] (1 on real tokens) and ``W``.
    """
    return left_pad([prompt_ids(tok, t) for t in texts], pad_id(tok))


def left_pad(seqs: Sequence[Sequence[int]], pad: int):
    width = round_up(max(len(s) for s in seqs))
    ids, mask = padding.left_pad(seqs, width, pad)
    return ids, mask, width


def pair_batch(tok, prompts: Sequence[str], responses: Sequence[str], max_len: int = 128):
    """ids, attention mask and loss mask (response + eos) of (prompt, answer) pairs.

    Tokenised by ``qbudget.models.train.PairBatcher`` — the distillation step's own
    framing — so committee members and bandit losses see exactly what training sees.
    """
    from qbudget.models.train import PairBatcher

    pb = PairBatcher(tok, list(prompts), list(responses), batch_size=max(1, len(prompts)),
                     max_len=max_len, bucket=16)
    b = pb.batch(range(len(prompts)))
    return b["input_ids"], b["attention_mask"], b["loss_mask"]
