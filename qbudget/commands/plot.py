"""``qbudget plot``: draw advantage (or similarity) vs q from a run or sweep directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qbudget.errors import QBudgetError


def register(app: typer.Typer) -> None:
    app.command("plot")(plot_command)


def plot_command(
    results: Path = typer.Argument(..., metavar="DIR",
                                   help="Sweep or run directory (or a results.parquet file)."),
    out: Path = typer.Option(..., "--out", help="Figure file: .png, .svg or .pdf."),
    metric: str = typer.Option("advantage", "--metric", help="advantage or similarity."),
    by: Optional[str] = typer.Option(None, "--by", help="Small multiples per category or adversary."),
    world: Optional[str] = typer.Option(None, "--world", help="Only this world."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="Draw an ε reference line."),
    baseline: str = typer.Option("stratified", "--baseline", help="Strategy drawn dashed."),
    x: str = typer.Option("q", "--x", help="x axis: q (queries), tokens or usd (what the "
                                            "training purchases cost)."),
) -> None:
    """One line per strategy (mean over seeds, 95% band), log-scale q axis."""
    from qbudget.plotting import FACETS, METRICS, X_AXES, plot_results
    from qbudget.results import read_results

    if metric not in METRICS:
        raise QBudgetError(f"unknown --metric '{metric}' (choose: {', '.join(METRICS)})")
    if by is not None and by not in FACETS:
        raise QBudgetError(f"unknown --by '{by}' (choose: category, adversary)")
    if x not in X_AXES:
        raise QBudgetError(f"unknown --x '{x}' (choose: {', '.join(X_AXES)})")
    if out.suffix.lower().lstrip(".") not in ("png", "svg", "pdf"):
        raise QBudgetError(f"--out must end in .png, .svg or .pdf, got '{out.name}'")
    df = read_results(results)
    path = plot_results(df, out, metric=metric, by=by, world=world, epsilon=epsilon,
                        baseline=baseline, x=x)
    typer.echo(f"wrote {path}")
