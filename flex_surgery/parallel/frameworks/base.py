"""The protocol every parallelism framework answers, and the answers' types.

A framework (fairscale TP, Megatron-core, DTensor / HF ``tp_plan``, FSDP1, FSDP2, DDP) knows how
*its* modules and parameters are split across ranks. flex_surgery needs four answers from it,
and asks nothing else:

1. **ownership** -- is this module / parameter one of mine (:meth:`Framework.owns`);
2. **activation layout** -- how the module's inputs and outputs are split over tensor-parallel
   ranks (:meth:`Framework.tp_layer`, a :class:`TPLayer`), whether it runs sequence
   parallelism, which activation dim is the batch;
3. **shard views** -- which elements of a parameter this rank holds and how to gather or
   scatter them (:meth:`Framework.parameter_shard`, a
   :class:`~flex_surgery.parallel.frameworks.views.LocalShard`);
4. **groups** -- the process groups it runs on, adopted as a
   :class:`~flex_surgery.parallel.mesh.ParallelMesh` (:meth:`Framework.groups`).

Every method has a "not mine" default (``None`` / ``False``), so a framework module implements
only what applies. A framework module imports its library lazily and only when the library is
already loaded (a module cannot be an instance of a class that was never imported), so asking
the registry never imports fairscale or Megatron.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import torch.distributed as dist

    from flex_surgery.parallel.frameworks.views import LocalShard
    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["ActivationShard", "Framework", "LayoutError", "TPLayer", "closure_value",
           "differs_across", "loaded"]

HIDDEN, SEQUENCE = -1, 0  # the activation dims tensor parallelism splits


class LayoutError(ValueError):
    """The observed shape contradicts the module's sharding or the ``expected_shape`` hint, or
    how a tensor is split cannot be told."""


@dataclass(frozen=True)
class ActivationShard:
    """How a tensor-parallel layer splits one of its activations over the ``tp`` ranks.

    ``dim`` is :data:`HIDDEN` (``-1``, the last dim: column outputs, row inputs) or
    :data:`SEQUENCE` (``0``: Megatron's sequence parallelism on ``[s, b, h]``). ``full`` is the
    unsharded size when the module knows it (``None``: equal shards, the full size is the local
    size times ``tp``). ``sharded`` is ``True`` / ``False`` when the module says so, ``None`` when
    the observed size decides (the shard size means sharded, the full size means whole).
    """

    dim: int
    full: int | None = None
    sharded: bool | None = True
    #: The piece is this rank's part of each of ``blocks`` equal blocks of ``dim`` (Megatron's
    #: ``partition_stride``), not one block (see ``ShardSpec.blocks``).
    blocks: int = 1
    #: With ``full`` unknown: the pieces may differ in size (DTensor's ``Shard`` of a sequence
    #: ``tp`` does not divide, ``torch.chunk``'s rule), so their sizes are exchanged, not taken
    #: as the local size on every rank (Megatron's sequence, which tp divides).
    uneven: bool = False


@dataclass(frozen=True)
class TPLayer:
    """What a tensor-parallel layer does to its input and output (``None``: replicated).

    ``exact``: the module's attributes say it (fairscale, Megatron), so an observed shape or an
    ``expected_shape`` that contradicts it is an error; otherwise (DTensor weights) the layout
    is read from shapes and an ``expected_shape`` hint decides.
    """

    input: ActivationShard | None
    output: ActivationShard | None
    exact: bool
    #: The layer returns ``(output, bias)`` (Megatron): element 1 of its output is the bias it
    #: has not added, split like the bias parameter (``bias``; ``None``: replicated) and never
    #: over data parallelism or the sequence.
    returns_bias: bool = False
    bias: ActivationShard | None = None
    #: Only the layer's own input and output are described: what runs inside it computes on
    #: pieces whose split nothing says (HF's ``moe_tp_experts``: each rank runs its part of
    #: every expert and the layer sums them), so those activations are unknown.
    opaque: bool = False


def closure_value(fn: object, name: str) -> object | None:
    """The value free variable ``name`` of function ``fn`` holds (``None``: no such variable,
    or an empty cell). Frameworks that wrap a module's forward in a closure (torch's
    ``distribute_module``, HF's ``install_forward``) keep what they were given there and
    nowhere else."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells or name not in code.co_freevars:
        return None
    try:
        return cells[code.co_freevars.index(name)].cell_contents
    except ValueError:  # an empty cell
        return None


class Framework:
    """One parallelism framework's answers (see the module docstring); defaults say "not mine".
    """

    name: str = "framework"

    # -- ownership ---------------------------------------------------------------------------
    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this framework's layers or wrappers."""
        return False

    # -- activations -------------------------------------------------------------------------
    def tp_layer(self, module: nn.Module, mesh: ParallelMesh) -> TPLayer | None:
        """How ``module`` splits its activations over ``tp``; ``None``: not a TP layer."""
        return None

    def tp_layers_within(self, model: nn.Module) -> dict[nn.Module, TPLayer]:
        """Modules of ``model`` that are not tensor-parallel layers themselves but whose
        activations a layer of this framework around them splits in a known way (Megatron's
        embedding dropout, which runs on the embedding's sequence-parallel scatter)."""
        return {}

    def stage_input(self, module: nn.Module) -> tuple[torch.Tensor, ActivationShard] | None:
        """The tensor pipeline stage ``module`` takes from the previous stage outside its
        arguments (Megatron's ``set_input_tensor``) and how it is split over tp, when it is
        split (sequence parallelism); ``None`` when it is whole or there is none. What a
        forward starts from: without it, modules before the stage's first TP layer would
        inherit "replicated"."""
        return None

    def sequence_parallel(self, module: nn.Module) -> bool:
        """Whether ``module`` runs with activations split on the sequence dim between TP
        regions (then a replicated-looking activation of another shape is ambiguous)."""
        return False

    def batch_dim(self, module: nn.Module) -> int | None:
        """The activation dim data parallelism splits, if this framework fixes it."""
        return None

    def first_input_only(self, module: nn.Module) -> bool:
        """Whether only the first tensor of ``module``'s input has the batch where the model
        says: the rest (attention masks ``[b, 1, s, s]`` or broadcast ``[1, 1, s, s]``, rotary
        tables) have no batch dim the framework can tell, so data parallelism cannot split them
        without an ``expected_shape``."""
        return False

    def batch_dims(self, model: nn.Module) -> dict[nn.Module, tuple[int, int]]:
        """``(input batch dim, output batch dim)`` of the modules of ``model`` whose batch is
        not on the model's :meth:`batch_dim` (Megatron's batch-first embeddings and model
        inputs in a model whose activations are ``[s, b, h]``)."""
        return {}

    # -- parameters --------------------------------------------------------------------------
    def splits_parameters(self, module: nn.Module, mesh: ParallelMesh | None = None) -> bool:
        """Whether this framework splits some parameter of ``module`` over ``tp`` (of ``mesh``,
        for frameworks whose parameters do not say which axis splits them). A module it splits
        but whose activations :meth:`tp_layer` does not describe has activations of unknown
        layout (they are this rank's piece of something whose split nothing says)."""
        return False

    def partition_dim(self, module: nn.Module, pname: str, param: torch.Tensor) -> int | None:
        """The dim a tensor-parallel parameter is split along (``None``: not split / not mine).
        """
        return None

    def grad_partial_op(self, module: nn.Module, pname: str, param: torch.Tensor,
                        name: str = "") -> str | None:
        """How the framework reduces each tensor-parallel rank's gradient of this replicated
        parameter after backward (``"sum"``, ``"avg"``; ``None``: it is whole already) --
        Megatron's sequence-parallel norms and row biases (each rank saw a slice of the
        sequence), its q/k layernorms (each rank normalised its own heads). ``name``: the
        module's name in the model, for frameworks whose rules go by name."""
        return None

    def parameter_shard(self, name: str, module: nn.Module, pname: str,
                        param: nn.Parameter) -> LocalShard | None:
        """This rank's view of ``module.<pname>`` (clean name ``name``); ``None``: not mine."""
        return None

    def model_shards(self, model: nn.Module) -> tuple[list[LocalShard],
                                                       set[tuple[int, str]]]:
        """Views of parameters this framework stores away from their modules (FSDP1 flat
        parameters), and the ``(id(module), param_name)`` pairs they cover."""
        return [], set()

    # -- groups ------------------------------------------------------------------------------
    def groups(self, model: nn.Module | None) -> ParallelMesh | None:
        """The groups ``model`` runs on, if this framework set them up."""
        return None

    def tensor_parallel_group(self) -> dist.ProcessGroup | None:
        """This rank's tensor-parallel group when the framework's state is initialised with
        more than one TP rank (no collective), else ``None``."""
        return None

    # -- wrappers ----------------------------------------------------------------------------
    def wrapper_kind(self, module: nn.Module) -> str | None:
        """A short label when ``module`` is this framework's wrapper (``"DDP"``, ``"FSDP2"``)."""
        return None

    def substitutes_parameters(self, module: nn.Module) -> bool:
        """Whether forward runs with tensors that stand in for ``module``'s registered
        parameters (FSDP): parameter-gradient hooks must go on those."""
        return False

    def reshard(self, module: nn.Module) -> None:
        """Drop unsharded copies of ``module``'s parameters kept after a forward (FSDP), so an
        in-place edit of the shard is what the next forward uses."""
        return None

    def abandon_backward(self, module: nn.Module) -> None:
        """After a backward through ``module`` (one of this framework's data-parallel wrappers)
        raised, put the wrapper back in its state between two iterations and drop the
        gradients that backward left on its parameters.

        A data-parallel wrapper finishes each iteration in a callback at the end of the
        backward, which autograd does not run when the backward raises: left as it is, the
        next iteration fails (DDP: "Expected to have finished reduction in the prior
        iteration"; FSDP: still in its backward) or mixes the failed backward's partial,
        per-rank gradients into the next one. No collective: every rank that raised resets on
        its own."""
        return None


def loaded(module_name: str) -> bool:
    """Whether a library is imported already (its classes can only be instances if it is)."""
    return module_name in sys.modules


def first(answers: Iterable[object]) -> object | None:
    """The first answer that is not ``None``."""
    return next((a for a in answers if a is not None), None)


def differs_across(tensors: list[torch.Tensor], group) -> list[bool]:
    """For each local tensor, whether its value differs on some rank of ``group``.

    One all-gather of float64 fingerprints (sum, position-weighted sum, absolute sum) per call,
    whatever the number of tensors; equal tensors give bit-equal fingerprints. Collective over
    ``group``: every rank passes tensors of the same count, in the same order.
    """
    import torch.distributed as dist

    if not tensors:
        return []
    device = tensors[0].device  # NCCL exchanges device tensors only
    prints = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(device, torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64,
                               device=device).remainder_(977).add_(1)
        prints.append(torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().sum()]))
    mine = torch.stack(prints)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    every = torch.stack(parts)  # [ranks, tensors, 3]
    same = (every == every[0]) | (every.isnan() & every[0].isnan())
    return [not bool(x) for x in same.all(dim=2).all(dim=0)]
