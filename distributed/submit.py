"""Run a flex_surgery program on N ranks through flex_surgery.launch, with cluster.env's settings.

    python distributed/submit.py                              # distributed/check_cluster.py
    python distributed/submit.py examples/foo.py --steps 2    # a script
    python distributed/submit.py --executor local -m mypackage.train
    python distributed/submit.py --nprocs 2 --executor torchrun examples/foo.py

Every rank runs the program (which joins with flex_surgery.launch.init_from_env, or finds the
process group already started). The demo starts its own ranks: use demo.sh for it.

Unlike slurm_submit.sh, this waits for the job and reports every rank: its return (a script's is
None) or its traceback. ``--executor``/``--nprocs`` override cluster.env for one run (on one
machine, local and torchrun run ``--nprocs`` ranks, default FLEX_TASKS_PER_NODE).
Exit code: 0 if every rank succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from flex_surgery.launch import EXECUTORS, LaunchError, run_script, submit  # noqa: E402
from flex_surgery.launch.cluster_config import load_cluster_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("cluster.env")))
    parser.add_argument("--executor", choices=EXECUTORS)
    parser.add_argument("--nprocs", type=int)
    parser.add_argument("program", nargs=argparse.REMAINDER,
                        help="script path or -m module, then its arguments")
    args = parser.parse_args(argv)
    program = args.program or [str(REPO_ROOT / "distributed" / "check_cluster.py")]
    target, *program_args = program[1:] if program[0] == "-m" else program
    config = load_cluster_config(args.config)
    options = config.launch_options()
    if args.executor:
        options["executor"] = args.executor
    if options["executor"] != "slurm":
        options.update(nodes=1, nprocs=args.nprocs or config.tasks_per_node)
    elif args.nprocs:
        options["nprocs"] = args.nprocs
    print(f"{options['executor']}: {options['nprocs']} rank(s) of {' '.join(program)}")
    job = submit(run_script, target, *program_args, python_path=[str(REPO_ROOT)], **options)
    print(f"job {job.job_id}; logs in {job.folder}")
    try:
        results = job.results()
    except LaunchError as err:
        print(err, file=sys.stderr)
        return 1
    for rank, value in enumerate(results):
        print(f"rank {rank}: ok" + ("" if value is None else f" -> {value!r}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
