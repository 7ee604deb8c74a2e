"""Model-free signals: ``categories`` and the MiniLM prompt ``embeddings`` (cached on disk).

Embeddings depend only on the encoder and the pool, so they are computed once per
(encoder, pool) and kept under the world's cache folder; the encoder itself is the
process-wide :func:`qbudget.models.encoder.shared_encoder` (imported when first needed:
strategies import this package to declare their signals, and a listing of them should not
pay for loading flax).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def categories_signal(ctx, key):
    return np.asarray(ctx.categories, dtype=np.int32)


def embeddings_signal(ctx, key):
    if ctx.pool_embeddings is not None:
        emb = np.asarray(ctx.pool_embeddings(), dtype=np.float32)
    else:
        emb = cached_pool_embeddings(ctx.pool, ctx.cache_dir)
    if emb.shape[0] != len(ctx.pool):
        raise RuntimeError(f"pool embeddings have {emb.shape[0]} rows for {len(ctx.pool)} prompts")
    return emb


def pool_checksum(pool: Sequence[Any]) -> str:
    """sha256 over the prompts' (id, text), in order: what an embedding cache depends on."""
    h = hashlib.sha256()
    for p in pool:
        h.update(p.id.encode())
        h.update(b"\0")
        h.update(p.text.encode())
        h.update(b"\n")
    return h.hexdigest()


def encoder_fingerprint(path: str | Path | None = None) -> str:
    """Identify an encoder by its folder's config and weight files (name, size, content head)."""
    from qbudget.models.encoder import default_encoder_dir

    folder = Path(path) if path is not None else default_encoder_dir()
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".txt"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def cached_pool_embeddings(pool: Sequence[Any], cache_dir: str | Path | None,
                           encoder_path: str | Path | None = None) -> np.ndarray:
    """MiniLM embeddings of the pool prompts, computed once per (encoder, pool) and cached.

    The file is ``cache_dir/embeddings/<encoder>-<pool checksum>.npy`` (written via a temp
    file + rename). ``cache_dir=None`` computes without caching.
    """
    from qbudget.models.encoder import shared_encoder

    path = None
    if cache_dir is not None:
        name = f"{encoder_fingerprint(encoder_path)}-{pool_checksum(pool)[:24]}.npy"
        path = Path(cache_dir) / "embeddings" / name
        if path.is_file():
            try:
                emb = np.load(path)
                if emb.shape[0] == len(pool) and emb.dtype == np.float32:
                    return emb
            except (OSError, ValueError):
                pass  # corrupt cache: recompute
    emb = np.asarray(shared_encoder(encoder_path).encode([p.text for p in pool]), dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(path)
    return emb
