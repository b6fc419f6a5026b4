"""Session-wide test set-up: the forked rank pools (see rank_pool.py) and CPU determinism."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    from rank_pool import close_all_pools

    close_all_pools()


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
