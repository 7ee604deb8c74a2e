"""``qbudget bench --executor ray``: a sweep's cells as Ray tasks, on any number of machines.

Nothing here assumes a filesystem shared between the driver (the ``qbudget bench``
process) and the nodes that run cells:

- **Cells return what they produce.** A cell runs in a node-local working directory
  (``$QBUDGET_WORKDIR``, default ``$QBUDGET_HOME/ray-work``, then one folder per sweep)
  and returns its run directory's files -- manifest, ledger, result rows, and the adapter
  unless ``[executor] adapters = false`` -- through Ray's object store. Only the driver
  writes the sweep directory, in the same layout as the local executor, so resumption
  stays cell by cell from the driver's ``cells/``: a done cell is skipped, an unfinished
  one is shipped to its worker and resumed there.
- **Pay once across nodes.** Teacher answers go through one response cache: the driver's
  ``responses.sqlite``, owned by a :class:`qbudget.cache_service.SweepService` actor pinned
  to the driver's node. Cells reach it through :class:`~qbudget.cache_service.RemoteResponseCache`,
  so a prompt one cell bought is never bought by another, on any node; each cell's ledger
  is its own, with the same guarantees as on one machine.
- **Worlds are shipped, not rebuilt.** An embedded world is built deterministically, but
  only bit for bit on the same kind of CPU, and a node's pool embeddings come from its own
  MiniLM. So the driver sends its built world (and the pool embeddings the grid's
  strategies read) once per node through the object store; a node installs it into its
  ``$QBUDGET_HOME`` when its copy differs. Every node then evaluates the same teacher,
  student, pool and probe, and results are comparable across nodes. A real world (a TOML
  path) is not shipped: its checkpoints or endpoint must be reachable from every node.
- **Resources are honest.** ``[executor] cpus_per_cell`` / ``gpus_per_cell`` are the
  Ray resources of a cell, and its JAX gets as many threads (at least one) and sees only
  the GPUs Ray gave it (none when 0; a fraction also caps JAX's GPU memory to that share).
- **Failures.** A cell whose worker or node dies is retried elsewhere by Ray
  (``CELL_RETRIES``); purchases went through the shared cache, so the retry pays for
  nothing already bought. A cell that fails on bad input stops the sweep with the cell
  named (``QBudgetError``: exit 2), as the local executor does.

Progress events of remote cells travel through the same service actor to the driver's
display.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from qbudget.config import BenchConfig, ExecutorConfig, RunConfig
from qbudget.errors import QBudgetError

INSTALL_HINT = "--executor ray needs Ray: pip install 'qbudget[ray]'"
#: how often Ray re-runs a cell whose worker process or node died
CELL_RETRIES = 3
#: files of a run directory a cell sends back (state.pkl only matters to a resume, which
#: the returned ledger and results do not need once the cell is done)
_NOT_RETURNED = {"state.pkl", "responses.sqlite"}


def require_ray():
    """The ``ray`` module, or the one-line install hint (exit 2) when it is missing."""
    try:
        import ray
    except ImportError:
        raise QBudgetError(INSTALL_HINT) from None
    return ray


# -- files through the object store ------------------------------------------------------------

def pack_dir(root: Path, skip: set[str] = frozenset()) -> dict[str, bytes]:
    """Every file below ``root`` as {posix relpath: bytes}; SQLite files as consistent
    snapshots (the backup API folds in the write-ahead log), their -wal/-shm left out."""
    files: dict[str, bytes] = {}
    if not root.is_dir():
        return files
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.split("/")[0] in skip or path.name.endswith(
                ("-wal", "-shm", "-journal", ".tmp")):
            continue
        files[rel] = _sqlite_bytes(path) if path.suffix == ".sqlite" else path.read_bytes()
    return files


def _sqlite_bytes(path: Path) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        src, dst = sqlite3.connect(str(path)), sqlite3.connect(str(copy))
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return copy.read_bytes()


def unpack_dir(files: dict[str, bytes], root: Path) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def replace_dir(files: dict[str, bytes], final: Path) -> None:
    """Write ``files`` as the folder ``final``, swapped in whole (a reader sees the old
    folder or the new one, never a mix)."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.with_name(f".{final.name}.incoming-{tag}")
    unpack_dir(files, tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{tag}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- worlds ------------------------------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def world_files(root: Path) -> dict[str, bytes]:
    """A built world as shipped: ``world.json``, every file it lists, and cached pool
    embeddings (``embeddings/*.npy``), so every node selects on the same vectors."""
    from qbudget.worlds.cache import WORLD_FILE, read_manifest

    info = read_manifest(root) or {}
    names = [WORLD_FILE, *sorted(info.get("files", {}))]
    names += sorted(p.relative_to(root).as_posix() for p in (root / "embeddings").glob("*.npy"))
    return {rel: (root / rel).read_bytes() for rel in names}


#: (world root, digest) pairs this process has verified or installed already
_INSTALLED: set[tuple[str, str]] = set()


def install_world(name: str, digest: dict[str, str], holder: list) -> Path:
    """Make this node's copy of world ``name`` the driver's (``digest``: relpath -> sha256).

    Only when a file differs is the package fetched (``holder[0]``: its object ref, nested
    so that Ray does not fetch it before it is needed). A different ``world.json`` or
    world file replaces the whole folder atomically, under the same lock a build takes;
    differing extra files (pool embeddings) are replaced one by one.
    """
    from qbudget.worlds import cache

    root = cache.default_root(name)
    tag = (str(root), _sha(json.dumps(sorted(digest.items())).encode()))
    if tag in _INSTALLED:
        return root

    def wrong() -> list[str]:
        return [rel for rel, sha in digest.items()
                if not (root / rel).is_file() or cache.sha256_file(root / rel) != sha]

    if wrong():
        with cache.build_lock(root):
            todo = wrong()
            if todo:
                from qbudget.cache_service import wait_for

                files = wait_for(holder[0])
                core = {cache.WORLD_FILE, *json.loads(files[cache.WORLD_FILE]).get("files", {})}
                if core & set(todo) or not root.is_dir():
                    cache.atomic_build(root, lambda tmp: unpack_dir(files, tmp))
                else:
                    for rel in todo:
                        path = root / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        part = path.with_name(f".{path.name}.{os.getpid()}.part")
                        part.write_bytes(files[rel])
                        part.replace(path)
    _INSTALLED.add(tag)
    return root


def node_workdir() -> Path:
    """This node's scratch folder for cells: ``$QBUDGET_WORKDIR`` or ``$QBUDGET_HOME/ray-work``."""
    from qbudget.runtime import qbudget_home

    env = os.environ.get("QBUDGET_WORKDIR")
    return Path(env).expanduser() if env else qbudget_home() / "ray-work"


def cell_env(opts: ExecutorConfig) -> dict[str, str]:
    """Environment of a cell's worker process, set before it imports JAX: XLA's thread
    count from ``cpus_per_cell`` and device visibility from ``gpus_per_cell`` (Ray sets
    CUDA_VISIBLE_DEVICES to the GPUs it assigned)."""
    threads = max(1, int(opts.cpus_per_cell))
    env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                        f"intra_op_parallelism_threads={threads}",
           "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if opts.gpus_per_cell <= 0:
        env["JAX_PLATFORMS"] = "cpu"           # a CPU cell never touches the node's GPUs
    elif opts.gpus_per_cell < 1:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.95 * opts.gpus_per_cell:.3f}"
    return env


