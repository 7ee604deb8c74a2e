"""``hybrid``: diversity among the most contested prompts.

Take the ``top_factor·k`` candidates with the highest committee disagreement (signal
``disagreement``, measure ``js``), then choose ``k`` of them by greedy k-center on MiniLM
embeddings with every bought prompt as an initial centre — informative *and* spread out
(avoids buying k near-duplicates of one confusing prompt). Before the committee can be
trained (nothing bought) it is plain k-center over the whole pool.
"""

from __future__ import annotations

import numpy as np

from qbudget.strategy import SelectionContext, Strategy, stateless, top_scored
from strategies.disagreement import committee_spec
from strategies.diversity import k_center_greedy


def make(top_factor: int = 4, members: int = 4, candidates: int = 256, tokens: int = 2,
         steps: int = 4, learning_rate: float = 2e-3) -> Strategy:
    """Greedy k-center among the top-disagreement candidates of a LoRA committee."""
    if int(top_factor) < 1:
        raise ValueError("top_factor must be >= 1")
    sig = committee_spec(members, candidates, tokens, steps, learning_rate)
    params = {"top_factor": int(top_factor), "members": int(members), "candidates": int(candidates),
              "tokens": int(tokens), "steps": int(steps), "learning_rate": float(learning_rate)}

    def select(signals, ctx: SelectionContext, k: int, key):
        emb = signals["embeddings"]
        d = signals.get("disagreement")
        if d is None:
            return k_center_greedy(emb, ctx.bought_mask, k, key=key)
        want = min(int(k), ctx.unbought().size)
        top = top_scored(d.indices, d.values["js"], ctx, max(want, int(top_factor) * want), key)
        bought = np.asarray(ctx.bought_indices, np.int64)
        subset = np.concatenate([bought, top])
        labeled = np.zeros(subset.size, bool)
        labeled[: bought.size] = True
        picks = subset[k_center_greedy(emb[subset], labeled, want, key=key)]
        return picks.astype(np.int64)

    return stateless("hybrid", make.__doc__, (sig, "embeddings"), params, select)
