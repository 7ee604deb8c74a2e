"""HttpOracle against a real loopback server that misbehaves on purpose (see openai_stub_server)."""

from __future__ import annotations

import pytest

from openai_stub_server import StubServer, answer_for
from qbudget.errors import QBudgetError
from qbudget.ledger import Ledger, ResponseCache
from qbudget.oracles import HttpOracle, HttpOracleConfig, OracleCallError
from qbudget.pool import Prompt

KEY = "sk-test-SECRET-7f3a9c0d11"


def prompts(n, prefix="p"):
    return [Prompt(f"{prefix}{i}", f"question {prefix} {i}", "c") for i in range(n)]


def make_oracle(url, sleeps=None, **kw):
    settings = dict(base_url=url, model="teacher-1", api_key_env="QB_TEST_KEY", timeout_s=0.3,
                    max_retries=3, backoff_base_s=0.001, backoff_max_s=0.01, concurrency=4)
    settings.update(kw)
    sleep = (lambda s: sleeps.append(s)) if sleeps is not None else (lambda s: None)
    return HttpOracle(HttpOracleConfig.from_dict(settings), sleep=sleep)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("QB_TEST_KEY", KEY)


@pytest.mark.parametrize("api,path", [("chat", "/v1/chat/completions"),
                                      ("completions", "/v1/completions")])
def test_answers_both_apis_and_sends_config(api, path):
    ps = prompts(5)
    with StubServer(api_key=KEY) as srv:
        oracle = make_oracle(srv.url + "/v1", api=api, seed=7, temperature=0.5, max_tokens=17)
        assert oracle.answer(ps) == [answer_for(p.text) for p in ps]
    assert set(srv.paths) == {path}
    body = srv.bodies[0]
    assert body["model"] == "teacher-1" and body["temperature"] == 0.5
    assert body["max_tokens"] == 17 and isinstance(body["seed"], int)
    # per-prompt seeds: depend on the prompt, not on its position in the batch
    assert len({b["seed"] for b in srv.bodies}) == len(ps)


def test_usage_is_the_servers_else_counted_with_the_tokenizer_else_estimated(micro_world):
    """The bill's token counts: the endpoint's ``usage`` when it sends one; without it the
    teacher tokenizer's count (``tokenizer = DIR``), else an estimate -- each marked."""
    from qbudget.oracles.usage import TokenCounter, estimate_tokens

    ps = prompts(3)
    scripts = {ps[0].text: [("usage", (31, 7))]}
    with StubServer(scripts, api_key=KEY) as srv:
        got = make_oracle(srv.url + "/v1").answer_usage(ps)
        counted = make_oracle(srv.url + "/v1", tokenizer=str(micro_world.teacher_dir),
                              max_tokens=20).answer_usage(ps[1:])
        worst = make_oracle(srv.url + "/v1", max_tokens=20).worst_case(ps[1])
    assert [(u.prompt_tokens, u.completion_tokens, u.source) for _, u in got[:1]] == [(31, 7, "server")]
    for p, (text, u) in zip(ps[1:], got[1:]):
        assert (u.prompt_tokens, u.completion_tokens, u.source) == \
            (estimate_tokens(p.text), estimate_tokens(text), "estimate")
    tok = TokenCounter(micro_world.teacher_dir)
    for p, (text, u) in zip(ps[1:], counted):
        assert (u.prompt_tokens, u.completion_tokens, u.source) == \
            (tok.count(p.text), tok.count(text), "tokenizer")
    # the worst case bounds the prompt by its bytes, plus the chat-template margin, and asks
    # for every token max_tokens allows
    assert worst.prompt_tokens >= len(ps[1].text.encode()) and worst.completion_tokens == 20


def test_fingerprint_tracks_answers_not_transport_or_key(monkeypatch):
    a = make_oracle("http://127.0.0.1:9", concurrency=2)
    b = make_oracle("http://127.0.0.1:9/v1/", concurrency=16, timeout_s=5)
    c = make_oracle("http://127.0.0.1:9", temperature=0.7)
    d = make_oracle("http://127.0.0.1:9", model="teacher-2")
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
    monkeypatch.setenv("QB_TEST_KEY", "another-key")
    assert make_oracle("http://127.0.0.1:9").fingerprint == a.fingerprint
    assert KEY not in repr(a) and KEY not in repr(a.config) and KEY not in a.fingerprint


def test_transient_failures_are_retried_and_each_success_paid_once(tmp_path):
    ps = prompts(8)
    misbehaviour = [[("429", 1)], [("status", 500), ("status", 503)], [("sleep", 0.8)],
                    ["truncated"], ["malformed"], ["nochoices"], ["drop"],
                    [("429", None), ("status", 502)]]
    scripts = {p.text: s for p, s in zip(ps, misbehaviour)}
    sleeps: list[float] = []
    cache = ResponseCache(tmp_path / "cache.sqlite")
    with StubServer(scripts, api_key=KEY) as srv:
        ledger = Ledger(tmp_path / "ledger.sqlite", budget=10, cache=cache)
        oracle = make_oracle(srv.url, sleeps)
        got = ledger.buy(oracle, ps)
        assert got == [answer_for(p.text) for p in ps]
        assert ledger.q == 8 and ledger.paid == 8
        assert all(srv.successes[p.text] == 1 for p in ps)
        assert 1.0 in sleeps                       # Retry-After: 1 honoured exactly
        assert all(s < 0.05 for s in sleeps if s != 1.0)  # everything else: tiny backoff
        # a second run sharing the cache replays the same prompts without a single request
        before = sum(srv.attempts.values())
        other = Ledger(tmp_path / "ledger2.sqlite", budget=10, cache=cache)
        assert other.buy(make_oracle(srv.url), ps) == got
        assert other.q == 8 and other.paid == 0
        assert sum(srv.attempts.values()) == before


