"""Process-wide runtime settings: where qbudget keeps its caches, JAX's compile cache, and
how the C allocator hands out large buffers.

Every ``qbudget`` process (the CLI and each sweep worker) compiles the same handful of
jitted functions (decoder forward, training step, decode loop, encoder, adversaries).
JAX's persistent compilation cache, kept under the qbudget home, turns those compiles
into disk reads after the first process; ``QBUDGET_JAX_CACHE=off`` disables it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_allocator_configured: bool | None = None


def configure_allocator() -> bool:
    """Keep freed heap memory for reuse instead of mapping fresh pages for every large buffer.

    Why: XLA:CPU allocates each call's scratch memory as one buffer (190 MB for a LoRA
    training step of the perf_models checkpoint, batch 16 x 96). Above 32 MB, glibc
    always serves such a request with a fresh ``mmap`` and unmaps it on free, so every
    step page-faults and zero-fills the whole buffer again: 48,000 faults and ~80 ms of
    kernel time per step, about a quarter of its wall time. With one arena and no
    ``mmap`` for large blocks, the buffer comes back from the heap already mapped.

    Cost: the process keeps its peak heap instead of returning it to the system. Applied
    once per process, at ``import qbudget`` (before XLA starts its threads, which would
    otherwise take arenas of their own); ``QBUDGET_MALLOC=system`` leaves the allocator
    alone. A no-op where the C library has no ``mallopt`` (not glibc). Returns whether
    the settings were applied.
    """
    global _allocator_configured
    if _allocator_configured is not None:
        return _allocator_configured
    _allocator_configured = False
    if os.environ.get("QBUDGET_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
          and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
    _allocator_configured = ok
    return ok


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


#: share of the kernel's per-process memory-map limit at which compiled code is dropped
MAP_COUNT_RELEASE_FRACTION = 0.5


def _count_lines(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


def release_compiled_code_if_crowded(fraction: float = MAP_COUNT_RELEASE_FRACTION) -> bool:
    """Drop JAX's in-memory compiled executables when the process's memory maps near the
    kernel's limit; returns whether it did.

    Why: XLA:CPU maps every compiled executable's code and data as memory maps of their own,
    and JAX keeps every executable it compiled for the life of the process. A sweep cell on
    the tiny worlds leaves ~5,000 maps behind, so a worker running ~14 cells reached Linux's
    default ``vm.max_map_count`` (65,530) and the next compilation failed ("LLVM compilation
    error: Cannot allocate memory") with most of the machine's memory free. Clearing the
    caches releases them (a cell's ~6,000 maps fall back to ~1,600); the next call of a
    function compiles it again, from the persistent compilation cache. Checked between cells
    rather than done after each, so most cells keep their compiled code. Linux only (reads
    ``/proc``); elsewhere a no-op.
    """
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    maps = _count_lines("/proc/self/maps")
    if maps is None or maps < fraction * limit:
        return False
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    return True
