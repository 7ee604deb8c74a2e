"""Sequential ε-certification in the run loop, the ``mmd`` evaluation, through `qbudget run`.

End to end on the micro world (issue 21):

* a clearly distinguishable student (the micro world's base student) never certifies,
  and the run spends its whole budget; the ``mmd`` two-sample test rejects it;
* a run whose teacher *is* the student (a real-world TOML whose ``kind = "local"`` teacher
  is the micro world's student folder: identical answer distributions) certifies at its
  first checkpoint (q = 0) and buys nothing. Its probe has 400 adversary-test prompts, so
  ε = 0.3 is reachable: ``min_certifiable_epsilon(400)`` = 0.152 at the first checkpoint
  (the most favourable stream), and at true accuracy 1/2 the test certifies ε = 0.3 in
  ~99.8% of simulated streams, after ~125 items (median). With the world's 50 test
  prompts no test could certify ε = 0.1 (its floor there is 0.416);
* bad ``[certify]`` values fail before anything runs: exit 2 and one line naming the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qbudget.certify import min_certifiable_epsilon
from qbudget.cli import app
from qbudget.ledger import Ledger
from qbudget.pool import Prompt, save_prompts
from qbudget.results import read_results
from qbudget.sequential_eval import CHUNK_SIZE

#: the distinguishable run: the micro world, 2 rounds, checkpoints 0 / 16 / 32
DISTINGUISHABLE_RUN = """
world = "micro"
seed = 0
[strategy]
name = "random"
[budget]
total = 32
round_size = 16
checkpoints = [16]
[distill]
steps_per_round = 4
batch_size = 8
[eval]
adversaries = ["ngram", "mmd"]
ceiling = false
"""

#: ε of the identical-distributions run and its adversary-test size (see the module doc)
IDENTICAL_EPSILON = 0.3
N_TEST = 400


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output


def _rows(df, metric, adversary=None, category="all"):
    sel = (df.metric == metric) & (df.category == category)
    if adversary is not None:
        sel &= df.adversary == adversary
    return df[sel]


@pytest.mark.parametrize("toml, args, needle", [
    ("[certify]\nepsilon = 1.5\n", [], "certify.epsilon"),
    ("[certify]\nepsilon = 0\n", [], "certify.epsilon"),
    ('[certify]\nepsilon = "small"\n', [], "certify.epsilon"),
    ("[certify]\nepsilon = 0.3\nalpha = 0\n", [], "certify.alpha"),
    ("[certify]\nepsilon = 0.3\nalpha = 1.5\n", [], "certify.alpha"),
    ("[certify]\nepsilon = 0.3\nlevel = 0.1\n", [], "certify.level"),
    ("", ["--certify", "1.2"], "--certify"),
    ("", ["--certify", "0"], "--certify"),
    ('[eval]\nadversaries = ["mmd"]\n', ["--certify", "0.3"], "classifier adversary"),
    ("[eval]\ncrossfit = 5\n", ["--certify", "0.3"], "eval.crossfit"),
    ("[eval]\ncrossfit = 0\n", [], "eval.crossfit"),
    ("[eval.mmd]\nq = 5\n", [], "eval.mmd.q"),
    ("[eval.mmd]\nn_permutations = 0\n", [], "eval.mmd.n_permutations"),
])
def test_bad_certify_values_are_one_line_exit_2(tmp_path, toml, args, needle):
    cfg = tmp_path / "run.toml"
    cfg.write_text('world = "micro"\n[budget]\ntotal = 16\n' + toml)
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "o"),
                                   "--quiet", *args])
    one_line_error(res, needle)
    assert not (tmp_path / "o").exists()


def test_bad_certify_in_a_bench_config_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "bench.toml"
    cfg.write_text('[grid]\nworlds = ["micro"]\n[certify]\nepsilon = 2.0\n')
    res = CliRunner().invoke(app, ["bench", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    one_line_error(res, "certify.epsilon")


def test_bench_config_takes_a_top_level_certify_table(tmp_path):
    from qbudget.config import load_bench_config

    cfg = tmp_path / "bench.toml"
    cfg.write_text('[grid]\nworlds = ["micro"]\n[certify]\nepsilon = 0.2\nalpha = 0.1\n')
    bench = load_bench_config(cfg)
    assert all(c.certify.epsilon == 0.2 and c.certify.alpha == 0.1 for c in bench.cells())


@pytest.mark.slow
def test_distinguishable_student_never_certifies_and_spends_its_budget(tmp_path, micro_world):
    # 50 adversary-test prompts can certify ε = 0.5 at checkpoints 1 and 2 (floors 0.416,
    # 0.461), so "never certified" is the test's verdict, not an impossibility
    n_test = int((~micro_world.probe_is_train).sum())
    assert min_certifiable_epsilon(n_test, 0.05, checkpoint=1) < 0.5
    cfg = tmp_path / "run.toml"
    cfg.write_text(DISTINGUISHABLE_RUN)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--quiet",
                                   "--certify", "0.5"])
    assert res.exit_code == 0, res.output
    assert "not certified at epsilon=0.5" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["q"] == 32 == manifest["paid"]
    assert manifest["certify"] == {"epsilon": 0.5, "alpha": 0.05, "certified": False,
                                   "q_certified": None}
    df = read_results(out)
    assert set(df.q) == {0, 16, 32}
    assert _rows(df, "q_certified").empty
    joint = _rows(df, "certified", "max").set_index("q")["value"]
    assert joint.to_dict() == {0: 0.0, 16: 0.0, 32: 0.0}
    # the base student is told apart: the distinguishing bets decide before the stream ends
    v0 = _rows(df[df.q == 0], "certify_verdict", "max")
    assert v0["value"].item() == 2.0 and v0["n"].item() < n_test
    levels = _rows(df, "certify_level").set_index("q")["value"]
    assert levels.to_dict() == pytest.approx({0: 0.05 / 2, 16: 0.05 / 6, 32: 0.05 / 12})
    # evaluation buys the adversary-train answers and the test prompts the verdict read
    # (in chunks of CHUNK_SIZE, one order for the whole run, each bought once): at q = 0
    # the verdict fell within the first chunk, and no checkpoint bought the whole probe
    n_train = int(micro_world.probe_is_train.sum())
    read = _rows(df, "eval_test_items", "").set_index("q")["value"].astype(int)
    paid = df.groupby("q")["eval_paid"].max().astype(int)
    assert read[0] == min(math.ceil(v0["n"].item() / CHUNK_SIZE) * CHUNK_SIZE, n_test)
    assert paid[0] == n_train + read[0]
    assert paid.is_monotonic_increasing and paid[32] == n_train + read.max()

    # mmd: a p-value per checkpoint and category, next to ngram's; no advantage, not in max
    mmd = df[df.adversary == "mmd"]
    assert set(mmd.metric) >= {"p_value", "mmd_statistic", "adversary_q"}
    assert "advantage" not in set(mmd.metric)
    cats = set(df[(df.metric == "p_value") & (df.adversary == "ngram")].category)
    for q in (0, 16, 32):
        got = set(mmd[(mmd.q == q) & (mmd.metric == "p_value")].category)
        assert got == cats, (q, got, cats)
    # on the micro world's base student vs teacher it rejects
    assert _rows(df[df.q == 0], "p_value", "mmd")["value"].item() < 0.05
    maxa = _rows(df, "advantage", "max").set_index("q")["value"]
    assert maxa.equals(_rows(df, "advantage", "ngram").set_index("q")["value"])

    # the summary and the plot read certified runs: "not certified", and a figure
    from qbudget.plotting import plot_results
    from qbudget.summary import render_markdown, summarize

    s = summarize(df, baseline="random", n_resamples=200)
    assert s.certified and s.epsilon == 0.5
    md = render_markdown(s)
    assert "certified q at ε=0.5" in md and "not certified (0/1 seeds" in md
    assert plot_results(df, tmp_path / "fig.png").stat().st_size > 0


def _identical_world(tmp_path: Path, micro) -> Path:
    """A real world whose teacher is the student checkpoint itself, with 400 test prompts.

    The probe is the micro probe plus pool prompts the world's own pool does not use, each
    marked train (the first 100) or test, since the world's 50 test prompts cannot certify
    a useful ε.
    """
    extra = micro.pool[200:200 + (N_TEST + 100 - len(micro.probe))]
    probe = [Prompt(p.id, p.text, p.category, {"split": "train" if i < 100 else "test"})
             for i, p in enumerate(list(micro.probe) + list(extra))]
    assert sum(p.extra["split"] == "test" for p in probe) == N_TEST
    save_prompts(micro.pool[:200], tmp_path / "pool.jsonl")
    save_prompts(probe, tmp_path / "probe.jsonl")
    toml = tmp_path / "world.toml"
    toml.write_text(f'name = "selfie"\nstudent = "{micro.student_dir}"\npool = "pool.jsonl"\n'
                    'probe = "probe.jsonl"\nseed = 5\n'
                    "[sampling]\ntemperature = 0.8\ntop_p = 0.95\nmax_new_tokens = 16\n"
                    f'[teacher]\nkind = "local"\ndir = "{micro.student_dir}"\n')
    return toml


@pytest.mark.slow
def test_student_that_is_its_teacher_certifies_at_the_first_checkpoint(tmp_path, micro_world):
    assert min_certifiable_epsilon(N_TEST, 0.05, checkpoint=1) < IDENTICAL_EPSILON
    world = _identical_world(tmp_path, micro_world)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'world = "{world}"\nseed = 0\n[strategy]\nname = "stratified"\n'
                   "[budget]\ntotal = 32\nround_size = 16\ncheckpoints = [16]\n"
                   "[distill]\nsteps_per_round = 2\nbatch_size = 8\n"
                   '[eval]\nadversaries = ["ngram"]\nceiling = false\n'
                   f"[certify]\nepsilon = {IDENTICAL_EPSILON}\nalpha = 0.05\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"certified at q=0, epsilon={IDENTICAL_EPSILON:g}" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["q"] == 0 and manifest["paid"] == 0
    assert manifest["certify"]["certified"] and manifest["certify"]["q_certified"] == 0
    ledger = Ledger(out / "ledger.sqlite", budget=32)
    assert ledger.paid == 0                                           # stopped buying
    # and evaluation bought only the test prompts the verdict read (whole chunks)
    read = int(_rows(df := read_results(out), "eval_test_items", "")["value"].item())
    assert ledger.eval_paid == 100 + read < 100 + N_TEST
    df = read_results(out)
    assert set(df.q) == {0}
    assert _rows(df, "q_certified")["value"].tolist() == [0.0]
    assert _rows(df, "certified", "max")["value"].item() == 1.0
    items = _rows(df, "certify_items", "max")
    # the decision needed fewer adversary-test prompts than the probe has
    assert items["n"].item() == N_TEST and items["value"].item() < N_TEST
    assert _rows(df, "certify_epsilon")["value"].item() == IDENTICAL_EPSILON

    from qbudget.summary import render_markdown, summarize

    md = render_markdown(summarize(df, baseline="stratified", n_resamples=200))
    assert f"certified q at ε={IDENTICAL_EPSILON:g}" in md and "| 0 (1/1 seeds: 0) |" in md


def test_certification_streams_take_one_unit_per_prompt_in_one_shared_order():
    """The stream's items are adversary-test prompts: one shared random order, and for a
    single-answer adversary one of the prompt's two units by a shared fair coin."""
    import numpy as np

    from qbudget.evaluate import certification_streams

    n = 2000
    single = np.stack([np.ones(n, bool), np.zeros(n, bool)], axis=1)  # right on teacher only
    pair = (np.arange(n) % 3 == 0)[:, None]
    streams = certification_streams({"single": single, "pair": pair}, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    order, coin = rng.permutation(n), rng.integers(0, 2, size=n)
    assert streams["pair"].tolist() == pair[order, 0].astype(int).tolist()
    assert streams["single"].tolist() == (coin[order] == 0).astype(int).tolist()
    # accuracy 1/2 overall (advantage 0) although each unit type is deterministic
    assert abs(streams["single"].mean() - 0.5) < 0.05
