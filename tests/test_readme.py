"""The README shows what the code does.

* The plugin example, installed and run exactly as written: the module and the
  entry-point table are taken from the README's marked code blocks, laid out the way
  ``pip install -e .`` leaves a package (module + ``*.dist-info`` with ``entry_points.txt``),
  and exercised through the public CLI in a fresh process.
* The benchmark section (between ``<!-- bench:start -->`` and ``<!-- bench:end -->``) is
  what ``benchmarks/readme_bench.py`` renders from the sweep summary it keeps in
  ``docs/bench_summary.md``, and the script renders a sweep's summary table verbatim.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import importlib.util
import json
import math
import shutil
import tomllib
from pathlib import Path

import pytest

from qbudget.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_block(marker: str) -> tuple[str, str]:
    """The fenced code block that follows ``<!-- marker ... -->``: (marker args, code)."""
    m = re.search(rf"<!-- {re.escape(marker)}(.*?)-->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert m, f"README lost its {marker} block"
    return m.group(1).strip(), m.group(2)


def install_readme_plugin(site: Path) -> dict[str, str]:
    path, module = readme_block("plugin:module")
    target = site / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(module)
    _, toml_text = readme_block("plugin:entry-points")
    eps = tomllib.loads(toml_text)["project"]["entry-points"]["qbudget.strategies"]
    info = site / "readme_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: readme-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[qbudget.strategies]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return eps


@pytest.mark.slow
def test_readme_plugin_example_runs(tmp_path, micro_world):
    site = tmp_path / "site"
    eps = install_readme_plugin(site)
    assert list(eps) == ["shortest"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))

    def qbudget(*args):
        return subprocess.run([sys.executable, "-m", "qbudget", *args], env=env,
                              capture_output=True, text=True, timeout=600)

    listed = qbudget("strategies", "--plain")
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith("shortest\treadme-plugin\tlongest=False\t")
               for line in listed.stdout.splitlines()), listed.stdout

    config = tmp_path / "run.toml"
    config.write_text('world = "micro"\nseed = 3\n[strategy]\nname = "shortest"\n'
                      "[budget]\ntotal = 32\nround_size = 16\ncheckpoints = [16]\n"
                      "[distill]\nsteps_per_round = 2\nbatch_size = 8\n"
                      '[eval]\nadversaries = ["ngram"]\nceiling = false\n')
    out = tmp_path / "run"
    ran = qbudget("run", "--config", str(config), "--out", str(out), "--quiet")
    assert ran.returncode == 0, ran.stderr

    # what the README promises: the 32 shortest prompts of the pool were bought
    pool = micro_world.pool
    bought = {pid for pid, _ in Ledger(out / "ledger.sqlite", budget=32).bought()}
    lengths = sorted(len(p.text) for p in pool)
    assert len(bought) == 32
    assert max(len(p.text) for p in pool if p.id in bought) <= lengths[31]


# -- the benchmark section ------------------------------------------------------------------

def readme_bench():
    spec = importlib.util.spec_from_file_location("readme_bench", ROOT / "benchmarks" / "readme_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_bench_section_is_the_rendered_sweep_summary():
    rb = readme_bench()
    text = README.read_text()
    assert text.count(rb.START) == 1 and text.count(rb.END) == 1
    assert text.index(rb.START) < text.index(rb.END)
    stored = ROOT / "docs" / rb.SUMMARY_DOC
    assert stored.is_file(), "docs/bench_summary.md missing: run benchmarks/readme_bench.py OUT_DIR"
    # not typed by hand: the section is exactly what the script renders from the summary
    assert rb.current_section(text) == rb.bench_section(stored.read_text())
    figure = ROOT / "docs" / rb.FIGURE_DOC
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({'docs/' + rb.FIGURE_DOC})" in rb.current_section(text)


def test_readme_cost_aware_section_is_rendered_from_the_measured_sweep(tmp_path):
    """The cost-aware paragraph is what benchmarks/cost_aware.py renders from the JSON its
    sweep wrote (docs/cost_aware.json), and --check notices a hand edit."""
    script = [sys.executable, str(ROOT / "benchmarks" / "cost_aware.py"), "--check"]
    ok = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    report = json.loads((ROOT / "docs" / "cost_aware.json").read_text())
    assert set(report["strategies"]) == {"uncertainty", "cost_aware"}
    assert (ROOT / "docs" / "cost_aware_vs_usd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    edited = tmp_path / "README.md"
    head, rest = README.read_text().split("<!-- cost:start -->", 1)
    edited.write_text(head + "<!-- cost:start -->" + rest.replace(" bought ", " purchased ", 1))
    bad = subprocess.run([*script, "--readme", str(edited)], capture_output=True, text=True)
    assert bad.returncode == 1 and "differs" in bad.stderr


def small_results():
    """A sweep-shaped results table: 2 strategies x 3 seeds x 3 q values, max adversary."""
    import pandas as pd

    rows = []
    for s, floor in (("stratified", 0.2), ("random", 0.3)):
        for seed in (0, 1, 2):
            for q in (0, 16, 64):
                v = floor + 0.6 * math.exp(-q / 30) + 0.01 * seed
                rows.append(dict(run_id=f"w__{s}__seed{seed}", world="w", strategy=s, seed=seed,
                                 q=q, metric="advantage", adversary="max", category="all",
                                 value=v, ci_low=v - 0.05, ci_high=v + 0.05, n=200, paid=q))
    return pd.DataFrame(rows)


def test_readme_bench_script_writes_the_summary_table_into_the_readme(tmp_path):
    from qbudget.summary import render_markdown, summarize

    out = tmp_path / "sweep"
    out.mkdir()
    summary_md = render_markdown(summarize(small_results(), baseline="stratified", epsilon=0.3))
    (out / "summary.md").write_text(summary_md)
    shutil.copyfile(ROOT / "docs" / "bench_advantage_vs_q.png", out / "advantage_vs_q.png")
    (out / "manifest.json").write_text('{"cells": ["a", "b", "c", "d", "e", "f"], "seconds": 42.4}')
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\nbefore\n\n<!-- bench:start -->\nstale\n<!-- bench:end -->\n\nafter\n")
    docs = tmp_path / "docs"
    script = [sys.executable, str(ROOT / "benchmarks" / "readme_bench.py")]

    run = subprocess.run([*script, str(out), "--readme", str(readme), "--docs", str(docs)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text = readme.read_text()
    assert text.startswith("# t\n\nbefore\n\n<!-- bench:start -->") and text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "stale" not in text
    # the max-advantage table, every line of it, verbatim from the summary
    table = summary_md.split("### Max advantage", 1)[1].split("\n\n")[1]
    assert table.startswith("| strategy | q=0 | q=16 | q=64 | AUC | q at ε=0.3 |")
    assert table in text
    assert "- **random**: final advantage +" in text and "not distinguishable from baseline" in text
    assert "**With 3 seeds, no strategy is distinguishable from the baseline `stratified`**" in text
    assert "Sweep: 6 cells, 42 s wall time." in text
    assert (docs / "bench_advantage_vs_q.png").read_bytes() == (out / "advantage_vs_q.png").read_bytes()
    assert (docs / "bench_summary.md").read_text().endswith(summary_md)

    check = subprocess.run([*script, "--check", "--readme", str(readme), "--docs", str(docs)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    readme.write_text(text.replace("| random |", "| random (edited) |"))
    check = subprocess.run([*script, "--check", "--readme", str(readme), "--docs", str(docs)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "differs" in check.stderr
    again = subprocess.run([*script, str(out), "--readme", str(readme), "--docs", str(docs)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and readme.read_text() == text
