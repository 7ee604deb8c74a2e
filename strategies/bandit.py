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
0, 1)`` and updates arm a_r with EXP3's importance-weighted rule. The bandit keeps
host copies of the student's LoRA leaves for the last two rounds (kilobytes for LoRA).
Without a student in the context no reward is observed and the arm choice stays
uniform-ish. The declared signals are the union of the arms' signals.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from qbudget.errors import QBudgetError
from qbudget.signals import pair_losses, parse_spec, lora_snapshot
from qbudget.strategy import SelectionContext, Strategy, get_strategy, numpy_rng

DEFAULT_ARMS = "random,stratified,diversity,uncertainty"


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
    signals: dict[str, str] = {}
    for s in strategies:
        for sp in s.signals:
            base = parse_spec(sp)[0]
            if base in signals and parse_spec(signals[base]) != parse_spec(sp):
                raise QBudgetError(f"bandit: arms ask for signal '{base}' with different parameters")
            signals[base] = sp

    def init(ctx: SelectionContext):
        return {"log_w": np.zeros(len(strategies)), "arm_states": [s.init(ctx) for s in strategies],
                "rounds": [], "rewards": []}

    def _feedback(state, ctx: SelectionContext):
        """Credit arm a_r once B_{r+1} is bought (see module docstring)."""
        rounds = state["rounds"]
        if ctx.student is None or len(rounds) < 2:
            return
        prev, last = rounds[-2], rounds[-1]
        if prev.get("credited") or prev["lora"] is None or last["lora"] is None:
            return
        where = {int(i): j for j, i in enumerate(np.asarray(ctx.bought_indices))}
        rows = [where[int(i)] for i in last["picks"] if int(i) in where]
        if not rows:
            return
        prompts = [ctx.pool[int(ctx.bought_indices[j])].text for j in rows]
        answers = [ctx.answers[j] for j in rows]
        before = float(np.mean(pair_losses(ctx.student, ctx.tokenizer, prompts, answers, lora=prev["lora"])))
        after = float(np.mean(pair_losses(ctx.student, ctx.tokenizer, prompts, answers, lora=last["lora"])))
        drop = (before - after) / max(before, 1e-8)
        reward = float(np.clip(drop / reward_scale, 0.0, 1.0))
        a = prev["arm"]
        state["log_w"][a] += gamma * reward / (prev["probs"][a] * len(strategies))
        state["rewards"].append({"round": prev["round"], "arm": names[a], "drop": drop, "reward": reward})
        prev["credited"] = True

    def select(state, signals, ctx: SelectionContext, k: int, key):
        state = {**state, "log_w": np.array(state["log_w"], dtype=np.float64),
                 "arm_states": list(state["arm_states"]), "rounds": [dict(r) for r in state["rounds"]],
                 "rewards": list(state["rewards"])}
        _feedback(state, ctx)
        probs = exp3_probs(state["log_w"], gamma)
        a = int(numpy_rng(jax.random.fold_in(key, 0)).choice(len(strategies), p=probs))
        arm = strategies[a]
        arm_signals = {parse_spec(sp)[0]: signals[parse_spec(sp)[0]] for sp in arm.signals}
        picks, state["arm_states"][a] = arm.select(state["arm_states"][a], arm_signals, ctx, k,
                                                   jax.random.fold_in(key, 1))
        snap = lora_snapshot(ctx.student) if ctx.student is not None else None
        state["rounds"] = state["rounds"][-1:] + [{"round": ctx.round, "arm": a, "probs": probs,
                                                   "picks": np.asarray(picks, np.int64), "lora": snap}]
        return picks, state

    return Strategy("bandit", make.__doc__, tuple(signals.values()),
                    {"arms": ",".join(names), "gamma": gamma, "reward_scale": reward_scale}, init, select)
