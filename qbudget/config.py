"""Experiment configuration: TOML validated into typed, frozen dataclasses.

One schema serves ``qbudget run --config`` and ``qbudget bench``: a run is a world, a
strategy, a budget schedule, distillation and evaluation settings and a seed; a bench
config adds a ``[grid]`` of worlds x strategies x seeds. Unknown keys and wrong types are
errors that name the key (``budget.total must be an integer >= 0, got 'x'``), because a
typo that silently falls back to a default wastes a paid budget.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbudget.adversaries.configs import (EmbedConfig, FinetuneConfig, MMDConfig, NgramConfig,
                                         PairwiseConfig)
from qbudget.errors import QBudgetError

#: ``mmd`` is a two-sample test, not a classifier: it reports p-values, no advantage
ADVERSARY_NAMES = ("ngram", "embed", "pairwise", "finetune", "mmd")


@dataclass(frozen=True)
class BudgetConfig:
    """How much to spend on training queries and where to evaluate along the way.

    ``total`` (also written ``queries``) caps the queries; ``tokens`` and ``usd`` cap the
    training purchases' tokens and dollars too (None = no cap): whichever is reached first
    stops buying, and the run then evaluates where it stopped. ``eval_usd`` caps the
    dollars spent on evaluation answers (probe and ceiling). Dollars are priced with the
    world's ``[teacher.price]`` (the embedded worlds have a default price).
    """

    total: int = 256
    tokens: int | None = None
    usd: float | None = None
    eval_usd: float | None = None
    #: queries bought per round (the last round before a checkpoint is shortened to land on it)
    round_size: int = 64
    #: evaluation points; empty = geometric (0, first, x ratio, ..., total)
    checkpoints: tuple[int, ...] = ()
    first_checkpoint: int = 16
    ratio: float = 4.0


#: compute dtypes of the student's frozen base (``[distill] compute_dtype``)
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class DistillConfig:
    """LoRA distillation of the student: warm-started, fixed steps per round.

    The defaults are what ``make bench`` validated on the embedded worlds (see
    docs/worlds.md): adapters on all seven projections, 48 steps per round at 3e-4. At
    3e-3 distillation removed the base student's habit but also damaged the answers it
    was meant to copy; adapters on q/k/v/o alone left the similarity flat.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
    learning_rate: float = 3e-4
    steps_per_round: int = 48
    batch_size: int = 16
    max_len: int = 96
    #: dtype the frozen base computes in: "float32" (the CPU default) or "bfloat16" (the
    #: usual choice on an accelerator); adapters, optimiser state, softmax and loss stay
    #: float32 either way
    compute_dtype: str = "float32"


