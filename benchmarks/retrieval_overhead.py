"""What a FlexModel hook adds to a sharded forward, over the true floor of the same operation.

Every layout runs 8 MLP blocks (up H->4H, GELU, down 4H->H; H=512, 256 tokens per replica) on
forked ranks (gloo on CPU, one thread per rank) with a hook on every up-projection:

* ``tp2``: fairscale ``ColumnParallelLinear``/``RowParallelLinear``, TP=2 (2 ranks);
* ``megatron``: the same block from Megatron-core's TP layers, TP=2 (2 ranks, ``[s, b, h]``);
* ``dp2tp2``: fairscale, DP=2 x TP=2 (4 ranks, each replica its own batch row);
* ``pp2``: two pipeline stages of 4 plain blocks each (2 ranks, activations sent stage to stage).

Per layout, in interleaved rounds (order rotated each round, a barrier before every clock):
a forward with every hook disabled (``plain``), with retrieval hooks (``read``, stored on rank
0; ``read_overlap``: the same with ``FlexModel(..., overlap_retrieval=True)``, whose gathers
run while the next blocks compute, where this checkout has it), with an x2 editing function on
every hook (``edit``: the leader path; ``edit_replicate``:
``HookFunction(..., replicate_edit=True)`` where this checkout has it), and the floors:

* retrieval floor: the bytes of the 8 activations moved, once, to the rank that stores them,
  into preallocated buffers -- one ``dist.gather`` over the layout's ranks to rank 0 and a copy
  into a preallocated whole tensor (TP, DP x TP) -- and, printed beside it, the same bytes sent
  point to point (``send``/``irecv`` into preallocated buffers, the leader's own piece copied
  into place while the others arrive): how FlexModel moves them on the CPU, and faster on gloo
  than its ``gather`` (which runs on a worker thread); for PP, stage 0's activations copied into
  preallocated buffers on rank 0 and stage 1's sent to rank 0 (``isend``/``irecv`` into
  preallocated buffers), and, printed beside it, the same with stage 1's activations first
  copied into preallocated buffers and sent only then: a stage's hook must copy its value when
  it fires (later code may overwrite the activation) and the values travel at collection,
  after the stage has run (JSON ``direct_retrieval_vs_snapshot``);
* edit floor: what an editing function of the whole tensor needs on every rank that holds a
  piece -- ``dist.all_gather`` into preallocated buffers, a copy into a preallocated whole
  tensor, x2, keep this rank's slice (TP, DP x TP; over every rank that holds a piece); for PP
  (no communication) the x2 of the 8 activations.

Two measurements per path, both interleaved with the floors:

* ``hook calls alone`` (what ``--check`` holds to the targets): one forward records every
  hooked module's ``(module, args, output)``; each round then calls the registered FlexModel
  hooks (``HookFunction.torch_hook()``) on them -- PP retrieval then collects to rank 0 --
  and the ratio is their time over the floor's. The forward's own compute (tens of ms, varying
  with the machine's load) is not around them, so the spread is a few per cent;
* ``in the forward``: median over rounds of (hooked forward - plain forward of the same round)
  / median floor -- the original definition, but a difference of two forwards, whose spread on
  a loaded 2-core machine exceeds the hooks' cost. The floor here is timed *outside* the
  forward, so this ratio also holds what any operation pays inside one and a floor alone does
  not: ranks arriving apart (the skew the first communication after compute absorbs), caches
  cold after the matmuls, the allocator's state;
* ``in the forward over the in-forward floor``: the floor run *inside* the forward, by raw
  torch forward hooks on the same modules of an unwrapped copy of the model (same weights),
  on the hooked module's live output on this rank: retrieval (TP, DP x TP) the same
  ``dist.gather`` to rank 0 into the preallocated buffers and copy into a preallocated whole
  tensor; edit the ``dist.all_gather`` + place + x2 + own slice, returned as the module's new
  output (made contiguous, as FlexModel's piece is: the next layer's matmul rounds a strided
  input differently, and contiguous the forward equals FlexModel's edited one bit for bit);
  PP retrieval: rank 0 posts the receives of stage 1's activations before its stage runs,
  its hooks copy stage 0's into preallocated buffers, stage 1's hooks ``isend`` theirs, both
  wait at the end of the forward; PP edit: the raw x2 hook. The ratio is, per round,
  (hooked forward - plain) over (raw floor-hooked forward - raw plain forward, the raw hooks
  returning nothing), median over median (``overhead_ratio(..., floor_plain=)``). Beside it,
  ``in-forward floor over the floor alone``: (raw floor-hooked - raw plain) / floor timed
  alone, how much being in a forward inflates the floor itself. Asserted: rank 0's in-forward
  gathered wholes equal FlexModel's stored values for the same input (``torch.equal``), and
  the in-forward edit floor's output equals the FlexModel-edited forward's. JSON keys per
  layout: ``retrieval_vs_fwd_floor``, ``edit_vs_fwd_floor`` (``edit_replicate_``,
  ``retrieval_overlap_`` where timed), ``fwd_floor_retrieval``, ``fwd_floor_edit``,
  ``raw_plain_s``; the other keys are unchanged.

The spread is the 25..75 % range of the per-round ratios. ``fixed_cost``: the hook calls alone
on a tiny activation (H=8, 4 tokens, TP=2), in microseconds per hook call, beside the floor's.
Each round times every variant 3 times in a row and keeps the fastest (``_timing.rounds``).

Allocator (``--pin-malloc``): a stored tensor is fresh memory, and glibc's defaults hand freed
blocks of 128 KiB or more back to the system (and trim the heap top), so each round's stored
tensors page-fault again as they are written (about a page fault per 4 KiB: 512 per 2 MiB
activation); the floor writes into preallocated buffers and pays none. ``--pin-malloc`` calls
``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` and ``mallopt(M_TRIM_THRESHOLD, 2 GiB)`` in the parent
before the ranks fork, for the floors and FlexModel alike, so freed memory is reused: what is
left is the hooks' own cost. The default leaves glibc as it is; both are printed (the header
says which), neither hides the other.

What was timed is asserted correct: the retrieved tensors equal the one-process value (an
unsharded model with the gathered full weights, run on rank 0), and the edited forward equals
the plain forward with the activation doubled by a raw torch hook (``torch.equal``).

    python benchmarks/retrieval_overhead.py [--reps 20] [--layouts tp2 megatron dp2tp2 pp2]
    python benchmarks/retrieval_overhead.py --pin-malloc  # glibc keeps freed memory (above)
    python benchmarks/retrieval_overhead.py --check      # 3 repetitions against the targets
    python benchmarks/retrieval_overhead.py --device cuda   # benchmarks/retrieval_cuda.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import fmt, overhead_ratio, ratio, rounds  # noqa: E402
from targets import REPETITIONS, check_targets  # noqa: E402

H, TOKENS, BLOCKS = 512, 256, 8
RESULTS = Path(__file__).resolve().parent.parent / "results" / "retrieval_overhead.json"
WORLDS = {"tp2": 2, "megatron": 2, "dp2tp2": 4, "pp2": 2}
TARGETS = {"retrieval": 1.0, "edit": 1.3}  # issue 13, CPU/gloo


class Block(nn.Module):
    def __init__(self, h: int = H) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.up = ColumnParallelLinear(h, 4 * h, gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(4 * h, h, input_is_parallel=True)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class MegatronBlock(nn.Module):
    """The same block from Megatron-core's layers (they return ``(output, bias)``)."""

    def __init__(self, h: int = H) -> None:
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        config = ModelParallelConfig(tensor_model_parallel_size=2,
                                     use_cpu_initialization=True, params_dtype=torch.float32)
        init = nn.init.xavier_normal_
        self.up = ColumnParallelLinear(h, 4 * h, config=config, init_method=init, bias=True,
                                       gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(4 * h, h, config=config, init_method=init, bias=True,
                                      input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)[0]))[0]


