"""``disagreement``: query-by-committee with a LoRA committee of the student.

Signal ``disagreement`` (see :func:`qbudget.signals.committee_scores`): M members share
the student's frozen base weights; each starts from the student's current adapters and
takes ``steps`` Adam steps on its own bootstrap resample of the bought answers (one
vmapped step trains all members). For a seeded subset of ``candidates`` unbought prompts
the members' next-token distributions are compared along the greedy continuation of their
mean distribution over the first ``tokens`` tokens:

- ``measure="js"`` (default): generalised Jensen–Shannon divergence = McCallum & Nigam's
  mean KL divergence to the mean;
- ``measure="vote_entropy"``: entropy of the members' argmax votes (ties broken by js).

Defaults are sized against the distillation step after a selection (30 steps of batch
16 = 480 sequences forward+backward): committee training is M·steps·batch = 256
sequences forward+backward, scoring M·candidates = 1,024 prompt prefills plus 3 cached
one-token decode steps each (forward only, prompts only). ``benchmarks/perf_kcenter.py``
times a default round next to a default distillation step; on the shared 2-core test
machine the round measured about 2× the distillation step with 512 candidates, hence
256 — lower ``candidates``/``steps`` further if selection must be cheaper still. Before anything is bought (no data for a committee) picks are uniform random.
"""

from __future__ import annotations

from qbudget.errors import QBudgetError
from qbudget.signals import spec
from qbudget.strategy import SelectionContext, Strategy, random_unbought, top_scored

MEASURES = ("js", "vote_entropy")


def committee_spec(members, candidates, tokens, steps, learning_rate) -> str:
    if int(members) < 2:
        raise QBudgetError("disagreement: members must be >= 2")
    if min(int(candidates), int(tokens), int(steps)) < 1:
        raise QBudgetError("disagreement: candidates, tokens and steps must be >= 1")
    return spec("disagreement", members=int(members), candidates=int(candidates),
                tokens=int(tokens), steps=int(steps), learning_rate=float(learning_rate))


def make(members: int = 4, candidates: int = 256, tokens: int = 4, steps: int = 8,
         learning_rate: float = 2e-3, measure: str = "js") -> Strategy:
    """Query-by-committee: most disagreement among M bootstrap-trained LoRA students."""
    if measure not in MEASURES:
        raise QBudgetError(f"disagreement: measure must be one of {', '.join(MEASURES)}, got '{measure}'")
    sig = committee_spec(members, candidates, tokens, steps, learning_rate)
    params = {"members": int(members), "candidates": int(candidates), "tokens": int(tokens),
              "steps": int(steps), "learning_rate": float(learning_rate), "measure": measure}

    def init(ctx: SelectionContext):
        return None

    def select(state, signals, ctx: SelectionContext, k: int, key):
        d = signals.get("disagreement")
        if d is None:
            return random_unbought(ctx, k, key), state
        secondary = d.values["js"] if measure == "vote_entropy" else None
        return top_scored(d.indices, d.values[measure], ctx, k, key, secondary=secondary), state

    return Strategy("disagreement", make.__doc__, (sig,), params, init, select)
