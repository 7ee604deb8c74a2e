"""``uncertainty``: prompts where the student is least sure of its own answer.

Score = the student's mean predictive entropy (nats) over the first ``tokens`` steps of
its own greedy continuation (signal ``entropy``), on a seeded random subset of
``candidates`` unbought prompts; the top-k are bought (ties: lower index), topped up at
random if fewer candidates than k remain. Without a student, picks are uniform random.
"""

from __future__ import annotations

from qbudget.signals import spec
from qbudget.strategy import SelectionContext, Strategy, random_unbought, top_scored


def make(candidates: int = 2048, tokens: int = 8) -> Strategy:
    """Highest student predictive entropy along its own greedy continuation."""
    if int(candidates) < 1 or int(tokens) < 1:
        raise ValueError("candidates and tokens must be >= 1")

    def init(ctx: SelectionContext):
        return None

    def select(state, signals, ctx: SelectionContext, k: int, key):
        sig = signals.get("entropy")
        if sig is None:
            return random_unbought(ctx, k, key), state
        return top_scored(sig.indices, sig.values["entropy"], ctx, k, key), state

    return Strategy("uncertainty", make.__doc__,
                    (spec("entropy", candidates=int(candidates), tokens=int(tokens)),),
                    {"candidates": int(candidates), "tokens": int(tokens)}, init, select)
