"""Summaries of a sweep's results: the tables a user reads to pick a strategy.

From the long results table (:mod:`qbudget.results`) this computes, per world and strategy:

* **advantage** of the ``max`` adversary and of each adversary (category ``all``) and
  **similarity** at each q, as the mean over seeds with a 95% Student-t interval (with one
  seed: the value, ``n=1``, no interval);
* the **AUC** of the max-advantage-vs-q curve. Convention (used everywhere in qbudget):
  trapezoid rule over ``x = log2(q + 1)``, divided by the x-range, i.e. the *average max
  advantage along a log-q axis*, in the same [0, 1] units as advantage. Log-q because
  budgets are doubling schedules and each doubling should weigh the same; normalised so
  sweeps with different largest budgets stay comparable. Computed per run on the q values
  every run of the world reached, then averaged over seeds;
* the **queries needed to reach ε**: the first q at which the mean over seeds of the max
  adversary's upper confidence bound is ≤ ε ("not reached" otherwise). When the runs were
  certified sequentially (``[certify]``: their results hold ``certify_epsilon`` rows) it
  is the **certified q** instead: per seed the ``q_certified`` of the run (the checkpoint
  at which every adversary was certified and the run stopped buying), reported as the
  largest over seeds when every seed certified, else "not certified" with the count;
* **paired comparisons against the baseline** (:mod:`qbudget.paired`), pairing runs on
  world + seed: final-q max advantage and AUC differences, bootstrap CI, the paired
  sign-flip permutation p (exact up to 16 seeds: its null distribution is the
  enumeration of every sign pattern, not an approximation), and a plain-words verdict
  that carries the **minimum detectable difference** at these seeds (α, power 0.8, from
  the observed paired spread) — so "not distinguishable" reads "no difference of at
  least MDE", not "the same". The Wilcoxon signed-rank test this replaced used only
  ranks; both have the floor ``2 / 2**n``, so at least 6 seeds are needed at α = 0.05.
  Beside each final-advantage verdict, the **hierarchical bootstrap** interval of the
  difference (:func:`qbudget.paired.hierarchical_bootstrap_counts`; columns ``hier_low``,
  ``hier_high``): seeds with replacement, then the probe items behind each drawn seed's
  max advantage. Per-item correctness is not stored anywhere (neither results.parquet nor
  the cell folders keep it), but a results row keeps what the item level needs of one
  cell, its accuracy (advantage + 1) / 2 and item count ``n``, since redrawing ``n`` 0/1
  items with replacement is a binomial draw. What is lost is which strategy item sits
  beside which baseline item, so the two cells' items are redrawn independently, which
  errs wide when their outcomes correlate positively. The AUC spans several checkpoints
  whose per-item outcomes (and their dependence across q) are not stored, so it gets the
  seed-level bootstrap only (NaN there), as does a file without ``n``;
* **per-category residuals at the final budget**: the max adversary's advantage per
  category; a category "remains" when the mean over seeds of the advantage's lower
  confidence bound is still > 0, i.e. an adversary still tells student from teacher there.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from qbudget.errors import QBudgetError
from qbudget.paired import (EXACT_MAX_SEEDS, hierarchical_bootstrap_counts, permutation_compare,
                            seeds_for_mde)

MAX = "max"
ALL = "all"
AUC_AXIS = "log2(q+1)"
AUC_DESCRIPTION = ("AUC = trapezoid area under the mean max-advantage curve over "
                   "x = log2(q+1), divided by the x-range (an average advantage along a log-q "
                   "axis, 0..1); per run, on the q values every run of the world reached")


@dataclass
class Summary:
    """Everything :func:`render_markdown` and :func:`print_summary` show, as DataFrames."""

    baseline: str
    epsilon: float | None
    worlds: list[str]
    strategies: dict[str, list[str]]          # world -> strategies (baseline first)
    q_grid: dict[str, list[int]]              # world -> q values every run reached
    seeds: dict[str, list[int]]               # world -> seeds seen
    advantage: pd.DataFrame                   # world strategy adversary q n mean ci_low ci_high
    similarity: pd.DataFrame                  # world strategy q n mean ci_low ci_high
    ceiling: pd.DataFrame                     # world n mean ci_low ci_high (teacher vs teacher)
    auc: pd.DataFrame                         # world strategy n mean ci_low ci_high
    epsilon_reached: pd.DataFrame             # world strategy q_reached final_upper
    paired: pd.DataFrame                      # PAIRED_COLUMNS: world strategy baseline measure ...
    residuals: pd.DataFrame                   # world strategy category q n mean ... remains
    notes: list[str] = field(default_factory=list)
    #: the runs were certified sequentially: ``epsilon`` is their ε and ``epsilon_reached``
    #: holds the certified q (columns certified, seeds, q_certified)
    certified: bool = False
    #: what the runs spent by their last q, mean over seeds (world strategy n q tokens usd
    #: eval_usd); empty when the results carry no spend columns
    spend: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SPEND_COLUMNS))


SPEND_COLUMNS = ["world", "strategy", "n", "q", "tokens", "usd", "eval_usd"]


def _spend(df: pd.DataFrame) -> pd.DataFrame:
    """Per world and strategy, the mean over seeds of what each run had spent at its last
    q: training tokens and dollars (what ``[budget]`` caps) and evaluation dollars."""
    if not {"tokens", "usd", "eval_usd"} <= set(df.columns):
        return pd.DataFrame(columns=SPEND_COLUMNS)
    have = df.dropna(subset=["usd"])
    if have.empty:
        return pd.DataFrame(columns=SPEND_COLUMNS)
    last = have.loc[have.groupby(["world", "strategy", "seed"])["q"].idxmax()]
    rows = []
    for (w, st), g in last.groupby(["world", "strategy"], sort=True):
        rows.append({"world": w, "strategy": st, "n": len(g), "q": float(g["q"].mean()),
                     "tokens": float(pd.to_numeric(g["tokens"]).mean()),
                     "usd": float(g["usd"].mean()),
                     "eval_usd": float(pd.to_numeric(g["eval_usd"]).mean())})
    return pd.DataFrame(rows, columns=SPEND_COLUMNS)


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """Mean and Student-t interval of ``values`` (NaNs dropped): ``(mean, lo, hi, n)``.
    With fewer than two values the interval is NaN (not defined)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    n = int(len(v))
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(v.mean())
    if n < 2:
        return m, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half, n


