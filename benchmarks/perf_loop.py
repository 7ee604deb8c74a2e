"""Loop cost benchmark: linear cost in q, and the share of time outside model compute.

Peers: none; it runs qbudget alone, so the runtime (``make install``) is enough. ``make
perf`` runs it with the other scripts.

Runs ``qbudget run`` (random strategy) on one world to q=256, q=1024 and q=2048 with the
same schedule density (geometric checkpoints x4 from 16, rounds of 64 queries, the same
steps per round), each in a fresh process after a warm-up run has filled JAX's persistent
compile cache, and reads the stage timings each run writes into its manifest.

Targets (issue 4): wall(q=2048) / wall(q=256) <= 9; overhead (select + ledger +
bookkeeping, i.e. everything but oracle, distillation, signals and evaluation) <= 10% at
q=1024. Prints one JSON object.

    .venv/bin/python benchmarks/perf_loop.py [--world tiny-qwen2] [--probe-subset 500] [--from-json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
world = "{world}"
seed = 0
[strategy]
name = "random"
[budget]
total = {budget}
round_size = 64
first_checkpoint = 16
ratio = 4.0
[eval]
probe_subset = {probe_subset}
"""


def run_once(world: str, budget: int, probe_subset: int, workdir: Path) -> dict:
    cfg = workdir / f"q{budget}.toml"
    cfg.write_text(CONFIG.format(world=world, budget=budget, probe_subset=probe_subset))
    out = workdir / f"run-q{budget}"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qbudget", "run", "--config", str(cfg), "--out", str(out),
                    "--quiet"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    manifest = json.loads((out / "manifest.json").read_text())
    return with_overhead({"budget": budget, "process_wall_s": round(wall, 2),
                          "timings": {k: round(v, 3) for k, v in manifest["timings"].items()},
                          "q": manifest["q"], "paid": manifest["paid"],
                          "checkpoints": manifest["evaluated"]})


def with_overhead(run: dict) -> dict:
    """Loop time and the share outside model compute, from a run's stage timings.

    ``buy`` already contains ``oracle`` (the teacher's share of buying), so the loop's
    time is the sum of the stages other than ``oracle`` and ``setup``; model compute is
    oracle + distill + evaluate + signals; the rest (ledger, select, bookkeeping) is
    overhead.
    """
    t = run["timings"]
    loop_total = sum(v for k, v in t.items() if k not in ("oracle", "setup"))
    compute = t["oracle"] + t["distill"] + t["evaluate"] + t["signals"]
    run.update({"loop_s": round(loop_total, 2), "setup_s": round(t["setup"], 2),
                "overhead_fraction": round(max(0.0, loop_total - compute) / loop_total, 4)})
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="tiny-qwen2")
    ap.add_argument("--probe-subset", type=int, default=500)
    ap.add_argument("--from-json", type=Path, help="recompute the figures from a previous "
                    "run's JSON output (its raw stage timings) instead of running again")
    args = ap.parse_args()
    if args.from_json:
        runs = {r["budget"]: with_overhead(r) for r in json.loads(args.from_json.read_text())["runs"]}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            run_once(args.world, 64, args.probe_subset, work)  # warm-up: world build + compile cache
            runs = {b: run_once(args.world, b, args.probe_subset, work) for b in (256, 1024, 2048)}
    ratio = runs[2048]["loop_s"] / runs[256]["loop_s"]
    print(json.dumps({
        "world": args.world, "probe_subset": args.probe_subset,
        "runs": list(runs.values()),
        "linear_cost_ratio_2048_over_256": round(ratio, 2), "linear_cost_target": 9.0,
        "overhead_fraction_q1024": runs[1024]["overhead_fraction"], "overhead_target": 0.10,
    }, indent=2))


if __name__ == "__main__":
    main()
