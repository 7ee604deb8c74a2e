"""``qbudget record``: replay files from a teacher, resumable, secrets never written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from openai_stub_server import StubServer, answer_for
from qbudget.cli import app
from qbudget.oracles import ReplayOracle, load_replay, write_replay

KEY = "sk-record-SECRET-91bd77e2"


def invoke(*args):
    return CliRunner().invoke(app, ["record", *map(str, args)])


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "text": f"question {i}",
                                        "category": "ab"[i % 2]}) + "\n" for i in range(12)))
    return path


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.jsonl"
    write_replay(path, [{"id": f"p{i}", "prompt": f"question {i}", "response": f"answer {i}"}
                        for i in range(12)])
    return path


def test_record_from_replay_first_q_and_seeded_subset(tmp_path, pool, source):
    out = tmp_path / "out" / "first.jsonl"
    r = invoke("--pool", pool, "--budget", 4, "--out", out, "--replay", source)
    assert r.exit_code == 0, r.output
    assert "recorded 4 answers" in r.stdout
    assert [(pid, resp, s) for pid, _, resp, s in load_replay(out)] == \
        [(f"p{i}", f"answer {i}", 0) for i in range(4)]
    assert json.loads(out.read_text().splitlines()[1])["category"] == "b"

    subsets = []
    for seed, name in ((7, "a.parquet"), (7, "b.parquet"), (8, "c.parquet")):
        r = invoke("--pool", pool, "--budget", 5, "--out", tmp_path / name, "--replay", source,
                   "--sample-seed", seed)
        assert r.exit_code == 0, r.output
        subsets.append([row[0] for row in load_replay(tmp_path / name)])
    assert subsets[0] == subsets[1] != subsets[2] and len(set(subsets[0])) == 5
    assert subsets[0] != [f"p{i}" for i in range(5)]
    ReplayOracle(tmp_path / "a.parquet")   # a recording is itself a valid replay source


def test_http_record_resumes_without_paying_twice_and_never_writes_the_key(
        tmp_path, pool, monkeypatch):
    monkeypatch.setenv("QB_RECORD_KEY", KEY)
    out = tmp_path / "run" / "answers.jsonl"
    # p1 recovers within its retries; p6 exhausts them, failing the second chunk (p4-p7)
    scripts = {"question 6": [("status", 500)] * 3, "question 1": [("status", 503), "truncated"]}
    with StubServer(scripts, api_key=KEY) as srv:
        args = ["--pool", pool, "--budget", 10, "--out", out, "--endpoint", srv.url + "/v1",
                "--model", "teacher-x", "--api-key-env", "QB_RECORD_KEY", "--max-retries", 2,
                "--backoff", 0.001, "--timeout", 5, "--chunk", 4, "--concurrency", 2]
        first = invoke(*args)
        assert first.exit_code == 2
        assert first.stderr.count("\n") == 1 and first.stderr.startswith("error: ")
        assert "'p6'" in first.stderr and "status 500" in first.stderr
        assert not out.exists()                           # no half-written recording
        assert srv.successes["question 1"] == 1 and srv.attempts["question 1"] == 3
        second = invoke(*args)
        assert second.exit_code == 0, second.output
        assert "recorded 10 answers" in second.stdout
    rows = load_replay(out)
    assert [(pid, resp) for pid, _, resp, _ in rows] == \
        [(f"p{i}", answer_for(f"question {i}")) for i in range(10)]
    assert all(srv.successes[f"question {i}"] == 1 for i in range(10))   # each paid once
    assert sum(srv.successes.values()) == 10
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".ledger.sqlite") for p in written)
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    for result in (first, second):
        assert KEY not in result.output and KEY not in result.stderr


def test_resume_with_another_selection_is_refused(tmp_path, pool, source):
    out = tmp_path / "r.jsonl"
    assert invoke("--pool", pool, "--budget", 3, "--out", out, "--replay", source).exit_code == 0
    r = invoke("--pool", pool, "--budget", 3, "--out", out, "--replay", source,
               "--sample-seed", 1)
    assert r.exit_code == 2 and "outside this selection" in r.stderr


def _bad(tmp_path, kind):
    pool = tmp_path / "pool.jsonl"
    rows = [{"id": f"p{i}", "text": f"q{i}", "category": "c"} for i in range(3)]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = tmp_path / "src.jsonl"
    src.write_text('{"id": "p0", "prompt": "q0", "response": "a"}\n{"id": "p1", "prompt"\n')
    out = tmp_path / "out" / "rec.jsonl"
    base = ["--pool", pool, "--budget", 2, "--out", out]
    if kind == "malformed pool":
        pool.write_text('{"id": "p0", "text": "q0", "category": "c"}\n{oops\n')
        return base + ["--replay", src], r"pool.jsonl:2: malformed JSON"
    if kind == "duplicate pool ids":
        pool.write_text("".join(json.dumps({**r, "id": "same"}) + "\n" for r in rows))
        return base + ["--replay", src], r"duplicate prompt id 'same'"
    if kind == "budget over pool":
        return ["--pool", pool, "--budget", 9, "--out", out, "--replay", src], r"larger than the pool"
    if kind == "zero budget":
        return ["--pool", pool, "--budget", 0, "--out", out, "--replay", src], r"--budget must be at least 1"
    if kind == "malformed replay":
        return base + ["--replay", src], r"src.jsonl:2: malformed JSON"
    if kind == "no teacher":
        return base, r"give exactly one teacher"
    if kind == "two teachers":
        return base + ["--replay", src, "--teacher-dir", tmp_path], r"--teacher-dir and --replay"
    if kind == "bad suffix":
        return ["--pool", pool, "--budget", 2, "--out", tmp_path / "out" / "r.csv",
                "--replay", src], r"\.jsonl or \.parquet"
    if kind == "endpoint without model":
        return base + ["--endpoint", "http://127.0.0.1:9"], r"needs --model"
    if kind == "unset key variable":
        return base + ["--endpoint", "http://127.0.0.1:9", "--model", "m", "--api-key-env",
                       "QB_SURELY_UNSET_VAR"], r"QB_SURELY_UNSET_VAR"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["malformed pool", "duplicate pool ids", "budget over pool",
                                  "zero budget", "malformed replay", "no teacher", "two teachers", "bad suffix",
                                  "endpoint without model", "unset key variable"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, kind):
    import re

    args, match = _bad(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert re.search(match, r.stderr), r.stderr
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------- usage columns
def _usage_source(tmp_path):
    path = tmp_path / "usage-source.jsonl"
    rows = []
    for i in range(6):
        row = {"id": f"p{i}", "prompt": f"question {i}", "response": f"answer {i}",
               "prompt_tokens": 10 + i, "completion_tokens": 20 + i}
        if i % 2 == 0:
            row.update(usage_source="server", usd=0.001 * (i + 1))   # e.g. a priced batch
        rows.append(row)
    write_replay(path, rows)
    return path


def test_record_writes_each_answers_usage_and_cost_into_the_replay(tmp_path, pool):
    from qbudget.pool import Prompt

    source = _usage_source(tmp_path)
    out = tmp_path / "priced.jsonl"
    r = invoke("--pool", pool, "--budget", 4, "--out", out, "--replay", source,
               "--input-per-mtok", "1.5", "--output-per-mtok", "6")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["p0", "p1", "p2", "p3"]
    for i, row in enumerate(rows):
        assert (row["prompt_tokens"], row["completion_tokens"]) == (10 + i, 20 + i)
        assert row["usage_source"] == ("server" if i % 2 == 0 else "recorded")
        own = 0.001 * (i + 1) if i % 2 == 0 else ((10 + i) * 1.5 + (20 + i) * 6) / 1e6
        assert row["usd"] == pytest.approx(own, rel=1e-12)       # what the ledger charged
    total = sum(row["usd"] for row in rows)
    assert f"{sum(30 + 2 * i for i in range(4))} tokens, ${total:.6f}" in r.stdout
    # the recording replays with the same usage it was bought at
    asked = [Prompt(f"p{i}", f"question {i}", "ab"[i % 2]) for i in range(4)]
    replayed = ReplayOracle(out).answer_usage(asked)
    assert [(u.prompt_tokens, u.completion_tokens, u.source) for _, u in replayed] == \
        [(u.prompt_tokens, u.completion_tokens, u.source)
         for _, u in ReplayOracle(source).answer_usage(asked)]
    assert [u.usd for _, u in replayed] == [row["usd"] for row in rows]

    # no price: a zero is not a bill, so only answers with their own cost carry usd
    bare = tmp_path / "bare.jsonl"
    r = invoke("--pool", pool, "--budget", 4, "--out", bare, "--replay", source)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in bare.read_text().splitlines()]
    assert [row.get("usd") for row in rows] == [0.001, None, 0.003, None]
    assert all("prompt_tokens" in row for row in rows) and "$" not in r.stdout

    # resuming a priced recording at another price is refused, in one line
    r = invoke("--pool", pool, "--budget", 4, "--out", out, "--replay", source,
               "--input-per-mtok", "2", "--output-per-mtok", "6")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "price" in r.stderr


def test_http_record_writes_token_counts_marked_as_estimates(tmp_path, pool):
    out = tmp_path / "http.parquet"
    with StubServer() as srv:   # the stub sends no usage field: counts are estimated
        r = invoke("--pool", pool, "--budget", 3, "--out", out, "--endpoint", srv.url + "/v1",
                   "--model", "teacher-x", "--max-retries", 0, "--input-per-mtok", 1,
                   "--output-per-mtok", 4)
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    for i, row in enumerate(rows):
        pt = -(-len(f"question {i}") // 4)
        ct = -(-len(answer_for(f"question {i}")) // 4)
        assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == \
            (pt, ct, "estimate")
        assert row["usd"] == pytest.approx((pt * 1 + ct * 4) / 1e6)
    from qbudget.pool import Prompt

    ((_, usage),) = ReplayOracle(out).answer_usage([Prompt("p0", "question 0", "a")])
    assert usage.estimated and usage.usd == pytest.approx(rows[0]["usd"])


@pytest.mark.parametrize("args,match", [
    (["--input-per-mtok", "1"], r"--output-per-mtok is missing"),
    (["--input-per-mtok", "1", "--output-per-mtok", "-2"], r"--output-per-mtok must be a number >= 0"),
    (["--batch-discount", "0.5"], r"--batch-discount only applies to --batch-in"),
])
def test_bad_price_options_exit_2_naming_the_option(tmp_path, pool, source, args, match):
    import re

    out = tmp_path / "o" / "r.jsonl"
    r = invoke("--pool", pool, "--budget", 2, "--out", out, "--replay", source, *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and re.search(match, r.stderr), r.stderr
    assert not out.parent.exists()
