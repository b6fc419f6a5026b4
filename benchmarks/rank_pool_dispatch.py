"""How long do multi-process tests cost with the forked rank pool, versus a world per test?

Runs, in one go: (a) pytest on 50 trivial 4-rank tests dispatched to the session's forked pool
(the real harness, `_test/rank_pool.py`), (b) one 4-rank world forked by
:func:`flex_surgery.launch.fork_ranks` doing the same trivial all_reduce, which is what each test
would pay if it forked its own world, (c) the same world in fresh interpreters
(``launch(executor="torchrun")``), what each test would pay without forking, and (d) the pool
alone, in this process: forking it and dispatching the 50 bodies, without pytest's start-up
(importing torch dominates (a) on a loaded machine). Prints the ratios and writes
``results/rank_pool_dispatch.json``.

``--check`` (``make bench``) measures (b) and (d) in 3 interleaved repetitions and fails when
the median of ``pool_test_over_forked_world`` (one pooled test's share of (d) over one forked
world) exceeds its target by more than 20 % (``targets.check_targets``).

    python benchmarks/rank_pool_dispatch.py [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from targets import REPETITIONS, check_targets  # noqa: E402

# A pooled test costs at most half of forking a world for it (0.10-0.33 measured at load 11-18 on
# 2 cores, where a few dispatches stall for seconds behind other work): docs/launch.md.
TARGET = 0.5
N_TESTS = 50
WORLD = 4

TEST_FILE = textwrap.dedent(
    f"""
    import pytest
    import torch
    import torch.distributed as dist
    from rank_pool import distributed

    @pytest.mark.parametrize("i", range({N_TESTS}))
    @distributed(world_size={WORLD})
    def test_trivial(i):
        t = torch.tensor([1.0])
        dist.all_reduce(t)
        assert t.item() == {WORLD}
    """
)


def _body() -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return t.item()


def time_pool_tests() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_trivial.py").write_text(TEST_FILE)
        env = dict(os.environ, PYTHONPATH=f"{ROOT / '_test'}{os.pathsep}{ROOT}")
        start = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--rootdir", tmp, "-c", os.devnull, tmp,
             "-o", f"pythonpath={ROOT / '_test'}"],
            env=env, capture_output=True, text=True,
        )
        pytest_total = time.perf_counter() - start
        if run.returncode:
            sys.exit(f"the pool's pytest run failed:\n{run.stdout[-4000:]}{run.stderr[-2000:]}")
    return pytest_total


def time_pool_alone() -> float:
    """(d): fork a pool, dispatch N_TESTS bodies, close it; the harness without pytest."""
    sys.path.insert(0, str(ROOT / "_test"))
    from rank_pool import RankPool, distributed

    distributed(WORLD)(_body)  # registers the body by (module, name) before the pool forks
    start = time.perf_counter()
    pool = RankPool(WORLD)
    try:
        for _ in range(N_TESTS):
            assert pool.run(_body) == [float(WORLD)] * WORLD
    finally:
        pool.close()
    return time.perf_counter() - start


def time_one_world(executor: str) -> float:
    from flex_surgery.launch import launch

    start = time.perf_counter()
    assert launch(_body, nprocs=WORLD, executor=executor, device="cpu") == [float(WORLD)] * WORLD
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="3 interleaved repetitions of the pool and the forked world; "
                             f"fail when the median ratio exceeds {TARGET} by more than 20 %%")
    args = parser.parse_args()
    if args.check:
        ratios = []
        for _ in range(REPETITIONS):
            ratios.append(time_pool_alone() / N_TESTS / time_one_world("fork"))
        sys.exit(check_targets("rank_pool_dispatch", {"pool_test_over_forked_world": ratios},
                               {"pool_test_over_forked_world": TARGET}))
    pool_total = time_pool_tests()
    pool_alone = time_pool_alone()
    fork_one = time_one_world("fork")
    fresh_one = time_one_world("torchrun")
    result = {
        "n_tests": N_TESTS,
        "world_size": WORLD,
        "pytest_wall_s_with_forked_pool": round(pool_total, 3),
        "per_test_s_with_forked_pool": round(pool_total / N_TESTS, 4),
        "one_forked_world_s": round(fork_one, 3),
        "estimated_wall_s_forking_per_test": round(fork_one * N_TESTS, 1),
        "speedup_vs_forking_per_test": round(fork_one * N_TESTS / pool_total, 1),
        "pool_alone_wall_s": round(pool_alone, 3),
        "pool_test_over_forked_world": round(pool_alone / N_TESTS / fork_one, 4),
        "pytest_test_over_forked_world": round(pool_total / N_TESTS / fork_one, 3),
        "one_fresh_interpreter_world_s": round(fresh_one, 3),
        "estimated_wall_s_fresh_world_per_test": round(fresh_one * N_TESTS, 1),
        "speedup": round(fresh_one * N_TESTS / pool_total, 1),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "results" / "rank_pool_dispatch.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
