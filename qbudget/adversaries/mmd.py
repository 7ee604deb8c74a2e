"""``mmd``: the MMD two-sample test of teacher vs student completions, as an evaluation.

It is the distribution-level check of Model Equality Testing (Gao, Liang, Guestrin, ICLR
2025; the statistics are in :mod:`qbudget.mmd`): the Hamming kernel on completions of the
same probe prompts, with a permutation p-value. Unlike the other adversaries it fits
nothing, so it has no sample or compute bound to report (q = 0) and uses every probe
prompt, adversary-train and adversary-test alike: the more completions, the more power,
and none of them can leak into a fitted model. It returns p-values
(:class:`~qbudget.adversaries.base.TwoSampleResult`), not per-unit outcomes, so it has no
advantage, takes no part in the ``max`` rows and is not certified; it sits next to the
learned adversaries' ``p_value`` rows as a check that needs no training to be trusted.

Completions are compared as token ids: the student's tokenizer when the evaluation has
one (the loop and ``qbudget eval --world``), else whitespace-separated words (answers read
from files), truncated or padded to ``length`` positions.
"""

from __future__ import annotations

import jax
import numpy as np

from qbudget.adversaries.base import AdversaryData, TwoSampleResult
from qbudget.adversaries.configs import MMDConfig
from qbudget.errors import QBudgetError
from qbudget.mmd import mmd_test, pad_tokens
from qbudget.seeding import numpy_rng


def token_ids(texts: list[str], tokenizer=None) -> list[list[int]]:
    """Each text's token ids: the tokenizer's (no special tokens) or word ids."""
    if tokenizer is not None:
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]


def run(data: AdversaryData, cfg: MMDConfig, key: jax.Array) -> TwoSampleResult:
    n = len(data.prompts)
    if n < 2:
        raise QBudgetError("the MMD test needs at least 2 probe prompts")
    ids = token_ids(list(data.teacher) + list(data.student), data.tokenizer)
    toks = pad_tokens(ids, cfg.length)
    teacher, student = toks[:n], toks[n:]
    rng = numpy_rng(key)
    cats = np.asarray(data.categories)
    groups = [("all", np.arange(n))]
    groups += [(int(c), np.flatnonzero(cats == c)) for c in np.unique(cats)]
    tests = {}
    flops = 0.0
    for name, rows in groups:
        if len(rows) < 2:
            continue
        r = mmd_test(teacher[rows], student[rows], np.arange(len(rows)),
                     n_permutations=cfg.n_permutations, rng=rng)
        tests[name] = (r.statistic, r.p_value, int(len(rows)))
        m = 2.0 * len(rows)
        flops += m * m * cfg.length + 2.0 * cfg.n_permutations * m * m
    return TwoSampleResult(tests, q=0, t=0, flops=flops)
