"""Semantic similarity between teacher and student answers to the same prompt.

Cosine of L2-normalised MiniLM embeddings, one value per probe prompt, summarised as a
mean with a 95% interval overall and per category. The teacher-vs-teacher ceiling (two
independent teacher samples) shows how much of the gap is plain sampling noise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qbudget.stats import mean_interval


def pair_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [N, d] embedding arrays (normalises defensively)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(1) / (na * nb)


def similarity_rows(metric: str, cosines: np.ndarray, categories: np.ndarray,
                    names: Sequence[str], alpha: float = 0.05) -> list[dict]:
    """Result rows (metric, adversary "", category, value, ci_low, ci_high, n): all + each category."""
    cosines = np.asarray(cosines, np.float64)
    categories = np.asarray(categories)
    rows = []
    groups = [("all", np.ones(len(cosines), bool))]
    groups += [(name, categories == i) for i, name in enumerate(names)]
    for name, sel in groups:
        m, lo, hi = mean_interval(cosines[sel], alpha)
        rows.append({"metric": metric, "adversary": "", "category": name, "value": m,
                     "ci_low": lo, "ci_high": hi, "n": int(sel.sum())})
    return rows
