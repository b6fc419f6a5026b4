"""flex_surgery.launch with ``executor="torchrun"``: the same 2-rank check as the local executor.

A torchrun world costs ~5 s to start on two cores, so this runs in ``make test-slurm`` (which
sets ``FLEX_LAUNCHER_TESTS=1``) with the other launcher integration tests, not in ``make test``.
"""

import os

import pytest
from test_launch import check_two_rank_launch

pytestmark = pytest.mark.skipif(
    not os.environ.get("FLEX_LAUNCHER_TESTS"),
    reason="launcher integration test: set FLEX_LAUNCHER_TESTS=1 (make test-slurm does)",
)


def test_torchrun_two_ranks_return_values_and_name_the_failed_rank(tmp_path, monkeypatch):
    check_two_rank_launch("torchrun", tmp_path, monkeypatch)

