"""The one way mmkd times things: wall-clock seconds per call, medians, and how disturbed a measurement was.

The compression report and both benchmarks time work on shared machines, where another process can take the CPU
for a while. So: callables that are compared run interleaved (one call of each per round, ``repeats`` rounds,
after untimed warm-up rounds), which spreads a passing load over all of them instead of charging it to whichever
ran at that moment; the figure reported is the median; and the spread of the times, the calls well above the
median and the process's CPU share say how disturbed the run was. A plain ``time.perf_counter`` loop rather than
``torch.utils.benchmark.Timer``, which would pin torch to one thread unless told otherwise: torch's thread count is
left as it is, as in every figure the project reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import Any

import torch

__all__ = ["Timings", "interleaved_times", "median_rate", "time_summary"]


@dataclass(frozen=True)
class Timings:
    """What :func:`interleaved_times` measured: per task name, the seconds of each timed call (in run order) and
    the value its last call returned; the wall and CPU seconds of the whole timed phase."""

    seconds: dict[Hashable, list[float]]
    wall_s: float
    cpu_s: float
    results: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def cpu_share(self, threads: int | None = None) -> float:
        """This process's CPU time over wall time x ``threads`` (default: torch's): near 1 when every thread had
        a core to itself, well below when other processes shared the cores -- a steady load slows every call
        alike, which the spread of the times does not show."""
        threads = torch.get_num_threads() if threads is None else threads
        return self.cpu_s / (self.wall_s * threads) if self.wall_s > 0 else 0.0


def interleaved_times(tasks: Mapping[Hashable, Callable[[], Any]], *, repeats: int, warmup: int = 0) -> Timings:
    """Time every callable of ``tasks`` ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    A round calls each task once, in the mapping's order; each call is timed alone with ``time.perf_counter`` (a
    task that runs on an accelerator must synchronise before it returns). Returns the :class:`Timings`.
    """
    for name, value, minimum in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not tasks:
        raise ValueError("nothing to time")
    results: dict[Hashable, Any] = {}
    for _ in range(warmup):
        for name, task in tasks.items():
            results[name] = task()
    seconds: dict[Hashable, list[float]] = {name: [] for name in tasks}
    cpu_start, wall_start = process_time(), perf_counter()
    for _ in range(repeats):
        for name, task in tasks.items():
            start = perf_counter()
            results[name] = task()
            seconds[name].append(perf_counter() - start)
    cpu, wall = process_time() - cpu_start, perf_counter() - wall_start
    return Timings(seconds=seconds, wall_s=wall, cpu_s=cpu, results=results)


def median_rate(times: Sequence[float], items: int = 1) -> float:
    """Items per second at the median time: ``items / median(times)``."""
    return items / statistics.median(times)


def time_summary(times: Sequence[float], items: int = 1, disturbed_above: float = 1.5) -> dict[str, Any]:
    """Mean and median of timed calls that each handled ``items`` items (a training step's batch, say).

    ``per_s`` is items over the total time (the mean rate), ``per_s_at_median`` items / the median time;
    ``spread`` is the slowest / fastest call and ``disturbed`` counts the calls over ``disturbed_above`` x the
    median (another process most likely took the CPU meanwhile).
    """
    if not times:
        raise ValueError("no times to summarise")
    total, median = sum(times), statistics.median(times)
    return {
        "count": len(times),
        "total_s": total,
        "mean_s": total / len(times),
        "median_s": median,
        "per_s": items * len(times) / total,
        "per_s_at_median": items / median,
        "spread": max(times) / min(times) if min(times) > 0 else float("inf"),
        "disturbed": sum(t > disturbed_above * median for t in times),
    }
