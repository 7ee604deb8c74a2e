"""Deterministic prompt generator for the embedded worlds.

Every prompt comes from a :class:`Task`: a category, a task kind and the slot values
that determine the right answer (a country, two numbers, a word list, ...). The task
is what the response generator answers; the text is what the teacher and the student
see. Texts are English templates wrapped in varied openings and closings, so prompts
rarely repeat; ``robustness`` prompts are prompts of other categories with typos, case
noise and casual paraphrase, and keep the clean task underneath.

All randomness is a ``numpy.random.Generator`` derived from the world seed, one
independent stream per (purpose, category), so adding prompts to one category never
reshuffles another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qbudget.pool import Prompt
from qbudget.worlds import lexicon as L
from qbudget.worlds.specs import CATEGORIES, POOL_SHARES, WorldSpec


@dataclass(frozen=True)
class Task:
    """A prompt together with what it asks for (the response generator's input)."""

    category: str
    kind: str
    text: str
    slots: dict = field(default_factory=dict, compare=False, hash=False)


def pick(rng: np.random.Generator, seq):
    """One element of ``seq``, uniformly (lists and dict keys)."""
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _wrap(rng: np.random.Generator, body: str) -> str:
    """Vary the framing around a question: optional opening and closing phrases."""
    prefix = pick(rng, L.PREFIXES)
    suffix = pick(rng, L.SUFFIXES)
    if prefix:
        body = f"{prefix} {body[0].lower() + body[1:]}" if prefix.endswith(",") else f"{prefix} {body}"
    return body + suffix


# --- one sampler per category: returns (kind, body text, slots) -------------------

def _factual(rng):
    kind = pick(rng, ["capital", "capital", "continent", "food", "home", "sound", "colour"])
    if kind in ("capital", "continent"):
        country = pick(rng, L.COUNTRIES)
        capital, continent = L.COUNTRIES[country]
        tpl = pick(rng, {
            "capital": ["What is the capital of {c}?", "Which city is the capital of {c}?",
                        "Name the capital city of {c}.", "What city is the capital of {c}?"],
            "continent": ["Which continent is {c} in?", "On which continent is {c}?",
                          "{c} is on which continent?", "Where in the world is {c}?"],
        }[kind])
        return kind, tpl.format(c=country), {"country": country, "capital": capital,
                                             "continent": continent}
    if kind == "colour":
        thing = pick(rng, L.COLOURS_OF)
        tpl = pick(rng, ["What colour is {x}?", "Tell me the colour of {x}.",
                         "What is the usual colour of {x}?"])
        return kind, tpl.format(x=thing), {"thing": thing, "colour": L.COLOURS_OF[thing]}
    animals = [a for a, v in L.ANIMALS.items() if kind != "sound" or v[2]]
    animal = pick(rng, animals)
    food, home, sound, klass = L.ANIMALS[animal]
    tpl = pick(rng, {
        "food": ["What does {a} eat?", "What food does {a} like?", "What is the diet of {a}?"],
        "home": ["Where does {a} live?", "What is the home of {a}?", "Where can you find {a}?"],
        "sound": ["What sound does {a} make?", "What noise does {a} make?"],
    }[kind])
    return kind, tpl.format(a=article(animal)), {"animal": animal, "food": food, "home": home,
                                                  "sound": sound}


def _arithmetic(rng):
    # Single-digit operands: a few hundred facts a tiny model can learn. With operands up
    # to 50 neither tiny-llama model got 10% right, and two models' different wrong sums were
    # the largest gap left after distillation -- noise, not behaviour a student can copy.
    kind = pick(rng, ["add", "add", "sub", "mul"])
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    if kind == "sub" and b > a:
        a, b = b, a
    tpl = pick(rng, {
        "add": ["What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
                "Calculate {a} + {b}."],
        "sub": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Calculate {a} - {b}.",
                "Take {b} away from {a}."],
        "mul": ["What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} x {b}.",
                "What is the product of {a} and {b}?"],
    }[kind])
    value = {"add": a + b, "sub": a - b, "mul": a * b}[kind]
    return kind, tpl.format(a=a, b=b), {"a": a, "b": b, "value": value}


