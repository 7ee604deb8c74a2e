"""``qbudget world list`` and ``qbudget world build NAME [--out DIR]``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

world_app = typer.Typer(help="Embedded worlds: list them, build them.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")


@world_app.command("list")
def list_command() -> None:
    """Every embedded world: architecture, sizes, whether it is built, and where."""
    from rich.console import Console
    from rich.table import Table

    from qbudget.worlds import list_worlds

    table = Table(title="embedded worlds")
    for col in ("name", "architecture", "pool", "probe", "teacher params", "student params",
                "status", "where"):
        table.add_column(col)
    for row in list_worlds():
        table.add_row(row["name"], row["architecture"], f"{row['pool']:,}", f"{row['probe']:,}",
                      f"{row['teacher_params']:,}", f"{row['student_params']:,}",
                      row["status"], row["root"])
    Console(width=200).print(table)


@world_app.command("build")
def build_command(
    name: str = typer.Argument(..., help="World name (see `qbudget world list`)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Build into DIR instead of the cache."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a valid copy exists."),
) -> None:
    """Build a world (pool, probe, teacher, base student) unless a verified copy exists."""
    from qbudget.worlds import build_world
    from qbudget.worlds.specs import get_spec

    get_spec(name)                               # unknown name -> exit 2 before any work
    start = time.perf_counter()
    world = build_world(name, out, force=force, progress=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"world '{world.name}' ready at {world.root} "
               f"({len(world.pool):,} pool, {len(world.probe):,} probe prompts; "
               f"{time.perf_counter() - start:.1f} s)")
