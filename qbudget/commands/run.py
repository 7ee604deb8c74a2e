"""``qbudget run``: one world x strategy x seed, spending a budget and recording results."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)


def run_command(
    out: Path = typer.Option(..., "--out", help="Run directory (must be empty unless --resume)."),
    world: Optional[str] = typer.Option(None, "--world", help="World name (see `qbudget world list`)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Strategy name (see `qbudget strategies`)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Training queries to spend (q)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed (default 0)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment TOML (CLI flags override it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its ledger and state."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Shared response cache (SQLite); default DIR/responses.sqlite."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
    certify: Optional[float] = typer.Option(
        None, "--certify", metavar="EPS",
        help="Stop buying at the first checkpoint where every adversary is certified "
             "EPS-indistinguishable (sequential, anytime-valid; level from [certify] alpha, "
             "default 0.05)."),
) -> None:
    """Spend a teacher-query budget with one strategy; write results.parquet and manifest.json."""
    from qbudget.config import load_run_config
    from qbudget.errors import QBudgetError
    from qbudget.loop import Run

    if config is None and (world is None or strategy is None or budget is None):
        raise QBudgetError("give --world, --strategy and --budget (or --config FILE.toml)")
    cfg = load_run_config(config, world=world, strategy=strategy, budget=budget, seed=seed,
                          certify=certify)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    run = Run(cfg, out, resume=resume, cache_path=cache)  # validates everything first
    console = Console(stderr=True, quiet=quiet)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("q {task.completed:.0f}/{task.total:.0f}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                  transient=False, disable=quiet) as progress:
        task = progress.add_task(f"{cfg.world}/{cfg.strategy.name}", total=max(cfg.budget.total, 1), info="")
        last = {"adv": None}

        def on_progress(ev: dict) -> None:
            if ev["event"] == "evaluated" and ev.get("advantage") is not None:
                last["adv"] = ev["advantage"]
            info = f"round {ev.get('round', '-')}"
            if last["adv"] is not None:
                info += f"  last max advantage {last['adv']:.3f}"
            progress.update(task, completed=ev["q"], info=info)

        run.progress = on_progress
        outcome = run.execute()
    import json

    from qbudget.rundir import RunDir

    manifest = json.loads(RunDir(out).manifest.read_text())
    line = f"done: q={outcome.q} paid={outcome.paid} rows={outcome.rows} -> {outcome.out}"
    if manifest.get("stopped_by"):
        line += f" (stopped by {manifest['stopped_by']})"
    if cfg.certify.enabled:
        info = manifest.get("certify", {})
        line += (f" (certified at q={info['q_certified']}, epsilon={cfg.certify.epsilon:g})"
                 if info.get("certified") else
                 f" (not certified at epsilon={cfg.certify.epsilon:g})")
    typer.echo(line)
    typer.echo(spend_line(manifest.get("spend")))


def spend_line(spend: dict | None) -> str:
    """One line with what the run consumed and paid, per account (from ``Ledger.spend``)."""
    if not spend:
        return "spend: unknown"
    t, e = spend["train"], spend["eval"]
    est = t["estimated"] + e["estimated"]
    return (f"spend: train {t['tokens']:,} tokens ${t['usd']:.4f} (paid ${t['paid_usd']:.4f}), "
            f"eval {e['tokens']:,} tokens ${e['usd']:.4f} (paid ${e['paid_usd']:.4f})"
            + (f"; {est} answers' usage estimated" if est else ""))
