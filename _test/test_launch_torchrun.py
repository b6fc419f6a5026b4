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


def test_rank0_only_returns_rank_zeros_value(tmp_path):
    from test_launch import HERE, _rank_report

    from flex_surgery.launch import submit

    job = submit(_rank_report, -1, nprocs=2, executor="torchrun", device="cpu", folder=tmp_path,
                 python_path=[HERE], rank0_only=True)
    outcomes = job.outcomes()
    assert [(o.rank, o.ok, o.value) for o in outcomes] == [(0, True, (0, 2, "gloo", 3.0)),
                                                           (1, True, None)]
