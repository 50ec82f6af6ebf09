"""Per-stage timings as Beam distribution metrics (microseconds), summed into the run report."""

from __future__ import annotations

import time
from contextlib import contextmanager

from apache_beam.metrics import Metrics


class StageTimer:
    """``with timer.time(): ...`` records the block's wall time in the ``<namespace>.<name>_us`` distribution."""

    def __init__(self, namespace: str, name: str) -> None:
        self.distribution = Metrics.distribution(namespace, f"{name}_us")

    @contextmanager
    def time(self):
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.record((time.perf_counter_ns() - start) // 1000)

    def record(self, microseconds: int) -> None:
        """Record a time measured elsewhere (Beam metrics can only be updated from the DoFn's own thread)."""
        self.distribution.update(microseconds)
