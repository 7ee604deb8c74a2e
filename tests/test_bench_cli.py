"""`qbudget bench` end to end on the micro world: grid, summary, plots, resume, bad configs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from qbudget.cli import app

# The shape of benchmarks/quick.toml, smaller: 2 strategies x 2 seeds, q up to 32.
SMALL_GRID = """
workers = 2
[grid]
worlds = ["micro"]
strategies = ["random", "stratified"]
seeds = [0, 1]
baseline = "stratified"
epsilon = 0.5
[run.budget]
total = 32
round_size = 16
checkpoints = [16]
[run.distill]
steps_per_round = 4
batch_size = 8
[run.eval]
adversaries = ["ngram"]
ceiling = true
"""
VALUE_KEY = ["run_id", "world", "strategy", "seed", "q", "metric", "adversary", "category"]


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def bench_args(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qbudget", "bench", str(cfg), "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-cfg") / "small.toml"
    path.write_text(SMALL_GRID)
    return path


@pytest.fixture(scope="module")
def sweep(micro_world, small_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    proc = subprocess.run(bench_args(small_cfg, out), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_bench_writes_results_summary_and_plots(sweep):
    out, stdout = sweep
    df = pd.read_parquet(out / "results.parquet")
    # 2 strategies x 2 seeds x 3 checkpoints, every cell with the same metric rows
    assert df.groupby(["strategy", "seed"]).ngroups == 4
    assert sorted(df["q"].unique()) == [0, 16, 32]
    per_cell = df.groupby(["strategy", "seed"]).size()
    assert per_cell.nunique() == 1
    per_q = df.groupby(["strategy", "seed", "q"]).size()
    assert per_q.nunique() == 1 and len(per_q) == 12
    summary = (out / "summary.md").read_text()
    for name in ("random", "stratified"):
        assert name in summary
    assert "paired" in summary.lower()
    png = (out / "advantage_vs_q.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    svg = out / "advantage_vs_q.svg"
    assert ElementTree.parse(svg).getroot().tag.endswith("svg") and svg.stat().st_size > 10_000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and len(manifest["cells"]) == 4
    assert "peak memory" in stdout and "wall" in stdout


@pytest.mark.slow
def test_q0_rows_are_shared_across_strategies_and_match_a_standalone_run(sweep, tmp_path):
    out, _ = sweep
    df = pd.read_parquet(out / "results.parquet")
    base = df[df.q == 0].sort_values(["seed", "metric", "adversary", "category", "strategy"])
    # each seed's q = 0 evaluation was computed once and shared by both strategies
    assert len(list((out / "shared").glob("q0-*.pkl"))) == 2
    for _, g in base.groupby(["seed", "metric", "adversary", "category"]):
        assert g["value"].nunique(dropna=False) == 1 and len(g) == 2
    # ...and equals what a run on its own (nothing shared) measures
    manifest = json.loads((out / "cells" / "micro__stratified__seed1" / "manifest.json").read_text())
    from qbudget.config import RunConfig, from_dict
    from qbudget.loop import Run

    alone = tmp_path / "alone"
    Run(from_dict(RunConfig, manifest["config"]), alone).execute()
    mine = pd.read_parquet(alone / "results.parquet")
    key = ["metric", "adversary", "category"]
    got = mine[mine.q == 0].sort_values(key).reset_index(drop=True)
    ref = base[(base.seed == 1) & (base.strategy == "stratified")].sort_values(key).reset_index(drop=True)
    assert (got[key] == ref[key]).all().all()
    # equal up to float reassociation: the sweep's workers run XLA on 1 thread each, this
    # process on all cores, which changes reduction order in similarity means (~1e-8)
    np.testing.assert_allclose(got["value"].to_numpy(), ref["value"].to_numpy(), rtol=1e-6,
                               atol=1e-9)


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_cells(sweep, small_cfg, tmp_path):
    ref_out, _ = sweep
    out = tmp_path / "out"
    proc = subprocess.Popen(bench_args(small_cfg, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    done_cells: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        done_cells = [m.parent for m in (out / "cells").glob("*/manifest.json")
                      if json.loads(m.read_text() or "{}").get("status") == "done"]
        if done_cells:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "sweep finished before it could be killed"
    workers = children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(proc.pid, signal.SIGKILL)          # the bench alone, as `kill -9 PID` does
    proc.wait()
    gone_by = time.monotonic() + 30            # its workers notice and stop on their own
    while time.monotonic() < gone_by and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    os.killpg(proc.pid, signal.SIGKILL)        # clean-up only; the assertion is about `left`
    assert not left, f"workers outlived the killed bench: {left}"
    finished = {c.name: (c / "results.parquet").stat().st_mtime_ns for c in done_cells}

    again = subprocess.run(bench_args(small_cfg, out), capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    for name, mtime in finished.items():  # finished cells were skipped, not re-run
        assert (out / "cells" / name / "results.parquet").stat().st_mtime_ns == mtime
    ref = pd.read_parquet(ref_out / "results.parquet").sort_values(VALUE_KEY).reset_index(drop=True)
    got = pd.read_parquet(out / "results.parquet").sort_values(VALUE_KEY).reset_index(drop=True)
    assert (ref[VALUE_KEY] == got[VALUE_KEY]).all().all()
    np.testing.assert_array_equal(ref["value"].to_numpy(), got["value"].to_numpy())


@pytest.mark.parametrize("body, needle", [
    ('[grid]\nworlds = ["micro"]\nstrategies = ["random", "nope"]\n', "unknown strategy 'nope'"),
    ('[grid]\nworlds = ["micro"]\nstrategies = []\n', "empty grid"),
    ('[grid]\nworlds = ["atlantis"]\n', "unknown world 'atlantis'"),
    ('[run.budget]\ntotal = -5\n', "run.budget.total"),
    ('[grid\n', "malformed TOML"),
])
def test_bad_bench_configs_exit_2(tmp_path, body, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", str(cfg), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not out.exists()


# One cell, one round: enough for the plain progress lines of a sweep nobody watches.
ONE_CELL = """
workers = 1
[grid]
worlds = ["micro"]
strategies = ["random"]
seeds = [0]
baseline = "random"
[run.budget]
total = 16
round_size = 16
checkpoints = [16]
[run.distill]
steps_per_round = 2
batch_size = 8
[run.eval]
adversaries = ["ngram"]
ceiling = false
"""


@pytest.mark.slow
def test_bench_prints_plain_progress_lines_when_stdout_is_not_a_terminal(micro_world, tmp_path):
    cfg = tmp_path / "one.toml"
    cfg.write_text(ONE_CELL)
    out = tmp_path / "out"
    # stdout is a pipe, not a TTY (as in `make bench > log`), and no --quiet
    proc = subprocess.run([sys.executable, "-m", "qbudget", "bench", str(cfg), "--out", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    stamp = r"^\[\s*\d+(m\d\ds|s)\] "
    tail = r" \| cells \d+/1 done \| ETA (–|~\S+|0s)$"
    cell = "micro__random__seed0"
    assert any(re.match(stamp + r"bench: 1 cells \(0 already done\)", x) for x in lines), proc.stdout
    progress = [x for x in lines if re.match(stamp + re.escape(cell) + r" q=\d+/16.*" + tail, x)]
    assert progress, proc.stdout
    done = [x for x in lines if re.match(stamp + "done " + re.escape(cell) + r" \(q=16.*" + tail, x)]
    assert len(done) == 1 and "cells 1/1 done" in done[0], proc.stdout
    assert "\x1b[" not in proc.stdout          # plain text, no terminal control codes
    assert re.search(r"^bench done: 1 cells .* -> .*out$", proc.stdout, re.M), proc.stdout
