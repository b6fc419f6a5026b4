"""Session-wide test set-up: the forked rank pools (see rank_pool.py), the peers' own test runs
(see peer_tests.py) and CPU determinism."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_finish(session):
    """Fork the rank pools the selected tests need before any test runs.

    Forking is only safe while the parent has not started autograd's device threads: once a
    CUDA backward ran in the pytest process, forked children cannot use autograd. Forking
    right after collection (every test module is imported, no test has run) avoids that.
    """
    from rank_pool import get_pool

    sizes = {getattr(item.function, "world_size", None) for item in session.items
             if hasattr(item, "function")}
    for world_size in sorted(s for s in sizes if s):
        get_pool(world_size)
    # The peers' own test runs, started now (after the fork) at the lowest priority.
    from peer_tests import start_early

    start_early(session.items, Path(tempfile.mkdtemp(prefix="flex-peer-runs-")))


def pytest_sessionfinish(session, exitstatus):
    from peer_tests import stop_early
    from rank_pool import close_all_pools

    close_all_pools()
    stop_early()


@pytest.fixture(autouse=True)
def _default_dtype_per_test():
    """A test that switches the default dtype (float64 for exact equivalence) in this process
    does not leak it into the next one; pool ranks reset it after every body themselves."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
