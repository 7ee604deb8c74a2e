"""Real worlds: a user's own checkpoints, prompts and teacher, described in one TOML.

The micro world's teacher and student folders are real HF checkpoints (config.json,
safetensors, tokenizer), so they stand in for "my own models on disk" here; the pool and
probe are re-written as the user's JSONL files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ledger_oracle_fingerprint
from qbudget.cli import app
from qbudget.ledger import Ledger
from qbudget.pool import save_prompts
from qbudget.results import read_results


def write_world(tmp_path: Path, micro, teacher: str, *, pool=None, extra: str = "") -> Path:
    save_prompts(micro.pool[:200] if pool is None else pool, tmp_path / "pool.jsonl")
    save_prompts(micro.probe[:100], tmp_path / "probe.jsonl")
    toml = tmp_path / "world.toml"
    toml.write_text(f'name = "mine"\nstudent = "{micro.student_dir}"\npool = "pool.jsonl"\n'
                    f'probe = "probe.jsonl"\nseed = 5\n{extra}\n'
                    "[sampling]\ntemperature = 0.8\ntop_p = 0.95\nmax_new_tokens = 16\n"
                    f"[teacher]\n{teacher}\n")
    return toml


RUN = """
world = "{world}"
seed = 0
[strategy]
name = "stratified"
[budget]
total = 32
round_size = 16
checkpoints = [32]
[distill]
steps_per_round = 2
batch_size = 8
[eval]
adversaries = ["ngram"]
ceiling = false
"""


def assert_paid_once(spy, run_dir, pool, probe) -> None:
    """Counted at the (spied, real) teacher oracle: each prompt the run bought was answered
    exactly once, no other pool prompt was answered, each probe prompt once per sample."""
    calls = spy.calls()
    assert {c["oracle"] for c in calls} == {ledger_oracle_fingerprint(run_dir / "ledger.sqlite")}
    pool_ids, probe_ids = {p.id for p in pool}, {p.id for p in probe}
    train = [c["id"] for c in calls if c["id"] in pool_ids]
    evals = [(c["id"], c["sample"]) for c in calls if c["id"] in probe_ids]
    assert len(train) + len(evals) == len(calls)
    bought = [pid for pid, _ in Ledger(run_dir / "ledger.sqlite", budget=32).bought()]
    assert sorted(train) == sorted(bought) and len(set(bought)) == len(bought) == 32
    assert sorted(evals) == sorted({(p.id, 0) for p in probe})     # ceiling = false


def one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output


@pytest.mark.slow
def test_run_and_eval_on_a_real_world_toml(tmp_path, micro_world, oracle_spy, monkeypatch):
    world = write_world(tmp_path, micro_world, f'kind = "local"\ndir = "{micro_world.teacher_dir}"')
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.format(world=world))
    out = tmp_path / "run"
    oracle_spy.install(monkeypatch)
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    df = read_results(out)
    assert set(df.q) == {0, 32} and set(df.world) == {"mine"}   # the TOML's name
    assert Ledger(out / "ledger.sqlite", budget=32).paid == 32
    assert {c["name"] for c in oracle_spy.calls()} == {"local:teacher"}
    assert_paid_once(oracle_spy, out, micro_world.pool[:200], micro_world.probe[:100])
    # the distilled adapter evaluates through `qbudget eval --world <toml>`
    ev = CliRunner().invoke(app, ["eval", "--world", str(world), "--adapter", str(out / "adapter"),
                                  "--adversaries", "ngram", "--json"])
    assert ev.exit_code == 0, ev.output
    rows = json.loads(ev.output)
    assert {r["metric"] for r in rows} >= {"advantage", "similarity"}


@pytest.mark.slow
def test_replay_teacher_answers_only_what_it_recorded(tmp_path, micro_world, oracle_spy,
                                                     monkeypatch):
    replay = tmp_path / "answers.jsonl"
    pool = micro_world.pool[:40]
    with replay.open("w") as f:
        for p in list(pool) + list(micro_world.probe[:100]):
            f.write(json.dumps({"id": p.id, "prompt": p.text, "response": f"recorded {p.id}"}) + "\n")
    world = write_world(tmp_path, micro_world, f'kind = "replay"\npath = "{replay}"', pool=pool)
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.format(world=world))
    oracle_spy.install(monkeypatch)
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "run"),
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    answers = [a for _, a in Ledger(tmp_path / "run" / "ledger.sqlite", budget=32).bought()]
    assert len(answers) == 32 and all(a.startswith("recorded ") for a in answers)
    assert {c["name"] for c in oracle_spy.calls()} == {"replay:answers.jsonl"}
    assert_paid_once(oracle_spy, tmp_path / "run", pool, micro_world.probe[:100])


@pytest.mark.parametrize("teacher, extra, needle", [
    ('kind = "smoke-signals"', "", "teacher.kind must be one of"),
    ('kind = "local"\ndir = "/nowhere/at/all"', "", "/nowhere/at/all"),
    ('kind = "local"\ndir = "."', 'colour = "blue"', "unknown key 'colour'"),
])
def test_bad_world_toml_is_one_line_exit_2(tmp_path, micro_world, teacher, extra, needle):
    world = write_world(tmp_path, micro_world, teacher, extra=extra)
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.format(world=world))
    out = tmp_path / "run"
    one_line_error(CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(out)]), needle)
    assert not out.exists()


def test_probe_overlapping_the_pool_is_refused(tmp_path, micro_world):
    world = write_world(tmp_path, micro_world, 'kind = "local"\ndir = "."',
                        pool=list(micro_world.pool[:50]) + list(micro_world.probe[:3]))
    one_line_error(CliRunner().invoke(app, ["eval", "--world", str(world), "--adversaries", "ngram"]),
                   "also appear in the pool")
