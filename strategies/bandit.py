"""``bandit``: EXP3 over base strategies, rewarded by held-out loss drops on bought data.

Each round the bandit draws one arm (a registered strategy) from the EXP3 distribution
``p = (1−γ)·w/Σw + γ/A`` with the round key, and lets it pick the whole batch.

Reward (no probe leakage — only bought answers are used). Let S_r be the student at
round r's selection (trained on the batches B_0..B_{r−1}) and B_r the batch arm a_r
bought. Two rounds later, B_{r+1} is a batch neither S_r nor S_{r+1} has trained on, so

    drop_r = (L(S_r, B_{r+1}) − L(S_{r+1}, B_{r+1})) / L(S_r, B_{r+1})

— the relative fall of the mean response NLL on fresh teacher answers caused by
training on B_r — is an unbiased-by-selection, held-out measure of B_r's value (both
students are scored on the *same* batch). The reward is ``clip(drop_r / reward_scale,
0, 1)`` and updates arm a_r with EXP3's importance-weighted rule.

The drop is the signal ``heldout_gain`` (:mod:`qbudget.signals.losses`), computed by the
loop from its history of the student's adapters, so ``select`` runs no model and is a
pure function of its inputs; the state keeps only each recent round's arm, its
probabilities and whether it was credited. Without the signal (no student, or a context
without adapter history) no reward is observed and the arm choice stays uniform-ish.
The declared signals are ``heldout_gain`` plus the union of the arms' signals.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from qbudget.errors import QBudgetError
from qbudget.signals import parse_spec
from qbudget.strategy import SelectionContext, Strategy, get_strategy, numpy_rng

DEFAULT_ARMS = "random,stratified,diversity,uncertainty"
EVIDENCE = "heldout_gain"


def _arm_names(arms) -> list[str]:
    names = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else [str(a) for a in arms]
    names = [a for a in names if a]
    if not names:
        raise QBudgetError("bandit: arms must name at least one strategy")
    if "bandit" in names:
        raise QBudgetError("bandit: a bandit cannot be its own arm")
    if len(set(names)) != len(names):
        raise QBudgetError("bandit: arms must be distinct")
    return names


def exp3_probs(log_w: np.ndarray, gamma: float) -> np.ndarray:
    w = np.exp(log_w - log_w.max())
    return (1.0 - gamma) * w / w.sum() + gamma / len(w)


def _declared_signals(strategies) -> tuple[str, ...]:
    """The arms' signal specs, one per name (arms must agree on parameters), then the evidence."""
    signals: dict[str, str] = {}
    for sp in [sp for s in strategies for sp in s.signals] + [EVIDENCE]:
        base = parse_spec(sp)[0]
        if base in signals and parse_spec(signals[base]) != parse_spec(sp):
            raise QBudgetError(f"bandit: arms ask for signal '{base}' with different parameters")
        signals[base] = sp
    return tuple(signals.values())


def make(arms: str | Sequence[str] = DEFAULT_ARMS, gamma: float = 0.2,
         reward_scale: float = 0.1) -> Strategy:
    """EXP3 over base strategies, rewarded by the held-out NLL drop on freshly bought answers."""
    names = _arm_names(arms)
    if not 0.0 < float(gamma) <= 1.0:
        raise QBudgetError("bandit: gamma must be in (0, 1]")
    if float(reward_scale) <= 0:
        raise QBudgetError("bandit: reward_scale must be > 0")
    gamma, reward_scale = float(gamma), float(reward_scale)
    strategies = [get_strategy(n, {}) for n in names]
    signals = _declared_signals(strategies)

    def init(ctx: SelectionContext):
        return {"log_w": np.zeros(len(strategies)), "arm_states": [s.init(ctx) for s in strategies],
                "rounds": [], "rewards": []}

    def _credit(state, gain) -> None:
        """Credit arm a_r with the reward of ``gain`` (a ``HeldoutGain`` for round r), once."""
        if gain is None:
            return
        rec = next((r for r in state["rounds"] if r["round"] == gain.round), None)
        if rec is None or rec.get("credited"):
            return
        drop = float(gain.drop)
        reward = float(np.clip(drop / reward_scale, 0.0, 1.0))
        a = rec["arm"]
        state["log_w"][a] += gamma * reward / (rec["probs"][a] * len(strategies))
        state["rewards"].append({"round": rec["round"], "arm": names[a], "drop": drop, "reward": reward})
        rec["credited"] = True

    def select(state, signals, ctx: SelectionContext, k: int, key):
        state = {**state, "log_w": np.array(state["log_w"], dtype=np.float64),
                 "arm_states": list(state["arm_states"]), "rounds": [dict(r) for r in state["rounds"]],
                 "rewards": list(state["rewards"])}
        _credit(state, signals.get(EVIDENCE))
        probs = exp3_probs(state["log_w"], gamma)
        a = int(numpy_rng(jax.random.fold_in(key, 0)).choice(len(strategies), p=probs))
        arm = strategies[a]
        arm_signals = {parse_spec(sp)[0]: signals[parse_spec(sp)[0]] for sp in arm.signals}
        picks, state["arm_states"][a] = arm.select(state["arm_states"][a], arm_signals, ctx, k,
                                                   jax.random.fold_in(key, 1))
        # the evidence for round r arrives at round r + 2: keep the last two rounds
        state["rounds"] = state["rounds"][-1:] + [{"round": int(ctx.round), "arm": a, "probs": probs}]
        return picks, state

    return Strategy("bandit", make.__doc__, signals,
                    {"arms": ",".join(names), "gamma": gamma, "reward_scale": reward_scale}, init, select)
