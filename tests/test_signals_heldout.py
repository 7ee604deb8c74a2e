"""The bandit's evidence as a declared signal: ``heldout_gain``, the adapter history, a pure ``select``.

``heldout_gain`` at round R compares the student's adapters of rounds R − 2 and R − 1
(from ``ctx.adapter_history``) on the batch bought in round R − 1 (``ctx.round_q``); the
bandit only reads it, so its ``select`` runs no model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qbudget import signals
from qbudget.signals import HeldoutGain, adapter_history_depth, compute_signals, record_adapters
from qbudget.strategy import SelectionContext, get_strategy
from test_committee import make_texts, tiny_student
from test_strategies import CATS, check_contract, synthetic_context, synthetic_pool


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny-h"), seed=2)


def _perturbed(snapshot, seed):
    rng = np.random.default_rng(seed)
    return [a + rng.normal(scale=0.3, size=a.shape).astype(a.dtype) for a in snapshot]


def _with_adapters(lm, leaves):
    """A copy of the student whose LoRA leaves are ``leaves`` (the direct route)."""
    clone = nnx.clone(lm)
    _, lora, _ = signals.split_student(clone)
    nnx.update(clone, jax.tree.unflatten(jax.tree.structure(lora), [jnp.asarray(a) for a in leaves]))
    return clone


def _three_rounds(lm, tok, n=40, sizes=(6, 5, 4)):
    """A context at round 2 after buying ``sizes[0]``, ``sizes[1]`` prompts in rounds 0, 1."""
    texts = make_texts(n, 7)
    pool = synthetic_pool(n, 0, texts=texts)
    bought = np.random.default_rng(1).choice(n, size=sum(sizes[:2]), replace=False)
    answers = make_texts(len(bought), 8)
    s0 = signals.lora_snapshot(lm)
    history = {0: s0, 1: _perturbed(s0, 1), 2: _perturbed(s0, 2)}
    ctx = SelectionContext.build(pool, bought, answers, category_names=CATS, student=lm,
                                 tokenizer=tok, round=2, round_q=(0, sizes[0], sum(sizes[:2])),
                                 adapter_history=history)
    return ctx, history


def test_heldout_gain_is_the_relative_loss_drop_on_the_next_batch(student):
    lm, tok = student
    ctx, history = _three_rounds(lm, tok)
    gain = compute_signals(["heldout_gain"], ctx, jax.random.key(0))["heldout_gain"]
    assert isinstance(gain, HeldoutGain) and gain.round == 0
    # B_1 = what round 1 bought, scored under S_0 and S_1 (models carrying those adapters)
    b1 = ctx.bought_indices[6:11]
    prompts, answers = [ctx.pool[int(i)].text for i in b1], list(ctx.answers[6:11])
    before = float(np.mean(signals.pair_losses(_with_adapters(lm, history[0]), tok, prompts, answers)))
    after = float(np.mean(signals.pair_losses(_with_adapters(lm, history[1]), tok, prompts, answers)))
    assert gain.loss_before == pytest.approx(before, rel=1e-6)
    assert gain.loss_after == pytest.approx(after, rel=1e-6)
    assert gain.drop == pytest.approx((before - after) / before, rel=1e-5, abs=1e-7)
    assert before != after
    # the student's own adapters are untouched by the measurement
    for a, b in zip(signals.lora_snapshot(lm), history[0]):
        np.testing.assert_array_equal(a, b)


def test_pair_losses_are_the_training_loss_per_pair(student):
    from qbudget.models.train import masked_ce, masked_ce_rows

    lm, tok = student
    prompts, answers = make_texts(5, 3), make_texts(5, 4)
    ids, mask, lmask = signals.pair_batch(tok, prompts, answers)
    logits = lm(jnp.asarray(ids), jnp.asarray(mask))
    rows = np.asarray(masked_ce_rows(logits, jnp.asarray(ids), jnp.asarray(lmask)))
    np.testing.assert_allclose(signals.pair_losses(lm, tok, prompts, answers), rows, rtol=1e-6)
    for i in range(5):      # one row: the mean of masked_ce itself
        one = masked_ce(logits[i:i + 1], jnp.asarray(ids[i:i + 1]), jnp.asarray(lmask[i:i + 1]))
        assert float(one) == pytest.approx(rows[i], rel=1e-6)


def test_heldout_gain_is_none_when_not_measurable(student):
    lm, tok = student
    ctx, history = _three_rounds(lm, tok)
    g = lambda c: compute_signals(["heldout_gain"], c, jax.random.key(0))["heldout_gain"]  # noqa: E731
    assert g(ctx) is not None
    for change in ({"student": None}, {"round": 1, "round_q": (0, 6)},
                   {"adapter_history": {}}, {"adapter_history": {1: history[1], 2: history[2]}},
                   {"round_q": ()}, {"round_q": (0, 6, 6)}):
        fields = {f: getattr(ctx, f) for f in ctx.__dataclass_fields__}
        assert g(SelectionContext(**{**fields, **change})) is None, change


def test_history_depth_and_window(student):
    lm, _ = student
    assert adapter_history_depth([]) == 0
    assert adapter_history_depth(["embeddings", "entropy[tokens=2]", "categories"]) == 0
    assert adapter_history_depth(get_strategy("bandit", {}).signals) == 2
    assert "heldout_gain" in get_strategy("bandit", {"arms": "random"}).signals
    history = {}
    for r in range(5):
        history = record_adapters(history, r, lm, 2)
        assert sorted(history) == list(range(max(0, r - 2), r + 1))
    assert record_adapters(history, 5, lm, 0) == {}


def test_bandit_select_runs_no_model_and_credits_round_r(monkeypatch):
    """With the evidence given as a signal, select needs no student (and calls no model)."""
    import qbudget.signals.common as common
    import qbudget.signals.losses as losses

    def no_model(*a, **k):
        raise AssertionError("select must not run the model")

    monkeypatch.setattr(losses, "pair_losses", no_model)
    monkeypatch.setattr(common, "split_student", no_model)
    strat = get_strategy("bandit", {"arms": "random,stratified", "gamma": 0.2, "reward_scale": 0.1})
    ctx = synthetic_context(n_bought=0)
    state = strat.init(ctx)
    arms = []
    for r, gain in enumerate([None, None, HeldoutGain(0, 0.05, 2.0, 1.9), HeldoutGain(1, -0.1, 2.0, 2.2)]):
        ctx = synthetic_context(n_bought=8 * r, round=r)      # student=None, no history
        sig = {"categories": np.asarray(ctx.categories), "heldout_gain": gain}
        picks, state = strat.select(state, sig, ctx, 8, jax.random.key(r))
        check_contract(picks, ctx, 8)
        arms.append(state["rounds"][-1]["arm"])
    assert [(x["round"], x["arm"], x["reward"]) for x in state["rewards"]] == [
        (0, ("random", "stratified")[arms[0]], pytest.approx(0.5)),
        (1, ("random", "stratified")[arms[1]], 0.0)]
    # EXP3: round 0 drew with uniform probabilities 1/2, so log w += γ·r / (p·A) = 0.2·0.5
    expected = np.zeros(2)
    expected[arms[0]] = 0.2 * 0.5
    np.testing.assert_allclose(state["log_w"], expected)
    assert sorted(state["rounds"][-1]) == ["arm", "probs", "round"]     # no adapters kept
    # evidence for a round already credited (and no longer held) is ignored
    _, again = strat.select(state, {"categories": np.asarray(ctx.categories),
                                    "heldout_gain": HeldoutGain(1, 0.3, 2.0, 1.4)},
                            synthetic_context(n_bought=32, round=4), 8, jax.random.key(9))
    assert len(again["rewards"]) == 2


def test_bandit_without_history_observes_no_reward(student):
    """A context without round_q/adapter_history (an unwired loop): no reward, still valid picks."""
    lm, tok = student
    strat = get_strategy("bandit", {"arms": "random,stratified"})
    state = None
    bought: list[int] = []
    n = 40
    pool = synthetic_pool(n, 0, texts=make_texts(n, 9))
    for r in range(3):
        ctx = SelectionContext.build(pool, bought, make_texts(len(bought), 5), category_names=CATS,
                                     student=lm, tokenizer=tok, round=r)
        state = strat.init(ctx) if state is None else state
        sig = compute_signals(strat.signals, ctx, jax.random.key(r))
        assert sig["heldout_gain"] is None
        picks, state = strat.select(state, sig, ctx, 6, jax.random.key(r))
        check_contract(picks, ctx, 6)
        bought += picks.tolist()
    assert state["rewards"] == [] and not state["log_w"].any()
