"""StageLink: stage-to-stage traffic that fails fast (see :mod:`flex_surgery.parallel.pipeline`,
point 3).

If an editing function fails on stage 1, every rank of stage 1 raises at once, while the other
stages wait in a receive (or a send: gloo's send waits for the matching receive) that would
never complete. A :class:`StageLink` carries the traffic on its own process groups (one per
pipeline line, with their own timeout) plus a failure flag in the default store, so the
waiting ranks raise :class:`PipelineStageError` instead of hanging. Its groups are owned and
freed through :mod:`flex_surgery.parallel.group_lifetime`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import pickle
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from flex_surgery.parallel.backend import default_device
from flex_surgery.parallel.collectives import announce_process
from flex_surgery.parallel.group_lifetime import OwnedGroups, free_dropped
from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["PipelineStageError", "StageLink"]

class PipelineStageError(RuntimeError):
    """A pipeline stage failed (or timed out); raised on the ranks that were waiting on it."""


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.uint8, torch.bool)
_HEADER = 10  # dtype code, ndim, up to 8 dims
_FIRST_MIN = 512  # bytes of an object's first message (its structure's length and start)...


def _first_bytes_for(length: int) -> int:
    """...or the power of two that holds a structure of ``length`` bytes, once one was seen."""
    return max(_FIRST_MIN, 1 << (length + 8 - 1).bit_length())


def _flag_is_set(store: dist.Store, key: str) -> bool:
    """Whether a failure was reported under ``key`` (an unreachable store counts as one)."""
    try:
        return store.check([key])
    except RuntimeError:
        return True


class StageLink:
    """Send and receive between neighbouring pipeline stages without hanging on a failure.

    Args:
        mesh: this rank's groups; the link runs along its ``pp`` axis (one *line* of stages per
            dp x tp coordinate, e.g. ranks (0, 2) and (1, 3) for tp = pp = 2).
        timeout_s: how long any one send/receive of this link may wait, and the timeout of
            its process groups (what bounds a wait inside a ``torch.distributed.pipelining``
            schedule given ``group=link.group``).
        device: where headers and received tensors live (default: this rank's device).

    Collective over the whole world (it creates the line groups): every rank builds its link
    at the same point. Tensors travel with a header (dtype and shape), so the receiver needs
    no shapes in advance.

    :meth:`close` (or leaving ``with StageLink(mesh) as link:``, or dropping the link) queues
    the line groups; they are destroyed once every rank has let go of the link, at the next
    ``StageLink`` or ``FlexModel`` built over the world (or an explicit
    :func:`~flex_surgery.parallel.group_lifetime.free_dropped`), where the ranks agree on it
    (see :mod:`flex_surgery.parallel.group_lifetime`).
    """

    def __init__(self, mesh: ParallelMesh, timeout_s: float = 60.0,
                 device: torch.device | str | None = None) -> None:
        self.mesh = mesh
        self.timeout_s = timeout_s
        self.device = torch.device(device) if device is not None else default_device()
        free_dropped(None)  # a collective point over the world: free links dropped earlier
        announce_process()
        pp_group = mesh.group("pp")
        mine = (dist.get_process_group_ranks(pp_group) if pp_group is not None
                else [dist.get_rank()])
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (mine, uuid.uuid4().hex if dist.get_rank() == 0
                                          else None))
        self._key = f"flex_surgery/stage_link/{gathered[0][1]}/failed"
        self.ranks: list[int] = mine
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group: dist.ProcessGroup | None = None
        for line in sorted({tuple(lr) for lr, _ in gathered}):
            group = dist.new_group(list(line), timeout=timeout)
            if list(line) == mine:
                self.group = group
        self._store = dist.distributed_c10d._get_default_store()
        self._first_bytes: dict[tuple[str, int], int] = {}  # see send_object
        # Given the store and the key, not the link: the owner outlives the link in the queue.
        self._owned = OwnedGroups([self.group], None,
                                  spent=functools.partial(_flag_is_set, self._store, self._key))
        self._finalizer = weakref.finalize(self, self._owned.drop)

    def close(self) -> None:
        """Let go of the link: its process groups are queued, with no collective, and destroyed
        at the next collective point over the world (a ``StageLink`` or ``FlexModel`` built
        on every rank, or :func:`~flex_surgery.parallel.group_lifetime.free_dropped`) once
        every rank has let go. A second call is fine; the link cannot be used afterwards.

        ``close`` decides nothing from this rank's own view: whether the link failed is read
        at its own moment on each rank, and a peer stage may fail just after this rank found no
        failure, so a barrier here could wait for a rank that never comes. The ranks agree at
        the collective point instead; a link that any rank found failed keeps its groups (a
        rank's abandoned transfer may still wait on them, see :meth:`_run`, and tearing a
        group down under a waiting operation can block until its timeout): they go with the
        process.
        """
        self._finalizer()  # OwnedGroups.drop, once

    def __enter__(self) -> StageLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # no collective: also right when an exception on this rank alone ends it

    # -- where this rank is ------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return self.ranks.index(dist.get_rank())

    @property
    def num_stages(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    # -- failure -----------------------------------------------------------------------------
    def _reported(self) -> tuple[int, str] | None:
        """``(stage, reason)`` of the failure some rank reported on this link, or ``None``."""
        if not self._store.check([self._key]):
            return None
        stage, _, reason = self._store.get(self._key).decode(errors="replace").partition("\n")
        return int(stage), reason

    def failure(self) -> str | None:
        """The failure some rank reported on this link, or ``None``."""
        reported = self._reported()
        return None if reported is None else reported[1]

    def fail(self, reason: str) -> None:
        """Report a failure of this rank's stage to every rank of the link (their waits
        raise)."""
        self._store.set(self._key, f"{self.stage}\n{reason}")

    @contextlib.contextmanager
    def step(self) -> Iterator[StageLink]:
        """Run one pipeline step: an exception raised inside is reported to every rank.

        Waits of other ranks on this link then raise :class:`PipelineStageError` naming this
        rank's error. An error raised here after *another* stage failed (a timeout inside a
        pipelining schedule that waited on it) is re-raised as :class:`PipelineStageError`
        naming that stage's failure; the ranks of the failed stage keep their own errors.
        """
        earlier = self.failure()
        if earlier is not None:
            raise PipelineStageError(f"this StageLink is spent (an earlier step failed: "
                                     f"{earlier}); build a new one")
        try:
            yield self
        except PipelineStageError:
            raise
        except BaseException as exc:
            reported = self._reported()
            if reported is not None and reported[0] != self.stage:  # we waited on a failed stage
                raise PipelineStageError(f"rank {dist.get_rank()} (stage {self.stage}) gave up "
                                         f"waiting: {reported[1]}") from exc
            if reported is None:
                self.fail(f"stage {self.stage} (rank {dist.get_rank()}) failed: "
                          f"{_describe(exc)}")
            raise

    def _run(self, transfer: Callable[[], Any], what: str) -> Any:
        """Run the blocking ``transfer`` while watching the failure flag and the timeout.

        gloo's send/recv ``Work`` neither reports completion before ``wait()`` nor survives a
        timed ``wait``, so the transfer waits on a daemon thread and this rank polls. On a
        failure the thread is left behind, blocked on the spent link's groups until their
        timeout.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                if self.device.type == "cuda":  # the thread's current device is NCCL's device
                    torch.cuda.set_device(self.device)
                box["value"] = transfer()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=target, name="flex-stage-link", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout_s
        delay = 1e-5
        while True:
            thread.join(delay)
            if not thread.is_alive():
                break
            failure = self.failure()
            if failure is not None:
                raise PipelineStageError(f"rank {dist.get_rank()} (stage {self.stage}) stopped "
                                         f"waiting to {what}: {failure}")
            if time.monotonic() > deadline:
                self.fail(f"rank {dist.get_rank()} (stage {self.stage}) timed out after "
                          f"{self.timeout_s:g} s waiting to {what}")
                raise PipelineStageError(self.failure())
            delay = min(2 * delay, 2e-3)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # -- tensors -------------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, stage: int) -> None:
        """Send ``tensor`` (detached) to the rank of ``stage`` on this line."""
        t = tensor.detach().contiguous()
        if t.ndim > _HEADER - 2 or t.dtype not in _DTYPES:
            raise ValueError(f"StageLink sends tensors of at most {_HEADER - 2} dims with a "
                             f"dtype in {_DTYPES}; got {t.ndim} dims of {t.dtype}")
        header = torch.zeros(_HEADER, dtype=torch.int64, device=t.device)
        header[0], header[1] = _DTYPES.index(t.dtype), t.ndim
        header[2:2 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
        peer = self.ranks[stage]

        def transfer() -> None:
            dist.send(header, peer, group=self.group)
            dist.send(t, peer, group=self.group)

        self._run(transfer, f"send to stage {stage}")

    def recv(self, stage: int) -> torch.Tensor:
        """Receive the next tensor the rank of ``stage`` on this line sends."""
        peer = self.ranks[stage]

        def transfer() -> torch.Tensor:
            header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            dist.recv(header, peer, group=self.group)
            code, ndim = int(header[0]), int(header[1])
            shape = [int(s) for s in header[2:2 + ndim]]
            out = torch.empty(shape, dtype=_DTYPES[code], device=self.device)
            dist.recv(out, peer, group=self.group)
            return out

        return self._run(transfer, f"receive from stage {stage}")

    def send_forward(self, activation: torch.Tensor) -> None:
        """Send this stage's output to the next stage."""
        self.send(activation, self.stage + 1)

    def recv_forward(self, requires_grad: bool = False) -> torch.Tensor:
        """This stage's input from the previous stage (a leaf; ``requires_grad`` for training,
        so that :meth:`send_backward` can return its gradient)."""
        return self.recv(self.stage - 1).requires_grad_(requires_grad)

    def send_backward(self, input_grad: torch.Tensor) -> None:
        """Send the gradient of this stage's input back to the previous stage."""
        self.send(input_grad, self.stage - 1)

    def recv_backward(self) -> torch.Tensor:
        """The gradient of this stage's output, from the next stage."""
        return self.recv(self.stage + 1)

    # -- objects -------------------------------------------------------------------------------
    def send_object(self, obj: Any, stage: int) -> None:
        """Send ``obj`` (dicts and lists of tensors and plain values) to ``stage``.

        Only its structure is pickled (with each tensor's shape and dtype); the tensors then
        travel as themselves, all posted at once (``isend``), each received straight into its
        final memory. Pickling the tensors costs several copies of every byte on both sides,
        and packing them into one buffer a copy on each side (measured on the PP=2 retrieval
        benchmark: 6-9x its floor with either, 1.4-2.1x with the tensors sent as themselves).
        A tensor is copied only if it is not contiguous (or, over NCCL, not on the link's
        device).
        """
        tensors: list[torch.Tensor] = []

        def take(leaf: Any) -> Any:
            if not isinstance(leaf, torch.Tensor):
                return leaf
            tensors.append(leaf.detach())
            return _Slot(len(tensors) - 1, tuple(leaf.shape), leaf.dtype)

        skeleton = pickle.dumps(pytree.tree_map(take, obj))
        peer = self.ranks[stage]
        # The structure's length and its first bytes in one message, so that a usual object
        # costs one message before its tensors (each is a round trip while the receiver cannot
        # yet post the tensors' receives); the rest, if any, next. The receiver must know the
        # first message's size: both ends size it from the last object sent on this link
        # between them (the same history on both), starting at _FIRST_MIN. A fixed 16 KiB cost
        # about 0.1x of the PP=2 retrieval floor over a fitted size (pp_collection_bounds.py).
        size = self._first_bytes.get(("send", peer), _FIRST_MIN)
        self._first_bytes[("send", peer)] = _first_bytes_for(len(skeleton))
        first = bytearray(size)
        first[:8] = len(skeleton).to_bytes(8, "little")
        first[8:8 + len(skeleton)] = skeleton[:size - 8]
        parts = [torch.frombuffer(first, dtype=torch.uint8)]
        if len(skeleton) > size - 8:
            parts.append(torch.frombuffer(bytearray(skeleton[size - 8:]), dtype=torch.uint8))
        wire = [_as_bytes(t, self.device) for t in (*parts, *tensors)]

        def transfer() -> None:  # the whole object, one transfer: one wait, one poll loop
            works = [dist.isend(t, peer, group=self.group) for t in wire if t.numel()]
            for work in works:
                work.wait()

        self._run(transfer, f"send to stage {stage}")

    def recv_object(self, stage: int) -> Any:
        """Receive the next object the rank of ``stage`` on this line sends with
        :meth:`send_object`; its tensors are CPU tensors with their own memory."""
        peer = self.ranks[stage]
        size = self._first_bytes.get(("recv", peer), _FIRST_MIN)  # as the sender sizes it

        def transfer() -> Any:
            first = torch.empty(size, dtype=torch.uint8, device=self.device)
            dist.recv(first, peer, group=self.group)
            first = first.cpu().numpy().tobytes()
            length = int.from_bytes(first[:8], "little")
            self._first_bytes[("recv", peer)] = _first_bytes_for(length)
            data = first[8:8 + length]
            if length > size - 8:
                rest = torch.empty(length - (size - 8), dtype=torch.uint8, device=self.device)
                dist.recv(rest, peer, group=self.group)
                data += rest.cpu().numpy().tobytes()
            skeleton = pickle.loads(data)
            slots = sorted((leaf for leaf in pytree.tree_leaves(skeleton)
                            if isinstance(leaf, _Slot)), key=lambda slot: slot.index)
            # Each tensor's final memory, allocated before anything is posted.
            out = [torch.empty(slot.shape, dtype=slot.dtype, device=self.device)
                   for slot in slots]
            works = [dist.irecv(_byte_view(t), peer, group=self.group) for t in out
                     if t.numel()]
            for work in works:
                work.wait()
            if self.device.type != "cpu":  # stored values live on the host
                out = [t.cpu() for t in out]
            return pytree.tree_map(
                lambda leaf: out[leaf.index] if isinstance(leaf, _Slot) else leaf, skeleton)

        return self._run(transfer, f"receive from stage {stage}")


class _Slot:
    """A tensor of a sent object: its place in the sent order, its shape and its dtype."""

    def __init__(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.index, self.shape, self.dtype = index, shape, dtype


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous ``tensor`` as a flat uint8 view of its memory: every dtype,
    0-dim tensors included, travels as bytes."""
    return tensor.reshape(-1).view(torch.uint8)


def _as_bytes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What goes on the wire for ``tensor``: its own memory when it is contiguous and on
    ``device``, else a contiguous copy there. A conjugate or negative view (``z.conj()``) is
    its memory *plus* a bit that its bytes do not carry: it is materialised first (a no-op
    for every other tensor)."""
    tensor = tensor.resolve_conj().resolve_neg()
    if tensor.device != device:
        tensor = tensor.to(device)
    return _byte_view(tensor.contiguous())


def _describe(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` and of what caused it (a pipelining schedule wraps a
    stage's error in a ``RuntimeError`` that names the stage but not the error)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)
