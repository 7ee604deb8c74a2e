"""Per-pair training losses and the signal ``heldout_gain``: the bandit's evidence.

``heldout_gain`` measures what one round's purchase taught the student, on data it has
not trained on. Let S_r be the student's adapters at round r's selection (trained on the
batches B_0..B_{r−1}) and B_r the batch bought in round r. At round R ≥ 2, with
r = R − 2, the batch B_{r+1} is fresh to both S_r and S_{r+1}, so

    drop = (L(S_r, B_{r+1}) − L(S_{r+1}, B_{r+1})) / max(L(S_r, B_{r+1}), 1e-8)

— the relative fall of the mean response NLL caused by training on B_r — is a held-out
measure of B_r's value, both students scored on the *same* batch. L is the mean over the
batch of :func:`pair_losses`. It needs the adapters of past rounds, which the loop keeps
in ``ctx.adapter_history`` (see :func:`qbudget.signals.adapter_history_depth`), and
the purchase boundaries ``ctx.round_q``. Being a signal, its forward passes are timed as
signal computation and the strategy reading it stays a pure function of its inputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbudget.signals.batching import pair_batch
from qbudget.signals.common import bought_pairs, split_student, with_lora_leaves

#: Rounds back that ``heldout_gain`` reads adapters from (S_{R−2} and S_{R−1} at round R).
HELDOUT_GAIN_LAG = 2


class HeldoutGain(NamedTuple):
    """Round r's purchase judged on round r + 1's: ``drop`` as in the module docstring."""

    round: int          # r: the round whose batch B_r is judged
    drop: float         # relative fall of the mean NLL on B_{r+1}, S_r -> S_{r+1}
    loss_before: float  # L(S_r, B_{r+1})
    loss_after: float   # L(S_{r+1}, B_{r+1})


@functools.partial(jax.jit, static_argnums=(0,))
def _pair_nll(graphdef, lora, rest, ids, mask, loss_mask):
    from qbudget.models.decoder import apply
    from qbudget.models.train import masked_ce_rows

    return masked_ce_rows(apply(graphdef, lora, rest, ids, mask), ids, loss_mask)


def pair_losses(student, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                lora=None, batch_size: int = 32) -> np.ndarray:
    """Per-pair mean response NLL under the student (optionally with other LoRA weights).

    The training loss per pair (:func:`qbudget.models.train.masked_ce_rows`); ``lora``
    are the leaves of a :func:`qbudget.signals.lora_snapshot`.
    """
    graphdef, own, rest = split_student(student)
    lora = own if lora is None else with_lora_leaves(own, lora)
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask, lm = pair_batch(tokenizer, prompts[s: s + batch_size], responses[s: s + batch_size])
        out.append(np.asarray(_pair_nll(graphdef, lora, rest, jnp.asarray(ids), jnp.asarray(mask),
                                        jnp.asarray(lm))))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def heldout_gain_signal(ctx, key, *, batch_size) -> HeldoutGain | None:
    """:class:`HeldoutGain` for r = ctx.round − 2, or None when it cannot be measured.

    None: no student, round < 2, ``round_q`` or ``adapter_history`` not reaching back to
    round r (a context built without them), or nothing bought in round r + 1.
    """
    r = int(ctx.round) - HELDOUT_GAIN_LAG
    history, round_q = ctx.adapter_history, tuple(ctx.round_q)
    if (ctx.student is None or r < 0 or len(round_q) < r + 3
            or history.get(r) is None or history.get(r + 1) is None):
        return None
    rows = range(int(round_q[r + 1]), min(int(round_q[r + 2]), len(ctx.answers)))
    if not rows:
        return None
    prompts, answers = bought_pairs(ctx, rows)
    losses = [float(np.mean(pair_losses(ctx.student, ctx.tokenizer, prompts, answers,
                                        lora=history[s], batch_size=batch_size)))
              for s in (r, r + 1)]
    before, after = losses
    return HeldoutGain(r, (before - after) / max(before, 1e-8), before, after)