# -- what runs on the nodes --------------------------------------------------------------------

def _prepare(world) -> None:
    from qbudget.runtime import configure_jax

    configure_jax()
    if world is not None:
        install_world(*world)


def remote_prewarm(cfg_dict: dict, key: str, service, world) -> dict:
    """Buy the probe's teacher answers once for the whole sweep (see ``prewarm_world``)."""
    from qbudget.cache_service import RemoteResponseCache
    from qbudget.sweep import prewarm_world

    _prepare(world)
    scratch = node_workdir() / key
    scratch.mkdir(parents=True, exist_ok=True)
    ledger = scratch / f"prewarm-{uuid.uuid4().hex[:8]}.sqlite"   # throwaway: no budget
    with RemoteResponseCache(service) as cache:
        try:
            return prewarm_world(cfg_dict, "", cache=cache, ledger_path=str(ledger))
        finally:
            for path in scratch.glob(ledger.name + "*"):
                path.unlink(missing_ok=True)


def remote_embeddings(cfg_dict: dict, world) -> dict[str, bytes]:
    """Embed a world's pool on one node; the driver ships the file to all the others."""
    from qbudget.sweep import prewarm_embeddings

    _prepare(world)
    prewarm_embeddings(cfg_dict)
    from qbudget.worlds.cache import default_root

    root = default_root(world[0])
    shipped = world[1]
    return {rel: data for rel, data in world_files(root).items()
            if rel.startswith("embeddings/") and rel not in shipped}


