"""HTTP oracle: an OpenAI-compatible endpoint (``/v1/chat/completions`` or ``/v1/completions``).

Real endpoints are slow, rate-limited and flaky, and every answer costs money. So:

* bounded concurrency -- a thread pool of ``concurrency`` workers sharing one httpx client;
* per-request timeouts, and retries with exponential backoff and jitter on 408/429/5xx,
  timeouts, dropped connections and truncated or malformed JSON bodies, honouring a
  ``Retry-After`` header (seconds or an HTTP date);
* other 4xx answers (bad key, unknown model) fail at once: retrying cannot fix them;
* when a prompt exhausts its retries, the call raises :class:`OracleCallError` naming the
  prompt id and the last status, carrying the answers that did arrive (``partial``) so the
  ledger can keep them without charging the failed purchase;
* the API key is read from the environment variable *named* in the config. The value lives
  only in the request header: it is not part of the config, the fingerprint, any repr or
  any error message (messages are scrubbed in case a server echoes it back);
* every answer is checked before it is kept: a server that does not separate the answer
  from the chat it was given returns the prompt echoed in front of the answer, chat
  markers included (``transformers serve`` did this for a checkpoint without a
  ``response_template``: ``<|bos|><|user|>...<|assistant|>answer<|eos|>``). Training or
  evaluating on such text would measure the server's formatting, not the teacher, so an
  answer that contains the prompt (or the system prompt) or one of the tokenizer's
  special tokens fails the purchase at once with a one-line error naming the prompt id and
  what was found -- never retried (the same request gets the same answer, and is paid
  again), never stored. The special tokens are read from the teacher's tokenizer folder
  (``tokenizer``) when given, else ``<|...|>`` markers and the other common chat markers
  are looked for; ``check_answers = false`` accepts answers as they come.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from qbudget.errors import QBudgetError
from qbudget.oracles.base import OracleCallError, prompt_seed, stable_hash
from qbudget.oracles.usage import (TEMPLATE_MARGIN_TOKENS, TokenCounter, Usage, bound_tokens,
                                   estimate_tokens)
from qbudget.pool import Prompt

APIS = ("chat", "completions")

#: Chat markers looked for when no tokenizer is configured: ``<|...|>`` tokens (ChatML's
#: ``<|im_start|>``, Llama 3's ``<|eot_id|>``, the embedded worlds' ``<|eos|>``, ...) and the
#: turn markers of the other common families. Unlikely in a real answer; an answer that
#: legitimately quotes one needs ``check_answers = false``.
GENERIC_SPECIAL = re.compile(
    r"<\|[^|<>\s]{1,48}\|>|<start_of_turn>|<end_of_turn>|\[/?INST\]|</s>")
#: A prompt shorter than this (after whitespace is collapsed) is not looked for inside the
#: answer: a short question restated at the start of a real answer is ordinary.
ECHO_MIN_CHARS = 24


@dataclass(frozen=True)
class HttpOracleConfig:
    """Where and how to ask. Only the first group of fields enters the fingerprint."""

    base_url: str                      # e.g. http://host:8000 or https://api.example.com/v1
    model: str
    api: str = "chat"                  # "chat" -> /v1/chat/completions, "completions" -> /v1/completions
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None            # if set, each request gets seed = f(seed, prompt, sample)
    system_prompt: str | None = None   # chat only
    # checking and transport settings: do not change what an answer is, so not in the
    # fingerprint
    tokenizer: str | None = None       # the teacher's tokenizer folder: its special tokens
    check_answers: bool = True         # refuse answers echoing the prompt / special tokens
    api_key_env: str | None = None     # NAME of the environment variable holding the key
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5               # retries after the first attempt
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: float = 300.0   # a longer Retry-After is capped to this

    def __post_init__(self):
        parts = urlsplit(self.base_url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise QBudgetError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise QBudgetError("model must be a non-empty string")
        if self.api not in APIS:
            raise QBudgetError(f"api must be one of {', '.join(APIS)}, got {self.api!r}")
        if not self.temperature >= 0:
            raise QBudgetError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QBudgetError(f"top_p must be in (0, 1], got {self.top_p}")
        for key in ("max_tokens", "concurrency"):
            if getattr(self, key) < 1:
                raise QBudgetError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.max_retries < 0:
            raise QBudgetError(f"max_retries must be >= 0, got {self.max_retries}")
        for key in ("timeout_s", "backoff_base_s", "backoff_max_s", "retry_after_max_s"):
            if not getattr(self, key) >= 0 or (key == "timeout_s" and self.timeout_s == 0):
                raise QBudgetError(f"{key} must be a positive number, got {getattr(self, key)}")
        if self.tokenizer is not None:
            special_tokens(self.tokenizer)   # fails now, naming 'tokenizer', if unreadable

    @classmethod
    def from_dict(cls, data: dict) -> "HttpOracleConfig":
        """Build from a TOML/JSON table; unknown keys and wrong types name the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if "api_key" in data:  # never accept the secret itself in a config file
            raise QBudgetError("HTTP oracle setting 'api_key' is not allowed: put the key in an "
                               "environment variable and name it in 'api_key_env'")
        for key in data:
            if key not in fields:
                raise QBudgetError(f"unknown HTTP oracle setting '{key}' "
                                   f"(known: {', '.join(fields)})")
        for key in ("base_url", "model"):
            if key not in data:
                raise QBudgetError(f"HTTP oracle setting '{key}' is required")
        kinds = {"base_url": str, "model": str, "api": str, "api_key_env": str, "system_prompt": str,
                 "tokenizer": str, "check_answers": bool,
                 "temperature": float, "top_p": float, "timeout_s": float, "backoff_base_s": float,
                 "backoff_max_s": float, "retry_after_max_s": float, "max_tokens": int,
                 "seed": int, "concurrency": int, "max_retries": int}
        clean = {}
        for key, value in data.items():
            want = kinds[key]
            ok = (isinstance(value, want) or (want is float and isinstance(value, int))) \
                and (want is bool or not isinstance(value, bool))
            if value is None and key in ("seed", "api_key_env", "system_prompt", "tokenizer"):
                ok = True
            if not ok:
                raise QBudgetError(f"HTTP oracle setting '{key}' must be {want.__name__}, "
                                   f"got {value!r}")
            clean[key] = float(value) if want is float and value is not None else value
        return cls(**clean)

    @property
    def endpoint(self) -> str:
        """Full URL: ``/v1`` is added unless base_url already ends with it."""
        base = self.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return base + ("/chat/completions" if self.api == "chat" else "/completions")