def auc_log_q(qs, values) -> float:
    """Normalised trapezoid AUC of ``values`` over ``log2(q + 1)`` (see module docstring).
    NaN with fewer than two q values."""
    q = np.asarray(qs, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(q)
    q, v = q[order], v[order]
    if len(q) < 2:
        return math.nan
    x = np.log2(q + 1.0)
    return float(np.trapezoid(v, x) / (x[-1] - x[0]))


def _with_max(adv: pd.DataFrame) -> pd.DataFrame:
    """Advantage rows with a ``max`` adversary; synthesised (max over adversaries of each
    run/q/category) only when the producer wrote none."""
    if (adv["adversary"] == MAX).any() or adv.empty:
        return adv
    keys = ["world", "strategy", "seed", "q", "category"]
    idx = adv.groupby(keys)["value"].idxmax()
    mx = adv.loc[idx].copy()
    mx["adversary"] = MAX
    return pd.concat([adv, mx], ignore_index=True)


def _per_run(df: pd.DataFrame) -> pd.DataFrame:
    """One value per (world, strategy, seed, q, metric, adversary, category): duplicates
    (the same value written twice) are averaged. ``n`` (the items behind a value) is kept
    as a float, NaN where the table has none."""
    keys = ["world", "strategy", "seed", "q", "metric", "adversary", "category"]
    df = df.assign(n=(pd.to_numeric(df["n"], errors="coerce").astype("float64")
                      if "n" in df.columns else math.nan))
    out = df.groupby(keys, as_index=False)[["value", "ci_low", "ci_high", "n"]].mean()
    out["n"] = out["n"].astype("float64")
    return out


def _aggregate(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    rows = []
    for key, g in frame.groupby(keys, sort=True):
        m, lo, hi, n = mean_ci(g["value"].to_numpy())
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                     "n": n, "mean": m, "ci_low": lo, "ci_high": hi})
    cols = keys + ["n", "mean", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=cols)


