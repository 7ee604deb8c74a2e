"""Built-in strategies through the registry: the selection contract, determinism, fallbacks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qbudget.errors import QBudgetError
from qbudget.pool import Prompt
from qbudget.signals import cached_pool_embeddings, compute_signals, parse_spec
from qbudget.strategy import SelectionContext, checked_select, get_strategy, list_strategies
from strategies.stratified import allocate

BUILTINS = {"random", "stratified", "disagreement", "diversity", "uncertainty", "adversary",
            "hybrid", "bandit"}
CATS = ["code", "math", "chat", "refusal"]


def synthetic_pool(n: int, seed: int = 0, texts=None) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    share = np.array([0.5, 0.3, 0.15, 0.05])
    cats = rng.choice(len(CATS), size=n, p=share)
    texts = texts or [f"prompt number {i} about {CATS[c]}" for i, c in enumerate(cats)]
    return [Prompt(f"p{i}", texts[i], CATS[c]) for i, c in enumerate(cats)]


def synthetic_context(n=300, n_bought=40, seed=0, **kw) -> SelectionContext:
    pool = synthetic_pool(n, seed)
    rng = np.random.default_rng(seed + 1)
    bought = rng.choice(n, size=n_bought, replace=False)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return SelectionContext.build(pool, bought, [f"answer {i}" for i in bought],
                                  category_names=CATS, pool_embeddings=lambda: emb, **kw)


def model_context(lm, tok, n_bought=10, n=60, seed=0) -> SelectionContext:
    from test_committee import make_texts

    texts = make_texts(n, seed + 10)
    pool = synthetic_pool(n, seed, texts=texts)
    bought = np.random.default_rng(seed).choice(n, size=n_bought, replace=False)
    emb = np.random.default_rng(seed + 2).normal(size=(n, 8)).astype(np.float32)
    return SelectionContext.build(pool, bought, make_texts(n_bought, seed + 20),
                                  category_names=CATS, student=lm, tokenizer=tok,
                                  pool_embeddings=lambda: emb,
                                  sampling={"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 6})


def run_round(strat, ctx, k, seed):
    state = strat.init(ctx)
    key = jax.random.key(seed)
    sig = compute_signals(strat.signals, ctx, jax.random.fold_in(key, 0))
    return strat.select(state, sig, ctx, k, jax.random.fold_in(key, 1))


def check_contract(picks, ctx, k):
    want = min(k, int((~ctx.bought_mask).sum()))
    assert picks.dtype == np.int64 and picks.shape == (want,)
    assert np.unique(picks).size == picks.size
    assert not ctx.bought_mask[picks].any()


# ---------------------------------------------------------------- registry

def test_builtins_registered_with_descriptions_and_params():
    infos = {i.name: i for i in list_strategies()}
    assert BUILTINS <= set(infos)
    for name in BUILTINS:
        assert infos[name].error is None, infos[name].error
        assert infos[name].package == "qbudget" and infos[name].description
    assert infos["stratified"].params == {"allocation": "proportional"}
    assert "measure" in infos["disagreement"].params


def test_unknown_strategy_lists_known_names():
    with pytest.raises(QBudgetError, match=r"unknown strategy 'nope' \(known: .*diversity.*random"):
        get_strategy("nope", {})


@pytest.mark.parametrize("name,params,match", [
    ("random", {"foo": 1}, "no parameter 'foo'"),
    ("stratified", {"allocation": "weird"}, "allocation"),
    ("disagreement", {"members": 1}, "members"),
    ("disagreement", {"measure": "kl"}, "measure"),
    ("uncertainty", {"tokens": 0}, "tokens"),
    ("bandit", {"arms": "random,nope"}, "unknown strategy 'nope'"),
    ("bandit", {"arms": "bandit"}, "own arm"),
])
def test_bad_params_raise_user_errors(name, params, match):
    with pytest.raises(QBudgetError, match=match):
        get_strategy(name, params)


def test_contract_violations_are_caught():
    ctx = synthetic_context(n=20, n_bought=5)
    bought = int(ctx.bought_indices[0])
    free = ctx.unbought()
    for bad in ([bought, *free[:2]], [free[0], free[0], free[1]], free[:2], [free[0], free[1], 99]):
        sel = checked_select("bad", lambda s, sig, c, k, key, bad=bad: (np.asarray(bad), s))
        with pytest.raises(RuntimeError, match="strategy 'bad'"):
            sel(None, {}, ctx, 3, jax.random.key(0))


def test_stateless_and_top_or_random():
    from qbudget.signals import CandidateScores
    from qbudget.strategy import random_unbought, stateless, top_or_random, top_scored

    ctx = synthetic_context(n=50, n_bought=10)
    calls = []

    def pick(signals, c, k, key):
        calls.append(sorted(signals))
        return c.unbought()[:k]

    strat = stateless("first", "first unbought", ["categories"], {"a": 1}, pick)
    assert strat.init(ctx) is None and strat.signals == ("categories",) and strat.params == {"a": 1}
    picks, state = strat.select("kept", {"categories": None}, ctx, 4, jax.random.key(0))
    assert state == "kept" and calls == [["categories"]]
    np.testing.assert_array_equal(picks, ctx.unbought()[:4])

    select = top_or_random("entropy", "h", secondary="tie")
    key = jax.random.key(3)
    np.testing.assert_array_equal(select({"entropy": None}, ctx, 5, key), random_unbought(ctx, 5, key))
    idx = ctx.unbought()[:8]
    vals = {"h": np.array([1, 3, 3, 0, 2, 3, 1, 0], np.float32), "tie": np.arange(8, dtype=np.float32)}
    got = select({"entropy": CandidateScores(idx, vals)}, ctx, 5, key)
    np.testing.assert_array_equal(got, top_scored(idx, vals["h"], ctx, 5, key, secondary=vals["tie"]))
    np.testing.assert_array_equal(got[:3], idx[[5, 2, 1]])


def test_signal_specs():
    assert parse_spec("entropy[candidates=5,tokens=2]")[1]["candidates"] == 5
    for bad, match in [("nope", "unknown signal"), ("entropy[foo=1]", "no parameter 'foo'"),
                       ("entropy[tokens=x]", "expected a number"), ("entropy[tokens=1", "malformed")]:
        with pytest.raises(QBudgetError, match=match):
            parse_spec(bad)


# ---------------------------------------------------------------- model-free strategies

MODEL_FREE = [("random", {}), ("stratified", {}), ("stratified", {"allocation": "equal"}),
              ("diversity", {}), ("bandit", {"arms": "random,stratified,diversity"})]


@pytest.mark.parametrize("name,params", MODEL_FREE)
def test_model_free_contract_and_determinism(name, params):
    strat = get_strategy(name, params)
    for n_bought, k in [(0, 25), (40, 25), (290, 25), (300, 5)]:
        ctx = synthetic_context(n_bought=n_bought)
        picks, _ = run_round(strat, ctx, k, seed=3)
        check_contract(picks, ctx, k)
        again, _ = run_round(strat, ctx, k, seed=3)
        np.testing.assert_array_equal(picks, again)
    ctx = synthetic_context(n_bought=40)
    if name != "diversity":   # diversity is deterministic given a labeled set
        assert not np.array_equal(run_round(strat, ctx, 25, 3)[0], run_round(strat, ctx, 25, 4)[0])


def test_allocation_proportional_equal_and_reallocation():
    # proportional to pool sizes, cumulative targets with largest remainder
    assert allocate(10, [50, 30, 20], [0, 0, 0], [50, 30, 20]).tolist() == [5, 3, 2]
    # remainder ties go to the lowest category index, then catch up next round
    first = allocate(2, [1, 1, 1], [0, 0, 0], [9, 9, 9])
    assert first.tolist() == [1, 1, 0]
    assert allocate(1, [1, 1, 1], first, [8, 8, 9]).tolist() == [0, 0, 1]
    # an exhausted category's share goes to the others
    assert allocate(9, [1, 1, 1], [0, 0, 0], [1, 10, 10]).tolist() == [1, 4, 4]
    # never more than available in total
    assert allocate(50, [1, 1], [0, 0], [3, 4]).tolist() == [3, 4]


def test_stratified_equal_balances_categories():
    ctx = synthetic_context(n=400, n_bought=0)
    strat = get_strategy("stratified", {"allocation": "equal"})
    picks, _ = run_round(strat, ctx, 40, 0)
    counts = np.bincount(ctx.categories[picks], minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]
    prop, _ = run_round(get_strategy("stratified", {}), ctx, 40, 0)
    pc = np.bincount(ctx.categories[prop], minlength=4)
    share = np.bincount(ctx.categories, minlength=4) / 400 * 40
    assert np.abs(pc - share).max() < 1.0


def test_embeddings_cached_on_disk_by_encoder_and_pool(tmp_path, monkeypatch):
    from qbudget import signals
    from qbudget.models import encoder

    calls = []

    class FakeEncoder:      # the on-disk cache is under test here, not MiniLM
        def encode(self, texts):
            calls.append(len(texts))
            return np.ones((len(texts), 4), np.float32)

    monkeypatch.setattr(encoder, "shared_encoder", lambda path=None: FakeEncoder())
    pool = synthetic_pool(12)
    a = cached_pool_embeddings(pool, tmp_path)
    b = cached_pool_embeddings(pool, tmp_path)
    assert calls == [12] and a.shape == (12, 4) and np.array_equal(a, b)
    files = list((tmp_path / "embeddings").glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith(signals.encoder_fingerprint())
    cached_pool_embeddings(pool[:-1], tmp_path)          # another pool: another file
    assert calls == [12, 11] and len(list((tmp_path / "embeddings").glob("*.npy"))) == 2


# ---------------------------------------------------------------- model-based strategies

@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from test_committee import tiny_student

    return tiny_student(tmp_path_factory.mktemp("tiny-s"))


SMALL = {
    "uncertainty": {"candidates": 16, "tokens": 2},
    "disagreement": {"members": 3, "candidates": 16, "tokens": 2, "steps": 2},
    "hybrid": {"members": 3, "candidates": 16, "tokens": 2, "steps": 2, "top_factor": 2},
    "adversary": {"candidates": 20, "train_max": 10, "min_train": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_based_contract_and_determinism(student, name):
    lm, tok = student
    strat = get_strategy(name, SMALL[name])
    for n_bought, k in [(0, 7), (10, 7), (55, 7)]:
        ctx = model_context(lm, tok, n_bought=n_bought)
        picks, _ = run_round(strat, ctx, k, seed=1)
        check_contract(picks, ctx, k)
        again, _ = run_round(strat, ctx, k, seed=1)
        np.testing.assert_array_equal(picks, again)


def test_uncertainty_picks_highest_entropy_candidates(student):
    lm, tok = student
    ctx = model_context(lm, tok, n_bought=10)
    strat = get_strategy("uncertainty", SMALL["uncertainty"])
    sig = compute_signals(strat.signals, ctx, jax.random.key(0))
    ent = sig["entropy"]
    assert ent.indices.size == 16 and (ent.values["entropy"] > 0).all()
    picks, _ = strat.select(None, sig, ctx, 5, jax.random.key(1))
    order = np.lexsort((ent.indices, -ent.values["entropy"].astype(np.float64)))
    np.testing.assert_array_equal(picks, ent.indices[order[:5]])


@pytest.mark.slow
def test_bandit_rewards_arms_from_held_out_loss_drops(student, tmp_path):
    """Three simulated rounds (buy, then train the student on what was bought)."""
    from test_committee import make_texts, tiny_student

    from qbudget.models.train import PairBatcher, make_optimizer, train_steps
    from qbudget.signals import adapter_history_depth, record_adapters

    lm, tok = tiny_student(tmp_path / "own", seed=5)       # this test trains it
    strat = get_strategy("bandit", {"arms": "random,stratified", "reward_scale": 0.01})
    n = 60
    texts = make_texts(n, 30)
    pool = synthetic_pool(n, 0, texts=texts)
    teacher = {i: texts[i].upper()[:3] + " ok" for i in range(n)}    # a learnable "teacher"
    bought: list[int] = []
    state = None
    opt = make_optimizer(lm, 3e-2)
    round_q, history = [], {}           # what the loop keeps for the bandit's evidence
    for r in range(3):
        round_q.append(len(bought))
        history = record_adapters(history, r, lm, adapter_history_depth(strat.signals))
        ctx = SelectionContext.build(pool, bought, [teacher[i] for i in bought], category_names=CATS,
                                     student=lm, tokenizer=tok, round=r, round_q=tuple(round_q),
                                     adapter_history=history)
        state = strat.init(ctx) if state is None else state
        key = jax.random.key(r)
        picks, state = strat.select(state, compute_signals(strat.signals, ctx, key), ctx, 8, key)
        check_contract(picks, ctx, 8)
        bought += picks.tolist()
        batcher = PairBatcher(tok, [texts[i] for i in bought], [teacher[i] for i in bought],
                              batch_size=8, max_len=48)
        train_steps(lm, opt, batcher, 15, jax.random.key(100 + r))
    assert len(state["rewards"]) == 1
    rec = state["rewards"][0]
    assert rec["round"] == 0 and rec["arm"] in ("random", "stratified")
    assert 0.0 <= rec["reward"] <= 1.0 and rec["drop"] > 0      # training helped held-out NLL
    assert state["log_w"].max() > 0
