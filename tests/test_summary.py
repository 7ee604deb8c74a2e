"""Sweep summaries: aggregation over seeds, AUC, ε, paired comparisons, residuals, rendering."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats

from qbudget.errors import QBudgetError
from qbudget.summary import auc_log_q, mean_ci, print_summary, render_markdown, summarize

QS = (0, 16, 64, 256)
CATEGORIES = ("math", "code", "chat")
#: per strategy: how fast the advantage decays with q, and the floor it decays to
SHAPES = {"random": (120.0, 0.20), "stratified": (60.0, 0.12), "diversity": (30.0, 0.05)}


def synthetic_results(worlds=("tiny",), strategies=tuple(SHAPES), seeds=(0, 1, 2), qs=QS,
                      categories=CATEGORIES, seed=0) -> pd.DataFrame:
    """A results table shaped like a sweep's: advantage per adversary (ngram, embed and
    their max) and category, p-values, similarity and a similarity ceiling. A stubborn
    'code' category keeps a residual advantage for every strategy."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in worlds:
        for s in strategies:
            tau, floor = SHAPES.get(s, (80.0, 0.1))
            for sd in seeds:
                run_id = f"{w}__{s}__seed{sd}"
                for q in qs:
                    base = dict(run_id=run_id, world=w, strategy=s, seed=sd, q=q, paid=q)
                    level = floor + (0.9 - floor) * math.exp(-q / tau)
                    for cat in ("all",) + tuple(categories):
                        bump = 0.25 if cat == "code" else 0.0
                        vals = {}
                        for adv, off in (("ngram", 0.0), ("embed", -0.05)):
                            v = float(np.clip(level + bump + off + rng.normal(0, 0.02), 0, 1))
                            vals[adv] = v
                            rows.append({**base, "metric": "advantage", "adversary": adv,
                                         "category": cat, "value": v, "ci_low": v - 0.06,
                                         "ci_high": min(1.0, v + 0.06), "n": 1000})
                            rows.append({**base, "metric": "p_value", "adversary": adv,
                                         "category": cat, "value": 1e-3, "ci_low": None,
                                         "ci_high": None, "n": 1000})
                        vmax = max(vals.values())
                        rows.append({**base, "metric": "advantage", "adversary": "max",
                                     "category": cat, "value": vmax, "ci_low": vmax - 0.08,
                                     "ci_high": min(1.0, vmax + 0.08), "n": 1000})
                        sim = float(0.5 + 0.4 * (1 - level) + rng.normal(0, 0.01))
                        rows.append({**base, "metric": "similarity", "adversary": "",
                                     "category": cat, "value": sim, "ci_low": sim - 0.01,
                                     "ci_high": sim + 0.01, "n": 1000})
                    rows.append({**base, "metric": "similarity_ceiling", "adversary": "",
                                 "category": "all", "value": 0.93, "ci_low": 0.92,
                                 "ci_high": 0.94, "n": 1000})
    return pd.DataFrame(rows)


def _fixed_headline(values: dict[tuple[str, int], list[float]], qs=QS, ci=0.05) -> pd.DataFrame:
    """Only max/all advantage rows, with chosen values per (strategy, seed)."""
    rows = []
    for (s, sd), vs in values.items():
        for q, v in zip(qs, vs):
            rows.append(dict(run_id=f"{s}{sd}", world="w", strategy=s, seed=sd, q=q,
                             metric="advantage", adversary="max", category="all", value=v,
                             ci_low=v - ci, ci_high=v + ci, n=100, paid=q))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def synth():
    return synthetic_results()


@pytest.fixture(scope="module")
def summary(synth):
    return summarize(synth, baseline="stratified", epsilon=0.3, seed=0, n_resamples=2000)


def test_mean_ci_is_the_student_t_interval():
    m, lo, hi, n = mean_ci([0.2, 0.4, 0.3])
    half = stats.t.ppf(0.975, 2) * np.std([0.2, 0.4, 0.3], ddof=1) / math.sqrt(3)
    assert (n, m) == (3, pytest.approx(0.3))
    assert (lo, hi) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    m, lo, hi, n = mean_ci([0.7])
    assert (m, n) == (0.7, 1) and math.isnan(lo) and math.isnan(hi)


