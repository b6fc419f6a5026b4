"""Clocks shared by the hook benchmarks: interleaved rounds, paired differences, spreads.

Why paired and interleaved: on a shared machine a slow patch hits whatever runs at that moment.
Every round runs every variant once (order rotated from round to round), and an overhead is
taken *within* a round (hooked minus plain of the same round), so load changes between rounds
cancel instead of landing on one side of a ratio. The headline is the median of those paired
differences over the median of the floor; the spread is the 25th..75th percentile of the
per-round ratios. ``best`` (fastest hooked - fastest plain) / fastest floor is printed beside it:
another process can only slow a run down, so on a loaded machine it is the steadier estimate of
what a quiet one shows.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rounds(fns: dict[str, Callable[[], object]], reps: int,
           clock: Callable[[Callable[[], object]], float],
           after: dict[str, Callable[[], object]] | None = None,
           inner: int = 1) -> dict[str, list[float]]:
    """``reps`` rounds; each runs every function once under ``clock``, in an order shuffled per
    round (seeded: the same orders on every run and every rank, which must call the same
    collectives), so that no variant always follows the same neighbour -- a rotation alone
    keeps the cycle, and a variant that always runs right after another's ``after`` (dropping
    many stored tensors) measured 1.45x where it measured 1.0-1.1x elsewhere in the cycle.
    ``after[name]`` runs after that function, outside the clock (dropping what a retrieval
    stored). With ``inner`` > 1 a round times each function ``inner`` times in a row and keeps
    the fastest: on a shared machine a run is only ever slowed down by others, so the fastest
    of a few is the closest to the code's own cost, and a preempted run does not swamp a small
    difference."""
    after = after or {}
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(13)
    for _ in range(reps):
        for name in order.sample(names, len(names)):
            best = float("inf")
            for _ in range(inner):
                best = min(best, clock(fns[name]))
                if name in after:
                    after[name]()
            times[name].append(best)
    return times


def wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead_ratio(times: dict[str, list[float]], hooked: str, plain: str, floor: str,
                   floor_plain: str | None = None) -> dict[str, float]:
    """(hooked - plain) over floor (or over floor - floor_plain), paired per round."""
    added = [h - p for h, p in zip(times[hooked], times[plain])]
    if floor_plain is None:
        base = list(times[floor])
    else:
        base = [f - p for f, p in zip(times[floor], times[floor_plain])]
    ratios = [a / b for a, b in zip(added, base) if b > 0]
    med_base = statistics.median(base)
    best_base = min(times[floor]) - (min(times[floor_plain]) if floor_plain else 0.0)
    return {"ratio": statistics.median(added) / med_base if med_base > 0 else float("inf"),
            # fastest over fastest: what a quiet machine shows (a loaded one only slows runs)
            "best": (min(times[hooked]) - min(times[plain])) / best_base
            if best_base > 0 else float("inf"),
            "q25": quantile(ratios, 0.25), "q75": quantile(ratios, 0.75),
            "min": min(ratios), "max": max(ratios),
            "added_s": statistics.median(added), "floor_s": med_base}


def ratio(times: dict[str, list[float]], timed: str, floor: str) -> dict[str, float]:
    """``timed`` over ``floor``, both whole operations timed in the same rounds."""
    per_round = [t / f for t, f in zip(times[timed], times[floor])]
    med_floor = statistics.median(times[floor])
    return {"ratio": statistics.median(times[timed]) / med_floor,
            "q25": quantile(per_round, 0.25), "q75": quantile(per_round, 0.75),
            "min": min(per_round), "max": max(per_round),
            "best": min(times[timed]) / min(times[floor]),
            "added_s": statistics.median(times[timed]), "floor_s": med_floor}


def fmt(r: dict[str, float]) -> str:
    return (f"{r['ratio']:.2f}x (per-round 25..75%: {r['q25']:.2f}..{r['q75']:.2f}; "
            f"fastest/fastest {r['best']:.2f}x; added {r['added_s'] * 1e3:.2f} ms over floor "
            f"{r['floor_s'] * 1e3:.2f} ms)")
