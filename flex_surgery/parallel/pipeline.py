"""Pipeline parallelism for hooks: stage-to-stage traffic that fails fast, and collection.

Under pipeline parallelism each rank holds one *stage* of the model, so a hook on a module of
stage ``k`` fires on the ranks of stage ``k`` only. Three things follow, and this module holds
them:

1. **Collection.** The hook's value is stored on the stage's leader (its dp == tp == 0 rank),
   but ``output_dict`` is read on global rank 0. Rank 0 cannot wait for later stages inside its
   own forward (a hand-split pipeline would deadlock: stage 1 has not run yet), so collection
   is a separate step that every rank calls after the pipeline step:
   :func:`collect_stage_outputs` (``FlexModel.sync_pipeline_outputs``). Each stage leader
   *moves* its entries to rank 0 (they are removed where they were), so ``output_dict`` on rank
   0 then holds, per key, one tensor per hook call, micro-batch by micro-batch in the order the
   stage ran them -- exactly the list one process running the micro-batches in turn would hold.
   ``torch.cat(output_dict[key])`` gives the whole batch. A stage leader without an
   ``output_dict`` stages its values for rank 0 only if rank 0 keeps them (agreed when the
   FlexModel is built, :func:`exchange_stage_facts`): an editing-only FlexModel copies and
   keeps nothing anywhere.

2. **Metadata inference is not a hook call.** ``torch.distributed.pipelining``'s
   ``PipelineStage`` (built without ``input_args``/``output_args``) runs an extra forward, and
   for training an extra backward, on its first step to learn the shapes it will send. Those
   passes must neither be stored nor run editing functions. :func:`skip_metadata_inference`
   marks them: it wraps the stage's ``_prepare_forward_infra`` / ``_prepare_backward_infra`` (the
   two methods the schedules call for inference in recent torch, and ``_shape_inference`` in
   older versions, which ran it on ``meta`` tensors) in :func:`metadata_inference`, a
   process-wide flag that hooks check (:func:`is_metadata_pass`; a process-wide counter rather
   than a thread-local, because CUDA backward runs on autograd's device threads). A hook also
   ignores ``meta`` tensors, which carry no values at all. Stages from ``pipeline(...)``
   ``.build_stage`` know their shapes from tracing and run no such pass.

3. **A failure must not hang the other stages.** If an editing function fails on stage 1,
   every rank of stage 1 raises at once (the runtime broadcasts the status over the stage). The
   other stages are then waiting in a receive (or a send: gloo's send waits for the matching
   receive) that will never complete. :class:`StageLink` carries the stage-to-stage traffic on
   its own process groups (one per pipeline line, with their own timeout) and a failure flag in
   the default store: inside :meth:`StageLink.step`, a rank that raises sets the flag; its own
   sends and receives (hand-split stages) poll the flag while they wait and raise
   :class:`PipelineStageError` within milliseconds. ``torch.distributed.pipelining`` schedules
   wait inside torch, where nothing can be polled: give the stage ``group=link.group`` and the
   waiting ranks raise when the link's timeout expires (``timeout_s``), naming the failed
   stage. Either way the link is spent afterwards (its groups may hold half-finished
   operations): build a new one for the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flex_surgery.parallel.backend import default_device
from flex_surgery.parallel.mesh import ParallelMesh

# Public names of this module whose code lives in its own file (import paths stay as they were).
from flex_surgery.parallel.pipeline_metadata import (
    in_metadata_inference,
    is_metadata_pass,
    metadata_inference,
    skip_metadata_inference,
)
from flex_surgery.parallel.stage_link import PipelineStageError, StageLink

__all__ = [
    "PipelineStageError",
    "StageFacts",
    "StageLink",
    "blocking_line",
    "collect_stage_outputs",
    "exchange_stage_facts",
    "in_metadata_inference",
    "is_metadata_pass",
    "metadata_inference",
    "names_on_other_stages",
    "skip_metadata_inference",
]


def collect_stage_outputs(output_dict: dict[str, list[torch.Tensor]] | None,
                          mesh: ParallelMesh | None, store_on: str = "rank0",
                          link: StageLink | None = None) -> None:
    """Move what each stage's hooks stored to global rank 0 (every rank calls this).

    A no-op without pipelining (``mesh`` ``None`` or pp == 1). With ``store_on="rank0"`` the
    stage leaders send their entries (then drop them) to rank 0, stage by stage; rank 0 appends
    them to its lists. With ``store_on="replica_leaders"`` every replica leader's line does the
    same (its later stages' replica leaders send to its first stage's), so each first-stage
    replica leader ends up with its replica's rows of every stage. With ``store_on="all"``
    every rank of a pipeline line ends up with the entries of every stage. With a ``link`` the
    transfer fails fast if a stage has failed; without one it uses the mesh's ``pp`` group and
    blocking sends.
    """
    if mesh is None or mesh.pp_size == 1:
        return
    # A rank without an output_dict keeps nothing but still takes part (peers wait for it).
    kept = output_dict if output_dict is not None else {}
    if link is None:
        link = blocking_line(mesh)
    everywhere = store_on == "all"
    if not everywhere and not _on_collecting_line(mesh, store_on):
        return
    theirs: list[dict[str, list[torch.Tensor]]] = []
    if everywhere:  # each stage in turn sends its own entries to all the others
        # Only what this stage's hooks stored since the last collection: the dict also holds
        # what earlier collections brought from the other stages, and what this stage sent.
        mine = {key: fresh for key, values in kept.items()
                if (fresh := [v for v in values if not getattr(v, _COLLECTED, False)])}
        for stage in range(link.num_stages):
            if stage != link.stage:
                theirs.append(link.recv_object(stage))
                continue
            for peer in range(link.num_stages):
                if peer != stage:
                    link.send_object(mine, peer)
    elif link.is_first:
        theirs = [link.recv_object(stage) for stage in range(1, link.num_stages)]
    else:
        link.send_object(kept, 0)
        kept.clear()
    for entries in theirs:
        for key, values in entries.items():
            kept.setdefault(key, []).extend(values)
    if everywhere:
        for values in kept.values():
            for value in values:
                if isinstance(value, torch.Tensor):
                    setattr(value, _COLLECTED, True)


# Marks, under store_on="all", an entry a collection has already handled (sent, or received).
_COLLECTED = "_flex_surgery_collected"


def _on_collecting_line(mesh: ParallelMesh, store_on: str) -> bool:
    """Whether this rank's pipeline line stores, hence sends to (or collects on) its first
    stage: the stage leaders' line (dp == tp == 0) with ``store_on="rank0"``; with
    ``"replica_leaders"`` every replica leader's line (tp == 0), since each replica's leader
    stores that replica's rows on every stage, and its first-stage leader collects them."""
    if store_on == "replica_leaders":
        return mesh.rank("tp") == 0
    return mesh.is_stage_leader()


