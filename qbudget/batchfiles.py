"""OpenAI Batch API files: requests out, finished results in (as a replay file).

A batch is the cheap way to buy many answers from a paid endpoint: the provider answers a
file of requests within a day at a discount (OpenAI's Batch API: 50% off its list prices).
``qbudget record --batch-out`` writes the request file, paying nothing; the user uploads it
and downloads the output file; ``qbudget record --batch-in`` turns that into a replay file
whose rows carry the server's token counts and the discounted cost, so every later run
replays the study for free and accounts for what it cost.

Request lines (one per prompt)::

    {"custom_id": PROMPT_ID, "method": "POST", "url": "/v1/chat/completions",
     "body": <exactly what HttpOracle would POST for the prompt>}

(``/v1/completions`` for ``api = "completions"``); the body comes from
:meth:`HttpOracle.request_body`, so a batched answer and a live one are asked the same way
(same model, sampling settings, per-prompt seed, system prompt).

Result lines: ``{"custom_id": ..., "response": {"status_code": 200, "body": {...}} | null,
"error": null | {...}}``. An answer is kept only when its line has no error, status 200, a
body with an answer, and that answer passes HttpOracle's answer checks (no echoed prompt,
no chat special tokens). The others are not written and are reported (how many, and the
first ids, per reason): never silently dropped. A line that is not a JSON object, lacks a
string ``custom_id``, names a prompt not in the pool (or outside the selection) or repeats
a ``custom_id`` stops the ingest with a one-line error naming the line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from qbudget.answers import read_jsonl
from qbudget.errors import QBudgetError
from qbudget.oracles.usage import Price
from qbudget.pool import Prompt

#: OpenAI's Batch API bills batched requests at half its list prices ("50% cost discount
#: compared to synchronous APIs"); the default of ``--batch-discount``.
OPENAI_BATCH_DISCOUNT = 0.5
#: ids shown per reason in an ingest report
SHOWN_IDS = 5


def batch_url(oracle) -> str:
    """The ``url`` of a request line: the API path the oracle posts to."""
    return "/v1/chat/completions" if oracle.config.api == "chat" else "/v1/completions"


def write_batch_requests(path: str | Path, oracle, prompts: Sequence[Prompt]) -> int:
    """Write one Batch API request line per prompt (sample 0) to ``path``, atomically.

    ``oracle`` is the :class:`~qbudget.oracles.http.HttpOracle` the answers would otherwise
    be bought from; returns the number of lines written.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        raise QBudgetError(f"--batch-out must end in .jsonl: {path}")
    if path.exists() and not path.is_file():
        raise QBudgetError(f"--batch-out {path} exists and is not a file")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise QBudgetError(f"prompt id '{dup}' appears twice: batch custom_ids must be unique")
    url = batch_url(oracle)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for p in prompts:
            line = {"custom_id": p.id, "method": "POST", "url": url,
                    "body": oracle.request_body(p, 0)}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(prompts)


@dataclass
class Ingested:
    """What :func:`read_batch_results` found: replay rows, and what was left out (by reason)."""

    rows: list[dict]
    failed: list[tuple[str, str]] = field(default_factory=list)    # (id, why): error / status
    refused: list[tuple[str, str]] = field(default_factory=list)   # (id, answer check message)
    missing: list[str] = field(default_factory=list)               # selected, no result line

    @property
    def usd(self) -> float:
        return sum(row["usd"] for row in self.rows)

    def problems(self) -> list[str]:
        """One line per reason an answer was not recorded (empty when all were)."""
        out = []
        if self.failed:
            out.append(f"{len(self.failed)} failed in the batch, not recorded: "
                       + _shown(self.failed))
        if self.refused:
            out.append(f"{len(self.refused)} refused by the answer checks, not recorded: "
                       + _shown(self.refused))
        if self.missing:
            out.append(f"{len(self.missing)} selected prompts have no result line: "
                       + ", ".join(self.missing[:SHOWN_IDS])
                       + (" ..." if len(self.missing) > SHOWN_IDS else ""))
        return out


def _shown(items: list[tuple[str, str]]) -> str:
    first = "; ".join(f"{pid} ({why})" for pid, why in items[:SHOWN_IDS])
    return first + (" ..." if len(items) > SHOWN_IDS else "")


def check_discount(value: float, option: str = "--batch-discount") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value < 1:
        raise QBudgetError(f"{option} must be a number in [0, 1), got {value!r}")
    return float(value)


