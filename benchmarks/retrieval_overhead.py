"""What a FlexModel hook costs under tensor parallelism, relative to the raw communication.

Two ranks (forked here, gloo on CPU, nccl on GPUs) run a stack of 8 TP blocks
(``ColumnParallelLinear`` H->4H, GELU, ``RowParallelLinear`` 4H->H; H=512, 256 tokens) with a
hook on every up-projection, whose output is sharded over the two ranks -- once with fairscale's
layers, once with Megatron-core's (its ``[s, b, h]`` activations hold the same bytes; groups
adopted from ``parallel_state``). Measured interleaved per framework, medians over the
repetitions:

* ``retrieval_ratio`` = (forward with retrieval hooks - plain forward)
  / (8 x [raw ``all_gather`` + concat + CPU copy of one up-projection output]);
* ``edit_ratio`` = the same with an x2 editing function on every hook (nothing stored).

A ratio <= 1 means a hook costs no more than the collective one would write by hand. Prints the
ratios (and Megatron's over fairscale's) and writes them to ``results/retrieval_overhead.json``
(fairscale's at the top level, Megatron's under ``"megatron"``).

    python benchmarks/retrieval_overhead.py [--reps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

H, TOKENS, BLOCKS, WORLD = 512, 256, 8, 2
RESULTS = Path(__file__).resolve().parent.parent / "results" / "retrieval_overhead.json"


class Block(nn.Module):
    def __init__(self) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.up = ColumnParallelLinear(H, 4 * H, gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(4 * H, H, input_is_parallel=True)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class MegatronBlock(nn.Module):
    """The same block from Megatron-core's layers (they return ``(output, bias)``)."""

    def __init__(self) -> None:
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        config = ModelParallelConfig(tensor_model_parallel_size=WORLD,
                                     use_cpu_initialization=True, params_dtype=torch.float32)
        init = nn.init.xavier_normal_
        self.up = ColumnParallelLinear(H, 4 * H, config=config, init_method=init, bias=True,
                                       gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(4 * H, H, config=config, init_method=init, bias=True,
                                      input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)[0]))[0]


def _times_two(module, tensor, ctx, modules):
    return tensor * 2


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _measure(model: nn.Module, x: torch.Tensor, reps: int, device) -> dict[str, float]:
    """Median seconds of a plain forward, with retrieval hooks, with edit hooks, and of the raw
    collectives the hooks replace. A model takes one FlexModel at a time, so retrieval and
    editing are measured one after the other, each interleaved with plain forwards and the raw
    collectives."""
    from flex_surgery.hooks.hook_function import HookFunction
    from flex_surgery.hooks.wrapper import FlexModel

    local = torch.randn(*x.shape[:-1], 4 * H // WORLD, device=device)

    def raw():
        for _ in range(BLOCKS):
            parts = [torch.empty_like(local) for _ in range(WORLD)]
            dist.all_gather(parts, local)
            torch.cat(parts, dim=-1).to("cpu", copy=True)

    times: dict[str, list[float]] = {"plain": [], "read": [], "edit": [], "raw": []}
    for kind, stored, edit in (("read", {}, None), ("edit", None, _times_two)):
        flex = FlexModel(model, stored)  # the TP groups are adopted: no sizes
        assert flex.runtime.mesh.tp_size == WORLD
        for i in range(BLOCKS):
            flex.register_forward_hook(HookFunction(f"{i}.up", editing_function=edit))

        def hooked(flex=flex, stored=stored):
            flex(x)
            if stored:
                stored.clear()

        def plain(flex=flex):
            flex(x, groups="all", complement=True)  # no hook enabled

        with torch.no_grad():
            for _ in range(3):  # warm-up
                plain(), hooked(), raw()
            for _ in range(reps):
                for name, fn in (("plain", plain), (kind, hooked), ("raw", raw)):
                    times[name].append(_timed(fn))
        flex.restore()
    return {k: statistics.median(v) for k, v in times.items()}


def _ratios(med: dict[str, float]) -> dict:
    return {"retrieval_ratio": (med["read"] - med["plain"]) / med["raw"],
            "edit_ratio": (med["edit"] - med["plain"]) / med["raw"], "median_seconds": med}


def _report(name: str, result: dict) -> None:
    med = result["median_seconds"]
    print(f"[{name}] plain forward      {med['plain'] * 1e3:8.2f} ms")
    print(f"[{name}] + retrieval hooks  {med['read'] * 1e3:8.2f} ms")
    print(f"[{name}] + x2 edit hooks    {med['edit'] * 1e3:8.2f} ms")
    print(f"[{name}] raw all_gather+cat+copy x{BLOCKS}: {med['raw'] * 1e3:8.2f} ms")
    print(f"[{name}] retrieval_ratio {result['retrieval_ratio']:.2f}x   "
          f"edit_ratio {result['edit_ratio']:.2f}x")


def _rank_main(rank: int, port: int, reps: int, device_type: str | None) -> None:
    from fairscale.nn.model_parallel import initialize as fs
    from megatron.core import parallel_state

    from flex_surgery.parallel.backend import default_device, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or WORLD) // WORLD))
    device = default_device() if device_type in (None, "cuda") else torch.device(device_type)
    init_distributed(rank, WORLD, device=device)

    fs.initialize_model_parallel(WORLD)
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(BLOCKS)]).to(device)
    result = _ratios(_measure(model, torch.randn(1, TOKENS, H, device=device), reps, device))
    fs.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(*[MegatronBlock() for _ in range(BLOCKS)]).to(device)
        x = torch.randn(TOKENS, 1, H, device=device)  # Megatron's [s, b, h]: the same bytes
        megatron = _ratios(_measure(model, x, reps, device))
    finally:
        parallel_state.destroy_model_parallel()
    megatron["retrieval_vs_fairscale"] = megatron["median_seconds"]["read"] / \
        result["median_seconds"]["read"]
    result["megatron"] = megatron
    result["setup"] = dict(world=WORLD, hidden=H, tokens=TOKENS, blocks=BLOCKS, reps=reps,
                           backend=dist.get_backend(), device=str(device),
                           threads_per_rank=torch.get_num_threads())
    if rank == 0:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        _report("fairscale", result)
        _report("megatron", megatron)
        print(f"megatron / fairscale forward with retrieval hooks: "
              f"{megatron['retrieval_vs_fairscale']:.2f}x   -> {RESULTS}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: CUDA when there are 2 GPUs, else CPU")
    args = parser.parse_args()
    if args.device is None and torch.cuda.device_count() < WORLD:
        args.device = "cpu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, args.reps, args.device), nprocs=WORLD,
                       start_method="fork")


if __name__ == "__main__":
    main()
