"""What a FlexModel hook costs under tensor parallelism, relative to the raw communication.

Two ranks (forked here, gloo on CPU, nccl on GPUs) run a stack of 8 fairscale TP blocks
(``ColumnParallelLinear`` H->4H, GELU, ``RowParallelLinear`` 4H->H; H=512, 256 tokens) with a
hook on every up-projection, whose output is sharded over the two ranks. Measured interleaved in
one run, medians over the repetitions:

* ``retrieval_ratio`` = (forward with retrieval hooks - plain forward)
  / (8 x [raw ``all_gather`` + concat + CPU copy of one up-projection output]);
* ``edit_ratio`` = the same with an x2 editing function on every hook (nothing stored).

A ratio <= 1 means a hook costs no more than the collective one would write by hand. Prints the
ratios and writes them to ``results/retrieval_overhead.json``.

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


def _times_two(module, tensor, ctx, modules):
    return tensor * 2


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _rank_main(rank: int, port: int, reps: int, device_type: str | None) -> None:
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.hooks.hook_function import HookFunction
    from flex_surgery.hooks.wrapper import FlexModel
    from flex_surgery.parallel.backend import default_device, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or WORLD) // WORLD))
    device = default_device() if device_type in (None, "cuda") else torch.device(device_type)
    init_distributed(rank, WORLD, device=device)
    fs.initialize_model_parallel(WORLD)
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(BLOCKS)]).to(device)
    x = torch.randn(1, TOKENS, H, device=device)

    stored: dict[str, list[torch.Tensor]] = {}
    reading = FlexModel(model, stored, tensor_parallel_size=WORLD)
    for i in range(BLOCKS):
        reading.register_forward_hook(HookFunction(f"{i}.up"))
    editing = FlexModel(model, None, tensor_parallel_size=WORLD)
    for i in range(BLOCKS):
        editing.register_forward_hook(HookFunction(f"{i}.up", editing_function=_times_two))
    hook_sets = (reading, editing)

    def use(active):
        for flex in hook_sets:
            for hf in flex.hook_functions:
                hf._enabled = flex is active
            flex._selection_key = None

    local = torch.randn(1, TOKENS, 4 * H // WORLD, device=device)

    def raw():
        for _ in range(BLOCKS):
            parts = [torch.empty_like(local) for _ in range(WORLD)]
            dist.all_gather(parts, local)
            torch.cat(parts, dim=-1).to("cpu", copy=True)

    def plain():
        use(None)
        model(x)

    def read():
        use(reading)
        model(x)
        stored.clear()

    def edit():
        use(editing)
        model(x)

    times: dict[str, list[float]] = {"plain": [], "read": [], "edit": [], "raw": []}
    with torch.no_grad():
        for _ in range(3):  # warm-up
            plain(), read(), edit(), raw()
        for _ in range(reps):
            for name, fn in (("plain", plain), ("read", read), ("edit", edit), ("raw", raw)):
                times[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "retrieval_ratio": (med["read"] - med["plain"]) / med["raw"],
        "edit_ratio": (med["edit"] - med["plain"]) / med["raw"],
        "median_seconds": med,
        "setup": dict(world=WORLD, hidden=H, tokens=TOKENS, blocks=BLOCKS, reps=reps,
                      backend=dist.get_backend(), device=str(device),
                      threads_per_rank=torch.get_num_threads()),
    }
    if rank == 0:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"plain forward      {med['plain'] * 1e3:8.2f} ms")
        print(f"+ retrieval hooks  {med['read'] * 1e3:8.2f} ms")
        print(f"+ x2 edit hooks    {med['edit'] * 1e3:8.2f} ms")
        print(f"raw all_gather+cat+copy x{BLOCKS}: {med['raw'] * 1e3:8.2f} ms")
        print(f"retrieval_ratio {result['retrieval_ratio']:.2f}x   "
              f"edit_ratio {result['edit_ratio']:.2f}x   -> {RESULTS}")
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
