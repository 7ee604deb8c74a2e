"""Evaluate a student against its teacher on the probe: similarity and advantage rows.

:func:`evaluate_student` is the one evaluation path: the run loop calls it at every
checkpoint, ``qbudget eval --world`` for a base or adapted student, the calibration
script through the loop. It samples the student's probe answers (seeded per prompt and
checkpoint) and hands them to :func:`evaluate_answers`, which ``qbudget eval`` also calls
directly for answers read from files. What is measured is set by one
:class:`qbudget.config.EvalConfig` (a run TOML's ``[eval]`` table). Given the probe
prompts, the adversary-train mask and the answers, the rows follow the results schema
(metric, adversary, category, value, ci_low, ci_high, n):

- ``similarity`` / ``similarity_ceiling``: mean cosine (t-interval) of MiniLM
  embeddings, teacher vs student / teacher vs a second teacher sample;
- per adversary and category: ``advantage`` (2·acc − 1, Clopper–Pearson interval) and
  ``p_value`` (one-sided C2ST binomial test), plus the bounds it ran under
  (``adversary_q``, ``adversary_t``, ``adversary_flops``, category ``all``);
- adversary ``max`` per category: the largest advantage, with Bonferroni-corrected
  intervals (level alpha / number of adversaries) so the max's interval stays valid
  despite picking the best of several, and a Bonferroni-adjusted p-value.

- ``mmd`` (a two-sample test, not a classifier; only when listed): ``p_value`` and
  ``mmd_statistic`` per category, no advantage, not in ``max`` nor in its Bonferroni count;
- with sequential certification (``certify=``, a run's ``[certify]``): per classifier
  adversary and for ``max`` (all of them at once), category ``all``: ``certified`` (1/0),
  ``certify_verdict`` (0 undecided, 1 certified, 2 distinguishable) and
  ``certify_items`` (adversary-test prompts the verdict needed, ``n`` = those available),
  plus ``certify_epsilon`` and ``certify_level`` (this checkpoint's α_r). See
  :func:`certification_rows`.

:func:`verdict` turns rows into the ε statement: indistinguishable at ε when every
adversary's overall upper bound is ≤ ε.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import jax
import numpy as np

from qbudget.adversaries import AdversaryData, AdversaryResult, TwoSampleResult, get_adversary
from qbudget.adversaries.base import check_sample_bound, prompt_outcomes
from qbudget.config import CertifyConfig, EvalConfig
from qbudget.errors import QBudgetError
from qbudget.pool import Prompt, category_index
from qbudget.seeding import key_for, rng_for, stable_seed
from qbudget.similarity import pair_cosines, similarity_rows
from qbudget.stats import advantage_interval, bonferroni_alpha, bonferroni_p, c2st_p_value

NAN = float("nan")


def _row(metric, adversary, category, value, lo=NAN, hi=NAN, n=0) -> dict:
    return {"metric": metric, "adversary": adversary, "category": category,
            "value": float(value), "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}


def _needs_embeddings(config: EvalConfig) -> bool:
    if config.similarity:
        return True
    return any(a in ("embed", "finetune") or (a == "pairwise" and config.pairwise.use_embeddings)
               for a in config.adversaries)


def _encode_all(encoder, groups: dict[str, list[str]], batch_size: int,
                fresh: frozenset = frozenset({"student"})) -> dict[str, np.ndarray]:
    """Encode each group of texts (each distinct string of a group once).

    Groups other than ``fresh`` (teacher answers, prompts, the second teacher sample) are
    the same at every checkpoint of a run, so they go through the encoder's whole-list
    memo when it has one; a group is always encoded on its own, so its embeddings do not
    depend on which other texts were encoded alongside.
    """
    out = {}
    memo = getattr(encoder, "encode_memo", None)
    for name, texts in groups.items():
        uniq = list(dict.fromkeys(texts))
        encode = memo if memo is not None and name not in fresh else encoder.encode
        emb = encode(uniq, batch_size=batch_size)
        where = {t: i for i, t in enumerate(uniq)}
        out[name] = emb[[where[t] for t in texts]]
    return out


#: adversaries that are two-sample tests (p-values), not classifiers (advantage)
TEST_ADVERSARIES = frozenset({"mmd"})


def classifier_adversaries(config: EvalConfig) -> tuple[str, ...]:
    """The adversaries that have an advantage (and so a ``max`` and a certification)."""
    return tuple(a for a in config.adversaries if a not in TEST_ADVERSARIES)


def evaluate_answers(probe: Sequence[Prompt], is_train: np.ndarray, teacher: Sequence[str],
                     student: Sequence[str], teacher2: Sequence[str] | None = None, *,
                     encoder=None, config: EvalConfig | None = None, key: jax.Array,
                     timings: dict | None = None, tokenizer=None,
                     certify: CertifyConfig | None = None, certify_index: int = 1,
                     certify_rng: np.random.Generator | None = None) -> list[dict]:
    """Similarity and adversary rows for one student; see the module docstring.

    ``timings`` (optional dict) receives seconds per stage (encode, each adversary).
    ``tokenizer``: the student's, for ``mmd`` (word ids without one). ``certify`` (enabled)
    adds the sequential certification rows of this checkpoint, the ``certify_index``-th of
    the run (1-based: its alpha-spending share), with the item order drawn by
    ``certify_rng`` (required then).
    """
    config = config or EvalConfig()
    timings = {} if timings is None else timings
    n = len(probe)
    is_train = np.asarray(is_train, bool)
    if n == 0:
        raise QBudgetError("the probe is empty")
    for name, xs in (("teacher", teacher), ("student", student), ("teacher2", teacher2),
                     ("is_train", is_train)):
        if xs is not None and len(xs) != n:
            raise QBudgetError(f"{name} has {len(xs)} entries but the probe has {n} prompts")
    for name in config.adversaries:
        check_sample_bound(config.adversary_config(name).q, int(is_train.sum()))
    cats, names = category_index(probe)
    data = AdversaryData(prompts=[p.text for p in probe], teacher=list(teacher),
                         student=list(student), categories=cats,
                         train_idx=np.flatnonzero(is_train), test_idx=np.flatnonzero(~is_train),
                         encoder=encoder, encode_batch_size=config.encode_batch_size,
                         tokenizer=tokenizer)
    rows: list[dict] = []

    if _needs_embeddings(config):
        if encoder is None:
            raise QBudgetError("evaluation needs a SentenceEncoder (encoder=...)")
        t0 = time.perf_counter()
        groups = {"teacher": data.teacher, "student": data.student}
        if ("embed" in config.adversaries and config.embed.use_prompt) or (
                "pairwise" in config.adversaries and config.pairwise.use_embeddings):
            groups["prompts"] = data.prompts
        if teacher2 is not None and config.similarity:
            groups["teacher2"] = list(teacher2)
        emb = _encode_all(encoder, groups, config.encode_batch_size)
        for k, v in emb.items():
            if k != "teacher2":
                data.set_embeddings(k, v)
        timings["encode"] = time.perf_counter() - t0
        timings["encoded_texts"] = sum(len(v) for v in groups.values())
        if config.similarity:
            rows += similarity_rows("similarity", pair_cosines(emb["teacher"], emb["student"]),
                                    cats, names, config.alpha)
            if "teacher2" in emb:
                rows += similarity_rows("similarity_ceiling",
                                        pair_cosines(emb["teacher"], emb["teacher2"]),
                                        cats, names, config.alpha)

    folds = crossfit_folds(is_train, config.crossfit, jax.random.fold_in(key, CROSSFIT_STREAM),
                           {a: config.adversary_config(a).q for a in classifier_adversaries(config)})
    m = max(1, len(classifier_adversaries(config)))
    alpha_b = bonferroni_alpha(config.alpha, m)
    per_cat_best: dict[str, list] = {}
    outcomes: dict[str, np.ndarray] = {}
    for name in config.adversaries:
        run, _ = get_adversary(name)
        t0 = time.perf_counter()
        adv_key = adversary_key(key, name)
        res = run(data, config.adversary_config(name), adv_key)
        if isinstance(res, TwoSampleResult):
            timings[name] = time.perf_counter() - t0
            rows += _test_rows(name, res, names)
            continue
        outcomes[name] = prompt_outcomes(res, len(data.test_idx))
        if len(folds) > 1:
            res = _crossfit(run, data, config.adversary_config(name), adv_key, res, folds)
        timings[name] = time.perf_counter() - t0
        rows += classifier_rows(name, res, names, config.alpha, alpha_b, per_cat_best)
    rows += max_rows(per_cat_best, m)
    if certify is not None and certify.enabled and outcomes:
        if certify_rng is None:
            raise QBudgetError("certification needs certify_rng (a Generator for the item order)")
        rows += certification_rows(outcomes, certify, certify_index, certify_rng)
    return rows


def adversary_key(key: jax.Array, name: str) -> jax.Array:
    """The key adversary ``name`` trains with at an evaluation whose key is ``key``."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()))


