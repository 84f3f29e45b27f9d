"""Time budgets for a run of several sections (benchmarks/gpu_check): cumulative deadlines, interruption by SIGALRM.

``Budget(total, shares)`` gives section i the deadline start + the first i shares (scaled to ``total``), so a
section that ends early leaves its time to the next; ``Budget.run`` stops a step at its deadline with ``Overrun``.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from typing import Callable, Iterator

from .common import log

__all__ = ['Overrun', 'Budget', 'overrun_in']


class Overrun(Exception):
    """A budgeted step ran past its time."""


class Budget:
    """Cumulative deadlines: section i must end by start + the sum of the first i shares (scaled to ``total``), so
    a section that finishes early leaves its time to the next. ``run`` interrupts a step at the deadline (SIGALRM)."""

    def __init__(self, total: float, shares: dict[str, float]):
        self.start, self.total = time.monotonic(), total
        scale, elapsed = total / sum(shares.values()), 0.0
        self.deadlines = {}
        for name, share in shares.items():
            elapsed += share * scale
            self.deadlines[name] = self.start + elapsed
        self.deadline = self.start + total
        self.used: dict[str, float] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        begin, self.deadline = time.monotonic(), self.deadlines[name]
        log(f'section {name}: {self.left():.0f} s')
        try:
            yield
        finally:
            self.used[name] = round(time.monotonic() - begin, 1)

    def run(self, step: Callable[[], object], cap: float | None = None):
        """``step()``, raising Overrun if it is still running at the deadline (or after ``cap`` seconds)."""
        seconds = min(self.left(), cap if cap is not None else math.inf)
        if seconds <= 0:
            raise Overrun('no time left')

        def alarm(signum, frame):
            raise Overrun(f'stopped after {seconds:.0f} s')

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return step()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def overrun_in(exc: BaseException) -> Overrun | None:
    """The Overrun that ``exc`` is or wraps (Triton's interpreter and dynamo re-raise errors inside their own)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Overrun):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
