"""What a hook call hands to a store: the (reduced) tensor and where it sits in the dataset.

Kept apart from :mod:`flex_surgery.hooks` so the hook path only learns of stores through one
function, :func:`store_call`.

A store that fails inside a hook does not raise there. The storing rank is in the middle of a
forward (or backward) whose collectives the other ranks are already waiting in: raising on that
rank alone would leave them waiting until the group's timeout. :func:`store_call` keeps the
first failure on the :class:`StoreBinding` and stores nothing more; :func:`agree_on_store`
raises it on every rank of the run at a point they all reach (the end of each FlexModel
forward, of ``sync_pipeline_outputs``, and ``FlexModel.check_store()``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from flex_surgery.store.base import StoreError, WriteMeta
from flex_surgery.store.reduce import apply_reduce


@dataclass(frozen=True)
class Rows:
    """The rows of the global batch a stored tensor holds (a data-parallel replica's slice)."""

    dim: int
    start: int
    stop: int
    total: int


@dataclass
class StoreBinding:
    """A FlexModel's store and the per-name step counters of this process."""

    store: Any
    writer: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    #: The first ``put`` that raised since the last :func:`agree_on_store`: (name, error).
    failure: tuple[str, Exception] | None = None
    #: The first step of each name the store already holds (``store.next_steps()``, the same
    #: on every rank: agreed by :func:`bind_store`); ``None`` for a store without it.
    first_steps: dict[str, int] | None = None

    def next_step(self, name: str) -> int:
        step = self.steps.get(name)
        if step is None:  # a reopened store continues after the steps it holds
            if self.first_steps is not None:
                step = self.first_steps.get(name, 0)
            else:  # a store of another kind: its own answer, if it has one
                step = self.store.next_step(name) if hasattr(self.store, "next_step") else 0
        self.steps[name] = step + 1
        return step


def store_call(binding: StoreBinding, name: str, full: torch.Tensor | Exception, reduce: Any,
               batch_dim: int, rows: Rows | None) -> None:
    """Hand one hook call's tensor to the store, reduced first when ``reduce`` is given.

    ``rows`` is ``None`` for the whole tensor; a replica's slice otherwise. A mean over the
    batch of a slice is stored as its sum and row count, which :func:`merge_pieces` adds up
    over replicas on read, so it equals the mean one process computes over the whole batch
    (up to float summation order; see ``docs/store.md``).

    ``full`` may instead be the exception that producing it raised (a reduction the hook ran
    on the device before handing over its result): it is a failure of this call like a
    ``put`` that raised.

    Never raises: a failure (of the reduction or of the store) is kept on ``binding`` (nothing
    more is stored until it has been raised) for :func:`agree_on_store` to raise on every rank.
    A call that stores nothing still takes its step, so a store that works again numbers each
    call as if none had failed.
    """
    step = binding.next_step(name)
    if binding.failure is not None:
        return
    try:
        if isinstance(full, Exception):
            raise full
        _put(binding, name, step, full, reduce, batch_dim, rows)
    except Exception as error:  # raised on every rank at the next agreement point
        binding.failure = (name, error)


def host_copies_landed(full: torch.Tensor) -> None:
    """Wait until device-to-host copies in flight have landed, before ``full`` (a host copy a
    hook made with ``store_copy``, which does not wait for the bytes) is *read* on the host:
    a reduction of it would otherwise read memory the copy has not filled yet."""
    if full.device.type == "cpu" and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _put(binding: StoreBinding, name: str, step: int, full: torch.Tensor, reduce: Any,
         batch_dim: int, rows: Rows | None) -> None:
    start, stop, total = (0, -1, -1) if rows is None else (rows.start, rows.stop, rows.total)
    if rows is not None:  # the dim data parallelism split this tensor on
        batch_dim = rows.dim
    meta = WriteMeta(step=step, batch_start=start, batch_stop=stop, batch_dim=batch_dim,
                     writer=binding.writer, batch_total=total)
    if reduce is not None:
        host_copies_landed(full)
    if reduce is None:
        binding.store.put(name, full, meta)
    elif reduce == "mean_over_batch" and rows is not None:
        # One process's mean of a float16/bfloat16 tensor accumulates in float32 and rounds
        # once; a replica's sum rounded to the half type would lose bits the mean keeps (a bf16
        # sum of 4 rows of ~3 is off by a unit in the last place): the sum is kept in float32
        # and the mean given back in the tensor's dtype.
        wide = {torch.float16: torch.float32, torch.bfloat16: torch.float32}.get(
            full.dtype, full.dtype if full.is_floating_point() else torch.float64)
        total = full.to(wide).sum(dim=batch_dim, keepdim=True)
        count = torch.tensor(full.shape[batch_dim], dtype=torch.int64)
        as_dtype = str(full.dtype).removeprefix("torch.") if wide != full.dtype and \
            full.is_floating_point() else ""
        binding.store.put(name, total, WriteMeta(**{**meta.__dict__, "kind": "sum",
                                                    "mean_dtype": as_dtype}))
        binding.store.put(name, count, WriteMeta(**{**meta.__dict__, "kind": "count"}))
    else:
        binding.store.put(name, apply_reduce(reduce, full, batch_dim), meta)


def check_reduce(reduce: Any, store_on: str, has_store: bool, owner: object) -> None:
    """Refuse, at registration and on every rank, a reduction a replica's slice cannot give.

    With ``store_on="replica_leaders"`` each replica reduces only its own rows: a callable could
    compute anything, so it is refused; a mean over the batch is kept as sum and count, which
    only a store can combine on read (an ``output_dict`` would hold per-replica means).
    """
    if store_on != "replica_leaders" or reduce is None or reduce == "last_token":
        return
    if callable(reduce):
        raise ValueError(f"{owner!r}: a reduce callable sees only one replica's rows with "
                         "store_on='replica_leaders', which is not what one process computes; "
                         "use store_on='rank0', or reduce='mean_over_batch'/'last_token'")
    if not has_store:
        raise ValueError(f"{owner!r}: reduce='mean_over_batch' with store_on='replica_leaders' "
                         "needs store= (a store combines each replica's sum and count on read)")


def bind_store(store: Any, module: Any, runtime: Any, output_dict: Any,
               store_on: str) -> tuple[StoreBinding | None, bool]:
    """Check ``store`` against FlexModel's other arguments and attach it to this run.

    The run's fingerprint (model and mesh, :func:`model_fingerprint`) is recorded by the store,
    so a directory written by another model or mesh is refused before anything is written.
    Distributed, every rank calls it, with or without a store (a store on the storing ranks
    only is allowed), and the ranks agree on whether any refused, so all raise together; the
    runtime is then closed. Returns this rank's binding (``None`` without a store) and whether
    any rank of the run has a store (the same on every rank: it decides whether the ranks
    meet in :func:`agree_on_store`).
    """
    from flex_surgery.store.base import Store, model_fingerprint

    mesh = getattr(runtime, "mesh", None)
    failure: Exception | None = None
    # A store that lives in this process (MemoryStore) under replica_leaders with dp > 1: each
    # replica leader would keep its own rows where no other process can read them. Refused
    # on every rank alike (agreed below with the other refusals).
    local_only = store is not None and getattr(store, "process_local", False) and \
        store_on == "replica_leaders" and mesh is not None and mesh.dp_size > 1
    try:
        if store is not None and not local_only:
            if not isinstance(store, Store):
                raise TypeError(f"store must implement flex_surgery.store.Store (put, read, "
                                f"flush, close, attach, host_bytes), got {type(store).__name__}")
            if output_dict is not None:
                raise ValueError("give either output_dict or store, not both (pass None for "
                                 "output_dict)")
            if store_on == "all":
                raise ValueError("store= with store_on='all' would store every rank's copy of "
                                 "every tensor; use store_on='rank0' or 'replica_leaders'")
            sizes = {"tp": 1, "pp": 1, "dp": 1} if mesh is None else \
                {axis: mesh.size(axis) for axis in ("tp", "pp", "dp")}
            store.attach(model_fingerprint(module, sizes))
    except Exception as error:  # every rank learns of it below, then this rank re-raises
        failure = error
    # Under replica_leaders every replica leader (tp rank 0, on every stage) writes its own rows
    # with their place in the global batch: one without a store would drop them silently.
    lacks = store is None and store_on == "replica_leaders" and mesh is not None and \
        mesh.dp_size > 1 and mesh.rank("tp") == 0
    try:
        anyone_stores = _agree_on_failure(failure, mesh, has_store=store is not None,
                                          lacks=lacks, local_only=local_only)
        # After the agreement above (every store attached, so flushed), before any hook runs:
        # every rank reads the steps already stored, all at the same point.
        first_steps = _agree_on_first_steps(store, mesh) if anyone_stores else None
    except BaseException:
        runtime.close()
        raise
    if store is None:
        return None, anyone_stores
    import torch.distributed as dist
    writer = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return StoreBinding(store, writer=writer, first_steps=first_steps), anyone_stores


def _agree_on_first_steps(store: Any, mesh: Any) -> dict[str, int] | None:
    """The first step of each name in ``store`` (``store.next_steps()``: after every step any
    writer stored), checked to be the same on every rank whose store is shared.

    A reopened ``DiskStore`` continues after the steps of *every* writer in its directory, so
    a writer that wrote nothing before (a replica leader of a ``store_on="rank0"`` run) does not
    number its first call 0 and merge it with another call. Ranks that see different contents
    (different directories, a file system that shows one rank a stale index) would number
    alike calls differently: every rank raises instead. One all-reduce of three integers over
    the run, when the run is built.
    """
    steps, failure = None, None
    if store is not None and hasattr(store, "next_steps"):
        try:
            steps = {str(k): int(v) for k, v in store.next_steps().items()}
        except Exception as error:  # every rank learns of it below
            failure = StoreError(f"cannot read the steps stored so far: {error}")
            failure.__cause__ = error
    if mesh is None:
        if failure is not None:
            raise failure
        return steps
    digest = -1  # this rank's store is not shared, or has no steps to agree on
    if steps is not None and not getattr(store, "process_local", False):
        text = json.dumps(sorted(steps.items()))
        digest = int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)  # < 2**60
    flag = torch.tensor([int(failure is not None), digest,
                         -digest if digest >= 0 else -(1 << 62)], dtype=torch.int64)
    failed, high, low = (int(v) for v in _max_over_run(flag, mesh).tolist())
    if failure is not None:
        raise failure
    if failed:
        raise StoreError("another rank could not read the steps its store holds (its error "
                         "says why); nothing was written")
    if high >= 0 and high != -low:
        raise StoreError(
            "the ranks' stores hold different steps (their directories differ, or a rank sees "
            "an older index of the same directory): each rank would number the same call "
            "differently. Give every rank a DiskStore on the same shared directory (or a new, "
            "empty one); nothing was written")
    return steps