def classifier_rows(name: str, res, names: Sequence[str], alpha: float, alpha_b: float,
                    per_cat_best: dict) -> list[dict]:
    """Advantage and p-value rows of one classifier adversary's outcomes, overall and per
    category, plus the bounds it ran under; its per-category entries are added to
    ``per_cat_best`` for :func:`max_rows` (intervals at the Bonferroni level ``alpha_b``)."""
    rows = []
    groups = [("all", np.ones(len(res.correct), bool))]
    groups += [(c, res.unit_category == i) for i, c in enumerate(names)]
    for cat, sel in groups:
        k, nn = int(res.correct[sel].sum()), int(sel.sum())
        if nn == 0:
            continue
        adv, lo, hi = advantage_interval(k, nn, alpha)
        p = c2st_p_value(k, nn)
        rows.append(_row("advantage", name, cat, adv, lo, hi, nn))
        rows.append(_row("p_value", name, cat, p, n=nn))
        _, blo, bhi = advantage_interval(k, nn, alpha_b)
        per_cat_best.setdefault(cat, []).append((adv, blo, bhi, p, nn))
    rows.append(_row("adversary_q", name, "all", res.q, n=res.q))
    rows.append(_row("adversary_t", name, "all", res.t, n=res.q))
    rows.append(_row("adversary_flops", name, "all", res.flops, n=res.q))
    for extra, value in res.extra.items():
        rows.append(_row(f"adversary_{extra}", name, "all", value, n=len(res.correct)))
    return rows


