"""``cost_aware``: any scoring strategy, ranking by score per unit of expected cost.

A teacher billed per token makes a long answer cost many times a short one, so the most
informative prompt is not always the best buy. ``cost_aware`` wraps a strategy that ranks
candidates by a score (``base``, with its parameters ``base_params``) and has it rank by
score / expected cost instead: the expected cost of an unbought prompt is its prompt tokens
plus the mean completion of the answers bought so far in its category, at the teacher's
price (:attr:`qbudget.strategy.SelectionContext.expected_cost`). Picks the base strategy
makes without a score (its random warm-up) are unchanged. In a bench TOML::

    [grid]
    strategies = ["disagreement", "cost_aware"]
    [strategy_params.cost_aware]
    base = "disagreement"
"""

from __future__ import annotations

import dataclasses

from qbudget.errors import QBudgetError
from qbudget.strategy import Strategy, get_strategy


def make(base: str = "disagreement", base_params: dict | None = None) -> Strategy:
    """A scoring strategy ranking by score per unit of expected cost (US$ or tokens)."""
    if not isinstance(base, str) or base == "cost_aware":
        raise QBudgetError(f"cost_aware: 'base' must name another strategy, got {base!r}")
    if base_params is not None and not isinstance(base_params, dict):
        raise QBudgetError("cost_aware: 'base_params' must be a table of the base strategy's "
                           "parameters")
    inner = get_strategy(base, base_params or {})
    if not inner.signals:
        raise QBudgetError(f"cost_aware: strategy '{base}' ranks by no score (it declares no "
                           "signal), so there is nothing to divide by cost; use a scoring "
                           "strategy such as disagreement, uncertainty or adversary")

    def select(state, signals, ctx, k, key):
        return inner.select(state, signals, dataclasses.replace(ctx, rank_per_cost=True), k, key)

    params = {"base": base, "base_params": dict(inner.params)}
    return Strategy("cost_aware", make.__doc__, inner.signals, params, inner.init, select)