def agree_on_store(binding: StoreBinding | None, mesh: Any, whole_run: bool) -> None:
    """Raise :class:`StoreError` on every rank if a store failed on any since the last call.

    Every rank calls it at the same point: over this stage's ranks at the end of a forward
    without pipelining (``whole_run=False``; there the stage is the run), over every rank of
    the run otherwise (``sync_pipeline_outputs``, ``FlexModel.check_store``). One all-reduce
    of one integer. A failed ``put`` is cleared once raised; a store that reports an
    ``error`` (a ``DiskStore`` whose background write failed stays failed) raises at every
    agreement.
    """
    failure = None
    if binding is not None:
        failure, binding.failure = binding.failure, None
        broken = getattr(binding.store, "error", None)  # a DiskStore's failed background write
        if failure is None and broken is not None:
            failure = ("a buffer written in the background", broken)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    failed = 0 if failure is None else rank + 1
    if mesh is not None:
        flag = torch.tensor([failed], dtype=torch.int64)
        failed = int(_max_over_run(flag, mesh, whole_run)[0])
    if failure is not None:
        name, error = failure
        raise StoreError(f"rank {rank}: storing {name!r} failed: {type(error).__name__}: "
                         f"{error}; nothing more was stored until now (every rank of the run "
                         f"raises this)") from error
    if failed:
        raise StoreError(f"rank {rank}: the store of rank {failed - 1} (at least) failed; its "
                         "own error says why, and every rank of the run raises this")


