"""Timing for the benchmark scripts: calls timed in turn within rounds, medians reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds, after ``warmup`` untimed calls of each.

    The calls are timed in turn within each round, so a slow spell of a shared machine lands on every
    call alike rather than on one: ratios between calls of one run are what the benchmarks report.

    >>> sorted(median_seconds({"a": lambda: None, "b": lambda: sum(range(10))}, repeats=3))
    ['a', 'b']
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
