"""What an answer cost: token usage, prices, and the worst case a request may cost.

A real teacher bills per token, so every answer the ledger keeps carries a :class:`Usage`:
prompt and completion tokens and where the counts came from (``source``):

``server``     the endpoint's ``usage`` field (what the bill is computed from);
``tokenizer``  counted with the teacher's tokenizer (the local teacher, or an endpoint
               that sent no ``usage`` but whose tokenizer folder is configured);
``recorded``   read back from a recording (a replay file, an ingested batch);
``estimate``   no count was available: UTF-8 bytes / 4, rounded up. Marked so that a
               report never presents a guess as a bill.

``usd`` is set when the answer's cost is known directly (a batch priced at a discount);
otherwise the cost is the run's :class:`Price` applied to the tokens.

Budgets in tokens or money must hold *before* the answer is known, so each oracle also
says what a request may cost at most (:func:`worst_case`): its prompt tokens plus the
``max_tokens`` it asks for. The ledger reserves that, sends the request, and settles the
real usage when the answer arrives.

Oracles may implement ``answer_usage(prompts, sample) -> list[(text, Usage)]`` and
``worst_case(prompt) -> Usage``; :func:`answer_with_usage` and :func:`worst_case` fall back
to estimates for an oracle that implements only ``answer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from qbudget.errors import QBudgetError
from qbudget.pool import Prompt

USAGE_SOURCES = ("server", "tokenizer", "recorded", "estimate")
#: tokens a chat template may add around a prompt (role markers, bos, generation prompt,
#: a default system prompt); added to the worst case when the prompt is counted bare
TEMPLATE_MARGIN_TOKENS = 64


@dataclass(frozen=True)
class Usage:
    """Tokens one answer used, where the counts come from, and its cost when known."""

    prompt_tokens: int
    completion_tokens: int
    source: str = "estimate"
    usd: float | None = None

    def __post_init__(self):
        for name in ("prompt_tokens", "completion_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise QBudgetError(f"usage {name} must be an integer >= 0, got {v!r}")
        if self.source not in USAGE_SOURCES:
            raise QBudgetError(f"usage source must be one of {', '.join(USAGE_SOURCES)}, "
                               f"got {self.source!r}")
        if self.usd is not None and not (isinstance(self.usd, (int, float))
                                         and math.isfinite(self.usd) and self.usd >= 0):
            raise QBudgetError(f"usage usd must be a number >= 0, got {self.usd!r}")

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def estimated(self) -> bool:
        return self.source == "estimate"


@dataclass(frozen=True)
class Price:
    """US dollars per million input (prompt) and output (completion) tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def __post_init__(self):
        for name in ("input_per_mtok", "output_per_mtok"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise QBudgetError(f"config key 'teacher.price.{name}' must be a number >= 0, "
                                   f"got {v!r}")

    def cost(self, usage: Usage) -> float:
        """The bill for ``usage``: its own ``usd`` when known, else tokens at this price."""
        if usage.usd is not None:
            return float(usage.usd)
        return (usage.prompt_tokens * self.input_per_mtok
                + usage.completion_tokens * self.output_per_mtok) / 1e6

    @classmethod
    def from_dict(cls, data, where: str = "teacher.price") -> "Price":
        """``[teacher.price]`` -> Price; unknown keys and bad values name the key."""
        if not isinstance(data, dict):
            raise QBudgetError(f"config key '{where}' must be a table")
        known = ("input_per_mtok", "output_per_mtok")
        for key in data:
            if key not in known:
                raise QBudgetError(f"unknown config key '{where}.{key}' "
                                   f"(expected one of: {', '.join(known)})")
        for key in known:
            if key not in data:
                raise QBudgetError(f"config key '{where}.{key}' is required")
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise QBudgetError(f"config key '{where}.{key}' must be a number >= 0, "
                                   f"got {v!r}")
        return cls(float(data["input_per_mtok"]), float(data["output_per_mtok"]))


def estimate_tokens(text: str) -> int:
    """A rough token count when no tokenizer is at hand: UTF-8 bytes / 4, rounded up."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def bound_tokens(text: str) -> int:
    """An upper bound on the tokens of ``text`` for byte-level BPE tokenizers: its bytes."""
    return len(text.encode("utf-8"))


def answer_with_usage(oracle, prompts: Sequence[Prompt], sample: int = 0
                      ) -> list[tuple[str, Usage]]:
    """``oracle``'s answers with their usage; estimated for an oracle that reports none."""
    if hasattr(oracle, "answer_usage"):
        return list(oracle.answer_usage(prompts, sample))
    texts = oracle.answer(prompts, sample=sample)
    return [(t, Usage(estimate_tokens(p.text), estimate_tokens(t), "estimate"))
            for p, t in zip(prompts, texts)]


def worst_case(oracle, prompt: Prompt) -> Usage:
    """The most a request for ``prompt`` may use (reserved before it is sent)."""
    if hasattr(oracle, "worst_case"):
        return oracle.worst_case(prompt)
    # an oracle that says nothing about its answers' length: no finite bound on the
    # completion exists, so bound the prompt and allow a generous completion
    return Usage(bound_tokens(prompt.text) + TEMPLATE_MARGIN_TOKENS, 4096, "estimate")


class TokenCounter:
    """Counts tokens with a tokenizer folder's ``tokenizer.json`` (the ``tokenizers``
    library: no transformers import in the process that buys answers)."""

    def __init__(self, folder):
        from pathlib import Path

        from tokenizers import Tokenizer

        path = Path(folder).expanduser() / "tokenizer.json"
        if not path.is_file():
            raise QBudgetError(f"cannot count tokens: no tokenizer.json in {path.parent}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:   # tokenizers raises a bare Exception on a bad file
            raise QBudgetError(f"{path}: not a readable tokenizer ({exc})".splitlines()[0]) from None
        self._tok.no_truncation()
        self._tok.no_padding()

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)
