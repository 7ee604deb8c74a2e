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

from qbudget.adversaries import AdversaryData, get_adversary
from qbudget.adversaries.base import check_sample_bound
from qbudget.config import EvalConfig
from qbudget.errors import QBudgetError
from qbudget.pool import Prompt, category_index
from qbudget.seeding import key_for, stable_seed
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


def evaluate_answers(probe: Sequence[Prompt], is_train: np.ndarray, teacher: Sequence[str],
                     student: Sequence[str], teacher2: Sequence[str] | None = None, *,
                     encoder=None, config: EvalConfig | None = None, key: jax.Array,
                     timings: dict | None = None) -> list[dict]:
    """Similarity and adversary rows for one student; see the module docstring.

    ``timings`` (optional dict) receives seconds per stage (encode, each adversary).
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
                         encoder=encoder, encode_batch_size=config.encode_batch_size)
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

    m = len(config.adversaries)
    alpha_b = bonferroni_alpha(config.alpha, m)
    per_cat_best: dict[str, list] = {}
    for name in config.adversaries:
        run, _ = get_adversary(name)
        t0 = time.perf_counter()
        res = run(data, config.adversary_config(name), jax.random.fold_in(key, zlib.crc32(name.encode())))
        timings[name] = time.perf_counter() - t0
        groups = [("all", np.ones(len(res.correct), bool))]
        groups += [(c, res.unit_category == i) for i, c in enumerate(names)]
        for cat, sel in groups:
            k, nn = int(res.correct[sel].sum()), int(sel.sum())
            if nn == 0:
                continue
            adv, lo, hi = advantage_interval(k, nn, config.alpha)
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

    for cat, entries in per_cat_best.items():
        best = max(entries, key=lambda e: e[0])
        rows.append(_row("advantage", "max", cat, best[0], max(e[1] for e in entries),
                         max(e[2] for e in entries), best[4]))
        rows.append(_row("p_value", "max", cat, bonferroni_p(min(e[3] for e in entries), m),
                         n=best[4]))
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
                     config: EvalConfig) -> list[dict]:
    """Evaluate one student at one checkpoint: its probe answers, then the result rows.

    The one evaluation path: the run loop calls it at every checkpoint (``checkpoint`` =
    q), ``qbudget eval --world`` with checkpoint 0, the calibration script through the
    loop. Every random choice derives from ``(seed, checkpoint)``, so the base student
    evaluated by ``qbudget eval --world W --seed S`` gives exactly the q = 0 rows of a run
    of W with seed S and the same ``[eval]`` settings.
    """
    answers = student_answers(student, tokenizer, [p.text for p in probe], sampling,
                              probe_seeds(seed, checkpoint, probe))
    return evaluate_answers(probe, is_train, teacher, answers, teacher2, encoder=encoder,
                            config=config, key=key_for(seed, "evaluate", checkpoint))


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
