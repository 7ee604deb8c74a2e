"""`qbudget run` end to end on the micro world: results, manifest, bad input, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import OracleSpy, ledger_oracle_fingerprint
from qbudget.cli import app

RESULT_COLUMNS = ["run_id", "world", "strategy", "seed", "q", "metric", "adversary", "category",
                  "value", "ci_low", "ci_high"]

# Small but complete: 3 rounds, checkpoints at 0/16/48, one adversary, full micro probe.
FAST_RUN = """
world = "micro"
seed = {seed}
[strategy]
name = "{strategy}"
[budget]
total = 48
round_size = 16
checkpoints = [16]
[distill]
steps_per_round = 4
batch_size = 8
[eval]
adversaries = ["ngram"]
ceiling = false
"""


def fast_config(tmp_path: Path, strategy: str = "random", seed: int = 0) -> Path:
    path = tmp_path / f"{strategy}-{seed}.toml"
    path.write_text(FAST_RUN.format(strategy=strategy, seed=seed))
    return path


def qbudget(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qbudget", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy())


def assert_oracle_paid_once(spy: OracleSpy, out: Path) -> tuple[set, list]:
    """Count at the teacher oracle (not in the ledger, whose keys forbid repeats anyway):
    every distinct pool prompt the run bought was answered exactly once, nothing else from
    the pool was answered, and each probe prompt once per sample. Returns (train ids, eval)."""
    from qbudget.worlds import get_world

    world = get_world("micro")
    pool_ids = {p.id for p in world.pool}
    calls = spy.calls()
    assert calls, "the oracle spy saw no answers"
    assert {c["oracle"] for c in calls} == {ledger_oracle_fingerprint(out / "ledger.sqlite")}
    train = [c["id"] for c in calls if c["id"] in pool_ids]
    evals = [(c["id"], c["sample"]) for c in calls if c["id"] not in pool_ids]
    twice = [k for k, n in Counter(train).items() if n > 1]
    assert not twice, f"oracle answered {len(twice)} bought prompts more than once: {twice[:5]}"
    bought = [pid for pid, _ in _bought(out)]
    assert len(train) == len(set(bought)) == len(bought)
    assert set(train) == set(bought)
    assert max(Counter(evals).values()) == 1, "a probe prompt was answered twice"
    assert {pid for pid, _ in evals} <= {p.id for p in world.probe}
    return set(train), evals


def _bought(out: Path) -> list[tuple[str, str]]:
    from qbudget.ledger import Ledger

    return Ledger(out / "ledger.sqlite", budget=48).bought()


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr if hasattr(result, "stderr") else result.output
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


# -- bad input: exit 2, one line, nothing written ------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--world", "micro", "--strategy", "nope", "--budget", "8"], "unknown strategy 'nope'"),
    (["--world", "atlantis", "--strategy", "random", "--budget", "8"], "atlantis"),
    (["--world", "micro", "--strategy", "random", "--budget", "999999"], "larger than the pool"),
    (["--world", "micro", "--strategy", "random"], "--budget"),
])
def test_bad_run_arguments_exit_2_and_write_nothing(micro_world, tmp_path, args, needle):
    out = tmp_path / "out"
    result = invoke("run", *args, "--out", str(out))
    assert_one_line_error(result, needle)
    assert not out.exists()


def test_malformed_toml_and_unknown_key(micro_world, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[budget\ntotal = 3\n")
    assert_one_line_error(invoke("run", "--config", str(bad), "--out", str(tmp_path / "o1")), "malformed TOML")
    typo = tmp_path / "typo.toml"
    typo.write_text("world = 'micro'\n[distill]\nstep_per_round = 3\n")
    assert_one_line_error(invoke("run", "--config", str(typo), "--out", str(tmp_path / "o2")),
                          "distill.step_per_round")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_non_empty_out_without_resume_is_refused(micro_world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = invoke("run", "--world", "micro", "--strategy", "random", "--budget", "8", "--out", str(out))
    assert_one_line_error(result, "not empty")
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    result = invoke("run", "--world", "micro", "--strategy", "random", "--budget", "8",
                    "--out", str(tmp_path / "fresh"), "--resume")
    assert_one_line_error(result, "no run to resume")


# -- a real run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(micro_world, tmp_path_factory):
    """An uninterrupted run of FAST_RUN (random strategy, seed 0), its teacher oracle spied on."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    spy = OracleSpy(tmp / "spy")
    proc = qbudget("run", "--config", str(fast_config(tmp)), "--out", str(out), "--quiet",
                   env=spy.env())
    assert proc.returncode == 0, proc.stderr
    return out, spy