def test_auc_matches_hand_computation():
    # x = log2(q+1) = 0, log2(17), log2(65), log2(257)
    v = [0.9, 0.5, 0.3, 0.2]
    x = [0.0, math.log2(17), math.log2(65), math.log2(257)]
    area = sum((x[i + 1] - x[i]) * (v[i] + v[i + 1]) / 2 for i in range(3))
    assert auc_log_q(QS, v) == pytest.approx(area / math.log2(257))
    assert auc_log_q([64, 0, 256, 16], [0.3, 0.9, 0.2, 0.5]) == pytest.approx(area / math.log2(257))
    assert auc_log_q([16], [0.4]) != auc_log_q([16], [0.4])  # NaN: no area from one point


def test_summary_contains_every_strategy_adversary_and_q(summary, synth):
    assert summary.worlds == ["tiny"]
    assert summary.strategies["tiny"][0] == "stratified"
    assert set(summary.strategies["tiny"]) == set(SHAPES)
    assert summary.q_grid["tiny"] == list(QS)
    adv = summary.advantage
    assert set(adv["adversary"]) == {"ngram", "embed", "max"}
    assert len(adv) == 3 * 3 * len(QS)
    assert (adv["n"] == 3).all()
    # the aggregated mean is the mean over seeds of the raw rows
    raw = synth[(synth.strategy == "random") & (synth.q == 64) & (synth.metric == "advantage")
                & (synth.adversary == "max") & (synth.category == "all")]["value"]
    got = adv[(adv.strategy == "random") & (adv.q == 64) & (adv.adversary == "max")]
    assert got["mean"].item() == pytest.approx(raw.mean())
    assert got["ci_low"].item() < raw.mean() < got["ci_high"].item()
    assert len(summary.similarity) == 3 * len(QS)
    assert summary.ceiling["mean"].item() == pytest.approx(0.93)
    md = render_markdown(summary)
    for s in SHAPES:
        assert s in md
    for header in ("Max advantage", "Advantage by adversary", "Semantic similarity",
                   "Paired comparison", "Per-category residuals"):
        assert header in md


def test_auc_and_epsilon_on_a_hand_made_table():
    values = {("stratified", 0): [0.9, 0.6, 0.4, 0.35], ("stratified", 1): [0.9, 0.7, 0.5, 0.45],
              ("fast", 0): [0.9, 0.3, 0.2, 0.1], ("fast", 1): [0.9, 0.4, 0.25, 0.15]}
    s = summarize(_fixed_headline(values), epsilon=0.3, n_resamples=500)
    auc = s.auc.set_index("strategy")
    expect = np.mean([auc_log_q(QS, values[("fast", 0)]), auc_log_q(QS, values[("fast", 1)])])
    assert auc.loc["fast", "mean"] == pytest.approx(expect)
    assert auc.loc["fast", "n"] == 2
    eps = s.epsilon_reached.set_index("strategy")
    # fast: mean upper bounds (value + 0.05) = 0.95, 0.40, 0.275, 0.175 -> first <= 0.3 at q=64
    assert eps.loc["fast", "q_reached"] == 64
    assert eps.loc["fast", "final_upper"] == pytest.approx(0.175)
    # stratified: final mean upper bound 0.45 > 0.3 -> not reached
    assert pd.isna(eps.loc["stratified", "q_reached"])
    md = render_markdown(s)
    assert "not reached" in md and "| 64 |" in md


