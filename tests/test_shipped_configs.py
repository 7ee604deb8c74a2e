"""The shipped sweep configs (benchmarks/*.toml) load and are what the README says they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qbudget.config import load_bench_config

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# What README.md ("What `make bench` shows" and the paragraph after it) states about each
# shipped config (the 800 / 200 split: curve.toml's own comment; quick's 6 cells:
# docs/performance.md). These numbers mirror the README: whoever retunes a config updates
# the README and this table together (the last test checks the documented cell counts).
README_SAYS = {
    "default.toml": dict(
        worlds=["tiny-qwen2"],
        strategies=["random", "stratified", "disagreement", "diversity"],
        seeds=8, cells=32,                         # "8 seeds", "32 cells"
        baseline="stratified",
        total=1024, round_size=128,                # "q up to 1,024 in rounds of 128"
        schedule=[0, 1024],                        # "evaluated at q = 0 and 1,024"
        lora_rank=8, learning_rate=3e-4, steps_per_round=48,
        targets={"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        adversaries=["ngram", "embed", "pairwise"],
        probe=5000, probe_subset=0, crossfit=5,    # "the full probe", "5-fold cross-fitted"
    ),
    "curve.toml": dict(
        worlds=["tiny-qwen2"],
        strategies=["random", "stratified", "disagreement", "diversity"],
        seeds=3, cells=12,                         # "12 cells": 1 world x 4 strategies x 3 seeds
        baseline="stratified",
        total=1024, round_size=128,
        schedule=[0, 64, 256, 1024],               # "evaluated at q = 0, 64, 256, 1,024"
        lora_rank=8, learning_rate=3e-4, steps_per_round=48,
        targets={"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        adversaries=["ngram", "embed", "pairwise"],
        probe=5000, probe_subset=1000, probe_train=800, probe_test=200, crossfit=1,
    ),
    "quick.toml": dict(
        worlds=["micro"],
        strategies=["random", "stratified", "diversity"],
        seeds=2, cells=6,                          # "6 cells"
        baseline="stratified",
        total=64, schedule=[0, 16, 64],
        probe=250, probe_subset=0,
    ),
    "study.toml": dict(
        worlds=["tiny-qwen2", "tiny-llama"],       # "both tiny worlds"
        strategies="all built-ins",                # "all eight built-in strategies"
        n_strategies=8,
        seeds=12, cells=192,                       # "192 cells" = 2 worlds x 8 strategies x 12
        baseline="stratified",
        total=4000,                                # "q up to 4,000"
        schedule=[0, 250, 1000, 4000],
        probe=5000, probe_subset=0, crossfit=5,    # "the full probe", "cross-fitted"
    ),
}


def _builtin_strategies() -> set[str]:
    from qbudget.strategy import list_strategies

    # cost_aware wraps another strategy (it re-ranks its scores by cost): not one of the
    # study's acquisition strategies
    return {s.name for s in list_strategies()
            if s.package == "qbudget" and s.error is None and s.name != "cost_aware"}


def _world_rows() -> dict[str, dict]:
    from qbudget.worlds import list_worlds

    return {r["name"]: r for r in list_worlds()}


@pytest.mark.parametrize("name", sorted(README_SAYS))
def test_shipped_config_loads_with_the_stated_grid(name):
    want = README_SAYS[name]
    cfg = load_bench_config(BENCHMARKS / name)
    cells = cfg.cells()
    strategies = (sorted(_builtin_strategies()) if want["strategies"] == "all built-ins"
                  else want["strategies"])
    assert list(cfg.grid.worlds) == want["worlds"]
    if want["strategies"] == "all built-ins":
        assert sorted(cfg.grid.strategies) == strategies and len(strategies) == want["n_strategies"]
    else:
        assert list(cfg.grid.strategies) == strategies
    assert len(cfg.grid.seeds) == want["seeds"] == len(set(cfg.grid.seeds))
    assert len(cells) == want["cells"] == len(want["worlds"]) * len(strategies) * want["seeds"]
    # every cell is distinct and the baseline is one of the compared strategies
    assert len({(c.world, c.strategy.name, c.seed) for c in cells}) == want["cells"]
    assert cfg.grid.baseline == want["baseline"] and want["baseline"] in cfg.grid.strategies
    assert {c.budget.total for c in cells} == {want["total"]}


@pytest.mark.parametrize("name", sorted(README_SAYS))
def test_every_strategy_is_registered_and_every_world_exists(name):
    from qbudget.strategy import get_strategy

    cfg = load_bench_config(BENCHMARKS / name)
    worlds = _world_rows()
    for world in cfg.grid.worlds:
        assert world in worlds, f"{name}: unknown world {world!r}"
    for cell in cfg.cells():      # with the config's own [strategy_params], as bench builds them
        strat = get_strategy(cell.strategy.name, dict(cell.strategy.params))
        assert strat.name == cell.strategy.name
    from qbudget.sweep import validate

    validate(cfg)                 # what `qbudget bench` checks before any cell starts


@pytest.mark.parametrize("name", sorted(README_SAYS))
def test_budget_schedule_and_probe_as_stated(name):
    want = README_SAYS[name]
    cfg = load_bench_config(BENCHMARKS / name)
    rows = _world_rows()
    for world in cfg.grid.worlds:
        assert rows[world]["probe"] == want["probe"]
        schedule = cfg.run.schedule(rows[world]["pool"])
        assert schedule[0] == 0 and schedule[-1] == want["total"]
        if "schedule" in want:
            assert schedule == want["schedule"]
    assert cfg.run.eval.probe_subset == want["probe_subset"]
    assert cfg.run.eval.crossfit == want.get("crossfit", 1)
    if "round_size" in want:
        assert cfg.run.budget.round_size == want["round_size"]
    if "adversaries" in want:
        assert list(cfg.run.eval.adversaries) == want["adversaries"]
    if "lora_rank" in want:
        d = cfg.run.distill
        assert (d.rank, d.learning_rate, d.steps_per_round) == (
            want["lora_rank"], want["learning_rate"], want["steps_per_round"])
        assert set(d.targets) == want["targets"]


def test_curve_probe_subset_splits_800_200():
    """The 1,000-prompt subset keeps the probe's train/test shares: 800 / 200 prompts."""
    from qbudget.pool import stratified_subset
    from qbudget.worlds.prompts import generate_pool_and_probe, to_prompts
    from qbudget.worlds.specs import get_spec

    want = README_SAYS["curve.toml"]
    cfg = load_bench_config(BENCHMARKS / "curve.toml")
    (world,) = cfg.grid.worlds
    spec = get_spec(world)
    _, probe_tasks, is_train = generate_pool_and_probe(spec)   # what the world build writes
    probe = to_prompts(probe_tasks, "probe", is_train)
    assert len(probe) == want["probe"]
    subset = stratified_subset(probe, is_train, cfg.run.eval.probe_subset, spec.seed)
    assert len(subset) == want["probe_subset"]
    assert int(is_train[subset].sum()) == want["probe_train"]
    assert len(subset) - int(is_train[subset].sum()) == want["probe_test"]


def test_readme_states_these_cell_counts():
    """The documentation (README.md and docs/*.md) names each config and its cell count."""
    docs = "\n".join(p.read_text(encoding="utf-8")
                     for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    for name, want in README_SAYS.items():
        assert f"benchmarks/{name}" in docs, name
        assert re.search(rf"\b{want['cells']} cells\b", docs), (name, want["cells"])