def _q_grid(runs: pd.DataFrame) -> list[int]:
    """q values present in every run (world, strategy, seed) of ``runs``."""
    sets = [set(g["q"].tolist()) for _, g in runs.groupby(["strategy", "seed"])]
    return sorted(set.intersection(*sets)) if sets else []


def _rng(seed: int, *parts: str) -> np.random.Generator:
    """A Generator per comparison, independent of the order comparisons are made in."""
    return np.random.default_rng([seed, zlib.crc32("|".join(parts).encode())])


def summarize(df: pd.DataFrame, *, baseline: str = "stratified", epsilon: float | None = None,
              seed: int = 0, alpha: float = 0.05, n_resamples: int = 10_000) -> Summary:
    """Summarise a results table (see module docstring for what and how)."""
    missing = {"world", "strategy", "seed", "q", "metric", "adversary", "category", "value",
               "ci_low", "ci_high"} - set(df.columns)
    if missing:
        raise QBudgetError(f"results table lacks column(s): {', '.join(sorted(missing))}")
    if df.empty:
        raise QBudgetError("no result rows to summarise")
    if epsilon is not None and not (0 < epsilon <= 1):
        raise QBudgetError(f"epsilon must be in (0, 1], got {epsilon}")
    runs = _per_run(df)
    cert_eps = sorted(set(runs.loc[runs["metric"] == "certify_epsilon", "value"].tolist()))
    certified_mode = bool(cert_eps)
    notes: list[str] = []
    if certified_mode:
        if epsilon is None or epsilon != cert_eps[0]:
            if epsilon is not None:
                notes.append(f"the runs were certified at ε={cert_eps[0]:g}; "
                             f"the ε={epsilon:g} asked for is replaced by it")
            epsilon = float(cert_eps[0])
        if len(cert_eps) > 1:
            notes.append("the runs were certified at several ε ("
                         + ", ".join(f"{e:g}" for e in cert_eps) + "); the certified q of "
                         f"each is shown under ε={cert_eps[0]:g}")
        if (runs["metric"] == "q_certified").any():
            notes.append("certified runs stop buying at their certified q, so AUC and "
                         "comparisons use only the q values every run reached")
    adv = _with_max(runs[runs["metric"] == "advantage"])
    if adv.empty:
        raise QBudgetError("the results hold no 'advantage' rows")
    worlds = sorted(runs["world"].unique().tolist())
    strategies, grids, seeds = {}, {}, {}
    for w in worlds:
        names = sorted(runs.loc[runs["world"] == w, "strategy"].unique().tolist())
        if baseline in names:
            names.remove(baseline)
            names.insert(0, baseline)
        strategies[w] = names
        grids[w] = _q_grid(adv[(adv["world"] == w) & (adv["adversary"] == MAX)
                               & (adv["category"] == ALL)])
        seeds[w] = sorted(int(s) for s in runs.loc[runs["world"] == w, "seed"].unique())
        if not grids[w]:
            notes.append(f"world {w}: the runs share no q value; AUC and comparisons skipped")

    adv_all = adv[adv["category"] == ALL]
    advantage = _aggregate(adv_all, ["world", "strategy", "adversary", "q"])
    sim = runs[(runs["metric"] == "similarity") & (runs["category"] == ALL)]
    similarity = _aggregate(sim, ["world", "strategy", "q"])
    ceil = runs[(runs["metric"] == "similarity_ceiling") & (runs["category"] == ALL)]
    ceiling = pd.DataFrame(
        [{"world": w, "n": len(g), "mean": g["value"].mean(), "ci_low": g["ci_low"].mean(),
          "ci_high": g["ci_high"].mean()} for w, g in ceil.groupby("world")],
        columns=["world", "n", "mean", "ci_low", "ci_high"])

    headline = adv_all[adv_all["adversary"] == MAX]
    auc_rows, eps_rows, per_run_auc = [], [], {}
    for w in worlds:
        grid = grids[w]
        for s in strategies[w]:
            h = headline[(headline["world"] == w) & (headline["strategy"] == s)
                         & headline["q"].isin(grid)]
            for sd, g in h.groupby("seed"):
                per_run_auc[(w, s, int(sd))] = auc_log_q(g["q"], g["value"])
            vals = [per_run_auc[(w, s, int(sd))] for sd in h["seed"].unique()]
            m, lo, hi, n = mean_ci(vals)
            auc_rows.append({"world": w, "strategy": s, "n": n, "mean": m,
                             "ci_low": lo, "ci_high": hi})
            if certified_mode:
                eps_rows.append(_certified_q(runs, w, s))
            elif epsilon is not None:
                upper = h.groupby("q")["ci_high"].mean().sort_index()
                hit = upper[upper <= epsilon]
                eps_rows.append({"world": w, "strategy": s,
                                 "q_reached": int(hit.index[0]) if len(hit) else pd.NA,
                                 "final_upper": float(upper.iloc[-1]) if len(upper) else math.nan})
    auc = pd.DataFrame(auc_rows, columns=["world", "strategy", "n", "mean", "ci_low", "ci_high"])
    eps = pd.DataFrame(eps_rows, columns=["world", "strategy", "q_reached", "final_upper"]
                       + (["certified", "seeds", "q_certified"] if certified_mode else []))
    eps["q_reached"] = eps["q_reached"].astype("Int64")

    paired_rows = []
    for w in worlds:
        grid = grids[w]
        if not grid:
            continue
        if baseline not in strategies[w]:
            notes.append(f"world {w}: baseline '{baseline}' is not in the results; "
                         "no paired comparisons")
            continue
        qf = grid[-1]
        final = headline[(headline["world"] == w) & (headline["q"] == qf)]
        base_rows = final[final["strategy"] == baseline].set_index("seed")
        base_final = base_rows["value"]
        for s in strategies[w]:
            if s == baseline:
                continue
            other_rows = final[final["strategy"] == s].set_index("seed")
            other = other_rows["value"]
            common = sorted(set(base_final.index) & set(other.index))
            hier = _hierarchical_final(other_rows.loc[common], base_rows.loc[common],
                                       rng=_rng(seed, w, s, "final advantage", "hierarchical"),
                                       n_resamples=n_resamples)
            measures = {
                "final advantage": [other[sd] - base_final[sd] for sd in common],
                "advantage AUC": [per_run_auc.get((w, s, int(sd)), math.nan)
                                  - per_run_auc.get((w, baseline, int(sd)), math.nan)
                                  for sd in common],
            }
            if len(grid) < 2:  # one q value: no curve, no area
                del measures["advantage AUC"]
            for measure, diffs in measures.items():
                r = permutation_compare(diffs, rng=_rng(seed, w, s, measure), alpha=alpha,
                                        what=measure, n_resamples=n_resamples)
                p_value, verdict = r.p_value, r.verdict
                if r.n < 2:   # one pair: the sign-flip p is 1 by construction; no test
                    p_value = math.nan
                    verdict = (f"not distinguishable from baseline at these seeds "
                               f"(n={r.n}: no paired test, MDE n/a)")
                h_low, h_high = (hier if measure == "final advantage"
                                 else (math.nan, math.nan))
                paired_rows.append({
                    "world": w, "strategy": s, "baseline": baseline, "measure": measure,
                    "q": qf, "n": r.n, "mean_diff": r.mean_diff, "ci_low": r.ci_low,
                    "ci_high": r.ci_high, "hier_low": h_low, "hier_high": h_high,
                    "statistic": _t_statistic(diffs),
                    "p_value": p_value, "min_p": _min_p(r.n, n_resamples), "mde": r.mde,
                    "seeds_for_target": seeds_for_mde(r.sd, TARGET_MDE, alpha=alpha),
                    "verdict": verdict, "note": r.note})
    paired = pd.DataFrame(paired_rows, columns=PAIRED_COLUMNS)

    res_rows = []
    for w in worlds:
        if not grids[w]:
            continue
        qf = grids[w][-1]
        cat = adv[(adv["world"] == w) & (adv["q"] == qf) & (adv["adversary"] == MAX)
                  & (adv["category"] != ALL)]
        for (s, c), g in cat.groupby(["strategy", "category"]):
            m, lo, hi, n = mean_ci(g["value"])
            lb = float(g["ci_low"].mean())
            res_rows.append({"world": w, "strategy": s, "category": c, "q": qf, "n": n,
                             "mean": m, "ci_low": lo, "ci_high": hi, "lower_bound": lb,
                             "seeds_detected": int((g["ci_low"] > 0).sum()),
                             "remains": bool(lb > 0)})
    residuals = pd.DataFrame(res_rows, columns=[
        "world", "strategy", "category", "q", "n", "mean", "ci_low", "ci_high", "lower_bound",
        "seeds_detected", "remains"])
    if not residuals.empty:
        order = {w: {s: i for i, s in enumerate(strategies[w])} for w in worlds}
        residuals["_o"] = [order[w][s] for w, s in zip(residuals["world"], residuals["strategy"])]
        residuals = (residuals.sort_values(["world", "_o", "mean"], ascending=[True, True, False])
                     .drop(columns="_o").reset_index(drop=True))

    return Summary(baseline=baseline, epsilon=epsilon, worlds=worlds, strategies=strategies,
                   q_grid=grids, seeds=seeds, advantage=advantage, similarity=similarity,
                   ceiling=ceiling, auc=auc, epsilon_reached=eps, paired=paired,
                   residuals=residuals, notes=notes, certified=certified_mode,
                   spend=_spend(df))


