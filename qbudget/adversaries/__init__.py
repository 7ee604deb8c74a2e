"""The adversary class 𝒜: bounded discriminators between teacher and student answers.

Each adversary has a config dataclass carrying its sample bound ``q`` (adversary-train
prompts used) and compute bound ``t`` (optimiser steps), and a ``run(data, cfg, key)``
that trains on the adversary-train split and returns per-unit test outcomes
(:class:`AdversaryResult`). A classifier adversary's ``run`` is its
``fit_predictor(data, cfg, key)`` (train once) applied to the whole test split; the
returned ``predict(rows)`` also scores a few test prompts at a time, which is how a
certifying evaluation buys teacher answers only as far as its verdict needs. Modules are
imported lazily so a config-only import stays cheap.
"""

from __future__ import annotations

import importlib

from qbudget.adversaries.base import AdversaryData, AdversaryResult, TwoSampleResult
from qbudget.errors import QBudgetError

#: name -> (module, config class name)
ADVERSARIES = {
    "ngram": ("qbudget.adversaries.ngram", "NgramConfig"),
    "embed": ("qbudget.adversaries.embed", "EmbedConfig"),
    "pairwise": ("qbudget.adversaries.pairwise", "PairwiseConfig"),
    "finetune": ("qbudget.adversaries.finetune", "FinetuneConfig"),
    # a two-sample test (p-values, no advantage): opt in with adversaries = [..., "mmd"]
    "mmd": ("qbudget.adversaries.mmd", "MMDConfig"),
}
DEFAULT_ADVERSARIES = ("ngram", "embed", "pairwise")


def get_adversary(name: str):
    """(run function, config class) of a named adversary; QBudgetError if unknown."""
    if name not in ADVERSARIES:
        raise QBudgetError(f"unknown adversary '{name}' (known: {', '.join(ADVERSARIES)})")
    mod_name, cfg_name = ADVERSARIES[name]
    mod = importlib.import_module(mod_name)
    return mod.run, getattr(mod, cfg_name)


def get_predictor(name: str):
    """``fit_predictor(data, cfg, key) -> predict(rows)`` of a classifier adversary: train
    once, then score adversary-test prompts a few at a time (a lazily buying evaluation);
    None for a two-sample test (``mmd``), which fits nothing."""
    get_adversary(name)
    mod = importlib.import_module(ADVERSARIES[name][0])
    return getattr(mod, "fit_predictor", None)


__all__ = ["ADVERSARIES", "DEFAULT_ADVERSARIES", "AdversaryData", "AdversaryResult",
           "TwoSampleResult", "get_adversary",
           "get_predictor"]
