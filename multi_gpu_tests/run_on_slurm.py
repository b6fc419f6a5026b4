"""Run the GPU tests as SLURM jobs through submitit: one job per test file, pytest on every rank,
pass/fail collected per rank.

    python multi_gpu_tests/run_on_slurm.py                  # every group, cluster.env's settings
    python multi_gpu_tests/run_on_slurm.py collectives fsdp # some groups
    python multi_gpu_tests/run_on_slurm.py --executor local # this GPU machine (submitit, no SLURM)
    python multi_gpu_tests/run_on_slurm.py --list
    python multi_gpu_tests/run_on_slurm.py --cpu --nprocs 2  # check the runner without GPUs

A group is a file ``test_gpu_<group>.py``. Every job has FLEX_NODES x FLEX_GPUS_PER_NODE ranks
(one per GPU) and the partition, account and time of ``distributed/cluster.env``; the options
below override them. All jobs are submitted at once and then waited for. Each rank runs pytest on
its group inside the job's process group (started by flex_surgery.launch, NCCL on GPUs) and
returns its outcome per test; a rank that dies is reported with its error. Exit code 0 only if
every rank of every group passed (skips count as passes; a group where every test skipped on
every rank is flagged). ``--cpu`` runs the same tests on CPU ranks with gloo
(FLEX_MULTI_GPU_ON_CPU=1, see conftest.py), so the runner itself can be checked on a cluster
without GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))

from flex_surgery.launch import RankOutcome, submit  # noqa: E402
from flex_surgery.launch.cluster_config import load_cluster_config  # noqa: E402

GROUP_PREFIX = "test_gpu_"


def groups() -> dict[str, Path]:
    """Test groups by name: ``test_gpu_fsdp.py`` is group ``fsdp``."""
    return {p.stem[len(GROUP_PREFIX):]: p for p in sorted(HERE.glob(f"{GROUP_PREFIX}*.py"))}


def run_pytest_group(path: str, pytest_args: list[str]) -> dict:
    """On one rank: run pytest on ``path``; return the exit code and every test's outcome."""
    import pytest

    class Collector:
        def __init__(self) -> None:
            self.outcomes: dict[str, str] = {}
            self.errors: dict[str, str] = {}

        def pytest_runtest_logreport(self, report) -> None:
            if report.when == "call" or report.outcome != "passed":
                self.outcomes[report.nodeid] = report.outcome
            if report.failed:
                self.errors[report.nodeid] = report.longreprtext[-3000:]

        def pytest_collectreport(self, report) -> None:
            if report.skipped:  # a module-level skip (a missing optional package)
                self.outcomes[report.nodeid] = "skipped"
            if report.failed:
                self.outcomes[report.nodeid] = "error"
                self.errors[report.nodeid] = report.longreprtext[-3000:]

    collector = Collector()
    code = pytest.main([path, "-q", "-p", "no:cacheprovider", f"--rootdir={REPO_ROOT}",
                        *pytest_args], plugins=[collector])
    return {"exit_code": int(code), "outcomes": collector.outcomes, "errors": collector.errors}


def summarize(outcome: RankOutcome) -> tuple[bool, str]:
    """(passed, one-line summary) for one rank."""
    if not outcome.ok:
        return False, "rank failed: " + (outcome.error or "").strip().splitlines()[-1][:80]
    report = outcome.value
    counts = Counter(report["outcomes"].values())
    text = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no tests"
    # pytest exit codes: 0 all passed, 5 nothing collected (a module-level skip).
    return report["exit_code"] in (0, 5) and not counts.get("failed"), text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", help="group names (default: all)")
    parser.add_argument("--config", default=str(REPO_ROOT / "distributed" / "cluster.env"))
    parser.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--partition")
    parser.add_argument("--time-min", type=int)
    parser.add_argument("--cpu", action="store_true",
                        help="CPU ranks with gloo instead of GPUs (checks the runner)")
    parser.add_argument("--nprocs", type=int, help="ranks per job with --cpu (default 2)")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, quoted")
    args = parser.parse_args(argv)

    available = groups()
    if args.list:
        print("\n".join(f"{name}: {path.name}" for name, path in available.items()))
        return 0
    unknown = set(args.groups) - set(available)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; known: {sorted(available)}")
    chosen = {name: available[name] for name in (args.groups or available)}

    config = load_cluster_config(args.config)
    options = config.launch_options()
    nodes = args.nodes or (1 if args.executor == "local" else config.nodes)
    if args.cpu:
        os.environ["FLEX_MULTI_GPU_ON_CPU"] = "1"  # the jobs inherit the environment
        nprocs, gpus, device = args.nprocs or 2, 0, "cpu"
    else:
        gpus = args.gpus_per_node if args.gpus_per_node is not None else config.gpus_per_node
        if args.executor == "local" and not gpus:
            import torch

            gpus = torch.cuda.device_count()
        if gpus < 1:
            parser.error("no GPUs: set FLEX_GPUS_PER_NODE in cluster.env or pass "
                         "--gpus-per-node (or --cpu to check the runner on CPUs)")
        nprocs, device = nodes * gpus, None
    options.update(executor=args.executor, nodes=nodes, nprocs=nprocs, gpus_per_node=gpus,
                   device=device)
    if args.partition:
        options["partition"] = args.partition
    if args.time_min:
        options["timeout_min"] = args.time_min

    jobs = {}
    for name, path in chosen.items():
        jobs[name] = submit(run_pytest_group, str(path), args.pytest_args.split(),
                            python_path=[str(REPO_ROOT), str(HERE)], name=f"gpu_tests_{name}",
                            **options)
        print(f"{name}: job {jobs[name].job_id}, {options['nprocs']} rank(s), "
              f"logs in {jobs[name].folder}", flush=True)

    all_passed = True
    for name, job in jobs.items():
        outcomes = job.outcomes()
        print(f"\n== {name} ==")
        ran = False
        for outcome in outcomes:
            passed, text = summarize(outcome)
            all_passed &= passed
            ran |= outcome.ok and "passed" in outcome.value["outcomes"].values()
            print(f"  rank {outcome.rank}: {'PASS' if passed else 'FAIL'}  {text}")
            if outcome.ok:
                for nodeid, error in outcome.value["errors"].items():
                    print(f"    {nodeid}\n" + "\n".join(
                        "      " + line for line in error.splitlines()[-15:]))
            elif outcome.error:
                print("\n".join("    " + line for line in outcome.error.splitlines()[-15:]))
        if not ran:
            print("  (every test skipped on every rank)")
    print("\nall groups passed" if all_passed else "\nsome ranks FAILED")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
