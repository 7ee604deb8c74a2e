"""Evaluation that buys as it goes (certifying runs) and cross-fitted evaluation (issue 21).

* :func:`qbudget.sequential_eval.evaluate_sequentially` reaches the verdict an evaluation
  holding every answer reaches (same order, same fitted adversaries), and asks the teacher
  only for the adversary-train prompts and the test prompts it read, in chunks, in the
  certification order: nothing after the chunk where the verdict fell is requested.
* ``[eval] crossfit = K`` scores every probe prompt; its fold 0 is the uncross-fitted
  evaluation, and across independent draws the cross-fitted advantage varies less.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from qbudget.adversaries.configs import PairwiseConfig
from qbudget.config import CertifyConfig, EvalConfig
from qbudget.errors import QBudgetError
from qbudget.evaluate import evaluate_answers
from qbudget.pool import Prompt
from qbudget.sequential_eval import evaluate_sequentially
from test_adversaries import P, Q, SENTENCES

N, N_TRAIN = 1400, 400
PROBE = [Prompt(f"p{i}", f"question {i}?", ["a", "b", "c"][i % 3]) for i in range(N)]
# train and test prompts interleaved, as a world's split is
IS_TRAIN = (np.arange(N) % 7) < 2
CONFIG = EvalConfig(adversaries=("ngram", "pairwise"), similarity=False,
                    pairwise=PairwiseConfig(use_embeddings=False, t=100))
CHUNK = 32


def _draw(rng, probs, n=N):
    return [SENTENCES[i] for i in rng.choice(len(SENTENCES), n, p=probs)]


def _pick(rows, metric, adversary="max", category="all"):
    (row,) = [r for r in rows if r["metric"] == metric and r["adversary"] == adversary
              and r["category"] == category]
    return row


class RecordingTeacher:
    """The teacher's answers, handed out per request; every requested row is recorded."""

    def __init__(self, answers):
        self.answers, self.requests = answers, []

    def __call__(self, rows, sample):
        assert sample == 0                       # no ceiling: similarity is off
        self.requests.append(list(rows))
        return [self.answers[i] for i in rows]


def _both(teacher, student, certify, *, key: int, index: int, order_seed: int):
    """(rows of the evaluation holding every answer, rows of the buying one, its buyer)."""
    full = evaluate_answers(PROBE, IS_TRAIN, teacher, student, None, config=CONFIG,
                            key=jax.random.key(key), certify=certify, certify_index=index,
                            certify_rng=np.random.default_rng(order_seed))
    buyer = RecordingTeacher(teacher)
    lazy = evaluate_sequentially(PROBE, IS_TRAIN, buyer, student, encoder=None, config=CONFIG,
                                 key=jax.random.key(key), certify=certify, certify_index=index,
                                 order_rng=np.random.default_rng(order_seed), chunk_size=CHUNK)
    return full, lazy, buyer


@pytest.mark.parametrize("student_probs, epsilon, verdict", [
    (Q, 0.3, 2.0),      # told apart: distinguishable after a few dozen prompts
    (P, 0.3, 1.0),      # the same distribution: certified before the test split runs out
])
def test_sequential_verdict_is_the_full_evaluations_and_it_buys_only_what_it_read(
        student_probs, epsilon, verdict):
    rng = np.random.default_rng(11)
    teacher, student = _draw(rng, P), _draw(rng, student_probs)
    full, lazy, buyer = _both(teacher, student, CertifyConfig(epsilon=epsilon, alpha=0.05),
                              key=4, index=1, order_seed=9)
    n_test = int((~IS_TRAIN).sum())
    for metric in ("certified", "certify_verdict", "certify_items"):
        assert _pick(lazy, metric) == _pick(full, metric), metric
    assert _pick(lazy, "certify_verdict")["value"] == verdict
    used = int(_pick(lazy, "certify_items")["value"])
    assert used < n_test

    # what was requested: the train split first, then test prompts CHUNK at a time in the
    # certification order, stopping with the chunk that held the verdict
    first, *chunks = buyer.requests
    assert sorted(first) == np.flatnonzero(IS_TRAIN).tolist()
    assert all(len(c) == CHUNK for c in chunks)
    consumed = math.ceil(used / CHUNK) * CHUNK
    asked = [i for c in chunks for i in c]
    assert len(asked) == len(set(asked)) == consumed < n_test
    assert not IS_TRAIN[asked].any()
    order = np.flatnonzero(~IS_TRAIN)[np.random.default_rng(9).permutation(n_test)]
    assert asked == order[:consumed].tolist()
    assert _pick(lazy, "eval_test_items", "") == {**_pick(lazy, "eval_test_items", ""),
                                                  "value": consumed, "n": n_test}
    # advantages are over the prompts read: two units per prompt for ngram, one for pairwise
    assert _pick(lazy, "advantage", "ngram")["n"] == 2 * consumed
    assert _pick(lazy, "advantage", "pairwise")["n"] == consumed


def test_undecided_sequential_evaluation_reads_every_test_prompt_and_matches_outcomes():
    """ε too small for this many prompts: every test prompt is bought, and the advantage
    rows then equal those of the evaluation that had them all along."""
    rng = np.random.default_rng(3)
    teacher, student = _draw(rng, P), _draw(rng, P)
    full, lazy, buyer = _both(teacher, student, CertifyConfig(epsilon=0.02, alpha=0.05),
                              key=2, index=3, order_seed=1)
    assert _pick(lazy, "certify_verdict")["value"] == 0.0
    assert sorted(i for c in buyer.requests for i in c) == list(range(N))
    for adversary in ("ngram", "pairwise", "max"):
        for metric in ("advantage", "p_value"):
            for cat in ("all", "a", "b", "c"):
                assert _pick(lazy, metric, adversary, cat) == _pick(full, metric, adversary, cat)
    assert _pick(lazy, "certify_level", "") == _pick(full, "certify_level", "")


