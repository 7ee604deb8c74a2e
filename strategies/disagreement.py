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
16 = 480 sequences forward+backward by default; the bench's 24 steps = 384): committee
training is M·steps·batch = 4·4·8 = 128 sequences forward+backward (members start from
the student's adapters, so a few steps already separate them), scoring M·candidates =
1,024 prompt prefills (forward only) plus one cached decode step each (``tokens=2``).
``candidates`` must stay well above the round size, or the top-k of the candidates is
just a random subset: 256 leaves a choice of 128 out of 256 at the bench's round size.
Measured in `make bench` (manifest timings, 8 selection rounds to q = 1,024): with 256
candidates, 4 tokens and 8 steps the selection rounds took 1.6× the distillation that
followed them; see docs/performance.md (perf_kcenter) for the current defaults' ratio, and
lower ``candidates``/``steps`` if selection must be cheaper. Before anything is bought
(no data for a committee) picks are uniform random.
"""

from __future__ import annotations

from qbudget.errors import QBudgetError
from qbudget.signals import spec
from qbudget.strategy import Strategy, stateless, top_or_random

MEASURES = ("js", "vote_entropy")


def committee_spec(members, candidates, tokens, steps, learning_rate) -> str:
    if int(members) < 2:
        raise QBudgetError("disagreement: members must be >= 2")
    if min(int(candidates), int(tokens), int(steps)) < 1:
        raise QBudgetError("disagreement: candidates, tokens and steps must be >= 1")
    return spec("disagreement", members=int(members), candidates=int(candidates),
                tokens=int(tokens), steps=int(steps), learning_rate=float(learning_rate))


def make(members: int = 4, candidates: int = 256, tokens: int = 2, steps: int = 4,
         learning_rate: float = 2e-3, measure: str = "js") -> Strategy:
    """Query-by-committee: most disagreement among M bootstrap-trained LoRA students."""
    if measure not in MEASURES:
        raise QBudgetError(f"disagreement: measure must be one of {', '.join(MEASURES)}, got '{measure}'")
    sig = committee_spec(members, candidates, tokens, steps, learning_rate)
    params = {"members": int(members), "candidates": int(candidates), "tokens": int(tokens),
              "steps": int(steps), "learning_rate": float(learning_rate), "measure": measure}
    # vote entropy takes few distinct values among M members: ties go to the larger js
    secondary = "js" if measure == "vote_entropy" else None
    return stateless("disagreement", make.__doc__, (sig,), params,
                     top_or_random("disagreement", measure, secondary))
