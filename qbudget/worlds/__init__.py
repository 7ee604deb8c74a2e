"""Embedded worlds: offline teacher + base student + pool + probe bundles.

``get_world(name)`` returns a :class:`World`, building it into the cache on first use
(or when the cached copy fails verification) and reusing it afterwards. A path to a
folder built with ``qbudget world build NAME --out DIR`` is accepted as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qbudget.errors import QBudgetError
from qbudget.oracles.usage import Price
from qbudget.pool import Prompt, load_prompts
from qbudget.worlds import cache
from qbudget.worlds.specs import CATEGORIES, SPEC_VERSION, WorldSpec, get_spec, list_specs

__all__ = ["World", "list_worlds", "get_world", "build_world", "CATEGORIES", "EMBEDDED_PRICE"]

#: The embedded teachers are priced like a small hosted model (US$ 0.15 per million input
#: and 0.60 per million output tokens, the list price of a "mini" tier in 2025), so budgets
#: in dollars, cost columns and cost-aware acquisition can be tried offline.
EMBEDDED_PRICE = Price(0.15, 0.60)


@dataclass
class World:
    """A built world, loaded and verified (the API other modules code against)."""

    name: str
    root: Path
    pool: list[Prompt]
    probe: list[Prompt]
    probe_is_train: np.ndarray          # True = adversary-train split
    categories: list[str]
    teacher_dir: Path
    student_dir: Path
    sampling: dict                      # temperature, top_p, max_new_tokens
    seed: int
    info: dict = field(default_factory=dict, repr=False)   # the world.json contents

    @property
    def architecture(self) -> str:
        return self.info.get("architecture", "")

    @property
    def price(self):
        """What the embedded teacher's answers cost (:data:`EMBEDDED_PRICE`)."""
        return EMBEDDED_PRICE


def _load(root: Path) -> World:
    info = cache.read_manifest(root) or {}
    pool = load_prompts(root / "pool.jsonl")
    probe = load_prompts(root / "probe.jsonl")
    splits = [p.extra.get("split") for p in probe]
    if any(s not in ("train", "test") for s in splits):
        raise QBudgetError(f"{root / 'probe.jsonl'}: every probe prompt needs split train|test")
    return World(
        name=info["name"], root=root, pool=pool, probe=probe,
        probe_is_train=np.array([s == "train" for s in splits], dtype=bool),
        categories=list(info.get("categories", CATEGORIES)),
        teacher_dir=root / "teacher", student_dir=root / "student",
        sampling=dict(info["sampling"]), seed=int(info["seed"]), info=info,
    )


def _ensure(spec: WorldSpec, root: Path, force: bool,
            progress: Callable[[str], None] | None) -> Path:
    from qbudget.worlds.build import build_into

    say = progress or (lambda msg: None)
    reason = cache.problem(root, spec.name, SPEC_VERSION, spec.to_json())
    if reason is None and not force:
        return root
    with cache.build_lock(root):
        # another process may have built it while we waited for the lock
        reason = cache.problem(root, spec.name, SPEC_VERSION, spec.to_json())
        if reason is None and not force:
            return root
        if root.exists() and reason != "not built":
            if any(root.iterdir()) and cache.read_manifest(root) is None and not _looks_partial(root):
                raise QBudgetError(f"refusing to overwrite {root}: it is not a qbudget world")
            say(f"world '{spec.name}' at {root}: {reason}; rebuilding")
        cache.atomic_build(root, lambda tmp: build_into(spec, tmp, say))
    reason = cache.problem(root, spec.name, SPEC_VERSION, spec.to_json())
    if reason is not None:           # a build that does not verify is a bug, not user error
        raise RuntimeError(f"freshly built world at {root} does not verify: {reason}")
    return root


def _looks_partial(root: Path) -> bool:
    """A folder with some of a world's files (e.g. world.json deleted) may be rebuilt."""
    return any((root / n).exists() for n in ("pool.jsonl", "probe.jsonl", "teacher", "student"))


def build_world(name: str, out: str | Path | None = None, *, force: bool = False,
                progress: Callable[[str], None] | None = None) -> World:
    """Build world ``name`` into ``out`` (default: the cache) unless a valid copy exists."""
    spec = get_spec(name)
    root = Path(out).expanduser().resolve() if out is not None else cache.default_root(name)
    if root.exists() and not root.is_dir():
        raise QBudgetError(f"--out {root} exists and is not a directory")
    return _load(_ensure(spec, root, force, progress))


def get_world(name: str | Path, *, progress: Callable[[str], None] | None = None) -> World:
    """The world ``name`` (built and cached on first use), or a built world folder path."""
    key = str(name)
    if key in _names():
        return build_world(key, progress=progress)
    path = Path(key).expanduser()
    if path.is_dir():
        info = cache.read_manifest(path)
        if info is None or info.get("name") not in _names():
            raise QBudgetError(f"{path} is not a built qbudget world (no valid world.json)")
        return _load(_ensure(get_spec(info["name"]), path.resolve(), False, progress))
    get_spec(key)                       # raises: unknown world, listing the known ones
    raise AssertionError("unreachable")


def _names() -> list[str]:
    return [s.name for s in list_specs()]


def list_worlds() -> list[dict]:
    """One row per embedded world: name, architecture, sizes, built or not, where."""
    rows = []
    for spec in list_specs():
        root = cache.default_root(spec.name)
        reason = cache.problem(root, spec.name, SPEC_VERSION, spec.to_json())
        rows.append({
            "name": spec.name,
            "architecture": spec.architecture,
            "description": spec.description,
            "pool": spec.pool_size,
            "probe": spec.probe_size,
            "teacher_params": spec.params("teacher"),
            "student_params": spec.params("student"),
            "built": reason is None,
            "status": "built" if reason is None else reason,
            "root": str(root),
        })
    return rows
