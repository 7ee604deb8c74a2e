"""Advantage-vs-q figures (matplotlib, drawn off-screen); or against tokens or dollars.

One line per strategy (mean over seeds) with its 95% Student-t band over seeds (no band
with a single seed, as in the summary), on a symmetric-log q axis (``linthresh=1``) so that
q = 0 (the untouched student) sits at the left edge and doubling budgets are evenly
spaced. The headline figure puts the max-adversary advantage next to the semantic
similarity; ``by="category"`` / ``by="adversary"`` draw small multiples instead.

Sequentially certified runs (``[certify]``: their rows include ``q_certified``) get a star
per strategy on the headline advantage panel at its certification point: the largest
``q_certified`` over the seeds that certified (by then every one of them had stopped
buying), on the strategy's mean curve, labelled with how many seeds certified. Their ε is
drawn as the ε line when none is given.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly (no
pyplot), so plotting neither needs a display nor touches global matplotlib state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qbudget.errors import QBudgetError
from qbudget.summary import ALL, MAX, mean_ci

FORMATS = ("png", "svg", "pdf")
METRICS = ("advantage", "similarity")
FACETS = (None, "category", "adversary")
_LABELS = {"advantage": "distinguishing advantage", "similarity": "semantic similarity"}


#: what the x axis may show: queries, or what they cost (results columns of the same name)
X_AXES = ("q", "tokens", "usd")
_X_LABELS = {"q": "teacher queries q", "tokens": "teacher tokens (training purchases)",
             "usd": "US$ spent on training purchases"}


def _curve(frame: pd.DataFrame, x: str = "q") -> pd.DataFrame:
    """Per q: mean over seeds and the 95% t-interval (NaN with one seed), placed at ``x``:
    q itself, or the mean over seeds of the tokens / dollars spent by that q.

    Against tokens or dollars the points are a run's evaluations in order (its k-th
    checkpoint across seeds), not equal q: runs stopped by a token or dollar cap stop at
    different q, and their last points belong together (``q`` is then their mean)."""
    per_seed = frame.groupby(["seed", "q"], as_index=False).agg(
        value=("value", "mean"), x=(x, "mean"))
    key = "q"
    if x != "q":
        per_seed["rank"] = per_seed.groupby("seed")["q"].rank(method="first")
        key = "rank"
    rows = []
    for _, g in per_seed.groupby(key, sort=True):
        m, lo, hi, n = mean_ci(g["value"])
        rows.append((int(round(g["q"].mean())), float(g["x"].mean()), m, lo, hi, n))
    return pd.DataFrame(rows, columns=["q", "x", "mean", "lo", "hi", "n"])


def _style_x_axis(ax, xs: list[float], x: str = "q") -> None:
    positive = [v for v in xs if v > 0]
    linthresh = 1.0 if x == "q" else (min(positive) if positive else 1.0)
    ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
    if xs:
        top = max(xs)
        ax.set_xlim(left=0, right=top * 1.15 if top > 0 else 1)
        if len(xs) <= 9:
            ax.set_xticks(xs)
            ax.set_xticklabels([_x_tick(v, x) for v in xs], rotation=0 if x == "q" else 30,
                               fontsize=None if x == "q" else 7)
            ax.minorticks_off()
    ax.set_xlabel(f"{_X_LABELS[x]} (symlog)")
    ax.grid(True, which="major", alpha=0.3)


def _x_tick(v: float, x: str) -> str:
    if x == "q":
        return str(int(v))
    if x == "tokens":
        return f"{v / 1000:.3g}k" if v >= 1000 else f"{v:.0f}"
    return f"${v:.3g}"


def _draw(ax, frame: pd.DataFrame, strategies: list[str], colors: dict, title: str,
          ylabel: str, epsilon: float | None, baseline: str | None,
          ceiling: float | None = None, xlabel: bool = True, x: str = "q") -> None:
    xs: set[float] = set()
    for s in strategies:
        sub = frame[frame["strategy"] == s]
        if sub.empty:
            continue
        c = _curve(sub, x)
        xs.update(c["x"].tolist())
        ls = "--" if s == baseline else "-"
        ax.plot(c["x"], c["mean"], ls, marker="o", ms=3.5, lw=1.6, color=colors[s], label=s)
        band = c.dropna(subset=["lo", "hi"])
        if not band.empty:
            ax.fill_between(band["x"], band["lo"], band["hi"], color=colors[s], alpha=0.18, lw=0)
    if epsilon is not None:
        ax.axhline(epsilon, color="black", lw=1.0, ls=":", label=f"ε = {epsilon:g}")
    if ceiling is not None and not math.isnan(ceiling):
        ax.axhline(ceiling, color="grey", lw=1.0, ls="-.", label="teacher vs teacher")
    if x == "q":
        _style_x_axis(ax, sorted(frame["q"].unique().astype(int).tolist()))
    else:   # costs differ per strategy: ticks only where few enough to read
        _style_x_axis(ax, sorted(xs) if len(xs) <= 6 else [max(xs, default=0.0)], x)
    if not xlabel:
        ax.set_xlabel("")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def _select(df: pd.DataFrame, metric: str, world: str | None) -> tuple[pd.DataFrame, list[str]]:
    if df.empty:
        raise QBudgetError("no result rows to plot")
    worlds = sorted(df["world"].unique().tolist())
    if world is not None:
        if world not in worlds:
            raise QBudgetError(f"world '{world}' is not in the results (present: {', '.join(worlds)})")
        df, worlds = df[df["world"] == world], [world]
    if metric not in METRICS:
        present = sorted(df["metric"].unique().tolist())
        raise QBudgetError(f"unknown metric '{metric}' for plotting (choose from: "
                           f"{', '.join(METRICS)}; the results hold {', '.join(present)})")
    if not (df["metric"] == metric).any():
        raise QBudgetError(f"the results hold no '{metric}' rows")
    return df, worlds


def _headline_advantage(df: pd.DataFrame) -> pd.DataFrame:
    adv = df[(df["metric"] == "advantage")]
    if (adv["adversary"] == MAX).any():
        return adv[adv["adversary"] == MAX]
    # no max rows written: the best adversary per run, q and category
    idx = adv.groupby(["world", "strategy", "seed", "q", "category"])["value"].idxmax()
    return adv.loc[idx]


def _mark_certified(ax, dw: pd.DataFrame, head: pd.DataFrame, strategies: list[str],
                    colors: dict, x: str = "q") -> None:
    """A star per strategy at its certification point (see the module docstring)."""
    qc = dw[(dw["metric"] == "q_certified") & (dw["category"] == ALL)]
    labelled = False
    for s in strategies:
        mine = qc[qc["strategy"] == s]
        if mine.empty:
            continue
        per_seed = mine.groupby("seed")["value"].min()
        q = int(per_seed.max())
        c = _curve(head[head["strategy"] == s], x)
        at = c[c["q"] == q]
        if at.empty:
            continue
        seeds = head.loc[head["strategy"] == s, "seed"].nunique()
        where = float(at["x"].iloc[0])
        ax.plot([where], [float(at["mean"].iloc[0])], marker="*", ms=13, color=colors[s],
                markeredgecolor="black", ls="none", zorder=5,
                label=None if labelled else "certified (sequential test)")
        ax.annotate(f"{len(per_seed)}/{seeds}", (where, float(at["mean"].iloc[0])),
                    textcoords="offset points", xytext=(6, 6), fontsize=7, color=colors[s])
        labelled = True


def _certify_epsilon(df: pd.DataFrame) -> float | None:
    """The ε the runs were certified at (their ``certify_epsilon`` rows), if any; the
    smallest when they differ, as in the summary."""
    e = df.loc[df["metric"] == "certify_epsilon", "value"]
    return float(e.min()) if len(e) else None


def _ceiling(dw: pd.DataFrame) -> float | None:
    """The teacher-vs-teacher similarity (two teacher samples) of a world, if measured."""
    c = dw[(dw["metric"] == "similarity_ceiling") & (dw["category"] == ALL)]["value"]
    return float(c.mean()) if len(c) else None


def _layout(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_results(df: pd.DataFrame, out_path: str | os.PathLike, *, metric: str = "advantage",
                 by: str | None = None, world: str | None = None, epsilon: float | None = None,
                 baseline: str | None = "stratified", x: str = "q") -> Path:
    """Draw ``metric`` against q, one line per strategy, and save to ``out_path``.

    ``x`` = ``"tokens"`` or ``"usd"`` places each checkpoint at the tokens or dollars
    the training purchases had cost by then (mean over seeds) instead of at q, for users
    who pay per token.

    ``by=None``: the headline figure, one row per world; for advantage the max adversary
    (category all) with a similarity panel beside it. ``by="category"`` or
    ``"adversary"``: one small panel per category / adversary (one world at a time:
    pass ``world`` when the results hold several). The format follows the extension
    (png, svg or pdf). Returns the path written.
    """
    out = Path(out_path)
    ext = out.suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise QBudgetError(f"cannot save a plot as '{out.suffix or out.name}': use a .png, .svg or .pdf file")
    if by not in FACETS:
        raise QBudgetError(f"unknown facet '{by}' (choose category or adversary)")
    if epsilon is not None and not (0 < epsilon <= 1):
        raise QBudgetError(f"epsilon must be in (0, 1], got {epsilon}")
    df, worlds = _select(df, metric, world)
    if x not in X_AXES:
        raise QBudgetError(f"unknown x axis '{x}' (choose: {', '.join(X_AXES)})")
    if x != "q" and (x not in df.columns or df[x].isna().all()):
        raise QBudgetError(f"the results hold no '{x}' values (written before spend was "
                           "recorded): plot them against q")
    if x != "q":
        df = df[df[x].notna()]
    strategies = sorted(df["strategy"].unique().tolist())
    if baseline in strategies:
        strategies.remove(baseline)
        strategies.insert(0, baseline)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf"]
    colors = {s: palette[i % len(palette)] for i, s in enumerate(strategies)}
    if epsilon is None:
        epsilon = _certify_epsilon(df)
    eps = epsilon if metric == "advantage" else None

    if by is None:
        sim = df[(df["metric"] == "similarity") & (df["category"] == ALL)]
        panels_per_world = 2 if (metric == "advantage" and not sim.empty) else 1
        fig = Figure(figsize=(5.2 * panels_per_world, 3.8 * len(worlds)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(worlds), panels_per_world, squeeze=False))
        for i, w in enumerate(worlds):
            dw = df[df["world"] == w]
            if metric == "advantage":
                head = _headline_advantage(dw)
                head = head[head["category"] == ALL]
                _draw(axes[i, 0], head, strategies, colors, f"{w}: max adversary, all categories",
                      _LABELS["advantage"], eps, baseline, x=x)
                _mark_certified(axes[i, 0], dw, head, strategies, colors, x)
                if panels_per_world == 2:
                    _draw(axes[i, 1], sim[sim["world"] == w], strategies, colors,
                          f"{w}: similarity to teacher", _LABELS["similarity"], None, baseline,
                          ceiling=_ceiling(dw), x=x)
                    ceiling_line = [h for h in axes[i, 1].get_lines()
                                    if h.get_label() == "teacher vs teacher"]
                    if ceiling_line:
                        axes[i, 1].legend(handles=ceiling_line, fontsize=8, loc="best",
                                          frameon=False)
            else:
                s = dw[(dw["metric"] == "similarity") & (dw["category"] == ALL)]
                _draw(axes[i, 0], s, strategies, colors, f"{w}: similarity to teacher",
                      _LABELS["similarity"], None, baseline, ceiling=_ceiling(dw), x=x)
        first = axes[0, 0]
    else:
        if len(worlds) > 1:
            raise QBudgetError(f"the results hold several worlds ({', '.join(worlds)}); "
                               "choose one with --world for a faceted plot")
        w = worlds[0]
        dm = df[df["metric"] == metric]
        if by == "adversary":
            if metric != "advantage":
                raise QBudgetError(f"'{metric}' has no adversaries; facet it by category")
            dm = dm[dm["category"] == ALL]
            names = sorted(a for a in dm["adversary"].unique() if a != MAX)
            names = ([MAX] if (dm["adversary"] == MAX).any() else []) + names
            col = "adversary"
        else:
            if metric == "advantage":
                dm = _headline_advantage(dm)
            names = sorted(c for c in dm["category"].unique() if c != ALL)
            names = ([ALL] if (dm["category"] == ALL).any() else []) + names
            col = "category"
        if not names:
            raise QBudgetError(f"the '{metric}' rows have no {by} to facet by")
        nrows, ncols = _layout(len(names))
        fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for k, name in enumerate(names):
            ax = axes[k // ncols, k % ncols]
            _draw(ax, dm[dm[col] == name], strategies, colors, f"{by} {name}",
                  _LABELS[metric] if k % ncols == 0 else "", eps, baseline,
                  xlabel=k + ncols >= len(names), x=x)
        for k in range(len(names), nrows * ncols):
            axes[k // ncols, k % ncols].set_visible(False)
        fig.suptitle(f"{w}: {_LABELS[metric]} by {by}"
                     + (" (max adversary)" if metric == "advantage" and by == "category" else ""),
                     fontsize=11)
        first = axes[0, 0]
    if metric == "advantage":  # keep 0 (indistinguishable) in view on advantage panels
        for ax in fig.axes:
            if ax.get_visible() and "similarity" not in ax.get_title():
                ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    first.legend(fontsize=8, loc="best", frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        fig.savefig(tmp, format=ext, dpi=150)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
