"""Adversaries against known truth: calibration, null behaviour, swap consistency, rows."""

import jax
import numpy as np
import pytest

from qbudget.adversaries import AdversaryData
from qbudget.adversaries.ngram import NgramConfig
from qbudget.adversaries.pairwise import PairwiseConfig, fit
from qbudget.errors import QBudgetError
from qbudget.evaluate import EvalConfig, evaluate_answers
from qbudget.pool import Prompt

SENTENCES = ["The answer is yes.", "I think it is no, sorry.",
             "Maybe; it depends on the weather!", "Absolutely correct, my friend.", "Nope.",
             "It could be seven or eight.", "Let me think about that carefully.",
             "Certainly not today."]
P = np.array([.25, .2, .15, .1, .1, .08, .07, .05])
Q = np.array([.05, .1, .1, .2, .05, .2, .1, .2])
N, N_TRAIN = 600, 400
PROBE = [Prompt(f"p{i}", f"question {i}?", ["a", "b", "c"][i % 3]) for i in range(N)]
IS_TRAIN = np.arange(N) < N_TRAIN
NGRAM_ONLY = EvalConfig(adversaries=("ngram",), similarity=False)


def _draw(rng, probs):
    return [SENTENCES[i] for i in rng.choice(len(SENTENCES), N, p=probs)]


def _row(rows, metric, adversary, category="all"):
    (row,) = [r for r in rows if r["metric"] == metric and r["adversary"] == adversary
              and r["category"] == category]
    return row


@pytest.mark.slow
def test_ngram_calibration_against_known_total_variation():
    """40 trials: the interval covers TV (the optimal advantage) in ≥ 90%, mean error ≤ 0.05;
    with identical distributions the C2ST rejects at 0.05 in ≤ 10% of trials."""
    tv = 0.5 * np.abs(P - Q).sum()
    covered, estimates, rejections = 0, [], 0
    for trial in range(40):
        rng = np.random.default_rng(1000 + trial)
        teacher = _draw(rng, P)
        rows = evaluate_answers(PROBE, IS_TRAIN, teacher, _draw(rng, Q), None,
                                config=NGRAM_ONLY, key=jax.random.key(trial))
        adv = _row(rows, "advantage", "ngram")
        covered += adv["ci_low"] <= tv <= adv["ci_high"]
        estimates.append(adv["value"])
        null = evaluate_answers(PROBE, IS_TRAIN, teacher, _draw(rng, P), None,
                                config=NGRAM_ONLY, key=jax.random.key(trial))
        rejections += _row(null, "p_value", "ngram")["value"] < 0.05
    assert covered >= 36, covered
    assert abs(np.mean(estimates) - tv) <= 0.05, np.mean(estimates)
    assert rejections <= 4, rejections


def test_rows_schema_category_counts_and_max_row():
    rng = np.random.default_rng(0)
    teacher, student = _draw(rng, P), _draw(rng, Q)
    cfg = EvalConfig(adversaries=("ngram", "pairwise"), similarity=False,
                     pairwise=PairwiseConfig(use_embeddings=False, t=100))
    rows = evaluate_answers(PROBE, IS_TRAIN, teacher, student, None, config=cfg,
                            key=jax.random.key(0))
    keys = {"metric", "adversary", "category", "value", "ci_low", "ci_high", "n"}
    assert all(set(r) == keys for r in rows)
    for adversary, units in (("ngram", 2 * (N - N_TRAIN)), ("pairwise", N - N_TRAIN)):
        per_cat = [r for r in rows if r["metric"] == "advantage" and r["adversary"] == adversary]
        overall = _row(rows, "advantage", adversary)
        assert overall["n"] == units
        assert sum(r["n"] for r in per_cat if r["category"] != "all") == units
        assert {r["category"] for r in per_cat} == {"all", "a", "b", "c"}
        assert _row(rows, "adversary_q", adversary)["value"] == N_TRAIN
        assert _row(rows, "adversary_flops", adversary)["value"] > 0
    best = _row(rows, "advantage", "max")
    singles = [_row(rows, "advantage", a) for a in ("ngram", "pairwise")]
    assert best["value"] == max(r["value"] for r in singles)
    # Bonferroni: the max row's interval is wider than the chosen adversary's own.
    chosen = max(singles, key=lambda r: r["value"])
    assert best["ci_low"] < chosen["ci_low"] and best["ci_high"] >= chosen["ci_high"]
    assert _row(rows, "adversary_filtered", "pairwise")["value"] == 0


