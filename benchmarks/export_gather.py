"""Whole weights of an FSDP2 model: torch's distributed checkpoint against the registry's views.

On ``--ranks`` forked CPU ranks (gloo), a Llama sharded with ``fully_shard`` per block then the
root, times, interleaved round by round (median of ``--reps``):

* ``views``: the framework registry's shard views, one parameter gathered at a time, a CPU copy
  on every rank (``full_weights(model)``, the path kept for whole weights on every rank);
* ``dcp_rank0``: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` -- what
  ``full_weights(model, rank0_only=True)`` runs -- whole weights on rank 0 only;
* ``dcp_all``: ``get_model_state_dict(full_state_dict=True, cpu_offload=False)``, the only form
  of it that gives every rank the weights, with the CPU copies ``full_weights`` returns.

Every result is checked equal (``torch.equal``) to the views' on rank 0. Prints the ratios to
``views`` and the bytes each form holds on the model's device at once (``dcp_all``: the whole
model; ``views``: its largest parameter). Run: ``python benchmarks/export_gather.py [--reps 15]
[--ranks 2] [--sizes tiny,25m]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    "tiny": {},
    "25m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8, vocab_size=8192),
}


def _rank(sizes: list[str], reps: int) -> None:
    """One rank (forked by flex_surgery.launch.fork_ranks: the process group is up, its
    backend chosen from the device)."""
    world = dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from flex_surgery.models import tiny_hf_model

    mesh = init_device_mesh("cpu", (world,))
    for size in sizes:
        model = tiny_hf_model("llama", seed=0, **SIZES[size])
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        _measure(model, size, reps)


def _measure(model: torch.nn.Module, size: str, reps: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from flex_surgery.export import full_weights
    from flex_surgery.parallel.runtime import store_copy

    def dcp_all() -> dict[str, torch.Tensor]:
        got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=False))
        return {k: store_copy(v, blocking=True) for k, v in got.items()}

    forms = {"views": lambda: full_weights(model),
             "dcp_rank0": lambda: full_weights(model, rank0_only=True),
             "dcp_all": dcp_all}
    rank, world = dist.get_rank(), dist.get_world_size()
    want = full_weights(model)
    times: dict[str, list[float]] = {name: [] for name in forms}
    for rep in range(reps):
        order = list(forms) if rep % 2 == 0 else list(reversed(forms))
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            got = forms[name]()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            times[name].append(float(elapsed))
            if rank == 0:
                assert sorted(got) == sorted(want), name
                assert all(torch.equal(got[k], want[k]) for k in want), name
    if rank != 0:
        return
    params = sum(t.numel() for t in want.values())
    whole = sum(t.numel() * t.element_size() for t in want.values())
    largest = max(t.numel() * t.element_size() for t in want.values())
    base = statistics.median(times["views"])
    print(f"{size}: {params / 1e6:.2f}M parameters, {world} ranks, {reps} reps", flush=True)
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:10s} median {med * 1e3:8.2f} ms  (min {min(ts) * 1e3:8.2f})  "
              f"ratio to views {med / base:.3f}", flush=True)
    print(f"  device bytes held at once: dcp_all {whole / 2**20:.1f} MiB (the whole model), "
          f"views {largest / 2**20:.2f} MiB (largest parameter)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sizes", default="tiny,25m")
    args = parser.parse_args()
    from flex_surgery.launch import fork_ranks

    fork_ranks(_rank, args.sizes.split(","), args.reps, nprocs=args.ranks, device="cpu")

if __name__ == "__main__":
    main()
