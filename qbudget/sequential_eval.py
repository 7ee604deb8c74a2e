"""A certifying evaluation that buys the teacher's probe answers only as far as it needs.

With ``[certify]`` on, a checkpoint's verdict comes from a betting e-process that reads
the adversary-test prompts one at a time in a random order and may stop at any of them
(:mod:`qbudget.certify`). :func:`evaluate_sequentially` makes that stop save money: it
buys the teacher's answers to the adversary-train split (the adversaries must train), fits
every classifier adversary once, and then buys the adversary-test prompts ``chunk_size``
at a time in the certification order, scoring each chunk with the fitted adversaries and
stopping as soon as the joint verdict (certified or distinguishable) is reached. Prompts
after that are never bought.

Why the verdict is the one an evaluation that bought everything would reach: the order
and the per-prompt unit coin are drawn the same way (:func:`qbudget.evaluate.certification_order`),
each adversary is fitted on the same prompts with the same key, and a prompt's outcome
depends only on the fitted adversary and that prompt (the pairwise adversary draws its
presentation order for the whole test split and looks it up by position); a decision
reached on a prefix is the decision on the whole stream, since every adversary's stream
is read to the same point.

The other rows describe what was bought: similarity (and its ceiling) over the
adversary-train prompts and the consumed test prompts, advantages over the consumed test
prompts (their ``n`` says how many), two-sample tests (``mmd``) over the same prompts.
The run uses one order for all its checkpoints (drawn from the run seed), so answers a
checkpoint bought are the first ones the next reads: it pays only for prompts beyond them.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np

from qbudget.adversaries import (AdversaryData, AdversaryResult, TwoSampleResult,
                                 get_adversary, get_predictor)
from qbudget.adversaries.base import check_sample_bound, prompt_outcomes
from qbudget.certify import certify_checkpoint
from qbudget.config import CertifyConfig, EvalConfig
from qbudget.errors import QBudgetError
from qbudget.evaluate import (_row, _test_rows, adversary_key, certification_order,
                              classifier_adversaries, classifier_rows, decision_rows, max_rows,
                              stream_values)
from qbudget.pool import Prompt, category_index
from qbudget.similarity import pair_cosines, similarity_rows
from qbudget.stats import bonferroni_alpha

#: adversary-test prompts bought (and scored) per step: the most a verdict can overpay
CHUNK_SIZE = 32

#: ``buy(rows, sample)``: the teacher's answers (sample 0, or 1 for the ceiling) to the
#: probe prompts at ``rows``, through the run's ledger
Buyer = Callable[[Sequence[int], int], list[str]]


def evaluate_sequentially(probe: Sequence[Prompt], is_train: np.ndarray, buy: Buyer,
                          student: Sequence[str], *, encoder, config: EvalConfig,
                          key: jax.Array, certify: CertifyConfig, certify_index: int,
                          order_rng: np.random.Generator, tokenizer=None,
                          chunk_size: int = CHUNK_SIZE, timings: dict | None = None
                          ) -> list[dict]:
    """Rows of one certifying checkpoint, buying test prompts only until the verdict.

    ``student`` holds the student's answers to every probe prompt (they cost nothing);
    ``buy`` fetches the teacher's. Rows are those of :func:`qbudget.evaluate.evaluate_answers`
    on the prompts bought, plus the certification rows and ``eval_test_items``
    (adversary-test prompts bought so far at this checkpoint, ``n`` = the test split).
    """
    timings = {} if timings is None else timings
    is_train = np.asarray(is_train, bool)
    n = len(probe)
    if len(student) != n or len(is_train) != n:
        raise QBudgetError(f"the student answered {len(student)} and is_train has "
                           f"{len(is_train)} entries, but the probe has {n} prompts")
    check_certifying(config)
    advs = classifier_adversaries(config)
    train, test = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    for name in config.adversaries:
        check_sample_bound(config.adversary_config(name).q, len(train))
    if len(test) == 0:
        raise QBudgetError("the adversary-test split is empty")
    cats, names = category_index(probe)
    ceiling = config.ceiling and config.similarity
    teacher: list[str] = [""] * n
    teacher2: list[str] = [""] * n

    def fetch(rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        for i, a in zip(rows, buy(rows.tolist(), 0)):
            teacher[i] = a
        if ceiling:
            for i, a in zip(rows, buy(rows.tolist(), 1)):
                teacher2[i] = a

    fetch(train)
    data = AdversaryData(prompts=[p.text for p in probe], teacher=teacher, student=list(student),
                         categories=cats, train_idx=train, test_idx=test, encoder=encoder,
                         encode_batch_size=config.encode_batch_size, tokenizer=tokenizer)
    embed = _Embeddings(data, encoder, config, ceiling, teacher2)
    embed.add(train)

    t0 = time.perf_counter()
    predictors = {name: get_predictor(name)(data, config.adversary_config(name),
                                            adversary_key(key, name)) for name in advs}
    timings["fit"] = time.perf_counter() - t0

    order, coin = certification_order(len(test), order_rng)
    position = np.empty(n, np.int64)
    position[test] = np.arange(len(test))
    results = {name: [] for name in advs}
    streams = {name: [] for name in advs}
    consumed = 0
    decision = None
    while consumed < len(test):
        chunk = test[order[consumed:consumed + max(1, chunk_size)]]
        fetch(chunk)
        embed.add(chunk)
        for name, predict in predictors.items():
            res = predict(chunk)
            results[name].append(res)
            out = prompt_outcomes(res, len(chunk))
            streams[name].append(stream_values(out, coin[position[chunk]]))
        consumed += len(chunk)
        decision = certify_checkpoint({k: np.concatenate(v) for k, v in streams.items()},
                                      certify.epsilon, certify.alpha, checkpoint=certify_index)
        if decision.verdict != "undecided":
            break
    timings["test_items"] = consumed

    keep = np.sort(np.concatenate([train, test[order[:consumed]]]))
    rows: list[dict] = []
    if config.similarity:
        rows += similarity_rows("similarity", pair_cosines(embed.teacher[keep],
                                                           embed.student[keep]),
                                cats[keep], names, config.alpha)
        if ceiling:
            rows += similarity_rows("similarity_ceiling",
                                    pair_cosines(embed.teacher[keep], embed.teacher2[keep]),
                                    cats[keep], names, config.alpha)
    m = len(advs)
    alpha_b = bonferroni_alpha(config.alpha, m)
    per_cat_best: dict[str, list] = {}
    for name in config.adversaries:
        if name in predictors:
            joined = AdversaryResult.concat(results[name], flops=results[name][0].flops)
            rows += classifier_rows(name, joined, names, config.alpha, alpha_b,
                                    per_cat_best)
        else:
            rows += _two_sample_rows(name, data, keep, config, key, names)
    rows += max_rows(per_cat_best, m)
    rows += decision_rows(decision, certify, certify_index, n_available=len(test))
    rows.append(_row("eval_test_items", "", "all", consumed, n=len(test)))
    return rows


def check_certifying(config: EvalConfig) -> None:
    """QBudgetError unless ``config`` can certify: a classifier adversary to certify, and no
    cross-fitting (it needs every probe answer; certification buys only what it reads)."""
    if not classifier_adversaries(config):
        raise QBudgetError("[certify] needs at least one classifier adversary in "
                           "eval.adversaries (mmd has no advantage to certify)")
    if config.crossfit > 1:
        raise QBudgetError("eval.crossfit needs every probe answer, but a certifying run buys "
                           "the adversary-test answers only as far as its verdict needs: use "
                           "crossfit = 1 with [certify]")


class _Embeddings:
    """MiniLM embeddings of the bought prompts' texts, filled in as answers are bought.

    Student answers and prompts are known up front (one pass each, prompts through the
    encoder's memo); teacher answers are encoded per purchase.
    """

    def __init__(self, data: AdversaryData, encoder, config: EvalConfig, ceiling: bool,
                 teacher2: list[str]):
        from qbudget.evaluate import _needs_embeddings

        self.data, self.encoder, self.batch = data, encoder, config.encode_batch_size
        self.needed = _needs_embeddings(config)
        self.teacher2_texts = teacher2
        self.ceiling = ceiling
        self.teacher = self.student = self.teacher2 = None
        if not self.needed:
            return
        if encoder is None:
            raise QBudgetError("evaluation needs a SentenceEncoder (encoder=...)")
        from qbudget.evaluate import _encode_all

        emb = _encode_all(encoder, {"student": data.student, "prompts": data.prompts},
                          self.batch)
        self.student = np.asarray(emb["student"], np.float32)
        self.teacher = np.zeros_like(self.student)
        self.teacher2 = np.zeros_like(self.student)
        data.set_embeddings("student", self.student)
        data.set_embeddings("prompts", emb["prompts"])
        data.set_embeddings("teacher", self.teacher)

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        """Freshly bought answers: encoded as they are (not through the whole-list memo)."""
        from qbudget.evaluate import _encode_all

        return _encode_all(self.encoder, {"new": list(texts)}, self.batch,
                           fresh=frozenset({"new"}))["new"]

    def add(self, rows: np.ndarray) -> None:
        """Encode the teacher answers (and ceiling samples) of newly bought ``rows``."""
        if not self.needed or len(rows) == 0:
            return
        rows = np.asarray(rows, np.int64)
        self.teacher[rows] = self._encode([self.data.teacher[i] for i in rows])
        self.data.set_embeddings("teacher", self.teacher)
        if self.ceiling:
            self.teacher2[rows] = self._encode([self.teacher2_texts[i] for i in rows])


def _two_sample_rows(name: str, data: AdversaryData, keep: np.ndarray, config: EvalConfig,
                     key: jax.Array, names: Sequence[str]) -> list[dict]:
    """A two-sample test (``mmd``) on the bought prompts only."""
    sub = AdversaryData(prompts=[data.prompts[i] for i in keep],
                        teacher=[data.teacher[i] for i in keep],
                        student=[data.student[i] for i in keep],
                        categories=np.asarray(data.categories)[keep],
                        train_idx=np.arange(len(keep)), test_idx=np.arange(len(keep)),
                        encoder=data.encoder, encode_batch_size=data.encode_batch_size,
                        tokenizer=data.tokenizer)
    run, _ = get_adversary(name)
    res = run(sub, config.adversary_config(name), adversary_key(key, name))
    if not isinstance(res, TwoSampleResult):
        raise QBudgetError(f"adversary '{name}' is neither a classifier nor a two-sample test")
    return _test_rows(name, res, names)


def certify_order_rng(seed: int) -> np.random.Generator:
    """The run's certification order: one per run (not per checkpoint), so a later
    checkpoint reads first the test prompts an earlier one already bought."""
    from qbudget.seeding import rng_for

    return rng_for(seed, "certify-order")


def evaluate_student_sequentially(student, tokenizer, probe: Sequence[Prompt],
                                  is_train: np.ndarray, buy: Buyer, *, sampling, seed: int,
                                  checkpoint: int, encoder, config: EvalConfig,
                                  certify: CertifyConfig, certify_index: int) -> list[dict]:
    """:func:`qbudget.evaluate.evaluate_student` for a certifying run: the student answers
    every probe prompt (same seeds), the teacher only as far as the verdict needs."""
    from qbudget.evaluate import probe_seeds, student_answers
    from qbudget.seeding import key_for

    answers = student_answers(student, tokenizer, [p.text for p in probe], sampling,
                              probe_seeds(seed, checkpoint, probe))
    return evaluate_sequentially(probe, is_train, buy, answers, encoder=encoder, config=config,
                                 key=key_for(seed, "evaluate", checkpoint), certify=certify,
                                 certify_index=certify_index, order_rng=certify_order_rng(seed),
                                 tokenizer=tokenizer)