def test_same_key_same_rows_and_sample_bound_q():
    rng = np.random.default_rng(1)
    teacher, student = _draw(rng, P), _draw(rng, Q)
    cfg = EvalConfig(adversaries=("ngram",), similarity=False, ngram=NgramConfig(q=50))
    a = evaluate_answers(PROBE, IS_TRAIN, teacher, student, None, config=cfg, key=jax.random.key(3))
    b = evaluate_answers(PROBE, IS_TRAIN, teacher, student, None, config=cfg, key=jax.random.key(3))
    assert a == b
    assert _row(a, "adversary_q", "ngram")["value"] == 50


def test_bad_inputs_are_user_errors():
    teacher = ["x"] * N
    with pytest.raises(QBudgetError, match="student has 3 entries"):
        evaluate_answers(PROBE, IS_TRAIN, teacher, ["y"] * 3, None, config=NGRAM_ONLY,
                         key=jax.random.key(0))
    with pytest.raises(QBudgetError, match="sample bound q=999"):
        evaluate_answers(PROBE, IS_TRAIN, teacher, teacher, None, key=jax.random.key(0),
                         config=EvalConfig(adversaries=("ngram",), similarity=False,
                                           ngram=NgramConfig(q=999)))
    with pytest.raises(QBudgetError, match="unknown adversary 'oracle'"):
        evaluate_answers(PROBE, IS_TRAIN, teacher, teacher, None, key=jax.random.key(0),
                         config=EvalConfig(adversaries=("oracle",), similarity=False))
    with pytest.raises(QBudgetError, match="test split is empty"):
        evaluate_answers(PROBE, np.ones(N, bool), teacher, teacher, None, config=NGRAM_ONLY,
                         key=jax.random.key(0))
    with pytest.raises(QBudgetError, match="needs a SentenceEncoder"):
        evaluate_answers(PROBE, IS_TRAIN, teacher, teacher, None, key=jax.random.key(0),
                         config=EvalConfig(adversaries=("ngram",)))


@pytest.fixture(scope="module")
def encoder():
    from qbudget.models.encoder import SentenceEncoder

    return SentenceEncoder.from_pretrained()


