"""``python -m flex_surgery.bench export --model NAME --benchmark static|dynamic|weight_injection
[--test-seq-lengths 32,128,512] --out DIR``: see :mod:`flex_surgery.bench.export`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flex_surgery.bench",
                                     description="Research runners; each run writes one CSV.")
    runners = parser.add_subparsers(dest="runner", required=True)
    export = runners.add_parser("export", help="export, latency and weight-injection costs",
                                description=__doc__.splitlines()[0])
    export.add_argument("--model", default=None,
                        help="a name from the models registry (default: its default, a tiny "
                             "random GPT-2); --list-models lists them")
    export.add_argument("--benchmark", required=False,
                        choices=("static", "dynamic", "weight_injection"))
    export.add_argument("--test-seq-lengths", default="32,128,512",
                        help="comma-separated sequence lengths (default: 32,128,512)")
    export.add_argument("--out", type=Path, help="directory for the CSV (created if missing)")
    export.add_argument("--repeats", type=int, default=10,
                        help="timed repetitions per measurement (default: 10)")
    export.add_argument("--reexport-repeats", type=int, default=3,
                        help="re-exports timed for comparison (default: 3)")
    export.add_argument("--batch", type=int, default=1)
    export.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    export.add_argument("--models-config", type=Path, default=None,
                        help="models registry (default: $FLEX_SURGERY_MODELS or "
                             "configs/models.json)")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.add_argument("--list-models", action="store_true",
                        help="print the registry's models and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for bad input, with a one-line reason)."""
    from flex_surgery.bench.export import RunConfig, RunError, parse_seq_lengths, run
    from flex_surgery.bench.models import ModelUnavailable, load_registry

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        registry = load_registry(args.models_config)
        if args.list_models:
            for name, entry in registry.entries.items():
                mark = " (default)" if name == registry.default else ""
                print(f"{name:<20} {entry.kind:<10} {entry.about}{mark}")
            return 0
        if args.benchmark is None or args.out is None:
            parser.error("export needs --benchmark and --out")
        config = RunConfig(model=args.model or registry.default, benchmark=args.benchmark,
                           out=args.out, seq_lengths=parse_seq_lengths(args.test_seq_lengths),
                           batch=args.batch, repeats=args.repeats,
                           reexport_repeats=args.reexport_repeats, device=args.device,
                           models_config=registry.path, progress=not args.no_progress)
        path = run(config)
    except (RunError, ModelUnavailable, FileNotFoundError, ValueError) as err:
        print(f"{parser.prog} export: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