def test_sequential_evaluation_refuses_crossfit_and_needs_a_classifier():
    rng = np.random.default_rng(0)
    teacher = _draw(rng, P)
    certify = CertifyConfig(epsilon=0.3)
    with pytest.raises(QBudgetError, match="crossfit"):
        evaluate_sequentially(PROBE, IS_TRAIN, RecordingTeacher(teacher), teacher,
                              encoder=None, config=EvalConfig(adversaries=("ngram",),
                                                              similarity=False, crossfit=5),
                              key=jax.random.key(0), certify=certify, certify_index=1,
                              order_rng=np.random.default_rng(0))
    with pytest.raises(QBudgetError, match="classifier adversary"):
        evaluate_sequentially(PROBE, IS_TRAIN, RecordingTeacher(teacher), teacher,
                              encoder=None, config=EvalConfig(adversaries=("mmd",),
                                                              similarity=False),
                              key=jax.random.key(0), certify=certify, certify_index=1,
                              order_rng=np.random.default_rng(0))


# -- cross-fitting ------------------------------------------------------------------------

XF_TRAIN = (np.arange(N) % 7) < 5            # 1,000 train / 400 test: crossfit >= 4


def test_crossfit_scores_every_prompt_and_keeps_fold_zero():
    rng = np.random.default_rng(21)
    teacher, student = _draw(rng, P), _draw(rng, Q)
    plain = evaluate_answers(PROBE, XF_TRAIN, teacher, student, None, config=CONFIG,
                             key=jax.random.key(8), certify=CertifyConfig(epsilon=0.3),
                             certify_rng=np.random.default_rng(2))
    cfg = EvalConfig(adversaries=CONFIG.adversaries, similarity=False, crossfit=4,
                     pairwise=CONFIG.pairwise)
    crossed = evaluate_answers(PROBE, XF_TRAIN, teacher, student, None, config=cfg,
                               key=jax.random.key(8), certify=CertifyConfig(epsilon=0.3),
                               certify_rng=np.random.default_rng(2))
    assert _pick(crossed, "advantage", "ngram")["n"] == 2 * N
    assert _pick(crossed, "advantage", "pairwise")["n"] == N
    assert _pick(crossed, "adversary_folds", "ngram")["value"] == 4
    # every fold trains under fold 0's sample bound: the adversary-train split's size
    assert _pick(crossed, "adversary_q", "ngram")["value"] == XF_TRAIN.sum()
    # certification reads fold 0, the held-out split: the same verdict as without folds
    for metric in ("certified", "certify_verdict", "certify_items"):
        assert _pick(crossed, metric) == _pick(plain, metric)
    # a true difference is seen by both; the cross-fitted interval is narrower
    a, b = _pick(plain, "advantage", "ngram"), _pick(crossed, "advantage", "ngram")
    assert b["ci_high"] - b["ci_low"] < 0.6 * (a["ci_high"] - a["ci_low"])
    assert a["ci_low"] > 0 and b["ci_low"] > 0


@pytest.mark.parametrize("k, needle", [(0, "eval.crossfit"), (21, "eval.crossfit"),
                                       (True, "eval.crossfit")])
def test_bad_crossfit_values_are_named(tmp_path, k, needle):
    from qbudget.config import load_run_config

    cfg = tmp_path / "run.toml"
    cfg.write_text(f'world = "micro"\n[eval]\ncrossfit = {str(k).lower()}\n')
    with pytest.raises(QBudgetError, match=needle):
        load_run_config(cfg)


def test_crossfit_too_few_folds_for_the_sample_bound_is_refused():
    rng = np.random.default_rng(0)
    teacher = _draw(rng, P)
    cfg = EvalConfig(adversaries=("ngram",), similarity=False, crossfit=2)
    with pytest.raises(QBudgetError, match=r"crossfit = 2 .* use crossfit >= 4"):
        evaluate_answers(PROBE, XF_TRAIN, teacher, teacher, None, config=cfg,
                         key=jax.random.key(0))


@pytest.mark.slow
def test_crossfit_lowers_the_spread_of_the_advantage_over_independent_draws():
    """24 independent probe draws at a known difference: the cross-fitted ngram advantage
    (K = 4, every prompt a test item) has a smaller standard deviation than the held-out
    split's alone (400 test prompts), and both centre on the same value."""
    cfg1 = EvalConfig(adversaries=("ngram",), similarity=False)
    cfg4 = EvalConfig(adversaries=("ngram",), similarity=False, crossfit=4)
    one, four = [], []
    for trial in range(24):
        rng = np.random.default_rng(500 + trial)
        teacher, student = _draw(rng, P), _draw(rng, Q)
        key = jax.random.key(trial)
        one.append(_pick(evaluate_answers(PROBE, XF_TRAIN, teacher, student, None,
                                          config=cfg1, key=key), "advantage", "ngram")["value"])
        four.append(_pick(evaluate_answers(PROBE, XF_TRAIN, teacher, student, None,
                                           config=cfg4, key=key), "advantage", "ngram")["value"])
    assert np.std(four) < 0.8 * np.std(one), (np.std(four), np.std(one))
    assert abs(np.mean(four) - np.mean(one)) < 0.03