def _style_data(n=160, encoder=None):
    rng = np.random.default_rng(5)
    topics = ["rivers", "stars", "bread", "music", "trains", "rain", "cats", "chess"]
    prompts = [f"Tell me about {topics[i % 8]} ({i})." for i in range(n)]
    teacher = [f"Certainly! {topics[i % 8].capitalize()} are fascinating, really." for i in range(n)]
    student = [f"{topics[i % 8]} ok idk" + "!" * int(rng.integers(1, 3)) for i in range(n)]
    idx = np.arange(n)
    return AdversaryData(prompts, teacher, student, (idx % 2).astype(np.int32),
                         idx[: n * 3 // 4], idx[n * 3 // 4:], encoder=encoder)


@pytest.mark.slow
def test_pairwise_is_antisymmetric_swapping_flips_the_decision(encoder):
    data = _style_data(encoder=encoder)
    scorer, _, _ = fit(data, PairwiseConfig(t=60), jax.random.key(0))
    prompts = ["Tell me about owls.", "Tell me about tea.", "Tell me about snow.",
               "Tell me about glass."]
    first = ["Certainly! Owls are fascinating, really.", "tea ok idk!",
             "Snow is cold, honestly.", "glass!!"]
    second = ["owls ok idk!!", "Certainly! Tea is fascinating, really.", "snow lol",
              "Certainly, glass."]
    p_ab, d_ab = scorer.decide(prompts, first, second)
    p_ba, d_ba = scorer.decide(prompts, second, first, coin=np.ones(4, np.int64))
    np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-6)
    assert (d_ab != d_ba).all()
    # It also learned the obvious style cue.
    assert d_ab[0] == 0 and d_ab[1] == 1


def test_embedding_adversaries_detect_a_systematic_difference(encoder):
    data = _style_data(encoder=encoder)
    probe = [Prompt(str(i), p, "c") for i, p in enumerate(data.prompts)]
    is_train = np.zeros(len(probe), bool)
    is_train[data.train_idx] = True
    cfg = EvalConfig(adversaries=("embed", "pairwise"),
                     pairwise=PairwiseConfig(t=100))
    rows = evaluate_answers(probe, is_train, data.teacher, data.student, data.teacher,
                            encoder=encoder, config=cfg, key=jax.random.key(1))
    for a in ("embed", "pairwise"):
        assert _row(rows, "advantage", a)["ci_low"] > 0.5
    sim = _row(rows, "similarity", "")
    assert 0 < sim["value"] < 0.95
    assert _row(rows, "similarity_ceiling", "")["value"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_finetune_adversary_runs_within_its_bounds(encoder):
    from qbudget.adversaries.finetune import FinetuneConfig

    data = _style_data(n=48, encoder=encoder)
    probe = [Prompt(str(i), p, "c") for i, p in enumerate(data.prompts)]
    is_train = np.zeros(len(probe), bool)
    is_train[data.train_idx] = True
    cfg = EvalConfig(adversaries=("finetune",), similarity=False,
                     finetune=FinetuneConfig(q=16, t=8, batch=8, max_length=32, lr=1e-4,
                                             head_lr=1e-2, eval_batch=32))
    before = np.asarray(encoder.encode(["a test sentence"]))
    rows = evaluate_answers(probe, is_train, data.teacher, data.student, None, encoder=encoder,
                            config=cfg, key=jax.random.key(0))
    assert _row(rows, "adversary_q", "finetune")["value"] == 16
    assert _row(rows, "adversary_t", "finetune")["value"] == 8
    assert _row(rows, "advantage", "finetune")["value"] > 0.5
    np.testing.assert_array_equal(before, encoder.encode(["a test sentence"]))


def test_ngram_fit_on_the_training_features_equals_the_fit_over_the_hashed_space():
    """The n-gram adversary fits only the hashed features its training rows contain: the
    weights and test logits match a fit over the whole 2^k space, where every other weight
    stays exactly 0, and a test-only feature scores nothing."""
    from qbudget.adversaries.features import HashedNgrams
    from qbudget.adversaries.ngram import CompactFeatures, fit_logreg, sparse_logits

    rng = np.random.default_rng(3)
    feats = HashedNgrams(dim_log2=12)
    train_idx, train_val = feats.featurize(_draw(rng, P)[:200] + _draw(rng, Q)[:200])
    y = np.r_[np.ones(200), np.zeros(200)].astype(np.float32)
    weight = np.ones(400, np.float32)
    compact = CompactFeatures(train_idx, train_val)
    assert len(compact.vocab) < feats.dim
    fit = dict(steps=60, lr=0.1, l2=1e-3)
    w_c, b_c = fit_logreg(*compact.entries(train_idx, train_val, 400), y, weight,
                          dim=compact.dim, **fit)
    r, k = np.nonzero(train_val)
    w_f, b_f = fit_logreg(r.astype(np.int32), train_idx[r, k], train_val[r, k], y, weight,
                          dim=feats.dim, **fit)
    w_c, w_f = np.asarray(w_c), np.asarray(w_f)
    np.testing.assert_allclose(w_c[: len(compact.vocab)], w_f[compact.vocab], atol=1e-5)
    assert (np.delete(w_f, compact.vocab) == 0).all() and (w_c[len(compact.vocab):] == 0).all()
    np.testing.assert_allclose(float(b_c), float(b_f), atol=1e-5)
    test_idx, test_val = feats.featurize(SENTENCES + ["an unseen zebra sentence"])
    got = sparse_logits(w_c, b_c, compact.columns(test_idx), test_val)
    np.testing.assert_allclose(got, sparse_logits(w_f, b_f, test_idx, test_val), atol=1e-5)
    unseen = np.setdiff1d(test_idx[-1][test_val[-1] != 0], compact.vocab)
    assert len(unseen) and (compact.columns(unseen) == compact.unseen).all()