@pytest.fixture(scope="module")
def reference_run(reference):
    return reference[0]


def test_run_pays_the_oracle_once_per_distinct_prompt(reference):
    out, spy = reference
    train, evals = assert_oracle_paid_once(spy, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(train) == 48 == manifest["q"] == manifest["paid"]
    # ceiling = false: the probe is answered once, sample 0 only
    assert len(evals) == len(micro_world_probe(out)) == manifest["eval_paid"]
    assert {sample for _, sample in evals} == {0}


def test_run_writes_schema_manifest_and_counts(reference_run):
    df = pd.read_parquet(reference_run / "results.parquet")
    assert list(df.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert sorted(df["q"].unique()) == [0, 16, 48]
    assert set(df["metric"]) >= {"advantage", "similarity"}
    adv = df[(df.metric == "advantage") & (df.category == "all")]
    assert set(adv["adversary"]) == {"ngram", "max"}
    assert ((adv.ci_low <= adv.value) & (adv.value <= adv.ci_high)).all()
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["q"] == 48 and manifest["paid"] == 48
    assert manifest["config"]["strategy"]["name"] == "random" and manifest["seed"] == 0
    assert "jax" in manifest["versions"] and manifest["git_revision"]
    assert manifest["eval_paid"] == len(micro_world_probe(reference_run))
    adapter = reference_run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def test_results_and_manifest_carry_the_spend_in_tokens_and_dollars(reference_run):
    """tokens / usd columns are monotone in q and equal the ledger's accounts; the manifest
    and the run's summary show the evaluation spend apart."""
    from qbudget.ledger import Ledger
    from qbudget.summary import render_markdown, summarize
    from qbudget.worlds import EMBEDDED_PRICE

    df = pd.read_parquet(reference_run / "results.parquet")
    per_q = df.groupby("q")[["tokens", "usd", "eval_usd", "paid", "eval_paid"]].agg(["min", "max"])
    for col in ("tokens", "usd", "eval_usd"):       # one value per checkpoint
        assert (per_q[(col, "min")] == per_q[(col, "max")]).all(), col
        assert per_q[(col, "min")].is_monotonic_increasing, col
    assert per_q.loc[0, ("tokens", "min")] == 0 and per_q.loc[48, ("tokens", "min")] > 48
    with Ledger(reference_run / "ledger.sqlite", budget=48) as ledger:
        spend = ledger.spend()
        records = ledger.purchase_records()
    assert ledger.price == EMBEDDED_PRICE
    last = df[df.q == 48].iloc[0]
    assert last["tokens"] == spend["train"]["tokens"] == sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in records)
    assert last["usd"] == pytest.approx(spend["train"]["usd"]) and last["usd"] > 0
    assert last["eval_usd"] == pytest.approx(spend["eval"]["usd"]) and last["eval_usd"] > 0
    assert {r["usage_source"] for r in records} == {"tokenizer"}   # the local teacher counts
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["spend"] == spend and manifest["stopped_by"] is None
    assert manifest["spend"]["eval"]["paid"] == manifest["eval_paid"]
    text = render_markdown(summarize(df, baseline="random"))
    assert "evaluation US$" in text and f"{spend['eval']['usd']:.4f}" in text


@pytest.mark.slow
def test_a_dollar_cap_stops_buying_and_the_run_evaluates_where_it_stopped(micro_world, tmp_path):
    cfg = fast_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("round_size = 16", "round_size = 16\nusd = 0.0003"))
    out = tmp_path / "run"
    result = invoke("run", "--config", str(cfg), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert "stopped by budget.usd" in result.output and "spend: train" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["q"]
    assert 16 < q < 48 and manifest["stopped_by"] == "budget.usd"
    assert manifest["spend"]["train"]["usd"] <= 0.0003 and manifest["evaluated"] == [0, 16, q]
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["q"].unique()) == [0, 16, q]


