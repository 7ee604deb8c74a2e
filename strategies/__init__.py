"""qbudget's built-in acquisition strategies.

Each module exposes ``make(**params) -> qbudget.strategy.Strategy`` and is registered in
pyproject.toml under the ``qbudget.strategies`` entry-point group — the same route a
third-party plugin takes. ``random`` lives in ``uniform.py`` so the package never shadows
the standard library's ``random`` module.
"""
