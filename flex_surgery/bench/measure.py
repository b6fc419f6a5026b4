"""Clocks and memory gauges for the research runners: medians with their spread, peak memory.

Timings are wall-clock with the device synchronised before each clock read (queued CUDA work
would otherwise be billed to whatever runs next). Competing measurements are *interleaved*
(A, B, B, A, A, B, ...) rather than run in blocks, so a slow patch of a shared machine lands on
both sides of a ratio instead of on one.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["PeakMemory", "Spread", "interleaved", "peak_memory", "timed"]


@dataclass(frozen=True)
class Spread:
    """Median, extremes and count of repeated measurements (seconds, or whatever was given)."""

    median: float
    low: float
    high: float
    repeats: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.repeats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds ``fn()`` took on ``device``, and what it returned."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                check: Callable[[str, object], None] | None = None,
                tick: Callable[[], None] | None = None,
                limits: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Time every function once per round for ``repeats`` rounds, alternating their order from
    one round to the next; ``limits`` caps how many rounds a (slow) function takes part in.

    ``check(name, result)`` runs after each timed call, outside the clock: what was timed is
    asserted correct every time, not once. ``tick`` is called after each round (progress bars).
    """
    names = list(fns)
    limits = limits or {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            if round_ >= limits.get(name, repeats):
                continue
            seconds, result = timed(fns[name], device)
            times[name].append(seconds)
            if check is not None:
                check(name, result)
        if tick is not None:
            tick()
    return times


@dataclass
class PeakMemory:
    """Peak memory while a block ran, in MiB: above what was in use at its start, and in all.

    On CUDA, the caching allocator's peak (``max_memory_allocated``); on the CPU, the process's
    resident set sampled every millisecond from ``/proc/self/statm`` (Linux), so a peak shorter
    than a sample can be missed. ``None`` where neither is available.
    """

    above_start_mib: float | None = None
    total_mib: float | None = None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak memory of the block into the yielded :class:`PeakMemory`."""
    result = PeakMemory()
    mib = 1024.0 ** 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.above_start_mib, result.total_mib = (peak - start) / mib, peak / mib
        return
    start = _rss_bytes()
    if start is None:
        yield result
        return
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak[0] = max(peak[0], _rss_bytes() or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        result.above_start_mib, result.total_mib = (peak[0] - start) / mib, peak[0] / mib
