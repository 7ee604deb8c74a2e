"""Evaluation items (teacher probe answers) needed to reach a verdict: sequential
ε-certification (``qbudget.certify``) vs a fixed-size Clopper–Pearson test; prints one JSON
object.

For each true advantage (0, 0.05, 0.2; ε = 0.1, α = 0.05, first checkpoint, so both tests
run at α_1 = α/2 = 0.025, the level the loop spends there) it simulates many runs of 0/1
adversary correctness with accuracy (1 + advantage)/2, monitors each after every item and
records where the sequential test stopped and which verdict it reached ("certified" is
right for |advantage| ≤ ε, "distinguishable" otherwise).

The fixed-size test has no stopping time; its "items needed" is the ``n`` it must be sized
to before seeing data (``qbudget.certify.fixed_size_items``), reported three ways so that
no single convention decides the comparison:

* ``fixed_power_0.5``: sized for a coin-flip chance of the right verdict at the *known*
  true advantage — the median-matched comparison, the most favourable to the fixed test;
* ``fixed_power_0.8``: the usual planning target, still at the known advantage;
* ``fixed_matched_power``: sized for the share of runs in which the sequential test
  reached the right verdict (Wald's comparison: equal level, equal power);
* ``fixed_design_0.8``: one size for all three advantages (a design must be sized before
  knowing which holds), power 0.8 at each.

Usage: ``python benchmarks/perf_certify.py [--quick] [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qbudget import certify as C  # noqa: E402

EPS, ALPHA = 0.1, 0.05
ADVANTAGES = (0.0, 0.05, 0.2)


def simulate(advantage: float, runs: int, items: int, level: float, seed: int):
    """Verdict codes and items used for ``runs`` streams, in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    acc = (1 + advantage) / 2
    verdicts, used = [], []
    for start in range(0, runs, 200):
        b = min(200, runs - start)
        v, u = C.certify_runs(rng.random((b, items)) < acc, EPS, level)
        verdicts.append(v)
        used.append(u)
    return np.concatenate(verdicts), np.concatenate(used)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer runs (smoke test)")
    ap.add_argument("--runs", type=int, default=None)
    a = ap.parse_args()
    runs = a.runs or (300 if a.quick else 2000)
    items = 40_000
    level = C.checkpoint_level(ALPHA, 1)
    t0 = time.perf_counter()
    rows = {}
    fixed80 = {}
    for i, adv in enumerate(ADVANTAGES):
        v, used = simulate(adv, runs, items, level, seed=1000 + i)
        right = C.CERTIFIED if abs(adv) <= EPS else C.DISTINGUISHABLE
        share_right = float((v == right).mean())
        matched = min(share_right, 0.999)
        f50 = C.fixed_size_items(EPS, level, adv, 0.5)
        f80 = C.fixed_size_items(EPS, level, adv, 0.8)
        fm = C.fixed_size_items(EPS, level, adv, matched)
        fixed80[adv] = f80
        med, mean = float(np.median(used)), float(used.mean())
        rows[f"advantage_{adv:g}"] = {
            "right_verdict": C.VERDICTS[right],
            "sequential": {
                "share_right": round(share_right, 4),
                "share_wrong": round(float(((v != right) & (v != C.UNDECIDED)).mean()), 4),
                "share_undecided": round(float((v == C.UNDECIDED).mean()), 4),
                "items_median": med, "items_mean": round(mean, 1),
                "items_p90": float(np.percentile(used, 90)),
            },
            "fixed_power_0.5": f50,
            "fixed_power_0.8": f80,
            "fixed_matched_power": {"power": round(matched, 4), "items": fm},
            "ratio_median_to_fixed_0.5": round(med / f50, 3),
            "ratio_median_to_fixed_0.8": round(med / f80, 3),
            "ratio_mean_to_fixed_matched": round(mean / fm, 3),
        }
    design = max(fixed80.values())
    for adv in ADVANTAGES:
        r = rows[f"advantage_{adv:g}"]
        r["fixed_design_0.8"] = design
        r["ratio_median_to_fixed_design"] = round(r["sequential"]["items_median"] / design, 3)
    a0 = rows["advantage_0"]
    report = {
        "epsilon": EPS, "alpha": ALPHA, "checkpoint": 1, "level": level,
        "runs": runs, "item_cap": items,
        "results": rows,
        "target_sequential_le_50pct_at_advantage_0": {
            "vs_fixed_power_0.5 (median)": a0["ratio_median_to_fixed_0.5"] <= 0.5,
            "vs_fixed_power_0.8 (median)": a0["ratio_median_to_fixed_0.8"] <= 0.5,
            "vs_fixed_matched_power (mean)": a0["ratio_mean_to_fixed_matched"] <= 0.5,
            "vs_fixed_design_0.8 (median)": a0["ratio_median_to_fixed_design"] <= 0.5,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
