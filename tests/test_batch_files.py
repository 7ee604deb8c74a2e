"""OpenAI Batch API files: ``qbudget record --batch-out`` / ``--batch-in`` (qbudget.batchfiles).

The request bodies are compared with what HttpOracle really POSTs (to the loopback stub
server), and ingested results are read back through ReplayOracle.answer_usage.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from openai_stub_server import StubServer, answer_for
from qbudget.cli import app
from qbudget.oracles import ReplayOracle, load_replay
from qbudget.oracles.usage import Usage
from qbudget.pool import load_prompts, save_prompts

IN_PRICE, OUT_PRICE = 2.5, 10.0          # US$ per million tokens
MODEL = "teacher-batch"


def invoke(*args):
    return CliRunner().invoke(app, ["record", *map(str, args)])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The micro world's pool, written as its build writes it (no models needed)."""
    from qbudget.worlds.prompts import generate_pool_and_probe, to_prompts
    from qbudget.worlds.specs import get_spec

    tasks, _, _ = generate_pool_and_probe(get_spec("micro"))
    path = tmp_path_factory.mktemp("micro") / "pool.jsonl"
    save_prompts(to_prompts(tasks, "pool"), path)
    return path


def requests_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def usage_for(text: str, answer: str) -> tuple[int, int]:
    """Token counts a server might bill (distinct from the bytes/4 estimate)."""
    return 7 + len(text.split()) * 2, 3 + len(answer) // 3


def result_line(request: dict, content: str | None = None, *, status: int = 200,
                error: dict | None = None, usage: bool = True) -> dict:
    """An OpenAI Batch API output line answering ``request`` (a --batch-out line)."""
    body = request["body"]
    text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    content = answer_for(text) if content is None else content
    if error is not None:
        return {"id": "batch_req_x", "custom_id": request["custom_id"], "response": None,
                "error": error}
    if status != 200:
        return {"id": "batch_req_x", "custom_id": request["custom_id"], "error": None,
                "response": {"status_code": status, "request_id": "req_x",
                             "body": {"error": {"message": "server\ntrouble", "code": None}}}}
    choice = ({"message": {"role": "assistant", "content": content}} if "messages" in body
              else {"text": content})
    data = {"id": "chatcmpl-x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, **choice, "finish_reason": "stop"}]}
    if usage:
        pt, ct = usage_for(text, content)
        data["usage"] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    return {"id": "batch_req_x", "custom_id": request["custom_id"], "error": None,
            "response": {"status_code": 200, "request_id": "req_x", "body": data}}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def settings(api="chat"):
    return ["--model", MODEL, "--api", api, "--temperature", 0.7, "--top-p", 0.9,
            "--max-tokens", 40, "--seed", 11]


# ------------------------------------------------------------------------ --batch-out
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_batch_out_bodies_are_what_http_oracle_posts(tmp_path, pool, api):
    requests = tmp_path / "req" / "requests.jsonl"
    with StubServer() as srv:
        r = invoke("--pool", pool, "--budget", 6, "--sample-seed", 3, "--batch-out", requests,
                   "--endpoint", srv.url + "/v1", *settings(api))
        assert r.exit_code == 0, r.output
        assert "wrote 6 batch requests" in r.stdout and "nothing was paid" in r.stdout
        assert srv.bodies == []                                  # nothing sent
        paid = tmp_path / "paid.jsonl"
        r = invoke("--pool", pool, "--budget", 6, "--sample-seed", 3, "--out", paid,
                   "--endpoint", srv.url + "/v1", *settings(api))
        assert r.exit_code == 0, r.output
    lines = requests_of(requests)
    # same selection as a paying record, in the same order
    assert [line["custom_id"] for line in lines] == [row[0] for row in load_replay(paid)]
    url = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    assert {line["url"] for line in lines} == {url} and set(srv.paths) == {url}
    assert {line["method"] for line in lines} == {"POST"}
    assert set(lines[0]) == {"custom_id", "method", "url", "body"}
    posted = sorted(srv.bodies, key=lambda b: json.dumps(b, sort_keys=True))
    assert sorted((line["body"] for line in lines),
                  key=lambda b: json.dumps(b, sort_keys=True)) == posted
    body = lines[0]["body"]
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["n"]) \
        == (MODEL, 0.7, 0.9, 40, 1)
    assert isinstance(body["seed"], int)
    assert ("messages" in body) == (api == "chat") and ("prompt" in body) == (api != "chat")
    assert [p.name for p in requests.parent.iterdir()] == ["requests.jsonl"]   # no temp file


