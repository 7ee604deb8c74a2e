"""Where built worlds live, how they are verified, and how a build is made atomic.

A built world is a folder ``<qbudget home>/worlds/<name>`` (``$QBUDGET_HOME`` overrides
the user cache dir) holding ``world.json``, whose ``files`` map lists every file the
build wrote with its SHA-256. A folder is used only if ``world.json`` parses, names the
expected world and spec version, and every listed file exists with its checksum; any
other state (a flipped byte, a deleted file, an interrupted build) is reported with a
reason and rebuilt, never silently used. Extra files are allowed: other modules keep
caches (pool embeddings) inside the world folder.

Builds run in a temporary sibling folder that is renamed into place only when complete,
under an exclusive file lock, so concurrent processes never see or build half a world.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

WORLD_FILE = "world.json"


def worlds_home() -> Path:
    from qbudget.runtime import qbudget_home

    return qbudget_home() / "worlds"


def default_root(name: str) -> Path:
    return worlds_home() / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root`` except world.json, keyed by posix relpath."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != WORLD_FILE:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def read_manifest(root: Path) -> dict | None:
    try:
        data = json.loads((root / WORLD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def problem(root: Path, name: str | None = None, version: int | None = None,
            spec: dict | None = None) -> str | None:
    """Why ``root`` is not a usable built world, or None if it is.

    ``spec`` (the world's current definition as JSON) catches a cache built from an
    older definition of the same world, e.g. after a change of sizes or seeds.
    """
    root = Path(root)
    if not root.is_dir():
        return "not built"
    info = read_manifest(root)
    if info is None:
        return f"{WORLD_FILE} missing or unreadable"
    if name is not None and info.get("name") != name:
        return f"{WORLD_FILE} names world {info.get('name')!r}, expected {name!r}"
    if version is not None and info.get("version") != version:
        return f"built by spec version {info.get('version')}, current is {version}"
    if spec is not None and json.loads(json.dumps(info.get("spec"))) != json.loads(json.dumps(spec)):
        return "built from a different world definition"
    files = info.get("files")
    if not isinstance(files, dict) or not files:
        return f"{WORLD_FILE} lists no files"
    for rel, digest in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            return f"missing file {rel}"
        if sha256_file(path) != digest:
            return f"checksum mismatch in {rel}"
    return None


@contextlib.contextmanager
def build_lock(root: Path):
    """Exclusive inter-process lock for building ``root`` (a sibling ``.lock`` file)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_build(root: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp)`` in a fresh temporary sibling of ``root``, then swap it in.

    A stale or corrupt ``root`` is moved aside and deleted only after the new build is
    complete; if ``build`` raises, ``root`` is left as it was and the temp dir removed.
    """
    root = Path(root)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.building-{tag}"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{tag}"
            root.rename(old)
        tmp.rename(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
