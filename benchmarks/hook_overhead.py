"""What a FlexModel hook costs in one process, next to a raw torch hook doing the same work.

A 24-block GPT-2 (``transformers.GPT2Config``, random weights, hidden 128, 128 tokens, one
thread) runs, in interleaved rounds (order rotated each round):

* ``bare``: the model with no hook at all;
* ``flex_read`` / ``raw_read``: 96 read hooks (``ln_1``, ``attn.c_attn``, ``ln_2``,
  ``mlp.c_fc`` of every block) -- FlexModel's, and raw ``register_forward_hook`` callbacks that
  keep the same detached CPU copy in a list per module;
* ``flex_edit`` / ``raw_edit``: 24 edit hooks (``mlp.c_proj`` of every block) with the same
  editing function (x2) -- FlexModel's ``HookFunction(editing_function=...)`` and a raw hook
  returning ``fn(module, output, ctx, modules)``.

Two measurements, both paired and interleaved:

* ``read_ratio`` / ``edit_ratio`` (the targets, <= 1.3x): the hook calls themselves. One forward
  records every hooked module's ``(module, args, output)``; each round then calls FlexModel's
  96 registered read hooks (``HookFunction.torch_hook()``) on them, and the 96 raw ones, and the
  24 edit hooks of each kind, fastest of 5 per round. What torch adds around any hook call is the
  same for both and left out, so the ratio is the hooks' own cost, measured to a microsecond.
  The read pair and the edit pair are timed in separate rounds, so that each variant runs next
  to its counterpart only. ``rounds`` rotates the order but keeps the cycle: timed as one set of
  four, ``flex_edit`` always ran right after ``raw_read`` had dropped its 96 stored copies (about
  15 MB handed back to the allocator), and its 24 fresh x2 results paid for the heap state that
  left. Measured in that order (same code, same load): flex_edit / raw_edit 1.44-1.46x; with
  ``raw_edit`` in that slot instead, 0.99-1.10x; the pure overhead (identity editing function)
  is 0.8 us per call either way.
* ``in_forward`` (``--in-forward``): each variant is its own copy of the same weights; median
  over rounds of (flex_read - bare) / (raw_read - bare) of the same round (likewise edit). It
  includes FlexModel's own forward (hook-group selection, waiting for host copies) but is a
  difference of two whole forwards: on a loaded machine its spread is wide.

Spreads are the 25..75 % range of the per-round ratios. What was timed is asserted equal:
FlexModel's stored tensors equal the raw hooks' (``torch.equal``), in the forwards and in the
direct calls; the edited logits equal the raw-edited logits, the direct edits' outputs too.

Memory (on by default; ``--no-memory``): three children forked before anything else is
measured (with ``--check``, the three of every repetition), each building a larger GPT-2 (24
blocks, hidden 512, 256 tokens) and running one forward -- with FlexModel's 96 read hooks, with
the raw read hooks (same copies), with no hook.
``memory_ratio`` (the target, <= 1.1x) is FlexModel's peak resident memory above the child's
start over (the model as resident after building it + the retrieved bytes); the raw hooks'
ratio (the floor of the same retrieval) and the plain forward's peak over the resident model
are printed beside it, and FlexModel's peak over (the plain forward's peak + the retrieved
bytes) and over the raw hooks' peak. The peak is the kernel's own high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is not available), so short
peaks are not missed as they would be by sampling.

What the ratio is above 1.0x is not FlexModel's: it keeps no activation alive (weak references
to every module output are all dead after a hooked forward) and stores exactly the retrieved
bytes; the rest is the forward's own working set (activations, logits, libraries' first-call
buffers: a plain forward peaks 1.07-1.08x the resident model) that the allocator keeps
resident. Each variant gets its own fresh process because one forward leaves the heap shaped for
the next: with a plain forward run first in the same process (as this script did before),
retrieval peaked 1.12x with FlexModel and 1.17x with the raw hooks, against 1.08-1.09x for both
as the first forward.

    python benchmarks/hook_overhead.py [--reps 20] [--no-memory] [--in-forward] [--check]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import overhead_ratio, quantile, rounds, wall  # noqa: E402
from targets import REPETITIONS, check_targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "hook_overhead.json"
TARGETS = {"read_ratio": 1.3, "edit_ratio": 1.3, "memory_ratio": 1.1}  # issue 13
READ_SITES = ("ln_1", "attn.c_attn", "ln_2", "mlp.c_fc")
EDIT_SITE = "mlp.c_proj"


def _gpt2(layers: int, hidden: int, heads: int, vocab: int, positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab,
                        n_positions=positions, use_cache=False)
    return GPT2LMHeadModel(config).eval()


def times_two(module, tensor, ctx, modules):
    return tensor * 2


def _read_names(layers: int) -> list[str]:
    return [f"transformer.h.{i}.{site}" for i in range(layers) for site in READ_SITES]


def measure_time(reps: int, in_forward: bool = False) -> dict:
    from flex_surgery.hooks import FlexModel, HookFunction

    torch.set_num_threads(1)
    layers = 24
    base = _gpt2(layers, 128, 4, 1000, 256)
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(1))
    read_names = _read_names(layers)
    edit_names = [f"transformer.h.{i}.{EDIT_SITE}" for i in range(layers)]

    bare = base
    flex_read_model, raw_read_model, flex_edit_model, raw_edit_model = (
        copy.deepcopy(base) for _ in range(4))
    flex_stored: dict = {}
    flex_read = FlexModel(flex_read_model, flex_stored)
    for name in read_names:
        flex_read.register_forward_hook(HookFunction(name))
    flex_edit = FlexModel(flex_edit_model, None)
    for name in edit_names:
        flex_edit.register_forward_hook(HookFunction(name, editing_function=times_two))

    raw_stored: dict = {}
    modules = dict(raw_read_model.named_modules())
    for name in read_names:
        def read_hook(module, args, output, name=name):
            raw_stored.setdefault(name, []).append(output.detach().to("cpu", copy=True))
        modules[name].register_forward_hook(read_hook)
    ctx, edit_modules = object(), torch.nn.ModuleDict()
    modules = dict(raw_edit_model.named_modules())
    for name in edit_names:
        def edit_hook(module, args, output):
            return times_two(module, output, ctx, edit_modules)
        modules[name].register_forward_hook(edit_hook)

    fns = {"bare": lambda: bare(ids), "flex_read": lambda: flex_read(ids),
           "raw_read": lambda: raw_read_model(ids), "flex_edit": lambda: flex_edit(ids),
           "raw_edit": lambda: raw_edit_model(ids)}

    def check() -> None:
        flex_stored.clear()
        raw_stored.clear()
        flex_read(ids)
        raw_read_model(ids)
        assert sorted(flex_stored) == sorted(raw_stored) and len(flex_stored) == len(read_names)
        for name in read_names:
            assert len(flex_stored[name]) == 1 and torch.equal(flex_stored[name][0],
                                                               raw_stored[name][0]), name
        assert torch.equal(flex_edit(ids).logits, raw_edit_model(ids).logits), "edit differs"
        assert not torch.equal(bare(ids).logits, raw_edit_model(ids).logits), "edit did nothing"
        flex_stored.clear()
        raw_stored.clear()

    def drop() -> None:
        flex_stored.clear()
        raw_stored.clear()

    with torch.no_grad():
        check()
        for _ in range(3):  # warm-up
            for fn in fns.values():
                fn()
            drop()
        if in_forward:
            times = rounds(fns, reps, wall, after={"flex_read": drop, "raw_read": drop},
                           inner=3)
            check()
        direct = _direct(flex_read, flex_edit, flex_stored, raw_stored, read_names, edit_names,
                         raw_read_model, raw_edit_model, ids, reps)
    flex_read.restore()
    flex_edit.restore()
    result = {"direct": direct, "read_hooks": len(read_names), "edit_hooks": len(edit_names)}
    if in_forward:
        read = overhead_ratio(times, "flex_read", "bare", "raw_read", "bare")
        edit = overhead_ratio(times, "flex_edit", "bare", "raw_edit", "bare")
        result.update(read=read, edit=edit, bare_s=statistics.median(times["bare"]), per_hook_us={
            "flex_read": read["added_s"] / len(read_names) * 1e6,
            "raw_read": read["floor_s"] / len(read_names) * 1e6,
            "flex_edit": edit["added_s"] / len(edit_names) * 1e6,
            "raw_edit": edit["floor_s"] / len(edit_names) * 1e6})
    return result


def _direct(flex_read, flex_edit, flex_stored: dict, raw_stored: dict, read_names: list[str],
            edit_names: list[str], raw_read_model, raw_edit_model, ids, reps: int) -> dict:
    """The hook calls alone, on the (module, args, output) of one real forward."""
    def record(model, names):
        calls, handles = [], []
        modules = dict(model.named_modules())
        for name in names:
            handles.append(modules[name].register_forward_hook(
                lambda m, a, o: calls.append((m, a, o)), prepend=True))
        return calls, handles

    def hooks_of(model, names, flex=None):
        modules = dict(model.named_modules())
        if flex is not None:  # FlexModel's registered hooks, as torch would call them
            by_name = {hf.module_name: hf.torch_hook() for hf in flex.hook_functions}
            return [by_name[n] for n in names]
        return [next(h for h in modules[n]._forward_hooks.values()
                     if getattr(h, "__name__", "") in ("read_hook", "edit_hook")) for n in names]

    read_calls, h1 = record(raw_read_model, read_names)
    edit_calls, h2 = record(raw_edit_model, edit_names)
    raw_read_model(ids)
    raw_edit_model(ids)
    for h in h1 + h2:
        h.remove()
    raw_stored.clear()
    hooks = {"flex_read": hooks_of(flex_read.module, read_names, flex_read),
             "raw_read": hooks_of(raw_read_model, read_names),
             "flex_edit": hooks_of(flex_edit.module, edit_names, flex_edit),
             "raw_edit": hooks_of(raw_edit_model, edit_names)}
    edited: dict[str, list] = {}

    def caller(kind):
        calls = read_calls if kind.endswith("read") else edit_calls
        fns = hooks[kind]

        def run():
            edited[kind] = [fn(m, a, o) for fn, (m, a, o) in zip(fns, calls)]
        return run

    def drop():
        flex_stored.clear()
        raw_stored.clear()

    def check():
        caller("flex_read")()
        caller("raw_read")()
        for name in read_names:
            assert torch.equal(flex_stored[name][0], raw_stored[name][0]), name
        caller("flex_edit")()
        caller("raw_edit")()
        assert all(torch.equal(a, b) for a, b in zip(edited["flex_edit"], edited["raw_edit"]))
        drop()

    check()
    # Each pair in its own rounds: ``rounds`` rotates the order but keeps the cycle, so with all
    # four in one set ``flex_edit`` always ran right after ``raw_read`` had dropped 96 stored
    # copies, and paid for the allocator's state that left (see the module docstring).
    times = {}
    for pair in (("flex_read", "raw_read"), ("flex_edit", "raw_edit")):
        times.update(rounds({kind: caller(kind) for kind in pair}, reps * 3, wall,
                            after={"flex_read": drop, "raw_read": drop}, inner=5))
    check()
    out = {}
    for kind, n in (("read", len(read_names)), ("edit", len(edit_names))):
        flex, raw = times[f"flex_{kind}"], times[f"raw_{kind}"]
        per_round = [f / r for f, r in zip(flex, raw)]
        out[kind] = {"ratio": statistics.median(flex) / statistics.median(raw),
                     "q25": quantile(per_round, 0.25), "q75": quantile(per_round, 0.75),
                     "flex_us": statistics.median(flex) / n * 1e6,
                     "raw_us": statistics.median(raw) / n * 1e6}
    return out


# -- memory ---------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kib(resettable: bool) -> int:
    if resettable:
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_child(conn, variant: str) -> None:
    """Build the model and run one forward (``variant``: no hook, raw read hooks, FlexModel's)
    in this fresh process; send its peak resident memory above the process start."""
    # Imported before the start is read, in every variant: a library's code is not memory that
    # retrieval uses (importing flex_surgery adds a few MiB, whatever the model).
    from flex_surgery.hooks import FlexModel, HookFunction

    torch.set_num_threads(1)
    resettable = _reset_peak() and _status_kib("VmHWM") is not None
    start = _status_kib("VmRSS") * 1024
    layers, tokens = 24, 256
    model = _gpt2(layers, 512, 8, 8000, 512)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # What holding the model costs this process: its parameters and what building it left
    # resident (transformers' initialisation leaves about 1.4x the parameter bytes here).
    model_resident = _status_kib("VmRSS") * 1024 - start
    ids = torch.randint(0, 8000, (1, tokens), generator=torch.Generator().manual_seed(1))
    stored: dict = {}
    names = _read_names(layers)
    if variant == "flex":
        flex = FlexModel(model, stored)
        for name in names:
            flex.register_forward_hook(HookFunction(name))
        model = flex
    elif variant == "raw":
        modules = dict(model.named_modules())
        for name in names:
            def read_hook(module, args, output, name=name):
                stored.setdefault(name, []).append(output.detach().to("cpu", copy=True))
            modules[name].register_forward_hook(read_hook)
    with torch.no_grad():
        if resettable:
            _reset_peak()
        model(ids)
        peak = _peak_kib(resettable) * 1024
    retrieved = sum(t.numel() * t.element_size() for v in stored.values() for t in v)
    assert variant == "plain" or (len(stored) == len(names)
                                  and all(len(v) == 1 for v in stored.values()))
    conn.send({"start_rss": start, "model_bytes": model_bytes, "model_resident": model_resident,
               "retrieved_bytes": retrieved, "peak_above_start": peak - start,
               "gauge": "VmHWM reset via clear_refs" if resettable else "ru_maxrss"})
    conn.close()


def _memory_run(variant: str) -> dict:
    ctx = mp.get_context("fork")  # a fresh process: its peak is this run's alone
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(child, variant))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


def measure_memory() -> dict:
    runs = {variant: _memory_run(variant) for variant in ("plain", "raw", "flex")}
    flex, raw, plain = runs["flex"], runs["raw"], runs["plain"]
    assert flex["retrieved_bytes"] == raw["retrieved_bytes"]
    return {"model_bytes": flex["model_bytes"], "retrieved_bytes": flex["retrieved_bytes"],
            "model_resident": flex["model_resident"],
            "plain_peak_above_start": plain["peak_above_start"],
            "raw_peak_above_start": raw["peak_above_start"],
            "read_peak_above_start": flex["peak_above_start"],
            "memory_ratio": flex["peak_above_start"] / (flex["model_resident"]
                                                        + flex["retrieved_bytes"]),
            "raw_ratio": raw["peak_above_start"] / (raw["model_resident"]
                                                    + raw["retrieved_bytes"]),
            "plain_ratio": plain["peak_above_start"] / plain["model_resident"],
            # Against what any retrieval forward holds: its own working set as well.
            "over_plain_ratio": flex["peak_above_start"] / (plain["peak_above_start"]
                                                            + flex["retrieved_bytes"]),
            "over_raw_ratio": flex["peak_above_start"] / raw["peak_above_start"],
            "gauge": flex["gauge"], "runs": runs}


def report(t: dict, m: dict | None) -> None:
    print("GPT-2 24 blocks, hidden 128, 128 tokens, 1 thread")
    for kind, n in (("read", t["read_hooks"]), ("edit", t["edit_hooks"])):
        d = t["direct"][kind]
        print(f"  {kind}_ratio {d['ratio']:.2f}x FlexModel / raw torch hook, {n} hook calls "
              f"(per-round 25..75%: {d['q25']:.2f}..{d['q75']:.2f}); {d['flex_us']:.1f} us vs "
              f"{d['raw_us']:.1f} us per hook call")
    if "bare_s" in t:
        us = t["per_hook_us"]
        print(f"  in_forward: bare forward {t['bare_s'] * 1e3:.1f} ms")
        for kind in ("read", "edit"):
            r = t[kind]
            print(f"  in_forward {kind} {r['ratio']:.2f}x added over a bare forward, FlexModel "
                  f"/ raw (per-round 25..75%: {r['q25']:.2f}..{r['q75']:.2f}; fastest/fastest "
                  f"{r['best']:.2f}x); per hook {us['flex_' + kind]:.1f} us vs "
                  f"{us['raw_' + kind]:.1f} us")
    if m is not None:
        mib = 1 << 20
        print(f"memory ({m['gauge']}): peak of a retrieval forward above the process start "
              f"{m['read_peak_above_start'] / mib:.0f} MiB = {m['memory_ratio']:.2f}x "
              f"(model resident {m['model_resident'] / mib:.0f} MiB, of which parameters "
              f"{m['model_bytes'] / mib:.0f} MiB, + retrieved {m['retrieved_bytes'] / mib:.0f} "
              f"MiB); raw read hooks {m['raw_peak_above_start'] / mib:.0f} MiB = "
              f"{m['raw_ratio']:.2f}x; a plain forward's peak "
              f"{m['plain_peak_above_start'] / mib:.0f} MiB = {m['plain_ratio']:.2f}x the "
              f"resident model")
        print(f"  FlexModel's peak over (a plain forward's peak + retrieved) "
              f"{m['over_plain_ratio']:.2f}x, over the raw read hooks' peak "
              f"{m['over_raw_ratio']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="rounds (each the fastest of 3)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--in-forward", action="store_true",
                        help="also time whole forwards (bare vs hooked); slow, and on a loaded "
                             "machine dominated by the forward's own variation")
    parser.add_argument("--check", action="store_true",
                        help=f"{REPETITIONS} repetitions; fail if a ratio exceeds its target "
                             f"by more than 20 %%")
    args = parser.parse_args()
    runs = []
    repetitions = REPETITIONS if args.check else 1
    # Every memory child first, each forked from the still-small heap of a process that has
    # timed nothing yet: forked after a timing run, a child inherits that run's heap, and its
    # peak above its start moved by +-15 % from one repetition to the next.
    memories = [measure_memory() if args.memory else None for _ in range(repetitions)]
    for i, m in enumerate(memories):
        t = measure_time(args.reps, args.in_forward)
        if args.check:
            print(f"--- repetition {i + 1} of {REPETITIONS}")
        report(t, m)
        runs.append({"time": t, "memory": m})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"runs": runs, "reps": args.reps}, indent=2) + "\n")
    print(f"-> {RESULTS}")
    if args.check:
        measured = {"read_ratio": [r["time"]["direct"]["read"]["ratio"] for r in runs],
                    "edit_ratio": [r["time"]["direct"]["edit"]["ratio"] for r in runs]}
        targets = {k: TARGETS[k] for k in ("read_ratio", "edit_ratio")}
        if args.memory:
            measured["memory_ratio"] = [r["memory"]["memory_ratio"] for r in runs]
            targets["memory_ratio"] = TARGETS["memory_ratio"]
        sys.exit(check_targets("hook_overhead", measured, targets))


if __name__ == "__main__":
    main()
