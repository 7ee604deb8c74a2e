"""JSON Lines in and out of qbudget: the one line reader, and the answer files of ``qbudget eval``.

Every JSONL file a user hands qbudget (pools and probes, replay recordings, answer files)
is read by :func:`read_jsonl`, so they all fail the same way on bad input: a one-line
error naming the file and line (missing file, unreadable file, not UTF-8, malformed JSON),
before anything is spent. What a line must contain is checked by the caller.

An answers file has one object per line: ``id``, ``prompt``, ``category``, ``response``
and optionally ``split`` (``train`` | ``test``: the adversary-train/test split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from qbudget.errors import QBudgetError
from qbudget.pool import Prompt


def read_jsonl(path: str | Path, kind: str) -> Iterator[tuple[str, object]]:
    """``(where, value)`` for every non-blank line of a JSONL file (``where`` = "path:line").

    ``kind`` names the file in errors ("prompt file", "replay file", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise QBudgetError(f"{kind} not found: {path}")
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise QBudgetError(f"cannot read {kind} {path}: {exc.strerror}") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise QBudgetError(f"{where}: malformed JSON ({exc.msg})") from None
                yield where, value
        except UnicodeDecodeError:
            raise QBudgetError(f"{path}: not UTF-8 text (is it really JSONL?)") from None


_REQUIRED = ("id", "prompt", "category", "response")


def load_answer_file(path: str | Path) -> list[dict]:
    """Read an answers JSONL file (id, prompt, category, response[, split]); validate it."""
    rows, seen = [], set()
    for where, row in read_jsonl(path, "answer file"):
        if not isinstance(row, dict):
            raise QBudgetError(f"{where}: expected a JSON object")
        for key in _REQUIRED:
            if not isinstance(row.get(key), str):
                raise QBudgetError(f"{where}: field '{key}' must be a string")
        if not row["id"]:
            raise QBudgetError(f"{where}: field 'id' must be non-empty")
        if "split" in row and row["split"] not in ("train", "test"):
            raise QBudgetError(f"{where}: field 'split' must be 'train' or 'test', "
                               f"got {row['split']!r}")
        if row["id"] in seen:
            raise QBudgetError(f"{where}: duplicate id '{row['id']}'")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise QBudgetError(f"{path}: no answers")
    return rows


def default_split(categories: list[str], seed: int, train_fraction: float = 0.8) -> np.ndarray:
    """Seeded split stratified by category: about train_fraction of each category trains."""
    rng = np.random.default_rng(seed)
    cats = np.array(categories)
    is_train = np.zeros(len(cats), bool)
    for c in sorted(set(categories)):
        idx = np.flatnonzero(cats == c)
        idx = idx[rng.permutation(len(idx))]
        is_train[idx[: int(round(train_fraction * len(idx)))]] = True
    return is_train


def pair_answer_files(teacher_path, student_path, teacher2_path=None, seed: int = 0):
    """(probe, is_train, teacher, student, teacher2) aligned by id, with the split."""
    t_rows = load_answer_file(teacher_path)
    others = [("student", student_path, load_answer_file(student_path))]
    if teacher2_path is not None:
        others.append(("teacher2", teacher2_path, load_answer_file(teacher2_path)))
    t_ids = [r["id"] for r in t_rows]
    aligned = {}
    for name, path, rows in others:
        by_id = {r["id"]: r for r in rows}
        missing = [i for i in t_ids if i not in by_id]
        extra = sorted(set(by_id) - set(t_ids))
        if missing or extra:
            what = (f"{len(missing)} teacher ids missing (e.g. '{missing[0]}')" if missing
                    else f"{len(extra)} ids not in the teacher file (e.g. '{extra[0]}')")
            raise QBudgetError(f"ids of {path} do not match {teacher_path}: {what}")
        for r in t_rows:
            o = by_id[r["id"]]
            if o["prompt"] != r["prompt"]:
                raise QBudgetError(f"{path}: prompt of id '{r['id']}' differs from {teacher_path}")
            if "split" in o and "split" in r and o["split"] != r["split"]:
                raise QBudgetError(f"{path}: split of id '{r['id']}' differs from {teacher_path}")
        aligned[name] = [by_id[i]["response"] for i in t_ids]
    probe = [Prompt(r["id"], r["prompt"], r["category"]) for r in t_rows]
    has_split = ["split" in r for r in t_rows]
    if any(has_split) and not all(has_split):
        raise QBudgetError(f"{teacher_path}: 'split' must be given on every line or on none")
    if all(has_split):
        is_train = np.array([r["split"] == "train" for r in t_rows])
    else:
        is_train = default_split([p.category for p in probe], seed)
    if is_train.all() or not is_train.any():
        raise QBudgetError("need at least one 'train' and one 'test' prompt "
                           f"(got {int(is_train.sum())} train of {len(is_train)})")
    teacher = [r["response"] for r in t_rows]
    return probe, is_train, teacher, aligned["student"], aligned.get("teacher2")
