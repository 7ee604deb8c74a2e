"""Experiment TOML validation: typed objects, errors that name the key, the schedule."""

import dataclasses

import pytest

from qbudget.config import (BenchConfig, BudgetConfig, RunConfig, checkpoint_schedule,
                            load_bench_config, load_run_config)
from qbudget.errors import QBudgetError


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_run_config_from_toml_and_overrides(tmp_path):
    p = write(tmp_path, """
world = "micro"
seed = 3
[strategy]
name = "diversity"
[strategy.params]
candidates = 100
[budget]
total = 64
round_size = 16
[distill]
steps_per_round = 5
""")
    cfg = load_run_config(p)
    assert cfg.world == "micro" and cfg.seed == 3
    assert cfg.strategy.name == "diversity" and cfg.strategy.params == {"candidates": 100}
    assert cfg.budget.total == 64 and cfg.distill.steps_per_round == 5
    over = load_run_config(p, budget=32, seed=1, strategy="random")
    assert over.budget.total == 32 and over.seed == 1
    assert over.strategy.name == "random" and over.strategy.params == {}


@pytest.mark.parametrize("text, needle", [
    ("[budget]\ntotal = 'many'\n", "budget.total"),
    ("[budget]\ntotal = -4\n", "budget.total"),
    ("[distill]\nlearning_rat = 0.1\n", "distill.learning_rat"),
    ("wrld = 'micro'\n", "wrld"),
    ("[eval]\nadversaries = []\n", "eval.adversaries"),
    ("[budget\ntotal = 3\n", "malformed TOML"),
])
def test_bad_run_configs_name_the_key(tmp_path, text, needle):
    with pytest.raises(QBudgetError) as err:
        load_run_config(write(tmp_path, text))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(QBudgetError, match="not found"):
        load_run_config(tmp_path / "nope.toml")


def test_geometric_schedule_includes_zero_and_total():
    assert checkpoint_schedule(BudgetConfig(total=1024, first_checkpoint=16, ratio=4)) == [0, 16, 64, 256, 1024]
    assert checkpoint_schedule(BudgetConfig(total=100, first_checkpoint=16, ratio=2)) == [0, 16, 32, 64, 100]
    assert checkpoint_schedule(BudgetConfig(total=50, checkpoints=(10, 20))) == [0, 10, 20, 50]
    assert checkpoint_schedule(BudgetConfig(total=0)) == [0]


def test_bench_grid_cells_and_empty_grid(tmp_path):
    p = write(tmp_path, """
[grid]
worlds = ["micro"]
strategies = ["random", "stratified"]
seeds = [0, 1, 2]
[run.budget]
total = 32
[strategy_params.stratified]
allocation = "equal"
""")
    cfg = load_bench_config(p)
    cells = cfg.cells()
    assert len(cells) == 6 and {c.seed for c in cells} == {0, 1, 2}
    # worlds x strategies x seeds, in that nesting order
    assert [(c.world, c.strategy.name, c.seed) for c in cells] == [
        ("micro", s, seed) for s in ("random", "stratified") for seed in (0, 1, 2)]
    strat = [c for c in cells if c.strategy.name == "stratified"][0]
    assert strat.strategy.params == {"allocation": "equal"} and strat.budget.total == 32
    with pytest.raises(QBudgetError, match="grid.strategies"):
        load_bench_config(write(tmp_path, "[grid]\nstrategies = []\n", "e.toml"))


def test_bench_defaults_are_a_two_by_two_micro_grid_of_default_runs(tmp_path):
    default = BenchConfig()
    assert default.grid.baseline == "stratified" and default.grid.epsilon == 0.0
    assert default.workers == 0 and default.strategy_params == {}
    cells = default.cells()
    assert [(c.world, c.strategy.name, c.seed) for c in cells] == [
        ("micro", "random", 0), ("micro", "random", 1),
        ("micro", "stratified", 0), ("micro", "stratified", 1)]
    assert all(c.strategy.params == {} for c in cells)
    # apart from world, strategy and seed, every cell is the default run
    run = RunConfig()
    for c in cells:
        assert dataclasses.replace(c, world=run.world, strategy=run.strategy, seed=run.seed) == run
    assert run.budget.total == 256 and run.schedule(1_000) == [0, 16, 64, 256]
    # an empty bench TOML means exactly these defaults
    assert load_bench_config(write(tmp_path, "", "empty.toml")) == default
