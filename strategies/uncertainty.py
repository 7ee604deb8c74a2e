"""``uncertainty``: prompts where the student is least sure of its own answer.

Score = the student's mean predictive entropy (nats) over the first ``tokens`` steps of
its own greedy continuation (signal ``entropy``), on a seeded random subset of
``candidates`` unbought prompts; the top-k are bought (ties: lower index), topped up at
random if fewer candidates than k remain. Without a student, picks are uniform random.
"""

from __future__ import annotations

from qbudget.signals import spec
from qbudget.strategy import Strategy, stateless, top_or_random


def make(candidates: int = 2048, tokens: int = 8) -> Strategy:
    """Highest student predictive entropy along its own greedy continuation."""
    if int(candidates) < 1 or int(tokens) < 1:
        raise ValueError("candidates and tokens must be >= 1")
    params = {"candidates": int(candidates), "tokens": int(tokens)}
    return stateless("uncertainty", make.__doc__, (spec("entropy", **params),), params,
                     top_or_random("entropy", "entropy"))
