"""Sweeps: a grid of worlds x strategies x seeds, each cell a :mod:`qbudget.loop` run.

Layout of a sweep directory::

    DIR/manifest.json        the bench config, versions, git revision, cell list, timings
    DIR/responses.sqlite     one response cache shared by every cell (a prompt is paid once)
    DIR/cells/<cell>/        one run directory per cell (its own ledger, state, results)
    DIR/shared/q0-*.pkl      q = 0 evaluation rows, computed by the first cell of a (world,
                             seed, run config) and reused by the other strategies' cells
    DIR/results.parquet      all cells' rows, merged when the sweep ends

Resumption is per cell: a cell whose manifest says ``done`` is skipped, a cell that was
interrupted is resumed from its ledger and state (see :mod:`qbudget.loop`). Executors:
``local`` runs cells in a pool of spawned processes (one JAX process per worker, its thread
count capped so workers do not oversubscribe the cores); ``ray`` runs cells as Ray tasks
on a cluster of any size, each in a node-local working directory, returning its files to
this process, the only writer of the sweep directory (see :mod:`qbudget.ray_executor`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qbudget.config import BenchConfig, RunConfig
from qbudget.errors import QBudgetError
from qbudget.manifest import base_manifest, write_json_atomic

CELLS_DIR = "cells"


def world_label(world: str) -> str:
    """A world as it may appear in a file name: the name, or a real world TOML's stem."""
    return Path(world).stem if world.endswith(".toml") else world


def cell_name(cfg: RunConfig) -> str:
    return f"{world_label(cfg.world)}__{cfg.strategy.name}__seed{cfg.seed}"


def cell_done(cell_dir: Path) -> bool:
    path = cell_dir / "manifest.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "done"
    except json.JSONDecodeError:
        return False


def _limit_threads(threads: int) -> None:
    """Cap XLA's CPU threads; must run before jax is imported in this process."""
    if threads > 0:
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                       f"intra_op_parallelism_threads={threads}").strip()
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """End this worker soon after the bench process that started it is gone.

    Why: a bench killed on its own (``kill PID``, OOM killer) would otherwise leave its
    workers running, still buying answers and writing into cells that a resumed sweep
    then runs a second time alongside them.
    """
    import threading

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="qbudget-parent-watch", daemon=True).start()


#: the local executor's progress queue, handed to each worker at start-up (a plain
#: multiprocessing queue can only reach a worker by inheritance, not as a task argument;
#: a Manager queue could, but its server process outlives a killed bench)
_PROGRESS_QUEUE = None


def _worker_init(threads: int, parent: int | None = None, queue=None) -> None:
    from qbudget.runtime import configure_jax

    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue
    if parent is not None:
        _exit_with_parent(parent)
    _limit_threads(threads)
    configure_jax()


def run_cell(cfg_dict: dict, cell_dir: str, cache_path: str, queue=None) -> dict:
    """Run (or resume) one cell; executed in a worker process. Returns a short report."""
    from qbudget.config import RunConfig, from_dict
    from qbudget.loop import Run
    from qbudget.runtime import release_compiled_code_if_crowded

    cfg = from_dict(RunConfig, cfg_dict)
    queue = queue if queue is not None else _PROGRESS_QUEUE
    cell = Path(cell_dir)
    if cell_done(cell):
        return {"cell": cell.name, "skipped": True}
    resume = (cell / "manifest.json").is_file()
    if cell.exists() and not resume:
        # created but nothing durable yet (killed during set-up): start it afresh
        shutil.rmtree(cell)

    def progress(ev: dict) -> None:
        if queue is not None:
            queue.put((cell.name, ev.get("q", 0), ev.get("advantage")))

    release_compiled_code_if_crowded()
    t = time.perf_counter()
    outcome = Run(cfg, cell, resume=resume, cache_path=cache_path, run_id=cell.name,
                  progress=progress, shared_dir=cell.parent.parent / "shared").execute()
    return {"cell": cell.name, "skipped": False, "q": outcome.q, "paid": outcome.paid,
            "seconds": time.perf_counter() - t}