def max_rows(per_cat_best: dict, m: int) -> list[dict]:
    """Adversary ``max`` per category: the largest advantage, Bonferroni intervals over the
    ``m`` classifier adversaries and the Bonferroni-adjusted smallest p-value."""
    rows = []
    for cat, entries in per_cat_best.items():
        best = max(entries, key=lambda e: e[0])
        rows.append(_row("advantage", "max", cat, best[0], max(e[1] for e in entries),
                         max(e[2] for e in entries), best[4]))
        rows.append(_row("p_value", "max", cat, bonferroni_p(min(e[3] for e in entries), m),
                         n=best[4]))
    return rows


#: fold_in tag of the cross-fitting fold assignment (apart from every adversary's own key)
CROSSFIT_STREAM = 0x0C0F


def crossfit_folds(is_train: np.ndarray, k: int, key: jax.Array,
                   bounds: Mapping[str, int | None] | None = None) -> list[np.ndarray]:
    """The test folds of K-fold cross-fitting (``[eval] crossfit``): fold 0 is the
    adversary-test split itself, so cross-fitting only *adds* test items to what an
    uncross-fitted evaluation scores (its fold-0 outcomes are the same); the
    adversary-train split, permuted by ``key``, is cut into K − 1 near-equal folds.

    Every fold's adversary must train under the same sample bound as fold 0's (``q``, or
    the whole adversary-train split when unset), so a fold may hold no more prompts than
    the rest leaves for that: K − 1 ≥ train / test (K = 5 at the worlds' 80/20 split).
    """
    is_train = np.asarray(is_train, bool)
    test, train = np.flatnonzero(~is_train), np.flatnonzero(is_train)
    if k <= 1:
        return [test]
    perm = np.asarray(jax.random.permutation(key, len(train)))
    folds = [test] + [np.sort(train[c]) for c in np.array_split(perm, k - 1)]
    n, biggest = len(is_train), max(len(f) for f in folds[1:])
    for name, q in (bounds or {}).items():
        need = len(train) if q is None else q
        if n - biggest < need or biggest == 0:
            raise QBudgetError(
                f"eval.crossfit = {k} cuts the {len(train)} adversary-train prompts into folds "
                f"of up to {biggest}, leaving {n - biggest} to train on where adversary "
                f"'{name}' needs {need} (its sample bound q): use crossfit >= "
                f"{1 + -(-len(train) // max(1, n - need))}")
    return folds