def test_batch_out_without_endpoint_names_no_server_and_pays_nothing(tmp_path, pool):
    requests = tmp_path / "requests.jsonl"
    r = invoke("--pool", pool, "--budget", 4, "--batch-out", requests, "--model", MODEL)
    assert r.exit_code == 0, r.output
    prompts = load_prompts(pool)[:4]
    lines = requests_of(requests)
    assert [line["custom_id"] for line in lines] == [p.id for p in prompts]
    assert [line["body"]["messages"] for line in lines] == \
        [[{"role": "user", "content": p.text}] for p in prompts]
    assert "seed" not in lines[0]["body"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.jsonl"]   # no ledger


# ------------------------------------------------------------------------ --batch-in
@pytest.fixture
def batch(tmp_path, pool):
    """Requests for 10 prompts and a finished output file for them, with problems."""
    requests = tmp_path / "requests.jsonl"
    r = invoke("--pool", pool, "--budget", 10, "--batch-out", requests, *settings())
    assert r.exit_code == 0, r.output
    reqs = requests_of(requests)
    text = {q["custom_id"]: q["body"]["messages"][-1]["content"] for q in reqs}
    lines = [result_line(q) for q in reqs]
    ids = [q["custom_id"] for q in reqs]
    lines[2] = result_line(reqs[2], "<|im_start|>assistant\nok<|im_end|>")      # special tokens
    lines[4] = result_line(reqs[4], f"Sure. {text[ids[4]]} The answer is 4.")  # echo
    lines[5] = result_line(reqs[5], error={"code": "batch_expired",
                                           "message": "This request could not be executed"})
    lines[7] = result_line(reqs[7], status=500)
    lines.reverse()                                    # a batch answers in any order
    return {"requests": requests, "reqs": reqs, "ids": ids, "text": text,
            "results": write_lines(tmp_path / "results.jsonl", lines)}


@pytest.mark.parametrize("out,discount", [("replay.jsonl", None), ("replay.parquet", "0.25")])
def test_batch_in_replays_the_server_usage_at_the_discounted_price(tmp_path, pool, batch, out,
                                                                   discount):
    extra = ["--batch-discount", discount] if discount is not None else []
    r = invoke("--pool", pool, "--batch-in", batch["results"], "--out", tmp_path / out,
               "--model", MODEL, "--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE,
               *extra)
    assert r.exit_code == 0, r.output
    ids, text = batch["ids"], batch["text"]
    kept = [i for k, i in enumerate(ids) if k not in (2, 4, 5, 7)]
    factor = 0.5 if discount is None else 0.75
    assert f"recorded {len(kept)} answers" in r.stdout and f"{1 - factor:.0%} batch discount" \
        in r.stdout and "4 not recorded" in r.stdout
    # every left-out answer is reported, by reason, with its id
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings)
    assert "2 failed in the batch" in warnings[0] and ids[5] in warnings[0] \
        and "batch_expired" in warnings[0] and ids[7] in warnings[0] \
        and "status 500: server trouble" in warnings[0]
    assert "2 refused by the answer checks" in warnings[1]
    assert re.search(rf"{ids[2]} \(carries special tokens <\|im_start\|> <\|im_end\|>\)",
                     warnings[1]), warnings[1]
    assert f"{ids[4]} (echoes the prompt)" in warnings[1]

    rows = load_replay(tmp_path / out)
    assert [row[0] for row in rows] == kept                      # pool order, failures out
    oracle = ReplayOracle(tmp_path / out)
    prompts = {p.id: p for p in load_prompts(pool)}
    got = oracle.answer_usage([prompts[i] for i in kept])
    total = 0.0
    for pid, (answer, usage) in zip(kept, got):
        assert answer == answer_for(text[pid])
        pt, ct = usage_for(text[pid], answer)
        usd = (pt * IN_PRICE + ct * OUT_PRICE) / 1e6 * factor
        assert isinstance(usage, Usage) and not usage.estimated
        assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (pt, ct, "server")
        assert usage.usd == pytest.approx(usd, rel=1e-12)
        assert oracle.worst_case(prompts[pid]) == usage          # a replay knows its costs
        total += usd
    assert f"${total:.6f}" in r.stdout
    with pytest.raises(Exception, match=f"'{ids[2]}' is not recorded"):
        oracle.answer([prompts[ids[2]]])


