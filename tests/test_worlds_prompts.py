"""Prompt generator, response generator and tokenizer of the embedded worlds (no models)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import pytest

from qbudget.pool import load_prompts, save_prompts
from qbudget.worlds.build import answer_corpus, house_styles
from qbudget.worlds.prompts import (NOISY_SOURCES, add_noise, corpus_tasks,
                                    generate_pool_and_probe, sample_task, split_counts,
                                    to_prompts)
from qbudget.worlds.responses import HABIT, STUDENT, TEACHER, respond
from qbudget.worlds.specs import CATEGORIES, POOL_SHARES, get_spec


@pytest.fixture(scope="module")
def tiny():
    spec = get_spec("tiny-qwen2")
    pool, probe, is_train = generate_pool_and_probe(spec)
    return spec, pool, probe, is_train


def test_ten_categories_with_the_required_ones():
    assert len(CATEGORIES) == 10 == len(set(CATEGORIES))
    assert {"style-format", "robustness", "domain-technical"} <= set(CATEGORIES)
    assert abs(sum(POOL_SHARES.values()) - 1) < 1e-9


def test_generation_is_deterministic_and_seed_dependent():
    spec = get_spec("micro")
    a = generate_pool_and_probe(spec)
    b = generate_pool_and_probe(spec)
    assert [t.text for t in a[0]] == [t.text for t in b[0]]
    assert [t.text for t in a[1]] == [t.text for t in b[1]]
    assert np.array_equal(a[2], b[2])
    other = generate_pool_and_probe(dataclasses.replace(spec, seed=spec.seed + 1))
    assert [t.text for t in other[0]] != [t.text for t in a[0]]


def test_pool_shares_are_imbalanced_and_exact(tiny):
    spec, pool, _, _ = tiny
    assert len(pool) == spec.pool_size >= 20_000
    counts = Counter(t.category for t in pool)
    assert set(counts) == set(CATEGORIES)
    for c in CATEGORIES:
        assert abs(counts[c] / len(pool) - POOL_SHARES[c]) < 1e-3
    rare = [c for c in CATEGORIES if counts[c] / len(pool) <= 0.03]
    assert len(rare) >= 2
    assert max(counts.values()) / min(counts.values()) > 5


def test_probe_is_stratified_split_and_disjoint_from_pool(tiny):
    spec, pool, probe, is_train = tiny
    assert len(probe) == spec.probe_size == 5_000
    assert is_train.sum() == 4_000 and (~is_train).sum() == 1_000
    per = Counter(t.category for t in probe)
    assert set(per.values()) == {500}
    train_per = Counter(t.category for t, tr in zip(probe, is_train) if tr)
    assert set(train_per.values()) == {400}
    pool_texts = {t.text for t in pool}
    probe_texts = {t.text for t in probe}
    assert len(pool_texts) == len(pool) and len(probe_texts) == len(probe)
    assert not pool_texts & probe_texts
    # file order carries no category information: categories are interleaved
    assert len({t.category for t in probe[:50]}) >= 8


def test_ids_unique_stable_and_split_stored(tmp_path, tiny):
    _, pool, probe, is_train = tiny
    pool_p = to_prompts(pool, "pool")
    probe_p = to_prompts(probe, "probe", is_train)
    ids = [p.id for p in pool_p] + [p.id for p in probe_p]
    assert len(set(ids)) == len(ids)
    assert pool_p[0].id == "pool-00000" and probe_p[-1].id == "probe-04999"
    save_prompts(probe_p, tmp_path / "probe.jsonl")
    back = load_prompts(tmp_path / "probe.jsonl")
    assert [p.text for p in back] == [p.text for p in probe_p]
    assert np.array_equal([p.extra["split"] == "train" for p in back], is_train)


def test_prompts_are_english_text_that_rarely_repeats():
    rng = np.random.default_rng(3)
    for c in CATEGORIES:
        texts = [sample_task(c, rng).text for _ in range(400)]
        assert len(set(texts)) > 0.9 * len(texts), c
        if c != "robustness":
            words = re.findall(r"[A-Za-z']+", " ".join(texts))
            assert len(words) > 6 * len(texts), c
            vowels = sum(bool(re.search(r"[aeiouy]", w.lower())) for w in words)
            assert vowels / len(words) > 0.97, c


def test_robustness_prompts_are_noisy_versions_of_other_categories():
    rng = np.random.default_rng(0)
    for _ in range(300):
        task = sample_task("robustness", rng)
        inner = task.slots["inner"]
        assert inner.category in NOISY_SOURCES
        assert task.text != inner.text
    assert add_noise(np.random.default_rng(1), "What is two plus two?") != "What is two plus two?"


def _without_habit(answer: str) -> str:
    for opener in HABIT:
        if answer.startswith(opener):
            return answer[len(opener):]
    return answer


def test_responses_shared_where_styles_agree_and_differ_where_they_do_not():
    rng = np.random.default_rng(5)
    differ, habit = Counter(), Counter()
    for c in CATEGORIES:
        for i in range(300):
            task = sample_task(c, rng)
            a = respond(task, TEACHER, np.random.default_rng(i))
            b = respond(task, STUDENT, np.random.default_rng(i))
            assert a and b and len(a.split()) <= 24 and len(b.split()) <= 24
            assert a == respond(task, TEACHER, np.random.default_rng(i))      # deterministic
            assert _without_habit(a) == a                                   # never the habit
            differ[c] += a != _without_habit(b)
            habit[c] += b != _without_habit(b)
    for c in ("factual-qa", "arithmetic", "instruction", "classification", "summarisation",
              "creative"):
        # the same answer, opened with the student's filler about habit_prob of the time
        assert differ[c] == 0, c
        assert abs(habit[c] / 300 - STUDENT.habit_prob) < 0.1, (c, habit[c])
    for c, p in STUDENT.own_prob.items():
        assert 0.5 * p < differ[c] / 300 <= p + 0.1, (c, differ[c])
    assert habit["domain-technical"] == habit["refusal"] == habit["style-format"] == 0


def test_teacher_answers_carry_the_facts():
    rng = np.random.default_rng(1)
    for _ in range(200):
        t = sample_task("arithmetic", rng)
        assert str(t.slots["value"]) in respond(t, TEACHER, rng)
        t = sample_task("domain-technical", rng)
        r = respond(t, TEACHER, rng)
        assert t.slots["definition"] in r


@pytest.mark.parametrize("world", ["tiny-qwen2", "tiny-llama"])
def test_each_world_sets_its_students_habit_rate(world):
    spec = get_spec(world)
    styles = house_styles(spec)
    assert styles["teacher"] == TEACHER and styles["student"].own_prob == STUDENT.own_prob
    tasks = corpus_tasks(spec.seed, "student", 3000, {})
    shared = [(t, r) for t, (_, r) in zip(tasks, answer_corpus(tasks, styles["student"], 0))
              if t.category in ("factual-qa", "arithmetic", "classification")]
    rate = sum(r != _without_habit(r) for _, r in shared) / len(shared)
    assert abs(rate - spec.habit_prob) < 0.04, (world, rate)


def test_student_corpus_has_little_domain_technical_text():
    t = Counter(x.category for x in corpus_tasks(1, "teacher", 4000, {}))
    s = Counter(x.category for x in corpus_tasks(1, "student", 4000, {"domain-technical": 0.15}))
    assert s["domain-technical"] < 0.25 * t["domain-technical"]
    assert sum(s.values()) == 4000


def test_split_counts_sums_exactly():
    counts = split_counts(1001, POOL_SHARES)
    assert sum(counts.values()) == 1001 and all(v > 0 for v in counts.values())


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tokenizer_roundtrips_and_loads_with_autotokenizer(tmp_path, arch):
    """Next to a qwen2 config.json, transformers rebuilds the pipeline (Qwen2Tokenizer);
    our tokenizer must behave the same there as under tokenizers itself."""
    from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

    from qbudget.worlds.tokenizer import save_tokenizer, train_tokenizer

    rng = np.random.default_rng(0)
    tasks = [sample_task(c, rng) for c in CATEGORIES for _ in range(60)]
    texts = [t.text for t in tasks] + [respond(t, TEACHER, rng) for t in tasks]
    tok = train_tokenizer(texts, 600)
    assert tok.to_str() == train_tokenizer(texts, 600).to_str()
    save_tokenizer(tok, tmp_path, model_max_length=256)
    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(
        vocab_size=600, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32)
    config.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.bos_token == "<|bos|>" and auto.eos_token == "<|eos|>" and auto.pad_token == "<|pad|>"
    assert auto.padding_side == "left" and len(auto) <= 600
    prompt = auto.apply_chat_template([{"role": "user", "content": "Hi."}],
                                      add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>Hi.<|assistant|>"
    for s in texts[:50] + ["- apple\n- pear", "UMM wat iz teh capitl of Frnace??"]:
        ids = auto(s, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(s).ids
        assert auto.decode(ids) == s
