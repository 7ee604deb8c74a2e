"""Acquisition strategies: the contract, the selection context and the plugin registry.

A strategy is, in the spirit of optax's ``GradientTransformation``, a NamedTuple of two
pure functions plus metadata::

    strat = get_strategy("diversity", {"candidates": 4096})
    state = strat.init(ctx)
    signals = compute_signals(strat.signals, ctx, key)        # qbudget.signals
    picks, state = strat.select(state, signals, ctx, k, key)  # np.int64 indices into ctx.pool

``select`` must be deterministic given (state, signals, ctx, k, key), never return a
bought or duplicate index, and return exactly ``min(k, remaining)`` indices. The loop
computes only the signals a strategy declares (``strat.signals``), so a cheap strategy
never pays for a committee it does not use.

Strategies are discovered through the ``qbudget.strategies`` entry-point group — the
built-ins in the top-level ``strategies`` package register there exactly like a
third-party plugin, so the plugin path is exercised by every run. An entry point names a
factory ``make(**params) -> Strategy``; its keyword parameters (with defaults) are the
strategy's parameters, shown by ``qbudget strategies`` and set from the experiment TOML
(``[strategy.params]``).

A complete plugin (package ``shortest``, installed with ``pip install -e .``)::

    # shortest/__init__.py
    import numpy as np
    from qbudget.strategy import Strategy, stateless, top_scored

    def make(longest: bool = False) -> Strategy:
        # the factory's keyword parameters are the strategy's parameters
        def select(signals, ctx, k, key):
            free = ctx.unbought()
            length = np.array([len(ctx.pool[i].text) for i in free], float)
            return top_scored(free, length if longest else -length, ctx, k, key)

        return stateless("shortest", "Shortest (or longest) unbought prompts first.",
                         (), {"longest": longest}, select)

    # pyproject.toml
    [project.entry-points."qbudget.strategies"]
    shortest = "shortest:make"

after which ``qbudget strategies`` lists it and ``qbudget run --strategy shortest`` uses it.
:func:`stateless` covers a strategy whose picks depend only on this round's inputs; one
that learns across rounds (like the built-in ``bandit``) builds the ``Strategy`` itself,
``Strategy(name, description, signals, params, init, select)``, with
``select(state, signals, ctx, k, key) -> (picks, new_state)``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from qbudget.errors import QBudgetError
from qbudget.seeding import numpy_rng  # re-exported: plugins derive their Generators with it

ENTRY_POINT_GROUP = "qbudget.strategies"


@dataclass(frozen=True, eq=False)
class SelectionContext:
    """Everything a strategy (and the signals it declares) may look at in one round.

    Built by the loop before each selection; strategies must not mutate it.

    - ``pool``: the prompts that may be bought (``qbudget.pool.Prompt``), index = position.
    - ``categories``: int32 [N] category index of each pool prompt; ``category_names``.
    - ``bought_mask``: bool [N]; ``bought_indices``: int64 pool indices in purchase order;
      ``answers``: teacher responses aligned with ``bought_indices``.
    - ``student``: the current ``qbudget.models.CausalLM`` (with its LoRA adapters) and its
      ``tokenizer``; ``student_dir`` the base checkpoint folder. ``None`` for model-free
      contexts (then model-based signals are unavailable).
    - ``sampling``: temperature / top_p / max_new_tokens shared by teacher and student.
    - ``pool_embeddings``: zero-argument callable returning float32 [N, d] L2-normalised
      MiniLM prompt embeddings (cached on disk by the builder); ``None`` = compute them
      with :func:`qbudget.signals.cached_pool_embeddings` in ``cache_dir``.
    - ``cache_dir``: where signals may cache per-world artefacts (embeddings).
    - ``round`` (0-based selection round), ``q`` (queries bought so far), ``budget``
      (total training queries), ``seed`` (run seed).
    - ``round_q``: q at the start of each round so far (``round_q[r]`` = queries bought
      before round r's purchase; ``len = round + 1``, ``round_q[round] == q``), so round
      r's batch is ``bought_indices[round_q[r]:round_q[r + 1]]``. Empty when unknown.
    - ``adapter_history``: host copies of the student's LoRA leaves
      (:func:`qbudget.signals.lora_snapshot`) taken at the selection of recent rounds,
      keyed by round, this one included; only as deep as the declared signals need
      (:func:`qbudget.signals.adapter_history_depth`, kept by
      :func:`qbudget.signals.record_adapters`). Empty when unknown or not needed.
      Why in the context: signals that compare the student with its earlier selves
      (``heldout_gain``) stay functions of the context, and strategies stay pure.
    - ``expected_cost``: zero-argument callable returning float64 [N], what buying each
      pool prompt is expected to cost: US$ at the teacher's price (tokens where the
      teacher is free) -- its prompt tokens as the ledger reserves them, plus the mean
      completion of the answers bought so far in its category (all categories while its
      own has none; ``max_tokens`` before any answer). ``None`` when unknown.
    - ``rank_per_cost``: set by the ``cost_aware`` wrapper: :func:`top_scored` then ranks
      by score per unit of ``expected_cost`` instead of by score.
    """

    pool: Sequence[Any]
    categories: np.ndarray
    category_names: Sequence[str]
    bought_mask: np.ndarray
    bought_indices: np.ndarray
    answers: Sequence[str] = ()
    student: Any = None
    tokenizer: Any = None
    student_dir: Path | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    pool_embeddings: Callable[[], np.ndarray] | None = None
    cache_dir: Path | None = None
    round: int = 0
    q: int = 0
    budget: int = 0
    seed: int = 0
    round_q: tuple[int, ...] = ()
    adapter_history: Mapping[int, list[np.ndarray]] = field(default_factory=dict)
    expected_cost: Callable[[], np.ndarray] | None = None
    rank_per_cost: bool = False

    @classmethod
    def build(cls, pool: Sequence[Any], bought_indices: Sequence[int] = (),
              answers: Sequence[str] = (), *, category_names: Sequence[str] | None = None,
              **kwargs) -> "SelectionContext":
        """Derive ``categories``/``bought_mask`` from the pool and the purchase order."""
        from qbudget.pool import category_index

        cats, names = category_index(pool, category_names)
        bought = np.asarray(list(bought_indices), dtype=np.int64)
        if len(answers) and len(answers) != len(bought):
            raise ValueError("answers must align with bought_indices")
        mask = np.zeros(len(pool), dtype=bool)
        mask[bought] = True
        kwargs.setdefault("q", int(len(bought)))
        return cls(pool=pool, categories=cats, category_names=names, bought_mask=mask,
                   bought_indices=bought, answers=tuple(answers), **kwargs)

    @property
    def n(self) -> int:
        return len(self.pool)

    def unbought(self) -> np.ndarray:
        """Pool indices not bought yet, ascending (int64)."""
        return np.flatnonzero(~np.asarray(self.bought_mask)).astype(np.int64)


class Strategy(NamedTuple):
    """A pure, seeded acquisition strategy (see the module docstring for the contract).

    ``init(ctx) -> state``; ``select(state, signals, ctx, k, key) -> (picks, state)``.
    ``signals`` are signal specs understood by :func:`qbudget.signals.compute_signals`
    (``"embeddings"``, ``"categories"``, ``"entropy[candidates=2048]"``, ...);
    ``params`` are the resolved parameters.
    """

    name: str
    description: str
    signals: tuple[str, ...]
    params: Mapping[str, Any]
    init: Callable[[SelectionContext], Any]
    select: Callable[..., tuple[np.ndarray, Any]]


def stateless(name: str, description: str, signals: Sequence[str], params: Mapping[str, Any],
              select_fn: Callable[..., np.ndarray]) -> Strategy:
    """A :class:`Strategy` without state, from ``select_fn(signals, ctx, k, key) -> picks``.

    Its ``init`` returns None and its ``select`` passes the state through, so most
    strategies are one function (cf. optax's ``stateless``): the loop's contract stays
    ``(picks, state)`` for the few that learn across rounds.
    """

    def init(ctx: SelectionContext):
        return None

    def select(state, signals, ctx: SelectionContext, k: int, key):
        return select_fn(signals, ctx, k, key), state

    return Strategy(name, description, tuple(signals), params, init, select)


class StrategyInfo(NamedTuple):
    """One registry entry as listed by ``qbudget strategies``."""

    name: str
    package: str           # distribution providing the entry point
    target: str            # "module:attr" the entry point names
    params: dict           # parameter -> default
    description: str
    error: str | None      # set when the plugin cannot be loaded


# ---------------------------------------------------------------- registry

def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _package(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _factory_params(make: Callable) -> dict:
    params = {}
    for p in inspect.signature(make).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params[p.name] = None if p.default is p.empty else p.default
    return params


def _describe(ep: metadata.EntryPoint) -> StrategyInfo:
    name, pkg = ep.name, _package(ep)
    try:
        make = ep.load()
        if not callable(make):
            raise TypeError(f"{ep.value} is not callable")
        params = _factory_params(make)
        strat = make()
        if not isinstance(strat, Strategy):
            raise TypeError(f"{ep.value}() returned {type(strat).__name__}, not a Strategy")
        return StrategyInfo(name, pkg, ep.value, params, strat.description.strip().splitlines()[0]
                            if strat.description.strip() else "", None)
    except Exception as exc:  # a broken plugin must not break the listing
        return StrategyInfo(name, pkg, ep.value, {}, "", _one_line(exc))


def list_strategies() -> list[StrategyInfo]:
    """Every registered strategy, sorted by name; broken plugins carry ``error``.

    A name registered by two distributions resolves to qbudget's own entry point if it is
    one of them, else to the alphabetically first distribution (what :func:`get_strategy`
    loads); the others are reported as broken duplicates.
    """
    infos: list[StrategyInfo] = []
    seen: dict[str, str] = {}
    for ep in sorted(_entry_points(), key=lambda e: (e.name, _precedence(e))):
        if ep.name in seen:
            infos.append(StrategyInfo(ep.name, _package(ep), ep.value, {}, "",
                                      f"duplicate strategy name (already provided by {seen[ep.name]})"))
            continue
        seen[ep.name] = _package(ep)
        infos.append(_describe(ep))
    return infos


def _precedence(ep: metadata.EntryPoint) -> tuple[bool, str]:
    """Built-ins first, then by distribution name: a plugin cannot hijack a built-in name."""
    return (_package(ep) != "qbudget", _package(ep))


def _find(name: str) -> metadata.EntryPoint:
    eps = sorted((e for e in _entry_points() if e.name == name), key=_precedence)
    if not eps:
        known = sorted({e.name for e in _entry_points()})
        raise QBudgetError(f"unknown strategy '{name}' (known: {', '.join(known) or 'none'})")
    return eps[0]


def get_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Load strategy ``name`` from the registry and build it with ``params``.

    Unknown names and unknown/invalid parameters raise :class:`QBudgetError`. The
    returned strategy's ``select`` is wrapped by :func:`checked_select`, so a plugin that
    breaks the contract fails loudly instead of silently overspending.
    """
    ep = _find(name)
    try:
        make = ep.load()
    except Exception as exc:
        raise QBudgetError(f"strategy '{name}' ({_package(ep)}) failed to load: {_one_line(exc)}") from None
    params = dict(params or {})
    accepted = _factory_params(make)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(make).parameters.values())
    for key in params:
        if key not in accepted and not var_kw:
            raise QBudgetError(f"strategy '{name}' has no parameter '{key}' "
                               f"(parameters: {', '.join(accepted) or 'none'})")
    try:
        strat = make(**params)
    except QBudgetError:
        raise
    except (TypeError, ValueError) as exc:
        raise QBudgetError(f"strategy '{name}': bad parameters ({exc})") from None
    if not isinstance(strat, Strategy):
        raise QBudgetError(f"strategy '{name}' ({ep.value}) did not return a qbudget.strategy.Strategy")
    return strat._replace(name=name, select=checked_select(name, strat.select))


