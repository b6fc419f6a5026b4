"""What registering one hook costs, and that it does not grow with the model.

Registers a retrieval forward hook on every module of a random-weight GPT-2
(``GPT2Config(n_layer=L, n_embd=64, n_head=2)``) through :class:`~flex_surgery.FlexModel`, and,
interleaved with it, the same number of raw ``register_forward_hook`` calls (the floor: PyTorch's
own bookkeeping). Each repetition builds a fresh model and FlexModel, so nothing is cached
across repetitions; the cyclic garbage collector is paused while registering (its pauses grow
with the heap, i.e. with the model, whoever registers). Reported per layer count: median ms
per hook (spread min..max), the ratio to the raw hook, and the ratio of the per-hook cost of
the largest model to that of the smallest, of medians and of fastest runs (1.0 when
registration is O(1) in the model's size; it grew with the number of modules when every
registration rebuilt the name table). Correctness is asserted: every hook is installed on the
module of its name and a forward stores once per hooked module that runs.

    python benchmarks/hook_registration.py [--layers 6 24] [--reps 5] [--check]

``--check`` (``make bench``): 3 repetitions; fails when the median over them of the growth of
the fastest per-hook cost, from the smallest to the largest model, exceeds 1.0 by more than
20 %.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import REPETITIONS, check_targets  # noqa: E402

# The per-hook cost of registering on every module of the 24-block model over the 6-block one:
# 1.0 when registration is O(1) in the model's size; a name table rebuilt at every registration
# makes it grow with the module count (85 -> 319 modules: towards 3.8x).
TARGET = 1.0


def build(n_layer: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=64, n_head=2)
    return GPT2LMHeadModel(config).eval()


def time_flex(n_layer: int) -> tuple[float, int]:
    from flex_surgery import FlexModel, HookFunction

    model = build(n_layer)
    names = [n for n, _ in model.named_modules() if n]
    out: dict = {}
    flex = FlexModel(model, out)
    hooks = [HookFunction(n) for n in names]
    gc.collect()
    gc.disable()  # a collection's pause grows with the heap (the model), not with registration
    start = time.perf_counter()
    for hf in hooks:
        flex.register_forward_hook(hf)
    elapsed = time.perf_counter() - start
    gc.enable()
    modules = dict(model.named_modules())
    assert all(len(modules[n]._forward_hooks) == 1 for n in names)
    with torch.no_grad():
        flex(torch.zeros(1, 4, dtype=torch.long))
    # Every module that runs stores once (a ModuleList and unused dropouts never run).
    assert set(out) <= set(names) and len(out) > len(names) * 3 // 4
    assert all(len(v) == 1 for v in out.values())
    flex.close()
    return elapsed * 1e3 / len(names), len(names)


def time_raw(n_layer: int) -> float:
    model = build(n_layer)
    modules = [m for n, m in model.named_modules() if n]

    def hook(module, args, output):
        return None

    gc.collect()
    gc.disable()
    start = time.perf_counter()
    for m in modules:
        m.register_forward_hook(hook)
    elapsed = time.perf_counter() - start
    gc.enable()
    return elapsed * 1e3 / len(modules)


def measure(layers: list[int], reps: int) -> dict[str, float]:
    """One full interleaved measurement; prints it and returns the ratios of the largest model's
    per-hook cost over the smallest's (of medians and of fastest runs)."""
    medians, bests = {}, {}
    for n_layer in layers:
        flex_ms, raw_ms = [], []
        for _ in range(reps):  # interleaved
            ms, n_hooks = time_flex(n_layer)
            flex_ms.append(ms)
            raw_ms.append(time_raw(n_layer))
        med = statistics.median(flex_ms)
        raw = statistics.median(raw_ms)
        medians[n_layer] = med
        bests[n_layer] = min(flex_ms)
        print(f"n_layer={n_layer:3d} hooks={n_hooks:4d}: FlexModel {med:.4f} ms/hook "
              f"({min(flex_ms):.4f}..{max(flex_ms):.4f}), raw torch {raw:.4f} ms/hook, "
              f"ratio {med / raw:.1f}x")
    small, large = min(medians), max(medians)
    growth = {"per_hook_large_over_small": medians[large] / medians[small],
              "fastest_large_over_small": bests[large] / bests[small]}
    print(f"per-hook cost n_layer={large} / n_layer={small}: median "
          f"{growth['per_hook_large_over_small']:.2f}x, fastest "
          f"{growth['fastest_large_over_small']:.2f}x "
          "(1.0 = independent of model size; the fastest runs are what a quiet machine shows)")
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--check", action="store_true",
                        help=f"{REPETITIONS} repetitions; fail if the per-hook cost grows with "
                             f"the model by more than 20 %%")
    args = parser.parse_args()
    if len(set(args.layers)) < 2:
        parser.error("--layers needs two or more model sizes to compare")
    torch.set_num_threads(1)
    runs = [measure(args.layers, args.reps) for _ in range(REPETITIONS if args.check else 1)]
    if args.check:
        # The fastest runs: the median of 5 registrations of 20 us each moves with whatever
        # else the machine does (0.65-1.27x between repetitions), the fastest by a tenth.
        key = "fastest_large_over_small"
        sys.exit(check_targets("hook_registration", {key: [r[key] for r in runs]},
                               {key: TARGET}))


if __name__ == "__main__":
    main()
