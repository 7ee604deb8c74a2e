"""The README's plugin example, installed and run exactly as written.

The module and the entry-point table are taken from the README's marked code blocks,
laid out the way ``pip install -e .`` leaves a package (module + ``*.dist-info`` with
``entry_points.txt``), and exercised through the public CLI in a fresh process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qbudget.ledger import Ledger

README = Path(__file__).resolve().parents[1] / "README.md"


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
