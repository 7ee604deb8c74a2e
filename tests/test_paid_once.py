"""Teacher answers are paid once per distinct prompt, counted at the oracle itself.

The ledger's tables cannot show a double payment (their primary keys make a second row for
a prompt impossible), so these tests count what the real teacher oracle answered, through
the spy in conftest.py (the oracle classes' ``answer`` wrapped to log every prompt; in a
sweep, in every spawned worker too). Single runs, with and without kills, are covered in
test_run_cli.py and test_realworld.py; here: a bench sweep whose cells share one response
cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import OracleSpy, ledger_oracle_fingerprint
from qbudget.ledger import Ledger
from qbudget.pool import save_prompts

POOL, PROBE = 40, 60          # a pool small enough that the cells' purchases must overlap
BUDGET = 24

GRID = """
workers = {workers}
[grid]
worlds = ["{world}"]
strategies = ["random", "stratified"]
seeds = [0, 1]
baseline = "stratified"
[run.budget]
total = {budget}
round_size = 12
checkpoints = [12]
[run.distill]
steps_per_round = 2
batch_size = 8
[run.eval]
adversaries = ["ngram"]
ceiling = false
"""


def small_world(folder: Path, micro) -> Path:
    """A real-world TOML over micro's teacher and student with a 40-prompt pool."""
    folder.mkdir(parents=True, exist_ok=True)
    save_prompts(micro.pool[:POOL], folder / "pool.jsonl")
    save_prompts(micro.probe[:PROBE], folder / "probe.jsonl")
    toml = folder / "small.toml"
    toml.write_text(f'name = "small"\nstudent = "{micro.student_dir}"\npool = "pool.jsonl"\n'
                    'probe = "probe.jsonl"\nseed = 5\n'
                    "[sampling]\ntemperature = 0.8\ntop_p = 0.95\nmax_new_tokens = 16\n"
                    f'[teacher]\nkind = "local"\ndir = "{micro.teacher_dir}"\n')
    return toml


def run_bench(tmp_path: Path, micro, workers: int) -> tuple[Path, OracleSpy]:
    world = small_world(tmp_path / "world", micro)
    cfg = tmp_path / "grid.toml"
    # The world by its absolute path (the sweep names its files after the TOML's stem).
    cfg.write_text(GRID.format(workers=workers, world=world, budget=BUDGET))
    out = tmp_path / "sweep"
    spy = OracleSpy(tmp_path / "spy")
    proc = subprocess.run([sys.executable, "-m", "qbudget", "bench", str(cfg), "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=1800,
                          env=spy.env(), cwd=world.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, spy


def check_sweep_paid_once(out: Path, spy: OracleSpy, micro) -> None:
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == 4
    ledgers = [Ledger(c / "ledger.sqlite", budget=BUDGET) for c in cells]
    bought = [[pid for pid, _ in led.bought()] for led in ledgers]
    assert [len(b) for b in bought] == [BUDGET] * 4
    distinct = set().union(*map(set, bought))
    # the grid really re-buys prompts: 4 x 24 purchases from a pool of 40
    assert sum(map(len, bought)) > len(distinct)

    calls = spy.calls()
    assert len({c["pid"] for c in calls}) >= 1 and calls
    assert {c["oracle"] for c in calls} == {ledger_oracle_fingerprint(c / "ledger.sqlite")
                                            for c in cells}           # one teacher throughout
    pool_ids = {p.id for p in micro.pool[:POOL]}
    probe_ids = {p.id for p in micro.probe[:PROBE]}
    train = Counter(c["id"] for c in calls if c["id"] in pool_ids)
    evals = Counter((c["id"], c["sample"]) for c in calls if c["id"] in probe_ids)
    assert sum(train.values()) + sum(evals.values()) == len(calls)
    twice = sorted(k for k, n in train.items() if n > 1)
    assert not twice, f"the oracle answered {len(twice)} training prompts more than once: {twice}"
    assert set(train) == distinct              # ...and every prompt some cell bought, once
    # what the cells' ledgers call paid adds up to what the oracle actually answered
    assert sum(led.paid for led in ledgers) == len(distinct)
    # the probe is answered once for the whole sweep (ceiling = false: sample 0 only)
    assert evals == Counter({(pid, 0): 1 for pid in probe_ids})
    for led in ledgers:
        led.close()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and len(manifest["cells"]) == 4


@pytest.mark.slow
def test_sweep_cells_sharing_the_cache_pay_each_prompt_once(micro_world, tmp_path):
    """Cells one after another (one worker): later cells find earlier cells' answers in the
    sweep's response cache and the oracle is never asked twice for a prompt."""
    out, spy = run_bench(tmp_path, micro_world, workers=1)
    check_sweep_paid_once(out, spy, micro_world)


@pytest.mark.slow
def test_concurrent_sweep_cells_pay_each_prompt_once(micro_world, tmp_path):
    """Two workers: cells run side by side and may pick the same prompt at the same time
    (what `qbudget bench` does by default: workers = 0 means one per core)."""
    out, spy = run_bench(tmp_path, micro_world, workers=2)
    check_sweep_paid_once(out, spy, micro_world)
