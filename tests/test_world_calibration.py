"""benchmarks/world_calibration.py: checks as statistics over seeds (issue 21, item 4).

Synthetic per-seed results only (no world is built or run): the interval, the verdict
rule, the checked quantities, the JSON re-aggregation, the page and the exit code.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "world_calibration", ROOT / "benchmarks" / "world_calibration.py")
wc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wc)

CATS = {  # name: pool share
    "factual-qa": 0.20, "arithmetic": 0.15, "instruction": 0.14, "classification": 0.12,
    "summarisation": 0.10, "creative": 0.095, "style-format": 0.075, "robustness": 0.08,
    "domain-technical": 0.025, "refusal": 0.015,
}


def _fig(v, half=0.05):
    return {"value": v, "ci_low": round(v - half, 4), "ci_high": round(v + half, 4)}


def seed_result(seed, base, distilled, sim=0.61, ceiling=0.79, residual_low=0.1,
                rare_base=0.95, world="tiny-qwen2"):
    cats = {}
    for c, share in CATS.items():
        b = rare_base if share <= 0.03 else 0.8
        d = _fig(0.3)
        if c in wc.FOCUS:
            d = {"value": residual_low + 0.2, "ci_low": residual_low, "ci_high": residual_low + 0.4}
        cats[c] = {"pool_share": share, "base": _fig(b), "distilled": d}
    return {"world": world, "seed": seed, "budget": 1000, "run_seconds": 100.0 + seed,
            "build_seconds": 0.1, "base_advantage": _fig(base),
            "distilled_advantage": _fig(distilled), "similarity": _fig(sim, 0.01),
            "similarity_ceiling": _fig(ceiling, 0.01), "distilled_similarity": _fig(0.7, 0.01),
            "categories": cats}


# the issue's figures: seed 0 (docs), seeds 1 and 2 (tried in issue 21)
ISSUE = [(0, 0.830, 0.402), (1, 0.876, 0.400), (2, 0.832, 0.360)]


def test_t_interval_matches_student_t():
    m, lo, hi = wc.t_interval([1.0, 2.0, 3.0])
    # s = 1, t(0.975, 2) = 4.302653
    assert m == pytest.approx(2.0)
    assert hi - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert m - lo == pytest.approx(hi - m)
    assert wc.t_interval([0.4]) == (0.4, 0.4, 0.4)
    assert wc.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("interval,target,expected", [
    ((0.80, 0.84), (0.25, 0.85, False, False), "pass"),
    ((0.80, 0.90), (0.25, 0.85, False, False), "consistent"),
    ((0.86, 0.90), (0.25, 0.85, False, False), "fail"),
    ((0.10, 0.24), (0.25, 0.85, False, False), "fail"),
    ((0.10, 0.30), (0.25, 0.85, False, False), "consistent"),
    ((0.40, 0.50), (-math.inf, 0.5, False, False), "pass"),
    ((0.50, 0.60), (-math.inf, 0.5, False, False), "consistent"),
    ((0.51, 0.60), (-math.inf, 0.5, False, False), "fail"),
    ((-0.05, 0.02), (0.0, math.inf, True, False), "consistent"),
    ((-0.05, 0.00), (0.0, math.inf, True, False), "fail"),  # > 0 is strict
    ((0.00, 0.20), (0.0, math.inf, True, False), "consistent"),
    ((0.01, 0.20), (0.0, math.inf, True, False), "pass"),
    ((math.nan, math.nan), (0.0, math.inf, True, False), "fail"),
])
def test_verdict(interval, target, expected):
    assert wc.verdict(*interval, target) == expected


def test_quantities_keep_the_single_run_checks():
    r = wc.with_checks(seed_result(0, 0.830, 0.402))
    q = r["quantities"]
    assert q["similarity_below_ceiling"] == pytest.approx(0.18)
    assert q["base_advantage_in_range"] == 0.830
    assert q["distilled_advantage_halved"] == pytest.approx(0.402 / 0.830, abs=1e-4)
    assert q["residual_lower_bound_above_0[robustness]"] == 0.1
    assert q["rare_category_among_top_gaps"] == pytest.approx(0.15)
    assert all(r["checks"].values())
    assert r["largest_base_gaps"][0] in ("domain-technical", "refusal")
    # a rare category below the third largest other gap: margin < 0, check fails
    low = wc.with_checks(seed_result(0, 0.830, 0.402, rare_base=0.5))
    assert low["quantities"]["rare_category_among_top_gaps"] == pytest.approx(-0.3)
    assert not low["checks"]["rare_category_among_top_gaps"]
    # the old single-run base-advantage check fails at seed 1 (0.876 > 0.85)
    assert not wc.with_checks(seed_result(1, 0.876, 0.400))["checks"]["base_advantage_in_range"]


def test_issue_seeds_pass_by_interval():
    agg = wc.aggregate([seed_result(s, b, d) for s, b, d in ISSUE])
    base = agg["checks"]["base_advantage_in_range"]
    assert base["per_seed"] == [0.830, 0.876, 0.832]
    assert base["mean"] == pytest.approx(0.846, abs=1e-3)
    lo, hi = base["interval"]
    assert lo < 0.85 < hi
    assert base["verdict"] == "consistent" and base["ok"]
    halved = agg["checks"]["distilled_advantage_halved"]
    # ratios 0.484, 0.457, 0.433: the mean is under 0.5, the interval reaches above it
    assert halved["mean"] == pytest.approx(0.458, abs=1e-3)
    assert halved["interval"][0] < 0.5 < halved["interval"][1]
    assert halved["verdict"] == "consistent" and halved["ok"]
    assert agg["ok"]
    assert agg["seeds"] == [0, 1, 2]
    assert agg["mean_run_seconds"] == pytest.approx(101.0)
    assert set(agg["checks"]) == set(wc.CHECKS)
    assert agg["categories"]["refusal"]["base"]["mean"] == pytest.approx(0.95)


def test_a_check_fails_only_when_its_interval_is_on_the_wrong_side():
    agg = wc.aggregate([seed_result(s, b, 0.40 + 0.05 * s) for s, b in
                        [(0, 0.88), (1, 0.90), (2, 0.89)]])
    assert agg["checks"]["base_advantage_in_range"]["verdict"] == "fail"
    assert agg["checks"]["distilled_advantage_halved"]["verdict"] == "consistent"
    assert not agg["ok"]
    # a missing figure in any seed fails the check
    rs = [seed_result(s, b, d) for s, b, d in ISSUE]
    rs[1]["similarity_ceiling"] = None
    assert wc.aggregate(rs)["checks"]["similarity_below_ceiling"]["verdict"] == "fail"


def test_advantage_intervals_are_clipped_to_their_range():
    agg = wc.aggregate([seed_result(0, 0.830, 0.378), seed_result(1, 0.860, 0.372)])
    # two seeds: t(0.975, 1) = 12.7, so the raw interval passes 1
    assert agg["checks"]["base_advantage_in_range"]["interval"][1] == 1.0
    assert agg["summary"]["base_advantage"]["interval"][1] == 1.0
    assert agg["checks"]["distilled_advantage_halved"]["interval"][0] < 0.44


def test_parse_seeds():
    assert wc.parse_seeds("0,1,2") == [0, 1, 2]
    assert wc.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert wc.parse_seeds("0-1,7") == [0, 1, 7]
    with pytest.raises(Exception):
        wc.parse_seeds("1,1")
    with pytest.raises(Exception):
        wc.parse_seeds("3-1")


def test_main_from_json_exit_code_and_page(tmp_path, capsys):
    files = []
    for s, b, d in ISSUE:
        p = tmp_path / f"seed{s}.json"
        p.write_text(json.dumps(seed_result(s, b, d)))
        files.append(str(p))
    doc = tmp_path / "worlds.md"
    doc.write_text(f"# Worlds\n\n## Calibration\n\n{wc.START}\nold\n{wc.END}\n\ntail\n")
    assert wc.main(["--from-json", *files, "--doc", str(doc)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["checks"]["base_advantage_in_range"]["verdict"] == "consistent"
    text = doc.read_text()
    assert "old" not in text and text.endswith("tail\n")
    assert "| base_advantage_in_range | best advantage at q = 0 | in [0.25, 0.85] | " \
           "0.830, 0.876, 0.832 |" in text
    assert "consistent" in text
    # the aggregated output re-aggregates to the same checks
    agg = tmp_path / "agg.json"
    agg.write_text(json.dumps(out))
    assert wc.main(["--from-json", str(agg), "--no-doc"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["checks"] == out[0]["checks"]
    # seed 1 alone: the single-run check, which fails, and the exit code says so
    assert wc.main(["--from-json", files[1], "--no-doc"]) == 1
    one = json.loads(capsys.readouterr().out)[0]["checks"]["base_advantage_in_range"]
    assert one["interval"] == [0.876, 0.876] and one["verdict"] == "fail"