def special_tokens(folder: str | Path) -> tuple[str, ...]:
    """The special tokens of the tokenizer in ``folder``, read from its JSON files.

    Added tokens marked ``special`` (``tokenizer.json``'s ``added_tokens``,
    ``tokenizer_config.json``'s ``added_tokens_decoder``) and the named ones (bos, eos, pad,
    unk, ``additional_special_tokens`` / ``extra_special_tokens``). Plain JSON: checking an
    answer must not need transformers in the process that buys it.
    """
    folder = Path(folder).expanduser()
    found: set[str] = set()

    def read(name: str):
        path = folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise QBudgetError(f"HTTP oracle setting 'tokenizer': cannot read {path} "
                               f"({type(exc).__name__})") from None

    def add(value):
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and len(value.strip()) >= 2:
            found.add(value)

    if not folder.is_dir():
        raise QBudgetError(f"HTTP oracle setting 'tokenizer': folder not found: {folder}")
    tok, cfg = read("tokenizer.json"), read("tokenizer_config.json")
    smap = read("special_tokens_map.json")
    if tok is None and cfg is None:
        raise QBudgetError(f"HTTP oracle setting 'tokenizer': no tokenizer.json or "
                           f"tokenizer_config.json in {folder}")
    for entry in (tok or {}).get("added_tokens") or []:
        if isinstance(entry, dict) and entry.get("special"):
            add(entry)
    for entry in ((cfg or {}).get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("special"):
            add(entry)
    for table in (cfg or {}, smap or {}):
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token",
                    "cls_token", "mask_token"):
            add(table.get(key))
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = table.get(key) or []
            for value in (extra.values() if isinstance(extra, dict) else extra):
                add(value)
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


class _BadAnswer(Exception):
    """A 200 answer that is not the teacher's answer alone (echo or special tokens)."""


class _Retryable(Exception):
    def __init__(self, last: str, retry_after: float | None = None):
        super().__init__(last)
        self.last = last
        self.retry_after = retry_after


