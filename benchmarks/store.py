"""What streaming activations to a DiskStore costs.

* ``write_ratio``: tensor bytes per second a :class:`~flex_surgery.store.DiskStore` writes (64
  tensors of 2 MiB put one by one, then ``close()``) over the speed of one raw
  ``safetensors.torch.save_file`` of the same tensors to the same disk (target >= 0.8).
* ``forward_ratio``: forward time of a TP=2 x DP=2 model (4 forked ranks; DTensor TP inside
  FSDP2; 8 blocks H->4H->H, a hook on every tp-sharded up-projection) storing into a DiskStore,
  over the same forward storing into the in-memory ``output_dict`` (target <= 1.2), for
  ``store_on="rank0"`` and ``"replica_leaders"``.

Runs are interleaved; medians and the spread (min, max) over the repetitions are reported.
Correctness is asserted: what each DiskStore gives back equals what the in-memory run stored.
Writes ``results/store.json``.

``--check`` (``make bench``) runs the whole measurement 3 times and fails when a median misses
its target (docs/store.md) by more than 20 %; the write target is checked as raw speed over
DiskStore speed (<= 1/0.8 = 1.25), so that every checked number is "lower is better".

    python benchmarks/store.py [--reps 15] [--check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import REPETITIONS, check_targets  # noqa: E402

TARGETS = {"raw_over_store_write": 1 / 0.8, "forward_ratio_rank0": 1.2,
           "forward_ratio_replica_leaders": 1.2}  # docs/store.md

H, TOKENS, BLOCKS, WORLD = 256, 128, 8, 4
RESULTS = Path(__file__).resolve().parent.parent / "results" / "store.json"


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_write(reps: int, directory: Path) -> dict:
    from flex_surgery.store import DiskStore, WriteMeta

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(512, 1024, generator=gen) for _ in range(64)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    rates: dict[str, list[float]] = {"raw": [], "store": []}
    for rep in range(reps):
        raw_dir, store_dir = directory / f"raw{rep}", directory / f"store{rep}"
        raw_dir.mkdir()
        start = time.perf_counter()
        save_file({f"t{i}": t for i, t in enumerate(tensors)}, str(raw_dir / "all.safetensors"))
        rates["raw"].append(nbytes / (time.perf_counter() - start))
        start = time.perf_counter()
        store = DiskStore(store_dir, buffer_bytes=32 << 20)
        for i, t in enumerate(tensors):
            store.put("a", t, WriteMeta(step=i))
        store.close()
        rates["store"].append(nbytes / (time.perf_counter() - start))
        if rep == 0:
            back = DiskStore(store_dir)
            assert all(torch.equal(back.read("a", i), t) for i, t in enumerate(tensors))
        shutil.rmtree(raw_dir)
        shutil.rmtree(store_dir)
    ratios = [s / r for s, r in zip(rates["store"], rates["raw"])]
    return {"write_ratio": statistics.median(ratios), "write_ratio_spread": _spread(ratios),
            "raw_bytes_per_s": _spread(rates["raw"]), "store_bytes_per_s": _spread(rates["store"]),
            "bytes": nbytes}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(H, 4 * H)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * H, H)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


def _model(mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(BLOCKS)])
    plan = {}
    for i in range(BLOCKS):
        plan[f"{i}.up"] = ColwiseParallel(use_local_output=True)
        plan[f"{i}.down"] = RowwiseParallel()
    model = parallelize_module(model, mesh["tp"], plan)
    for block in model:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _rank_main(reps: int, directory: str) -> dict | None:
    from torch.distributed.device_mesh import init_device_mesh

    from flex_surgery.hooks import FlexModel, HookFunction
    from flex_surgery.store import DiskStore

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    x = torch.randn(2, TOKENS, H, generator=torch.Generator().manual_seed(1))
    x = x.chunk(2)[mesh.get_local_rank("dp")]

    runs = {}
    for mode in ("memory", "rank0", "replica_leaders"):
        model = _model(mesh)
        stored = {} if mode == "memory" else None
        store = None if mode == "memory" else DiskStore(Path(directory) / mode,
                                                         buffer_bytes=8 << 20)
        flex = FlexModel(model, stored, store=store,
                         store_on="rank0" if mode == "memory" else mode)
        for i in range(BLOCKS):
            flex.register_forward_hook(HookFunction(f"{i}.up"))
        runs[mode] = (flex, stored, store)

    times: dict[str, list[float]] = {mode: [] for mode in runs}
    with torch.no_grad():
        for rep in range(reps + 2):  # two warm-up rounds
            for mode, (flex, stored, _) in runs.items():
                dist.barrier()
                start = time.perf_counter()
                flex(x)
                elapsed = time.perf_counter() - start
                if rep >= 2:
                    times[mode].append(elapsed)
                if stored and rep < reps + 1:
                    stored.clear()  # keep the last forward's tensors for the check below
    close_s = {}
    memory = runs["memory"][1]
    for mode, (flex, _, store) in runs.items():
        flex.close()
        if store is not None:
            start = time.perf_counter()
            store.close()
            close_s[mode] = time.perf_counter() - start
    dist.barrier()
    result = None
    if rank == 0:
        last = reps + 1
        for mode in ("rank0", "replica_leaders"):
            back = DiskStore(Path(directory) / mode)
            for i in range(BLOCKS):
                assert torch.equal(back.read(f"{i}.up", last), memory[f"{i}.up"][0]), (mode, i)
        med = {m: statistics.median(v) for m, v in times.items()}
        result = {"forward_seconds": {m: _spread(v) for m, v in times.items()},
                  "forward_ratio": {m: med[m] / med["memory"] for m in ("rank0",
                                                                         "replica_leaders")},
                  "close_seconds": close_s,
                  "stored_bytes_per_forward": sum(t.numel() * t.element_size()
                                                  for v in memory.values() for t in v)}
    dist.barrier()
    return result


def run_once(reps: int) -> dict:
    from flex_surgery.launch import fork_ranks

    directory = Path(tempfile.mkdtemp(prefix="flex_store_bench_", dir=RESULTS.parent))
    try:
        result = measure_write(max(3, reps // 3), directory)
        result.update(fork_ranks(_rank_main, reps, str(directory), nprocs=WORLD, device="cpu",
                                 threads=1, timeout_s=1800)[0])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"write_ratio   {result['write_ratio']:.2f} (DiskStore / raw save_file; "
          f"spread {result['write_ratio_spread']['min']:.2f}..."
          f"{result['write_ratio_spread']['max']:.2f})")
    for mode, ratio in result["forward_ratio"].items():
        print(f"forward_ratio {ratio:.2f} ({mode} DiskStore / in-memory, TP=2 x DP=2)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--check", action="store_true",
                        help=f"{REPETITIONS} repetitions; fail if a median misses its target "
                             f"by more than 20 %%")
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    runs = [run_once(args.reps) for _ in range(REPETITIONS if args.check else 1)]
    result = dict(runs[-1])
    if args.check:
        result["runs"] = runs
    result["setup"] = dict(world=WORLD, tp=2, dp=2, hidden=H, tokens_per_replica=TOKENS,
                           blocks=BLOCKS, reps=args.reps, device="cpu", backend="gloo")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")
    if args.check:
        measured = {"raw_over_store_write": [1 / r["write_ratio"] for r in runs],
                    "forward_ratio_rank0": [r["forward_ratio"]["rank0"] for r in runs],
                    "forward_ratio_replica_leaders": [r["forward_ratio"]["replica_leaders"]
                                                      for r in runs]}
        sys.exit(check_targets("store", measured, TARGETS))


if __name__ == "__main__":
    main()
