"""Replay oracle: answers recorded earlier, served for free.

A costly study against a real endpoint is recorded once (``qbudget record``) and then
re-simulated with any strategy and any budget up to what was recorded. The file is JSON
Lines or Parquet with columns ``id``, ``prompt``, ``response`` and optionally ``sample``
(default 0); other columns (e.g. ``category``) are ignored. The whole file is validated when
loaded, so a bad recording fails before a run starts, with the offending line named.

Optional usage columns say what each answer cost when it was recorded (``qbudget record``
writes them; an ingested Batch API result carries the server's counts and the discounted
price): ``prompt_tokens`` and ``completion_tokens`` (integers >= 0, both or neither),
``usage_source`` (one of :data:`~qbudget.oracles.usage.USAGE_SOURCES`, default
``recorded``; only with the counts) and ``usd`` (a number >= 0: the answer's known cost). A
missing or null value is absent. ``answer_usage`` serves the recorded usage; an answer
recorded without counts gets an estimate (``source = "estimate"``), never a number passed
off as a bill. ``worst_case`` is the recorded usage itself: a replay knows its answers.

The fingerprint covers the answers, and the usage columns only where a recording has them:
a recording without them keeps the fingerprint it always had (existing caches and ledgers
keep hitting), while two recordings of the same answers with different recorded costs are
different oracles (a cache keyed by the fingerprint must not serve one's costs for the
other's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from qbudget.answers import read_jsonl
from qbudget.errors import QBudgetError
from qbudget.oracles.base import stable_hash
from qbudget.oracles.usage import (TEMPLATE_MARGIN_TOKENS, USAGE_SOURCES, Usage, bound_tokens,
                                   estimate_tokens)
from qbudget.pool import Prompt

REPLAY_SUFFIXES = (".jsonl", ".parquet")
#: the optional usage columns of a replay row
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "usage_source", "usd")


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


def _check_usage(row: dict, where: str) -> tuple | None:
    """The row's usage columns as ``(prompt_tokens, completion_tokens, source, usd)`` (counts
    None when not recorded), or None when it has none."""
    got = {k: row.get(k) for k in USAGE_FIELDS if row.get(k) is not None}
    if not got:
        return None
    for key in ("prompt_tokens", "completion_tokens"):
        v = got.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise QBudgetError(f"{where}: field '{key}' must be an integer >= 0, got {v!r}")
    counts = [k for k in ("prompt_tokens", "completion_tokens") if k in got]
    if len(counts) == 1:
        other = "completion_tokens" if counts[0] == "prompt_tokens" else "prompt_tokens"
        raise QBudgetError(f"{where}: field '{other}' is missing (prompt_tokens and "
                           "completion_tokens come together)")
    source = got.get("usage_source")
    if source is not None:
        if source not in USAGE_SOURCES:
            raise QBudgetError(f"{where}: field 'usage_source' must be one of "
                               f"{', '.join(USAGE_SOURCES)}, got {source!r}")
        if not counts:
            raise QBudgetError(f"{where}: field 'usage_source' needs prompt_tokens and "
                               "completion_tokens")
    usd = got.get("usd")
    if usd is not None and (isinstance(usd, bool) or not isinstance(usd, (int, float))
                            or not math.isfinite(usd) or usd < 0):
        raise QBudgetError(f"{where}: field 'usd' must be a number >= 0, got {usd!r}")
    return (got.get("prompt_tokens"), got.get("completion_tokens"),
            source if source is not None else ("recorded" if counts else None),
            None if usd is None else float(usd))


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
    return [row[:4] for row in _load(path)]


def _load(path: str | Path) -> list[tuple[str, str, str, int, tuple | None]]:
    """``(id, prompt, response, sample, usage columns or None)`` for every row, validated."""
    path = Path(path)
    if not path.is_file():
        raise QBudgetError(f"replay file not found: {path}")
    if path.suffix not in REPLAY_SUFFIXES:
        raise QBudgetError(f"replay file must end in .jsonl or .parquet: {path}")
    rows_iter = _parquet_rows(path) if path.suffix == ".parquet" else read_jsonl(path, "replay file")
    rows: list[tuple[str, str, str, int, tuple | None]] = []
    seen: dict[tuple[str, int], str] = {}
    for where, raw in rows_iter:
        pid, text, response, sample = _check_row(raw, where)
        usage = _check_usage(raw, where)
        if (pid, sample) in seen:
            raise QBudgetError(f"{where}: duplicate answer for prompt '{pid}' sample {sample} "
                               f"(first at {seen[pid, sample]})")
        seen[pid, sample] = where
        rows.append((pid, text, response, sample, usage))
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
        rows = _load(self.path)
        self._by_id: dict[tuple[str, int], tuple[str, str, Usage]] = {}
        self._by_text: dict[tuple[str, int], tuple[str, Usage]] = {}
        for pid, text, resp, s, columns in rows:
            usage = _usage_of(text, resp, columns)
            self._by_id[pid, s] = (text, resp, usage)
            self._by_text.setdefault((text, s), (resp, usage))
        self.name = f"replay:{self.path.name}"
        # Same recorded content -> same fingerprint, whether stored as JSONL or Parquet; the
        # usage columns enter it only when present (see the module docstring).
        answers = sorted((p, t, r, s) for p, t, r, s, _ in rows)
        costs = sorted([p, s, *u] for p, _, _, s, u in rows if u is not None)
        self.fingerprint = stable_hash(["replay", answers, "usage", costs] if costs
                                       else ["replay", answers])
        self.size = len(rows)
        self._worst_by_id: dict[str, tuple[str, Usage]] = {}
        self._worst_by_text: dict[str, Usage] = {}
        for (pid, _), (text, _, usage) in self._by_id.items():
            old = self._worst_by_id.get(pid)
            self._worst_by_id[pid] = (text, _most(old[1] if old else None, usage))
            self._worst_by_text[text] = _most(self._worst_by_text.get(text), usage)
        # the longest recorded answer: bounds what an unrecorded prompt could cost
        self._max_completion = max(u.completion_tokens for _, _, u in self._by_id.values())

    def __len__(self) -> int:
        return self.size

    def _lookup(self, p: Prompt, sample: int) -> tuple[str, Usage]:
        hit = self._by_id.get((p.id, sample))
        if hit is not None:
            text, resp, usage = hit
            if text != p.text:
                raise QBudgetError(f"prompt '{p.id}' has different text than in the "
                                   f"recording {self.path}")
            return resp, usage
        got = self._by_text.get((p.text, sample))
        if got is None:
            extra = f" sample {sample}" if sample else ""
            raise QBudgetError(f"prompt '{p.id}'{extra} is not recorded in {self.path}")
        return got

    def answer(self, prompts: Sequence[Prompt], sample: int = 0) -> list[str]:
        # through answer_usage, as the other oracles do: one entry point serves answers
        return [text for text, _ in self.answer_usage(prompts, sample)]

    def answer_usage(self, prompts: Sequence[Prompt], sample: int = 0) -> list[tuple[str, Usage]]:
        """The recorded answers with their recorded usage (estimated where none was recorded)."""
        return [self._lookup(p, sample) for p in prompts]

    def worst_case(self, prompt: Prompt) -> Usage:
        """What a request for ``prompt`` will cost: its recorded usage (the most any of its
        recorded samples used). An unrecorded prompt (its purchase will fail) gets a bound:
        its UTF-8 bytes plus the template margin, and the longest recorded answer."""
        got = self._worst_by_id.get(prompt.id)
        if got is not None and got[0] == prompt.text:
            return got[1]
        usage = self._worst_by_text.get(prompt.text)
        if usage is not None:
            return usage
        return Usage(bound_tokens(prompt.text) + TEMPLATE_MARGIN_TOKENS, self._max_completion,
                     "estimate")


def _most(a: Usage | None, b: Usage) -> Usage:
    """The larger of two usages of one prompt (its samples), field by field."""
    if a is None:
        return b
    source = a.source if a.source == b.source else (
        "estimate" if "estimate" in (a.source, b.source) else "recorded")
    usd = None if a.usd is None or b.usd is None else max(a.usd, b.usd)
    return Usage(max(a.prompt_tokens, b.prompt_tokens),
                 max(a.completion_tokens, b.completion_tokens), source, usd)


def _usage_of(text: str, response: str, columns: tuple | None) -> Usage:
    """A row's :class:`Usage`: its recorded columns, else an estimate from its texts."""
    pt, ct, source, usd = columns if columns is not None else (None, None, None, None)
    if pt is None:
        return Usage(estimate_tokens(text), estimate_tokens(response), "estimate", usd)
    return Usage(pt, ct, source, usd)
