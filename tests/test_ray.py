"""`qbudget bench --executor ray` on a real multi-node Ray cluster (all on this machine).

The cluster is ``ray.cluster_utils.Cluster``: a head node with no CPUs for cells (it hosts
the driver's cache service) and two worker nodes of one CPU each. Each worker node has its
own ``QBUDGET_HOME`` (no built world, so it must receive the driver's) and its own working
directory, as separate machines would. What must hold:

- the grid's results equal the local executor's (same rows, values within the tolerance
  the local tests use), and no process on a worker node writes under the driver's out/
  (an audit hook in every Ray worker logs writes below it);
- each prompt is paid once across nodes, counted at the teacher oracle (conftest's spy,
  on the nodes' PYTHONPATH);
- a worker node removed mid-sweep: the sweep completes, its cells re-run on the other
  node, the teacher is not asked again, and results.parquet equals the undisturbed one;
- a cell that fails on bad input stops the sweep with the cell named (exit 2);
- without Ray installed, ``--executor ray`` exits 2 with the install hint.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import OracleSpy
from qbudget.cli import app

# The shape of test_bench_cli's SMALL_GRID, smaller still: 4 cells of 2 rounds on a
# 48-prompt probe subset, so the whole file stays within a few minutes on two cores.
GRID = """
workers = 2
[grid]
worlds = ["micro"]
strategies = ["random", "stratified"]
seeds = [0, 1]
baseline = "stratified"
[run.budget]
total = 16
round_size = 8
checkpoints = [8]
[run.distill]
steps_per_round = 2
batch_size = 8
[run.eval]
probe_subset = 48
adversaries = ["ngram"]
ceiling = true
"""
VALUE_KEY = ["run_id", "world", "strategy", "seed", "q", "metric", "adversary", "category"]

# Installed in every Ray worker process (worker_process_setup_hook): logs each write below
# $QBUDGET_TEST_GUARD (the drivers' out/ folders) with the node's $QBUDGET_HOME.
AUDIT_SOURCE = r'''
import json
import os
import sys

_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def install():
    guard, log = os.environ.get("QBUDGET_TEST_GUARD"), os.environ.get("QBUDGET_TEST_GUARD_LOG")
    if not guard or not log:
        return
    guard = os.path.realpath(guard) + os.sep
    busy = [False]

    def below(path):
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(guard)
        except (TypeError, ValueError):
            return False

    def hook(event, args):
        if busy[0]:
            return
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & _WRITE)
            paths = [path] if writes and isinstance(path, (str, bytes, os.PathLike)) else []
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir",
                       "shutil.rmtree", "sqlite3.connect", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        hits = [os.fsdecode(p) for p in paths if below(p)]
        if hits:
            busy[0] = True
            try:
                with open(log, "a") as fh:
                    fh.write(json.dumps({"home": os.environ.get("QBUDGET_HOME"), "pid": os.getpid(),
                                         "event": event, "paths": hits}) + "\n")
            finally:
                busy[0] = False

    sys.addaudithook(hook)
'''


def _grid_file(folder: Path, text: str = GRID) -> Path:
    path = folder / "grid.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cluster(micro_world, tmp_path_factory):
    """Head (0 CPUs) + 2 worker nodes (1 CPU, own QBUDGET_HOME and working dir), joined by
    this process as the Ray driver."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("ray-cluster")
    spy = OracleSpy(root / "spy")
    (spy.folder / "qbudget_test_audit.py").write_text(AUDIT_SOURCE)
    outs, audit = root / "outs", root / "audit.jsonl"
    outs.mkdir()
    spy_env = spy.env()
    common = {"PYTHONPATH": spy_env["PYTHONPATH"], "QBUDGET_ORACLE_SPY": str(spy.log),
              "QBUDGET_ORACLE_SPY_KILL_AT_CALL": "0:", "QBUDGET_TEST_GUARD": str(outs),
              "QBUDGET_TEST_GUARD_LOG": str(audit), "TOKENIZERS_PARALLELISM": "false"}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": dict(common)})
    nodes = {}
    session_cache = Path(os.environ["QBUDGET_HOME"]) / "jax-cache"
    for i in (1, 2):
        home, work = root / f"node{i}" / "home", root / f"node{i}" / "work"
        work.mkdir(parents=True)
        if session_cache.is_dir():  # a warm compile cache, as a node that ran qbudget before
            shutil.copytree(session_cache, home / "jax-cache")
        env = {**common, "QBUDGET_HOME": str(home), "QBUDGET_WORKDIR": str(work)}
        nodes[i] = (c.add_node(num_cpus=1, env_vars=env), home, work)
    c.wait_for_nodes()
    sys.path.insert(0, str(spy.folder))
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "qbudget_test_audit.install"})
    try:
        yield {"cluster": c, "nodes": nodes, "spy": spy, "outs": outs, "audit": audit,
               "ray": ray}
    finally:
        ray.shutdown()
        c.shutdown()
        sys.path.remove(str(spy.folder))


