"""What the announcements that make data-parallel ranks meet cost a hooked forward (and backward).

Under DP on the CPU every hooked forward ends with each rank announcing to the stage leader
that it reached no further hook (``DistributedRuntime.end_of_hooked_forward``: one small header
from every rank, one answer back), so that a rank left waiting at a hook the others skipped
raises with them instead of hanging. That is a round trip per forward, paid whatever the hooks
do. Measured on forked gloo ranks (one thread each), paired and interleaved:

- the announcement alone, next to its floor: one ``dist.all_reduce`` of a single integer over
  the same ranks (the cheapest exchange in which every rank hears from every other);
- its share of a hooked forward: the retrieval benchmark's model (8 blocks, H=512, 256 tokens
  per replica, a retrieval hook on every up-projection) with the announcement and with it
  replaced by a no-op, in the same rounds. Both store the same values (asserted);
- the same for hooks whose first message would otherwise carry no header (here, retrievals
  with ``expected_shape``: a shape agreement, then pieces of known sizes): each call announces
  its site first (``AxisWalk.announce_site``), so the forward pays 8 announcements plus the
  end's. Measured with every announcement and with none (``meets_at_sites`` off), the same
  values stored (asserted);
- the end of the backward (``DistributedRuntime.watch_backward``): a forward and backward with
  a ``full_backward`` retrieval hook on every up-projection, with the backward's end announced
  and with ``watch_backward`` a no-op, the same values stored (asserted).
- FSDP1's gradient reductions (``DistributedRuntime._watch_reductions``): the same model with
  each block an FSDP1 unit, forward and backward with the same hooks, with each unit's
  reduce-scatter announced and without (the pre-hooks removed), the same values stored and
  the same gradients (asserted); the same with each block an FSDP2 unit, each unit's
  all-gather in the backward announced and not (``DistributedRuntime._watch_unshards``).

    python benchmarks/end_of_forward.py [--reps 20]   # writes results/end_of_forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _timing import quantile, ratio, rounds, wall  # noqa: E402

H, TOKENS, BLOCKS, CALLS = 512, 256, 8, 50


def _model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(BLOCKS):
        up, down = torch.nn.Linear(H, 4 * H), torch.nn.Linear(4 * H, H)
        for lin in (up, down):
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
                lin.bias.zero_()
        layers += [up, torch.nn.GELU(), down]
    return torch.nn.Sequential(*layers)


def _rank(reps: int) -> dict | None:
    from flex_surgery.hooks import FlexModel, HookFunction

    torch.manual_seed(dist.get_rank())
    x = torch.randn(1, TOKENS, H)
    stored: dict = {}
    flex = FlexModel(_model(), stored, data_parallel_size=dist.get_world_size())
    for i in range(BLOCKS):
        flex.register_forward_hook(HookFunction(str(3 * i)))
    runtime = flex.runtime
    announce = runtime.end_of_hooked_forward
    shaped_stored: dict = {}
    shaped = FlexModel(_model(), shaped_stored, data_parallel_size=dist.get_world_size())
    for i in range(BLOCKS):
        shaped.register_forward_hook(HookFunction(str(3 * i), expected_shape=(None, TOKENS,
                                                                              4 * H)))

    def shaped_forward(meets: bool) -> dict:
        shaped.runtime.meets_at_sites = meets
        with torch.no_grad():
            shaped(x)
        got = {k: list(v) for k, v in shaped_stored.items()}
        shaped_stored.clear()
        return got
    one = torch.zeros(1, dtype=torch.int64)

    def forward(end) -> None:
        runtime.end_of_hooked_forward = end
        with torch.no_grad():
            flex(x)
        stored.clear()

    def values(end) -> dict:
        runtime.end_of_hooked_forward = end
        with torch.no_grad():
            flex(x)
        got = {k: [t.clone() for t in v] for k, v in stored.items()}
        stored.clear()
        return got

    with_end, without = values(announce), values(lambda: None)
    if dist.get_rank() == 0:
        assert with_end.keys() == without.keys() and len(with_end) == BLOCKS
        assert all(torch.equal(a, b) for k in with_end
                   for a, b in zip(with_end[k], without[k]))

    def calls(fn):
        return lambda: [fn() for _ in range(CALLS)]

    alone = rounds({"announce": calls(announce),
                    "all_reduce": calls(lambda: dist.all_reduce(one))}, reps, wall, inner=3)
    fwd = rounds({"with": lambda: forward(announce), "without": lambda: forward(lambda: None)},
                 reps, wall, inner=3)
    runtime.end_of_hooked_forward = announce
    flex.restore()
    met, unmet = shaped_forward(True), shaped_forward(False)
    if dist.get_rank() == 0:
        assert met.keys() == unmet.keys() and len(met) == BLOCKS
        assert all(torch.equal(a, b) for k in met for a, b in zip(met[k], unmet[k]))
    sites = rounds({"met": lambda: shaped_forward(True), "unmet": lambda: shaped_forward(False)},
                   reps, wall, inner=3)
    shaped.runtime.meets_at_sites = True
    shaped.restore()
    site_added = [m - u for m, u in zip(sites["met"], sites["unmet"])]

    back_stored: dict = {}
    back = FlexModel(_model(), back_stored, data_parallel_size=dist.get_world_size())
    for i in range(BLOCKS):
        back.register_full_backward_hook(HookFunction(str(3 * i)))
    watch = back.runtime.watch_backward
    xg = x.clone().requires_grad_(True)

    def backward(watching) -> dict:
        back.runtime.watch_backward = watching
        back(xg).sum().backward()
        got = {k: list(v) for k, v in back_stored.items()}
        back_stored.clear()
        return got

    watched, unwatched = backward(watch), backward(lambda output: None)
    if dist.get_rank() == 0:
        assert watched.keys() == unwatched.keys() and len(watched) == BLOCKS
        assert all(torch.equal(a, b) for k in watched
                   for a, b in zip(watched[k], unwatched[k]))
    backs = rounds({"watched": lambda: backward(watch),
                    "unwatched": lambda: backward(lambda output: None)}, reps, wall, inner=3)
    back.runtime.watch_backward = watch
    back.restore()
    back_added = [w - u for w, u in zip(backs["watched"], backs["unwatched"])]
    fsdp = {**_fsdp1_backward(x, reps), **_fsdp2_backward(x, reps)}
    added = [w - o for w, o in zip(fwd["with"], fwd["without"])]
    shares = [a / o for a, o in zip(added, fwd["without"])]
    return {
        "world": dist.get_world_size(),
        "announce_us": statistics.median(alone["announce"]) / CALLS * 1e6,
        "all_reduce_us": statistics.median(alone["all_reduce"]) / CALLS * 1e6,
        "announce_over_all_reduce": ratio(alone, "announce", "all_reduce"),
        "forward_without_ms": statistics.median(fwd["without"]) * 1e3,
        "added_ms": statistics.median(added) * 1e3,
        "share": statistics.median(added) / statistics.median(fwd["without"]),
        "share_q25": quantile(shares, 0.25), "share_q75": quantile(shares, 0.75),
        "shaped_forward_unmet_ms": statistics.median(sites["unmet"]) * 1e3,
        "shaped_added_ms": statistics.median(site_added) * 1e3,
        "shaped_per_announcement_us": statistics.median(site_added) / (BLOCKS + 1) * 1e6,
        "shaped_share": statistics.median(site_added) / statistics.median(sites["unmet"]),
        "backward_unwatched_ms": statistics.median(backs["unwatched"]) * 1e3,
        "backward_added_ms": statistics.median(back_added) * 1e3,
        "backward_share": statistics.median(back_added) / statistics.median(backs["unwatched"]),
        "backward_share_q25": quantile([a / u for a, u in zip(back_added, backs["unwatched"])],
                                       0.25),
        "backward_share_q75": quantile([a / u for a, u in zip(back_added, backs["unwatched"])],
                                       0.75),
        **fsdp,
    } if dist.get_rank() == 0 else None


def _fsdp1_backward(x: torch.Tensor, reps: int) -> dict:
    """Forward and backward of the model with each block an FSDP1 unit and a full_backward
    retrieval hook on every up-projection: each unit's reduce-scatter announced, and not."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from flex_surgery.hooks import FlexModel, HookFunction

    blocks = torch.nn.Sequential(*[torch.nn.Sequential(*list(_model())[3 * i:3 * i + 3])
                                   for i in range(BLOCKS)])
    model = FSDP(blocks, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Sequential}),
                 use_orig_params=True, device_id=torch.device("cpu"))
    stored: dict = {}
    flex = FlexModel(model, stored)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][::2]
    for name in names:
        flex.register_full_backward_hook(HookFunction(name))
    runtime = flex.runtime
    watch = runtime._watch_reductions
    xg = x.clone().requires_grad_(True)

    def run() -> tuple[dict, list]:
        model.zero_grad(set_to_none=True)
        flex(xg).sum().backward()
        got = {k: list(v) for k, v in stored.items()}
        stored.clear()
        return got, [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    def step(announced: bool) -> tuple[dict, list]:  # the reductions (the unshards both ways)
        if announced:
            runtime._watch_reductions = watch
        else:
            runtime._unwatch_reductions()
            runtime._unshards = runtime._watch_unshards()  # (which that removed too)
            runtime._watch_reductions = functools.partial(lambda: None)
            assert not runtime._reductions
        return run()

    step(True)  # FSDP1 registers its hooks in its first forward
    from flex_surgery.parallel.site_tags import BACKWARD_UNSHARD, GRADIENT_REDUCTION

    reductions, result = _with_and_without(step, runtime, GRADIENT_REDUCTION, reps, "fsdp1")
    units = sum(1 for m in model.modules() if isinstance(m, FSDP) and m._handle is not None)
    assert reductions == units == BLOCKS, (reductions, units)  # each unit's, once
    runtime._watch_reductions = watch
    # the all-gathers in the backward: every unit's pre-backward, the root's too (its
    # outputs' gradient arrives after the backward's end is watched)
    unshards, gathers = _with_and_without(lambda announced: _toggle_unshards(
        runtime, announced) or run(), runtime, BACKWARD_UNSHARD, reps, "fsdp1_unshard")
    assert unshards == BLOCKS + 1, unshards
    _toggle_unshards(runtime, True)
    flex.close()
    return {**result, **gathers}


def _toggle_unshards(runtime, announced: bool) -> None:
    """The forward hooks that announce the FSDP units' all-gathers in the backward, on or
    off (``DistributedRuntime._watch_unshards``)."""
    if announced and not runtime._unshards:
        runtime._unshards = runtime._watch_unshards()
    elif not announced:
        for handle in runtime._unshards:
            handle.remove()
        runtime._unshards = []


def _fsdp2_backward(x: torch.Tensor, reps: int) -> dict:
    """The same with each block an FSDP2 unit (and the root): each unit's all-gather in the
    backward announced, and not (the forward hooks that hook the units' outputs removed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from flex_surgery.hooks import FlexModel, HookFunction
    from flex_surgery.parallel.site_tags import BACKWARD_UNSHARD

    model = torch.nn.Sequential(*[torch.nn.Sequential(*list(_model())[3 * i:3 * i + 3])
                                  for i in range(BLOCKS)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    stored: dict = {}
    flex = FlexModel(model, stored)
    for i in range(BLOCKS):
        flex.register_full_backward_hook(HookFunction(f"{i}.0"))
    runtime = flex.runtime
    hooks = runtime._unshards
    assert len(hooks) == BLOCKS + 1  # every unit, the root too
    xg = x.clone().requires_grad_(True)

    def step(announced: bool) -> tuple[dict, list]:
        _toggle_unshards(runtime, announced)
        model.zero_grad(set_to_none=True)
        flex(xg).sum().backward()
        got = {k: list(v) for k, v in stored.items()}
        stored.clear()
        return got, [p.grad.to_local().clone() for p in model.parameters()]

    unshards, result = _with_and_without(step, runtime, BACKWARD_UNSHARD, reps, "fsdp2")
    # each block's pre-backward, once; the root's runs as the backward starts, before any
    # backward hook could be skipped (and before the backward's end is watched): not announced
    assert unshards == BLOCKS, unshards
    step(True)
    flex.close()
    return result


def _with_and_without(step, runtime, tag: int, reps: int, prefix: str) -> tuple[int, dict]:
    """``step(announced)`` once each way: the announcements of ``tag`` the first made, and
    the same values stored and gradients (``None`` alike) both ways, asserted; then both
    timed, interleaved. Returns the count and the timings under ``prefix``."""
    from flex_surgery.parallel.site_tags import stamp

    announced, announce = [], runtime.walk.announce_site
    runtime.walk.announce_site = lambda site: (announced.append(site), announce(site))[1]
    a, ga = step(True)
    count = announced.count(stamp(tag, runtime.passes))
    b, gb = step(False)
    runtime.walk.announce_site = announce
    if dist.get_rank() == 0:
        assert a.keys() == b.keys() and len(a) == BLOCKS
        assert all(torch.equal(u, v) for k in a for u, v in zip(a[k], b[k]))
    assert all((u is None) == (v is None) and (u is None or torch.equal(u, v))
               for u, v in zip(ga, gb)) and any(u is not None for u in ga)
    runs = rounds({"announced": lambda: step(True), "not": lambda: step(False)}, reps, wall,
                  inner=3)
    added = [w - u for w, u in zip(runs["announced"], runs["not"])]
    return count, {f"{prefix}_backward_ms": statistics.median(runs["not"]) * 1e3,
                   f"{prefix}_added_ms": statistics.median(added) * 1e3,
                   f"{prefix}_per_unit_us": statistics.median(added) / BLOCKS * 1e6,
                   f"{prefix}_share": statistics.median(added) / statistics.median(runs["not"])}


def main() -> None:
    from flex_surgery.launch import fork_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    results = []
    for world in args.worlds:
        r = fork_ranks(_rank, args.reps, nprocs=world, device="cpu", threads=1,
                       timeout_s=600)[0]
        results.append(r)
        a = r["announce_over_all_reduce"]
        print(f"[dp{world}] announcement {r['announce_us']:.0f} us per forward; a 1-int "
              f"all_reduce over the same ranks {r['all_reduce_us']:.0f} us: {a['ratio']:.2f}x "
              f"(per-round 25..75%: {a['q25']:.2f}..{a['q75']:.2f}; fastest/fastest "
              f"{a['best']:.2f}x)")
        print(f"[dp{world}] hooked forward ({BLOCKS} retrieval hooks) "
              f"{r['forward_without_ms']:.1f} ms without it; added {r['added_ms']:.2f} ms = "
              f"{100 * r['share']:.1f} % (per-round 25..75%: {100 * r['share_q25']:.1f}.."
              f"{100 * r['share_q75']:.1f} %)")
        print(f"[dp{world}] hooked forward ({BLOCKS} retrieval hooks with expected_shape) "
              f"{r['shaped_forward_unmet_ms']:.1f} ms without meeting; {BLOCKS} site "
              f"announcements and the end's add {r['shaped_added_ms']:.2f} ms = "
              f"{100 * r['shaped_share']:.1f} % ({r['shaped_per_announcement_us']:.0f} us each)")
        print(f"[dp{world}] forward + backward ({BLOCKS} full_backward retrieval hooks) "
              f"{r['backward_unwatched_ms']:.1f} ms without the backward's end; added "
              f"{r['backward_added_ms']:.2f} ms = {100 * r['backward_share']:.1f} % (per-round "
              f"25..75%: {100 * r['backward_share_q25']:.1f}..{100 * r['backward_share_q75']:.1f}"
              f" %)")
        print(f"[dp{world}] FSDP1, {BLOCKS} units, forward + backward ({BLOCKS} full_backward "
              f"retrieval hooks) {r['fsdp1_backward_ms']:.1f} ms without the reductions "
              f"announced; added {r['fsdp1_added_ms']:.2f} ms = {100 * r['fsdp1_share']:.1f} % "
              f"({r['fsdp1_per_unit_us']:.0f} us per unit)")
        print(f"[dp{world}] FSDP1, the same: {r['fsdp1_unshard_backward_ms']:.1f} ms without "
              f"the all-gathers announced; added {r['fsdp1_unshard_added_ms']:.2f} ms = "
              f"{100 * r['fsdp1_unshard_share']:.1f} % ({r['fsdp1_unshard_per_unit_us']:.0f} "
              f"us per unit)")
        print(f"[dp{world}] FSDP2, {BLOCKS} units, forward + backward ({BLOCKS} "
              f"full_backward retrieval hooks) {r['fsdp2_backward_ms']:.1f} ms without the "
              f"all-gathers announced; added {r['fsdp2_added_ms']:.2f} ms = "
              f"{100 * r['fsdp2_share']:.1f} % ({r['fsdp2_per_unit_us']:.0f} us per unit)")
    out = os.path.join(os.path.dirname(__file__), "..", "results", "end_of_forward.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"-> {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
