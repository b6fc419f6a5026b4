"""The regression check of ``make bench``: each benchmark's ratios against their targets.

Timings are noisy, so this is not a test: a benchmark run with ``--check`` measures its ratios
in 3 interleaved repetitions (each repetition a full, interleaved measurement), takes the median
of the 3 per ratio, and fails (exit status 1) when a median exceeds its target by more than
``TOLERANCE``. A ratio is "lower is better" (time over its floor); the target is the number the
docs promise.

    from targets import check_targets
    sys.exit(check_targets("surgery", {"theater_fp32": [2.7, 2.8, 2.6]}, {"theater_fp32": 3.0}))
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

TOLERANCE = 1.2  # a median may exceed its target by 20 % before the check fails
REPETITIONS = 3


def run_plan(args: argparse.Namespace, models: Any,
             targets: Mapping[str, float]) -> tuple[int, int, dict]:
    """``(rounds, repetitions, results)`` of a run taking ``--rounds``, ``--quick`` and
    ``--check``: 5 rounds when quick or checking, ``REPETITIONS`` repetitions when checking,
    and the results' header (the machine, the models, the targets)."""
    import torch

    rounds = 5 if args.quick or args.check else args.rounds
    results = {"machine": {"cpus": os.cpu_count(), "default_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version()},
               "models": models, "targets": dict(targets), "rounds": rounds,
               "configurations": {}}
    return rounds, REPETITIONS if args.check else 1, results


def check_targets(benchmark: str, measured: Mapping[str, Sequence[float]],
                  targets: Mapping[str, float]) -> int:
    """Print one line per target and return the exit status: 0 when every median is within
    ``TOLERANCE`` of its target, 1 otherwise. A target with no measurement fails: a check that
    silently measures nothing would always pass."""
    status = 0
    for name, target in targets.items():
        values = list(measured.get(name, ()))
        if not values:
            print(f"[{benchmark}] FAIL {name}: not measured (target {target:.2f}x)")
            status = 1
            continue
        median = statistics.median(values)
        limit = target * TOLERANCE
        verdict = "ok  " if median <= limit else "FAIL"
        if median > limit:
            status = 1
        spread = ", ".join(f"{v:.2f}" for v in values)
        print(f"[{benchmark}] {verdict} {name}: median {median:.2f}x over [{spread}], "
              f"target {target:.2f}x (fails above {limit:.2f}x)")
    return status
