"""``random``: uniform sampling without replacement from the unbought pool (the floor baseline)."""

from __future__ import annotations

from qbudget.strategy import SelectionContext, Strategy, random_unbought, stateless


def make() -> Strategy:
    """Uniformly random unbought prompts (the baseline every strategy must beat)."""

    def select(signals, ctx: SelectionContext, k: int, key):
        return random_unbought(ctx, k, key)

    return stateless("random", make.__doc__, (), {}, select)