def test_paired_comparison_pairs_on_seed_and_reports_the_differences():
    # final-q differences (fast - stratified) per seed: -0.25, -0.3, -0.2, -0.35, -0.28, -0.31
    base = [0.4, 0.45, 0.38, 0.5, 0.41, 0.47]
    diffs = [-0.25, -0.3, -0.2, -0.35, -0.28, -0.31]
    values = {}
    for sd, (b, d) in enumerate(zip(base, diffs)):
        values[("stratified", sd)] = [0.9, 0.7, 0.5, b]
        values[("fast", sd)] = [0.9, 0.6, 0.3, b + d]
    # an unpaired seed of the strategy is ignored
    values[("fast", 99)] = [0.9, 0.1, 0.1, 0.0]
    s = summarize(_fixed_headline(values), baseline="stratified", n_resamples=2000, seed=3)
    p = s.paired.set_index("measure")
    final = p.loc["final advantage"]
    assert final["n"] == 6 and final["q"] == 256
    assert final["mean_diff"] == pytest.approx(np.mean(diffs))
    # the statistic is the paired t the sign-flip test permutes (it was Wilcoxon's W = 0)
    d = np.asarray(diffs)
    assert final["statistic"] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(6)))
    assert final["p_value"] == pytest.approx(2 / 2 ** 6)  # all six negative: exact p = 2/64
    assert 0 < final["mde"] < np.inf and f"MDE {final['mde']:.3g}" in final["verdict"]
    assert final["ci_low"] <= np.mean(diffs) <= final["ci_high"] < 0
    assert final["verdict"].startswith("lower final advantage than baseline (p=0.031")
    auc_diffs = [auc_log_q(QS, values[("fast", sd)]) - auc_log_q(QS, values[("stratified", sd)])
                 for sd in range(6)]
    assert p.loc["advantage AUC", "mean_diff"] == pytest.approx(np.mean(auc_diffs))
    # deterministic given the seed
    again = summarize(_fixed_headline(values), baseline="stratified", n_resamples=2000, seed=3)
    assert again.paired["ci_low"].tolist() == s.paired["ci_low"].tolist()


def test_few_seeds_are_called_not_distinguishable_with_the_floor_explained(summary):
    p = summary.paired
    assert set(p["strategy"]) == {"random", "diversity"}
    assert (p["n"] == 3).all()
    # 3 seeds: the exact two-sided p cannot go below 2/8 = 0.25
    assert (p["p_value"] >= 0.25 - 1e-12).all()
    assert all(v.startswith("not distinguishable from baseline at these seeds") for v in p["verdict"])
    assert all("cannot go below 0.25" in n for n in p["note"])
    # diversity decays fastest in the generator: its mean difference is negative
    d = p[(p.strategy == "diversity") & (p.measure == "advantage AUC")]["mean_diff"].item()
    assert d < 0


def test_missing_baseline_is_a_note_not_a_crash(synth):
    s = summarize(synth, baseline="nonexistent", n_resamples=200)
    assert s.paired.empty
    assert any("baseline 'nonexistent'" in n for n in s.notes)


def test_residuals_flag_the_category_where_advantage_remains(summary):
    r = summary.residuals
    assert set(r["category"]) == set(CATEGORIES)
    assert (r["q"] == 256).all()
    code = r[r.category == "code"]
    assert code["remains"].all() and (code["seeds_detected"] == 3).all()
    div = r[(r.strategy == "diversity")].set_index("category")
    # diversity's floor 0.05 - 0.08 (max adversary's half-width) keeps the LB below 0
    assert not div.loc["math", "remains"]
    md = render_markdown(summary)
    assert "**YES**" in md
    assert "diversity/code" in md and "diversity/math" not in md.split("remains (mean lower")[1].split("\n")[0]


def test_one_seed_says_n1_and_gives_no_interval():
    values = {("stratified", 0): [0.9, 0.6, 0.4, 0.35], ("fast", 0): [0.9, 0.3, 0.2, 0.1]}
    s = summarize(_fixed_headline(values), n_resamples=100)
    assert s.advantage["ci_low"].isna().all()
    md = render_markdown(s)
    assert "0.100 (n=1)" in md
    final = s.paired.set_index("measure").loc["final advantage"]
    assert final["n"] == 1 and math.isnan(final["p_value"])
    assert "not distinguishable" in final["verdict"]


