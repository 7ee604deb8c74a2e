"""Real worlds: your own student checkpoint, teacher and prompts, described in one TOML.

Everywhere a world name is accepted (``qbudget run --world``, bench grids, ``qbudget eval
--world``) a path to a ``*.toml`` file may be given instead::

    name = "qwen-study"
    student = "/models/qwen2.5-0.5b-instruct"   # local HF folder (config.json, safetensors, tokenizer)
    pool = "pool.jsonl"                         # id, text, category (paths relative to this file)
    probe = "probe.jsonl"                       # + optional split = "train" | "test"
    seed = 0

    [sampling]                                  # used for the teacher AND the student
    temperature = 0.7
    top_p = 0.95
    max_new_tokens = 128

    [teacher]
    kind = "http"                               # or "local" (dir = ...) or "replay" (path = ...)
    base_url = "http://localhost:8000"
    model = "Qwen/Qwen2.5-7B-Instruct"
    api_key_env = "TEACHER_API_KEY"             # the NAME of the variable; the key is never written

    [teacher.price]                             # US$ per million tokens: budgets in dollars
    input_per_mtok = 0.40
    output_per_mtok = 1.20

The world then behaves exactly like an embedded one; its caches (pool embeddings) live
under the qbudget home, keyed by the TOML's content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qbudget.config import read_toml
from qbudget.errors import QBudgetError
from qbudget.oracles.usage import Price
from qbudget.pool import Prompt, load_prompts

TEACHER_KINDS = ("local", "http", "replay")


@dataclass
class RealWorld:
    name: str
    root: Path
    pool: list[Prompt]
    probe: list[Prompt]
    probe_is_train: np.ndarray
    categories: list[str]
    student_dir: Path
    sampling: dict
    seed: int
    teacher: dict = field(default_factory=dict)
    teacher_dir: Path | None = None
    #: ``[teacher.price]``: what the teacher's answers cost (None = not given)
    price: Price | None = None

    def make_oracle(self):
        from qbudget.oracles import HttpOracle, HttpOracleConfig, LocalModelOracle, ReplayOracle

        kind = self.teacher["kind"]
        if kind == "local":
            return LocalModelOracle(self.teacher_dir, self.sampling, self.seed)
        if kind == "replay":
            return ReplayOracle(self.teacher["path"])
        params = {k: v for k, v in self.teacher.items() if k != "kind"}
        params.setdefault("temperature", self.sampling["temperature"])
        params.setdefault("top_p", self.sampling.get("top_p", 1.0))
        params.setdefault("max_tokens", self.sampling["max_new_tokens"])
        return HttpOracle(HttpOracleConfig.from_dict(params))


def _path(base: Path, value, key: str, src: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise QBudgetError(f"{src}: '{key}' must be a path")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def load_real_world(path: str | Path) -> RealWorld:
    """Validate a world TOML up front: files exist, prompts parse, teacher kind is known."""
    from qbudget.runtime import qbudget_home

    src = Path(path)
    data = read_toml(src)
    base = src.resolve().parent
    known = {"name", "student", "pool", "probe", "seed", "sampling", "teacher"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise QBudgetError(f"{src}: unknown key '{unknown[0]}' (expected: {', '.join(sorted(known))})")
    for key in ("student", "pool", "probe", "teacher"):
        if key not in data:
            raise QBudgetError(f"{src}: missing key '{key}'")
    student = _path(base, data["student"], "student", src)
    if not (student / "config.json").is_file():
        raise QBudgetError(f"{src}: student folder {student} has no config.json")
    pool = load_prompts(_path(base, data["pool"], "pool", src))
    probe = load_prompts(_path(base, data["probe"], "probe", src))
    overlap = {p.text for p in pool} & {p.text for p in probe}
    if overlap:
        raise QBudgetError(f"{src}: {len(overlap)} probe prompts also appear in the pool "
                           "(the probe must be held out)")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise QBudgetError(f"{src}: 'seed' must be an integer >= 0")
    splits = [p.extra.get("split") for p in probe]
    if all(s in ("train", "test") for s in splits):
        is_train = np.array([s == "train" for s in splits])
    elif any(s is not None for s in splits):
        raise QBudgetError(f"{src}: probe 'split' must be 'train' or 'test' on every prompt (or on none)")
    else:  # seeded 80/20 split
        rng = np.random.default_rng(seed)
        is_train = np.zeros(len(probe), dtype=bool)
        is_train[rng.permutation(len(probe))[: int(round(0.8 * len(probe)))]] = True
    sampling = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64, **data.get("sampling", {})}
    if not isinstance(data["teacher"], dict):
        raise QBudgetError(f"{src}: 'teacher' must be a table")
    teacher = dict(data["teacher"])
    price = Price.from_dict(teacher.pop("price")) if "price" in teacher else None
    kind = teacher.get("kind")
    if kind not in TEACHER_KINDS:
        raise QBudgetError(f"{src}: teacher.kind must be one of {', '.join(TEACHER_KINDS)}, got {kind!r}")
    teacher_dir = None
    if kind == "local":
        teacher_dir = _path(base, teacher.get("dir"), "teacher.dir", src)
        if not (teacher_dir / "config.json").is_file():
            raise QBudgetError(f"{src}: teacher folder {teacher_dir} has no config.json")
    elif kind == "replay":
        teacher["path"] = str(_path(base, teacher.get("path"), "teacher.path", src))
    elif teacher.get("tokenizer") is not None:   # http: the teacher's tokenizer, for checks
        teacher["tokenizer"] = str(_path(base, teacher["tokenizer"], "teacher.tokenizer", src))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    root = qbudget_home() / "real-worlds" / f"{data.get('name', src.stem)}-{digest}"
    root.mkdir(parents=True, exist_ok=True)
    categories = sorted({p.category for p in pool} | {p.category for p in probe})
    return RealWorld(name=str(data.get("name", src.stem)), root=root, pool=pool, probe=probe,
                     probe_is_train=is_train, categories=categories, student_dir=student,
                     sampling=sampling, seed=seed, teacher=teacher, teacher_dir=teacher_dir,
                     price=price)


def resolve_world(name: str):
    """An embedded world by name, or a real world from a ``*.toml`` path."""
    if name.endswith(".toml"):
        return load_real_world(name)
    from qbudget.worlds import get_world

    return get_world(name)
