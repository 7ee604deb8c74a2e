"""What one run works with, built in one place: world, teacher, ledger, student, encoder, probe.

:func:`build_resources` loads and wires everything a run needs before its first round, so
the loop itself (:mod:`qbudget.loop`) only moves data between these parts. The bundle is
frozen: its parts are fixed for the run (the student and optimiser are updated in place
by distillation, never replaced).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qbudget.config import RunConfig
from qbudget.pool import Prompt, category_index, stratified_subset
from qbudget.seeding import key_for
from qbudget.timings import TimedOracle


@dataclass(frozen=True)
class Resources:
    world: Any                    # qbudget.worlds.World or a real world
    oracle: TimedOracle           # the teacher, timed
    ledger: Any                   # qbudget.ledger.Ledger (budget + durable answers)
    student: Any                  # qbudget.models.CausalLM with LoRA adapters attached
    tokenizer: Any
    optimizer: Any                # nnx.Optimizer over the adapters
    encoder: Any                  # the process's shared SentenceEncoder
    probe: list[Prompt]           # the evaluated probe (a stratified subset if configured)
    probe_is_train: np.ndarray    # bool: adversary-train (True) or adversary-test prompt
    categories: np.ndarray        # int32 category index of each pool prompt
    category_names: list[str]
    index_of: dict[str, int]      # pool prompt id -> pool index
    pool_embeddings: Callable[[], np.ndarray]   # computed (or read from cache) on first use


def build_resources(cfg: RunConfig, world, *, ledger_path: Path, cache_path: Path,
                    cache=None) -> Resources:
    """Load the student (with fresh adapters), the teacher, the ledger and the probe.

    ``cache``: a ResponseCache-like object to share answers through instead of opening
    ``cache_path`` (a Ray sweep's cells reach the driver's cache through a service).
    """
    from flax import nnx

    from qbudget.ledger import Ledger, ResponseCache
    from qbudget.models import CausalLM, load_tokenizer
    from qbudget.models.encoder import shared_encoder
    from qbudget.models.lora import attach_lora
    from qbudget.models.train import make_optimizer
    from qbudget.oracles import oracle_for

    d = cfg.distill
    student = CausalLM.from_pretrained(world.student_dir, dtype=d.compute_dtype)
    attach_lora(student, rank=d.rank, alpha=d.alpha, targets=d.targets,
                key=key_for(cfg.seed, "lora-init"))
    optimizer = make_optimizer(student, d.learning_rate, wrt=nnx.LoRAParam)
    categories, names = category_index(world.pool, world.categories)
    keep = stratified_subset(world.probe, world.probe_is_train, cfg.eval.probe_subset, world.seed)

    @functools.cache
    def pool_embeddings() -> np.ndarray:
        from qbudget.signals import cached_pool_embeddings

        return cached_pool_embeddings(world.pool, world.root)

    return Resources(
        world=world, oracle=TimedOracle(oracle_for(world)),
        ledger=Ledger(ledger_path, budget=cfg.budget.total,
                      cache=cache if cache is not None else ResponseCache(cache_path),
                      caps=budget_caps(cfg), price=world_price(world)),
        student=student, tokenizer=load_tokenizer(world.student_dir), optimizer=optimizer,
        encoder=shared_encoder(), probe=[world.probe[i] for i in keep],
        probe_is_train=np.asarray(world.probe_is_train)[keep], categories=categories,
        category_names=names, index_of={p.id: i for i, p in enumerate(world.pool)},
        pool_embeddings=pool_embeddings)


def budget_caps(cfg):
    """The ledger caps of a run config's ``[budget]`` (beyond its query count)."""
    from qbudget.ledger import Caps

    b = cfg.budget
    return Caps(tokens=b.tokens, usd=b.usd, eval_usd=b.eval_usd)


def world_price(world):
    """The price of a world's teacher answers (free when the world names none)."""
    from qbudget.oracles.usage import Price

    return getattr(world, "price", None) or Price()


def adapter_state(res: Resources) -> tuple[dict, dict]:
    """Host copies of the student's adapters and of the optimiser state (picklable)."""
    import jax
    from flax import nnx

    def to_host(tree):
        return jax.tree.map(np.asarray, tree)

    return (to_host(nnx.state(res.student, nnx.LoRAParam).to_pure_dict()),
            to_host(nnx.state(res.optimizer).to_pure_dict()))


def restore_adapter_state(res: Resources, lora: dict, optimizer: dict) -> None:
    """Put saved adapters and optimiser state back into the student (``--resume``)."""
    import jax
    from flax import nnx

    state = nnx.state(res.student, nnx.LoRAParam)
    state.replace_by_pure_dict(jax.tree.map(np.asarray, lora))
    nnx.update(res.student, state)
    opt = nnx.state(res.optimizer)
    opt.replace_by_pure_dict(jax.tree.map(np.asarray, optimizer))
    nnx.update(res.optimizer, opt)