def checked_select(name: str, select: Callable) -> Callable:
    """Wrap ``select`` so its picks are validated against the contract."""

    @functools.wraps(select)
    def wrapped(state, signals, ctx: SelectionContext, k: int, key):
        picks, new_state = select(state, signals, ctx, k, key)
        return validate_picks(picks, ctx, k, strategy=name), new_state

    return wrapped


def validate_picks(picks, ctx: SelectionContext, k: int, *, strategy: str = "?") -> np.ndarray:
    """Return ``picks`` as int64 after checking range, novelty, uniqueness and count."""
    picks = np.asarray(picks)
    if picks.ndim != 1 or (picks.size and not np.issubdtype(picks.dtype, np.integer)):
        raise RuntimeError(f"strategy '{strategy}' returned picks of shape {picks.shape} dtype {picks.dtype}")
    picks = picks.astype(np.int64)
    want = min(int(k), int((~np.asarray(ctx.bought_mask)).sum()))
    if picks.size != want:
        raise RuntimeError(f"strategy '{strategy}' returned {picks.size} picks, expected {want}")
    if picks.size and (picks.min() < 0 or picks.max() >= ctx.n):
        raise RuntimeError(f"strategy '{strategy}' returned an index outside the pool")
    if np.unique(picks).size != picks.size:
        raise RuntimeError(f"strategy '{strategy}' returned duplicate indices")
    if np.asarray(ctx.bought_mask)[picks].any():
        raise RuntimeError(f"strategy '{strategy}' returned an already bought index")
    return picks


