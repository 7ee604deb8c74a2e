"""Signal ``adversary_scores``: a discriminator of teacher vs student answers, on bought data only.

A logistic regression on MiniLM answer embeddings (+ log length) learns teacher answers
(label 0) against the student's own answers to the same bought prompts (label 1); the
student then answers candidate prompts and the discriminator's P(student) scores them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from qbudget.seeding import numpy_rng
from qbudget.signals.common import CandidateScores, candidate_subset
from qbudget.strategy import SelectionContext


def answer_features(texts: Sequence[str]) -> np.ndarray:
    """MiniLM embedding of an answer plus its log length in characters."""
    from qbudget.models.encoder import shared_encoder

    emb = shared_encoder().encode(list(texts))
    loglen = np.log1p([len(t) for t in texts]).astype(np.float32)[:, None]
    return np.concatenate([emb, loglen], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0):
    """L2-regularised logistic regression (L-BFGS on standardised features); returns a scorer."""
    from scipy.optimize import minimize

    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    zb = np.concatenate([z, np.ones((len(z), 1))], axis=1).astype(np.float64)
    y = y.astype(np.float64)

    def f(w):
        s = zb @ w
        loss = np.logaddexp(0.0, s) - y * s
        g = zb.T @ (1.0 / (1.0 + np.exp(-s)) - y)
        reg = 0.5 * l2 * (w[:-1] ** 2).sum()
        return loss.sum() + reg, g + l2 * np.concatenate([w[:-1], [0.0]])

    w = minimize(f, np.zeros(zb.shape[1]), jac=True, method="L-BFGS-B",
                 options={"maxiter": 200}).x

    def score(xn: np.ndarray) -> np.ndarray:
        zn = (xn - mu) / sd
        return (1.0 / (1.0 + np.exp(-(zn @ w[:-1] + w[-1])))).astype(np.float32)

    return score


def student_answers(ctx: SelectionContext, texts: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """The student's answers, sampled as the teacher samples (``ctx.sampling``), per-prompt seeds."""
    from qbudget.models.generate import generate_text

    s = dict(ctx.sampling)
    return generate_text(ctx.student, ctx.tokenizer, list(texts),
                         max_new_tokens=int(s.get("max_new_tokens", 32)),
                         temperature=float(s.get("temperature", 0.0)), top_p=float(s.get("top_p", 1.0)),
                         seeds=list(seeds))


def adversary_scores_signal(ctx, key, *, candidates, train_max, min_train, l2):
    if ctx.student is None or len(ctx.answers) < min_train:
        return None
    k_train, k_cand, k_seed = jax.random.split(key, 3)
    rng = numpy_rng(k_train)
    n = len(ctx.answers)
    rows = np.sort(rng.choice(n, size=min(n, train_max), replace=False))
    bought = np.asarray(ctx.bought_indices)[rows]
    prompts = [ctx.pool[int(i)].text for i in bought]
    teacher = [ctx.answers[int(r)] for r in rows]
    seed0 = int(numpy_rng(k_seed).integers(0, 2**31 - 1))
    student = student_answers(ctx, prompts, [seed0 + int(i) for i in bought])
    x = answer_features(teacher + student)
    y = np.concatenate([np.zeros(len(teacher)), np.ones(len(student))])
    score = fit_logistic(x, y, l2)
    idx = candidate_subset(ctx, candidates, k_cand)
    cand = student_answers(ctx, [ctx.pool[int(i)].text for i in idx], [seed0 + int(i) for i in idx])
    return CandidateScores(idx, {"teacher_unlike": score(answer_features(cand))})
