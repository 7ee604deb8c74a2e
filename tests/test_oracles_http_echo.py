"""HttpOracle refuses answers that are not the teacher's answer alone.

A server that does not separate the generated answer from the chat it was given (what
``transformers serve`` did for the embedded worlds' teachers before their tokenizers
carried a ``response_template``) returns ``<|bos|><|user|>PROMPT<|assistant|>ANSWER<|eos|>``.
Stored, that text would be distilled into the student and measured as the teacher's
behaviour. These tests make the stub server answer that way on request and check that
the purchase fails loudly (one line naming the prompt id and what was found, exit code 2
through the CLI), is not retried (the same request gets the same answer and is paid
again) and leaves nothing of the bad answer in the ledger.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import build_tiny_tokenizer
from openai_stub_server import StubServer, answer_for
from qbudget.cli import app
from qbudget.errors import QBudgetError
from qbudget.ledger import Ledger
from qbudget.oracles import HttpOracle, HttpOracleConfig, OracleCallError
from qbudget.pool import Prompt

CHAT_ECHO = "<|bos|><|user|>{prompt}<|assistant|>{answer}<|eos|>"
LONG = "Quick question number {i}: on which continent is Germany? Thanks a lot."


def prompts(n):
    return [Prompt(f"pool-{i:05d}", LONG.format(i=i), "c") for i in range(n)]


def oracle(url, **kw):
    settings = dict(base_url=url, model="teacher", timeout_s=5, max_retries=3,
                    backoff_base_s=0.001, backoff_max_s=0.01, concurrency=1)
    settings.update(kw)
    return HttpOracle(HttpOracleConfig.from_dict(settings), sleep=lambda s: None)


def test_chat_echo_with_special_tokens_fails_once_and_is_never_stored(tmp_path):
    ps = prompts(6)
    bad = ps[3]
    with StubServer({bad.text: [("content", CHAT_ECHO)]}) as srv:
        ledger = Ledger(tmp_path / "ledger.sqlite", budget=10)
        with pytest.raises(OracleCallError) as info:
            ledger.buy(oracle(srv.url), ps)
        msg = str(info.value)
        assert "\n" not in msg and "'pool-00003'" in msg
        assert "echoes the prompt" in msg
        assert "<|bos|>" in msg and "<|assistant|>" in msg and "<|eos|>" in msg
        assert srv.attempts[bad.text] == 1            # not retried: it would be paid again
        assert srv.attempts[ps[4].text] == 0          # and nothing after it is bought
        # the purchase is not charged; the good answers that arrived are kept as paid,
        # the echo (which the server did bill) is neither kept nor counted as paid
        assert ledger.q == 0 and ledger.bought() == []
        assert ledger.paid == sum(srv.successes.values()) - 1 == 3
        # once the server answers properly, buying again asks only for what is missing
        assert ledger.buy(oracle(srv.url), ps) == [answer_for(p.text) for p in ps]
        assert ledger.q == 6 and ledger.paid == 6
        assert srv.attempts[bad.text] == 2 and all(srv.attempts[p.text] == 1 for p in ps
                                                   if p is not bad)


@pytest.mark.parametrize("shape, needle", [
    ("{prompt}\n{answer}", "echoes the prompt"),                        # text echo, no markers
    ("{answer}<|eos|>", "carries special tokens <|eos|>"),              # marker leak only
    ("<|im_start|>assistant\n{answer}<|im_end|>", "<|im_start|> <|im_end|>"),
    ("<start_of_turn>model\n{answer}<end_of_turn>", "<start_of_turn> <end_of_turn>"),
])
def test_each_kind_of_leak_is_named(shape, needle):
    p = prompts(1)[0]
    with StubServer({p.text: [("content", shape)]}) as srv:
        with pytest.raises(OracleCallError, match="'pool-00000'") as info:
            oracle(srv.url).answer([p])
    assert needle in str(info.value) and info.value.partial == {}
    assert srv.attempts[p.text] == 1


def test_completions_api_and_system_prompt_echo():
    p = prompts(1)[0]
    system = "You are a careful assistant who answers in one sentence."
    with StubServer({p.text: [("content", system + " {answer}")]}) as srv:
        with pytest.raises(OracleCallError, match="echoes the system prompt"):
            oracle(srv.url, system_prompt=system).answer([p])
    with StubServer({p.text: [("content", "{prompt} {answer}")]}) as srv:
        with pytest.raises(OracleCallError, match="echoes the prompt"):
            oracle(srv.url, api="completions").answer([p])


def test_ordinary_answers_pass():
    """A short question restated in the answer, and text that only looks like markup."""
    short = Prompt("s", "What is 2+2?", "c")       # shorter than ECHO_MIN_CHARS
    html = Prompt("h", LONG.format(i=7), "c")
    scripts = {short.text: [("content", "What is 2+2? It is 4.")],
               html.text: [("content", "Use <b>bold</b> or a | pipe | table, not <|>.")]}
    with StubServer(scripts) as srv:
        got = oracle(srv.url).answer([short, html])
    assert got == ["What is 2+2? It is 4.", "Use <b>bold</b> or a | pipe | table, not <|>."]


def test_tokenizer_names_the_special_tokens(tmp_path):
    """With the teacher's tokenizer folder, its own special tokens are what is looked for
    (the tiny test tokenizer's ``<eos>`` is not a generic chat marker)."""
    folder = build_tiny_tokenizer(tmp_path / "tok")
    p = prompts(1)[0]
    with StubServer({p.text: [("content", "{answer}<eos>")] * 2}) as srv:
        assert oracle(srv.url).answer([p]) == [answer_for(p.text) + "<eos>"]   # generic: passes
        with pytest.raises(OracleCallError, match="carries special tokens <eos>"):
            oracle(srv.url, tokenizer=str(folder)).answer([p])


def test_check_answers_false_accepts_them():
    p = prompts(1)[0]
    with StubServer({p.text: [("content", CHAT_ECHO)]}) as srv:
        got = oracle(srv.url, check_answers=False).answer([p])
    assert got == [CHAT_ECHO.format(prompt=p.text, answer=answer_for(p.text))]


def test_settings_are_checked_up_front(tmp_path):
    with pytest.raises(QBudgetError, match="'tokenizer'.*folder not found"):
        HttpOracleConfig.from_dict({"base_url": "http://x", "model": "m",
                                    "tokenizer": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(QBudgetError, match="'tokenizer'.*no tokenizer.json"):
        HttpOracleConfig.from_dict({"base_url": "http://x", "model": "m",
                                    "tokenizer": str(tmp_path / "empty")})
    with pytest.raises(QBudgetError, match="'check_answers' must be bool"):
        HttpOracleConfig.from_dict({"base_url": "http://x", "model": "m", "check_answers": 1})
    # checking settings change what is refused, never what an answer is
    a = oracle("http://127.0.0.1:9")
    b = oracle("http://127.0.0.1:9", check_answers=False,
               tokenizer=str(build_tiny_tokenizer(tmp_path / "tok")))
    assert a.fingerprint == b.fingerprint


def test_record_cli_exits_2_naming_the_prompt(tmp_path):
    pool = tmp_path / "pool.jsonl"
    ps = prompts(4)
    pool.write_text("".join(json.dumps({"id": p.id, "text": p.text, "category": "c"}) + "\n"
                            for p in ps))
    out = tmp_path / "answers.jsonl"
    with StubServer({ps[2].text: [("content", CHAT_ECHO)]}) as srv:
        res = CliRunner().invoke(app, ["record", "--pool", str(pool), "--budget", "4", "--out",
                                       str(out), "--endpoint", srv.url + "/v1", "--model", "t",
                                       "--concurrency", "1", "--max-retries", "1"])
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert "'pool-00002'" in res.stderr and "echoes the prompt" in res.stderr
    assert not out.exists()