def prewarm_world(cfg_dict: dict, cache_path: str, *, cache=None,
                  ledger_path: str | None = None) -> dict:
    """Build the world, embed its pool and buy the probe's teacher answers once, so cells
    running in parallel share them instead of each paying for them.

    ``cache``/``ledger_path``: a ResponseCache-like object and a (throwaway) ledger file to
    use instead of ``cache_path`` and the ``prewarm-*.sqlite`` beside it (a Ray node).
    """
    from qbudget.config import RunConfig, from_dict
    from qbudget.evaluate import teacher_answers
    from qbudget.ledger import Ledger, ResponseCache
    from qbudget.oracles import oracle_for
    from qbudget.pool import stratified_subset
    from qbudget.realworld import resolve_world

    cfg = from_dict(RunConfig, cfg_dict)
    w = resolve_world(cfg.world)
    probe = [w.probe[i] for i in stratified_subset(w.probe, w.probe_is_train,
                                                   cfg.eval.probe_subset, w.seed)]
    prewarm = ledger_path or Path(cache_path).with_name(f"prewarm-{world_label(cfg.world)}.sqlite")
    ledger = Ledger(prewarm, budget=0, cache=cache if cache is not None else ResponseCache(cache_path))
    try:
        teacher_answers(ledger, oracle_for(w), probe, ceiling=cfg.eval.ceiling)
    finally:
        ledger.close()
    return {"world": cfg.world, "probe": len(probe)}


def needs_pool_embeddings(cfg: RunConfig) -> bool:
    """Whether the cell's strategy declares the ``embeddings`` signal."""
    from qbudget.signals import parse_spec
    from qbudget.strategy import get_strategy

    strat = get_strategy(cfg.strategy.name, dict(cfg.strategy.params))
    return any(parse_spec(sig)[0] == "embeddings" for sig in strat.signals)


def prewarm_embeddings(cfg_dict: dict) -> dict:
    """Embed a world's pool once into the world's cache (what diversity-style cells read),
    instead of every such cell starting at once and each computing the same matrix."""
    from qbudget.config import RunConfig, from_dict
    from qbudget.realworld import resolve_world
    from qbudget.signals import cached_pool_embeddings

    w = resolve_world(from_dict(RunConfig, cfg_dict).world)
    emb = cached_pool_embeddings(w.pool, w.root)
    return {"world": w.name, "pool_embeddings": int(emb.shape[0])}


@dataclass
class SweepOutcome:
    out: Path
    cells: int
    skipped: int
    seconds: float