def _failure(where: str, line: dict) -> str | None:
    """Why a result line carries no answer (error, non-200 status), or None."""
    error = line.get("error")
    response = line.get("response")
    if response is not None and not isinstance(response, dict):
        raise QBudgetError(f"{where}: field 'response' must be an object or null")
    if error is not None:
        if isinstance(error, dict):
            parts = [" ".join(str(v).split()) for v in (error.get("code"), error.get("message"))
                     if v]
            return ("error " + ": ".join(parts))[:120] if parts else "error"
        return f"error: {' '.join(str(error).split())[:100]}"
    if response is None:
        raise QBudgetError(f"{where}: neither 'response' nor 'error' is set")
    status = response.get("status_code")
    if isinstance(status, bool) or not isinstance(status, int):
        raise QBudgetError(f"{where}: field 'response.status_code' must be an integer")
    if status != 200:
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        detail = err.get("message") if isinstance(err, dict) else None
        return f"status {status}" + (f": {' '.join(str(detail).split())[:100]}" if detail else "")
    return None


def read_batch_results(paths: Sequence[str | Path], oracle, pool: Sequence[Prompt],
                       price: Price, discount: float = OPENAI_BATCH_DISCOUNT,
                       selection: Sequence[Prompt] | None = None) -> Ingested:
    """Replay rows (pool order) from finished Batch API output files.

    ``oracle`` (the HttpOracle the requests were written for) reads the answer out of each
    body and checks it; ``price`` is the list price, billed at ``1 - discount``. With
    ``selection`` (the prompts the requests were written for), a result for a prompt
    outside it is an error and a selected prompt without a result is reported missing.
    """
    discount = check_discount(discount)
    by_id = {p.id: p for p in pool}
    chosen = None if selection is None else {p.id for p in selection}
    seen: dict[str, str] = {}
    found: dict[str, dict] = {}
    failed, refused = [], []
    for path in paths:
        for where, line in read_jsonl(path, "batch results file"):
            if not isinstance(line, dict):
                raise QBudgetError(f"{where}: expected a JSON object (a Batch API result line)")
            pid = line.get("custom_id")
            if not isinstance(pid, str) or not pid:
                raise QBudgetError(f"{where}: missing field 'custom_id' (is this a Batch API "
                                   "output file?)")
            if pid in seen:
                raise QBudgetError(f"{where}: duplicate custom_id '{pid}' (first at {seen[pid]})")
            seen[pid] = where
            prompt = by_id.get(pid)
            if prompt is None:
                raise QBudgetError(f"{where}: custom_id '{pid}' is not a prompt of the pool")
            if chosen is not None and pid not in chosen:
                raise QBudgetError(f"{where}: custom_id '{pid}' is outside the selection "
                                   "(--budget / --sample-seed differ from the --batch-out run?)")
            why = _failure(where, line)
            if why is not None:
                failed.append((pid, why))
                continue
            body = line["response"].get("body")
            try:
                text = oracle._extract(body)
            except (KeyError, IndexError, TypeError, AttributeError):
                failed.append((pid, "status 200 without an answer in its body"))
                continue
            problem = oracle.answer_problem(prompt, text)
            if problem is not None:
                refused.append((pid, _reason(problem, pid)))
                continue
            usage = oracle._usage(body, prompt, text)
            usd = price.cost(usage) * (1.0 - discount)   # the list price, discounted
            found[pid] = {"id": pid, "prompt": prompt.text, "response": text, "sample": 0,
                          "category": prompt.category, "prompt_tokens": usage.prompt_tokens,
                          "completion_tokens": usage.completion_tokens,
                          "usage_source": usage.source, "usd": usd}
    order = {p.id: i for i, p in enumerate(pool)}
    rows = [found[pid] for pid in sorted(found, key=order.__getitem__)]
    missing = [] if selection is None else [p.id for p in selection if p.id not in seen]
    key = order.__getitem__
    return Ingested(rows, sorted(failed, key=lambda t: key(t[0])),
                    sorted(refused, key=lambda t: key(t[0])), missing)


def _reason(problem: str, pid: str) -> str:
    """The short 'echoes the prompt' / 'carries special tokens ...' part of a check message."""
    marker = f"prompt '{pid}' "
    start = problem.find(marker)
    rest = problem[start + len(marker):] if start >= 0 else problem
    return rest.split(" (", 1)[0][:100]