@dataclass(frozen=True)
class StageFacts:
    """What the ranks of one pipeline line told each other when the FlexModel was built.

    ``remote_names``: the module and parameter names of the line's other stages.
    ``keeps``: per stage of the line (its ``pp`` rank), whether that rank had somewhere to keep
    values (an ``output_dict`` or a ``store=``). ``stage``: this rank's stage. Empty without
    pipelining.
    """

    remote_names: frozenset[str] = frozenset()
    keeps: tuple[bool, ...] = ()
    stage: int = 0
    #: Per stage of the line, its module and parameter names (a name several stages hold is
    #: one each stage numbers alike, such as ``blocks.1`` of stages that count from 0).
    names_by_stage: tuple[frozenset[str], ...] = ()

    def staged_values_are_collected(self, mesh: ParallelMesh | None, store_on: str) -> bool:
        """Whether values this rank stages (it has no ``output_dict``) reach a rank that keeps
        them in :func:`collect_stage_outputs`, so staging is worth its copies and memory.

        With ``store_on="all"`` any other rank of the line may keep them; otherwise only the
        storing line sends (stage leaders; with ``"replica_leaders"`` replica leaders), to the
        line's first stage (global rank 0, or the replica's first-stage leader), which must
        keep. Built from
        what every rank of the line reported, so the ranks agree.
        """
        if not self.keeps or mesh is None:
            return False
        if store_on == "all":
            return any(k for stage, k in enumerate(self.keeps) if stage != self.stage)
        return _on_collecting_line(mesh, store_on) and self.keeps[0]

    def anyone_collects(self, store_on: str) -> bool:
        """Whether collection hands values to a rank of this line that keeps them (the line's
        first stage; with ``store_on="all"`` any rank). The same answer on every rank of the
        line, so all of them skip collection together when it is ``False``."""
        if not self.keeps:
            return False
        return any(self.keeps) if store_on == "all" else self.keeps[0]

    def is_collector(self, mesh: ParallelMesh | None, store_on: str) -> bool:
        """Whether this rank is one that :func:`collect_stage_outputs` hands other stages'
        values to (global rank 0; with ``"replica_leaders"`` each replica's first-stage leader;
        with ``store_on="all"`` every rank of the line)."""
        if not self.keeps or mesh is None:
            return False
        return store_on == "all" or (_on_collecting_line(mesh, store_on) and self.stage == 0)