# ------------------------------------------------------- helpers for strategies

def random_unbought(ctx: SelectionContext, k: int, key, exclude: np.ndarray | None = None) -> np.ndarray:
    """``min(k, available)`` distinct unbought indices (minus ``exclude``), uniformly at random."""
    avail = ~np.asarray(ctx.bought_mask, dtype=bool)
    if exclude is not None and len(exclude):
        avail = avail.copy()
        avail[np.asarray(exclude, dtype=np.int64)] = False
    idx = np.flatnonzero(avail).astype(np.int64)
    k = min(int(k), idx.size)
    return numpy_rng(key).choice(idx, size=k, replace=False).astype(np.int64) if k else idx[:0]


def top_scored(indices: np.ndarray, scores: np.ndarray, ctx: SelectionContext, k: int, key,
               secondary: np.ndarray | None = None) -> np.ndarray:
    """Highest-scoring unbought candidates (ties: lower pool index), topped up at random.

    Ties in ``scores`` are broken by ``secondary`` (descending), then by index. Scored
    signals cover a seeded candidate subset; when fewer than ``k`` usable
    candidates exist the rest are drawn uniformly from the other unbought prompts, so the
    strategy still returns exactly ``min(k, remaining)``.
    """
    import jax

    indices = np.asarray(indices, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    second = np.zeros_like(scores) if secondary is None else np.asarray(secondary, np.float64)
    ok = ~np.asarray(ctx.bought_mask)[indices] & np.isfinite(scores) & np.isfinite(second)
    indices, scores, second = indices[ok], scores[ok], second[ok]
    if ctx.rank_per_cost:
        scores = per_cost(scores, indices, ctx)
    order = np.lexsort((indices, -second, -scores))    # score, then secondary, then index
    chosen = indices[order[: int(k)]]
    want = min(int(k), int((~np.asarray(ctx.bought_mask)).sum()))
    if chosen.size < want:
        extra = random_unbought(ctx, want - chosen.size, jax.random.fold_in(key, 1), exclude=chosen)
        chosen = np.concatenate([chosen, extra])
    return chosen.astype(np.int64)


def per_cost(scores: np.ndarray, indices: np.ndarray, ctx: SelectionContext) -> np.ndarray:
    """``scores`` per unit of expected cost (``ctx.expected_cost``) of ``indices``.

    Scores are shifted to start at 0 first (a score per cost is only a ranking when
    scores are non-negative; signals such as divergences and entropies already are), so
    the least informative candidate is worth nothing whatever it costs.
    """
    if ctx.expected_cost is None:
        raise QBudgetError("cost_aware ranking needs the expected cost of each prompt, which "
                           "this context does not provide")
    cost = np.asarray(ctx.expected_cost(), dtype=np.float64)[indices]
    if scores.size == 0:
        return scores
    worth = scores - min(0.0, float(scores.min()))
    return worth / np.maximum(cost, np.finfo(np.float64).tiny)


def top_or_random(signal: str, measure: str, secondary: str | None = None) -> Callable[..., np.ndarray]:
    """``select_fn`` for :func:`stateless`: top-k of a model-based signal, else uniform random.

    Picks the highest ``values[measure]`` of the ``CandidateScores`` signal ``signal``
    (ties by ``values[secondary]``, then lower index; see :func:`top_scored`); while the
    signal is None (no student yet, too little bought data) the picks are uniformly random.
    """

    def select_fn(signals, ctx: SelectionContext, k: int, key) -> np.ndarray:
        scores = signals.get(signal)
        if scores is None:
            return random_unbought(ctx, k, key)
        tie = None if secondary is None else scores.values[secondary]
        return top_scored(scores.indices, scores.values[measure], ctx, k, key, secondary=tie)

    return select_fn