def _crossfit(run, data: AdversaryData, cfg, key: jax.Array, first: AdversaryResult,
              folds) -> AdversaryResult:
    """Outcomes of every fold: ``first`` (fold 0, already run) and folds 1.. each scored by
    an adversary trained on the other prompts, under fold 0's sample bound, with its own key.

    The units of the folds are concatenated (their categories alongside); the per-prompt
    unit layout that certification reads is fold 0's alone (``outcomes`` comes from it).
    """
    import dataclasses

    n = len(data.prompts)
    parts = [first]
    for j, fold in enumerate(folds[1:], start=1):
        train = np.setdiff1d(np.arange(n), fold)
        fold_data = dataclasses.replace(data, train_idx=train, test_idx=fold)
        parts.append(run(fold_data, dataclasses.replace(cfg, q=first.q),
                         jax.random.fold_in(key, j)))
    # every fold trained anew: their costs add up
    return AdversaryResult.concat(parts, flops=sum(p.flops for p in parts),
                                  extra={**first.extra, "folds": len(folds)})


def _test_rows(name: str, res: TwoSampleResult, names: Sequence[str]) -> list[dict]:
    """Rows of a two-sample test adversary: p-value and statistic per category."""
    rows = []
    for cat, (stat, p, n) in res.tests.items():
        label = cat if isinstance(cat, str) else names[int(cat)]
        rows.append(_row("p_value", name, label, p, n=n))
        rows.append(_row("mmd_statistic" if name == "mmd" else f"{name}_statistic", name,
                         label, stat, n=n))
    n_all = res.tests.get("all", (0, 0, 0))[2]
    rows.append(_row("adversary_q", name, "all", res.q, n=res.q))
    rows.append(_row("adversary_t", name, "all", res.t, n=res.q))
    rows.append(_row("adversary_flops", name, "all", res.flops, n=res.q))
    for extra, value in res.extra.items():
        rows.append(_row(f"adversary_{extra}", name, "all", value, n=n_all))
    return rows