def exchange_stage_facts(names: set[str], keeps: bool, mesh: ParallelMesh | None) -> StageFacts:
    """Tell the other stages of this rank's pipeline line its module and parameter names and
    whether it keeps values (one ``all_gather_object`` over the ``pp`` group; nothing without
    pipelining).

    With the names FlexModel lets every rank run the same registration code: a hook on a module
    of another stage is accepted and fires there, while a name no stage has is still an error.
    With ``keeps`` a stage leader without an ``output_dict`` stages its values only when the
    rank they are collected to keeps them: that is the collecting rank's own state, so it is
    agreed here, once, where a collective already runs.
    """
    if mesh is None or mesh.pp_size == 1:
        return StageFacts()
    group = mesh.group("pp")
    everyone: list[tuple[list[str], bool] | None] = [None] * mesh.pp_size
    dist.all_gather_object(everyone, (sorted(names), bool(keeps)), group=group)
    remote = frozenset(n for entry in everyone for n in (entry[0] if entry else ())) - names
    # The index in the gather is the rank in the pp group, which is what StageLink calls the
    # stage (collection sends to the group's first rank).
    return StageFacts(remote, tuple(bool(entry and entry[1]) for entry in everyone),
                      dist.get_rank(group),
                      tuple(frozenset(entry[0]) if entry else frozenset() for entry in everyone))


def names_on_other_stages(names: set[str], mesh: ParallelMesh | None) -> frozenset[str]:
    """The module and parameter names that live on the other pipeline stages of this rank's
    pipeline line (see :func:`exchange_stage_facts`; empty without pipelining)."""
    return exchange_stage_facts(names, False, mesh).remote_names


def blocking_line(mesh: ParallelMesh) -> StageLink:
    """What :func:`collect_stage_outputs` uses without a link: the mesh's ``pp`` group, blocking
    waits. Keep one across steps (``FlexModel`` does): like a :class:`StageLink`, it sizes an
    object's first message from the last one it carried (:meth:`StageLink.send_object`)."""
    return _BlockingLine(mesh)


class _BlockingLine(StageLink):
    """A :class:`StageLink` over the mesh's own ``pp`` group, waiting without a failure flag
    (what collection uses when the caller has no link)."""

    def __init__(self, mesh: ParallelMesh) -> None:  # no collective: reuses the mesh groups
        self.mesh = mesh
        self.device = default_device()
        self.group = mesh.group("pp")
        self.ranks = dist.get_process_group_ranks(self.group)
        self._first_bytes: dict[tuple[str, int], int] = {}

    def failure(self) -> str | None:
        return None

    def close(self) -> None:  # the mesh's groups are the mesh owner's to free
        return None

    def _run(self, transfer: Callable[[], Any], what: str) -> Any:
        return transfer()