def micro_world_probe(run_dir: Path):
    from qbudget.worlds import get_world

    return get_world("micro").probe


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("kill point never reached")


def _state_round(out: Path) -> int:
    import pickle

    try:
        with (out / "state.pkl").open("rb") as fh:
            return pickle.load(fh).round
    except (OSError, EOFError, pickle.UnpicklingError):
        return -1


def _reserved(out: Path) -> int:
    """Budget reserved by unfinished purchases (read raw: opening a Ledger clears dead ones)."""
    import sqlite3

    con = sqlite3.connect(str(out / "ledger.sqlite"))
    try:
        return con.execute("SELECT COUNT(*) FROM purchases WHERE state='reserved'").fetchone()[0]
    finally:
        con.close()


def _ledger_q(out: Path) -> int:
    from qbudget.ledger import Ledger

    path = out / "ledger.sqlite"
    if not path.exists():
        return 0
    try:
        return len(Ledger(path, budget=48).bought())
    except Exception:  # noqa: BLE001 - a ledger being created concurrently
        return 0


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(reference_run, tmp_path):
    """SIGKILL at four points (set-up, mid-purchase, after a round's purchase, after a
    checkpoint), resume each time: the final results equal the uninterrupted run's and the
    teacher oracle answered each bought prompt exactly once over all the processes."""
    cfg = fast_config(tmp_path)
    out = tmp_path / "run"
    spy = OracleSpy(tmp_path / "spy")   # every process below answers through a spied oracle
    args = [sys.executable, "-m", "qbudget", "run", "--config", str(cfg), "--out", str(out), "--quiet"]
    kill_points = [
        lambda: (out / "manifest.json").exists(),           # during set-up
        "mid-purchase",     # the spy SIGKILLs the process as it starts buying pool answers
        lambda: _ledger_q(out) >= 32 and _state_round(out) < 2,  # purchase committed, round not saved
        lambda: _state_round(out) >= 2,                       # after a checkpoint round
    ]
    kills = 0
    for i, point in enumerate(kill_points):
        extra = ["--resume"] if i > 0 else []
        if point == "mid-purchase":
            # on entering its first oracle call for pool prompts: a purchase whose budget is
            # reserved and whose answers have not arrived
            proc = subprocess.run(args + extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env=spy.env(kill_at_call=1, kill_prefix="pool-"), timeout=900)
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
            assert _reserved(out) > 0      # killed holding a reservation: mid-purchase
            assert _ledger_q(out) < 48
            kills += 1
            continue
        proc = subprocess.Popen(args + extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=spy.env())
        kills += _kill_when(proc, point)
    final = qbudget("run", "--config", str(cfg), "--out", str(out), "--resume", "--quiet",
                    env=spy.env())
    assert final.returncode == 0, final.stderr
    assert kills >= 3
    assert len({c["pid"] for c in spy.calls()}) >= 2   # answers really came from several processes

    ref = pd.read_parquet(reference_run / "results.parquet")
    got = pd.read_parquet(out / "results.parquet")
    key = ["q", "metric", "adversary", "category"]
    ref, got = ref.sort_values(key).reset_index(drop=True), got.sort_values(key).reset_index(drop=True)
    assert len(ref) == len(got)
    assert (ref[key] == got[key]).all().all()
    np.testing.assert_array_equal(ref["value"].to_numpy(), got["value"].to_numpy())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["q"] == 48 and manifest["paid"] == 48  # every distinct prompt paid once
    # ...counted where the money goes: the oracle answered each bought prompt exactly once
    # across all five processes, and each probe prompt once
    train, evals = assert_oracle_paid_once(spy, out)
    assert len(train) == 48 and len(evals) == manifest["eval_paid"] == len(micro_world_probe(out))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["stratified", "diversity", "uncertainty", "disagreement",
                                      "adversary", "hybrid", "bandit", "cost_aware"])
def test_every_builtin_strategy_runs_end_to_end(micro_world, tmp_path, strategy):
    out = tmp_path / "run"
    result = invoke("run", "--config", str(fast_config(tmp_path, strategy)), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["q"] == 48 and manifest["status"] == "done"
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["q"].unique()) == [0, 16, 48] and set(df["strategy"]) == {strategy}