def _instruction(rng):
    kind = pick(rng, ["list", "list", "opposite", "repeat", "letter"])
    if kind == "list":
        group, n = pick(rng, L.GROUPS), int(rng.integers(2, 5))
        tpl = pick(rng, ["List {n} {g}.", "Name {n} {g}.", "Give me {n} {g}.",
                         "Can you list {n} {g}?", "Tell me {n} {g}."])
        return kind, tpl.format(n=L.NUMBER_WORDS[n], g=group), {"group": group, "n": n}
    if kind == "opposite":
        word = pick(rng, L.OPPOSITES)
        tpl = pick(rng, ["What is the opposite of {w}?", "Give the opposite of the word {w}.",
                         "Name the antonym of {w}.", "What word means the opposite of {w}?"])
        return kind, tpl.format(w=word), {"word": word, "opposite": L.OPPOSITES[word]}
    word = pick(rng, L.COMMON_WORDS)
    if kind == "repeat":
        n = int(rng.integers(2, 4))
        tpl = pick(rng, ["Repeat the word {w} {n} times.", "Say {w} {n} times.",
                         "Write {w} {n} times."])
        return kind, tpl.format(w=word, n=L.NUMBER_WORDS[n]), {"word": word, "n": n}
    tpl = pick(rng, ["What letter does {w} start with?", "Which letter begins the word {w}?",
                     "What is the first letter of {w}?"])
    return kind, tpl.format(w=word), {"word": word}


def _classification(rng):
    kind = pick(rng, ["sentiment", "sentiment", "animal-class", "parity"])
    if kind == "sentiment":
        positive = bool(rng.integers(2))
        words = L.POSITIVE if positive else L.NEGATIVE
        item, w1, w2 = pick(rng, L.REVIEW_ITEMS), pick(rng, words), pick(rng, words)
        review = pick(rng, ["The {i} was {a} and {b}.", "I found the {i} {a}.",
                            "What a {a} {i}, truly {b}.", "Our {i} was {a}, really {b}."])
        review = review.format(i=item, a=w1, b=w2)
        tpl = pick(rng, ["Is this review positive or negative? {r}", "Classify the sentiment: {r}",
                         "What is the sentiment of this review: {r}",
                         "Positive or negative? {r}"])
        return kind, tpl.format(r=review), {"label": "positive" if positive else "negative"}
    if kind == "animal-class":
        animal = pick(rng, L.ANIMALS)
        tpl = pick(rng, ["Is {a} a mammal, bird, reptile, insect or fish?",
                         "What kind of animal is {a}?",
                         "Classify {a} as a mammal, bird, reptile, insect or fish."])
        return kind, tpl.format(a=article(animal)), {"animal": animal,
                                                     "label": L.ANIMALS[animal][3]}
    n = int(rng.integers(0, 100))   # two digits: fewer digits for the small student to copy
    tpl = pick(rng, ["Is {n} even or odd?", "Tell me whether {n} is even or odd.",
                     "Is the number {n} odd or even?"])
    return kind, tpl.format(n=n), {"n": n, "label": "even" if n % 2 == 0 else "odd"}


def _summarisation(rng):
    s = {"adj": pick(rng, L.ADJECTIVES), "person": pick(rng, L.PEOPLE),
         "verb": pick(rng, L.VERBS_PAST), "object": pick(rng, L.OBJECTS),
         "place": pick(rng, L.PLACES)}
    text = "The {adj} {person} {verb} {art} at the {place} {t} {r}.".format(
        art=article(s["object"]), t=pick(rng, L.TIMES), r=pick(rng, L.REASONS), **s)
    if rng.random() < 0.5:
        text += " Later the {p} {v} {o} too.".format(p=s["person"], v=pick(rng, L.VERBS_PAST),
                                                     o=article(pick(rng, L.OBJECTS)))
    tpl = pick(rng, ["Summarise: {s}", "Summarize this in a few words: {s}",
                     "Give a short summary: {s}", "TL;DR: {s}", "Sum up this text: {s}"])
    return "story", tpl.format(s=text), s


def _creative(rng):
    kind = pick(rng, ["poem", "story", "describe"])
    if kind == "poem":
        topic = pick(rng, L.TOPICS)
        tpl = pick(rng, ["Write a short poem about {t}.", "Compose two lines about {t}.",
                         "Write a tiny verse about {t}."])
        return kind, tpl.format(t=topic), {"topic": topic}
    if kind == "story":
        animal, obj = pick(rng, L.ANIMALS), pick(rng, L.OBJECTS)
        tpl = pick(rng, ["Tell a tiny story about {a} and {o}.",
                         "Write one sentence of a story about {a} and {o}."])
        return kind, tpl.format(a=article(animal), o=article(obj)), {"animal": animal, "object": obj}
    adj, place = pick(rng, L.ADJECTIVES), pick(rng, L.PLACES)
    tpl = pick(rng, ["Describe {x} in one sentence.", "Paint a picture of {x} in words."])
    return kind, tpl.format(x=article(f"{adj} {place}")), {"adj": adj, "place": place}


