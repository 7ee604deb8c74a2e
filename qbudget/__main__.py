"""``python -m qbudget`` = the ``qbudget`` command."""

from qbudget.cli import app

app(prog_name="qbudget")
