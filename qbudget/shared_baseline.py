"""q = 0 result rows shared between the cells of a sweep that differ only in their strategy.

Before the first purchase the student is the base checkpoint with freshly initialised
adapters, and every random choice derives from the seed, so cells of a grid that differ
only in their strategy evaluate identically at q = 0. The first such cell computes the
rows and stores them under the sweep's ``shared/`` folder keyed by everything else the
evaluation depends on; the others read them instead of paying for the evaluation again.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Callable, Sequence

from qbudget.rundir import config_json, pickle_atomic


def base_eval_key(config: dict, world_root: str | Path, probe_ids: Sequence[str]) -> str:
    """What the q = 0 evaluation depends on: the run config without its strategy, the
    qbudget version, the world's files and the probe prompts."""
    from qbudget import __version__

    cfg = {k: v for k, v in config.items() if k != "strategy"}
    info = Path(world_root) / "world.json"
    parts = [__version__, config_json(cfg), str(world_root),
             hashlib.sha256(info.read_bytes()).hexdigest() if info.is_file() else "",
             ",".join(probe_ids)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def base_rows(shared_dir: Path | None, key: str, compute: Callable[[], list[dict]]) -> list[dict]:
    """The q = 0 rows for ``key``: read from ``shared_dir`` if a cell stored them, else
    computed (and stored there for the next cell). ``shared_dir=None`` always computes."""
    if shared_dir is None:
        return compute()
    path = Path(shared_dir) / f"q0-{key}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    rows = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    pickle_atomic(path, rows)
    return rows