def check_sweep_dir(out: Path, cfg: BenchConfig) -> None:
    """A sweep directory holds one grid: continuing it with another config is refused."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        # where cells run ([executor]) does not change what they compute
        def grid(config: dict) -> dict:
            return {k: v for k, v in (config or {}).items() if k != "executor"}

        previous = json.loads(manifest.read_text()).get("config")
        if grid(previous) != grid(json.loads(json.dumps(cfg.to_dict(), default=list))):
            raise QBudgetError(f"{out} holds a sweep with a different config; use another --out")
    elif out.exists() and any(out.iterdir()):
        raise QBudgetError(f"output directory {out} is not empty and holds no sweep")


def validate(cfg: BenchConfig) -> None:
    """Fail on unknown worlds or strategies before any cell starts."""
    from qbudget.strategy import get_strategy
    from qbudget.worlds import list_worlds

    known = [w["name"] if isinstance(w, dict) else getattr(w, "name", str(w)) for w in list_worlds()]
    for world in cfg.grid.worlds:
        if world.endswith(".toml"):
            from qbudget.realworld import load_real_world

            load_real_world(world)
        elif world not in known:
            raise QBudgetError(f"unknown world '{world}' (known: {', '.join(known)})")
    for cell in cfg.cells():
        get_strategy(cell.strategy.name, dict(cell.strategy.params))


#: what the sweep manifest keeps of each finished cell's report (seconds: the run itself;
#: task_s: the whole Ray task, shipping and installing included; node: the Ray node)
_REPORTED = ("q", "paid", "seconds", "task_s", "node")


def run_sweep(cfg: BenchConfig, out: Path, *, executor: str = "local",
              on_event: Callable[[dict], None] | None = None,
              address: str | None = None) -> SweepOutcome:
    """Run the grid's unfinished cells; ``address``: the Ray cluster (``executor="ray"``;
    default ``$RAY_ADDRESS``, else a Ray started on this machine)."""
    if executor == "ray":
        from qbudget.ray_executor import require_ray

        require_ray()          # before anything is written
    elif executor != "local":
        raise QBudgetError(f"unknown executor '{executor}' (known: local, ray)")
    elif address:
        raise QBudgetError("--address selects a Ray cluster: use it with --executor ray")
    validate(cfg)
    check_sweep_dir(out, cfg)
    previous = _previous(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CELLS_DIR).mkdir(exist_ok=True)
    cache_path = str(out / "responses.sqlite")
    manifest = base_manifest("bench", json.loads(json.dumps(cfg.to_dict(), default=list)))
    cells = cfg.cells()
    manifest.update({"executor": executor, "cells": [cell_name(c) for c in cells], "status": "running"})
    write_json_atomic(out / "manifest.json", manifest)
    reports: dict[str, dict] = dict(previous.get("cell_reports") or {})

    def emit(ev: dict) -> None:
        if ev["event"] == "cell_done":   # where and how long: kept in the sweep manifest
            reports[ev["cell"]] = {k: v for k, v in ev.items() if k in _REPORTED}
        if on_event is not None:
            on_event(ev)

    t0 = time.perf_counter()
    todo = [c for c in cells if not cell_done(out / CELLS_DIR / cell_name(c))]
    skipped = len(cells) - len(todo)
    emit({"event": "start", "cells": len(cells), "skipped": skipped})
    if todo:
        if executor == "local":
            _run_local(cfg, todo, out, cache_path, emit)
        else:
            from qbudget.ray_executor import run_ray

            run_ray(cfg, todo, out, cache_path, emit, address=address)
    seconds = time.perf_counter() - t0
    manifest.update({"status": "done", "seconds": seconds, "skipped_cells": skipped,
                     "cell_reports": reports})
    write_json_atomic(out / "manifest.json", manifest)
    return SweepOutcome(out, len(cells), skipped, seconds)


def _previous(out: Path) -> dict:
    """The manifest of the sweep being continued ({} for a new one)."""
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _workers(cfg: BenchConfig, n_cells: int) -> int:
    from qbudget.runtime import available_cores

    return max(1, min(cfg.workers or available_cores(), n_cells))


def _run_local(cfg: BenchConfig, todo: list[RunConfig], out: Path, cache_path: str, emit) -> None:
    import multiprocessing as mp

    from qbudget.runtime import available_cores

    workers = _workers(cfg, len(todo))
    threads = max(1, available_cores() // workers)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads, os.getpid(), queue)) as pool:
        worlds = {}
        for c in todo:
            worlds.setdefault(c.world, c)
        warm = [pool.submit(prewarm_world, _as_dict(c), cache_path) for c in worlds.values()]
        # Pool embeddings are computed alongside (on another worker) and cells that read
        # them are queued last, so they find them cached instead of racing to compute them.
        reads_embeddings = {cell_name(c): needs_pool_embeddings(c) for c in todo}
        embeds = {c.world: c for c in todo if reads_embeddings[cell_name(c)]}
        embedding = [pool.submit(prewarm_embeddings, _as_dict(c)) for c in embeds.values()]
        for f in warm:
            f.result()
        emit({"event": "prewarmed", "worlds": list(worlds)})
        # stable sort: grid order otherwise
        order = sorted(todo, key=lambda c: reads_embeddings[cell_name(c)])
        futures = {pool.submit(run_cell, _as_dict(c), str(out / CELLS_DIR / cell_name(c)),
                               cache_path): cell_name(c) for c in order}
        futures.update({f: "embeddings" for f in embedding})
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for name, q, adv in _drain(queue):
                emit({"event": "progress", "cell": name, "q": q, "advantage": adv})
            for f in done:
                try:
                    report = f.result()  # a failed cell raises here: the sweep stops loudly
                except QBudgetError as err:
                    raise QBudgetError(f"cell {futures[f]}: {err}") from None
                if futures[f] != "embeddings":
                    emit({"event": "cell_done", **report})
        for name, q, adv in _drain(queue):
            emit({"event": "progress", "cell": name, "q": q, "advantage": adv})
    queue.close()


def _drain(queue) -> list:
    import queue as queue_mod

    items = []
    while True:
        try:
            items.append(queue.get_nowait())
        except queue_mod.Empty:
            return items


def _as_dict(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=list))
