"""Hashed word and character n-gram features, as padded sparse rows.

Why hashed and sparse: the probe has ~10,000 answers with open vocabulary; hashing into
a fixed 2^k space needs no fitted vocabulary (so train and test featurise
independently), and a padded (index, value) representation makes a logistic regression
step a gather plus a scatter-add instead of a dense [N, 2^k] matmul. Hashes are CRC-32
(stable across processes, unlike Python's salted ``hash``); character n-grams are
computed once per distinct token and cached.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np

from qbudget.padding import pow2_at_least

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _h(s: str) -> int:
    return zlib.crc32(s.encode("utf-8"))


class HashedNgrams:
    """Featuriser: word 1..word_n-grams, char n-grams (within tokens), length, prompt echo."""

    def __init__(self, dim_log2: int = 18, word_n: int = 2, char_n: Sequence[int] = (3, 4, 5),
                 max_features: int = 2048):
        self.dim = 1 << dim_log2
        self.word_n = word_n
        self.char_n = tuple(char_n)
        self.max_features = max_features
        self._tok_cache: dict[str, tuple[int, np.ndarray]] = {}
        # each distinct (text, prompt) is featurised once per featuriser: the folds of a
        # cross-fitted evaluation share one (AdversaryData.ngram_features)
        self._row_cache: dict = {}

    def _token(self, tok: str) -> tuple[int, np.ndarray]:
        hit = self._tok_cache.get(tok)
        if hit is None:
            padded = f"<{tok}>"
            grams = [padded[i:i + n] for n in self.char_n for i in range(len(padded) - n + 1)]
            hit = (_h("w:" + tok), np.array([_h("c:" + g) for g in grams], np.uint64))
            self._tok_cache[tok] = hit
        return hit

    def _row(self, text: str, prompt_tokens: set | None) -> np.ndarray:
        toks = _TOKEN.findall(text.lower())
        parts = []
        if toks:
            info = [self._token(t) for t in toks]
            w = np.array([i[0] for i in info], np.uint64)
            parts.append(w)
            for n in range(2, self.word_n + 1):
                if len(w) >= n:
                    mixed = w[: len(w) - n + 1].copy()
                    for j in range(1, n):
                        mixed = mixed * _MIX + w[j: len(w) - n + 1 + j] + np.uint64(n)
                    parts.append(mixed)
            parts.extend(i[1] for i in info)
        extra = [f"len:{min(len(toks), 128) // 4}", f"end:{toks[-1] if toks else ''}"]
        if prompt_tokens is not None:
            echo = [t for t in toks if t in prompt_tokens]
            extra += [f"e:{t}" for t in echo]
            extra.append(f"ov:{int(10 * len(echo) / max(1, len(toks)))}")
        parts.append(np.array([_h("x:" + e) for e in extra], np.uint64))
        return np.concatenate(parts) % np.uint64(self.dim)

    def featurize(self, texts: Sequence[str], prompts: Sequence[str] | None = None):
        """(idx int32 [N, K], val float32 [N, K]): log-count features, rows L2-normalised.

        K is a power of two ≥ the widest row (capped at max_features, keeping the most
        frequent features), so repeated calls with similar data reuse compiled shapes.
        """
        rows_i, rows_v = [], []
        done = self._row_cache
        for i, text in enumerate(texts):
            memo = (text, None if prompts is None else prompts[i])
            hit = done.get(memo)
            if hit is None:
                ptoks = None if prompts is None else set(_TOKEN.findall(prompts[i].lower()))
                u, c = np.unique(self._row(text, ptoks), return_counts=True)
                if len(u) > self.max_features:
                    keep = np.argsort(-c, kind="stable")[: self.max_features]
                    u, c = u[keep], c[keep]
                v = np.log1p(c).astype(np.float32)
                hit = done[memo] = (u.astype(np.int32), v / np.linalg.norm(v))
            rows_i.append(hit[0])
            rows_v.append(hit[1])
        widest = max((len(r) for r in rows_i), default=1)
        k = min(self.max_features, pow2_at_least(widest, 64))
        idx = np.zeros((len(rows_i), k), np.int32)
        val = np.zeros((len(rows_i), k), np.float32)
        for r, (i, v) in enumerate(zip(rows_i, rows_v)):
            idx[r, : len(i)] = i
            val[r, : len(v)] = v
        return idx, val
