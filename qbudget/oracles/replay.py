"""Replay oracle: answers recorded earlier, served for free.

A costly study against a real endpoint is recorded once (``qbudget record``) and then
re-simulated with any strategy and any budget up to what was recorded. The file is JSON
Lines or Parquet with columns ``id``, ``prompt``, ``response`` and optionally ``sample``
(default 0); other columns (e.g. ``category``) are ignored. The whole file is validated when
loaded, so a bad recording fails before a run starts, with the offending line named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from qbudget.answers import read_jsonl
from qbudget.errors import QBudgetError
from qbudget.oracles.base import stable_hash
from qbudget.pool import Prompt

REPLAY_SUFFIXES = (".jsonl", ".parquet")


def _check_row(row, where: str) -> tuple[str, str, str, int]:
    if not isinstance(row, dict):
        raise QBudgetError(f"{where}: expected a JSON object with id, prompt, response")
    for key in ("id", "prompt", "response"):
        if key not in row or row[key] is None:
            raise QBudgetError(f"{where}: missing field '{key}'")
        if not isinstance(row[key], str):
            raise QBudgetError(f"{where}: field '{key}' must be a string")
    if not row["id"]:
        raise QBudgetError(f"{where}: field 'id' must be a non-empty string")
    sample = row.get("sample", 0)
    if sample is None:
        sample = 0
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise QBudgetError(f"{where}: field 'sample' must be a non-negative integer")
    return row["id"], row["prompt"], row["response"], int(sample)


def _parquet_rows(path: Path) -> Iterable[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise QBudgetError(f"{path}: not a readable Parquet file ({exc})".splitlines()[0]) from None
    for key in ("id", "prompt", "response"):
        if key not in table.column_names:
            raise QBudgetError(f"{path}: missing column '{key}'")
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i + 1}", row


def load_replay(path: str | Path) -> list[tuple[str, str, str, int]]:
    """Read and validate a replay file into ``(id, prompt, response, sample)`` tuples."""
    path = Path(path)
    if not path.is_file():
        raise QBudgetError(f"replay file not found: {path}")
    if path.suffix not in REPLAY_SUFFIXES:
        raise QBudgetError(f"replay file must end in .jsonl or .parquet: {path}")
    rows_iter = _parquet_rows(path) if path.suffix == ".parquet" else read_jsonl(path, "replay file")
    rows: list[tuple[str, str, str, int]] = []
    seen: dict[tuple[str, int], str] = {}
    for where, raw in rows_iter:
        pid, text, response, sample = _check_row(raw, where)
        if (pid, sample) in seen:
            raise QBudgetError(f"{where}: duplicate answer for prompt '{pid}' sample {sample} "
                               f"(first at {seen[pid, sample]})")
        seen[pid, sample] = where
        rows.append((pid, text, response, sample))
    if not rows:
        raise QBudgetError(f"{path}: no recorded answers")
    return rows


def write_replay(path: str | Path, rows: Sequence[dict]) -> None:
    """Write replay rows (dicts with id, prompt, response, sample, ...) atomically.

    The format follows the suffix; the file appears complete or not at all (temp file +
    rename), so an interrupted ``qbudget record`` never leaves a truncated recording.
    """
    path = Path(path)
    if path.suffix not in REPLAY_SUFFIXES:
        raise QBudgetError(f"replay output must end in .jsonl or .parquet: {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
        pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in keys}), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            fh.flush()
    tmp.replace(path)


class ReplayOracle:
    """Answers from a recording; an unrecorded prompt is a clear error, never a silent gap.

    A prompt is found by its id (its recorded text must match, so a changed pool cannot be
    served answers to different questions) or, failing that, by its exact text.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        rows = load_replay(self.path)
        self._by_id = {(pid, s): (text, resp) for pid, text, resp, s in rows}
        self._by_text: dict[tuple[str, int], str] = {}
        for _, text, resp, s in rows:
            self._by_text.setdefault((text, s), resp)
        self.name = f"replay:{self.path.name}"
        # Same recorded content -> same fingerprint, whether stored as JSONL or Parquet.
        self.fingerprint = stable_hash(["replay", sorted((p, t, r, s) for p, t, r, s in rows)])
        self.size = len(rows)

    def __len__(self) -> int:
        return self.size

    def answer(self, prompts: Sequence[Prompt], sample: int = 0) -> list[str]:
        out = []
        for p in prompts:
            hit = self._by_id.get((p.id, sample))
            if hit is not None:
                text, resp = hit
                if text != p.text:
                    raise QBudgetError(f"prompt '{p.id}' has different text than in the "
                                       f"recording {self.path}")
                out.append(resp)
                continue
            resp = self._by_text.get((p.text, sample))
            if resp is None:
                extra = f" sample {sample}" if sample else ""
                raise QBudgetError(f"prompt '{p.id}'{extra} is not recorded in {self.path}")
            out.append(resp)
        return out
