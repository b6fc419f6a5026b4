"""How long do multi-process tests cost with the forked rank pool, versus spawning a world?

Runs, in one go: (a) pytest on 50 trivial 4-rank tests dispatched to the session's forked pool
(the real harness, `_test/rank_pool.py`), and (b) one 4-rank world started with
``torch.multiprocessing.spawn`` doing the same trivial all_reduce, which is what each test would
pay without the pool. Prints the ratio and writes ``results/rank_pool_dispatch.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def _spawn_body(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    dist.destroy_process_group()


def time_pool_tests() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_trivial.py").write_text(TEST_FILE)
        env = dict(os.environ, PYTHONPATH=f"{ROOT / '_test'}{os.pathsep}{ROOT}")
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--rootdir", tmp, "-c", os.devnull, tmp,
             "-o", f"pythonpath={ROOT / '_test'}"],
            check=True, env=env, capture_output=True,
        )
        pytest_total = time.perf_counter() - start
    return pytest_total


def time_one_spawned_world() -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    mp.spawn(_spawn_body, args=(WORLD, port), nprocs=WORLD, join=True)
    return time.perf_counter() - start


def main() -> None:
    pool_total = time_pool_tests()
    spawn_one = time_one_spawned_world()
    result = {
        "n_tests": N_TESTS,
        "world_size": WORLD,
        "pytest_wall_s_with_forked_pool": round(pool_total, 3),
        "per_test_s_with_forked_pool": round(pool_total / N_TESTS, 4),
        "one_spawned_world_s": round(spawn_one, 3),
        "estimated_wall_s_spawning_per_test": round(spawn_one * N_TESTS, 1),
        "speedup": round(spawn_one * N_TESTS / pool_total, 1),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "results" / "rank_pool_dispatch.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
