"""A compact terminal plot of the headline curve (max advantage vs q, per strategy).

Printed at the end of ``qbudget bench`` so the answer is visible without opening a figure.
Pure text (unicode box characters, or plain ASCII), no dependency: the x axis is
``log2(q + 1)`` (the same axis the AUC uses), each strategy is drawn with its own
character (checkpoints and the straight segments between them alike; where curves overlap,
the one listed later in the legend shows), and the checkpoints' q values label the axis.
Square brackets are avoided on purpose: the text is printed
through rich, which would read them as markup.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from qbudget.summary import ALL, MAX

MARKERS = "ox+*#@%&=~"


def _headline(df: pd.DataFrame) -> pd.DataFrame:
    adv = df[(df["metric"] == "advantage") & (df["category"] == ALL)]
    if (adv["adversary"] == MAX).any():
        return adv[adv["adversary"] == MAX]
    if adv.empty:
        return adv
    idx = adv.groupby(["world", "strategy", "seed", "q"])["value"].idxmax()
    return adv.loc[idx]


def _canvas_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], width: int, height: int,
                 ascii_only: bool, ymax: float) -> list[str]:
    grid = [[" "] * width for _ in range(height)]
    all_q = np.unique(np.concatenate([q for q, _ in curves.values()]))
    xmax = math.log2(all_q.max() + 1.0) or 1.0

    def col(q: float) -> int:
        return int(round(math.log2(q + 1.0) / xmax * (width - 1)))

    def row(v: float) -> int:
        v = min(max(v, 0.0), ymax)
        return height - 1 - int(round(v / ymax * (height - 1)))

    for mark, (q, v) in zip(MARKERS, curves.values()):
        for (q0, v0), (q1, v1) in zip(zip(q, v), zip(q[1:], v[1:])):
            c0, c1, r0, r1 = col(q0), col(q1), row(v0), row(v1)
            for c in range(c0, c1 + 1):  # one cell per column ...
                t = (c - c0) / max(c1 - c0, 1)
                grid[row(v0 + t * (v1 - v0))][c] = mark
            step = 1 if r1 >= r0 else -1  # ... and fill steep drops so the line is unbroken
            for r in range(r0, r1 + step, step):
                c = c0 + round((r - r0) / (r1 - r0) * (c1 - c0)) if r1 != r0 else c0
                grid[r][c] = mark
        for qi, vi in zip(q, v):
            grid[row(vi)][col(qi)] = mark
    vbar, corner, hbar = ("|", "+", "-") if ascii_only else ("│", "└", "─")
    lines = []
    for r in range(height):
        yval = ymax * (height - 1 - r) / (height - 1)
        label = f"{yval:4.2f}" if r in (0, height // 2, height - 1) else "    "
        lines.append(f"{label} {vbar}" + "".join(grid[r]).rstrip())
    lines.append("     " + corner + hbar * width)
    ticks = [" "] * (width + 1)
    for qv in all_q:
        text, c = str(int(qv)), col(qv)
        start = min(max(0, c - len(text) // 2), width + 1 - len(text))
        if all(ch == " " for ch in ticks[max(0, start - 1):start + len(text) + 1]):
            ticks[start:start + len(text)] = list(text)
    lines.append("      " + "".join(ticks).rstrip())
    return lines


def render_curves(df: pd.DataFrame, *, width: int = 56, height: int = 12,
                  ascii_only: bool = False) -> str:
    """The mean (over seeds) max-adversary advantage vs q of every strategy, per world."""
    head = _headline(df)
    if head.empty:
        return "(no advantage rows to plot)"
    width, height = max(width, 16), max(height, 5)
    blocks = []
    for world, dw in head.groupby("world", sort=True):
        per = dw.groupby(["strategy", "seed", "q"], as_index=False)["value"].mean()
        mean = per.groupby(["strategy", "q"], as_index=False)["value"].mean()
        curves = {s: (g["q"].to_numpy(float), g["value"].to_numpy(float))
                  for s, g in mean.sort_values("q").groupby("strategy", sort=True)}
        if len(curves) > len(MARKERS):
            curves = dict(list(curves.items())[:len(MARKERS)])
        top = max(float(v.max()) for _, v in curves.values())
        ymax = 1.0 if top > 0.5 else max(0.05, math.ceil(top * 20) / 20)
        title = f"max advantage vs q (log2(q+1) axis), world {world}, mean over seeds"
        lines = [title] + _canvas_plot(curves, width, height, ascii_only, ymax)
        legend = "   ".join(f"{m} {s}" for m, s in zip(MARKERS, curves))
        lines.append("      " + legend)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
