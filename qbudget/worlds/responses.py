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
the teacher's otherwise, so differences are partial and probabilistic. The other six
categories have one canonical answer per prompt, the same for both styles, except for
one conversational *habit*: the student opens a share ``habit_prob`` of those answers
with a filler ("Sure! ", "Okay. "). The habit is the part of the gap a little
distillation removes (every bought prompt in the frequent categories teaches it), as
the study's LoRA students took on their teacher's surface style; what remains there is
what either small model gets wrong. Answers are short (about 4-20 words) to keep
generation and evaluation cheap.
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
    #: probability of opening an answer in a shared category with one of ``HABIT``
    habit_prob: float = 0.0


TEACHER = HouseStyle("teacher")
STUDENT = HouseStyle("student", {"style-format": 0.65, "robustness": 0.7,
                                 "domain-technical": 0.75, "refusal": 0.8},
                     habit_prob=0.75)   # a world's spec may set its own (WorldSpec.habit_prob)

#: the student's conversational openers (its habit in the shared categories)
HABIT = ("Sure! ", "Okay. ")


def _choose(rng: np.random.Generator, options: list[str], probs: list[float]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(probs) / sum(probs)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _and_list(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


# --- shared answers (one canonical phrasing, the same for every house style) ---------
# Each is a function of the prompt's slots only: a competent model answers these the
# same way every time, so what separates teacher and student here is the student's
# habit (learnable) and what either model gets wrong (capacity), not two models'
# different guesses at a many-way random choice.

def _factual(t: Task) -> str:
    s = t.slots
    if t.kind == "capital":
        return f"The capital of {s['country']} is {s['capital']}."
    if t.kind == "continent":
        return f"{s['country']} is in {s['continent']}."
    if t.kind == "colour":
        return f"{_cap(s['thing'])} is {s['colour']}."
    a = _cap(article(s["animal"]))
    if t.kind == "food":
        return f"{a} eats {s['food']}."
    if t.kind == "home":
        return f"{a} lives in the {s['home']}."
    return f"{a} says {s['sound']}."


def _arithmetic(t: Task) -> str:
    s = t.slots
    op = {"add": "plus", "sub": "minus", "mul": "times"}[t.kind]
    return f"{s['a']} {op} {s['b']} is {s['value']}."


def _instruction(t: Task) -> str:
    s = t.slots
    if t.kind == "list":
        items = L.GROUPS[s["group"]][:s["n"]]
        return f"Here are {L.NUMBER_WORDS[s['n']]} {s['group']}: {_and_list(items)}."
    if t.kind == "opposite":
        return f"The opposite of {s['word']} is {s['opposite']}."
    if t.kind == "repeat":
        return " ".join([s["word"]] * s["n"])
    return f"{_cap(s['word'])} starts with {s['word'][0].upper()}."


def _classification(t: Task) -> str:
    s = t.slots
    if t.kind == "sentiment":
        return f"The review is {s['label']}."
    if t.kind == "animal-class":
        return f"{_cap(article(s['animal']))} is {article(s['label'])}."
    return f"{s['n']} is {s['label']}."


def _summarisation(t: Task) -> str:
    s = t.slots
    # who and what, not the verb: copying the verb out of mid-sentence was beyond the
    # two-layer student (version 2, tiny-llama, greedy: 7% right against the teacher's 100%)
    return f"A story about {article(s['person'])} and {article(s['object'])}."


def _creative(t: Task) -> str:
    s = t.slots
    if t.kind == "poem":
        return f"The wind sings over {s['topic']}, and the sky glows slowly."
    if t.kind == "story":
        return (f"Once {article(s['animal'])} found {article(s['object'])} "
                f"and kept it all day.")
    return f"The {s['adj']} {s['place']} is full of light and soft wind."


_SHARED = {"factual-qa": _factual, "arithmetic": _arithmetic, "instruction": _instruction,
           "classification": _classification, "summarisation": _summarisation,
           "creative": _creative}


# --- the categories where house styles differ --------------------------------------

def _format_answer(t: Task, own: bool) -> str:
    s = t.slots
    if t.kind in ("bullets", "numbered"):
        items = L.GROUPS[s["group"]][:s["n"]]
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
        answer = _SHARED[c](task)
        # a style without the habit (the teacher) draws nothing for these answers
        if style.habit_prob and rng.random() < style.habit_prob:
            answer = HABIT[int(rng.integers(len(HABIT)))] + answer
        return answer
    own = rng.random() < style.own_prob.get(c, 0.0)
    if c == "style-format":
        return _format_answer(task, own)
    if c == "robustness":
        return pick(rng, _CONFUSED) if own else respond(task.slots["inner"], style, rng)
    if c == "domain-technical":
        return _technical(task, rng, own)
    if c == "refusal":
        return _refuse(task, rng, own)
    raise ValueError(f"no response rule for category {c!r}")
