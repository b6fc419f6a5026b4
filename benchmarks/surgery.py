"""What does a SurgicalTheater cost, next to the floor of what it has to do?

A theater that scales every linear weight must, at the least, touch the modified bytes; the
floor used here is **a copy of exactly those bytes into preallocated buffers** (same tensors,
same device, buffers allocated and touched before timing). The theater itself makes three
passes over them (snapshot, modify, copy back), so about 3x is its natural cost; the targets
are 3x (fp32) and 3.5x (bf16, whose elementwise multiply costs more than a copy).

Measured side by side, interleaved (the order alternates every round), on Llama-shaped models
of ~13M and ~100M linear weights, fp32 and bf16, with one thread and with torch's default:

* ``theater``: entering and leaving one ``SurgicalTheater(model, modification_type="scale")``
  object again and again, as a validation loop does: from the second entry on it writes its
  snapshots into the buffers of the previous one (``keep_snapshots``);
* ``fresh``: a new theater per entry (fresh snapshot allocations, and their page faults), for
  comparison (no target);
* ``floor``: the preallocated copy;
* where the theater's time goes, for comparison: ``passes``, its three passes done by hand
  (copy into the preallocated buffers, multiply in place, copy back), and ``bookkeeping``, a
  theater that modifies nothing (``modification_type=None``: resolution, training-state and
  checkpoint guards, no pass over the weights).

Every timed theater is checked, outside the clock: the weights are bit-identical to the
originals after it (compared as raw bytes), and one untimed entry per configuration checks that
the modification did take effect and that the model's output changed, then came back exactly.
Every timed copy is checked to hold the weights. The ratio of a configuration is
median(theater) / median(floor) in wall-clock time; its spread is the min..max of the
per-round ratios. The same ratio in process CPU time is printed beside it: on a machine shared
with other jobs, the wall clock also counts the time the process waited for a core.

Prints the ratios and writes ``results/surgery.json``.

    python benchmarks/surgery.py [--quick] [--rounds 11] [--out PATH]
    python benchmarks/surgery.py --check [--quick] [--clock cpu]   # 3 repetitions vs targets

``--quick``: the small model only, fewer rounds. ``--check`` measures every configuration 3
times (each a full interleaved measurement) and exits with ``targets.check_targets``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import SurgicalTheater

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import REPETITIONS, check_targets, run_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    # 6 blocks of hidden 384 + a 4000-token head: 12.2M linear weights (13.7M parameters).
    "small": dict(vocab_size=4000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=6),
    # 12 blocks of hidden 768 + an 8000-token head: 91M linear weights (97M parameters).
    "large": dict(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"fp32": 3.0, "bf16": 3.5}  # theater / preallocated copy of the modified bytes
FACTOR = 0.5


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (NaN payloads and -0.0 compare as what they are)."""
    return t.detach().view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                            8: torch.int64}[t.element_size()])


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(model: torch.nn.Module, rounds: int) -> dict:
    """One interleaved measurement of theater, fresh theater and floor on ``model``."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    originals = [w.detach().clone() for w in weights]
    buffers = [torch.empty_like(w) for w in weights]
    theater = SurgicalTheater(model, modification_type="scale", factor=FACTOR)

    @torch.no_grad()
    def floor() -> None:
        for dst, src in zip(buffers, weights):
            dst.copy_(src)

    def reused() -> None:
        with theater:
            pass

    @torch.no_grad()
    def passes() -> None:  # the theater's three passes by hand, into the same buffers
        for dst, src in zip(buffers, weights):
            dst.copy_(src)
            src.mul_(FACTOR)
        for dst, src in zip(buffers, weights):
            src.copy_(dst)

    guard = SurgicalTheater(model, modification_type=None)

    def bookkeeping() -> None:  # a theater that modifies nothing: all of it but the passes
        with guard:
            pass

    def fresh() -> None:
        with SurgicalTheater(model, modification_type="scale", factor=FACTOR, keep_snapshots=False):
            pass

    def check(name: str) -> None:
        if not _same_bits(weights, originals):
            raise AssertionError(f"{name}: the weights are not bit-identical after the theater")
        if name == "floor" and not _same_bits(buffers, originals):
            raise AssertionError("floor: the buffers do not hold the weights")

    # Untimed: the modification takes effect, the output changes and comes back exactly.
    inputs = example_inputs("llama", batch=1, seq=16)
    inputs["input_ids"] %= model.config.vocab_size
    with torch.no_grad():
        before = model(**inputs).logits
        with theater:
            if not all(torch.equal(w, o * FACTOR) for w, o in zip(weights, originals)):
                raise AssertionError("the theater did not scale every linear weight")
            inside = model(**inputs).logits
        after = model(**inputs).logits
    if torch.equal(inside, before) or not torch.equal(_bits(after), _bits(before)):
        raise AssertionError("the output inside the theater did not change, or did not come back")
    stats = dict(theater.stats)

    fns = {"floor": floor, "theater": reused, "fresh": fresh, "passes": passes,
           "bookkeeping": bookkeeping}
    for name, fn in fns.items():  # warm-up: buffers allocated and touched, lazy init done
        fn()
        check(name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            wall, used = _timed(fns[name])
            times[name].append(wall)
            cpu[name].append(used)
            check(name)
    if theater.stats["reused_snapshots"] != theater.stats["modified_parameters"]:
        raise AssertionError("the theater did not reuse its snapshot buffers")

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    floor_s = statistics.median(times["floor"])
    out = {"modified_bytes": stats["modified_bytes"], "modified_parameters":
           stats["modified_parameters"], "rounds": rounds,
           "seconds": {name: spread(v) for name, v in times.items()}}
    out["cpu_seconds"] = {name: spread(v) for name, v in cpu.items()}
    for name in ("theater", "fresh", "passes", "bookkeeping"):
        paired = [t / f for t, f in zip(times[name], times["floor"])]
        out[f"{name}_x_floor"] = statistics.median(times[name]) / floor_s
        out[f"{name}_x_floor_spread"] = [min(paired), max(paired)]
        out[f"{name}_x_floor_cpu"] = (statistics.median(cpu[name])
                                      / max(statistics.median(cpu["floor"]), 1e-9))
    return out


def configurations(quick: bool) -> list[tuple[str, str, int]]:
    threads = sorted({1, torch.get_num_threads()})
    sizes = ["small"] if quick else list(MODELS)
    return [(size, dtype, n) for size in sizes for dtype in DTYPES for n in threads]


def key(size: str, dtype: str, threads: int, default: int) -> str:
    return f"theater/{size}/{dtype}/{'1thread' if threads == 1 else f'{default}threads'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small model only, 5 rounds")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    parser.add_argument("--check", action="store_true",
                        help=f"{REPETITIONS} repetitions, exit status from the targets")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="the ratio --check compares with the targets: wall-clock (default) "
                             "or process CPU time (steadier on a machine shared with other jobs)")
    parser.add_argument("--out", default=str(ROOT / "results" / "surgery.json"))
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    rounds, repetitions, results = run_plan(args, MODELS, TARGETS)
    measured: dict[str, list[float]] = {}
    targets: dict[str, float] = {}
    models: dict[tuple[str, str], torch.nn.Module] = {}
    print(f"theater (scale of every linear weight, reused) over a preallocated copy of the same "
          f"bytes; {rounds} interleaved rounds, median [min..max of per-round ratios]")
    for size, dtype, threads in configurations(args.quick):
        torch.set_num_threads(threads)
        if (size, dtype) not in models:
            models.clear()  # one model in memory at a time
            models[(size, dtype)] = tiny_hf_model("llama", dtype=DTYPES[dtype], **MODELS[size])
        model = models[(size, dtype)]
        name = key(size, dtype, threads, default_threads)
        targets[name] = TARGETS[dtype]
        for _ in range(repetitions):
            r = measure(model, rounds)
            measured.setdefault(name, []).append(
                r["theater_x_floor" if args.clock == "wall" else "theater_x_floor_cpu"])
            results["configurations"].setdefault(name, []).append(r)
            s = r["seconds"]
            lo, hi = r["theater_x_floor_spread"]
            floor_ms, theater_ms = s["floor"]["median"] * 1e3, s["theater"]["median"] * 1e3
            print(f"  {name:<28} {r['modified_bytes'] / 2**20:6.0f} MiB  floor "
                  f"{floor_ms:7.1f} ms  theater {theater_ms:7.1f} ms  {r['theater_x_floor']:5.2f}x "
                  f"[{lo:.2f}..{hi:.2f}]  (target "
                  f"{TARGETS[dtype]:.1f}x)  cpu time {r['theater_x_floor_cpu']:5.2f}x | "
                  f"three passes by hand {r['passes_x_floor']:4.2f}x, bookkeeping "
                  f"{r['bookkeeping_x_floor']:4.2f}x, fresh theater {r['fresh_x_floor']:5.2f}x")
    torch.set_num_threads(default_threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    if args.check:
        sys.exit(check_targets("surgery", measured, targets))


if __name__ == "__main__":
    main()
