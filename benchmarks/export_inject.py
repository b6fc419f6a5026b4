"""What does injecting new weights into an exported program save over re-exporting?

For a tiny GPT-2 (~0.1M parameters) and a GPT-2-shaped model of ~40M parameters, times:

* ``export``: ``ExportedModel.export`` (private copy + ``torch.export``), what a new checkpoint
  would cost without injection; and ``torch.export.export`` alone, for reference;
* ``inject``: ``ExportedModel.inject`` from a module, from a state dict, and from a safetensors
  file (file read included); ``swap``: entering and leaving ``ExportedModel.weights``;
* ``load_state_dict``: the same weights into an eager model that already exists;
* ``program_load``: ``ExportedModel.load`` of the saved ``.pt2`` (what a server pays at start);
* ``forward``: one forward pass of the exported program, for scale;
* with ``--aoti``: AOTInductor compilation of the tiny model, which injection also spares
  (the compiled package reads the injected weights).

And, on GPT-2 small's shape (124M parameters, random weights built from its config -- the
``gpt2-124m-random`` entry of ``configs/models.json``), exported with plain ``torch.export``:
:func:`~flex_surgery.export.inject_weights` against a raw ``copy_`` of the same bytes into
preallocated tensors (target <= 1.5x) and against re-exporting (target <= 0.01x), with
interleaved repetitions, median and spread, every timed write checked and the program's output
checked against the eager model afterwards (:func:`flex_surgery.bench.export.measure_injection`,
the code the research runner uses).

Prints the ratios and writes ``results/export_inject.json`` and, for the 124M measurement,
``results/export_inject_gpt2_124m.csv``. Run: ``python benchmarks/export_inject.py [--quick]
[--ratio-only] [--aoti] [--device cuda] [--out PATH]``. Timings are medians over repeats (CUDA
work synchronised before each clock read).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.export import Dim

from flex_surgery.bench.export import (
    COLUMNS,
    assert_program_equals_eager,
    export_program,
    measure_injection,
    token_inputs,
)
from flex_surgery.bench.measure import timed
from flex_surgery.bench.models import load_registry
from flex_surgery.export import ExportedModel
from flex_surgery.models import example_inputs, tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "tiny": {},
    "gpt2-40m": dict(vocab_size=32000, n_embd=512, n_layer=8, n_head=8, n_positions=512),
}


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(overrides: dict, export_repeats: int, inject_repeats: int,
               device: torch.device, aoti: bool = False) -> dict:
    eager = tiny_hf_model("gpt2", seed=0, **overrides).to(device)
    other = tiny_hf_model("gpt2", seed=1, **overrides).to(device)
    ids = example_inputs("gpt2", batch=1, seq=32)["input_ids"].to(device)
    kwargs = {"input_ids": ids}
    dynamic = {"input_ids": {1: Dim("seq", min=2, max=128)}}
    n_params = sum(p.numel() for p in eager.parameters())

    def export():
        return ExportedModel.export(eager, example_kwargs=kwargs, dynamic_shapes=dynamic)

    exported = export()
    t = {}
    t["export"] = median_seconds(export, export_repeats, device)
    t["torch_export_only"] = median_seconds(
        lambda: torch.export.export(eager, (), kwargs=kwargs, dynamic_shapes=dynamic,
                                    strict=False), export_repeats, device)
    other_sd = other.state_dict()
    cpu_sd = {k: v.cpu() for k, v in other_sd.items()}
    t["inject_module"] = median_seconds(lambda: exported.inject(other), inject_repeats, device)
    t["inject_state_dict"] = median_seconds(lambda: exported.inject(other_sd), inject_repeats,
                                            device)
    if device.type != "cpu":
        t["inject_cpu_state_dict"] = median_seconds(lambda: exported.inject(cpu_sd),
                                                    inject_repeats, device)

    def swap():
        with exported.weights(other):
            pass

    t["swap_enter_exit"] = median_seconds(swap, inject_repeats, device)
    fresh = tiny_hf_model("gpt2", seed=2, **overrides).to(device)
    t["load_state_dict"] = median_seconds(lambda: fresh.load_state_dict(other_sd),
                                          inject_repeats, device)

    with tempfile.TemporaryDirectory() as tmp:
        weights, program = Path(tmp) / "w.safetensors", Path(tmp) / "p.pt2"
        exported.save_weights(weights)
        exported.save(program)
        t["inject_safetensors_file"] = median_seconds(lambda: exported.inject(weights),
                                                      inject_repeats, device)
        t["program_load"] = median_seconds(lambda: ExportedModel.load(program), export_repeats,
                                           device)

    with torch.no_grad():
        exported.inject(other)
        same = torch.equal(exported(input_ids=ids), other(input_ids=ids).logits)
        t["forward"] = median_seconds(lambda: exported(input_ids=ids), inject_repeats, device)
        if aoti:
            t["compile_aoti"] = median_seconds(exported.compile_aoti, 1, device)
            t["inject_module_aoti"] = median_seconds(lambda: exported.inject(eager),
                                                     inject_repeats, device)
            torch.testing.assert_close(exported(input_ids=ids), eager(input_ids=ids).logits,
                                       rtol=1e-4, atol=1e-4)

    ratios = {
        "export_over_inject_module": t["export"] / t["inject_module"],
        **({"compile_aoti_over_inject_module": t["compile_aoti"] / t["inject_module_aoti"]}
           if aoti else {}),
        "export_over_inject_safetensors_file": t["export"] / t["inject_safetensors_file"],
        "load_state_dict_over_inject_state_dict": t["load_state_dict"] / t["inject_state_dict"],
    }
    return {"params": n_params, "seconds": t, "ratios": ratios,
            "injected_output_equals_eager": same}


def bench_injection_ratio(device: torch.device, repeats: int, reexport_repeats: int,
                          model_name: str = "gpt2-124m-random") -> dict:
    """inject_weights vs raw copy_ vs re-export on a plain program of GPT-2 small's shape."""
    model = load_registry()[model_name].build().to(device)
    example = token_inputs(model, 32, device=device)
    max_seq = 128
    export_s, program = timed(lambda: export_program(model, example, max_seq), device)
    cost = measure_injection(model, program, repeats,
                             lambda: export_program(model, example, max_seq), reexport_repeats,
                             device)
    assert_program_equals_eager(program, model, (32, max_seq), 1, device)

    def spread(s, scale=1.0):
        return {"median": s.median * scale, "min": s.low * scale, "max": s.high * scale,
                "repeats": s.repeats}

    return {"model": model_name, "params": cost.params, "weight_bytes": cost.bytes,
            "export_s": export_s, "first_inject_ms": cost.first_inject * 1e3,
            "inject_ms": spread(cost.inject, 1e3), "raw_copy_ms": spread(cost.raw_copy, 1e3),
            "reexport_s": spread(cost.reexport),
            "inject_over_raw_copy": cost.inject_over_copy,
            "inject_over_reexport": cost.inject_over_reexport,
            "inject_peak_memory_mib": cost.inject_peak.above_start_mib,
            "outputs_equal_eager": True}


