"""The oracle protocol and the hashing helpers every oracle shares.

An oracle is the teacher seen as a black box: it turns prompts into responses, and every
answered prompt costs one query. Two things make answers reusable across runs:

* ``fingerprint`` -- a stable hash of everything that makes two answers comparable (model
  identity, sampling settings, endpoint + model name). The response cache is keyed by it,
  so a changed teacher or temperature can never be served stale answers. Secrets such as
  an API key are never part of it.
* per-prompt seeds derived from ``(seed, prompt text, sample)`` -- an answer depends only on
  the prompt, never on which other prompts share its batch, so a cached answer is exactly
  the answer a fresh call would give. The prompt *text* (not its id) is hashed because the
  cache is keyed by text: two ids with the same text must get the same answer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol, Sequence, runtime_checkable

from qbudget.errors import QBudgetError
from qbudget.pool import Prompt


@runtime_checkable
class Oracle(Protocol):
    """A teacher: ``answer`` returns one response per prompt, in order."""

    name: str
    fingerprint: str

    def answer(self, prompts: Sequence[Prompt], sample: int = 0) -> list[str]: ...


class OracleCallError(QBudgetError):
    """An oracle call failed for good (e.g. retries exhausted).

    ``partial`` maps positions in the requested batch to responses that *did* arrive before
    the failure: real, paid-for answers the ledger stores so a retry does not pay for them
    again, while the failed purchase itself is never charged. ``partial_usage`` holds
    their usage (same positions) when the oracle reports it.
    """

    def __init__(self, message: str, partial: dict[int, str] | None = None,
                 partial_usage: dict | None = None):
        super().__init__(message)
        self.partial: dict[int, str] = dict(partial or {})
        #: the :class:`qbudget.oracles.usage.Usage` of those answers, where known
        self.partial_usage: dict = dict(partial_usage or {})


def stable_hash(obj) -> str:
    """sha256 hex digest of canonical JSON (sorted keys): equal inputs, equal hash, any process."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def prompt_hash(text: str) -> str:
    """sha256 hex digest of a prompt's text: the cache key component for the prompt."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_seed(seed: int, text: str, sample: int = 0) -> int:
    """A 31-bit seed for one (prompt, sample): independent of batch order and composition."""
    from qbudget.seeding import stable_seed

    return stable_seed(int(seed), int(sample), text)