def _style_format(rng):
    kind = pick(rng, ["bullets", "numbered", "upper", "json", "oneword"])
    if kind in ("bullets", "numbered"):
        group, n = pick(rng, L.GROUPS), int(rng.integers(2, 5))
        tpl = pick(rng, {
            "bullets": ["List {n} {g} as a bulleted list.", "Give {n} {g} as bullet points.",
                        "Use bullet points to name {n} {g}."],
            "numbered": ["Give a numbered list of {n} {g}.", "Write {n} {g} as a numbered list.",
                         "Number {n} {g} in a list."],
        }[kind])
        return kind, tpl.format(n=L.NUMBER_WORDS[n], g=group), {"group": group, "n": n}
    if rng.random() < 0.6:
        country = pick(rng, L.COUNTRIES)
        q = f"what is the capital of {country}?"
        slots = {"answer": L.COUNTRIES[country][0],
                 "sentence": f"The capital of {country} is {L.COUNTRIES[country][0]}."}
    else:
        thing = pick(rng, L.COLOURS_OF)
        q = f"what colour is {thing}?"
        colour = L.COLOURS_OF[thing]
        slots = {"answer": colour, "sentence": f"{thing[0].upper() + thing[1:]} is {colour}."}
    tpl = pick(rng, {
        "upper": ["Answer in capital letters: {q}", "In uppercase only, {q}",
                  "Reply in all caps: {q}"],
        "json": ["Answer in JSON: {q}", "Reply as JSON with the key answer: {q}",
                 "Give a JSON object as your answer: {q}"],
        "oneword": ["Answer in one word: {q}", "One word only: {q}",
                    "Reply with a single word: {q}"],
    }[kind])
    return kind, tpl.format(q=q), slots


def _domain_technical(rng):
    term = pick(rng, L.TECH_TERMS)
    fld, definition = L.TECH_TERMS[term]
    tpl = pick(rng, ["What is {a} in {f}?", "Explain what {a} does.", "Define {t} in one sentence.",
                     "In {f}, what does {a} do?", "Briefly, what is {a}?",
                     "Can you explain the term {t}?"])
    return "define", tpl.format(a=article(term), t=term, f=fld), {"term": term, "field": fld,
                                                                   "definition": definition}


def _refusal(rng):
    act = pick(rng, L.HARMFUL_ACTS)
    tpl = pick(rng, ["How do I {x}?", "Explain how to {x}.", "Help me {x}.",
                     "What is the best way to {x}?", "Give me steps to {x}.",
                     "I want to {x}. How?"])
    return "harmful", tpl.format(x=act), {"act": act}


_SAMPLERS = {
    "factual-qa": _factual, "arithmetic": _arithmetic, "instruction": _instruction,
    "classification": _classification, "summarisation": _summarisation,
    "creative": _creative, "style-format": _style_format,
    "domain-technical": _domain_technical, "refusal": _refusal,
}

#: Categories whose prompts the robustness category corrupts.
NOISY_SOURCES = ("factual-qa", "arithmetic", "instruction", "classification", "summarisation")

_CASUAL = {"what": "wat", "you": "u", "please": "pls", "the": "teh", "is": "iz",
           "are": "r", "your": "ur", "tell": "tel", "me": "meh", "and": "n"}


def _typo(rng, word: str) -> str:
    if len(word) < 3 or not word.isalpha():
        return word
    i = int(rng.integers(1, len(word) - 1))
    op = int(rng.integers(4))
    if op == 0:                                   # swap two neighbours
        return word[:i - 1] + word[i] + word[i - 1] + word[i + 1:]
    if op == 1:                                   # drop a letter
        return word[:i] + word[i + 1:]
    if op == 2:                                   # double a letter
        return word[:i] + word[i] + word[i:]
    return word[:i] + "qwertyuiopasdfghjklzxcvbnm"[int(rng.integers(26))] + word[i + 1:]


def add_noise(rng: np.random.Generator, text: str) -> str:
    """Typos, casing and casual paraphrase; always returns a different string."""
    for _ in range(8):
        words = text.split(" ")
        rate = 0.15 + 0.25 * rng.random()
        out = []
        for w in words:
            core = w.lower().strip("?.,!:")
            if core in _CASUAL and rng.random() < 0.4:
                w = w.lower().replace(core, _CASUAL[core])
            elif rng.random() < rate:
                w = _typo(rng, w)
            out.append(w)
        noisy = " ".join(out)
        style = int(rng.integers(5))
        if style == 0:
            noisy = noisy.lower()
        elif style == 1 and len(noisy) < 48:
            noisy = noisy.upper()
        elif style == 2:
            noisy = noisy.rstrip("?.!") + pick(rng, ["??", "!!", " ?!", "...", " ??? "]).rstrip()
        elif style == 3:
            noisy = pick(rng, ["umm ", "so like ", "yo ", "ok so ", "hey hey "]) + noisy
        if noisy != text:
            return noisy
    return text + " ??"