def _max_over_run(flag: torch.Tensor, mesh: Any, whole_run: bool = True) -> torch.Tensor:
    """``flag``'s element-wise maximum over this stage's ranks, and with ``whole_run`` over
    every stage too (a CPU tensor in and out; on the backend's device in between)."""
    import torch.distributed as dist

    from flex_surgery.parallel.backend import default_device

    if mesh.world_size == 1:  # a run of one rank: nobody to agree with
        return flag
    on = flag.to(default_device())
    dist.all_reduce(on, op=dist.ReduceOp.MAX, group=mesh.stage_group)
    if whole_run and mesh.pp_size > 1:  # stage, then pipeline: the maximum over every rank
        dist.all_reduce(on, op=dist.ReduceOp.MAX, group=mesh.group("pp"))
    return on.cpu()


def _agree_on_failure(failure: Exception | None, mesh: Any, has_store: bool = False,
                      lacks: bool = False, local_only: bool = False) -> bool:
    """Raise on every rank if the store refused the run on any: one writer may find a directory
    of another run where the others find nothing, and a rank that went on alone would wait
    forever in the first hook's collective. Also raise everywhere if some rank has a store
    while a rank that must write (``lacks``: a replica leader under ``replica_leaders``) has
    none: its rows would be missing from the store without a word, or has a store that lives in
    its own process only (``local_only``: a MemoryStore), where the other replicas' rows are
    not. Returns whether any rank of the run has a store."""
    if mesh is None:
        if failure is not None:
            raise failure
        return has_store
    import torch.distributed as dist

    flag = torch.tensor([0 if failure is None else 1, int(has_store),
                         dist.get_rank() + 1 if lacks else 0,
                         dist.get_rank() + 1 if local_only else 0], dtype=torch.int64)
    flag = _max_over_run(flag, mesh)
    if failure is not None:
        raise failure
    failed, anyone_stores, lacking, in_process = (int(v) for v in flag.tolist())
    if failed:
        raise StoreError("another rank's store refused this run (its error says why); nothing "
                         "was written")
    if in_process:
        raise ValueError(
            f"store_on='replica_leaders' with {mesh.dp_size} data-parallel replicas: each "
            f"replica leader stores its own rows, but rank {in_process - 1} (at least) has a "
            "store that keeps them in its own process (a MemoryStore), so no store would hold "
            "the whole batch. Use a DiskStore on a directory every rank shares, or "
            "store_on='rank0' (which gathers every replica's rows to the stage leader)")
    if anyone_stores and lacking:
        raise ValueError(f"store_on='replica_leaders': every replica leader (tensor-parallel "
                         f"rank 0 of each data-parallel replica, on every pipeline stage) "
                         f"writes its own rows, but rank {lacking - 1} (at least) has no "
                         "store, so its rows would be missing; give every rank a store (e.g. "
                         "DiskStore on a shared directory) or use store_on='rank0'")
    return bool(anyone_stores)
