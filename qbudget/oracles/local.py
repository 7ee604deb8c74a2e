"""Local-model oracle: a teacher checkpoint folder answering with batched generation.

The embedded worlds' teachers are small causal LMs on disk. Answers are generated with the
world's sampling settings and one seed per prompt derived from ``(seed, prompt text,
sample)``, so an answer never depends on its batch -- the property that lets the response
cache and a resumed run serve exactly what a fresh call would have produced.

The model is loaded lazily on the first call: a run whose answers are all cached never pays
for loading it. The fingerprint hashes the checkpoint's file contents, so a retrained
teacher in the same folder is a different oracle.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Sequence

from qbudget.errors import QBudgetError
from qbudget.oracles.base import prompt_seed, stable_hash
from qbudget.oracles.usage import Usage
from qbudget.pool import Prompt

SAMPLING_KEYS = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32}


def checkpoint_checksum(folder: str | Path) -> str:
    """sha256 over the names and contents of every (non-hidden) file in a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QBudgetError(f"teacher checkpoint folder not found: {folder}")
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(folder).parts))
    if not any(p.name == "config.json" for p in files):
        raise QBudgetError(f"{folder} is not a model checkpoint (no config.json)")
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def check_sampling(sampling: dict) -> dict:
    """Validate a sampling dict (temperature, top_p, max_new_tokens), filling defaults."""
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise QBudgetError(f"unknown sampling setting '{unknown[0]}' "
                           f"(known: {', '.join(sorted(SAMPLING_KEYS))})")
    out = {**SAMPLING_KEYS, **sampling}
    try:
        out["temperature"] = float(out["temperature"])
        out["top_p"] = float(out["top_p"])
    except (TypeError, ValueError):
        raise QBudgetError("sampling temperature and top_p must be numbers") from None
    if out["temperature"] < 0:
        raise QBudgetError(f"sampling temperature must be >= 0, got {out['temperature']}")
    if not 0 < out["top_p"] <= 1:
        raise QBudgetError(f"sampling top_p must be in (0, 1], got {out['top_p']}")
    mnt = out["max_new_tokens"]
    if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
        raise QBudgetError(f"sampling max_new_tokens must be a positive integer, got {mnt!r}")
    return out


class LocalModelOracle:
    """A teacher checkpoint answering with ``qbudget.models.generate.generate`` (as
    ``generate_text`` frames and decodes), reporting each answer's exact token usage."""

    def __init__(self, teacher_dir: str | Path, sampling: dict, seed: int, batch_size: int = 64):
        self.teacher_dir = Path(teacher_dir)
        self.sampling = check_sampling(dict(sampling))
        self.seed = int(seed)
        if batch_size < 1:
            raise QBudgetError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.name = f"local:{self.teacher_dir.name}"
        self.checksum = checkpoint_checksum(self.teacher_dir)
        self.fingerprint = stable_hash(["local", self.checksum, self.sampling, self.seed])
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                from qbudget.models import CausalLM

                self._model = CausalLM.from_pretrained(self.teacher_dir)
        return self._model, self._load_tokenizer()

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from qbudget.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.teacher_dir)
        return self._tokenizer

    def answer(self, prompts: Sequence[Prompt], sample: int = 0) -> list[str]:
        return [text for text, _ in self.answer_usage(prompts, sample)]

    def answer_usage(self, prompts: Sequence[Prompt], sample: int = 0) -> list[tuple[str, Usage]]:
        """Answers with exact usage: the framed prompt's tokens, and the tokens generated
        (the stop token included when the answer ended on one, as an endpoint bills it)."""
        if not prompts:
            return []
        from qbudget.models.generate import generate, stop_ids
        from qbudget.models.text import encode_prompt

        model, tok = self._load()
        texts = [p.text for p in prompts]
        ids = [encode_prompt(tok, t) for t in texts]
        max_new = self.sampling["max_new_tokens"]
        out = generate(model, ids, max_new_tokens=max_new,
                       temperature=self.sampling["temperature"], top_p=self.sampling["top_p"],
                       seeds=[prompt_seed(self.seed, t, sample) for t in texts],
                       batch_size=self.batch_size, eos_token_id=stop_ids(model, tok),
                       pad_token_id=tok.pad_token_id)
        return [(tok.decode(new, skip_special_tokens=True),
                 Usage(len(prompt), min(len(new) + 1, max_new), "tokenizer"))
                for prompt, new in zip(ids, out)]

    def worst_case(self, prompt: Prompt) -> Usage:
        """Exact prompt tokens plus every token ``max_new_tokens`` allows."""
        from qbudget.models.text import encode_prompt

        with self._lock:
            tok = self._load_tokenizer()
        return Usage(len(encode_prompt(tok, prompt.text)), self.sampling["max_new_tokens"],
                     "tokenizer")

    def __repr__(self) -> str:
        return f"LocalModelOracle({str(self.teacher_dir)!r}, {self.sampling}, seed={self.seed})"
