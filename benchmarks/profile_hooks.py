"""Where a hook's time goes: a cProfile breakdown of the retrieval and edit paths.

Same model as ``retrieval_overhead.py`` (8 blocks, H=512, 256 tokens, a hook on every
up-projection; forked ranks, gloo, one thread per rank), layout ``tp2`` (fairscale TP=2) or
``pp2`` (two pipeline stages). One forward records what every hooked module returns; rank 0 then
profiles ``--rounds`` rounds of the registered hooks called on it (PP retrieval: then collected
to rank 0), so the model's own compute and collectives are not in the profile -- retrieval
(``read``), an x2 edit on the leader path (``edit``) and, where ``HookFunction`` has it,
``replicate_edit=True`` -- and prints, per hook call, the time spent in:

* ``gather``: the collectives that bring the pieces together (``dist.gather`` /
  ``dist.all_gather``, cumulative: waiting for the peer included);
* ``transfer``: the point-to-point moves that bring them together instead (retrieval on the
  CPU sends every piece to the stage leader with ``dist.isend`` / ``dist.irecv``): those calls,
  ``dist.send`` / ``dist.recv``, and the built-in ``Work.wait`` called from outside
  ``distributed_c10d.py`` (waiting for the pieces, or for an asynchronous gather; the wait
  inside a blocking collective is that collective's);
* ``concatenate``: ``torch.cat``, and the copies of pieces into their place in the whole
  tensor that retrieval forms without one (``copy_`` called from
  ``piece_transfer.collect_pieces`` / ``gather_pieces``); ``copy to host``: ``store_copy`` (the
  stored detached copy);
* ``editing function``; ``status agreement`` (``dist.broadcast`` of the leader's success or
  error, or the replicated path's 1-int ``dist.all_reduce``); ``re-shard`` (``dist.scatter``:
  the edited pieces back to their ranks);
* ``pipeline collection`` (``sync_pipeline_outputs``, PP only; profiled apart from the hook
  calls, so its own sends and waits are not in the rows above);
* ``bookkeeping``: the rest of the hook (layouts, autograd functions, dict updates, checks).

A collective's time includes waiting for the slowest rank to arrive: on a loaded machine that
skew lands at the first collective of a hook. cProfile adds a fixed cost to every Python call,
so bookkeeping is overstated next to the collectives; the split, not the sum, is what this
shows (``retrieval_overhead.py`` has the unprofiled timings). The 12 functions with the most
own time in the profiled rounds follow.

    python benchmarks/profile_hooks.py [--layout tp2|pp2] [--rounds 20]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

CATEGORIES = [  # (label, file suffix, function names): cumulative time of those functions
    ("gather", "distributed_c10d.py", ("gather", "all_gather", "all_gather_into_tensor")),
    ("transfer", "distributed_c10d.py", ("isend", "irecv", "send", "recv")),
    ("concatenate", "", ("<built-in method torch.cat>",)),
    ("copy to host", "runtime.py", ("store_copy",)),
    ("editing function", "retrieval_overhead.py", ("_times_two",)),
    ("status agreement", "distributed_c10d.py", ("broadcast", "all_reduce")),
    ("re-shard", "distributed_c10d.py", ("scatter",)),
    ("pipeline collection", "wrapper.py", ("sync_pipeline_outputs",)),
]
HOOK = ("hook_function.py", "_forward_hook")
# Work.wait, a built-in: cProfile names it after its module ("<built-in method
# torch._C._distributed_c10d.wait>"), older versions after its class ("<method 'wait' of ...>").
WAIT = re.compile(r"^<(built-in )?method\b.*\bwait\b")
COPY = re.compile(r"^<method 'copy_' of ")
C10D = "distributed_c10d.py"
PLACING = ("collect_pieces", "gather_pieces")  # piece_transfer.py: pieces copied into place


def _cumulative(stats: dict, suffix: str, names: tuple[str, ...]) -> float:
    total = 0.0
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
        if func in names and file.endswith(suffix):
            total += ct
    return total


def _built_in_from(stats: dict, name: re.Pattern, caller) -> float:
    """Cumulative time of the built-ins whose name matches ``name``, called from the callers
    ``caller(file, function)`` accepts (cProfile keeps each caller's share)."""
    total = 0.0
    for (file, _line, func), (_cc, _nc, _tt, _ct, callers) in stats.items():
        if file == "~" and name.match(func):
            total += sum(c[3] for (cf, _, cfn), c in callers.items() if caller(cf, cfn))
    return total


def _waits_outside_c10d(stats: dict) -> float:
    """Time in ``Work.wait`` called from outside ``distributed_c10d.py``: waiting for an
    ``isend``/``irecv`` (or an asynchronous collective) the caller started. A blocking
    collective waits inside itself; that wait is already in the collective's cumulative time."""
    return _built_in_from(stats, WAIT, lambda file, _func: not file.endswith(C10D))


def _placing(stats: dict) -> float:
    """Time retrieval spends copying pieces into their place in the whole tensor."""
    return _built_in_from(stats, COPY, lambda file, func: file.endswith("piece_transfer.py")
                          and func in PLACING)


def _rank(layout: str, forwards: int) -> dict | None:
    import retrieval_overhead as ro

    from flex_surgery.hooks import FlexModel, HookFunction

    if layout == "tp2":
        from fairscale.nn.model_parallel import initialize as fs

        fs.initialize_model_parallel(2)
    rank = dist.get_rank()
    x = torch.randn(1, ro.TOKENS, ro.H, generator=torch.Generator().manual_seed(1))
    recv = torch.empty_like(x)
    names = [(f"blocks.{i}.up" if layout == "pp2" else f"{i}.up") for i in range(ro.BLOCKS)]
    kinds = ["read", "edit"] + (["edit_replicate"] if ro._has_replicate_edit() else [])
    out = {}
    for kind in kinds:
        model, _, _ = ro._build(layout, ro.H)
        stored = {} if kind == "read" else None
        flex = FlexModel(model, stored, pipeline_parallel_size=2 if layout == "pp2" else 1)
        for name in names:
            extra = {"replicate_edit": True} if kind == "edit_replicate" else {}
            fn = None if kind == "read" else ro._times_two
            flex.register_forward_hook(HookFunction(name, editing_function=fn, **extra))
        # One forward records what each hooked module returns; the profile then covers the
        # registered hooks called on it (and, PP, the collection), not the model's compute.
        recorded = {}
        modules = dict(model.named_modules())
        handles = [modules[n].register_forward_hook(
            lambda m, a, o, n=n, rec=recorded: rec.__setitem__(n, (m, a, o)), prepend=True)
            for n in names if n in modules]
        with torch.no_grad():
            if layout == "pp2":
                if rank == 0:
                    dist.send(flex(x).contiguous(), 1)
                else:
                    dist.recv(recv, 0)
                    flex(recv)
                if kind == "read":
                    flex.sync_pipeline_outputs()
            else:
                flex(x)
        for h in handles:
            h.remove()
        hooks = {hf.module_name: hf.torch_hook() for hf in flex.hook_functions
                 if hf.module_name in recorded}
        calls = [(hooks[n], recorded[n]) for n in names if n in recorded]

        # Two profiles, enabled in turn: the hook calls, and the pipeline collection after
        # them (whose own sends and waits must not land in the hook's rows).
        in_hooks, in_sync = cProfile.Profile(), cProfile.Profile()

        def step(flex=flex, stored=stored, kind=kind, calls=calls, profiles=None):
            if profiles:
                profiles[0].enable()
            for hook, (m, a, o) in calls:
                hook(m, a, o)
            if profiles:
                profiles[0].disable()
            if layout == "pp2" and kind == "read":
                if profiles:
                    profiles[1].enable()
                flex.sync_pipeline_outputs()
                if profiles:
                    profiles[1].disable()
            if stored:
                stored.clear()

        with torch.no_grad():
            for _ in range(3):
                step()
            dist.barrier()
            for _ in range(forwards):
                step(profiles=(in_hooks, in_sync))
            dist.barrier()
        flex.restore()
        stats = pstats.Stats(in_hooks).stats
        n_calls = forwards * len(calls)
        row = {label: _cumulative(stats, suffix, funcs) / n_calls * 1e6
               for label, suffix, funcs in CATEGORIES if label != "pipeline collection"}
        row["transfer"] += _waits_outside_c10d(stats) / n_calls * 1e6
        row["concatenate"] += _placing(stats) / n_calls * 1e6
        row["hook total"] = _cumulative(stats, *HOOK[:1], HOOK[1:]) / n_calls * 1e6
        row["bookkeeping"] = row["hook total"] - sum(
            row[label] for label, _, _ in CATEGORIES if label != "pipeline collection")
        sync = pstats.Stats(in_sync).stats if kind == "read" and layout == "pp2" else {}
        row["pipeline collection"] = _cumulative(sync, "wrapper.py",
                                                 ("sync_pipeline_outputs",)) / n_calls * 1e6
        merged = pstats.Stats(in_hooks)
        if sync:
            merged.add(in_sync)
        top = sorted(merged.stats.items(), key=lambda kv: -kv[1][2])[:12]
        row["top"] = [(f"{Path(f).name}:{ln}({fn})", tt / n_calls * 1e6)
                      for (f, ln, fn), (_, _, tt, _, _) in top]
        out[kind] = row
    if layout == "tp2":
        fs.destroy_model_parallel()
    return out if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("tp2", "pp2"), default="tp2")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from flex_surgery.launch import fork_ranks

    rows = fork_ranks(_rank, args.layout, args.rounds, nprocs=2, device="cpu", threads=1,
                      timeout_s=900)[0]
    labels = [c[0] for c in CATEGORIES] + ["bookkeeping", "hook total"]
    kinds = list(rows)
    hooks = 4 if args.layout == "pp2" else 8
    print(f"{args.layout}: microseconds per hook call on rank 0 (cProfile, cumulative), "
          f"{args.rounds} rounds x {hooks} hook calls on rank 0")
    print(f"{'':22s}" + "".join(f"{k:>16s}" for k in kinds))
    for label in labels:
        print(f"{label:22s}" + "".join(f"{rows[k][label]:16.0f}" for k in kinds))
    for kind in kinds:
        print(f"-- {kind}: most own time (us per hook call)")
        for name, us in rows[kind]["top"]:
            print(f"   {us:9.1f}  {name}")


if __name__ == "__main__":
    main()