def test_exhausted_retries_raise_clear_error_and_are_never_charged(tmp_path):
    ps = prompts(6)
    bad = ps[3]
    scripts = {bad.text: [("status", 500)] * 4}   # max_retries=3 -> 4 attempts, all 500
    with StubServer(scripts, api_key=KEY) as srv:
        ledger = Ledger(tmp_path / "ledger.sqlite", budget=6,
                        cache=ResponseCache(tmp_path / "cache.sqlite"))
        with pytest.raises(OracleCallError) as info:
            ledger.buy(make_oracle(srv.url, concurrency=2), ps)
        msg = str(info.value)
        assert "'p3'" in msg and "status 500" in msg and "4 attempts" in msg
        assert "\n" not in msg and KEY not in msg
        assert srv.attempts[bad.text] == 4
        # the failed purchase is not charged; answers that did arrive are kept as paid
        assert ledger.q == 0 and ledger.bought() == [] and ledger.remaining == 6
        assert ledger.paid == sum(srv.successes.values())
        # the endpoint recovers (its script is used up): buying again completes and
        # nothing that was already answered is requested (or paid) a second time
        assert ledger.buy(make_oracle(srv.url), ps) == [answer_for(p.text) for p in ps]
        assert ledger.q == 6 and ledger.paid == 6
        assert all(srv.successes[p.text] == 1 for p in ps)


def test_timeouts_exhaust_with_a_named_error(tmp_path):
    p = Prompt("slow-1", "a slow question", "c")
    with StubServer({p.text: [("sleep", 0.6)] * 2}, api_key=KEY) as srv:
        oracle = make_oracle(srv.url, timeout_s=0.15, max_retries=1)
        with pytest.raises(OracleCallError, match=r"'slow-1' failed after 2 attempts \(last: timeout"):
            oracle.answer([p])


def test_client_errors_fail_fast_and_never_leak_the_key(tmp_path):
    p, q = Prompt("a", "first", "c"), Prompt("b", "second", "c")
    with StubServer({q.text: ["echo_auth"]}, api_key=KEY) as srv:
        with pytest.raises(OracleCallError) as info:
            make_oracle(srv.url).answer([q])
        assert "status 400" in str(info.value) and "'b'" in str(info.value)
        assert KEY not in str(info.value) and "[redacted]" in str(info.value)
        assert srv.attempts[q.text] == 1                      # 4xx is not retried
    with StubServer(api_key="the-right-key") as srv:
        ledger = Ledger(tmp_path / "l.sqlite", budget=2)
        with pytest.raises(QBudgetError, match="status 401.*invalid api key"):
            ledger.buy(make_oracle(srv.url), [p])
        assert ledger.q == 0 and ledger.paid == 0
    for f in tmp_path.iterdir():
        assert KEY.encode() not in f.read_bytes(), f


def test_concurrency_is_bounded():
    ps = prompts(12)
    with StubServer(api_key=KEY, delay_s=0.05) as srv:
        make_oracle(srv.url, concurrency=3).answer(ps)
    assert 1 < srv.max_in_flight <= 3


def test_retry_after_http_date_is_honoured():
    import email.utils
    import time

    p = Prompt("d", "dated", "c")
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    sleeps: list[float] = []
    with StubServer({p.text: [("429", when)]}, api_key=KEY) as srv:
        assert make_oracle(srv.url, sleeps).answer([p]) == [answer_for(p.text)]
    assert len(sleeps) == 1 and 25 < sleeps[0] <= 31


def test_config_errors_name_the_key(monkeypatch):
    with pytest.raises(QBudgetError, match="'temprature'"):
        HttpOracleConfig.from_dict({"base_url": "http://x", "model": "m", "temprature": 1})
    with pytest.raises(QBudgetError, match="'api_key' is not allowed"):
        HttpOracleConfig.from_dict({"base_url": "http://x", "model": "m", "api_key": KEY})
    with pytest.raises(QBudgetError, match="'max_tokens' must be int"):
        HttpOracleConfig.from_dict({"base_url": "http://x", "model": "m", "max_tokens": "9"})
    with pytest.raises(QBudgetError, match="'model' is required"):
        HttpOracleConfig.from_dict({"base_url": "http://x"})
    with pytest.raises(QBudgetError, match="base_url"):
        HttpOracleConfig(base_url="ftp://x", model="m")
    monkeypatch.delenv("QB_TEST_KEY")
    with pytest.raises(QBudgetError, match="QB_TEST_KEY") as info:
        make_oracle("http://127.0.0.1:9")
    assert KEY not in str(info.value)
