"""Per-stage timings as Beam distribution metrics (microseconds), summed into the run report."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from apache_beam.metrics import Metrics

log = logging.getLogger(__name__)


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


def query_metrics(result) -> dict[str, list]:
    """The runner's metrics; empty (with a warning) on a runner that does not collect them (e.g. Dask)."""
    try:
        return result.metrics().query()
    except NotImplementedError as e:
        log.warning("this runner reports no metrics (%s): counts come from the manifest only", e)
        return {"counters": [], "distributions": [], "gauges": []}


def stage_timings(metrics: dict[str, list]) -> dict[str, dict]:
    """Distribution metrics in microseconds (``*_us``) -> count, total seconds and mean milliseconds per stage."""
    out = {}
    for d in metrics["distributions"]:
        name = d.key.metric.name
        # Ours end in _us; Beam's RunInference reports *_latency_micro_secs and *_latency_milli_secs.
        scale = {"_us": 1, "_micro_secs": 1, "_milli_secs": 1000}.get(
            next((suffix for suffix in ("_us", "_micro_secs", "_milli_secs") if name.endswith(suffix)), "")
        )
        value = d.committed if d.committed is not None else d.attempted
        if scale is None or value is None or not value.count:
            continue
        key = f"{d.key.metric.namespace}.{name.removesuffix('_us')}"
        total = out.setdefault(key, {"count": 0, "sum_us": 0})
        total["count"] += value.count
        total["sum_us"] += value.sum * scale
    return {
        k: {
            "count": v["count"],
            "total_s": round(v["sum_us"] / 1e6, 3),
            "mean_ms": round(v["sum_us"] / v["count"] / 1e3, 3),
        }
        for k, v in sorted(out.items())
    }