def _audit(cluster) -> list[dict]:
    log = cluster["audit"]
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def _bought(ledger: Path) -> int:
    """Committed purchases in a running cell's ledger (read-only; 0 while unreadable)."""
    import sqlite3

    if not ledger.is_file():
        return 0
    try:
        con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM purchases WHERE state='bought'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(VALUE_KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def local_sweep(micro_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local-sweep")
    out = folder / "out"
    result = CliRunner().invoke(app, ["bench", str(_grid_file(folder)), "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def ray_sweep(cluster):
    spy = cluster["spy"]
    out = cluster["outs"] / "ray"
    before = len(spy.calls())
    result = CliRunner().invoke(app, ["bench", str(_grid_file(cluster["outs"].parent)), "--out",
                                      str(out), "--executor", "ray", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, spy.calls()[before:]


@pytest.mark.slow
def test_ray_sweep_matches_the_local_executor_and_only_the_driver_writes_out(
        cluster, ray_sweep, local_sweep):
    out, _ = ray_sweep
    ref = _sorted(pd.read_parquet(local_sweep / "results.parquet"))
    got = _sorted(pd.read_parquet(out / "results.parquet"))
    assert len(got) == len(ref) and (got[VALUE_KEY] == ref[VALUE_KEY]).all().all()
    np.testing.assert_allclose(got["value"].to_numpy(), ref["value"].to_numpy(), rtol=1e-6,
                               atol=1e-9)
    # the sweep directory has the local executor's layout, written by the driver alone
    for cell in sorted((local_sweep / "cells").iterdir()):
        mine = out / "cells" / cell.name
        assert json.loads((mine / "manifest.json").read_text())["status"] == "done"
        for name in ("ledger.sqlite", "results.parquet", "adapter/adapter_config.json"):
            assert (mine / name).is_file(), (cell.name, name)
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    assert (out / "summary.md").is_file() and (out / "shared").is_dir()
    audit = _audit(cluster)
    homes = {str(home) for _, home, _ in cluster["nodes"].values()}
    from_workers = [a for a in audit if a["home"] in homes]
    assert not from_workers, f"worker nodes wrote under out/: {from_workers[:5]}"
    # the hook does see writes: the cache service (on the driver's node) opens the cache
    assert any(a["event"] == "sqlite3.connect" and a["paths"][0].endswith("responses.sqlite")
               for a in audit)
    # cells really ran on both worker nodes, each in its own working directory, with
    # the world the driver shipped (nothing built there)
    for i, (_, home, work) in cluster["nodes"].items():
        assert (home / "worlds" / "micro" / "world.json").read_bytes() == \
            (Path(os.environ["QBUDGET_HOME"]) / "worlds" / "micro" / "world.json").read_bytes()
        assert list(work.glob("*/shared/q0-*.pkl")), f"no cell ran on node {i}"
        assert not list(work.glob("*/cells/*/manifest.json")), "cell folders left behind"


@pytest.mark.slow
def test_ray_sweep_pays_each_prompt_once_across_nodes(ray_sweep, micro_world):
    from qbudget.ledger import Ledger

    out, calls = ray_sweep
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == 4
    ledgers = [Ledger(c / "ledger.sqlite", budget=16) for c in cells]
    bought = set().union(*({pid for pid, _ in led.bought()} for led in ledgers))
    for led in ledgers:
        led.close()
    assert len({c["pid"] for c in calls}) >= 2     # answers came from more than one process
    pool_ids = {p.id for p in micro_world.pool}
    train = Counter(c["id"] for c in calls if c["id"] in pool_ids)
    evals = Counter((c["id"], c["sample"]) for c in calls if c["id"] not in pool_ids)
    assert not [k for k, n in train.items() if n > 1] and set(train) == bought
    assert not [k for k, n in evals.items() if n > 1]
    assert len(evals) == 48 * 2                    # the probe subset, two teacher samples
    # the teacher-call count summed over all nodes = the distinct prompts bought
    assert len(calls) == len(bought) + len(evals)


@pytest.mark.slow
def test_a_cell_failing_on_bad_input_stops_the_ray_sweep_naming_it(cluster):
    folder = cluster["outs"].parent / "bad"
    folder.mkdir()
    text = GRID.replace('strategies = ["random", "stratified"]', 'strategies = ["random"]') \
        .replace("seeds = [0, 1]", "seeds = [0]").replace("total = 16", "total = 5000") \
        .replace('baseline = "stratified"', 'baseline = "random"')
    result = CliRunner().invoke(app, ["bench", str(_grid_file(folder, text)), "--out",
                                      str(cluster["outs"] / "bad"), "--executor", "ray", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "cell micro__random__seed0" in lines[0] \
        and "larger than the pool" in lines[0], result.stderr


@pytest.mark.slow
def test_ray_sweep_resumes_cell_by_cell_from_the_drivers_out(cluster, ray_sweep):
    """A copy of the finished sweep with one cell missing: only that cell runs again, the
    others' files stay as they were, and the teacher is not asked for anything."""
    ref_out, _ = ray_sweep
    spy = cluster["spy"]
    out = cluster["outs"] / "resumed"
    shutil.copytree(ref_out, out)
    missing = "micro__stratified__seed1"
    shutil.rmtree(out / "cells" / missing)
    (out / "results.parquet").unlink()
    kept = {c.name: (c / "results.parquet").stat().st_mtime_ns for c in (out / "cells").iterdir()}
    before = len(spy.calls())
    result = CliRunner().invoke(app, ["bench", str(_grid_file(cluster["outs"].parent)), "--out",
                                      str(out), "--executor", "ray", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "4 cells (3 already done)" in result.output
    assert spy.calls()[before:] == []
    for name, mtime in kept.items():
        assert (out / "cells" / name / "results.parquet").stat().st_mtime_ns == mtime
    ref = _sorted(pd.read_parquet(ref_out / "results.parquet"))
    got = _sorted(pd.read_parquet(out / "results.parquet"))
    assert (got[VALUE_KEY] == ref[VALUE_KEY]).all().all()
    np.testing.assert_array_equal(got["value"].to_numpy(), ref["value"].to_numpy())


@pytest.mark.slow
def test_a_worker_node_lost_mid_sweep_is_replaced_without_paying_again(cluster, ray_sweep):
    """Runs last: it removes worker node 2 for good."""
    from rich.console import Console

    from qbudget.commands.bench import _report
    from qbudget.config import load_bench_config
    from qbudget.ray_executor import sweep_key
    from qbudget.sweep import run_sweep

    ref_out, ref_calls = ray_sweep
    spy = cluster["spy"]
    node2, _, work2 = cluster["nodes"][2]
    node1_id = cluster["nodes"][1][0].node_id
    cfg = load_bench_config(_grid_file(cluster["outs"].parent))
    out = cluster["outs"] / "lost-node"
    before = len(spy.calls())
    events: list[dict] = []
    failure: list[BaseException] = []

    def sweep() -> None:
        try:
            run_sweep(cfg, out, executor="ray", on_event=events.append)
        except BaseException as exc:   # reported by the main thread
            failure.append(exc)

    thread = threading.Thread(target=sweep)
    thread.start()
    # wait until a cell on node 2 has committed a purchase (then it distils: the node dies
    # between two teacher calls, so nothing it was paying for is lost in flight)
    cells2 = work2 / sweep_key(out) / "cells"
    deadline = time.monotonic() + 600
    busy = None
    while time.monotonic() < deadline and thread.is_alive() and busy is None:
        busy = next((c.name for c in cells2.glob("*") if _bought(c / "ledger.sqlite")), None)
        time.sleep(0.05)
    assert busy, "no cell got going on node 2"
    cluster["cluster"].remove_node(node2)
    thread.join(timeout=900)
    assert not thread.is_alive() and not failure, failure
    done = {e["cell"]: e for e in events if e["event"] == "cell_done"}
    assert len(done) == 4 and done[busy]["node"] == node1_id   # re-run on the other node
    # no prompt was paid twice: the same teacher calls as the undisturbed sweep
    calls = spy.calls()[before:]
    assert Counter((c["id"], c["sample"]) for c in calls) == \
        Counter((c["id"], c["sample"]) for c in ref_calls)
    _report(cfg, out, Console(file=io.StringIO()))
    ref = _sorted(pd.read_parquet(ref_out / "results.parquet"))
    got = _sorted(pd.read_parquet(out / "results.parquet"))
    assert (got[VALUE_KEY] == ref[VALUE_KEY]).all().all()
    np.testing.assert_array_equal(got["value"].to_numpy(), ref["value"].to_numpy())


def test_executor_ray_without_ray_installed_exits_2_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` raises ImportError
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", str(_grid_file(tmp_path)), "--out", str(out),
                                      "--executor", "ray", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
    assert lines == ["error: --executor ray needs Ray: pip install 'qbudget[ray]'"], result.stderr
    assert not out.exists()
