"""The embedded world definitions: what each world is made of, as plain data.

A :class:`WorldSpec` fixes everything a build depends on (seeds, pool/probe sizes,
category shares, model shapes, pretraining schedule, sampling settings), so a world is
reproducible from its spec alone. ``SPEC_VERSION`` is bumped whenever the generator,
the response rules or the build recipe change in a way that alters the files; a cached
world built under another version is rebuilt rather than reused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qbudget.errors import QBudgetError

# 5: the decoder's rope, attention and loss were rewritten for speed (same math, other
#    float32 rounding), so a rebuilt world is not bit-identical to a version-4 one.
# 6: tokenizer_config.json gains a response_template (see qbudget.worlds.tokenizer), so
#    `transformers serve` returns a version-6 teacher's answers without the prompt. Token
#    ids and weights are bit-identical to version 5; only that file (and so the teacher's
#    checkpoint checksum, its oracle fingerprint) differs, and a cached version-5 world is
#    rebuilt so that it is served correctly too.
SPEC_VERSION = 6

#: The ten behaviour categories, in their canonical order (World.categories).
CATEGORIES: tuple[str, ...] = (
    "factual-qa",
    "arithmetic",
    "instruction",
    "classification",
    "summarisation",
    "creative",
    "style-format",
    "robustness",
    "domain-technical",
    "refusal",
)

#: Pool shares (imbalanced on purpose: domain-technical and refusal are rare, and they
#: are where the base student differs most from the teacher, so *where* prompts are
#: bought matters).
POOL_SHARES: dict[str, float] = {
    "factual-qa": 0.20,
    "arithmetic": 0.15,
    "instruction": 0.14,
    "classification": 0.12,
    "summarisation": 0.10,
    "creative": 0.095,
    "style-format": 0.075,
    "robustness": 0.08,
    "domain-technical": 0.025,
    "refusal": 0.015,
}


@dataclass(frozen=True)
class ModelSpec:
    """Shape and pretraining schedule of one tiny decoder."""

    architecture: str            # "qwen2" or "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    steps: int                   # full-parameter pretraining steps
    batch_size: int
    learning_rate: float         # peak rate: 5% warm-up, cosine decay to a tenth
    train_prompts: int           # distinct prompts in its pretraining corpus
    #: multiplies POOL_SHARES when drawing the pretraining corpus; the student saw
    #: little domain-technical text.
    corpus_weights: dict = field(default_factory=dict)

    @property
    def approx_params(self) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_layers
        head = h // self.num_heads
        attn = h * h * 2 + 2 * h * head * self.num_kv_heads
        return n * (attn + 3 * h * i)


@dataclass(frozen=True)
class WorldSpec:
    name: str
    description: str
    seed: int
    pool_size: int
    probe_size: int              # stratified: probe_size / len(CATEGORIES) per category
    probe_train_fraction: float  # adversary-train share of each category's probe
    vocab_size: int
    max_len: int                 # prompt + response tokens seen in pretraining
    teacher: ModelSpec
    student: ModelSpec
    sampling: dict
    #: share of the base student's answers in the six shared categories that open with
    #: its conversational habit (responses.HABIT); replaces the student style's default
    habit_prob: float = 0.75

    @property
    def architecture(self) -> str:
        t, s = self.teacher.architecture, self.student.architecture
        return t if t == s else f"{t}/{s}"

    def params(self, which: str) -> int:
        """Approximate parameter count (tied embeddings) of the teacher or student."""
        m = self.teacher if which == "teacher" else self.student
        return m.approx_params + self.vocab_size * m.hidden_size

    def to_json(self) -> dict:
        return asdict(self)


# 40 new tokens: the longest teacher answers (technical definitions) are ~30 byte-level tokens.
_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 40}
_STUDENT_CORPUS = {"domain-technical": 0.15}


def _tiny(name: str, arch: str, seed: int, description: str, *, student_steps: int = 560,
          habit_prob: float = WorldSpec.habit_prob) -> WorldSpec:
    # Sized for the <= 5 minute build on two CPU cores: about 0.29 s per teacher step and
    # 0.17 s per student step (batch 64 x 48 tokens) when each trains alone, ~4.5 minutes
    # in all with the two pretraining concurrently.
    # Both pretrain with a warm-up and cosine decay (version 3): the decayed teacher makes
    # fewer slips (tiny-llama's greedy answers in the shared categories 74% -> 87% right).
    # The smaller student gets twice the teacher's peak rate: with the decay at 3e-3 its
    # final loss stayed higher (a 3-layer test student on tiny-llama: 0.348 vs 0.256 at 6e-3).
    # Both teachers use grouped-query attention (2 KV heads for 4 query heads): with 4 KV
    # heads the Llama teacher's steps cost ~15% more and its build missed the 5 minutes.
    return WorldSpec(
        name=name,
        description=description,
        seed=seed,
        pool_size=20_000,
        probe_size=5_000,
        probe_train_fraction=0.8,
        vocab_size=1024,
        max_len=48,
        teacher=ModelSpec(arch, 96, 3, 4, 2, 256, steps=640, batch_size=64,
                          learning_rate=3e-3, train_prompts=24_000),
        student=ModelSpec(arch, 64, 2, 4, 2, 192, steps=student_steps, batch_size=64,
                          learning_rate=6e-3, train_prompts=16_000,
                          corpus_weights=_STUDENT_CORPUS),
        sampling=dict(_SAMPLING),
        habit_prob=habit_prob,
    )


WORLDS: dict[str, WorldSpec] = {
    "micro": WorldSpec(
        name="micro",
        description="tiny test world (same structure, very small models)",
        seed=7,
        pool_size=1_000,
        probe_size=250,
        probe_train_fraction=0.8,
        vocab_size=512,
        max_len=40,
        teacher=ModelSpec("qwen2", 32, 2, 2, 1, 64, steps=100, batch_size=48,
                          learning_rate=1e-2, train_prompts=1_500),
        student=ModelSpec("llama", 24, 1, 2, 1, 48, steps=60, batch_size=48,
                          learning_rate=1e-2, train_prompts=1_000,
                          corpus_weights=_STUDENT_CORPUS),
        sampling={"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 24},
    ),
    # Version 4: the Qwen2 student trains 720 steps (not 560) and opens 70% of its shared
    # answers with the habit (not 75%). With version 3's settings its base advantage was
    # 0.864, above the 0.85 cap; 720 steps alone left it at 0.86 (the habit sets it) while
    # the distilled advantage fell 0.426 -> 0.406 (fewer slips to copy wrongly); the
    # weaker habit then brought the base to 0.822 (calibration-shaped runs, random q=1000).
    # Its build takes ~270 s, within the 5 minutes. tiny-llama is unchanged.
    "tiny-qwen2": _tiny("tiny-qwen2", "qwen2", 1013,
                        "Qwen2-architecture teacher/student pair",
                        student_steps=720, habit_prob=0.70),
    "tiny-llama": _tiny("tiny-llama", "llama", 2027,
                        "Llama-architecture teacher/student pair"),
}


def list_specs() -> list[WorldSpec]:
    return list(WORLDS.values())


def get_spec(name: str) -> WorldSpec:
    try:
        return WORLDS[name]
    except KeyError:
        known = ", ".join(WORLDS)
        raise QBudgetError(f"unknown world '{name}' (known: {known})") from None
