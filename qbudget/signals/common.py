"""What several signals share: candidate scores, candidate subsets, the student's adapters.

The student's LoRA adapters are the only part of it a signal varies (a committee
stacks copies of them, the bandit's evidence swaps in earlier ones); the frozen base
weights are shared, split off once by :func:`split_student`.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qbudget.errors import QBudgetError
from qbudget.seeding import numpy_rng
from qbudget.strategy import SelectionContext


class CandidateScores(NamedTuple):
    """Scores for a subset of the pool: ``values[measure][i]`` belongs to ``indices[i]``."""

    indices: np.ndarray                 # int64 pool indices (unbought, ascending)
    values: Mapping[str, np.ndarray]    # measure name -> float32 [len(indices)]


def candidate_subset(ctx: SelectionContext, n: int, key) -> np.ndarray:
    """A seeded uniform subset of ``min(n, remaining)`` unbought indices, ascending."""
    idx = ctx.unbought()
    if n <= 0 or idx.size <= n:
        return idx
    return np.sort(numpy_rng(key).choice(idx, size=n, replace=False)).astype(np.int64)


def bought_pairs(ctx: SelectionContext, rows=None) -> tuple[list[str], list[str]]:
    """(prompt texts, teacher answers) of the bought pairs, in purchase order.

    ``rows``: positions in the purchase order (default: all of them).
    """
    if rows is None:
        rows = range(len(ctx.answers))
    prompts = [ctx.pool[int(ctx.bought_indices[int(j)])].text for j in rows]
    return prompts, [ctx.answers[int(j)] for j in rows]


# ------------------------------------------------------------ the student's adapters

def split_student(student):
    """``(graphdef, lora, rest)`` of a CausalLM; LoRA params are split off first.

    :func:`qbudget.models.decoder.split_lora`, plus a user-facing error when there is
    nothing to split: every model-based signal varies the adapters.
    """
    from qbudget.models.decoder import split_lora

    graphdef, lora, rest = split_lora(student)
    if not jax.tree.leaves(lora):
        raise QBudgetError("the student has no LoRA adapters (attach_lora before selecting)")
    return graphdef, lora, rest


def lora_snapshot(student) -> list[np.ndarray]:
    """Host copies of the student's LoRA leaves (plain, picklable; safe against donation)."""
    _, lora, _ = split_student(student)
    return [np.array(a) for a in jax.tree.leaves(lora)]


def with_lora_leaves(lora, leaves):
    """``lora``'s tree with the leaves of a :func:`lora_snapshot` put back in."""
    return jax.tree.unflatten(jax.tree.structure(lora), [jnp.asarray(a) for a in leaves])


def stack_members(lora, members: int):
    """M identical copies of a LoRA state along a new leading (member) axis."""
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (members,) + a.shape), lora)


def record_adapters(history: Mapping[int, Any], round: int, student, depth: int) -> dict[int, Any]:
    """The adapter history for ``round``'s :class:`SelectionContext`: what the loop keeps.

    A new dict holding ``history``'s snapshots of rounds ``round − depth .. round − 1``
    plus ``lora_snapshot(student)`` as round ``round`` (take it at the selection, before
    the round's distillation moves the adapters). ``depth`` comes from
    :func:`qbudget.signals.adapter_history_depth`; with 0 nothing is kept or copied.
    """
    if depth <= 0:
        return {}
    kept = {int(r): h for r, h in history.items() if round - depth <= int(r) < round}
    kept[int(round)] = lora_snapshot(student)
    return kept
