"""What does a SurgicalTheater cost, next to the ways people validate without one?

On a ~100M-parameter Llama-shaped model (CPU, fp32 and bf16), for ``scale``, ``noise`` and
``disable`` of all linear weights, measures:

* ``theater``: enter + exit time, and the peak extra memory while inside, with
  ``backup="device"`` and ``backup="cpu"``;
* ``clone``: one ``clone()`` of exactly the modified tensors -- the floor is about two copies
  (snapshot in, copy back), so the target is enter + exit <= 2.5 x one clone;
* ``deepcopy``: ``copy.deepcopy(model)``; ``save_load``: ``torch.save`` of the state dict to a
  file, ``torch.load`` and ``load_state_dict``.

Memory is measured by counting the bytes of every tensor storage allocated while the operation
runs (a ``TorchDispatchMode``), live at the peak -- exact for tensors and independent of the
allocator, which on CPU returns memory to the OS lazily. Then, on 2 ranks, FSDP1 and DTensor TP:
extra memory per rank vs the local shard's modified bytes.

Prints ratios and writes ``results/surgery.json``. Run: ``python benchmarks/surgery.py
[--quick] [--out PATH]``. Timings are medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from flex_surgery.models import tiny_hf_model
from flex_surgery.surgery import SurgicalTheater

ROOT = Path(__file__).resolve().parents[1]

# ~97M parameters: 12 blocks of hidden 768 (85M) + untied 8000-token embedding and head (12M).
LLAMA_100M = dict(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12)
LLAMA_QUICK = dict(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4)
MODIFICATIONS = {
    "scale": dict(modification_type="scale", factor=0.9),
    "noise": dict(modification_type="noise", noise_scale=0.01, seed=0),
    "disable": dict(modification_type="disable"),
}


class AllocationMeter(TorchDispatchMode):
    """Bytes of tensor storage allocated by ops run under it, live now and at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue  # a view or an in-place result
            nbytes = storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, nbytes)
            inputs.add(storage.data_ptr())
        return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, lazy initialisation
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _theater_cycle(model, backup: str, kw: dict) -> None:
    with SurgicalTheater(model, backup=backup, **kw):
        pass


def _peak_inside(model, backup: str, kw: dict) -> tuple[int, int]:
    """(peak extra bytes while entering and inside, modified bytes)."""
    with AllocationMeter() as meter:
        with SurgicalTheater(model, backup=backup, **kw) as theater:
            modified = theater.stats["modified_bytes"]
            device_backup = theater.stats["backup_bytes"] if backup == "device" else 0
    return meter.peak, modified, device_backup


