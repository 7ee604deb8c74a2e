"""``adversary``: buy where the student's answers look least like the teacher's.

Signal ``adversary_scores``: a logistic-regression discriminator on MiniLM answer
embeddings (+ log length) is trained on the teacher answers bought so far (label 0)
against the student's own answers to the same prompts (label 1; at most ``train_max``
of them, a seeded subset). The student then answers a seeded subset of ``candidates``
unbought prompts, and the prompts whose answers the discriminator finds most
student-like — teacher-unlike — are bought. Until ``min_train`` answers are bought,
picks are uniform random. Only bought data is used (never the probe).
"""

from __future__ import annotations

from qbudget.signals import spec
from qbudget.strategy import Strategy, stateless, top_or_random


def make(candidates: int = 256, train_max: int = 256, min_train: int = 8) -> Strategy:
    """Prompts whose student answers a discriminator (bought answers vs student) flags most."""
    if min(int(candidates), int(train_max)) < 1 or int(min_train) < 2:
        raise ValueError("candidates, train_max must be >= 1 and min_train >= 2")
    params = {"candidates": int(candidates), "train_max": int(train_max), "min_train": int(min_train)}
    return stateless("adversary", make.__doc__, (spec("adversary_scores", **params),), params,
                     top_or_random("adversary_scores", "teacher_unlike"))
