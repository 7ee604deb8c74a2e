"""Spend in three units (#20): queries, tokens and dollars, reserved at the worst case.

The ledger is the thing under test; its teacher here is a small deterministic oracle that
reports usage (as every real oracle now does) and can fail on chosen prompts. Budget
properties are checked with hypothesis over caps, prices, usages and concurrent buyers
(threads with their own Ledger on one file, like the cells of a sweep).
"""

from __future__ import annotations

import math
import threading
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qbudget.cli import app
from qbudget.errors import QBudgetError
from qbudget.ledger import Caps, Ledger, ResponseCache
from qbudget.oracles import OracleCallError
from qbudget.oracles.usage import Price, Usage
from qbudget.pool import Prompt


class MeteredOracle:
    """Answers with a fixed usage per prompt; its worst case is prompt + ``max_tokens``.

    ``fail`` names prompt ids whose request fails for good (after the answers before it in
    the batch arrived, like an endpoint that gives up mid-batch)."""

    name = "metered"
    fingerprint = "fp-metered"

    def __init__(self, usage: dict[str, tuple[int, int]], max_tokens: int, fail=()):
        self.usage, self.max_tokens, self.fail = usage, max_tokens, set(fail)
        self.sent: Counter = Counter()
        self._lock = threading.Lock()

    def worst_case(self, prompt):
        return Usage(self.usage[prompt.id][0], self.max_tokens, "tokenizer")

    def answer_usage(self, prompts, sample=0):
        out = []
        for p in prompts:
            with self._lock:
                self.sent[p.id] += 1
            if p.id in self.fail:
                raise OracleCallError(f"prompt '{p.id}' failed",
                                      partial={i: a for i, (a, _) in enumerate(out)},
                                      partial_usage={i: u for i, (_, u) in enumerate(out)})
            pt, ct = self.usage[p.id]
            out.append((f"answer to {p.id}", Usage(pt, ct, "server")))
        return out

    def answer(self, prompts, sample=0):
        return [a for a, _ in self.answer_usage(prompts, sample)]


def prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", f"text {i}", "c") for i in range(n)]


def spent(ledger: Ledger) -> tuple[int, int, float]:
    t = ledger.spend()["train"]
    return t["q"], t["tokens"], t["usd"]


usages = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 40)), min_size=4, max_size=24)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(usage=usages, q_cap=st.integers(0, 24), tok_cap=st.one_of(st.none(), st.integers(1, 1500)),
       usd_cap=st.one_of(st.none(), st.floats(1e-5, 2e-3)), in_price=st.floats(0.0, 10.0),
       out_price=st.floats(0.1, 30.0), buyers=st.integers(1, 4), batch=st.integers(1, 5),
       fail_every=st.integers(0, 5))