class HttpOracle:
    """An OpenAI-compatible endpoint as an oracle (see the module docstring for the policy)."""

    def __init__(self, config: HttpOracleConfig, *, sleep: Callable[[float], None] = time.sleep,
                 jitter_seed: int = 0):
        self.config = config
        self._key: str | None = None
        if config.api_key_env:
            value = os.environ.get(config.api_key_env)
            if not value:
                raise QBudgetError(f"environment variable {config.api_key_env} (api_key_env) "
                                   "is not set or empty")
            self._key = value
        self._sleep = sleep
        self._rng = np.random.default_rng(jitter_seed)  # jitter only; never affects answers
        self._rng_lock = threading.Lock()
        self.name = f"http:{config.model}"
        self.fingerprint = stable_hash([
            "http", config.endpoint, config.api, config.model, config.temperature, config.top_p,
            config.max_tokens, config.seed, config.system_prompt])
        self.requests_made = 0  # attempts sent, for diagnostics
        self._count_lock = threading.Lock()
        if config.tokenizer is not None:
            tokens = special_tokens(config.tokenizer)
            self._special = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        else:
            self._special = GENERIC_SPECIAL
        # counts tokens when the server sends no usage (needs tokenizer.json in the folder)
        self._counter = None
        if config.tokenizer is not None and (Path(config.tokenizer).expanduser()
                                             / "tokenizer.json").is_file():
            self._counter = TokenCounter(config.tokenizer)

    def __repr__(self) -> str:
        return f"HttpOracle(endpoint={self.config.endpoint!r}, model={self.config.model!r})"

    # -- helpers -------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "[redacted]")
        return " ".join(text.split())

    def _body(self, prompt: Prompt, sample: int) -> dict:
        return self.request_body(prompt, sample)

    def request_body(self, prompt: Prompt, sample: int = 0) -> dict:
        """The JSON body POSTed for ``prompt`` (also the ``body`` of a Batch API request)."""
        c = self.config
        body: dict = {"model": c.model, "temperature": c.temperature, "top_p": c.top_p,
                      "max_tokens": c.max_tokens, "n": 1}
        if c.seed is not None:
            body["seed"] = prompt_seed(c.seed, prompt.text, sample)
        if c.api == "chat":
            messages = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
            body["messages"] = messages + [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        return body

    def _extract(self, data) -> str:
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.config.api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise TypeError("content is not a string")
        return text

    def _usage(self, data, prompt: Prompt, text: str) -> Usage:
        """The answer's usage: the server's ``usage`` field, else counted (and marked so)."""
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (pt, ct)):
                return Usage(pt, ct, "server")
        asked = prompt.text + (self.config.system_prompt or "")
        if self._counter is not None:
            return Usage(self._counter.count(asked), self._counter.count(text), "tokenizer")
        return Usage(estimate_tokens(asked), estimate_tokens(text), "estimate")

    def worst_case(self, prompt: Prompt) -> Usage:
        """The most one request may use: its prompt tokens (counted with the teacher's
        tokenizer when configured, else bounded by the prompt's UTF-8 bytes), plus a margin
        for the chat template, plus the ``max_tokens`` it asks for."""
        asked = prompt.text + (self.config.system_prompt or "")
        bare = self._counter.count(asked) if self._counter is not None else bound_tokens(asked)
        return Usage(bare + TEMPLATE_MARGIN_TOKENS, self.config.max_tokens, "estimate")

    def answer_problem(self, prompt: Prompt, text: str) -> str | None:
        """What makes ``text`` not an answer to ``prompt`` (echo, special tokens), or None."""
        if not self.config.check_answers:
            return None
        found = []
        flat = " ".join(text.split())
        for what, given in (("prompt", prompt.text), ("system prompt", self.config.system_prompt)):
            given = " ".join((given or "").split())
            if len(given) >= ECHO_MIN_CHARS and given in flat:
                found.append(f"echoes the {what}")
        if self._special is not None:
            tokens = list(dict.fromkeys(m.group(0) for m in self._special.finditer(text)))
            if tokens:
                shown = " ".join(tokens[:6]) + (" ..." if len(tokens) > 6 else "")
                found.append(f"carries special tokens {shown}")
        if not found:
            return None
        return (f"HTTP oracle {self.config.endpoint}: the answer to prompt '{prompt.id}' "
                f"{' and '.join(found)} ({text[:80]!r}{'...' if len(text) > 80 else ''}): the "
                "server did not separate the answer from the chat (check the teacher's chat "
                "template and response_template); it was not kept (check_answers = false "
                "accepts such answers)")

    def _retry_after(self, value: str | None) -> float | None:
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            seconds = when.timestamp() - time.time()
        return min(max(seconds, 0.0), self.config.retry_after_max_s)

    def _backoff(self, attempt: int) -> float:
        c = self.config
        base = min(c.backoff_max_s, c.backoff_base_s * (2 ** attempt))
        with self._rng_lock:
            u = float(self._rng.random())
        return base * (0.5 + 0.5 * u)  # "equal jitter": spreads retries, keeps a floor

    def _attempt(self, client, headers, prompt: Prompt, sample: int) -> tuple[str, Usage]:
        import httpx

        with self._count_lock:
            self.requests_made += 1
        try:
            r = client.post(self.config.endpoint, json=self._body(prompt, sample), headers=headers)
        except httpx.TimeoutException:
            raise _Retryable(f"timeout after {self.config.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection error ({type(exc).__name__})") from None
        code = r.status_code
        if code == 200:
            try:
                data = json.loads(r.content)
                text = self._extract(data)
            except (ValueError, KeyError, IndexError, TypeError):
                raise _Retryable("status 200 with a truncated or malformed JSON body") from None
            problem = self.answer_problem(prompt, text)
            if problem is not None:
                raise _BadAnswer(self._scrub(problem))
            return text, self._usage(data, prompt, text)
        if code in (408, 409, 425, 429) or code >= 500:
            raise _Retryable(f"status {code}", self._retry_after(r.headers.get("retry-after")))
        detail = r.text[:300]
        try:
            err = json.loads(r.content).get("error")
            detail = err.get("message", detail) if isinstance(err, dict) else str(err or detail)
        except (ValueError, AttributeError):
            pass
        raise OracleCallError(self._scrub(
            f"HTTP oracle {self.config.endpoint}: prompt '{prompt.id}' rejected with status "
            f"{code} ({detail[:200]})"))

    def _fetch(self, client, headers, prompt: Prompt, sample: int, abort: threading.Event):
        """One prompt with retries -> ('ok', (text, usage)) | ('fail', message) | ('skip', None)."""
        attempts = self.config.max_retries + 1
        last = "not attempted"
        for attempt in range(attempts):
            if abort.is_set():
                return "skip", None
            try:
                return "ok", self._attempt(client, headers, prompt, sample)
            except _Retryable as exc:
                last = exc.last
                if attempt + 1 < attempts:
                    delay = exc.retry_after if exc.retry_after is not None else self._backoff(attempt)
                    self._sleep(delay)
            except (OracleCallError, _BadAnswer) as exc:
                # a rejected request, or an answer that is not an answer: retrying pays again
                # for the same result, and the next prompts would fare no better
                abort.set()
                return "fail", str(exc)
        abort.set()  # the endpoint is failing for good: do not start more paid requests
        return "fail", self._scrub(
            f"HTTP oracle {self.config.endpoint}: prompt '{prompt.id}' failed after "
            f"{attempts} attempts (last: {last})")

    # -- the oracle API ------------------------------------------------------------------
    def answer(self, prompts: Sequence[Prompt], sample: int = 0) -> list[str]:
        return [text for text, _ in self.answer_usage(prompts, sample)]

    def answer_usage(self, prompts: Sequence[Prompt], sample: int = 0) -> list[tuple[str, Usage]]:
        """Answers with their :class:`Usage` (see :meth:`_usage`)."""
        import httpx

        prompts = list(prompts)
        if not prompts:
            return []
        c = self.config
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        workers = min(c.concurrency, len(prompts))
        abort = threading.Event()
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        with httpx.Client(timeout=httpx.Timeout(c.timeout_s), limits=limits) as client, \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qbudget-http") as pool:
            futures = [pool.submit(self._fetch, client, headers, p, sample, abort) for p in prompts]
            try:
                outcomes = [f.result() for f in futures]
            except BaseException:  # e.g. Ctrl-C: let queued prompts skip instead of paying on
                abort.set()
                raise
        answers = {i: got for i, (kind, got) in enumerate(outcomes) if kind == "ok"}
        failures = [msg for kind, msg in outcomes if kind == "fail"]
        if failures:
            raise OracleCallError(failures[0], partial={i: t for i, (t, _) in answers.items()},
                                  partial_usage={i: u for i, (_, u) in answers.items()})
        return [answers[i] for i in range(len(prompts))]