def test_batch_in_checks_against_the_selection_and_reports_missing(tmp_path, pool, batch):
    # the same selection as --batch-out: every result is inside it; a missing line is reported
    lines = batch["results"].read_text().splitlines()
    gone = json.loads(lines[0])["custom_id"]
    write_lines(batch["results"], lines[1:])
    r = invoke("--pool", pool, "--budget", 10, "--batch-in", batch["results"],
               "--out", tmp_path / "r.jsonl", "--model", MODEL,
               "--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE)
    assert r.exit_code == 0, r.output
    assert f"1 selected prompts have no result line: {gone}" in r.stderr
    # a smaller selection: a result outside it is refused, naming the line
    r = invoke("--pool", pool, "--budget", 3, "--batch-in", batch["results"],
               "--out", tmp_path / "s.jsonl", "--model", MODEL,
               "--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert re.search(r"results\.jsonl:\d+: custom_id '.*' is outside the selection", r.stderr)
    assert not (tmp_path / "s.jsonl").exists()


def test_batch_in_takes_the_error_file_too_and_estimates_missing_usage(tmp_path, pool, batch):
    reqs = batch["reqs"]
    out_file = write_lines(tmp_path / "out.jsonl", [result_line(reqs[0], usage=False),
                                                    result_line(reqs[1])])
    err_file = write_lines(tmp_path / "err.jsonl", [result_line(reqs[2], status=400)])
    r = invoke("--pool", pool, "--batch-in", out_file, "--batch-in", err_file,
               "--out", tmp_path / "r.jsonl", "--model", MODEL, "--batch-discount", "0",
               "--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE)
    assert r.exit_code == 0, r.output
    assert "1 failed in the batch" in r.stderr and f"{reqs[2]['custom_id']} (status 400" \
        in r.stderr
    rows = {json.loads(line)["id"]: json.loads(line)
            for line in (tmp_path / "r.jsonl").read_text().splitlines()}
    assert set(rows) == {reqs[0]["custom_id"], reqs[1]["custom_id"]}
    no_usage = rows[reqs[0]["custom_id"]]
    assert no_usage["usage_source"] == "estimate"                # never passed off as a bill
    assert no_usage["usd"] == pytest.approx((no_usage["prompt_tokens"] * IN_PRICE
                                             + no_usage["completion_tokens"] * OUT_PRICE) / 1e6)
    assert rows[reqs[1]["custom_id"]]["usage_source"] == "server"


def test_batch_in_with_no_usable_answer_fails_and_writes_nothing(tmp_path, pool, batch):
    reqs = batch["reqs"]
    write_lines(batch["results"], [result_line(reqs[0], status=500),
                                   result_line(reqs[1], f"<|user|>{batch['text'][reqs[1]['custom_id']]}")])
    r = invoke("--pool", pool, "--batch-in", batch["results"], "--out", tmp_path / "r.jsonl",
               "--model", MODEL, "--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "no usable answers" in r.stderr and "1 failed" in r.stderr and "1 refused" in r.stderr
    assert not (tmp_path / "r.jsonl").exists()


# ------------------------------------------------------------------------ bad input
def _bad_results(batch, kind):
    reqs = batch["reqs"]
    good = [json.dumps(result_line(q)) for q in reqs[:3]]
    if kind == "malformed JSON":
        return [good[0], '{"custom_id": "pool-00001", "response": ', good[2]], r":2: malformed JSON"
    if kind == "not an object":
        return [good[0], "[1, 2]"], r":2: expected a JSON object"
    if kind == "no custom_id":
        line = result_line(reqs[1])
        del line["custom_id"]
        return [good[0], json.dumps(line)], r":2: missing field 'custom_id'"
    if kind == "unknown custom_id":
        line = {**result_line(reqs[1]), "custom_id": "not-in-pool"}
        return [good[0], good[2], json.dumps(line)], \
            r":3: custom_id 'not-in-pool' is not a prompt of the pool"
    if kind == "duplicate custom_id":
        return [good[0], good[1], good[0]], \
            rf":3: duplicate custom_id '{reqs[0]['custom_id']}' \(first at .*results\.jsonl:1\)"
    if kind == "bad status":
        line = result_line(reqs[1])
        line["response"]["status_code"] = "200"
        return [json.dumps(line)], r":1: field 'response.status_code' must be an integer"
    if kind == "neither response nor error":
        return [json.dumps({"custom_id": reqs[0]["custom_id"], "response": None,
                            "error": None})], r":1: neither 'response' nor 'error'"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["malformed JSON", "not an object", "no custom_id",
                                  "unknown custom_id", "duplicate custom_id", "bad status",
                                  "neither response nor error"])
def test_bad_result_lines_exit_2_naming_the_line(tmp_path, pool, batch, kind):
    lines, match = _bad_results(batch, kind)
    write_lines(batch["results"], lines)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = invoke("--pool", pool, "--batch-in", batch["results"], "--out", tmp_path / "r.jsonl",
               "--model", MODEL, "--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert re.search(r"results\.jsonl" + match, r.stderr), r.stderr
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_duplicate_across_output_and_error_files_names_the_line(tmp_path, pool, batch):
    q = batch["reqs"][0]
    a = write_lines(tmp_path / "a.jsonl", [result_line(q)])
    b = write_lines(tmp_path / "b.jsonl", [result_line(batch["reqs"][1]),
                                           result_line(q, status=500)])
    r = invoke("--pool", pool, "--batch-in", a, "--batch-in", b, "--out", tmp_path / "r.jsonl",
               "--model", MODEL, "--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert re.search(r"b\.jsonl:2: duplicate custom_id .*\(first at .*a\.jsonl:1\)", r.stderr)


PRICED = ["--input-per-mtok", IN_PRICE, "--output-per-mtok", OUT_PRICE]


@pytest.mark.parametrize("args,match", [
    (["--input-per-mtok", "abc", "--output-per-mtok", 1], r"--input-per-mtok must be a number >= 0, got 'abc'"),
    (["--input-per-mtok", "-1", "--output-per-mtok", 1], r"--input-per-mtok must be a number >= 0"),
    (["--input-per-mtok", 1, "--output-per-mtok", "nan"], r"--output-per-mtok must be a number >= 0"),
    (["--input-per-mtok", 1, "--output-per-mtok", "inf"], r"--output-per-mtok must be a number >= 0"),
    (["--input-per-mtok", 1], r"--output-per-mtok is missing"),
    ([], r"--batch-in needs the list price: --input-per-mtok and --output-per-mtok"),
    (PRICED + ["--batch-discount", "1"], r"--batch-discount must be a number in \[0, 1\), got '1'"),
    (PRICED + ["--batch-discount", "-0.1"], r"--batch-discount must be a number in \[0, 1\)"),
    (PRICED + ["--batch-discount", "half"], r"--batch-discount must be a number in \[0, 1\)"),
    (PRICED + ["--api-key-env", "HOME"], r"--api-key-env does not apply to --batch-in"),
    (PRICED + ["--cache", "c.sqlite"], r"--cache does not apply to --batch-in"),
])
def test_bad_batch_in_options_exit_2_naming_the_option(tmp_path, pool, batch, args, match):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = invoke("--pool", pool, "--batch-in", batch["results"], "--out", tmp_path / "r.jsonl",
               "--model", MODEL, *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert re.search(match, r.stderr), r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("args,match", [
    (["--budget", 3, "--batch-out", "{t}/q.jsonl", "--out", "{t}/r.jsonl", "--model", MODEL],
     r"--batch-out writes only the request file: drop --out"),
    (["--budget", 3, "--batch-out", "{t}/q.jsonl", "--batch-in", "{t}/x.jsonl",
      "--model", MODEL], r"--batch-out .* or --batch-in .*, not both"),
    (["--budget", 3, "--batch-out", "{t}/q.jsonl", "--replay", "{t}/x.jsonl", "--model", MODEL],
     r"--replay does not apply to --batch-out"),
    (["--budget", 3, "--batch-out", "{t}/q.jsonl"], r"--batch-out needs --model"),
    (["--batch-out", "{t}/q.jsonl", "--model", MODEL], r"--batch-out needs --budget"),
    (["--budget", 3, "--batch-out", "{t}/q.txt", "--model", MODEL],
     r"--batch-out must end in \.jsonl"),
    (["--budget", 3, "--batch-out", "{t}/q.jsonl", "--model", MODEL, "--batch-discount", "0.5"],
     r"--batch-discount only applies to --batch-in"),
    (["--batch-in", "{t}/x.jsonl", "--model", MODEL, *PRICED],
     r"--batch-in needs --out"),
    (["--batch-in", "{t}/x.jsonl", "--out", "{t}/r.jsonl", "--model", MODEL, *PRICED,
      "--sample-seed", 3], r"--sample-seed needs --budget"),
    (["--batch-in", "{t}/x.jsonl", "--out", "{t}/r.jsonl", "--model", MODEL, *PRICED],
     r"batch results file not found: .*x\.jsonl"),
    (["--budget", 3, "--batch-out", "{t}/q.jsonl", "--model", MODEL, *PRICED],
     r"--input-per-mtok and --output-per-mtok do not apply to --batch-out"),
    (["--budget", 3, "--out", "{t}/r.jsonl", "--replay", "{t}/x.jsonl",
      "--input-per-mtok", "x", "--output-per-mtok", 1], r"--input-per-mtok must be a number"),
    (["--budget", 3, "--replay", "{t}/x.jsonl"], r"--out is required"),
    (["--out", "{t}/r.jsonl", "--replay", "{t}/x.jsonl"], r"--budget is required"),
    (["--budget", 3, "--batch-out", "{t}/q.jsonl", "--model", MODEL, "--temperature", -1],
     r"temperature must be >= 0"),
])
def test_bad_mode_options_exit_2_with_one_line(tmp_path, pool, args, match):
    args = [a.format(t=tmp_path) if isinstance(a, str) else a for a in args]
    r = invoke("--pool", pool, *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert re.search(match, r.stderr), r.stderr
    assert list(tmp_path.iterdir()) == []