def test_concurrent_buyers_never_exceed_any_cap_and_failures_are_free(
        tmp_path_factory, usage, q_cap, tok_cap, usd_cap, in_price, out_price, buyers, batch,
        fail_every):
    path = tmp_path_factory.mktemp("spend") / "ledger.sqlite"
    pool = prompts(len(usage))
    fail = {p.id for i, p in enumerate(pool) if fail_every and i % fail_every == fail_every - 1}
    oracle = MeteredOracle({p.id: u for p, u in zip(pool, usage)}, max_tokens=40, fail=fail)
    price, caps = Price(in_price, out_price), Caps(tokens=tok_cap, usd=usd_cap)
    Ledger(path, budget=q_cap, caps=caps, price=price).close()
    shares = [pool[i::buyers] for i in range(buyers)]
    errors: list[BaseException] = []

    def buy(share):
        ledger = Ledger(path, budget=q_cap, caps=caps, price=price)
        try:
            for i in range(0, len(share), batch):
                try:
                    ledger.buy(oracle, share[i:i + batch], up_to_cap=bool(i % 2))
                except QBudgetError:   # over a cap (all-or-nothing), or a failed request
                    pass
        except BaseException as exc:   # pragma: no cover - reported below
            errors.append(exc)
        finally:
            ledger.close()

    threads = [threading.Thread(target=buy, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with Ledger(path, budget=q_cap) as ledger:
        q, tokens, usd = spent(ledger)
        records = ledger.purchase_records()
    assert q <= q_cap
    if tok_cap is not None:
        assert tokens <= tok_cap
    if usd_cap is not None:
        assert usd <= usd_cap + 1e-12
    # what was charged is exactly the bought answers' real usage at the price
    bought = {r["id"] for r in records}
    assert tokens == sum(sum(oracle.usage[i]) for i in bought)
    assert math.isclose(usd, sum(price.cost(Usage(*oracle.usage[i])) for i in bought),
                        rel_tol=1e-9, abs_tol=1e-15)
    # a failed request is never charged, nor is any request answered but not settled
    assert not bought & fail
    assert all(r["usage_source"] == "server" for r in records)
    # every prompt sent fitted: no prompt was sent twice, and all sent ones not failing
    # were bought (the rest of a failed batch is rolled back and may be sent again later)
    assert all(n == 1 for pid, n in oracle.sent.items() if pid in bought)


def test_a_request_whose_worst_case_does_not_fit_is_not_sent(tmp_path):
    pool = prompts(4)
    oracle = MeteredOracle({p.id: (10, 5) for p in pool}, max_tokens=20)
    # worst case 30 tokens per prompt; real use 15: two fit the worst case, not three
    ledger = Ledger(tmp_path / "l.sqlite", budget=10, caps=Caps(tokens=70))
    with pytest.raises(QBudgetError, match=r"budget\.tokens"):
        ledger.buy(oracle, pool[:3])
    assert sum(oracle.sent.values()) == 0 and spent(ledger) == (0, 0, 0.0)
    assert len(ledger.buy(oracle, pool[:3], up_to_cap=True)) == 2
    assert set(oracle.sent) == {"p0", "p1"} and spent(ledger)[:2] == (2, 30)
    # settled at the real usage: 40 tokens of room left, one more worst case fits
    assert ledger.buy(oracle, pool[2:], up_to_cap=True) == ["answer to p2"]
    assert ledger.buy(oracle, pool[3:], up_to_cap=True) == []
    assert "p3" not in oracle.sent and spent(ledger)[:2] == (3, 45)


def test_dollar_cap_uses_the_price_and_an_answers_own_cost(tmp_path):
    pool = prompts(3)
    oracle = MeteredOracle({p.id: (1000, 1000) for p in pool}, max_tokens=1000)
    price = Price(1.0, 3.0)     # $0.004 per prompt at the worst case and in fact
    ledger = Ledger(tmp_path / "l.sqlite", budget=3, caps=Caps(usd=0.009), price=price)
    assert len(ledger.buy(oracle, pool, up_to_cap=True)) == 2
    assert spent(ledger) == (2, 4000, pytest.approx(0.008))
    assert price.cost(Usage(1000, 1000, "recorded", usd=0.0005)) == 0.0005
    with pytest.raises(QBudgetError, match="was started with caps"):
        Ledger(tmp_path / "l.sqlite", budget=3, caps=Caps(usd=1.0))
    with pytest.raises(QBudgetError, match="was started with price"):
        Ledger(tmp_path / "l.sqlite", budget=3, price=Price(2.0, 3.0))


def test_evaluation_spend_is_its_own_account_and_capped(tmp_path):
    probe = [Prompt(f"e{i}", f"probe {i}", "c") for i in range(10)]
    pool = prompts(2)
    oracle = MeteredOracle({p.id: (100, 100) for p in probe + pool}, max_tokens=100)
    price = Price(1.0, 1.0)    # $0.0002 per answer
    cache = ResponseCache(tmp_path / "cache.sqlite")
    ledger = Ledger(tmp_path / "l.sqlite", budget=2, cache=cache,
                    caps=Caps(eval_usd=0.0015), price=price)
    ledger.buy(oracle, pool)
    with pytest.raises(QBudgetError, match=r"budget\.eval_usd"):
        ledger.evaluation_answers(oracle, probe)             # 10 x $0.0002 > $0.0015
    assert not any(pid.startswith("e") for pid in oracle.sent)   # refused before sending
    ledger.evaluation_answers(oracle, probe[:7])
    ledger.evaluation_answers(oracle, probe[:7])             # held already: costs nothing more
    s = ledger.spend()
    assert s["eval"]["answers"] == s["eval"]["paid"] == 7
    assert s["eval"]["usd"] == pytest.approx(0.0014) == s["eval"]["paid_usd"]
    assert s["train"]["usd"] == pytest.approx(0.0004) and s["train"]["q"] == 2
    # another run reusing the cached answers consumes them (its budget) but pays nothing
    other = Ledger(tmp_path / "l2.sqlite", budget=2, cache=cache, price=price)
    other.evaluation_answers(oracle, probe[:7])
    o = other.spend()["eval"]
    assert o["usd"] == pytest.approx(0.0014) and o["paid"] == 0 and o["paid_usd"] == 0
    assert sum(n for pid, n in oracle.sent.items() if pid.startswith("e")) == 7


def test_answers_cached_before_usage_was_recorded_are_estimated_and_marked(tmp_path):
    import sqlite3

    cache = ResponseCache(tmp_path / "cache.sqlite")
    pool = prompts(2)
    cache.put_many("fp-metered", [(p.text, f"old answer {p.id}") for p in pool])
    cache.close()
    with sqlite3.connect(tmp_path / "cache.sqlite") as con:   # as an older qbudget left it
        assert con.execute("SELECT COUNT(*) FROM responses WHERE prompt_tokens IS NULL"
                           ).fetchone()[0] == 2
    ledger = Ledger(tmp_path / "l.sqlite", budget=2, cache=ResponseCache(tmp_path / "cache.sqlite"))
    oracle = MeteredOracle({p.id: (9, 9) for p in pool}, max_tokens=9)
    assert ledger.buy(oracle, pool) == ["old answer p0", "old answer p1"]
    assert sum(oracle.sent.values()) == 0
    assert ledger.spend()["train"]["estimated"] == 2
    assert {r["usage_source"] for r in ledger.purchase_records()} == {"estimate"}


runner = CliRunner()


def assert_refused(cfg, out, needle: str) -> None:
    """``qbudget run --config CFG`` exits 2 with one line naming ``needle``, writing nothing."""
    result = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and needle in line and "Traceback" not in line
    assert not out.exists()


@pytest.mark.parametrize("budget, needle", [
    ("usd = -1", "budget.usd"),
    ("usd = \"ten\"", "budget.usd"),
    ("tokens = 0", "budget.tokens"),
    ("dollars = 3", "budget.dollars"),
    ("queries = 8\ntotal = 8", "budget.queries"),
])
def test_bad_budget_keys_exit_2_naming_the_key(tmp_path, budget, needle):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'world = "micro"\n[budget]\n{budget}\n')
    assert_refused(cfg, tmp_path / "o", needle)


@pytest.mark.parametrize("price, needle", [
    ("input_per_mtok = -0.5\noutput_per_mtok = 1.0", "teacher.price.input_per_mtok"),
    ("input_per_mtok = 0.5\noutput_per_mtok = \"cheap\"", "teacher.price.output_per_mtok"),
    ("input_per_mtok = 0.5", "teacher.price.output_per_mtok"),
    ("input_per_mtok = 0.5\noutput_per_mtok = 1.0\nbatch = 0.5", "teacher.price.batch"),
    (None, "budget.usd needs the teacher's price"),
])
def test_bad_prices_and_dollar_budgets_without_a_price_exit_2(micro_world, tmp_path, price,
                                                               needle):
    from test_realworld import write_world

    teacher = f'kind = "local"\ndir = "{micro_world.teacher_dir}"\n'
    if price is not None:
        teacher += f"[teacher.price]\n{price}\n"
    (tmp_path / "w").mkdir()
    world = write_world(tmp_path / "w", micro_world, teacher)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'world = "{world}"\n[budget]\ntotal = 8\nusd = 0.01\n')
    assert_refused(cfg, tmp_path / "o", needle)