def bench_model(config: dict, dtype: torch.dtype, repeats: int, device: str = "cpu") -> dict:
    model = tiny_hf_model("llama", dtype=dtype, **config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    modified_bytes = sum(w.numel() * w.element_size() for w in linear)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row: dict = {"dtype": str(dtype).removeprefix("torch."), "device": device,
                 "parameters": n_params,
                 "model_bytes": model_bytes, "modified_bytes": modified_bytes}

    clone_s = median_seconds(lambda: [w.clone() for w in linear], repeats)
    row["clone_s"] = clone_s
    # Noise cannot be cheaper than drawing the numbers: the floor for "noise" is one clone
    # plus one randn of the same number of elements.
    row["randn_s"] = median_seconds(
        lambda: [torch.randn(w.shape, dtype=torch.float32, device=device) for w in linear],
        repeats)
    with AllocationMeter() as meter:
        copies = [w.clone() for w in linear]
    row["clone_peak_bytes"] = meter.peak
    del copies

    row["deepcopy_s"] = median_seconds(lambda: copy.deepcopy(model), max(1, repeats // 2))
    row["deepcopy_extra_bytes"] = model_bytes
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")

        def save_load() -> None:
            torch.save(model.state_dict(), path)
            model.load_state_dict(torch.load(path, map_location=device))

        row["save_load_s"] = median_seconds(save_load, max(1, repeats // 2))
    row["save_load_extra_bytes"] = model_bytes  # the loaded state dict (plus the file)

    row["theater"] = {}
    for name, kw in MODIFICATIONS.items():
        for backup in ("device", "cpu"):
            seconds = median_seconds(lambda kw=kw, b=backup: _theater_cycle(model, b, kw),
                                     repeats)
            peak, modified, device_backup = _peak_inside(model, backup, kw)
            floor = clone_s + (row["randn_s"] if name == "noise" else 0.0)
            row["theater"][f"{name}/{backup}"] = {
                "enter_exit_s": seconds,
                "x_clone": seconds / clone_s,
                "x_floor": seconds / floor,
                "peak_extra_bytes": peak,
                "peak_extra_x_modified": peak / modified,
                "device_backup_bytes": device_backup,
            }
    return row


def _distributed_rank(config: dict) -> dict:
    """One rank of the 2-rank measurement: FSDP1 and DTensor TP, scale of all linear weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from flex_surgery.launch import init_from_env

    init_from_env()
    torch.set_num_threads(1)
    out = {}
    fsdp = FSDP(tiny_hf_model("llama", **config), device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {}
    for i in range(config["num_hidden_layers"]):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                  "mlp.up_proj"):
            plan[f"model.layers.{i}.{n}"] = ColwiseParallel()
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{n}"] = RowwiseParallel()
    tp = parallelize_module(tiny_hf_model("llama", **config), mesh, plan)
    for name, model in (("fsdp1", fsdp), ("dtensor_tp", tp)):
        for backup in ("device", "cpu"):
            kw = dict(modification_type="scale", factor=0.9, layers="model.layers")
            seconds = median_seconds(lambda m=model, b=backup, kw=kw: _theater_cycle(m, b, kw), 3)
            peak, modified, device_backup = _peak_inside(model, backup, kw)
            out[f"{name}/{backup}"] = {"enter_exit_s": seconds, "local_modified_bytes": modified,
                                      "peak_extra_bytes": peak,
                                      "peak_extra_x_local_modified": peak / modified,
                                      "device_backup_bytes": device_backup}
    dist.barrier()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" / "surgery.json"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (single-process part)")
    parser.add_argument("--skip-distributed", action="store_true")
    args = parser.parse_args()
    config = LLAMA_QUICK if args.quick else LLAMA_100M
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    results = {"machine": {"cpus": os.cpu_count(), "threads": args.threads,
                           "torch": torch.__version__,
                           "python": platform.python_version()},
               "config": config, "single_process": [], "two_ranks": None}

    for dtype in (torch.float32, torch.bfloat16):
        row = bench_model(config, dtype, repeats, args.device)
        results["single_process"].append(row)
        print(f"\n{row['parameters'] / 1e6:.1f}M parameters, {row['dtype']} on {args.device}: "
              f"modified "
              f"{row['modified_bytes'] / 2**20:.0f} MiB of {row['model_bytes'] / 2**20:.0f} MiB; "
              f"clone {row['clone_s'] * 1e3:.0f} ms, deepcopy {row['deepcopy_s'] * 1e3:.0f} ms "
              f"(+{row['deepcopy_extra_bytes'] / 2**20:.0f} MiB), save/load "
              f"{row['save_load_s'] * 1e3:.0f} ms")
        print(f"  randn of the modified elements (fp32): {row['randn_s'] * 1e3:.0f} ms; floor = "
              "clone (+ randn for noise)")
        print(f"  {'modification/backup':<16}{'enter+exit':>12}{'x clone':>9}{'x floor':>9}"
              f"{'x deepcopy':>11}{'peak extra':>12}{'x modified':>11}{'device bytes':>14}")
        for key, r in row["theater"].items():
            print(f"  {key:<16}{r['enter_exit_s'] * 1e3:>10.0f}ms{r['x_clone']:>9.2f}"
                  f"{r['x_floor']:>9.2f}"
                  f"{r['enter_exit_s'] / row['deepcopy_s']:>11.2f}"
                  f"{r['peak_extra_bytes'] / 2**20:>9.0f}MiB{r['peak_extra_x_modified']:>11.3f}"
                  f"{r['device_backup_bytes'] / 2**20:>11.0f}MiB")

    if args.skip_distributed:
        _write(results, args.out)
        return
    from flex_surgery.launch import launch

    dist_config = LLAMA_QUICK if args.quick else dict(LLAMA_100M, num_hidden_layers=4)
    per_rank = launch(_distributed_rank, dist_config, nprocs=2)
    results["two_ranks"] = {"config": dist_config, "per_rank": per_rank}
    print("\n2 ranks, scale of the block linear weights (per rank):")
    for rank, rows in enumerate(per_rank):
        for key, r in rows.items():
            print(f"  rank {rank} {key:<18} local modified "
                  f"{r['local_modified_bytes'] / 2**20:6.1f} MiB, peak extra "
                  f"{r['peak_extra_bytes'] / 2**20:6.1f} MiB "
                  f"(x{r['peak_extra_x_local_modified']:.3f}), device backup "
                  f"{r['device_backup_bytes'] / 2**20:6.1f} MiB, "
                  f"{r['enter_exit_s'] * 1e3:.0f} ms")

    _write(results, args.out)


def _write(results: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