def _certified_q(runs: pd.DataFrame, world: str, strategy: str) -> dict:
    """One strategy's certified q over its seeds (see the module docstring)."""
    mine = runs[(runs["world"] == world) & (runs["strategy"] == strategy)]
    seeds = sorted(int(sd) for sd in mine["seed"].unique())
    qc = mine[mine["metric"] == "q_certified"].groupby("seed")["value"].min()
    per_seed = {int(sd): int(v) for sd, v in qc.items()}
    done = len(per_seed)
    return {"world": world, "strategy": strategy,
            "q_reached": max(per_seed.values()) if done == len(seeds) and done else pd.NA,
            "final_upper": math.nan, "certified": done, "seeds": len(seeds),
            "q_certified": ", ".join(str(per_seed[sd]) if sd in per_seed else "–"
                                     for sd in seeds)}


#: Columns of :attr:`Summary.paired`.
PAIRED_COLUMNS = ["world", "strategy", "baseline", "measure", "q", "n", "mean_diff", "ci_low",
                  "ci_high", "hier_low", "hier_high", "statistic", "p_value", "min_p", "mde",
                  "seeds_for_target", "verdict", "note"]
#: the difference whose detectability the paired table plans for ("seeds for MDE ..."):
#: what issue 21 asks ``make bench`` to detect in the final max-advantage
TARGET_MDE = 0.03