class PlainBlock(nn.Module):
    def __init__(self, h: int = H) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Stage(nn.Module):
    """Blocks of one pipeline stage under the names they have in the whole model."""

    def __init__(self, blocks: nn.ModuleList, ids: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): blocks[i] for i in ids})

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return x


def _times_two(module, tensor, ctx, modules):
    return tensor * 2


def _has_replicate_edit() -> bool:
    from flex_surgery.hooks.hook_function import HookFunction

    return "replicate_edit" in inspect.signature(HookFunction.__init__).parameters


def _has_overlap_retrieval() -> bool:
    from flex_surgery.hooks.wrapper import FlexModel

    return "overlap_retrieval" in inspect.signature(FlexModel.__init__).parameters


def _double_output(module, args, output):
    """The edit done by hand on this rank's piece (x2 is element-wise, so the piece suffices)."""
    if isinstance(output, tuple):
        return (output[0] * 2,) + tuple(output[1:])
    return output * 2


# -- the one-process reference -------------------------------------------------------------------

def _full_weights(model: nn.Module, group) -> list[tuple[torch.Tensor, ...]]:
    """Per block: (up weight, up bias, down weight, down bias), whole, gathered over tp."""
    def cat(t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim)

    return [(cat(b.up.weight, 0), cat(b.up.bias, 0), cat(b.down.weight, 1), b.down.bias.detach())
            for b in model]


