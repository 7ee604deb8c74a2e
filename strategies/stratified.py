"""``stratified``: random sampling within categories, with proportional or equal allocation.

The source study's baseline. Allocation is *cumulative*: after this round the bought set
should hold ``T = bought + k`` prompts split across categories in proportion to each
category's pool size (``proportional``) or evenly (``equal``). Each round allocates ``k``
by the largest-remainder method towards those targets — remainders ties go to the lower
category index, which is deterministic, and because targets are cumulative a category
that loses a tie now is ahead in the next round. A category with nothing left to buy is
exhausted: its share is re-spread over the others (repeat until ``k`` is placed).
Within a category, prompts are drawn uniformly at random with the key.
"""

from __future__ import annotations

import jax
import numpy as np

from qbudget.errors import QBudgetError
from qbudget.strategy import SelectionContext, Strategy, numpy_rng, stateless

ALLOCATIONS = ("proportional", "equal")


def allocate(k: int, weights: np.ndarray, bought: np.ndarray, available: np.ndarray) -> np.ndarray:
    """How many of ``k`` picks each category gets (int64 [C], capped by ``available``)."""
    weights = np.asarray(weights, np.float64)
    bought = np.asarray(bought, np.int64)
    available = np.asarray(available, np.int64)
    alloc = np.zeros(len(weights), np.int64)
    remaining = min(int(k), int(available.sum()))
    cats = np.arange(len(weights))
    while remaining > 0:
        active = (available - alloc > 0) & (weights > 0)
        if active.any():
            w = np.where(active, weights, 0.0)
        else:                                     # only zero-weight categories are left
            active = available - alloc > 0
            w = active.astype(np.float64)
        held = bought + alloc
        total = held[active].sum() + remaining
        need = np.where(active, np.maximum(total * w / w.sum() - held, 0.0), 0.0)
        if need.sum() <= 0:
            need = w
        raw = remaining * need / need.sum()
        base = np.floor(raw).astype(np.int64)
        extra = remaining - int(base.sum())
        order = np.lexsort((cats, -(raw - base)))    # largest remainder, then lowest index
        base[order[:extra]] += 1
        base = np.minimum(base, available - alloc)
        alloc += base
        remaining -= int(base.sum())
    return alloc


def make(allocation: str = "proportional") -> Strategy:
    """Random within categories; proportional or equal allocation across categories."""
    if allocation not in ALLOCATIONS:
        raise QBudgetError(f"stratified: allocation must be one of {', '.join(ALLOCATIONS)}, "
                           f"got '{allocation}'")

    def select(signals, ctx: SelectionContext, k: int, key):
        cats = np.asarray(signals["categories"])
        c = max(len(ctx.category_names), int(cats.max(initial=-1)) + 1)
        mask = np.asarray(ctx.bought_mask, bool)
        size = np.bincount(cats, minlength=c)
        bought = np.bincount(cats[mask], minlength=c)
        weights = size.astype(np.float64) if allocation == "proportional" else (size > 0).astype(np.float64)
        alloc = allocate(k, weights, bought, size - bought)
        picks = []
        for ci in np.flatnonzero(alloc):
            idx = np.flatnonzero((cats == ci) & ~mask)
            rng = numpy_rng(jax.random.fold_in(key, int(ci)))
            picks.append(rng.choice(idx, size=int(alloc[ci]), replace=False))
        return np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, np.int64)

    return stateless("stratified", make.__doc__, ("categories",), {"allocation": allocation}, select)