def certification_streams(outcomes: Mapping[str, np.ndarray],
                          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each adversary's 0/1 stream over the adversary-test prompts, in one random order.

    ``outcomes[name]`` is ``[n_test, k]`` (:func:`qbudget.adversaries.base.prompt_outcomes`).
    The order is a permutation drawn by ``rng`` (shared by every adversary, so
    ``certify_checkpoint`` sees them on the same items). A single-answer adversary has two
    units per prompt (the teacher's answer and the student's); the stream takes *one* of
    them, chosen by a fair coin per prompt (also shared). Why not both: the two units of a
    prompt are dependent (same prompt), and the betting e-process's guarantee needs each
    item to be a fresh draw whose mean is the accuracy; with a fair coin an item is
    Bernoulli((acc_teacher + acc_student) / 2) = Bernoulli(acc) exactly, independent of
    the other prompts. The price is half the units of those adversaries.
    """
    n = {len(v) for v in outcomes.values()}
    if len(n) != 1:
        raise QBudgetError("every adversary must score the same adversary-test prompts")
    n_test = n.pop()
    order, coin = certification_order(n_test, rng)
    return {name: stream_values(out, coin[order]) for name, out in
            ((name, np.asarray(out, bool)[order]) for name, out in outcomes.items())}


def certification_order(n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(order, coin): the random order certification consumes the adversary-test prompts in
    (positions in the test split) and, per position, which unit of a single-answer
    adversary enters the stream (0 the teacher's answer, 1 the student's)."""
    order = rng.permutation(n_test)
    coin = rng.integers(0, 2, size=n_test)
    return order, coin


def stream_values(outcomes: np.ndarray, coin: np.ndarray) -> np.ndarray:
    """0/1 stream entries of prompts whose ``[n, k]`` outcomes are given: unit ``coin`` of a
    two-unit (single-answer adversary) prompt, the one unit of a pairwise prompt."""
    out = np.asarray(outcomes, bool)
    col = np.asarray(coin) if out.shape[1] == 2 else np.zeros(len(out), np.int64)
    return out[np.arange(len(out)), col].astype(np.int64)


def certification_rows(outcomes: Mapping[str, np.ndarray], certify: CertifyConfig,
                       checkpoint_index: int, rng: np.random.Generator) -> list[dict]:
    """Sequential ε-certification of one checkpoint (:func:`qbudget.certify.certify_checkpoint`).

    Every classifier adversary's stream (:func:`certification_streams`) is tested at this
    checkpoint's alpha-spending level; the ``max`` rows hold the joint verdict (certified
    when all are: intersection–union). ``certify_items`` is how many adversary-test
    prompts the verdict needed. This path has every answer already; a run with
    ``[certify]`` buys them only as far as the verdict needs
    (:mod:`qbudget.sequential_eval`).
    """
    from qbudget.certify import certify_checkpoint

    streams = certification_streams(outcomes, rng)
    d = certify_checkpoint(streams, certify.epsilon, certify.alpha, checkpoint=checkpoint_index)
    return decision_rows(d, certify, checkpoint_index)


#: ``certify_verdict`` values
VERDICT_CODES = {"undecided": 0, "certified": 1, "distinguishable": 2}


def decision_rows(d, certify: CertifyConfig, checkpoint_index: int,
                  n_available: int | None = None) -> list[dict]:
    """Rows of a checkpoint's certification decision (:class:`qbudget.certify.CheckpointDecision`):
    per adversary and ``max``, ``certified``, ``certify_verdict`` and ``certify_items``
    (``n`` = the adversary-test prompts available: ``n_available``, or what the decision
    saw), then ``certify_epsilon`` and ``certify_level``."""
    from qbudget.certify import checkpoint_level

    rows = []
    for name, dec in [*d.per_adversary.items(), ("max", d)]:
        used = dec.n_used
        avail = dec.n_available if n_available is None else n_available
        rows.append(_row("certified", name, "all", float(dec.certified), n=used))
        rows.append(_row("certify_verdict", name, "all", VERDICT_CODES[dec.verdict], n=used))
        rows.append(_row("certify_items", name, "all", used, n=avail))
    rows.append(_row("certify_epsilon", "", "all", certify.epsilon))
    rows.append(_row("certify_level", "", "all", checkpoint_level(certify.alpha, checkpoint_index),
                     n=checkpoint_index))
    return rows


def teacher_answers(ledger, oracle, probe: Sequence[Prompt], *, ceiling: bool):
    """The teacher's answers to the probe (and a second sample for the ceiling, or None).

    Bought through ``ledger`` on its evaluation account: cached, committed as they arrive,
    counted in ``eval_paid`` and never in q.
    """
    first = ledger.evaluation_answers(oracle, probe, sample=0)
    second = ledger.evaluation_answers(oracle, probe, sample=1) if ceiling else None
    return first, second


def probe_seeds(seed: int, checkpoint: int, probe: Sequence[Prompt]) -> list[int]:
    """Per-prompt sampling seeds of the student's probe answers at one checkpoint."""
    return [stable_seed(seed, "student-probe", checkpoint, p.id) for p in probe]


def student_answers(student, tokenizer, prompts: Sequence[str], sampling: Mapping,
                    seeds: Sequence[int]) -> list[str]:
    """The student's answers with the world's sampling settings (shared with the teacher)."""
    from qbudget.models.generate import generate_text

    return generate_text(student, tokenizer, list(prompts),
                         max_new_tokens=int(sampling["max_new_tokens"]),
                         temperature=float(sampling["temperature"]),
                         top_p=float(sampling.get("top_p", 1.0)), seeds=list(seeds))


def evaluate_student(student, tokenizer, probe: Sequence[Prompt], is_train: np.ndarray,
                     teacher: Sequence[str], teacher2: Sequence[str] | None, *,
                     sampling: Mapping, seed: int, checkpoint: int, encoder,
                     config: EvalConfig, certify: CertifyConfig | None = None,
                     certify_index: int = 1) -> list[dict]:
    """Evaluate one student at one checkpoint: its probe answers, then the result rows.

    The one evaluation path: the run loop calls it at every checkpoint (``checkpoint`` =
    q), ``qbudget eval --world`` with checkpoint 0, the calibration script through the
    loop. Every random choice derives from ``(seed, checkpoint)``, so the base student
    evaluated by ``qbudget eval --world W --seed S`` gives exactly the q = 0 rows of a run
    of W with seed S and the same ``[eval]`` settings. With ``certify`` (enabled) the
    certification rows of the run's ``certify_index``-th checkpoint are added, their item
    order drawn from ``rng_for(seed, "certify-order")`` (one order per run, as the buying
    path :func:`qbudget.sequential_eval.evaluate_student_sequentially` uses).
    """
    answers = student_answers(student, tokenizer, [p.text for p in probe], sampling,
                              probe_seeds(seed, checkpoint, probe))
    return evaluate_answers(probe, is_train, teacher, answers, teacher2, encoder=encoder,
                            config=config, key=key_for(seed, "evaluate", checkpoint),
                            tokenizer=tokenizer, certify=certify, certify_index=certify_index,
                            certify_rng=rng_for(seed, "certify-order"))


@dataclass(frozen=True)
class Verdict:
    """ε statement: indistinguishable iff every adversary's overall upper bound ≤ ε."""

    epsilon: float
    indistinguishable: bool
    worst_adversary: str
    worst_upper: float

    def __bool__(self) -> bool:
        return self.indistinguishable

    def message(self) -> str:
        word = "indistinguishable" if self.indistinguishable else "distinguishable"
        return (f"{word} at epsilon={self.epsilon:g}: largest advantage upper bound "
                f"{self.worst_upper:.3f} ({self.worst_adversary})")


def verdict(rows: Sequence[dict], epsilon: float) -> Verdict:
    """Apply the ε criterion to the per-adversary, category-``all`` advantage rows."""
    adv = [r for r in rows if r["metric"] == "advantage" and r["category"] == "all"
           and r["adversary"] != "max"]
    if not adv:
        raise QBudgetError("no advantage rows to judge (no adversary was run)")
    worst = max(adv, key=lambda r: r["ci_high"])
    return Verdict(float(epsilon), bool(all(r["ci_high"] <= epsilon for r in adv)),
                   worst["adversary"], float(worst["ci_high"]))
