"""Prompts: the unit the teacher is queried with, and their JSONL storage.

A pool or probe file is JSON Lines with one object per prompt: ``id`` (unique, stable
string), ``text`` and ``category`` (plus optional fields kept in ``extra``). Loading
validates everything up front so a bad file fails before any budget is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from qbudget.errors import QBudgetError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        row = {"id": self.id, "text": self.text, "category": self.category}
        row.update(self.extra)
        return row


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate a prompts JSONL file (unique ids, non-empty text, a category)."""
    from qbudget.answers import read_jsonl

    prompts: list[Prompt] = []
    seen: set[str] = set()
    for where, row in read_jsonl(path, "prompt file"):
        if not isinstance(row, dict):
            raise QBudgetError(f"{where}: expected a JSON object")
        for key in ("id", "text", "category"):
            if not isinstance(row.get(key), str) or (key != "category" and not row[key]):
                raise QBudgetError(f"{where}: field '{key}' must be a non-empty string")
        pid = row.pop("id")
        if pid in seen:
            raise QBudgetError(f"{where}: duplicate prompt id '{pid}'")
        seen.add(pid)
        text, category = row.pop("text"), row.pop("category")
        prompts.append(Prompt(pid, text, category, row))
    if not prompts:
        raise QBudgetError(f"{path}: no prompts")
    return prompts


def save_prompts(prompts: Iterable[Prompt], path: str | Path) -> None:
    """Write prompts as JSONL (sorted keys, one per line) so files are byte-reproducible."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for p in prompts:
            fh.write(json.dumps(p.to_json(), sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)


def category_index(prompts: Sequence[Prompt], names: Sequence[str] | None = None):
    """Return (int32 array of category indices, sorted category names)."""
    import numpy as np

    names = sorted({p.category for p in prompts}) if names is None else list(names)
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[p.category] for p in prompts], dtype=np.int32), names


def stratified_subset(prompts: Sequence[Prompt], is_train, size: int, seed: int) -> list[int]:
    """A probe subset of ``size`` that keeps category and train/test shares.

    Deterministic from the *world* seed, so every cell of a sweep evaluates on the same
    prompts (and shares their cached teacher answers).
    """
    import numpy as np

    from qbudget.seeding import rng_for

    n = len(prompts)
    if size <= 0 or size >= n:
        return list(range(n))
    rng = rng_for(seed, "probe-subset")
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.category, bool(is_train[i])), []).append(i)
    keys = sorted(groups)
    exact = np.array([len(groups[k]) * size / n for k in keys])
    take = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - take), kind="stable")[: size - take.sum()]:
        take[j] += 1
    chosen: list[int] = []
    for k, t in zip(keys, take):
        members = np.array(groups[k])
        chosen.extend(members[rng.permutation(len(members))[:t]].tolist())
    return sorted(chosen)