def _hierarchical_final(strategy_rows: pd.DataFrame, base_rows: pd.DataFrame, *,
                        rng: np.random.Generator, n_resamples: int) -> tuple[float, float]:
    """The hierarchical bootstrap interval (seeds, then probe items) of the final-q
    max-advantage difference, from each seed's advantage and item count ``n``
    (accuracy = (advantage + 1) / 2 of ``n`` units; see
    :func:`qbudget.paired.hierarchical_bootstrap_counts`). NaN when a paired seed lacks
    its ``n`` (files from producers that did not record it) or with fewer than 2 seeds."""
    n_s, n_b = strategy_rows["n"].to_numpy(np.float64), base_rows["n"].to_numpy(np.float64)
    rate = (strategy_rows["value"].to_numpy(np.float64) + 1.0) / 2.0
    base = (base_rows["value"].to_numpy(np.float64) + 1.0) / 2.0
    counts, rates = np.concatenate([n_s, n_b]), np.concatenate([rate, base])
    if len(n_s) < 2 or not np.isfinite(counts).all() or (counts < 1).any() \
            or not np.isfinite(rates).all() or (rates < 0).any() or (rates > 1).any():
        return math.nan, math.nan
    _, lo, hi = hierarchical_bootstrap_counts(rate, np.round(n_s), base, np.round(n_b),
                                              rng=rng, n_resamples=n_resamples, scale=2.0)
    return lo, hi


def _t_statistic(diffs) -> float:
    """Paired t of the per-seed differences: the statistic the sign-flip test permutes
    (flipping signs of the mean is flipping them for t, as Σd² does not change)."""
    d = np.asarray(diffs, np.float64)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    if sd == 0:
        return math.copysign(math.inf, float(d.mean())) if d.mean() != 0 else math.nan
    return float(d.mean() / (sd / math.sqrt(len(d))))


