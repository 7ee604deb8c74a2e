"""Signals: the per-round quantities strategies select on, computed only when declared.

A strategy declares signal *specs* (``Strategy.signals``); the loop calls
``compute_signals(strat.signals, ctx, key)`` and passes the resulting dict (keyed by
signal name) to ``select``. A spec is a name, optionally with parameters in brackets —
``"entropy[candidates=1024,tokens=8]"`` — so a strategy's parameters reach the signal
without widening the loop's contract.

Signals (values in the dict):

- ``categories``: int32 [N] category index per pool prompt.
- ``embeddings``: float32 [N, 384] L2-normalised MiniLM prompt embeddings, cached on disk
  keyed by encoder and pool checksum (:func:`cached_pool_embeddings`).
- ``entropy``: :class:`CandidateScores` — the student's mean predictive entropy (nats)
  along its own greedy continuation, for a seeded random subset of unbought prompts.
- ``disagreement``: :class:`CandidateScores` — disagreement of a LoRA committee along the
  greedy continuation of the committee's mean distribution (see :func:`committee_scores`).
- ``adversary_scores``: :class:`CandidateScores` — P(student) of a discriminator trained
  on bought teacher answers vs the student's answers to the same prompts, applied to
  the student's answers on candidates (high = teacher-unlike).
- ``heldout_gain``: :class:`HeldoutGain` ``(round=r, drop, ...)`` — at round R ≥ 2, with
  r = R − 2, the relative fall of the mean response NLL on the batch bought in round
  r + 1 between the student's adapters at the selections of rounds r and r + 1: what
  training on round r's batch taught, on fresh teacher answers (the bandit's reward).
  Reads ``ctx.round_q`` and ``ctx.adapter_history``; ``None`` without them.

Model-based signals are ``None`` when they cannot be computed yet (no student in the
context, or too few bought answers to train a committee/discriminator, or no adapter
history); strategies then fall back to uniform random picks (or, for the bandit, no
reward), which they document.

Signals that compare the student with its earlier selves read host snapshots of its
adapters from ``ctx.adapter_history``; :func:`adapter_history_depth` says how many
rounds back the declared signals look, and :func:`record_adapters` is what the loop
keeps from round to round (an empty dict when no declared signal needs history).

Every random choice derives from the ``key`` passed in (per signal: ``fold_in(key,
crc32(name))``), so a round's signals are reproducible.

Modules, one concern each: :mod:`~qbudget.signals.specs` (specs, registry,
:func:`compute_signals`), :mod:`~qbudget.signals.embeddings` (categories, embeddings),
:mod:`~qbudget.signals.committee` (LoRA committee, continuation scores: disagreement,
entropy), :mod:`~qbudget.signals.discriminator` (adversary scores),
:mod:`~qbudget.signals.losses` (per-pair losses, heldout gain), and what they share in
:mod:`~qbudget.signals.common` (candidates, adapters) and
:mod:`~qbudget.signals.batching` (token batches).
"""

from __future__ import annotations

from qbudget.signals.batching import left_padded, pair_batch
from qbudget.signals.committee import (committee_scores, continuation_scores,
                                       train_committee)
from qbudget.signals.common import (CandidateScores, bought_pairs, candidate_subset,
                                    lora_snapshot, record_adapters, split_student,
                                    stack_members, with_lora_leaves)
from qbudget.signals.discriminator import answer_features, fit_logistic, student_answers
from qbudget.signals.embeddings import (cached_pool_embeddings, encoder_fingerprint,
                                        pool_checksum)
from qbudget.signals.losses import HeldoutGain, pair_losses
from qbudget.signals.specs import (SIGNAL_PARAMS, adapter_history_depth, compute_signals,
                                   parse_spec, spec)

__all__ = [
    "SIGNAL_PARAMS", "CandidateScores", "HeldoutGain", "adapter_history_depth",
    "answer_features", "bought_pairs", "cached_pool_embeddings", "candidate_subset",
    "committee_scores", "compute_signals", "continuation_scores", "encoder_fingerprint",
    "fit_logistic", "left_padded", "lora_snapshot", "pair_batch", "pair_losses", "parse_spec",
    "pool_checksum", "record_adapters", "spec", "split_student", "stack_members",
    "student_answers", "train_committee", "with_lora_leaves",
]
