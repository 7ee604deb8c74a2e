"""Run and sweep manifests: what produced a results file, so it can be reproduced.

``manifest.json`` records the full config, the seed, package versions, the git revision of
the code, the q/paid counts and timings. It is rewritten atomically at every checkpoint so
a killed run still leaves a truthful manifest.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("qbudget", "jax", "jaxlib", "flax", "optax", "transformers", "tokenizers",
             "numpy", "pyarrow")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision() -> str:
    """The commit of the qbudget source tree (``+dirty`` when it has local changes)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def base_manifest(kind: str, config: dict, seed: int | None = None) -> dict:
    return {
        "kind": kind,
        "config": config,
        "seed": seed,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
