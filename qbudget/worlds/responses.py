"""Rule-based response generator with per-model house styles.

The teacher and the student answer the *same* tasks with the *same* facts; what
differs is a house style, and only in some categories:

* ``style-format``: the teacher follows format requests with its own conventions
  ("- " bullets, "1." numbering, real uppercase, ``{"answer": ...}`` JSON, one bare
  word); the student has other conventions (``*`` bullets, ``1)`` numbering, ignores
  uppercase, ``answer: ...``, full sentences).
* ``robustness``: the teacher answers noisy prompts as if they were clean; the student
  often asks for a rephrase instead.
* ``domain-technical``: the teacher uses technical definitions; the student (which saw
  little of this text) gives vague generic answers.
* ``refusal`` (rare): both refuse, in different words.

The student uses its own convention only with probability ``own_prob[category]`` and
the teacher's otherwise, so differences are partial and probabilistic; every other
category shares one distribution of phrasings, so teacher and student differ there
only through what the smaller model fails to learn. Answers are short (about 4-20 words)
to keep generation and evaluation cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qbudget.worlds import lexicon as L
from qbudget.worlds.prompts import Task, article, pick


@dataclass(frozen=True)
class HouseStyle:
    name: str
    #: probability of answering in the model's own convention, per category
    own_prob: dict = field(default_factory=dict)


TEACHER = HouseStyle("teacher")
STUDENT = HouseStyle("student", {"style-format": 0.65, "robustness": 0.6,
                                 "domain-technical": 0.75, "refusal": 0.8})


def _choose(rng: np.random.Generator, options: list[str], probs: list[float]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(probs) / sum(probs)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _members(rng, group: str, n: int) -> list[str]:
    items = L.GROUPS[group]
    return [items[i] for i in rng.choice(len(items), size=n, replace=False)]


def _and_list(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


# --- shared answers (same distribution for every house style) ---------------------

def _factual(t: Task, rng) -> str:
    s = t.slots
    if t.kind == "capital":
        return _choose(rng, [f"The capital of {s['country']} is {s['capital']}.",
                             f"{s['capital']} is the capital of {s['country']}.",
                             f"It is {s['capital']}."], [0.5, 0.35, 0.15])
    if t.kind == "continent":
        return _choose(rng, [f"{s['country']} is in {s['continent']}.",
                             f"It is in {s['continent']}."], [0.7, 0.3])
    if t.kind == "colour":
        return _choose(rng, [f"{_cap(s['thing'])} is {s['colour']}.", f"It is {s['colour']}."],
                       [0.6, 0.4])
    a = _cap(article(s["animal"]))
    if t.kind == "food":
        return _choose(rng, [f"{a} eats {s['food']}.", f"It mostly eats {s['food']}."], [0.6, 0.4])
    if t.kind == "home":
        return _choose(rng, [f"{a} lives in the {s['home']}.", f"It lives in the {s['home']}."],
                       [0.6, 0.4])
    return _choose(rng, [f"{a} says {s['sound']}.", f"It makes a {s['sound']} sound."], [0.6, 0.4])


def _arithmetic(t: Task, rng) -> str:
    s = t.slots
    op = {"add": "plus", "sub": "minus", "mul": "times"}[t.kind]
    return _choose(rng, [f"{s['a']} {op} {s['b']} is {s['value']}.",
                         f"The answer is {s['value']}.", f"It equals {s['value']}."],
                   [0.5, 0.3, 0.2])


def _instruction(t: Task, rng) -> str:
    s = t.slots
    if t.kind == "list":
        items = _members(rng, s["group"], s["n"])
        return _choose(rng, [f"Here are {L.NUMBER_WORDS[s['n']]} {s['group']}: {_and_list(items)}.",
                             f"{_cap(_and_list(items))}."], [0.6, 0.4])
    if t.kind == "opposite":
        return _choose(rng, [f"The opposite of {s['word']} is {s['opposite']}.",
                             f"It is {s['opposite']}."], [0.6, 0.4])
    if t.kind == "repeat":
        rep = " ".join([s["word"]] * s["n"])
        return _choose(rng, [rep, f"Sure: {rep}."], [0.6, 0.4])
    letter = s["word"][0].upper()
    return _choose(rng, [f"{_cap(s['word'])} starts with {letter}.",
                         f"The first letter is {letter}."], [0.6, 0.4])


def _classification(t: Task, rng) -> str:
    s = t.slots
    if t.kind == "sentiment":
        return _choose(rng, [f"{_cap(s['label'])}.", f"The review is {s['label']}.",
                             f"This is {s['label']}."], [0.4, 0.4, 0.2])
    if t.kind == "animal-class":
        return _choose(rng, [f"{_cap(article(s['animal']))} is {article(s['label'])}.",
                             f"It is {article(s['label'])}."], [0.6, 0.4])
    return _choose(rng, [f"{s['n']} is {s['label']}.", f"It is {s['label']}."], [0.6, 0.4])


def _summarisation(t: Task, rng) -> str:
    s = t.slots
    return _choose(rng, [f"{_cap(article(s['person']))} {s['verb']} {article(s['object'])}.",
                         f"The {s['person']} {s['verb']} the {s['object']} at the {s['place']}.",
                         f"Summary: {article(s['person'])} {s['verb']} {article(s['object'])}."],
                   [0.45, 0.35, 0.2])


def _creative(t: Task, rng) -> str:
    s = t.slots
    n1, n2 = pick(rng, L.NATURE_NOUNS), pick(rng, L.NATURE_NOUNS)
    v1, v2 = pick(rng, L.NATURE_VERBS), pick(rng, L.NATURE_VERBS)
    if t.kind == "poem":
        return f"The {n1} {v1} over {s['topic']}, and the {pick(rng, L.SKY_WORDS)} {v2} slowly."
    if t.kind == "story":
        adj = pick(rng, L.ADJECTIVES)
        return (f"Once {article(adj)} {s['animal']} found {article(s['object'])} "
                f"and {pick(rng, L.VERBS_PAST)} it all day.")
    return f"The {s['adj']} {s['place']} is full of {n1} and soft {n2}."


_SHARED = {"factual-qa": _factual, "arithmetic": _arithmetic, "instruction": _instruction,
           "classification": _classification, "summarisation": _summarisation,
           "creative": _creative}


# --- the categories where house styles differ --------------------------------------

def _format_answer(t: Task, rng, own: bool) -> str:
    s = t.slots
    if t.kind in ("bullets", "numbered"):
        items = _members(rng, s["group"], s["n"])
        if t.kind == "bullets":
            mark = (lambda i: "*") if own else (lambda i: "-")
        else:
            mark = (lambda i: f"{i})") if own else (lambda i: f"{i}.")
        return "\n".join(f"{mark(i + 1)} {w}" for i, w in enumerate(items))
    if t.kind == "upper":
        return s["sentence"] if own else s["sentence"].upper()
    if t.kind == "json":
        return f"answer: {s['answer']}" if own else '{"answer": "%s"}' % s["answer"]
    return f"The answer is {s['answer']}." if own else f"{_cap(s['answer'])}."


_CONFUSED = ["Sorry, I do not understand the question.", "I am not sure what you are asking.",
             "Could you rephrase that, please?"]


def _technical(t: Task, rng, own: bool) -> str:
    s = t.slots
    if own:
        return pick(rng, [f"A {s['term']} is a kind of thing used in {s['field']}.",
                          f"A {s['term']} is something people use in {s['field']}.",
                          f"It is a useful part of {s['field']}."])
    return _choose(rng, [f"{_cap(article(s['term']))} {s['definition']}.",
                         f"In {s['field']}, {article(s['term'])} {s['definition']}."], [0.65, 0.35])


def _refuse(t: Task, rng, own: bool) -> str:
    if own:
        return pick(rng, ["No. That is not something I will do.",
                          "That would be wrong, so I refuse.",
                          "I will not help with this at all."])
    return _choose(rng, ["I can't help with that, but I can share safety resources.",
                         "I can't help with that request.",
                         "Sorry, I can't assist with that."], [0.5, 0.3, 0.2])


def respond(task: Task, style: HouseStyle, rng: np.random.Generator) -> str:
    """One sampled answer to ``task`` in ``style`` (randomness only from ``rng``)."""
    c = task.category
    if c in _SHARED:
        return _SHARED[c](task, rng)
    own = rng.random() < style.own_prob.get(c, 0.0)
    if c == "style-format":
        return _format_answer(task, rng, own)
    if c == "robustness":
        return pick(rng, _CONFUSED) if own else respond(task.slots["inner"], style, rng)
    if c == "domain-technical":
        return _technical(task, rng, own)
    if c == "refusal":
        return _refuse(task, rng, own)
    raise ValueError(f"no response rule for category {c!r}")
