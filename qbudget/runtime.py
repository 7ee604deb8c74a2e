"""Process-wide runtime settings: where qbudget keeps its caches, and JAX's compile cache.

Every ``qbudget`` process (the CLI and each sweep worker) compiles the same handful of
jitted functions (decoder forward, training step, decode loop, encoder, adversaries).
JAX's persistent compilation cache, kept under the qbudget home, turns those compiles
into disk reads after the first process; ``QBUDGET_JAX_CACHE=off`` disables it.
"""

from __future__ import annotations

import os
from pathlib import Path


def qbudget_home() -> Path:
    """``$QBUDGET_HOME`` if set, else the user cache dir (built worlds, caches)."""
    env = os.environ.get("QBUDGET_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("qbudget"))


def configure_jax() -> None:
    """Enable the persistent compilation cache (idempotent, safe to call often)."""
    if os.environ.get("QBUDGET_JAX_CACHE", "on").lower() in ("off", "0", "false", "no"):
        return
    import jax

    path = qbudget_home() / "jax-cache"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
