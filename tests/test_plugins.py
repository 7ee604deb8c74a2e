"""Third-party strategy plugins through the ``qbudget.strategies`` entry-point group.

Each test writes a tiny installed-looking package into ``tmp_path`` — a module plus a
``*.dist-info`` with ``METADATA`` and ``entry_points.txt`` — and puts that folder on the
path, exactly what ``pip install`` leaves behind for importlib.metadata to find.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from qbudget.cli import app
from qbudget.errors import QBudgetError
from qbudget.strategy import get_strategy, list_strategies

PLUGIN = '''
"""Demo plugin: the k lowest-numbered unbought prompts with an optional offset."""
import numpy as np
from qbudget.strategy import Strategy


def make(offset: int = 0):
    """Lowest-index unbought prompts (a demo third-party plugin)."""
    def init(ctx):
        return {"rounds": 0}

    def select(state, signals, ctx, k, key):
        free = ctx.unbought()[offset:]
        return free[:k].astype(np.int64), {"rounds": state["rounds"] + 1}

    return Strategy("lowest", make.__doc__, ("categories",), {"offset": offset}, init, select)
'''


def install_plugins(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "qb_demo_plugin.py").write_text(PLUGIN)
    (root / "qb_broken_plugin.py").write_text("import a_module_that_does_not_exist\n")
    for dist, eps in [("qb_demo_plugin", "lowest = qb_demo_plugin:make\n"),
                      ("qb_broken_plugin", "broken = qb_broken_plugin:make\n"
                                           "random = qb_demo_plugin:make\n")]:
        info = root / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[qbudget.strategies]\n" + eps)
    return root


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    root = install_plugins(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for mod in ("qb_demo_plugin", "qb_broken_plugin"):
        sys.modules.pop(mod, None)


def test_plugin_listed_and_usable(plugins):
    infos = {(i.name, i.package): i for i in list_strategies()}
    demo = infos[("lowest", "qb-demo-plugin")]
    assert demo.error is None and demo.params == {"offset": 0}
    assert demo.description.startswith("Lowest-index unbought prompts")
    broken = infos[("broken", "qb-broken-plugin")]
    assert "ModuleNotFoundError" in broken.error and "a_module_that_does_not_exist" in broken.error
    # a plugin re-registering a built-in name is reported; the built-in keeps the name
    assert "duplicate" in infos[("random", "qb-broken-plugin")].error
    assert infos[("random", "qbudget")].error is None
    assert get_strategy("random", {}).description == infos[("random", "qbudget")].description

    from test_strategies import synthetic_context

    strat = get_strategy("lowest", {"offset": 2})
    ctx = synthetic_context(n=30, n_bought=10)
    state = strat.init(ctx)
    picks, state = strat.select(state, {}, ctx, 4, jax.random.key(0))
    np.testing.assert_array_equal(picks, ctx.unbought()[2:6])
    assert state == {"rounds": 1} and strat.name == "lowest"


def test_broken_plugin_fails_by_name_only_when_used(plugins):
    with pytest.raises(QBudgetError, match=r"strategy 'broken' \(qb-broken-plugin\) failed to load"):
        get_strategy("broken", {})
    with pytest.raises(QBudgetError, match="no parameter 'nope'"):
        get_strategy("lowest", {"nope": 1})


def test_cli_lists_plugins_and_broken_ones(plugins):
    res = CliRunner().invoke(app, ["strategies", "--plain"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(l.startswith("lowest\tqb-demo-plugin\toffset=0\t") for l in lines)
    assert any(l.startswith("BROKEN broken\tqb-broken-plugin\t") for l in lines)
    assert any(l.startswith("diversity\tqbudget\t") for l in lines)
    table = CliRunner().invoke(app, ["strategies"])
    assert table.exit_code == 0 and "lowest" in table.output and "broken plugin" in table.output


def test_qbudget_strategies_subprocess_sees_plugin_on_pythonpath(tmp_path):
    root = install_plugins(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    exe = Path(sys.executable).with_name("qbudget")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qbudget.cli"]
    out = subprocess.run(cmd + ["strategies", "--plain"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "lowest\tqb-demo-plugin" in out.stdout and "BROKEN broken" in out.stdout
    assert "random\tqbudget" in out.stdout
    bad = subprocess.run(cmd + ["run", "--world", "micro", "--strategy", "nope", "--budget", "5",
                                "--out", str(tmp_path / "r")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "unknown strategy 'nope'" in bad.stderr and "lowest" in bad.stderr
