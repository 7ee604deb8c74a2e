"""Ray executor overhead: the quick grid on the local executor vs on a two-node Ray cluster.

Peers: none; needs Ray (the ``ray`` extra). Both sweeps run on this machine with the same
parallelism: the local executor with 2 workers of one XLA thread each, Ray with two
worker nodes of 1 CPU each (``ray.cluster_utils.Cluster``; the head node gets no CPUs, it
only hosts the driver's cache service), ``[executor] cpus_per_cell = 1``. A one-cell local
warm-up first fills JAX's persistent compile cache, so neither sweep pays for compiling.
Each sweep is ``qbudget bench`` in its own process; the figures come from the sweep
manifests' ``seconds`` (the sweep itself: prewarm and cells), with process walls beside.

Targets (issue 22): Ray's overhead per cell <= 2 s and <= 10% of the sweep time for the
default grid's cells. ``--repeats N`` runs both sweeps N times, interleaved, and compares
the fastest of each (on a shared machine the slowest runs measure its other load, not
Ray). Beside the sweep-time difference, the Ray cells' own accounts give the in-task
overhead: a task's wall minus its run's (installing the world, files in and out). Prints
one JSON object.

    .venv/bin/python benchmarks/perf_ray.py [--config benchmarks/quick.toml] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bench(config: Path, out: Path, *extra: str) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qbudget", "bench", str(config), "--out",
                           str(out), "--quiet", *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"qbudget bench {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    reports = manifest.get("cell_reports", {}).values()
    # inside a Ray task but outside the run: world install, shipping files in and out
    in_task = [r["task_s"] - r["seconds"] for r in reports if "task_s" in r]
    return {"sweep_s": round(manifest["seconds"], 2), "process_wall_s": round(wall, 2),
            "cells": len(manifest["cells"]),
            "nodes_used": len({r["node"] for r in reports if "node" in r}) or None,
            "in_task_overhead_per_cell_s": round(sum(in_task) / len(in_task), 3) if in_task else None}


def warmup_config(config: Path, folder: Path) -> Path:
    """The grid's run settings on one cell (the first strategy, seed 0)."""
    text = config.read_text()
    data = tomllib.loads(text)
    grid = data.get("grid", {})
    first = (grid.get("strategies") or ["random"])[0]
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "strategies":
            line = f'strategies = ["{first}"]'
        elif key == "seeds":
            line = "seeds = [0]"
        elif key == "baseline":
            line = f'baseline = "{first}"'
        lines.append(line)
    path = folder / "warmup.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "quick.toml")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    # Two cores for everything this script starts (both sweeps, the cluster's nodes), so a
    # bigger machine compares the same 2 x 1 thread on both sides.
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    work = Path(tempfile.mkdtemp(prefix="qbudget-perf-ray-"))
    config = work / "grid.toml"
    config.write_text("workers = 2\n" + args.config.read_text())
    bench(warmup_config(config, work), work / "warmup")

    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    start_s = time.perf_counter() - t
    locals_, remotes = [], []
    try:
        for i in range(max(1, args.repeats)):
            locals_.append(bench(config, work / f"local{i}", "--executor", "local"))
            remotes.append(bench(config, work / f"ray{i}", "--executor", "ray", "--address",
                                 cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()
    local = min(locals_, key=lambda r: r["sweep_s"])
    remote = min(remotes, key=lambda r: r["sweep_s"])

    cells = local["cells"]
    overhead = (remote["sweep_s"] - local["sweep_s"]) / cells
    ratio = remote["sweep_s"] / local["sweep_s"]
    print(json.dumps({
        "benchmark": "perf_ray", "config": str(args.config), "cells": cells,
        "machine_cores": os.cpu_count(),
        "repeats": len(locals_),
        "local": {**local, "workers": 2, "threads_per_worker": 1,
                  "all_sweep_s": [r["sweep_s"] for r in locals_]},
        "ray": {**remote, "nodes": 2, "cpus_per_node": 1, "cluster_start_s": round(start_s, 2),
                "all_sweep_s": [r["sweep_s"] for r in remotes]},
        "load_average_1m": round(os.getloadavg()[0], 2),
        "overhead_per_cell_s": round(overhead, 2),
        "sweep_time_ratio": round(ratio, 3),
        "targets": {"overhead_per_cell_s": "<= 2", "sweep_time_ratio": "<= 1.10"},
        "meets_targets": bool(overhead <= 2.0 and ratio <= 1.10),
    }, indent=2))


if __name__ == "__main__":
    main()