def _reference_ups(weights, x: torch.Tensor) -> list[torch.Tensor]:
    """The up-projection outputs one process computes with the whole weights."""
    ups = []
    with torch.no_grad():
        for wu, bu, wd, bd in weights:
            up = F.linear(x, wu, bu)
            ups.append(up)
            x = F.linear(F.gelu(up), wd, bd)
    return ups


# -- one layout on one world ---------------------------------------------------------------------

def _build(layout: str, h: int):
    """(model or stage, whole-model blocks, tp group) with the same weights on every call."""
    torch.manual_seed(0)
    if layout == "pp2":
        blocks = nn.ModuleList([PlainBlock(h) for _ in range(BLOCKS)])
        half = BLOCKS // 2
        ids = list(range(half)) if dist.get_rank() == 0 else list(range(half, BLOCKS))
        return Stage(blocks, ids), blocks, None
    cls = MegatronBlock if layout == "megatron" else Block
    model = nn.Sequential(*[cls(h) for _ in range(BLOCKS)])
    if layout == "megatron":
        from megatron.core import parallel_state

        return model, model, parallel_state.get_tensor_model_parallel_group()
    from fairscale.nn.model_parallel import initialize as fs

    return model, model, fs.get_model_parallel_group()


def _measure(layout: str, reps: int, h: int, tokens: int, device: str = "cpu",
             inner: int = 3) -> dict | None:
    from flex_surgery.hooks.hook_function import HookFunction
    from flex_surgery.hooks.wrapper import FlexModel

    rank, world = dist.get_rank(), dist.get_world_size()
    dp = 2 if layout == "dp2tp2" else 1
    tp = 1 if layout == "pp2" else 2
    stage = rank if layout == "pp2" else 0
    dp_rank, tp_rank = divmod(rank, tp) if layout != "pp2" else (0, 0)
    gen = torch.Generator().manual_seed(1)
    x_whole = torch.randn(dp, tokens, h, generator=gen)
    if layout == "megatron":
        x_whole = x_whole.transpose(0, 1).contiguous()  # [s, b, h]
    x_whole = x_whole.to(device)
    x = x_whole[dp_rank:dp_rank + 1] if layout != "megatron" else x_whole
    batch_dim = 1 if layout == "megatron" else 0
    replicate = _has_replicate_edit()
    names = [(f"blocks.{i}.up" if layout == "pp2" else f"{i}.up") for i in range(BLOCKS)]
    mine = [n for n in names if layout != "pp2" or int(n.split(".")[1]) // (BLOCKS // 2) == stage]

    flexes, stored = {}, {}
    kinds = ["read", "edit"] + (["edit_replicate"] if replicate else [])
    overlap = _has_overlap_retrieval()
    for kind in kinds + (["read_overlap"] if overlap else []):
        model, _, _ = _build(layout, h)
        model.to(device)
        out = {} if kind.startswith("read") else None
        flex = FlexModel(model, out, pipeline_parallel_size=2 if layout == "pp2" else 1,
                         **({"overlap_retrieval": True} if kind == "read_overlap" else {}))
        assert flex.runtime.mesh.tp_size == tp and flex.runtime.mesh.dp_size == dp, layout
        for name in names:
            extra = {"replicate_edit": True} if kind == "edit_replicate" else {}
            fn = None if kind.startswith("read") else _times_two
            flex.register_forward_hook(HookFunction(name, editing_function=fn, **extra))
        flexes[kind], stored[kind] = flex, out
    raw_model, whole_blocks, tp_group = _build(layout, h)  # raw torch hooks, toggled
    raw_model.to(device)
    # raw_mode[0]: None (the hooks return nothing), "edit" (x2 by hand), or the name of an
    # in-forward floor ("fwd_floor_read", "fwd_floor_edit"; defined with the floors below)
    raw_mode: list[str | None] = [None]
    in_forward: dict = {}
    modules = dict(raw_model.named_modules())

    def raw_hook(module, args, output, i):
        if raw_mode[0] is None:
            return None
        if raw_mode[0] == "edit":
            return _double_output(module, args, output)
        return in_forward[raw_mode[0]](i, output)

    for i, name in enumerate(mine):
        modules[name].register_forward_hook(lambda m, a, o, i=i: raw_hook(m, a, o, i))

    # -- forwards (a barrier at the end too, so a PP forward is timed to its last stage) --------
    recv_buf = torch.empty(1, tokens, h, device=device)

    def forward(flex_or_model, hooks: bool, sync: bool = False, mode: str | None = None,
                start=None, finish=None):
        """A timed forward; ``mode`` sets the raw hooks' mode for it, ``start``/``finish``
        run on this rank before the forward and before its closing barrier."""
        def run():
            raw_mode[0] = mode
            try:
                return body()
            finally:
                raw_mode[0] = None

        def body():
            if start is not None:
                start()
            kw = {} if hooks else {"groups": "all", "complement": True}
            call = (lambda t: flex_or_model(t, **kw)) if isinstance(flex_or_model, FlexModel) \
                else flex_or_model
            if layout == "pp2":
                if stage == 0:
                    y = call(x)
                    dist.send(y.contiguous(), 1)
                else:
                    dist.recv(recv_buf, 0)
                    y = call(recv_buf)
            else:
                y = call(x)
            if sync:
                flex_or_model.sync_pipeline_outputs()
            if finish is not None:
                finish()
            dist.barrier()
            return y
        return run

    raw_edit = forward(raw_model, True, mode="edit")

    fns = {"plain": forward(flexes["read"], False),
           "read": forward(flexes["read"], True, sync=layout == "pp2"),
           "edit": forward(flexes["edit"], True)}
    if replicate:
        fns["edit_replicate"] = forward(flexes["edit_replicate"], True)
    if overlap:
        fns["read_overlap"] = forward(flexes["read_overlap"], True, sync=layout == "pp2")

    # -- floors ------------------------------------------------------------------------------------
    local_shape = (x.shape[0], x.shape[1], 4 * h // tp) if layout != "megatron" else \
        (tokens, 1, 4 * h // tp)
    pieces = [torch.randn(local_shape, generator=gen).to(device) for _ in mine]
    if layout == "pp2":
        half = BLOCKS // 2
        bufs = [torch.empty(local_shape, device=device) for _ in range(BLOCKS)]

        def floor_read():  # stage 0 copies its own, stage 1 sends its own to rank 0
            if rank == 0:
                reqs = [dist.irecv(bufs[half + i], 1) for i in range(half)]
                for i, p in enumerate(pieces):
                    bufs[i].copy_(p)
                for r in reqs:
                    r.wait()
            else:
                reqs = [dist.isend(p, 0) for p in pieces]
                for r in reqs:
                    r.wait()

        def floor_edit():  # no communication: the x2 of every stage's activations, one by one
            for p in pieces + pieces:
                _times_two(None, p, None, None)

        snaps = [torch.empty(local_shape, device=device) for _ in mine]

        def floor_read_snapshot():  # the floor, plus stage 1's copies before it sends
            if rank == 0:
                floor_read()
                return
            for snap, p in zip(snaps, pieces):  # at hook time: later code may overwrite p
                snap.copy_(p)
            reqs = [dist.isend(snap, 0) for snap in snaps]  # at collection, after the stage
            for r in reqs:
                r.wait()

        fns["floor_read"] = floor_read
        fns["floor_edit"] = floor_edit
        # The PP floor is point to point already; beside it, the floor with the copy a stage
        # must make when its hook fires (the value is collected only after the stage has run)
        second_floor = floor_read_snapshot

        # In the forward: rank 0 posts the receives of stage 1's activations before its stage
        # runs and waits for them at the end; its raw hooks copy stage 0's live activations
        # into preallocated buffers, stage 1's raw hooks isend theirs (the live output itself:
        # nothing writes it later) and wait at the end. The edit floor (x2, no communication)
        # is the raw x2 hook.
        fwd_bufs = [torch.empty(local_shape, device=device) for _ in range(BLOCKS)]
        fwd_reqs: list = []

        def fwd_read(i, output):
            if rank == 0:
                fwd_bufs[i].copy_(output)
            else:
                fwd_reqs.append(dist.isend(output, 0))

        def fwd_start():
            if rank == 0:
                fwd_reqs.extend(dist.irecv(fwd_bufs[half + i], 1) for i in range(half))

        def fwd_finish():
            for r in fwd_reqs:
                r.wait()
            fwd_reqs.clear()

        def fwd_whole_of(i):  # rank 0's copy of activation i (names order)
            return fwd_bufs[i]

        in_forward["fwd_floor_read"] = fwd_read
        fns["raw_plain"] = forward(raw_model, True)
        fns["fwd_floor_read"] = forward(raw_model, True, mode="fwd_floor_read",
                                        start=fwd_start, finish=fwd_finish)
        fns["fwd_floor_edit"] = raw_edit
    else:
        shard_dim = 2
        parts = [torch.empty(local_shape, device=device) for _ in range(world)]
        whole_shape = list(local_shape)
        whole_shape[batch_dim] *= dp
        whole_shape[shard_dim] *= tp
        whole = [torch.empty(whole_shape, device=device) for _ in mine]
        # On a GPU the retrieval floor ends in preallocated pinned host memory.
        host = [torch.empty(whole_shape, pin_memory=True) for _ in mine] \
            if device != "cpu" else whole

        def place(parts_, out):  # part of rank (d, t) -> rows d, columns t of the whole
            for r, part in enumerate(parts_):
                d, t = divmod(r, tp)
                w = local_shape[shard_dim]
                out.narrow(batch_dim, d * local_shape[batch_dim], local_shape[batch_dim]) \
                   .narrow(shard_dim, t * w, w).copy_(part)

        def floor_read():
            for p, out, h_out in zip(pieces, whole, host):
                dist.gather(p, parts if rank == 0 else None, dst=0)
                if rank == 0:
                    place(parts, out)
                    if h_out is not out:
                        h_out.copy_(out, non_blocking=True)

        def floor_edit():
            w = local_shape[shard_dim]
            for p, out in zip(pieces, whole):
                dist.all_gather(parts, p)
                place(parts, out)
                edited = _times_two(None, out, None, None)
                edited.narrow(batch_dim, dp_rank * local_shape[batch_dim],
                              local_shape[batch_dim]).narrow(shard_dim, tp_rank * w, w)

        def _region(out, r):  # the place of rank (d, t)'s piece: rows d, columns t
            d, t = divmod(r, tp)
            w = local_shape[shard_dim]
            return out.narrow(batch_dim, d * local_shape[batch_dim], local_shape[batch_dim]) \
                .narrow(shard_dim, t * w, w)

        def floor_read_p2p():  # the same bytes sent point to point (how FlexModel sends them)
            for p, out in zip(pieces, whole):
                if rank != 0:
                    dist.send(p, 0)
                    continue
                reqs = [dist.irecv(parts[r], r) for r in range(1, world)]
                _region(out, 0).copy_(p)
                for r, req in enumerate(reqs, 1):
                    req.wait()
                    _region(out, r).copy_(parts[r])

        fns["floor_read"] = floor_read
        fns["floor_edit"] = floor_edit
        second_floor = floor_read_p2p if device == "cpu" else None

        # In the forward: the same operations on the hooked module's live output on this rank
        # (raw torch hooks on the raw model), into their own preallocated whole tensors.
        fwd_whole = [torch.empty(whole_shape, device=device) for _ in mine]
        fwd_host = [torch.empty(whole_shape, pin_memory=True) for _ in mine] \
            if device != "cpu" else fwd_whole

        def fwd_read(i, output):
            y = output[0] if isinstance(output, tuple) else output
            dist.gather(y.contiguous(), parts if rank == 0 else None, dst=0)
            if rank == 0:
                place(parts, fwd_whole[i])
                if fwd_host[i] is not fwd_whole[i]:
                    fwd_host[i].copy_(fwd_whole[i], non_blocking=True)

        def fwd_edit(i, output):
            y = output[0] if isinstance(output, tuple) else output
            dist.all_gather(parts, y.contiguous())
            place(parts, fwd_whole[i])
            w = local_shape[shard_dim]
            edited = _times_two(None, fwd_whole[i], None, None) \
                .narrow(batch_dim, dp_rank * local_shape[batch_dim], local_shape[batch_dim]) \
                .narrow(shard_dim, tp_rank * w, w).contiguous()
            return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited

        def fwd_whole_of(i):  # rank 0's whole activation i (names order)
            return fwd_whole[i]

        in_forward.update(fwd_floor_read=fwd_read, fwd_floor_edit=fwd_edit)
        fns["raw_plain"] = forward(raw_model, True)
        fns["fwd_floor_read"] = forward(raw_model, True, mode="fwd_floor_read")
        fns["fwd_floor_edit"] = forward(raw_model, True, mode="fwd_floor_edit")

    def clock(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # -- correctness, then warm-up, then the rounds ---------------------------------------------
    def check_read(kind: str = "read"):
        got = stored[kind]
        if rank == 0:
            if layout == "pp2":
                ref = _reference_ups([(b.up.weight, b.up.bias, b.down.weight, b.down.bias)
                                      for b in whole_blocks], x_whole)
            else:
                weights = _full_weights(whole_blocks, tp_group)
                ref = _reference_ups(weights, x_whole)
            for name, want in zip(names, ref):
                assert len(got[name]) == 1, (name, len(got[name]))
                torch.testing.assert_close(got[name][0], want.cpu(), rtol=1e-5, atol=1e-5,
                                           msg=lambda m, n=name: f"{layout} {n}: {m}")
        elif layout != "pp2":
            _full_weights(whole_blocks, tp_group)  # the collective rank 0 runs
        got.clear()

    def check_edit(kind: str):
        want = raw_edit()
        out = fns[kind]()
        if out is not None and want is not None:
            assert torch.equal(out, want), f"{layout} {kind}: edited forward != raw x2 forward"

    def check_fwd_floor():
        """The in-forward floors hold what FlexModel holds for the same input: rank 0's
        gathered wholes equal the stored values, the edited output the FlexModel-edited one."""
        fns["read"]()
        fns["fwd_floor_read"]()
        if device != "cpu":
            torch.cuda.synchronize()
        if rank == 0:
            for i, name in enumerate(names):
                got = stored["read"][name][0]
                assert torch.equal(fwd_whole_of(i).to(got.device), got), \
                    f"{layout} in-forward floor {name}: gathered whole != FlexModel's stored value"
        stored["read"].clear()
        want, out = fns["edit"](), fns["fwd_floor_edit"]()
        if out is not None and want is not None:
            assert torch.equal(out, want), f"{layout}: in-forward edit floor != FlexModel edit"

    reads = ["read"] + (["read_overlap"] if overlap else [])
    drops = {kind: stored[kind].clear for kind in reads}
    with torch.no_grad():
        for kind in reads:
            fns[kind]()
            check_read(kind)
        for kind in kinds[1:]:
            check_edit(kind)
        check_fwd_floor()
        for _ in range(2):  # warm-up
            for fn in fns.values():
                fn()
            for drop in drops.values():
                drop()
        times = rounds(fns, reps, clock, after=drops, inner=inner)
        for kind in reads:  # what the rounds timed is still right at the end
            fns[kind]()
            check_read(kind)
        for kind in kinds[1:]:
            check_edit(kind)
        check_fwd_floor()
        direct = _direct_rounds(layout, flexes, kinds, mine, fns, stored["read"], check_read,
                                reps * 3, clock, inner, second_floor)
    for flex in flexes.values():
        flex.restore()
    if rank != 0:
        return None
    result = {"retrieval": overhead_ratio(times, "read", "plain", "floor_read"),
              "edit": overhead_ratio(times, "edit", "plain", "floor_edit")}
    if replicate:
        result["edit_replicate"] = overhead_ratio(times, "edit_replicate", "plain",
                                                  "floor_edit")
    if overlap:
        result["retrieval_overlap"] = overhead_ratio(times, "read_overlap", "plain",
                                                     "floor_read")
    # In the forward over the in-forward floor: both differences of two forwards of a round
    # (FlexModel's with the plain one, the raw floor hooks' with the raw model's plain one)
    fwd_pairs = {"retrieval": "read", "edit": "edit", "edit_replicate": "edit_replicate",
                 "retrieval_overlap": "read_overlap"}
    for key, kind in fwd_pairs.items():
        if kind in times:
            floor = "fwd_floor_read" if kind.startswith("read") else "fwd_floor_edit"
            result[f"{key}_vs_fwd_floor"] = overhead_ratio(times, kind, "plain", floor,
                                                           "raw_plain")
    # the in-forward floor over the floor timed alone: what the forward adds to the floor itself
    result["fwd_floor_retrieval"] = overhead_ratio(times, "fwd_floor_read", "raw_plain",
                                                   "floor_read")
    result["fwd_floor_edit"] = overhead_ratio(times, "fwd_floor_edit", "raw_plain",
                                              "floor_edit")
    for kind in kinds:
        floor = "floor_read" if kind == "read" else "floor_edit"
        result[f"direct_{'retrieval' if kind == 'read' else kind}"] = ratio(direct, kind, floor)
    if "floor_read_p2p" in direct:
        key = "direct_retrieval_vs_snapshot" if layout == "pp2" else "direct_retrieval_vs_p2p"
        result[key] = ratio(direct, "read", "floor_read_p2p")
    result["plain_s"] = statistics.median(times["plain"])
    result["raw_plain_s"] = statistics.median(times["raw_plain"])
    result["hooks"] = BLOCKS
    return result


def _direct_rounds(layout, flexes, kinds, mine, fns, stored, check_read, reps, clock,
                   inner, second_floor=None) -> dict[str, list[float]]:
    """The hook calls alone: one forward records every hooked module's ``(module, args,
    output)``; each round then calls the registered FlexModel hooks of each kind on them (PP:
    then collects to rank 0), interleaved with the floors. Without the forward's own compute
    around them (tens of ms, varying with the machine's load), a hook's cost is measured to a
    fraction of a millisecond where a difference of two forwards is not."""
    recorded = {}
    modules = dict(flexes["read"].module.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, a, o, n=n: recorded.__setitem__(n, (m, a, o)), prepend=True) for n in mine]
    fns["plain"]()
    for h in handles:
        h.remove()
    fns["read"]()  # enables the read hooks again (plain disabled them); then drop its values
    stored.clear()

    def caller(kind):
        hooks = {hf.module_name: hf.torch_hook() for hf in flexes[kind].hook_functions
                 if hf.module_name in recorded}
        calls = [(hooks[n], recorded[n]) for n in mine]

        def run():
            out = [hook(m, a, o) for hook, (m, a, o) in calls]
            if layout == "pp2" and kind == "read":
                flexes["read"].sync_pipeline_outputs()
            return out
        return run

    direct = {kind: caller(kind) for kind in kinds}
    direct.update(floor_read=fns["floor_read"], floor_edit=fns["floor_edit"])
    if second_floor is not None:  # TP, DP x TP: point to point; PP: with stage 1's copies
        direct["floor_read_p2p"] = second_floor
    direct["read"]()
    check_read()  # the direct calls store the one-process value
    for kind in kinds[1:]:
        for got, n in zip(direct[kind](), mine):
            want = _double_output(None, None, recorded[n][2])
            want = want[0] if isinstance(want, tuple) else want
            got = got[0] if isinstance(got, tuple) else got
            assert torch.equal(got, want), f"{layout} direct {kind} {n}"
    times = rounds(direct, reps, clock, after={"read": stored.clear}, inner=inner)
    direct["read"]()
    check_read()
    return times


def _rank(layouts: list[str], reps: int, device: str = "cpu") -> dict | None:
    """Every layout of one world size, one after the other on the same ranks."""
    results = {}
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    for layout in layouts:
        if layout == "megatron":
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
            try:
                results[layout] = _measure(layout, reps, H, TOKENS, device)
            finally:
                parallel_state.destroy_model_parallel()
        elif layout in ("tp2", "dp2tp2"):
            from fairscale.nn.model_parallel import initialize as fs

            fs.initialize_model_parallel(2)
            try:
                results[layout] = _measure(layout, reps, H, TOKENS, device)
                if layout == "tp2":  # the fixed cost: a tiny activation, more rounds
                    results["fixed_cost"] = _measure(layout, reps * 3, 8, 4, device)
            finally:
                fs.destroy_model_parallel()
        else:
            results[layout] = _measure(layout, reps, H, TOKENS, device)
    return results if dist.get_rank() == 0 else None


def run_nccl(reps: int, check: bool) -> int:
    """TP=2 over NCCL on two GPUs (forked before this process touches CUDA)."""
    from flex_surgery.launch import fork_ranks

    runs = []
    for _ in range(REPETITIONS if check else 1):
        runs.append(fork_ranks(_rank, ["tp2", "megatron"], reps, "cuda", nprocs=2,
                               device=None, threads=None, timeout_s=900)[0])
        print("[2 GPUs, NCCL]")
        report(runs[-1])
    return _check(runs, ["tp2", "megatron"], "retrieval_overhead_nccl") if check else 0


def run_once(layouts: list[str], reps: int) -> dict:
    from flex_surgery.launch import fork_ranks

    results: dict = {}
    for world in sorted({WORLDS[name] for name in layouts}):
        group = [name for name in layouts if WORLDS[name] == world]
        results.update(fork_ranks(_rank, group, reps, nprocs=world, device="cpu", threads=1,
                                  timeout_s=900)[0])
    return results


def report(results: dict) -> None:
    floors = {"read": "dist.gather to rank 0 into preallocated buffers + copy into a "
                      "preallocated whole tensor (pp2: copy on rank 0 / send-recv to rank 0)",
              "edit": "dist.all_gather into preallocated buffers + copy into a preallocated "
                      "whole tensor + x2 + own slice "
                      "(pp2: x2 of the 8 activations, no communication)"}
    print(f"floors: retrieval = {floors['read']}")
    print(f"        edit      = {floors['edit']}")
    for layout, r in results.items():
        if layout == "fixed_cost":
            continue
        print(f"[{layout}] plain forward {r['plain_s'] * 1e3:.1f} ms; {r['hooks']} hooks")
        for kind in ("retrieval", "edit", "edit_replicate"):
            if kind in r:
                print(f"[{layout}]   {kind:15s} hook calls alone {fmt(r['direct_' + kind])}")
        if "direct_retrieval_vs_p2p" in r:
            print(f"[{layout}]   retrieval over the point-to-point floor (hook calls alone) "
                  f"{fmt(r['direct_retrieval_vs_p2p'])}")
        if "direct_retrieval_vs_snapshot" in r:
            print(f"[{layout}]   retrieval over the floor with stage 1's copies (hook calls "
                  f"alone) {fmt(r['direct_retrieval_vs_snapshot'])}")
        for kind in ("retrieval", "edit", "edit_replicate"):
            if kind in r:
                print(f"[{layout}]   {kind:15s} in the forward   {fmt(r[kind])}")
        if "retrieval_overlap" in r:
            print(f"[{layout}]   retrieval, overlap_retrieval=True, in the forward "
                  f"{fmt(r['retrieval_overlap'])} (goal <= 0.5x)")
        for kind in ("retrieval", "edit", "edit_replicate", "retrieval_overlap"):
            if f"{kind}_vs_fwd_floor" in r:
                print(f"[{layout}]   {kind:17s} in the forward over the in-forward floor "
                      f"{fmt(r[kind + '_vs_fwd_floor'])}")
        for kind in ("retrieval", "edit"):
            if f"fwd_floor_{kind}" in r:
                print(f"[{layout}]   in-forward {kind} floor over the floor alone "
                      f"{fmt(r['fwd_floor_' + kind])}")
        if "edit_replicate" not in r:
            print(f"[{layout}]   edit_replicate  not in this checkout (HookFunction has no "
                  f"replicate_edit)")
    if "fixed_cost" in results:
        r = results["fixed_cost"]
        for kind in ("retrieval", "edit", "edit_replicate"):
            if kind in r:
                k = r["direct_" + kind]
                print(f"[fixed cost, tp2 H=8 4 tokens] {kind:15s} "
                      f"{k['added_s'] / r['hooks'] * 1e6:7.1f} us per hook call "
                      f"(floor {k['floor_s'] / r['hooks'] * 1e6:6.1f} us; hook calls alone)")


def pin_malloc() -> None:
    """glibc keeps freed memory for reuse instead of returning it to the system (see the module
    docstring); called before the ranks fork, which inherit it."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and
            libc.mallopt(m_trim_threshold, 2 ** 31 - 1)):
        raise RuntimeError("mallopt refused the allocator settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10,
                        help="interleaved rounds per layout (each the fastest of 3)")
    parser.add_argument("--layouts", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--check", action="store_true",
                        help=f"{REPETITIONS} repetitions; fail if a ratio exceeds its target "
                             f"by more than 20 %%")
    parser.add_argument("--pin-malloc", action="store_true",
                        help="glibc keeps freed memory (mallopt before the ranks fork): no page "
                             "faults on fresh stored tensors, for the floors and FlexModel alike")
    args = parser.parse_args()
    if args.pin_malloc:
        pin_malloc()
    if args.device == "cuda":
        from retrieval_cuda import main as cuda_main

        sys.exit(cuda_main(reps=args.reps, check=args.check))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    runs = [run_once(args.layouts, args.reps) for _ in range(REPETITIONS if args.check else 1)]
    print("allocator: " + ("glibc pinned (mallopt M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD "
                           "2 GiB): freed memory reused" if args.pin_malloc else
                           "glibc defaults (fresh stored tensors page-fault; --pin-malloc)"))
    for i, results in enumerate(runs):
        if len(runs) > 1:
            print(f"--- repetition {i + 1} of {len(runs)}")
        report(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"runs": runs, "setup": dict(
        hidden=H, tokens=TOKENS, blocks=BLOCKS, reps=args.reps, backend="gloo",
        threads_per_rank=1, pinned_malloc=args.pin_malloc)}, indent=2) + "\n")
    print(f"-> {RESULTS}")
    if args.check:
        sys.exit(_check(runs, args.layouts, "retrieval_overhead"))


def _check(runs: list[dict], layouts: list[str], name: str) -> int:
    measured: dict[str, list[float]] = {}
    targets: dict[str, float] = {}
    for layout in layouts:
        # The edit target holds the default path (the editing function on the edit leader);
        # replicate_edit is printed beside it -- on CPU/gloo it costs more (docs/performance.md).
        for kind, target in TARGETS.items():
            measured[f"{layout}.{kind}"] = [r[layout]["direct_" + kind]["ratio"] for r in runs]
            targets[f"{layout}.{kind}"] = target
    return check_targets(name, measured, targets)

if __name__ == "__main__":
    main()