def write_ratio_csv(r: dict, device: torch.device, path: Path) -> None:
    base = {"model": r["model"], "benchmark": "weight_injection", "device": str(device),
            "params": r["params"], "seq_len": ""}
    rows = []
    for metric, unit in (("inject_ms", "ms"), ("raw_copy_ms", "ms"), ("reexport_s", "s")):
        s = r[metric]
        rows.append({**base, "metric": metric.rsplit("_", 1)[0], "unit": unit,
                     "median": s["median"], "min": s["min"], "max": s["max"],
                     "repeats": s["repeats"]})
    for metric, unit in (("first_inject_ms", "ms"), ("export_s", "s"),
                         ("inject_over_raw_copy", "ratio"), ("inject_over_reexport", "ratio")):
        v = r[metric]
        rows.append({**base, "metric": metric.removesuffix("_ms").removesuffix("_s"),
                     "unit": unit, "median": v, "min": v, "max": v, "repeats": 1})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--aoti", action="store_true",
                        help="also time AOTInductor compilation of the tiny model (~30 s)")
    parser.add_argument("--ratio-only", action="store_true",
                        help="only the 124M inject / raw copy / re-export measurement")
    parser.add_argument("--repeats", type=int, default=15,
                        help="interleaved rounds of inject and raw copy (124M; default 15)")
    parser.add_argument("--reexport-repeats", type=int, default=3,
                        help="re-exports timed among those rounds (124M; default 3)")
    parser.add_argument("--out", default=str(ROOT / "results" / "export_inject.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = {"torch": torch.__version__, "machine": platform.machine(), "device": str(device),
               "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else platform.processor() or platform.machine()),
               "threads": torch.get_num_threads(), "models": {}}
    for name, overrides in SIZES.items():
        if args.ratio_only or (args.quick and name != "tiny"):
            continue
        export_repeats = 3 if name == "tiny" else 2
        inject_repeats = 3 if args.quick else (20 if name == "tiny" else 5)
        r = bench_size(overrides, export_repeats, inject_repeats, device,
                       aoti=args.aoti and name == "tiny")
        results["models"][name] = r
        s = r["seconds"]
        print(f"{name} ({r['params'] / 1e6:.1f}M params)")
        for key, value in s.items():
            print(f"  {key:<26} {value * 1e3:10.2f} ms")
        for key, value in r["ratios"].items():
            print(f"  {key:<40} {value:8.1f}x")
        print(f"  injected program output == eager output: {r['injected_output_equals_eager']}")
    if not args.quick:
        r = bench_injection_ratio(device, args.repeats, args.reexport_repeats)
        results["injection_ratio"] = r
        print(f"{r['model']} ({r['params'] / 1e6:.1f}M params, {r['weight_bytes'] / 2**20:.0f} "
              f"MiB), plain torch.export program:")
        for key in ("inject_ms", "raw_copy_ms", "reexport_s"):
            s = r[key]
            print(f"  {key:<14} median {s['median']:10.3f}  [{s['min']:.3f} .. {s['max']:.3f}]  "
                  f"x{s['repeats']}")
        print(f"  first_inject_ms {r['first_inject_ms']:.1f} (gives the program its own tensors)")
        print(f"  inject / raw copy_   {r['inject_over_raw_copy']:.3f}x (target <= 1.5x)")
        print(f"  inject / re-export   {r['inject_over_reexport']:.5f}x (target <= 0.01x)")
        write_ratio_csv(r, device, Path(args.out).with_name("export_inject_gpt2_124m.csv"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