def remote_cell(cfg_dict: dict, name: str, key: str, service, world, prior: dict | None,
                shared: dict[str, bytes], adapters: bool) -> dict:
    """Run (or resume, from ``prior``: the driver's files of the cell) one cell in this
    node's working directory and return its files; nothing is left behind but the q = 0
    rows it shares with the node's next cells."""
    from qbudget.cache_service import RemoteResponseCache
    from qbudget.config import RunConfig, from_dict
    from qbudget.loop import Run

    import ray

    start = time.perf_counter()
    _prepare(world)
    cfg = from_dict(RunConfig, cfg_dict)
    base = node_workdir() / key
    cell, shared_dir = base / "cells" / name, base / "shared"
    shutil.rmtree(cell, ignore_errors=True)      # a lost attempt's leftovers: start clean
    if prior:
        unpack_dir(prior, cell)
    shared_dir.mkdir(parents=True, exist_ok=True)
    for fname, data in shared.items():
        if not (shared_dir / fname).is_file():
            unpack_dir({fname: data}, shared_dir)
    known = set(shared) | {p.name for p in shared_dir.glob("q0-*.pkl")}

    def progress(ev: dict) -> None:
        service.progress.remote((name, ev.get("q", 0), ev.get("advantage")))

    from qbudget.runtime import release_compiled_code_if_crowded

    release_compiled_code_if_crowded()      # Ray reuses this worker for more cells
    t = time.perf_counter()
    run = None
    with RemoteResponseCache(service) as cache:
        try:
            run = Run(cfg, cell, resume=(cell / "manifest.json").is_file(), cache=cache,
                      run_id=name, progress=progress, shared_dir=shared_dir)
            outcome = run.execute()
        finally:
            if run is not None and run.res is not None:
                run.res.ledger.close()        # this worker runs more cells: free the file
    seconds = time.perf_counter() - t
    files = pack_dir(cell, _NOT_RETURNED | (set() if adapters else {"adapter"}))
    new_shared = {p.name: p.read_bytes() for p in shared_dir.glob("q0-*.pkl")
                  if p.name not in known}
    shutil.rmtree(cell, ignore_errors=True)
    return {"cell": name, "skipped": False, "q": outcome.q, "paid": outcome.paid,
            "seconds": seconds, "task_s": time.perf_counter() - start,
            "node": ray.get_runtime_context().get_node_id(),
            "files": files, "shared": new_shared}


# -- the driver --------------------------------------------------------------------------------

def sweep_key(out: Path) -> str:
    """Names this sweep's scratch folder on every node (driver host + sweep directory)."""
    return hashlib.sha256(f"{socket.gethostname()}:{out.resolve()}".encode()).hexdigest()[:16]


