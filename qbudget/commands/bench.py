"""``qbudget bench``: run a sweep, then summarise, compare against the baseline and plot."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Optional

import typer

from qbudget.errors import QBudgetError

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


def _resolve_config(config: Optional[Path], quick: bool) -> Path:
    if config is not None:
        return config
    name = "quick.toml" if quick else "default.toml"
    path = BENCHMARKS_DIR / name
    if not path.is_file():
        raise QBudgetError(f"no CONFIG given and the bundled {name} was not found at {path}")
    return path


def peak_memory_mb() -> float:
    """Peak resident memory of this process and of its finished children (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def bench_command(
    config: Optional[Path] = typer.Argument(None, help="Bench TOML (default: benchmarks/default.toml)."),
    out: Path = typer.Option(..., "--out", help="Sweep directory (re-run the same command to resume)."),
    quick: bool = typer.Option(False, "--quick", help="Use benchmarks/quick.toml when no CONFIG is given."),
    executor: str = typer.Option("local", "--executor", help="local (process pool) or ray."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster to run on (--executor ray; default $RAY_ADDRESS, "
                                "else a Ray started on this machine)."),
    quiet: bool = typer.Option(False, "--quiet", help="No live progress display (the summary still prints)."),
) -> None:
    """Compare strategies over a grid of worlds x strategies x seeds; write results, summary, plots."""
    from rich.console import Console

    from qbudget.config import load_bench_config

    if executor not in ("local", "ray"):
        raise QBudgetError(f"unknown executor '{executor}' (known: local, ray)")
    if address and executor != "ray":
        raise QBudgetError("--address selects a Ray cluster: use it with --executor ray")
    cfg = load_bench_config(_resolve_config(config, quick))
    console = Console()
    t0 = time.perf_counter()
    outcome = _run_with_progress(cfg, out, executor, console, quiet, address)
    _report(cfg, out, console)
    wall = time.perf_counter() - t0
    console.print(f"[bold]bench done[/bold]: {outcome.cells} cells ({outcome.skipped} already done) "
                  f"wall {wall:.0f} s, peak memory {peak_memory_mb():.0f} MB -> {out}", soft_wrap=True)


def _run_with_progress(cfg, out: Path, executor: str, console, quiet: bool,
                       address: str | None = None):
    """Run the sweep with a live display: a rich progress bar on a terminal, plain
    throttled lines when stdout is a file or a pipe (``make bench > log``), none with
    ``--quiet``."""
    import functools

    from qbudget.sweep import run_sweep

    run_sweep = functools.partial(run_sweep, address=address)
    if quiet:
        return run_sweep(cfg, out, executor=executor)
    if not console.is_terminal:
        return run_sweep(cfg, out, executor=executor, on_event=PlainProgress(cfg, out))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console) as progress:
        task = progress.add_task("cells", total=len(cfg.cells()), info="")
        current: dict[str, str] = {}

        def on_event(ev: dict) -> None:
            if ev["event"] == "start":
                progress.update(task, completed=ev["skipped"], info="preparing worlds")
            elif ev["event"] == "progress":
                adv = f" adv {ev['advantage']:.2f}" if ev.get("advantage") is not None else ""
                current[ev["cell"]] = f"{ev['cell']} q={ev['q']}{adv}"
                progress.update(task, info=" | ".join(current.values()))
            elif ev["event"] == "cell_done":
                current.pop(ev["cell"], None)
                progress.advance(task)
                progress.update(task, info=" | ".join(current.values()))

        return run_sweep(cfg, out, executor=executor, on_event=on_event)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class PlainProgress:
    """Sweep events as plain lines on stdout, for logs nobody watches live.

    One line when the sweep starts and when its worlds are ready, one per finished cell,
    and for a running cell at most one every ``every`` seconds (its first event always
    shows). Each line has the elapsed time, the cell, its q of the budget, its last
    measured max advantage, the cells done and an ETA from the share of queries done
    (all cells still to run; early figures include compilation and the q = 0 evaluation,
    so the ETA starts high).
    """

    def __init__(self, cfg, out: Path, every: float = 10.0, write=None):
        from qbudget.sweep import CELLS_DIR, cell_done, cell_name

        self.every = every
        self.write = write or (lambda line: print(line, flush=True))
        self.budget = {cell_name(c): int(c.budget.total) for c in cfg.cells()}
        self.todo = {n for n in self.budget if not cell_done(out / CELLS_DIR / n)}
        self.total_q = sum(self.budget[n] for n in self.todo) or 1
        self.cells = len(self.budget)
        self.done = len(self.budget) - len(self.todo)
        self.q: dict[str, int] = {}
        self.adv: dict[str, tuple[int, float]] = {}   # cell -> (q, last max advantage)
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.t0 = time.monotonic()

    def _eta(self, now: float) -> str:
        frac = sum(min(q, self.budget.get(n, q)) for n, q in self.q.items()) / self.total_q
        if frac <= 0:
            return "ETA –"
        if frac >= 1:
            return "ETA 0s"
        return f"ETA ~{_clock((now - self.t0) * (1 - frac) / frac)}"

    def _adv(self, cell: str) -> str:
        if cell not in self.adv:
            return ""
        q, value = self.adv[cell]
        return f" adv {value:.2f}" + ("" if q == self.q.get(cell) else f" at q={q}")

    def _line(self, now: float, text: str) -> None:
        self.write(f"[{_clock(now - self.t0):>8}] {text} | cells {self.done}/{self.cells} done "
                   f"| {self._eta(now)}")

    def __call__(self, ev: dict) -> None:
        now = time.monotonic()
        kind = ev["event"]
        if kind == "start":
            self.done = ev["skipped"]
            self._line(now, f"bench: {ev['cells']} cells ({ev['skipped']} already done), "
                            "preparing worlds")
        elif kind == "prewarmed":
            self._line(now, f"worlds ready: {', '.join(map(str, ev.get('worlds', [])))}")
        elif kind == "progress":
            cell = ev["cell"]
            self.first.setdefault(cell, now)
            self.q[cell] = int(ev.get("q") or 0)
            if ev.get("advantage") is not None:
                self.adv[cell] = (self.q[cell], float(ev["advantage"]))
            if now - self.last.get(cell, -math.inf) < self.every:
                return
            self.last[cell] = now
            adv = self._adv(cell)
            budget = self.budget.get(cell)
            self._line(now, f"{cell} q={self.q[cell]}" + (f"/{budget}" if budget else "") + adv
                       + f" ({_clock(now - self.first[cell])} in cell)")
        elif kind == "cell_done":
            cell = ev["cell"]
            if cell in self.budget:
                self.q[cell] = self.budget[cell]
            self.done += 1
            secs = ev.get("seconds")
            adv = self._adv(cell).replace(" adv", ", adv", 1)
            self._line(now, f"done {cell} (q={ev.get('q', self.q.get(cell, 0))}{adv}"
                            + (f", {_clock(secs)}" if secs is not None else "") + ")")


def _report(cfg, out: Path, console) -> None:
    """Merge cell results, print and write the summary, draw the headline plots."""
    from qbudget.plotting import plot_results
    from qbudget.results import read_results, write_results
    from qbudget.summary import print_summary, render_markdown, summarize
    from qbudget.termplot import render_curves

    import pandas as pd

    parts = [read_results(p) for p in sorted((out / "cells").glob("*/results.parquet"))]
    if not parts:
        raise QBudgetError(f"no cell results under {out / 'cells'}")
    df = pd.concat(parts, ignore_index=True)
    write_results(out / "results.parquet", df.to_dict("records"))
    epsilon = cfg.grid.epsilon or None
    summary = summarize(df, baseline=cfg.grid.baseline, epsilon=epsilon, seed=0)
    probe_note = ""
    if cfg.run.eval.probe_subset:
        probe_note = (f"Evaluated on a stratified subset of {cfg.run.eval.probe_subset} probe prompts "
                      "(category and train/test shares kept), not the full probe.\n\n")
    (out / "summary.md").write_text(probe_note + render_markdown(summary), encoding="utf-8")
    if probe_note:
        console.print(probe_note.strip())
    print_summary(summary, console)
    for ext in ("png", "svg"):
        plot_results(df, out / f"advantage_vs_q.{ext}", metric="advantage", epsilon=epsilon)
    console.print(render_curves(df))
