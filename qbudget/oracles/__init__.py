"""Teachers as black boxes: the Oracle protocol and its three implementations.

``LocalModelOracle`` (a checkpoint folder), ``ReplayOracle`` (answers recorded earlier) and
``HttpOracle`` (an OpenAI-compatible endpoint). Budget accounting and caching live in
:mod:`qbudget.ledger`, not here: an oracle only answers.
"""

from qbudget.oracles.base import (Oracle, OracleCallError, prompt_hash, prompt_seed,
                                  stable_hash)
from qbudget.oracles.http import HttpOracle, HttpOracleConfig
from qbudget.oracles.local import LocalModelOracle, checkpoint_checksum
from qbudget.oracles.replay import ReplayOracle, load_replay, write_replay



def oracle_for(world) -> Oracle:
    """The teacher of a world: its own oracle if it defines one, else its local checkpoint."""
    if hasattr(world, "make_oracle"):
        return world.make_oracle()
    return LocalModelOracle(world.teacher_dir, world.sampling, world.seed)


__all__ = ["oracle_for", "Oracle", "OracleCallError", "LocalModelOracle", "ReplayOracle", "HttpOracle",
           "HttpOracleConfig", "load_replay", "write_replay", "checkpoint_checksum",
           "prompt_hash", "prompt_seed", "stable_hash"]
