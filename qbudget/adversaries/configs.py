"""The adversaries' bounds and hyper-parameters as plain dataclasses (no JAX import).

Each carries the sample bound ``q`` (adversary-train prompts used; None = all) and the
compute bound ``t`` (optimiser steps). They live apart from the adversaries' code so the
experiment config (:mod:`qbudget.config`, ``[eval.<adversary>]`` tables) can validate a
run TOML without importing JAX.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NgramConfig:
    q: int | None = None          # sample bound: adversary-train prompts (None = all)
    t: int = 200                  # compute bound: full-batch Adam steps
    lr: float = 0.1
    l2: float = 1e-5
    dim_log2: int = 18            # hashed feature space 2^dim_log2
    use_prompt: bool = False      # add prompt-echo features (answer tokens found in the prompt)


@dataclass(frozen=True)
class EmbedConfig:
    q: int | None = None
    t: int = 300                  # minibatch Adam steps
    hidden: int = 128
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    use_prompt: bool = True


@dataclass(frozen=True)
class PairwiseConfig:
    q: int | None = None
    t: int = 300                  # minibatch Adam steps over training pairs
    hidden: int = 64
    batch: int = 256
    lr_sparse: float = 0.05
    lr_dense: float = 2e-3
    dim_log2: int = 17
    use_embeddings: bool = True


@dataclass(frozen=True)
class FinetuneConfig:
    q: int | None = None          # sample bound (None = all adversary-train prompts)
    t: int = 50                   # minibatch AdamW steps
    batch: int = 16
    lr: float = 5e-5
    head_lr: float = 1e-3
    max_length: int = 128
    use_prompt: bool = True       # encode (prompt, answer) as a BERT sentence pair
    eval_batch: int = 64


@dataclass(frozen=True)
class MMDConfig:
    """The MMD two-sample test (``mmd``): no training, so ``q`` and ``t`` bound nothing.

    They exist because every ``[eval.<adversary>]`` table has them (``q`` must stay None:
    the test uses every probe prompt, train and test split alike, since nothing is fitted).
    ``length`` is the completion length L the token ids are truncated or padded to (the
    Hamming kernel compares position by position); ``n_permutations`` sets the p-value's
    resolution (its floor is 1 / (1 + n_permutations)).
    """

    q: int | None = None
    t: int = 1
    length: int = 32
    n_permutations: int = 1000
