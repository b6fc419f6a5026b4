"""How close any collection protocol can come to the PP retrieval floor, on this machine.

``retrieval_overhead.py`` holds PP=2 retrieval to a floor in which rank 0 posts the receives of
stage 1's activations *before* it copies stage 0's, into *preallocated* buffers. A FlexModel
cannot do either: a stored value belongs to the user (fresh memory, kept after the forward), and
rank 0 learns the shapes of stage 1's values only when stage 1 has run and tells it. This
script times, with raw torch (the last variant: FlexModel's own link), the same bytes as that
benchmark's PP=2 layout -- 4 activations of 256 x 2048 fp32 per stage, stage 1 on rank 1,
stored on rank 0 -- moved these ways, interleaved, each over the floor:

* ``floor``: receives posted first, into preallocated buffers; rank 0's own copies into
  preallocated buffers while stage 1's bytes arrive (``retrieval_overhead.py``'s PP floor);
* ``posted_first_fresh``: the same order into fresh memory (``clone`` / ``torch.empty``): the
  best a protocol that knew stage 1's shapes before the stage could do with values the user owns;
* ``after_stage_preallocated``: the order FlexModel's collection has (rank 0's copies, then one
  structure message from stage 1, then the receives), into preallocated buffers;
* ``after_stage_fresh``: that order into fresh memory -- the shape of FlexModel's protocol;
* ``streamed_thread``: values streamed as stage 1's hooks fire, each behind a small header
  with its shape, received by a thread that rank 0 starts before its own copies (into fresh
  memory; an end header closes the stream): what streaming costs without a shape plan;
* ``stage_link_objects``: FlexModel's own collection code in that order -- each stage clones
  its values, stage 1 sends them as one object (``StageLink.send_object`` over the blocking
  line ``sync_pipeline_outputs`` uses), rank 0 receives it (``recv_object``) -- so the
  difference to ``after_stage_fresh`` is what the implementation adds to the protocol.

Then all of them again after ``mallopt`` keeps freed memory for reuse (``--pin-malloc`` of
``retrieval_overhead.py``, set in the parent before the ranks fork): the difference between the
two runs is what page faults on fresh memory cost. What was timed is checked first: every
variant's received and copied tensors equal what was sent (``torch.equal``).

    python benchmarks/pp_collection_bounds.py [--reps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import ratio, rounds  # noqa: E402
from retrieval_overhead import pin_malloc  # noqa: E402

SHAPE, PER_STAGE = (1, 256, 2048), 4
RESULTS = Path(__file__).resolve().parent.parent / "results" / "pp_collection_bounds.json"
VARIANTS = ("floor", "posted_first_fresh", "after_stage_preallocated", "after_stage_fresh",
            "streamed_thread", "stage_link_objects")
STREAM_TAG = 7


def _rank(reps: int) -> dict:
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1 + rank)
    pieces = [torch.randn(SHAPE, generator=gen) for _ in range(PER_STAGE)]
    bufs = [torch.empty(SHAPE) for _ in range(2 * PER_STAGE)]
    header = torch.zeros(16, dtype=torch.int64)  # stage 1's structure message

    def posted_first(fresh: bool) -> list[torch.Tensor]:
        if rank == 0:
            got = [torch.empty(SHAPE) for _ in range(PER_STAGE)] if fresh else bufs[PER_STAGE:]
            works = [dist.irecv(t, 1) for t in got]
            mine = [p.clone() for p in pieces] if fresh else \
                [b.copy_(p) for b, p in zip(bufs, pieces)]
            for work in works:
                work.wait()
            return mine + got
        sent = [p.clone() for p in pieces] if fresh else pieces  # a stage's hook copies
        for work in [dist.isend(t, 0) for t in sent]:
            work.wait()
        return sent

    def after_stage(fresh: bool) -> list[torch.Tensor]:
        if rank == 0:
            mine = [p.clone() for p in pieces] if fresh else \
                [b.copy_(p) for b, p in zip(bufs, pieces)]
            dist.recv(header, 1)  # what stage 1 holds, before anything can be posted
            got = [torch.empty(SHAPE) for _ in range(PER_STAGE)] if fresh else bufs[PER_STAGE:]
            for work in [dist.irecv(t, 1) for t in got]:
                work.wait()
            return mine + got
        sent = [p.clone() for p in pieces] if fresh else pieces
        for work in [dist.isend(t, 0) for t in (header, *sent)]:
            work.wait()
        return sent

    def streamed() -> list[torch.Tensor]:
        if rank == 0:
            got: list[torch.Tensor] = []

            def receive() -> None:
                while True:
                    shape = torch.empty(len(SHAPE), dtype=torch.int64)
                    dist.recv(shape, 1, tag=STREAM_TAG)
                    if int(shape[0]) < 0:  # the end of the stream
                        return
                    got.append(torch.empty(shape.tolist()))
                    dist.recv(got[-1], 1, tag=STREAM_TAG)

            thread = threading.Thread(target=receive)
            thread.start()
            mine = [p.clone() for p in pieces]
            thread.join()
            return mine + got
        works, sent = [], []
        for p in pieces:  # each hook: copy, then header and value on their way
            sent.append(p.clone())
            works += [dist.isend(torch.tensor(SHAPE), 0, tag=STREAM_TAG),
                      dist.isend(sent[-1], 0, tag=STREAM_TAG)]
        works.append(dist.isend(torch.full((len(SHAPE),), -1), 0, tag=STREAM_TAG))
        for work in works:
            work.wait()
        return sent

    from flex_surgery.parallel.mesh import ParallelMesh
    from flex_surgery.parallel.pipeline import blocking_line

    line = blocking_line(ParallelMesh.build(pp=2))  # kept across rounds, as FlexModel does

    def stage_link_objects() -> list[torch.Tensor]:
        mine = [p.clone() for p in pieces]
        if rank == 0:
            got = line.recv_object(1)
            return mine + [v for values in got.values() for v in values]
        line.send_object({f"blocks.{4 + i}.up": [t] for i, t in enumerate(mine)}, 0)
        return mine

    fns = {"floor": lambda: posted_first(False),
           "posted_first_fresh": lambda: posted_first(True),
           "after_stage_preallocated": lambda: after_stage(False),
           "after_stage_fresh": lambda: after_stage(True),
           "streamed_thread": streamed,
           "stage_link_objects": stage_link_objects}
    theirs = [torch.empty(SHAPE) for _ in range(PER_STAGE)]
    if rank == 0:
        for t in theirs:
            dist.recv(t, 1)
    else:
        for p in pieces:
            dist.send(p, 0)
    for name, fn in fns.items():  # what is timed moves the right bytes to the right place
        moved = fn()
        if rank == 0:
            for got, want in zip(moved, pieces + theirs):
                assert torch.equal(got, want), f"{name}: rank 0 holds other bytes than sent"

    def clock(fn) -> float:
        import time

        dist.barrier()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    times = rounds(fns, reps, clock, inner=3)
    return {name: ratio(times, name, "floor") for name in VARIANTS[1:]}


def measure(reps: int) -> dict:
    from flex_surgery.launch import fork_ranks

    return fork_ranks(_rank, reps, nprocs=2, device="cpu", threads=1, timeout_s=600)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40,
                        help="interleaved rounds (each the fastest of 3)")
    args = parser.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    results = {"glibc_defaults": measure(args.reps)}
    pin_malloc()  # inherited by the ranks forked next
    results["pinned_malloc"] = measure(args.reps)
    print("PP=2 collection, 4 x 2 MiB per stage to rank 0, over the floor (receives posted "
          "first, preallocated):")
    for allocator, found in results.items():
        for name, r in found.items():
            print(f"  [{allocator:14s}] {name:25s} {r['ratio']:.2f}x (per-round 25..75%: "
                  f"{r['q25']:.2f}..{r['q75']:.2f}; fastest/fastest {r['best']:.2f}x; "
                  f"{r['added_s'] * 1e3:.2f} ms, floor {r['floor_s'] * 1e3:.2f} ms)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"results": results, "setup": dict(
        shape=SHAPE, per_stage=PER_STAGE, reps=args.reps, backend="gloo",
        threads_per_rank=1)}, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