@dataclass(frozen=True)
class EvalConfig:
    """What every checkpoint measures; the ``[eval]`` table of a run TOML sets all of it.

    One contract for the loop, ``qbudget eval`` and the benchmarks: the probe subset, the
    adversaries with their bounds (``[eval.ngram] q = 400`` caps that adversary at 400
    adversary-train prompts, ``t`` at that many optimiser steps), the confidence level,
    and whether to pay for the teacher-vs-teacher similarity ceiling.
    """

    #: evaluate on a stratified subset of the probe of this size (0 = the whole probe)
    probe_subset: int = 0
    #: K-fold cross-fitting of the classifier adversaries (1 = off): the adversary-test
    #: split is fold 0 and the adversary-train split is cut into K − 1 more folds; each fold
    #: is scored by an adversary trained on the other prompts, so every probe prompt is a
    #: test item (K times the training, ~1/K the evaluation variance of the advantage)
    crossfit: int = 1
    adversaries: tuple[str, ...] = ("ngram", "embed", "pairwise")
    #: teacher-vs-teacher similarity ceiling (costs a second teacher sample of the probe)
    ceiling: bool = True
    #: 1 - confidence level of every interval (max: Bonferroni over the adversaries)
    alpha: float = 0.05
    similarity: bool = True
    encode_batch_size: int = 64
    ngram: NgramConfig = field(default_factory=NgramConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mmd: MMDConfig = field(default_factory=MMDConfig)

    def adversary_config(self, name: str):
        """The bounds and settings of adversary ``name`` (QBudgetError if unknown)."""
        if name not in ADVERSARY_NAMES:
            raise QBudgetError(f"unknown adversary '{name}' (known: {', '.join(ADVERSARY_NAMES)})")
        return getattr(self, name)


@dataclass(frozen=True)
class CertifyConfig:
    """``[certify]``: stop buying once every adversary is certified ε-indistinguishable.

    Off unless ``epsilon`` is given (``qbudget run --certify EPS`` sets it). At each
    checkpoint the adversary-test prompts are consumed in a seeded random order and a
    betting e-process (:mod:`qbudget.certify`) decides, at that checkpoint's share
    ``alpha / (r (r + 1))`` of ``alpha``, whether every adversary's advantage is ≤ ε; the
    run stops at the first checkpoint where all are, and "certified" then holds at level
    ``alpha`` over the whole run however many checkpoints it had.
    """

    #: the ε to certify, in (0, 1); None = certification off
    epsilon: float | None = None
    #: level of the whole run's certification (spent over its checkpoints)
    alpha: float = 0.05

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "random"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    world: str = "micro"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    certify: CertifyConfig = field(default_factory=CertifyConfig)

    def schedule(self, pool_size: int) -> list[int]:
        """The q values at which the run evaluates (always includes 0 and the total)."""
        return checkpoint_schedule(self.budget, pool_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GridConfig:
    worlds: tuple[str, ...] = ("micro",)
    strategies: tuple[str, ...] = ("random", "stratified")
    seeds: tuple[int, ...] = (0, 1)
    baseline: str = "stratified"
    epsilon: float = 0.0  # 0 = no target


@dataclass(frozen=True)
class ExecutorConfig:
    """``[executor]`` of a bench TOML: what each cell of a Ray sweep asks the cluster for.

    Ray reserves ``cpus_per_cell`` CPUs and ``gpus_per_cell`` GPUs (fractions pack several
    cells on one device) per cell, and the cell's JAX gets that many threads (at least one)
    and sees only its GPUs (none when 0). ``adapters = false`` leaves the distilled
    adapters on the worker instead of shipping them back into ``cells/<cell>/adapter``.
    The local executor ignores this table (``workers`` sizes it).
    """

    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    adapters: bool = True


@dataclass(frozen=True)
class BenchConfig:
    """A sweep: the grid plus one RunConfig template shared by every cell."""

    grid: GridConfig = field(default_factory=GridConfig)
    run: RunConfig = field(default_factory=RunConfig)
    #: per-strategy parameters, e.g. [strategy_params.disagreement] members = 4
    strategy_params: dict = field(default_factory=dict)
    workers: int = 0  # 0 = one per core
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def cells(self) -> list[RunConfig]:
        out = []
        for world in self.grid.worlds:
            for name in self.grid.strategies:
                for seed in self.grid.seeds:
                    strat = StrategyConfig(name, dict(self.strategy_params.get(name, {})))
                    out.append(dataclasses.replace(self.run, world=world, strategy=strat, seed=seed))
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def checkpoint_schedule(budget: BudgetConfig, pool_size: int | None = None) -> list[int]:
    """Evaluation points: explicit list, or geometric from ``first_checkpoint`` by ``ratio``."""
    total = budget.total
    if budget.checkpoints:
        points = set(budget.checkpoints)
    else:
        points, q = set(), budget.first_checkpoint
        while q < total:
            points.add(int(q))
            q = max(q + 1, int(math.ceil(q * budget.ratio)))
    points |= {0, total}
    return sorted(p for p in points if 0 <= p <= total)


# ---------------------------------------------------------------------------------------
# validation: dict (from TOML) -> dataclass, errors naming the dotted key


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            dict: "a table"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise QBudgetError(f"config key '{key}' must be a table")
        return from_dict(tp, value, prefix=key + ".")
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if not isinstance(value, list):
            raise QBudgetError(f"config key '{key}' must be a list")
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QBudgetError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise QBudgetError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp in (str, bool, dict) and not isinstance(value, tp):
        raise QBudgetError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are named."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is BudgetConfig and "queries" in data:   # the query cap's other name
        if "total" in data:
            raise QBudgetError(f"config key '{prefix}queries' and '{prefix}total' are the same "
                               "setting: give one")
        data = {("total" if k == "queries" else k): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise QBudgetError(
            f"unknown config key '{prefix}{unknown[0]}' (expected one of: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    _check(obj, prefix)
    return obj


def _require(cond: bool, key: str, what: str, value: Any) -> None:
    if not cond:
        raise QBudgetError(f"config key '{key}' must be {what}, got {value!r}")


def _check(obj: Any, prefix: str) -> None:
    """Range checks that types alone cannot express."""
    if isinstance(obj, BudgetConfig):
        _require(obj.total >= 0, prefix + "total", "an integer >= 0", obj.total)
        _require(obj.round_size >= 1, prefix + "round_size", "an integer >= 1", obj.round_size)
        _require(obj.first_checkpoint >= 1, prefix + "first_checkpoint", ">= 1", obj.first_checkpoint)
        _require(obj.ratio > 1, prefix + "ratio", "a number > 1", obj.ratio)
        for c in obj.checkpoints:
            _require(0 <= c <= obj.total, prefix + "checkpoints", f"within 0..{obj.total}", c)
        tok = obj.tokens
        _require(tok is None or (isinstance(tok, int) and not isinstance(tok, bool) and tok >= 1),
                 prefix + "tokens", "an integer >= 1", tok)
        for name in ("usd", "eval_usd"):
            v = getattr(obj, name)
            _require(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                   and math.isfinite(v) and v > 0),
                     prefix + name, "a number > 0 (US dollars)", v)
            if isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(obj, name, float(v))
    elif isinstance(obj, DistillConfig):
        for name in ("rank", "steps_per_round", "batch_size", "max_len"):
            v = getattr(obj, name)
            _require(v >= 1, prefix + name, "an integer >= 1", v)
        _require(obj.learning_rate > 0, prefix + "learning_rate", "a number > 0", obj.learning_rate)
        _require(obj.compute_dtype in COMPUTE_DTYPES, prefix + "compute_dtype",
                 f"one of {', '.join(COMPUTE_DTYPES)}", obj.compute_dtype)
    elif isinstance(obj, EvalConfig):
        _require(obj.probe_subset >= 0, prefix + "probe_subset", "an integer >= 0", obj.probe_subset)
        _require(isinstance(obj.crossfit, int) and not isinstance(obj.crossfit, bool)
                 and 1 <= obj.crossfit <= 20, prefix + "crossfit",
                 "an integer in 1..20 (folds; 1 = off)", obj.crossfit)
        _require(len(obj.adversaries) > 0, prefix + "adversaries", "a non-empty list", obj.adversaries)
        for name in obj.adversaries:
            _require(name in ADVERSARY_NAMES, prefix + "adversaries",
                     f"adversary names ({', '.join(ADVERSARY_NAMES)})", name)
        _require(0 < obj.alpha < 1, prefix + "alpha", "a number in (0, 1)", obj.alpha)
        _require(obj.encode_batch_size >= 1, prefix + "encode_batch_size", "an integer >= 1",
                 obj.encode_batch_size)
    elif isinstance(obj, MMDConfig):
        _require(obj.q is None, prefix + "q", "absent (the MMD test trains on nothing)", obj.q)
        _require(obj.t >= 1, prefix + "t", "an integer >= 1", obj.t)
        _require(obj.length >= 1, prefix + "length", "an integer >= 1 (tokens compared)", obj.length)
        _require(obj.n_permutations >= 1, prefix + "n_permutations", "an integer >= 1",
                 obj.n_permutations)
    elif isinstance(obj, CertifyConfig):
        eps = obj.epsilon
        _require(eps is None or (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                                 and 0 < eps < 1), prefix + "epsilon", "a number in (0, 1)", eps)
        _require(0 < obj.alpha < 1, prefix + "alpha", "a number in (0, 1)", obj.alpha)
        if eps is not None and not isinstance(eps, float):
            object.__setattr__(obj, "epsilon", float(eps))
    elif isinstance(obj, (NgramConfig, EmbedConfig, PairwiseConfig, FinetuneConfig)):
        _require(obj.q is None or (isinstance(obj.q, int) and not isinstance(obj.q, bool) and obj.q >= 1),
                 prefix + "q", "an integer >= 1 (adversary-train prompts)", obj.q)
        _require(obj.t >= 1, prefix + "t", "an integer >= 1 (optimiser steps)", obj.t)
    elif isinstance(obj, RunConfig):
        _require(obj.seed >= 0, prefix + "seed", "an integer >= 0", obj.seed)
        _require(bool(obj.world), prefix + "world", "a world name", obj.world)
    elif isinstance(obj, GridConfig):
        for name in ("worlds", "strategies", "seeds"):
            v = getattr(obj, name)
            _require(len(v) > 0, prefix + name, "a non-empty list (empty grid)", list(v))
    elif isinstance(obj, ExecutorConfig):
        _require(obj.cpus_per_cell > 0, prefix + "cpus_per_cell", "a number > 0", obj.cpus_per_cell)
        _require(obj.gpus_per_cell >= 0 and (obj.gpus_per_cell <= 1 or obj.gpus_per_cell.is_integer()),
                 prefix + "gpus_per_cell", "a fraction in [0, 1] or a whole number", obj.gpus_per_cell)
    elif isinstance(obj, BenchConfig):
        _require(obj.workers >= 0, prefix + "workers", "an integer >= 0", obj.workers)
        for name, params in obj.strategy_params.items():
            _require(isinstance(params, dict), prefix + f"strategy_params.{name}", "a table", params)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise QBudgetError(f"config file not found: {path}")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise QBudgetError(f"{path}: malformed TOML ({exc})") from None


def load_run_config(path: str | Path | None, **overrides: Any) -> RunConfig:
    """Read a run config (or defaults) and apply CLI overrides (None = keep)."""
    data = read_toml(path) if path else {}
    cfg = from_dict(RunConfig, data)
    return apply_overrides(cfg, **overrides)


def apply_overrides(cfg: RunConfig, *, world: str | None = None, strategy: str | None = None,
                    budget: int | None = None, seed: int | None = None,
                    certify: float | None = None) -> RunConfig:
    if world is not None:
        cfg = dataclasses.replace(cfg, world=world)
    if strategy is not None and strategy != cfg.strategy.name:
        cfg = dataclasses.replace(cfg, strategy=StrategyConfig(strategy, {}))
    if budget is not None:
        if budget < 0:
            raise QBudgetError(f"--budget must be >= 0, got {budget}")
        checkpoints = tuple(c for c in cfg.budget.checkpoints if c <= budget)
        cfg = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, total=budget,
                                                                  checkpoints=checkpoints))
    if seed is not None:
        if seed < 0:
            raise QBudgetError(f"--seed must be >= 0, got {seed}")
        cfg = dataclasses.replace(cfg, seed=seed)
    if certify is not None:
        if not 0 < certify < 1:
            raise QBudgetError(f"--certify must be an epsilon in (0, 1), got {certify}")
        cfg = dataclasses.replace(cfg, certify=dataclasses.replace(cfg.certify,
                                                                   epsilon=float(certify)))
    return cfg


def load_bench_config(path: str | Path) -> BenchConfig:
    """A bench TOML; a top-level ``[certify]`` is the run template's (``[run.certify]``)."""
    data = read_toml(path)
    if "certify" in data:
        run = data.setdefault("run", {})
        if not isinstance(run, dict):
            raise QBudgetError("config key 'run' must be a table")
        if "certify" in run:
            raise QBudgetError("config key 'certify' is given twice ([certify] and [run.certify])")
        run["certify"] = data.pop("certify")
    return from_dict(BenchConfig, data)
