"""The pipeline's seams: one evaluation path, one encoder per process, one evaluation config.

- ``qbudget eval --world`` and the run loop evaluate through the same
  :func:`qbudget.evaluate.evaluate_student`, so the base student's rows from ``qbudget
  eval --world micro --config RUN.toml`` equal that run's q = 0 rows;
- a diversity run (its ``embeddings`` signal) and the run's evaluation share one
  MiniLM: the encoder is constructed once in the process;
- a run TOML's ``[eval]`` table sets the whole evaluation config (alpha, the adversaries'
  q and t bounds), and bad values there are one-line errors naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from qbudget.cli import app

RUN = """
world = "micro"
seed = 3
[strategy]
name = "{strategy}"
[budget]
total = 16
round_size = 16
[distill]
steps_per_round = 2
batch_size = 8
[eval]
probe_subset = 120
adversaries = ["ngram", "embed"]
ceiling = {ceiling}
alpha = {alpha}
[eval.ngram]
q = {ngram_q}
t = 40
"""

KEY = ["metric", "adversary", "category"]
VALUES = ["value", "ci_low", "ci_high", "n"]


def write_run(tmp_path: Path, strategy: str = "random", ceiling: str = "true",
              alpha: float = 0.1, ngram_q: int = 60) -> Path:
    path = tmp_path / f"{strategy}.toml"
    path.write_text(RUN.format(strategy=strategy, ceiling=ceiling, alpha=alpha, ngram_q=ngram_q))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_eval_world_gives_the_runs_q0_rows(micro_world, tmp_path):
    cfg = write_run(tmp_path)
    ran = invoke("run", "--config", cfg, "--out", tmp_path / "run", "--quiet")
    assert ran.exit_code == 0, ran.output
    run_rows = pd.read_parquet(tmp_path / "run" / "results.parquet")
    q0 = run_rows[run_rows.q == 0][KEY + VALUES].sort_values(KEY).reset_index(drop=True)

    ev = invoke("eval", "--config", cfg, "--json")
    assert ev.exit_code == 0, ev.output
    rows = pd.DataFrame(json.loads(ev.output.strip().splitlines()[-1]))
    rows = rows[KEY + VALUES].sort_values(KEY).reset_index(drop=True)
    assert len(q0) > 20 and set(q0.metric) >= {"advantage", "similarity", "similarity_ceiling"}
    pd.testing.assert_frame_equal(q0[KEY], rows[KEY])
    np.testing.assert_allclose(q0[VALUES].to_numpy(float), rows[VALUES].fillna(np.nan)
                               .to_numpy(float), rtol=0, atol=0, equal_nan=True)
    # the run's [eval] table reached both: alpha 0.1 and the ngram adversary's bounds
    def value(metric, adversary="ngram"):
        (v,) = rows[(rows.metric == metric) & (rows.adversary == adversary)].value
        return v

    assert value("adversary_q") == 60 and value("adversary_t") == 40

    # a different seed samples other student answers: the equality above is not vacuous
    other = invoke("eval", "--config", cfg, "--json", "--seed", "4")
    other_rows = pd.DataFrame(json.loads(other.output.strip().splitlines()[-1]))
    sim = other_rows[(other_rows.metric == "similarity") & (other_rows.category == "all")]
    base = rows[(rows.metric == "similarity") & (rows.category == "all")]
    assert float(sim.value.iloc[0]) != float(base.value.iloc[0])


@pytest.mark.slow
def test_alpha_from_the_run_toml_widens_the_intervals(micro_world, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    narrow = invoke("eval", "--config", write_run(tmp_path / "a", alpha=0.2), "--json", "--no-ceiling")
    wide = invoke("eval", "--config", write_run(tmp_path / "b", alpha=0.01), "--json", "--no-ceiling")
    assert narrow.exit_code == 0 and wide.exit_code == 0, (narrow.output, wide.output)

    def width(res):
        rows = json.loads(res.output.strip().splitlines()[-1])
        (r,) = [r for r in rows if r["metric"] == "advantage" and r["adversary"] == "ngram"
                and r["category"] == "all"]
        return r["ci_high"] - r["ci_low"]

    assert width(wide) > width(narrow)


@pytest.mark.slow
def test_one_encoder_per_process_across_a_diversity_run_and_its_evaluation(micro_world, tmp_path,
                                                                             monkeypatch):
    from qbudget.config import load_run_config
    from qbudget.loop import Run
    from qbudget.models import encoder as encoder_mod

    built = []
    original = encoder_mod.SentenceEncoder.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        built.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(encoder_mod.SentenceEncoder, "from_pretrained", classmethod(counting))
    encoder_mod._shared.cache_clear()
    # the pool embeddings must be computed in this run, not read from an earlier test's cache
    for f in (Path(micro_world.root) / "embeddings").glob("*.npy"):
        f.unlink()
    cfg = load_run_config(write_run(tmp_path, strategy="diversity"))
    outcome = Run(cfg, tmp_path / "run").execute()
    assert outcome.q == 16
    assert list((Path(micro_world.root) / "embeddings").glob("*.npy")), "embeddings not computed"
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert {"similarity", "advantage"} <= set(df.metric) and set(df.q) == {0, 16}
    assert len(built) == 1, f"the encoder was constructed {len(built)} times"


@pytest.mark.parametrize("table, needle", [
    ("[eval]\nalpha = 1.5\n", "eval.alpha"),
    ("[eval.ngram]\nq = 0\n", "eval.ngram.q"),
    ("[eval.embed]\nt = 0\n", "eval.embed.t"),
    ("[eval.pairwise]\nhiden = 3\n", "eval.pairwise.hiden"),
    ("[eval]\nadversaries = [\"gpt\"]\n", "eval.adversaries"),
])
def test_bad_eval_table_is_a_one_line_error_naming_the_key(tmp_path, table, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('world = "micro"\n[budget]\ntotal = 8\n' + table)
    out = tmp_path / "out"
    res = invoke("run", "--config", cfg, "--out", out)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output
    assert not out.exists()


def test_library_distill_defaults_are_the_validated_bench_settings():
    """`qbudget run` without --config distils as `make bench` does (benchmarks/default.toml)."""
    from qbudget.config import DistillConfig, load_bench_config

    bench = load_bench_config(Path(__file__).resolve().parents[1] / "benchmarks" / "default.toml")
    d, b = DistillConfig(), bench.run.distill
    assert (d.learning_rate, d.steps_per_round, d.batch_size, d.targets, d.rank, d.alpha) == \
        (b.learning_rate, b.steps_per_round, b.batch_size, b.targets, b.rank, b.alpha)


@pytest.mark.slow
def test_bandit_is_rewarded_through_the_loops_adapter_history(micro_world, tmp_path):
    """The loop keeps round starts and adapter snapshots for the bandit's evidence signal:
    three rounds in, round 0's arm is credited with the held-out loss drop on round 1's batch."""
    import pickle

    cfg = tmp_path / "bandit.toml"
    cfg.write_text(RUN.format(strategy="bandit", ceiling="false", alpha=0.05, ngram_q=60)
                   .replace("total = 16", "total = 48\ncheckpoints = [48]")
                   .replace('name = "bandit"', 'name = "bandit"\nparams = {arms = "random,stratified"}'))
    ran = invoke("run", "--config", cfg, "--out", tmp_path / "run", "--quiet")
    assert ran.exit_code == 0, ran.output
    with (tmp_path / "run" / "state.pkl").open("rb") as fh:
        state = pickle.load(fh)
    assert state.round == 3 and state.round_q == [0, 16, 32]
    assert sorted(state.adapter_history) == [0, 1, 2]
    (reward,) = state.strategy_state["rewards"]
    assert reward["round"] == 0 and reward["arm"] in ("random", "stratified")
    assert np.isfinite(reward["drop"]) and 0.0 <= reward["reward"] <= 1.0
