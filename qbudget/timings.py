"""Where a run's wall time goes: seconds per stage, measured with a context manager.

``perf_loop.py`` and the manifest report these, so a user can tell model compute (the
teacher, distillation, evaluation, model-based signals) from the loop's own overhead
(selection, the ledger, writing state).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass
class Timings:
    """Wall seconds per stage; model compute = oracle + signals + distill + evaluate."""

    select: float = 0.0
    signals: float = 0.0
    buy: float = 0.0      # ledger + oracle; the oracle's own share of it is ``oracle``
    oracle: float = 0.0
    distill: float = 0.0
    evaluate: float = 0.0
    bookkeeping: float = 0.0
    setup: float = 0.0

    def add(self, stage: str, seconds: float) -> None:
        setattr(self, stage, getattr(self, stage) + seconds)

    @contextmanager
    def stage(self, name: str, clock: Callable[[], float] = time.perf_counter) -> Iterator[None]:
        """Add the time the block takes to ``name``; ``clock`` may be another counter of
        seconds (e.g. an oracle's own busy time) to charge only what it adds meanwhile."""
        start = clock()
        try:
            yield
        finally:
            self.add(name, clock() - start)

    def overhead_fraction(self) -> float:
        """Share of the run outside model compute (selection, ledger, bookkeeping)."""
        compute = self.oracle + self.distill + self.evaluate + self.signals
        total = self.select + self.signals + self.buy + self.distill + self.evaluate + self.bookkeeping
        return 0.0 if total <= 0 else max(0.0, total - compute) / total


class TimedOracle:
    """Wraps an oracle to count the seconds spent inside it (model compute or network)."""

    def __init__(self, oracle):
        self._oracle, self.seconds = oracle, 0.0
        self.name, self.fingerprint = oracle.name, oracle.fingerprint

    def answer(self, prompts, sample: int = 0):
        return [text for text, _ in self.answer_usage(prompts, sample)]

    def answer_usage(self, prompts, sample: int = 0):
        from qbudget.oracles.usage import answer_with_usage

        t = time.perf_counter()
        try:
            return answer_with_usage(self._oracle, prompts, sample)
        finally:
            self.seconds += time.perf_counter() - t

    def worst_case(self, prompt):
        from qbudget.oracles.usage import worst_case

        return worst_case(self._oracle, prompt)
