"""Trainable modules used inside editing functions stay identical on every rank.

An editing function that runs on the edit leader only (the default path) may use modules
registered with ``FlexModel.register_trainable_module``; only the leader computes their
gradients. :class:`TrainableSync` broadcasts their parameters from the leader when they are
registered, and their gradients at the end of every backward that went through an edit, so an
optimizer step on every rank keeps them equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.parallel.failures import naming_lost_ranks
from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["TrainableSync"]


class _SyncTrainablePoint(torch.autograd.Function):
    """Identity whose backward schedules the trainable-module sync at the end of backward."""

    @staticmethod
    def forward(ctx, t, runtime):
        ctx.runtime = runtime
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.runtime._queue()
        return grad, None


class TrainableSync:
    """The trainable modules of one runtime and their synchronisation over the stage."""

    def __init__(self, mesh: ParallelMesh) -> None:
        self.mesh = mesh
        self.modules: dict[str, nn.Module] = {}
        # The backward pass (autograd graph task) the sync is queued in; a backward that
        # raises never runs its callback, so a plain flag would stay set and no later pass
        # would sync again.
        self._queued: int | None = None

    def sync_point(self, piece: torch.Tensor) -> torch.Tensor:
        """``piece`` unchanged; its backward schedules the gradient sync at the end of the
        backward pass (once per pass, however many edits it went through)."""
        return _SyncTrainablePoint.apply(piece, self)

    def sync(self, modules: dict[str, nn.Module]) -> None:
        """Broadcast the modules' parameters from the leader now, and their gradients at the
        end of every backward that went through an edit (only the leader computes them)."""
        self.modules = dict(modules)
        with torch.no_grad():
            with naming_lost_ranks(self.mesh.stage_group, "trainable module sync"):
                for p in self._parameters():
                    dist.broadcast(p.data, group=self.mesh.stage_group, group_src=0)

    def _parameters(self) -> list[torch.Tensor]:
        return [p for _, m in sorted(self.modules.items()) for p in m.parameters()]

    def _queue(self) -> None:
        task = torch._C._current_graph_task_id()
        if self._queued == task:
            return
        self._queued = task
        torch.autograd.Variable._execution_engine.queue_callback(self._sync_grads)

    def _sync_grads(self) -> None:
        self._queued = None
        leader = self.mesh.is_stage_leader()
        for p in self._parameters():
            if leader:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                buf = p.grad
            else:
                buf = torch.empty_like(p)
            with naming_lost_ranks(self.mesh.stage_group, "trainable gradient sync"):
                dist.broadcast(buf, group=self.mesh.stage_group, group_src=0)
            if not leader:
                p.grad = buf
