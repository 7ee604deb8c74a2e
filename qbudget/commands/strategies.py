"""``qbudget strategies``: every registered acquisition strategy, and broken plugins."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("strategies")(strategies_command)


def _fmt(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def strategies_command(
    plain: bool = typer.Option(False, "--plain", help="Tab-separated lines instead of a table."),
) -> None:
    """List strategies (entry-point group qbudget.strategies): name, package, parameters, description."""
    from qbudget.strategy import list_strategies

    infos = list_strategies()
    ok = [i for i in infos if i.error is None]
    broken = [i for i in infos if i.error is not None]
    if plain:
        for i in ok:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in i.params.items())
            typer.echo(f"{i.name}\t{i.package}\t{params}\t{i.description}")
        for i in broken:
            typer.echo(f"BROKEN {i.name}\t{i.package}\t{i.error}")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    table = Table(title="strategies", show_lines=False)
    for col in ("name", "package", "parameters", "description"):
        table.add_column(col, overflow="fold")
    for i in ok:
        table.add_row(i.name, i.package, "\n".join(f"{k}={_fmt(v)}" for k, v in i.params.items()) or "-",
                      i.description)
    console.print(table)
    for i in broken:
        console.print(f"[red]broken plugin[/red] {i.name} ({i.package}, {i.target}): {i.error}",
                      highlight=False, markup=True, soft_wrap=True)
