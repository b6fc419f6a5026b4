"""What do new weights for an exported program cost, next to the floor of what they have to do?

Writing a model's weights anywhere costs, at the least, **a copy of those bytes into
preallocated tensors**: that is the floor here (the same source tensors, the same bytes, into
buffers allocated and touched before timing). On GPT-2-shaped ``ExportedModel``\\ s of ~13M
and ~41M parameters, fp32 and bf16, with one thread and with torch's default, measured side by
side and interleaved (the order alternates every round):

* ``inject``: ``ExportedModel.inject(state_dict)`` -- validation of every name, shape and dtype,
  then a copy into the program's own tensors; target <= 1.5x the floor;
* ``swap``: entering and leaving ``ExportedModel.weights(state_dict)`` -- snapshot the program's
  weights, write the new ones, copy the snapshot back: three copies, so the target is <= 3x
  one injection. From the second block on the snapshots go into the buffers of the previous
  one (no allocation, no page faults);
* ``fresh_swap``: the same block after ``release_snapshots()``, i.e. with new snapshot buffers
  every time, as every block paid before the buffers were kept (no target);
* ``floor``: the preallocated copy.

Two weight sets alternate, so every write changes every value. Checked outside the clock after
every timed call: an injection left exactly the injected weights in the program, a swap left
exactly the weights it found (bit for bit), a copy holds the source. Once per configuration,
untimed: inside a swap the program's output equals the eager model holding the same weights.
Also printed: the time of one ``ExportedModel.export`` (what injection saves).

Prints the ratios (median, and the min..max of the per-round ratios) and writes
``results/export_inject.json``.

    python benchmarks/export_inject.py [--quick] [--rounds 11] [--out PATH]
    python benchmarks/export_inject.py --check [--quick] [--clock cpu]   # 3 repetitions

``--quick``: the small model only, 5 rounds. ``--check`` measures every configuration 3 times
(each a full interleaved measurement) and exits with ``targets.check_targets``. The 124M
inject / raw copy / re-export measurement of the research runner is
``python -m flex_surgery.bench export --benchmark weight_injection``, and here
``--ratio-only`` (``inject_weights`` into a plain ``torch.export`` program of GPT-2 small's
shape against a raw copy and against re-exporting, with the runner's checks).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.export import Dim

from flex_surgery.bench.export import (
    COLUMNS,
    assert_program_equals_eager,
    export_program,
    measure_injection,
    perturbed_weights,
    token_inputs,
)
from flex_surgery.bench.measure import timed
from flex_surgery.bench.models import load_registry
from flex_surgery.export import ExportedModel
from flex_surgery.models import example_inputs, tiny_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import REPETITIONS, check_targets, run_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "small": dict(vocab_size=4000, n_embd=384, n_layer=6, n_head=6, n_positions=128),
    "large": dict(vocab_size=32000, n_embd=512, n_layer=8, n_head=8, n_positions=512),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"inject_x_floor": 1.5, "swap_x_inject": 3.0}


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                            8: torch.int64}[t.element_size()])


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


class Setup:
    """One exported model, its eager twin and two weight sets of it."""

    def __init__(self, size: str, dtype: str) -> None:
        self.eager = tiny_hf_model("gpt2", seed=0, dtype=DTYPES[dtype], **MODELS[size])
        ids = example_inputs("gpt2", batch=1, seq=16)["input_ids"]
        self.inputs = {"input_ids": ids % self.eager.config.vocab_size}
        start = time.perf_counter()
        self.exported = ExportedModel.export(
            self.eager, example_kwargs=self.inputs,
            dynamic_shapes={"input_ids": {1: Dim("seq", min=2, max=64)}})
        self.export_s = time.perf_counter() - start
        self.sets = [perturbed_weights(self.eager, seed) for seed in (1, 2)]
        canonical = [slot.names[0] for slot in self.exported.layout.slots]
        self.sources = [[ws[name] for name in canonical] for ws in self.sets]
        live = self.exported.state_dict()
        self.live = [live[name] for name in canonical]
        self.params = sum(t.numel() for t in self.live)
        self.bytes = sum(t.numel() * t.element_size() for t in self.live)


def measure(setup: Setup, rounds: int) -> dict:
    exported, sets, sources, live = setup.exported, setup.sets, setup.sources, setup.live
    buffers = [torch.empty_like(t) for t in live]
    state = {"round": 0, "current": None}

    def new() -> int:
        return state["round"] % 2

    @torch.no_grad()
    def floor() -> None:
        for dst, src in zip(buffers, sources[new()]):
            dst.copy_(src)

    def inject() -> None:
        exported.inject(sets[new()])
        state["current"] = new()

    def swap() -> None:
        with exported.weights(sets[1 - state["current"]]):
            pass

    def fresh_swap() -> None:  # what a swap cost before its buffers were kept
        exported.release_snapshots()
        swap()

    def check(name: str) -> None:
        if name == "floor" and not _same(buffers, sources[new()]):
            raise AssertionError("floor: the buffers do not hold the source weights")
        if name in ("inject", "swap", "fresh_swap") and not _same(live, sources[state["current"]]):
            raise AssertionError(f"{name}: the program does not hold the expected weights")

    # Untimed: inside a swap, the program computes what the eager model with those weights does.
    inject()
    with torch.no_grad(), exported.weights(sets[1]):
        got = exported(**setup.inputs)
        setup.eager.load_state_dict(sets[1])
        want = setup.eager(**setup.inputs).logits
        if not torch.equal(got, want):
            raise AssertionError(f"program inside weights() != eager model (max difference "
                                 f"{(got - want).abs().max().item():.3g})")
    check("swap")

    fns = {"floor": floor, "inject": inject, "swap": swap, "fresh_swap": fresh_swap}
    for name, fn in fns.items():  # warm-up: buffers allocated and touched
        fn()
        check(name)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(rounds):
        state["round"] = round_
        for name in names if round_ % 2 == 0 else names[::-1]:
            seconds, used = _timed(fns[name])
            wall[name].append(seconds)
            cpu[name].append(used)
            check(name)

    def median(values: list[float]) -> float:
        return max(statistics.median(values), 1e-9)

    out: dict = {"params": setup.params, "bytes": setup.bytes, "rounds": rounds,
                 "export_s": setup.export_s}
    out["seconds"] = {n: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                      for n, v in wall.items()}
    out["cpu_seconds"] = {n: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                          for n, v in cpu.items()}
    for ratio, (top, bottom) in {"inject_x_floor": ("inject", "floor"),
                                 "swap_x_inject": ("swap", "inject"),
                                 "swap_x_floor": ("swap", "floor"),
                                 "fresh_swap_x_inject": ("fresh_swap", "inject")}.items():
        paired = [t / b for t, b in zip(wall[top], wall[bottom])]
        out[ratio] = median(wall[top]) / median(wall[bottom])
        out[f"{ratio}_spread"] = [min(paired), max(paired)]
        out[f"{ratio}_cpu"] = median(cpu[top]) / median(cpu[bottom])
    out["export_x_inject"] = setup.export_s / median(wall["inject"])
    return out


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


def _line(r: dict) -> str:
    s = r["seconds"]
    times = "  ".join(f"{n} {s[n]['median'] * 1e3:6.1f} ms" for n in ("floor", "inject", "swap"))
    ratios = "  ".join(
        f"{label} {r[key]:4.2f}x [{r[key + '_spread'][0]:.2f}..{r[key + '_spread'][1]:.2f}] "
        f"(cpu {r[key + '_cpu']:.2f}x)"
        for label, key in (("inject/floor", "inject_x_floor"), ("swap/inject", "swap_x_inject"),
                           ("fresh swap/inject", "fresh_swap_x_inject")))
    return f"{times} | {ratios}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small model only, 5 rounds")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    parser.add_argument("--check", action="store_true",
                        help=f"{REPETITIONS} repetitions, exit status from the targets")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="the ratio --check compares with the targets: wall-clock (default) "
                             "or process CPU time (steadier on a machine shared with other jobs)")
    parser.add_argument("--ratio-only", action="store_true",
                        help="only inject_weights vs raw copy vs re-export on GPT-2 small's "
                             "shape (124M, gpt2-124m-random)")
    parser.add_argument("--device", default="cpu",
                        help="--ratio-only: cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, default=15,
                        help="--ratio-only: interleaved rounds of inject and raw copy")
    parser.add_argument("--reexport-repeats", type=int, default=3,
                        help="--ratio-only: re-exports timed among those rounds")
    parser.add_argument("--out", default=str(ROOT / "results" / "export_inject.json"))
    args = parser.parse_args()
    if args.ratio_only:
        ratio_only(args)
        return
    default_threads = torch.get_num_threads()
    rounds, repetitions, results = run_plan(args, MODELS, TARGETS)
    measured: dict[str, list[float]] = {}
    targets: dict[str, float] = {}
    print(f"ExportedModel: inject over a preallocated copy of the same bytes, swap (weights() "
          f"block) over inject; {rounds} interleaved rounds, median [min..max per round]")
    for size in ["small"] if args.quick else list(MODELS):
        for dtype in DTYPES:
            setup = Setup(size, dtype)
            for threads in sorted({1, default_threads}):
                torch.set_num_threads(threads)
                name = f"{size}/{dtype}/{'1thread' if threads == 1 else f'{threads}threads'}"
                for _ in range(repetitions):
                    r = measure(setup, rounds)
                    results["configurations"].setdefault(name, []).append(r)
                    suffix = "" if args.clock == "wall" else "_cpu"
                    for ratio, target in TARGETS.items():
                        targets[f"{name}/{ratio}"] = target
                        measured.setdefault(f"{name}/{ratio}", []).append(r[ratio + suffix])
                    print(f"  {name:<20} {r['bytes'] / 2**20:5.0f} MiB  " + _line(r))
            print(f"  {size}/{dtype}: one ExportedModel.export {setup.export_s:.2f} s = "
                  f"{r['export_x_inject']:.0f}x one injection")
            torch.set_num_threads(default_threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    if args.check:
        sys.exit(check_targets("export_inject", measured, targets))


def ratio_only(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    r = bench_injection_ratio(device, args.repeats, args.reexport_repeats)
    print(f"{r['model']} ({r['params'] / 1e6:.1f}M params, {r['weight_bytes'] / 2**20:.0f} "
          f"MiB), plain torch.export program:")
    for key in ("inject_ms", "raw_copy_ms", "reexport_s"):
        s = r[key]
        print(f"  {key:<14} median {s['median']:10.3f}  [{s['min']:.3f} .. {s['max']:.3f}]  "
              f"x{s['repeats']}")
    print(f"  first_inject_ms {r['first_inject_ms']:.1f} (gives the program its own tensors)")
    print(f"  inject / raw copy_   {r['inject_over_raw_copy']:.3f}x (target <= 1.5x)")
    print(f"  inject / re-export   {r['inject_over_reexport']:.5f}x (target <= 0.01x)")
    out = Path(args.out)
    write_ratio_csv(r, device, out.with_name("export_inject_gpt2_124m.csv"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"injection_ratio": r}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
