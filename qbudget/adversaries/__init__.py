"""The adversary class 𝒜: bounded discriminators between teacher and student answers.

Each adversary has a config dataclass carrying its sample bound ``q`` (adversary-train
prompts used) and compute bound ``t`` (optimiser steps), and a ``run(data, cfg, key)``
that trains on the adversary-train split and returns per-unit test outcomes
(:class:`AdversaryResult`). Modules are imported lazily so a config-only import stays
cheap.
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


__all__ = ["ADVERSARIES", "DEFAULT_ADVERSARIES", "AdversaryData", "AdversaryResult",
           "TwoSampleResult", "get_adversary"]