def test_print_summary_renders_rich_tables(summary):
    buf = io.StringIO()
    print_summary(summary, Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    for s in SHAPES:
        assert s in out
    assert "Paired comparison" in out and "YES" in out


def test_bad_inputs_raise_one_line_errors(synth):
    with pytest.raises(QBudgetError, match="no result rows"):
        summarize(synth.iloc[0:0])
    with pytest.raises(QBudgetError, match="lacks column"):
        summarize(synth.drop(columns=["value"]))
    with pytest.raises(QBudgetError, match="epsilon"):
        summarize(synth, epsilon=1.5)
    with pytest.raises(QBudgetError, match="no 'advantage' rows"):
        summarize(synth[synth.metric == "similarity"])


def test_single_budget_and_results_without_a_max_row():
    # only q=256, and only per-adversary rows: max is taken per run, AUC is undefined
    df = synthetic_results(qs=(256,), seeds=(0, 1))
    df = df[df.adversary != "max"]
    s = summarize(df, n_resamples=200)
    assert "max" in set(s.advantage["adversary"])
    raw = df[(df.strategy == "random") & (df.metric == "advantage") & (df.category == "all")]
    per_seed_max = raw.groupby("seed")["value"].max().mean()
    got = s.advantage[(s.advantage.strategy == "random") & (s.advantage.adversary == "max")]
    assert got["mean"].item() == pytest.approx(per_seed_max)
    assert s.auc["mean"].isna().all()
    assert set(s.paired["measure"]) == {"final advantage"}
    assert "–" in render_markdown(s)


def _paired_rows(md: str) -> dict[tuple[str, str], dict[str, str]]:
    """The paired table of a rendered summary: (strategy, measure) -> {header: cell}."""
    block = md.split("### Paired comparison")[1].split("\n\n")[1].splitlines()
    header = [h.strip() for h in block[0].strip("|").split("|")]
    rows = {}
    for line in block[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[(cells["strategy"], cells["measure"])] = cells
    return rows


def test_hierarchical_interval_beside_each_final_advantage_verdict():
    """Six seeds whose final differences barely vary: the seed-level bootstrap is narrow,
    but each max advantage rests on n = 100 items, whose noise the hierarchical interval
    (seeds, then items) carries: it holds the mean difference and is about as wide as the
    item noise says (per seed, 2·sqrt(p(1−p)/n) for each cell, over √6 seeds)."""
    base = [0.40, 0.45, 0.38, 0.50, 0.41, 0.47]
    diffs = [-0.20, -0.21, -0.19, -0.20, -0.22, -0.18]
    values = {}
    for sd, (b, d) in enumerate(zip(base, diffs)):
        values[("stratified", sd)] = [0.9, 0.7, 0.5, b]
        values[("fast", sd)] = [0.9, 0.6, 0.3, b + d]
    df = _fixed_headline(values)
    s = summarize(df, baseline="stratified", n_resamples=4000, seed=1)
    p = s.paired.set_index("measure")
    final = p.loc["final advantage"]
    lo, hi = final["hier_low"], final["hier_high"]
    assert lo < np.mean(diffs) < hi < 0
    assert hi - lo > 3 * (final["ci_high"] - final["ci_low"])
    acc_s = (np.add(base, diffs) + 1) / 2
    acc_b = (np.asarray(base) + 1) / 2
    item_sd = 2 * np.sqrt((acc_s * (1 - acc_s) + acc_b * (1 - acc_b)) / 100).mean() / np.sqrt(6)
    assert hi - lo == pytest.approx(2 * 1.96 * item_sd, rel=0.2)
    # the AUC has no item-level data: no hierarchical interval
    assert np.isnan(p.loc["advantage AUC", "hier_low"])
    # in the text: the Markdown table and the console's
    md = render_markdown(s)
    rows = _paired_rows(md)
    col = "hierarchical 95% CI (seeds, items)"
    assert rows[("fast", "final advantage")][col] == f"({lo:+.3f}, {hi:+.3f})"
    assert rows[("fast", "advantage AUC")][col] == "–"
    assert "Hierarchical CI: percentile bootstrap over seeds, then over the probe items" in md
    buf = io.StringIO()
    print_summary(s, Console(file=buf, width=250, color_system=None))
    out = buf.getvalue()
    assert "hierarchical 95% CI" in out and f"({lo:+.2f}, {hi:+.2f})" in out
    # seeded
    again = summarize(df, baseline="stratified", n_resamples=4000, seed=1)
    assert again.paired["hier_low"].tolist()[0] == lo
    # results without item counts (n) get no hierarchical interval, not a made-up one
    bare = summarize(df.drop(columns=["n"]), baseline="stratified", n_resamples=500)
    assert bare.paired["hier_low"].isna().all() and bare.paired["hier_high"].isna().all()
    nulls = df.assign(n=pd.array([None] * len(df), dtype="Int64"))
    assert summarize(nulls, baseline="stratified", n_resamples=500).paired["hier_low"].isna().all()
    assert _paired_rows(render_markdown(bare))[("fast", "final advantage")][col] == "–"