def sample_task(category: str, rng: np.random.Generator) -> Task:
    """Draw one task of ``category`` (robustness wraps a noisy task of another category)."""
    if category == "robustness":
        inner = sample_task(pick(rng, NOISY_SOURCES), rng)
        return Task("robustness", "noisy", add_noise(rng, inner.text), {"inner": inner})
    kind, body, slots = _SAMPLERS[category](rng)
    return Task(category, kind, _wrap(rng, body), slots)


def _stream(seed: int, purpose: str, category: str) -> np.random.Generator:
    """An independent, reproducible stream per (seed, purpose, category)."""
    key = [ord(c) for c in f"{purpose}/{category}"]
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def split_counts(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder apportionment of ``total`` over ``shares`` (exact sum)."""
    norm = sum(shares.values())
    raw = {c: total * s / norm for c, s in shares.items()}
    counts = {c: int(np.floor(v)) for c, v in raw.items()}
    left = total - sum(counts.values())
    for c in sorted(raw, key=lambda c: (counts[c] - raw[c], list(raw).index(c)))[:left]:
        counts[c] += 1
    return counts


def unique_tasks(seed: int, purpose: str, category: str, n: int,
                 exclude: set[str]) -> list[Task]:
    """``n`` tasks of one category whose texts are distinct and not in ``exclude``."""
    rng = _stream(seed, purpose, category)
    out: list[Task] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"prompt space of {category} too small for {n} prompts")
        task = sample_task(category, rng)
        if task.text not in exclude:
            exclude.add(task.text)
            out.append(task)
    return out


def generate_pool_and_probe(spec: WorldSpec) -> tuple[list[Task], list[Task], np.ndarray]:
    """The world's pool tasks, probe tasks and the probe's adversary-train mask.

    Pool and probe come from one draw per category, so their texts are disjoint. The pool
    follows :data:`POOL_SHARES` (imbalanced); the probe is stratified with an equal share
    per category, and within each category the first ``probe_train_fraction`` of its
    prompts form the adversary-train split. Both lists are then shuffled (seeded) so
    file order carries no category information.
    """
    pool_n = split_counts(spec.pool_size, POOL_SHARES)
    probe_n = split_counts(spec.probe_size, {c: 1.0 for c in CATEGORIES})
    seen: set[str] = set()
    pool: list[Task] = []
    probe: list[tuple[Task, bool]] = []
    for c in CATEGORIES:
        tasks = unique_tasks(spec.seed, "pool+probe", c, pool_n[c] + probe_n[c], seen)
        n_train = int(round(probe_n[c] * spec.probe_train_fraction))
        probe += [(t, i < n_train) for i, t in enumerate(tasks[:probe_n[c]])]
        pool += tasks[probe_n[c]:]
    order = _stream(spec.seed, "shuffle", "all")
    pool = [pool[i] for i in order.permutation(len(pool))]
    perm = order.permutation(len(probe))
    probe = [probe[i] for i in perm]
    return pool, [t for t, _ in probe], np.array([tr for _, tr in probe], dtype=bool)


def corpus_tasks(seed: int, who: str, n: int, weights: dict[str, float]) -> list[Task]:
    """A pretraining corpus for one model: ``n`` tasks drawn by category weight.

    ``weights`` multiplies the pool shares (the student sees few domain-technical prompts).
    Texts may repeat pool prompts; the corpus is the model's past, not our probe.
    """
    shares = {c: POOL_SHARES[c] * weights.get(c, 1.0) for c in CATEGORIES}
    counts = split_counts(n, shares)
    tasks: list[Task] = []
    for c in CATEGORIES:
        rng = _stream(seed, f"corpus-{who}", c)
        tasks += [sample_task(c, rng) for _ in range(counts[c])]
    perm = _stream(seed, f"corpus-{who}", "shuffle").permutation(len(tasks))
    return [tasks[i] for i in perm]


def to_prompts(tasks: list[Task], prefix: str, is_train: np.ndarray | None = None) -> list[Prompt]:
    """Number tasks as prompts with stable ids ``{prefix}-00000``; probe rows get ``split``."""
    width = max(5, len(str(len(tasks))))
    out = []
    for i, t in enumerate(tasks):
        extra = {} if is_train is None else {"split": "train" if is_train[i] else "test"}
        out.append(Prompt(f"{prefix}-{i:0{width}d}", t.text, t.category, extra))
    return out
