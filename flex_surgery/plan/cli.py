"""``python -m flex_surgery plan``: print a plan, and refuse one over ``--budget``."""

from __future__ import annotations

import argparse

from flex_surgery.plan.errors import PlanError
from flex_surgery.plan.mesh import parse_bytes, parse_dtype, parse_mesh, parse_tokens
from flex_surgery.plan.planner import DEFAULT_DISK_BUFFER, STORES, plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a built-in config name (llama-70b, llama-8b, llama-7b, "
                             "smollm2-135m, gpt2) or the path of a config.json")
    parser.add_argument("--mesh", default="", help="axis sizes, e.g. tp=8,pp=4,dp=8")
    parser.add_argument("--tokens", required=True,
                        help="BATCHxSEQUENCE per data-parallel replica, e.g. 8x4096")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    parser.add_argument("--hooks", action="append", required=True,
                        help="module name pattern as for hook groups: glob (which crosses "
                             "dots), 're:REGEX' or a substring; repeatable")
    parser.add_argument("--store", default="memory", choices=STORES)
    parser.add_argument("--disk-buffer", default=str(DEFAULT_DISK_BUFFER),
                        help="host buffer of the disk store (e.g. 1GiB)")
    parser.add_argument("--budget", default=None,
                        help="host memory per storing rank, e.g. 64GiB: refuse a plan over it")


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit status 2 with a clear message on bad input or an exceeded budget."""
    try:
        batch, seq = parse_tokens(args.tokens)
        result = plan(args.model, parse_mesh(args.mesh), batch, seq, parse_dtype(args.dtype),
                      args.hooks, args.store, parse_bytes(args.disk_buffer))
        print(result.table())
        if args.budget is not None:
            result.check_budget(parse_bytes(args.budget))
            print(f"fits the budget of {args.budget} per storing rank")
    except PlanError as error:
        print(f"error: {error}")
        return 2
    return 0