def connect(address: str | None):
    """Join the cluster at ``address`` (else $RAY_ADDRESS, else start a local Ray);
    returns (ray, whether this call started the connection)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None,
             include_dashboard=False, log_to_driver=False)
    return ray, True


def run_ray(cfg: BenchConfig, todo: list[RunConfig], out: Path, cache_path: str,
            emit: Callable[[dict], None], address: str | None = None) -> None:
    ray, started = connect(address)
    try:
        _run(ray, cfg, todo, out, cache_path, emit)
    finally:
        if started:
            ray.shutdown()


def _run(ray, cfg: BenchConfig, todo: list[RunConfig], out: Path, cache_path: str, emit) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from qbudget.cache_service import SweepService
    from qbudget.sweep import CELLS_DIR, cell_name, needs_pool_embeddings, _as_dict
    from qbudget.worlds import get_world, list_worlds

    opts = cfg.executor
    here = ray.get_runtime_context().get_node_id()
    # the cache file is on the driver's disk: its owner runs on the driver's node
    service = ray.remote(SweepService).options(
        num_cpus=0, max_restarts=3, max_task_retries=3,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(str(Path(cache_path).resolve()))
    task = dict(num_cpus=opts.cpus_per_cell, num_gpus=opts.gpus_per_cell,
                max_retries=CELL_RETRIES, runtime_env={"env_vars": cell_env(opts)})
    key = sweep_key(out)
    pending: dict = {}
    try:
        embedded = {w["name"] for w in list_worlds()}
        firsts: dict[str, RunConfig] = {}
        for c in todo:
            firsts.setdefault(c.world, c)
        roots = {w: get_world(w).root for w in firsts if w in embedded}
        worlds = {w: _ship(ray, w, root) for w, root in roots.items()}

        reads = {cell_name(c): needs_pool_embeddings(c) for c in todo}
        embed = {c.world for c in todo if reads[cell_name(c)] and c.world in worlds}
        warm = [ray.remote(remote_prewarm).options(**task).remote(
            _as_dict(c), key, service, worlds.get(w)) for w, c in firsts.items()]
        vectors = {w: ray.remote(remote_embeddings).options(**task).remote(
            _as_dict(firsts[w]), worlds[w]) for w in embed}
        for w, ref in vectors.items():
            extra = _named(ray, ref, f"pool embeddings of world '{w}'")
            if extra:   # keep them with the driver's world too: the next sweep ships them
                for rel, data in extra.items():
                    if not (roots[w] / rel).is_file():
                        unpack_dir({rel: data}, roots[w])
                worlds[w] = _ship(ray, w, roots[w])
        for c, ref in zip(firsts.values(), warm):
            _named(ray, ref, f"prewarm of world '{c.world}'")
        emit({"event": "prewarmed", "worlds": list(firsts)})

        cells_dir = out / CELLS_DIR
        shared = {p.name: p.read_bytes() for p in (out / "shared").glob("q0-*.pkl")}
        remote = ray.remote(remote_cell).options(**task)
        for c in sorted(todo, key=lambda c: reads[cell_name(c)]):   # stable: grid order
            name = cell_name(c)
            prior = _unfinished(cells_dir / name, c)
            ref = remote.remote(_as_dict(c), name, key, service, worlds.get(c.world), prior,
                                shared, opts.adapters)
            pending[ref] = name
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            _forward(ray, service, emit)
            for ref in done:
                name = pending.pop(ref)
                report = _named(ray, ref, f"cell {name}")
                replace_dir(report.pop("files"), cells_dir / name)
                for fname, data in report.pop("shared").items():
                    if not (out / "shared" / fname).is_file():
                        replace_file(out / "shared" / fname, data)
                emit({"event": "cell_done", **report})
        _forward(ray, service, emit)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        try:
            ray.get(service.close.remote(), timeout=30)
        except Exception:   # already gone: the file is consistent (WAL) either way
            pass
        ray.kill(service)


def _unfinished(cell: Path, cfg: RunConfig) -> dict[str, bytes] | None:
    """The files of a cell an earlier (local) sweep left unfinished in ``DIR``, for its
    worker to resume from, or None. Only this host can tell whether a purchase reserved
    in its ledger died with its process: opening the ledger here drops such reservations
    before the ledger travels to a host that could not."""
    from qbudget.ledger import Ledger

    if not (cell / "manifest.json").is_file():
        return None
    if (cell / "ledger.sqlite").is_file():
        Ledger(cell / "ledger.sqlite", budget=cfg.budget.total).close()
    return pack_dir(cell, {"responses.sqlite"})


def replace_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _ship(ray, name: str, root: Path) -> tuple[str, dict[str, str], list]:
    """(name, digest, [object ref]) of the driver's built world: what a task installs."""
    files = world_files(root)
    return name, {rel: _sha(data) for rel, data in files.items()}, [ray.put(files)]


def _forward(ray, service, emit) -> None:
    for name, q, adv in ray.get(service.drain.remote()):
        emit({"event": "progress", "cell": name, "q": q, "advantage": adv})


def _named(ray, ref, what: str):
    """The task's result; a failure names ``what`` (bad input stays a QBudgetError: exit 2)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, QBudgetError):
            raise QBudgetError(f"{what}: {cause}") from None
        raise RuntimeError(f"{what} failed: {cause!r}") from err
    except ray.exceptions.RayError as err:
        raise RuntimeError(f"{what} failed after {CELL_RETRIES} retries: {err}") from err
