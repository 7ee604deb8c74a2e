"""Process-wide runtime settings (qbudget.runtime), checked in fresh processes.

The allocator setting is about where XLA:CPU's large per-call scratch buffers come from:
left to glibc's defaults, every call maps (and page-faults) a fresh buffer; with
qbudget's setting the heap keeps it. Page faults are counted by the kernel, so the
check is a count, not a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A jitted call whose scratch is far above glibc's 32 MB mmap ceiling (x @ x.T is 64 MB).
_PROBE = r"""
import json, resource
import qbudget
from qbudget.runtime import configure_allocator
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) + jnp.exp(x @ x.T).mean(axis=1))
x = jnp.ones((4096, 512), jnp.float32) * 1e-3
f(x).block_until_ready()
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"applied": configure_allocator(), "faults_per_call": faults}))
"""


def _probe(env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    env.pop("MALLOC_ARENA_MAX", None)
    env.pop("MALLOC_MMAP_MAX_", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_import_keeps_large_buffers_mapped_and_system_opts_out():
    tuned = _probe({})
    system = _probe({"QBUDGET_MALLOC": "system"})
    assert tuned["applied"] is True
    assert system["applied"] is False
    # 64 MB of fresh pages is ~16,000 faults a call; the kept heap needs almost none.
    assert system["faults_per_call"] > 8000
    assert tuned["faults_per_call"] < system["faults_per_call"] / 4


def test_compiled_code_is_released_only_when_the_maps_are_crowded():
    """Compiled executables hold memory maps of their own; below the threshold nothing is
    dropped, at it the caches are cleared and the maps they held are returned."""
    import os

    import jax
    import jax.numpy as jnp

    from qbudget.runtime import release_compiled_code_if_crowded

    def maps() -> int:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sum(1 for _ in f)

    fns = [jax.jit(lambda x, k=k: jnp.sin(x) * k + jnp.cos(x * k)) for k in range(40)]
    for f in fns:
        f(jnp.ones(8)).block_until_ready()
    assert release_compiled_code_if_crowded(fraction=1.0) is False
    before = maps()
    assert release_compiled_code_if_crowded(fraction=0.0) is True
    assert maps() < before
    assert float(fns[0](jnp.ones(8))[0]) == pytest.approx(float(jnp.sin(1.0) * 0 + jnp.cos(0.0)))
