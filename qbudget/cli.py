"""The ``qbudget`` command line (typer).

Each feature keeps its commands in its own module under ``qbudget.commands`` with a
``register(app)`` function; this file only assembles them and turns
:class:`~qbudget.errors.QBudgetError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import typer
from typer.core import TyperGroup

from qbudget import __version__
from qbudget.errors import QBudgetError

class _UserErrorsExitTwo(TyperGroup):
    """Root group: a QBudgetError anywhere below becomes ``error: ...`` and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QBudgetError as exc:
            typer.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


app = typer.Typer(
    name="qbudget",
    cls=_UserErrorsExitTwo,
    help="Spend a teacher-query budget wisely and measure student/teacher indistinguishability.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One entry per feature module; each defines register(app).
COMMAND_MODULES: list[str] = [
    "qbudget.commands.run",
    "qbudget.commands.bench",
    "qbudget.commands.world",
    "qbudget.commands.record",
    "qbudget.commands.strategies",
    "qbudget.commands.plot",
    "qbudget.commands.eval",
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qbudget {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """qbudget: which teacher queries to buy, and how close the student gets."""
    from qbudget.runtime import configure_jax

    configure_jax()


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)
