"""What every adversary sees and returns.

An adversary is trained on the adversary-train split of the probe (at most ``q`` of
its prompts: the sample bound) for ``t`` optimiser steps (the compute bound) and then
decides on held-out *units* of the adversary-test split. For single-answer adversaries
a unit is one answer (each test prompt gives its teacher answer, label 1, and its
student answer, label 0 — balanced by construction); for the pairwise adversary a unit
is one prompt with its two answers. Accuracy over units gives the advantage 2·acc − 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import jax
import numpy as np

from qbudget.errors import QBudgetError


@dataclass
class AdversaryData:
    """Probe texts, splits and (lazily computed, cached) MiniLM embeddings."""

    prompts: list[str]
    teacher: list[str]
    student: list[str]
    categories: np.ndarray            # int32 [N] index into category names
    train_idx: np.ndarray             # int64 indices of adversary-train prompts
    test_idx: np.ndarray              # int64 indices of adversary-test prompts
    encoder: object | None = None     # SentenceEncoder (needed by embed/pairwise/finetune)
    encode_batch_size: int = 64
    #: the student's tokenizer when the evaluation has one (``mmd`` compares its token ids;
    #: answers read from files have none, and ``mmd`` then compares words)
    tokenizer: object | None = None
    _emb: dict = field(default_factory=dict, repr=False)
    _feats: dict = field(default_factory=dict, repr=False)

    def ngram_features(self, dim_log2: int):
        """The hashed n-gram featuriser of this data at ``2**dim_log2`` (one per size, so
        the folds of a cross-fitted evaluation, which share it, featurise each text once)."""
        from qbudget.adversaries.features import HashedNgrams

        if dim_log2 not in self._feats:
            self._feats[dim_log2] = HashedNgrams(dim_log2)
        return self._feats[dim_log2]

    def embeddings(self, which: str) -> np.ndarray:
        """Embeddings of 'prompts', 'teacher' or 'student' texts, [N, d], computed once."""
        if which not in self._emb:
            if self.encoder is None:
                raise QBudgetError("this adversary needs a sentence encoder")
            texts = {"prompts": self.prompts, "teacher": self.teacher,
                     "student": self.student}[which]
            self._emb[which] = self.encoder.encode(texts, batch_size=self.encode_batch_size)
        return self._emb[which]

    def set_embeddings(self, which: str, emb: np.ndarray) -> None:
        self._emb[which] = np.asarray(emb, np.float32)


@dataclass
class AdversaryResult:
    """Per-unit test outcomes plus the bounds the adversary ran under."""

    correct: np.ndarray               # bool [units]
    unit_category: np.ndarray         # int32 [units]
    q: int                            # adversary-train prompts used
    t: int                            # optimiser steps
    flops: float                      # estimated training + test FLOPs
    extra: dict = field(default_factory=dict)

    @staticmethod
    def concat(parts: list["AdversaryResult"], *, flops: float,
               extra: dict | None = None) -> "AdversaryResult":
        """The units of several results of one adversary (folds, or chunks of the test
        split) one after another; bounds from the first, ``flops`` and ``extra`` as given
        (whether the parts' costs add up depends on whether each trained anew)."""
        first = parts[0]
        return AdversaryResult(np.concatenate([p.correct for p in parts]),
                               np.concatenate([p.unit_category for p in parts]), q=first.q,
                               t=first.t, flops=flops,
                               extra=dict(first.extra if extra is None else extra))


def prompt_outcomes(result: AdversaryResult, n_test: int) -> np.ndarray:
    """Per adversary-test prompt, the 0/1 correctness of its units: bool ``[n_test, k]``.

    The unit layout every classifier adversary follows: single-answer adversaries return
    ``2 * n_test`` units, the teacher answers of the test prompts (in ``test_idx`` order)
    then their student answers (``k = 2``: column 0 teacher, 1 student); the pairwise
    adversary one unit per test prompt (``k = 1``). Sequential certification consumes
    prompts, since a prompt is what costs a teacher answer.
    """
    c = np.asarray(result.correct, bool).reshape(-1)
    if len(c) == 2 * n_test:
        return np.stack([c[:n_test], c[n_test:]], axis=1)
    if len(c) == n_test:
        return c[:, None]
    raise QBudgetError(f"an adversary returned {len(c)} test units for {n_test} test prompts")


@dataclass
class TwoSampleResult:
    """What a test adversary (``mmd``) returns instead of per-unit outcomes: per category
    (``"all"`` and each category name), ``(statistic, p_value, n_prompts)``."""

    tests: dict                       # category -> (statistic, p_value, n)
    q: int                            # adversary-train prompts used (0: nothing is fitted)
    t: int                            # optimiser steps (0)
    flops: float
    extra: dict = field(default_factory=dict)


def train_subset(data: AdversaryData, q: int | None, key: jax.Array) -> np.ndarray:
    """The adversary's q training prompts: a seeded subset of the train split (all if None)."""
    n = len(data.train_idx)
    if n == 0:
        raise QBudgetError("the adversary-train split is empty")
    if len(data.test_idx) == 0:
        raise QBudgetError("the adversary-test split is empty")
    check_sample_bound(q, n)
    if q is None or q == n:
        return np.asarray(data.train_idx)
    perm = np.asarray(jax.random.permutation(key, n))
    return np.sort(np.asarray(data.train_idx)[perm[:q]])


def check_sample_bound(q: int | None, n_train: int) -> None:
    """QBudgetError unless q is None (= all) or within 1..n_train."""
    if q is not None and not 1 <= q <= n_train:
        raise QBudgetError(f"adversary sample bound q={q} must be in 1..{n_train} "
                           "(the adversary-train split size)")


Runner = Callable[[AdversaryData, object, jax.Array], AdversaryResult]