def _min_p(n: int, n_resamples: int) -> float:
    """The smallest p the sign-flip test can give with ``n`` paired seeds."""
    if n < 1:
        return math.nan
    if n <= EXACT_MAX_SEEDS:
        return 2.0 ** (1 - n)
    return max(2.0 ** (1 - n), 1.0 / (n_resamples + 1))


# -- rendering -------------------------------------------------------------------------------

def _num(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(mean: float, lo: float, hi: float, n: int | None = None, digits: int = 3,
           compact: bool = False) -> str:
    """``0.412 (0.380, 0.450)``; ``0.412 (n=1)`` when there is no interval. ``compact``
    writes a symmetric (t-) interval as ``0.41±0.04``."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{mean:.{digits}f}" + (f" (n={n})" if n is not None else "")
    if compact and math.isclose(mean - lo, hi - mean, rel_tol=1e-6, abs_tol=1e-9):
        return f"{mean:.{digits}f}±{hi - mean:.{digits}f}"
    return f"{mean:.{digits}f} ({lo:.{digits}f}, {hi:.{digits}f})"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


#: The paired table's column of :func:`_hierarchical_final` and its footnote.
HIER_HEADER = "hierarchical 95% CI (seeds, items)"
HIER_FOOT = ("Hierarchical CI: percentile bootstrap over seeds, then over the probe items "
             "behind each seed's final max advantage (its accuracy and item count n; the "
             "item-level pairing with the baseline is not stored, so each cell's items are "
             "redrawn on their own, which errs wide); AUC spans checkpoints whose per-item "
             "outcomes are not stored, so it has the seed-level interval only (–).")


def _hier_cell(lo: float, hi: float, digits: int = 3) -> str:
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "–"
    return f"({lo:+.{digits}f}, {hi:+.{digits}f})"


def _signed_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(lo):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} ({lo:+.{digits}f}, {hi:+.{digits}f})"


def _curve_cells(table: pd.DataFrame, grid_q: list[int], digits: int, compact: bool) -> list[str]:
    by_q = {int(r.q): r for r in table.itertuples()}
    return [fmt_ci(by_q[q].mean, by_q[q].ci_low, by_q[q].ci_high, by_q[q].n, digits, compact)
            if q in by_q else "–" for q in grid_q]


def world_tables(summary: Summary, world: str,
                 digits: int = 3, compact: bool = False
                 ) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The per-world tables as (title, header, rows, footnote), shared by both renderers
    (the console uses fewer digits and ``mean±half-width`` for the symmetric t-intervals)."""
    s = summary
    qs = sorted(set(s.advantage.loc[s.advantage["world"] == world, "q"].astype(int)))
    out = []
    adv = s.advantage[s.advantage["world"] == world]
    auc = s.auc[s.auc["world"] == world].set_index("strategy")
    eps = s.epsilon_reached[s.epsilon_reached["world"] == world].set_index("strategy")
    header = ["strategy"] + [f"q={q}" for q in qs] + ["AUC"]
    if s.epsilon is not None:
        header.append(f"certified q at ε={s.epsilon:g}" if s.certified else f"q at ε={s.epsilon:g}")
    rows = []
    for strat in s.strategies[world]:
        cur = adv[(adv["strategy"] == strat) & (adv["adversary"] == MAX)]
        row = [strat + (" (baseline)" if strat == s.baseline else "")] + _curve_cells(cur, qs, digits, compact)
        a = auc.loc[strat] if strat in auc.index else None
        row.append(fmt_ci(a["mean"], a["ci_low"], a["ci_high"], int(a["n"]), digits, compact)
                   if a is not None else "–")
        if s.epsilon is not None and s.certified:
            if strat in eps.index:
                e = eps.loc[strat]
                qr = e["q_reached"]
                row.append((f"{int(qr)}" if not pd.isna(qr) else "not certified")
                           + f" ({int(e['certified'])}/{int(e['seeds'])} seeds: {e['q_certified']})")
            else:
                row.append("–")
        elif s.epsilon is not None:
            qr = eps.loc[strat, "q_reached"] if strat in eps.index else pd.NA
            row.append("not reached" if pd.isna(qr) else str(int(qr)))
        rows.append(row)
    if s.certified:
        eps_foot = (f" Certified q at ε: the checkpoint at which the run's sequential test "
                    f"certified every adversary's advantage ≤ {s.epsilon:g} (anytime-valid, "
                    "level α over the whole run) and stopped buying; the largest over seeds "
                    "when all certified (per seed in brackets).")
    elif s.epsilon is not None:
        eps_foot = (f" q at ε: first q where the mean over seeds of the max "
                    f"adversary's upper bound is ≤ {s.epsilon:g}.")
    else:
        eps_foot = ""
    out.append(("Max advantage (category all): mean over seeds (95% t-interval)", header, rows,
                AUC_DESCRIPTION + "." + eps_foot))

    advs = sorted(a for a in adv["adversary"].unique() if a != MAX)
    if advs:
        rows = []
        for strat in s.strategies[world]:
            for a in advs:
                cur = adv[(adv["strategy"] == strat) & (adv["adversary"] == a)]
                rows.append([strat, a] + _curve_cells(cur, qs, digits, compact))
        out.append(("Advantage by adversary (category all)", ["strategy", "adversary"]
                    + [f"q={q}" for q in qs], rows, ""))

    sim = s.similarity[s.similarity["world"] == world]
    if not sim.empty:
        sqs = sorted(set(sim["q"].astype(int)))
        rows = [[strat] + _curve_cells(sim[sim["strategy"] == strat], sqs, digits, compact)
                for strat in s.strategies[world]]
        ceil = s.ceiling[s.ceiling["world"] == world]
        foot = ""
        if not ceil.empty:
            c = ceil.iloc[0]
            foot = (f"Teacher-vs-teacher ceiling: {fmt_ci(c['mean'], c['ci_low'], c['ci_high'])} "
                    "(two independent teacher samples; the gap below it is not sampling noise).")
        out.append(("Semantic similarity to the teacher (category all)",
                    ["strategy"] + [f"q={q}" for q in sqs], rows, foot))

    pr = s.paired[s.paired["world"] == world]
    if not pr.empty:
        rows = [[r.strategy, r.measure, str(r.n), _signed_ci(r.mean_diff, r.ci_low, r.ci_high, digits),
                 _hier_cell(r.hier_low, r.hier_high, digits),
                 _num(r.statistic, 2), _fmt_p(r.p_value), "n/a" if math.isinf(r.mde) else _num(r.mde),
                 "–" if r.seeds_for_target is None or pd.isna(r.seeds_for_target)
                 else str(int(r.seeds_for_target)),
                 r.verdict] for r in pr.itertuples()]
        by_note: dict[str, list[str]] = {}
        for r in pr.itertuples():
            if r.note and r.strategy not in by_note.setdefault(r.note, []):
                by_note[r.note].append(r.strategy)
        notes = [f"{', '.join(names)}: {note}" for note, names in by_note.items()]
        qf = int(pr["q"].iloc[0])
        out.append((f"Paired comparison with baseline '{s.baseline}' (strategy − baseline, paired "
                    f"on seed; final q={qf})",
                    ["strategy", "measure", "n", "mean diff (bootstrap 95% CI)",
                     HIER_HEADER, "paired t", "sign-flip p", "MDE",
                     f"seeds for MDE {TARGET_MDE:g}", "verdict"], rows,
                    "Lower is better (less distinguishable). MDE: the smallest true difference "
                    "these seeds detect with power 0.8 at α = 0.05, from the observed paired "
                    f"spread; seeds for MDE {TARGET_MDE:g}: how many seeds that spread needs to "
                    f"detect a difference of {TARGET_MDE:g}. " + HIER_FOOT + " " + " ".join(
                        f"{n}." for n in notes)))

    res = s.residuals[s.residuals["world"] == world]
    if not res.empty:
        rows = [[r.strategy, r.category, fmt_ci(r.mean, r.ci_low, r.ci_high, r.n, digits, compact),
                 _num(r.lower_bound, digits), f"{r.seeds_detected}/{r.n}",
                 "YES" if r.remains else "no"] for r in res.itertuples()]
        qf = int(res["q"].iloc[0])
        remaining = res[res["remains"]]
        foot = ("Categories where advantage remains (mean lower bound > 0): "
                + (", ".join(f"{r.strategy}/{r.category}" for r in remaining.itertuples())
                   if not remaining.empty else "none") + ".")
        out.append((f"Per-category residuals at the final budget (q={qf}, max adversary)",
                    ["strategy", "category", "advantage (95% CI)", "mean lower bound",
                     "seeds with LB>0", "remains"], rows, foot))

    sp = s.spend[s.spend["world"] == world].set_index("strategy")
    if not sp.empty:
        rows = [[st, f"{sp.loc[st, 'q']:.0f}", f"{sp.loc[st, 'tokens']:,.0f}",
                 f"{sp.loc[st, 'usd']:.4f}", f"{sp.loc[st, 'eval_usd']:.4f}"]
                for st in s.strategies[world] if st in sp.index]
        out.append(("Spend per run (mean over seeds, at each run's last q)",
                    ["strategy", "q", "training tokens", "training US$", "evaluation US$"], rows,
                    "Training: the queries bought (what [budget] queries / tokens / usd cap); "
                    "evaluation: the teacher answers bought for the probe and the ceiling "
                    "([budget] eval_usd). Priced at the teacher's price; answers served from a "
                    "shared cache count as spent (the run's own cost), see the manifest for "
                    "what was actually paid."))
    return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(summary: Summary) -> str:
    """The summary as GitHub-flavoured Markdown (what ``bench`` writes to summary.md)."""
    lines = ["# qbudget sweep summary", ""]
    for w in summary.worlds:
        seeds = summary.seeds[w]
        lines += [f"## World `{w}`", "",
                  f"Strategies: {', '.join(summary.strategies[w])}; seeds: "
                  f"{', '.join(map(str, seeds))} (n={len(seeds)}); q values shared by every run: "
                  f"{', '.join(map(str, summary.q_grid[w])) or 'none'}.", ""]
        if len(seeds) == 1:
            lines += ["With one seed (n=1) there is no interval over seeds and no paired test; "
                      "run more seeds to compare strategies.", ""]
        for title, header, rows, foot in world_tables(summary, w):
            lines += [f"### {title}", "",
                      "| " + " | ".join(_md_escape(h) for h in header) + " |",
                      "|" + "|".join("---" for _ in header) + "|"]
            for row in rows:
                cells = [(f"**{c}**" if c == "YES" else _md_escape(c)) for c in row]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            if foot:
                lines += [foot, ""]
    if summary.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary.notes] + [""]
    lines += ["## How to read this", "",
              "- Advantage = 2·accuracy − 1 of an adversary telling teacher from student answers "
              "on held-out probe prompts; 0 = indistinguishable to that adversary, 1 = always "
              "told apart. `max` is the best adversary per run (Bonferroni-adjusted interval).",
              "- Intervals over seeds are 95% Student-t intervals of the mean; paired intervals "
              "are percentile bootstrap intervals of the mean per-seed difference, and for the "
              "final advantage also a hierarchical bootstrap over seeds then probe items; "
              "p-values are "
              "two-sided paired sign-flip permutation tests across seeds (exact enumeration up "
              "to 16 seeds), each verdict with its minimum detectable difference (MDE, power "
              "0.8).",
              f"- {AUC_DESCRIPTION}.", ""]
    return "\n".join(lines)


def print_summary(summary: Summary, console) -> None:
    """Print the summary as rich tables on ``console``."""
    from rich.table import Table
    from rich.text import Text

    for w in summary.worlds:
        seeds = summary.seeds[w]
        console.print(Text(f"World {w}: seeds {', '.join(map(str, seeds))} (n={len(seeds)})",
                           style="bold"))
        for title, header, rows, foot in world_tables(summary, w, digits=2, compact=True):
            table = Table(title=title, title_justify="left", show_lines=False)
            for h in header:
                table.add_column(h, overflow="fold")
            for row in rows:
                table.add_row(*[Text(c, style="bold red" if c == "YES" else "") for c in row])
            console.print(table)
            if foot:
                console.print(Text(foot, style="dim"))
    for n in summary.notes:
        console.print(Text(f"note: {n}", style="yellow"))
