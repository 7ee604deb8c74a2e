"""``qbudget bench``: run a sweep, then summarise, compare against the baseline and plot."""

from __future__ import annotations

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
    quiet: bool = typer.Option(False, "--quiet", help="No live progress display (the summary still prints)."),
) -> None:
    """Compare strategies over a grid of worlds x strategies x seeds; write results, summary, plots."""
    from rich.console import Console

    from qbudget.config import load_bench_config
    from qbudget.sweep import run_sweep

    if executor not in ("local", "ray"):
        raise QBudgetError(f"unknown executor '{executor}' (known: local, ray)")
    cfg = load_bench_config(_resolve_config(config, quick))
    console = Console()
    t0 = time.perf_counter()
    outcome = _run_with_progress(cfg, out, executor, console, quiet)
    _report(cfg, out, console)
    wall = time.perf_counter() - t0
    console.print(f"[bold]bench done[/bold]: {outcome.cells} cells ({outcome.skipped} already done) "
                  f"wall {wall:.0f} s, peak memory {peak_memory_mb():.0f} MB -> {out}")


def _run_with_progress(cfg, out: Path, executor: str, console, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from qbudget.sweep import run_sweep

    with Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, disable=quiet) as progress:
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
