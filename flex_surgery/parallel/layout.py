"""Layout: how one tensor seen by a hook is split across the mesh, inferred from the module.

A :class:`Layout` lists, per mesh axis, either a :class:`ShardSpec` (the tensor is cut along one
dim; the shard sizes may be uneven) or a :class:`PartialSpec` (every rank holds a summand). The
gather order is fixed: ``tp`` first, then ``dp`` -- so the whole tensor ends on the rank whose
coordinates are 0 on every gathered axis.

Inference rules (:class:`LayoutInference`), for the tensor a hook sees:

* **DTensor** (DTensor TP with ``use_local_output=False``, hooks registered before
  ``parallelize_module``): its placements, mapped onto the mesh axes by process group.
* **tensor-parallel layers**: what the framework registry says
  (:func:`flex_surgery.parallel.frameworks.tp_layer`, a ``TPLayer`` per module). Exact, from
  the module's attributes, for fairscale (column output last-dim sharded unless
  ``gather_output``, row input last-dim sharded if ``input_is_parallel``, embeddings replicated)
  and Megatron-core (the same, plus sequence parallelism: column input, row output and
  embedding output split on the sequence dim 0 of ``[s, b, h]``); read from shapes for modules
  with DTensor TP weights (``parallelize_module`` with ``use_local_output=True``, HF TP): a
  dim is sharded when the observed local size is this rank's chunk of the full size.
* **any other module** takes the layout of the output of the *innermost TP layer that produced
  it*: the TP layer that ran last before the module returned (for ``output``) or started (for
  ``input``). A GELU after a ``ColumnParallelLinear`` is sharded; a block ending with a
  ``RowParallelLinear`` is replicated; a norm after a sequence-parallel row layer is split on
  the sequence dim. Gradients take the layout recorded in the last forward.
* **unknown means error** (:class:`~flex_surgery.parallel.frameworks.UnknownLayoutError`): a
  tensor whose shape does not show the split of the TP layer that produced it (a reshaped
  shard), a tensor of another shape than the replicated one before it in a model with sequence
  parallelism, and the tensors of (and after) a module whose parameters differ across the tp
  ranks but that no framework owns -- unless an ``expected_shape`` declares the layout.
* **data parallel** (DDP, FSDP1, FSDP2): activations and their gradients are the local
  micro-batch: ``batch_dim`` (the framework's: 1 for Megatron, else 0; per module where the
  framework says so -- Megatron's embedding tables, token ids and logits are batch-first) is
  sharded over ``dp`` with sizes exchanged at run time -- unless ``expected_shape`` gives that
  dim the local size: then every dp rank holds the tensor whole (no batch dim, e.g. rotary
  tables) and it is replicated over ``dp``. A tensor that has no dim ``batch_dim`` is never
  split over ``dp`` along another dim: without ``expected_shape`` it is an error naming the
  module. A tensor ``expected_shape`` leaves whole over ``dp`` is checked to be the same on
  every dp rank (``DistributedRuntime.whole_shape``). A tensor that *is* one of the model's
  parameters (a bias a Megatron layer returns unadded) is split like that parameter and never
  over ``dp``. Parameter gradients are a partial *average* over ``dp`` (DDP/FSDP average
  them); Megatron's sequence-parallel parameters' gradients a partial *sum* over ``tp``.
* **elements of a layer's value** (``unpack_idx``): an exact TP layer's description covers its
  first tensor and, for layers that return ``(output, bias)`` (Megatron), the bias (split like
  the bias parameter); any other tensor of its value needs ``expected_shape``.
* ``expected_shape`` (the unsharded shape, ``None`` for "any") is checked: dims where the local
  size is smaller than the expected one are sharded (the batch dim over ``dp``, others over
  ``tp``). It decides for modules whose layout comes from shapes or is unknown; for exact TP
  layers a disagreement with the module is an error, as is a shape no layout can explain.

Activation gradients carry ``grad_scale = 1 / dp``: with a loss averaged over the local batch,
the local activation gradient is ``dp`` times the gradient of the global-mean loss that one
process would compute (DDP/FSDP then average parameter gradients over ``dp``). The runtime
multiplies by ``grad_scale`` after gathering and divides by it before scattering an edit back.
Activations carry ``backward_scale = 1 / dp`` for the same reason: the gradient that flows back
*through* an editing function is scaled by it on the way in and by ``dp`` on the way out, so
the editing function (and trainable modules in it) see the one-process gradient.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from flex_surgery.parallel import frameworks
from flex_surgery.parallel.frameworks.base import LayoutError, TPLayer
from flex_surgery.parallel.frameworks.dtensor import is_dtensor
from flex_surgery.parallel.layout_specs import (
    EMPTY,
    REFUSES,
    SURE,
    UNSURE,
    Doubt,
    Layout,
    PartialSpec,
    ShardSpec,
    chunk_sizes,
    dtensor_layout,
)
from flex_surgery.parallel.layout_specs import GATHER_ORDER as GATHER_ORDER
from flex_surgery.parallel.layout_tracker import TPTracker, _Produced
from flex_surgery.parallel.mesh import ParallelMesh

__all__ = [
    "Layout", "LayoutError", "LayoutInference", "PartialSpec", "ShardSpec", "TPLayer",
    "chunk_sizes", "dtensor_layout", "fairscale_param_dim", "is_dtensor", "tp_layer",
]

ACTIVATION_ROLES = ("output", "input", "grad_output", "grad_input")


# -- TP layers (answered by the framework registry) -----------------------------------------
def tp_layer(module: nn.Module, mesh: ParallelMesh) -> TPLayer | None:
    """The TP description of ``module``, or ``None`` if it is not a tensor-parallel layer."""
    return frameworks.tp_layer(module, mesh)


def fairscale_param_dim(module: nn.Module, parameter: torch.Tensor) -> int | None:
    """The dim along which a tensor-parallel layer's parameter is split (``None``: replicated);
    fairscale and Megatron-core layers (see :func:`flex_surgery.parallel.frameworks.
    tp_partition_dim`)."""
    return frameworks.tp_partition_dim(module, parameter)


# -- inference -------------------------------------------------------------------------------
class LayoutInference(TPTracker):
    """Infers layouts for hook sites of one model over one mesh (see the module docstring).

    The tracking of which TP layer ran last (``watch``) is :class:`~flex_surgery.parallel.
    layout_tracker.TPTracker`'s; the rules that turn it into layouts are here."""

    def _inherited(self, module: nn.Module, state: _Produced | None,
                   local: torch.Tensor, role: str, vouched: bool = False) -> ShardSpec | None:
        """The layout a module without its own TP description inherits from the TP layer that
        produced its tensor -- or an error when the tensor cannot be that layer's output.
        ``vouched``: ``local`` is (the gradient of) a tensor that layer made, as it made it
        (:meth:`~flex_surgery.parallel.layout_tracker.TPTracker.vouched`)."""
        if state is None or (local.ndim == 0 and state.spec is None and state.unknown is None):
            return None  # a scalar of a replicated tensor is the same on every rank
        if state.unknown is not None:
            raise frameworks.UnknownLayoutError(
                f"how the {role} of {self._describe(module)} is split cannot be told: "
                f"{state.unknown}; {frameworks.HOW_TO_DECLARE}")
        spec = state.spec
        if not (self._sequence_parallel and spec is not None and
                spec.dim != len(state.shape) - 1):
            return self._inherited_split(module, state, local, role)
        # A sequence split. With one token per rank, a statistic over the sequence kept as
        # [b, 1, h] (a sum with keepdim, the first token) has the piece's shape.
        what = f"the {role} of {self._describe(module)}"
        if spec.sizes is not None:  # equal pieces (Megatron's): every rank decides alike
            found = self._inherited_split(module, state, local, role)
            if not vouched and len(spec.sizes) > 1 and all(n == 1 for n in spec.sizes):
                raise frameworks.UnknownLayoutError(_one_token(what, local, spec).why)
            return found
        # Sizes that may differ from rank to rank (the sequence need not divide): whether this
        # rank's tensor is such a piece depends on its own size, so it says what it can
        # (Doubt) and the exchange of the sizes settles it on every rank.
        try:
            found = self._inherited_split(module, state, local, role)
        except frameworks.UnknownLayoutError as exc:
            return replace(spec, doubt=Doubt(REFUSES, what, str(exc)))
        size = local.shape[found.dim] if found.dim < local.ndim else None
        if size == 0:
            return replace(found, doubt=Doubt(EMPTY, what))
        if size == 1 and not vouched:
            return replace(found, doubt=_one_token(what, local, spec))
        return replace(found, doubt=Doubt(SURE, what))

    def _inherited_split(self, module: nn.Module, state: _Produced, local: torch.Tensor,
                         role: str) -> ShardSpec | None:
        """:meth:`_inherited` once the state is known: the split a tensor of ``local``'s
        shape and strides can have after ``state``, or :class:`UnknownLayoutError`."""
        spec = state.spec
        if self._sequence_parallel and tuple(local.shape) != state.shape and \
                (spec is None or local.ndim > 0):  # (a split scalar: its own error below)
            # Under sequence parallelism a tensor of another shape may be split on the sequence
            # (the residual between TP regions), and a hidden split of the same width looks the
            # same: only the whole shape tells them apart
            split = "replicated" if spec is None else f"split on dim {spec.dim}"
            raise frameworks.UnknownLayoutError(
                f"the {role} of {self._describe(module)} has shape {tuple(local.shape)} after a "
                f"tensor of shape {state.shape} ({split}), in a model with sequence "
                f"parallelism: it may be split on the sequence dim, and nothing says so; "
                f"{frameworks.HOW_TO_DECLARE}")
        if spec is None:
            return None
        if local.ndim == 0:  # e.g. a sum or a loss of one rank's shard: a partial value
            raise frameworks.UnknownLayoutError(
                f"the {role} of {self._describe(module)} is a scalar computed after a "
                f"tensor-parallel layer that produced shape {state.shape} split on dim "
                f"{spec.dim}: it may hold this rank's share only. Hook the tensor it is computed "
                f"from (HookFunction(reduce=...) computes a statistic of the whole tensor), or, "
                f"if the scalar is the same on every tensor-parallel rank, give the hook "
                f"expected_shape=()")
        last = spec.dim == len(state.shape) - 1
        dim = local.ndim - 1 if last else spec.dim
        # More dims than the layer's output, with the split on the last: that dim was cut up
        # (heads out of a projection), and a part of the same width is no proof of the split.
        regrouped = last and local.ndim > len(state.shape)
        if (last and local.ndim > 1 and local.shape[-1] > 1 and local.stride(-1) != 1) or \
                _permuted(local):
            # the last dim is not the innermost in memory, or the dims are out of their memory
            # order: a transposed or permuted view (of the layer's output, whose dims were in
            # order), where the dim of the split's width may be another one (the sequence,
            # when it is as long as the hidden piece is wide)
            raise frameworks.UnknownLayoutError(
                f"the {role} of {self._describe(module)} has shape {tuple(local.shape)} with "
                f"strides {tuple(local.stride())}: a permuted view, after a tensor-parallel "
                f"layer that produced shape {state.shape} split on dim {spec.dim}, so which of "
                f"its dims is split cannot be told; {frameworks.HOW_TO_DECLARE}")
        if dim < local.ndim and local.shape[dim] == state.shape[spec.dim] and not regrouped:
            return replace(spec, dim=dim)
        raise frameworks.UnknownLayoutError(
            f"the {role} of {self._describe(module)} has shape {tuple(local.shape)}, but the "
            f"tensor-parallel layer that ran before it produced shape {state.shape} split on "
            f"dim {spec.dim} (a reshaped or reduced tp shard?); {frameworks.HOW_TO_DECLARE}")

    def _tp_spec(self, module: nn.Module | None, role: str, local: torch.Tensor,
                 in_forward: bool) -> tuple[ShardSpec | None, bool]:
        """tp shard of an activation, and whether it is known exactly from the module."""
        if self.mesh.tp_size == 1 or module is None:
            return None, False
        info = self.tp_layer(module)
        is_out = role in ("output", "grad_output")
        if info is not None:
            if is_out and module in self._split_elsewhere:
                raise frameworks.UnknownLayoutError(
                    f"how the {role} of {self._describe(module)} is split cannot be told: "
                    f"{self._split_elsewhere[module]}; {frameworks.HOW_TO_DECLARE}")
            shard = info.output if is_out else info.input
            return self._dim_shard(shard, local, info.exact, module, role), info.exact
        why = self._why_unknown(module)
        if why is not None:
            raise frameworks.UnknownLayoutError(
                f"{self._describe(module)} {why}, so the layout of its {role} is unknown; "
                f"{frameworks.HOW_TO_DECLARE}")
        if in_forward and role == "output":
            state = self._through(self.output_state(module), local)
        elif in_forward and role == "input":
            state = self.input_state(local)
        else:
            state = (self._exit if is_out else self._entry).get(module)
        vouched = state is not None and (state.vouched or in_forward and self.vouched(local, state))
        return self._inherited(module, state, local, role, vouched), False

    def layout(self, local: torch.Tensor, module: nn.Module | None, role: str,
               parameter: torch.Tensor | None = None,
               expected_shape: Sequence[int | None] | None = None,
               unpack_idx: int = 0) -> Layout:
        """The layout of ``local``, the tensor a hook on ``module`` sees in ``role``
        (``unpack_idx``: which tensor of the hooked value it is)."""
        if is_dtensor(local):
            try:
                layout = dtensor_layout(local, self.mesh)
            except LayoutError as exc:
                raise LayoutError(f"the {role} of {self._describe(module)}: {exc}") from exc
            return self._add_dp(layout, local, module, role)
        if role == "param_grad":
            return self._param_layout(module, parameter)
        owner = self._parameter_owner(local) if role in ("output", "input") else None
        if owner is not None:  # a parameter handed on as an activation: split like itself
            return self._checked(self._param_layout(owner, local, with_dp=False), local,
                                 module, role, expected_shape, batch=None)
        in_forward = role in ("output", "input")
        info = self.tp_layer(module) if module is not None and self.mesh.tp_size > 1 else None
        exact = getattr(info, "exact", False)
        if exact and unpack_idx > 0:
            return self._other_element(info, local, module, role, expected_shape, unpack_idx)
        if unpack_idx > 0 and expected_shape is None and self.mesh.tp_size > 1:
            # What a module outside the TP layers hands on follows the last TP layer's split
            # only for the activation it passes along; another tensor of its value (attention
            # weights next to the hidden states) may be split otherwise (by heads) or not at
            # all, and a width that happens to match would be read as the layer's split.
            raise frameworks.UnknownLayoutError(
                f"tensor {unpack_idx} of the {role} of {self._describe(module)} under tensor "
                f"parallelism: only the activation a layer passes on follows the TP layers' "
                f"split; give expected_shape (the whole tensor's shape, None for dims that "
                f"vary) to say how it is split")
        if expected_shape is not None and not exact:
            layout = self._open_hint(local, module, role, expected_shape, in_forward)
            return self._add_dp(layout, local, module, role, expected_shape, unpack_idx)
        tp_spec, exact = self._tp_spec(module, role, local, in_forward)
        layout = Layout((tp_spec,) if tp_spec is not None else ())
        layout = self._checked(layout, local, module, role, expected_shape,
                               self._batch_dim(module, role, local))
        return self._add_dp(layout, local, module, role, expected_shape, unpack_idx)

    def _open_hint(self, local: torch.Tensor, module: nn.Module | None, role: str,
                   expected_shape: Sequence[int | None], in_forward: bool) -> Layout:
        """The tp split an ``expected_shape`` declares for a module no framework describes.
        The hint decides the dims it gives; a dim it leaves ``None`` ("any size") declares
        nothing. So where the hint splits nothing but leaves a dim open, what produced the
        tensor decides (docs/parallel.md, rule 4): ``(None, None, None)`` on a GELU after
        a column layer is that layer's split, not a replicated tensor -- and a tensor whose
        producer cannot be told raises, naming the open dims."""
        batch = self._batch_dim(module, role, local)
        layout = self._from_hint(local, expected_shape, batch)
        open_dims = [d for d, want in enumerate(expected_shape) if want is None and d != batch]
        if layout.shards or not open_dims or self.mesh.tp_size == 1:
            return layout
        try:
            tp_spec, _ = self._tp_spec(module, role, local, in_forward)
        except frameworks.UnknownLayoutError as exc:
            raise frameworks.UnknownLayoutError(
                f"expected_shape {tuple(expected_shape)} of the {role} of "
                f"{self._describe(module)} leaves dim(s) {open_dims} open (None), and the "
                f"tensor may be split over the tensor-parallel ranks there: {exc}. Give the "
                f"whole size of every dim but the batch dim") from None
        return Layout((tp_spec,)) if tp_spec is not None and tp_spec.dim in open_dims \
            else layout

    def _checked(self, layout: Layout, local: torch.Tensor, module: nn.Module | None,
                 role: str, expected_shape: Sequence[int | None] | None,
                 batch: int | None) -> Layout:
        """``layout`` (tp only), after checking that an ``expected_shape`` agrees with it (a
        shape cannot tell interleaved blocks from one block: ``blocks`` is not compared)."""
        plain = Layout(tuple(replace(s, blocks=1) for s in layout.shards))
        if expected_shape is not None and self._from_hint(local, expected_shape, batch) != \
                plain:
            raise LayoutError(
                f"expected_shape {tuple(expected_shape)} contradicts the layout of "
                f"{self._describe(module)} ({role}): local shape {tuple(local.shape)} is "
                f"sharded as {layout}")
        return layout

    def _other_element(self, info: TPLayer, local: torch.Tensor, module: nn.Module,
                       role: str, expected_shape: Sequence[int | None] | None,
                       unpack_idx: int) -> Layout:
        """A tensor other than the first of an exact TP layer's value: the bias the layer
        returns (split like its bias parameter, never over dp or the sequence), or -- for
        elements the framework does not describe -- the ``expected_shape`` hint, else an error.
        """
        if info.returns_bias and unpack_idx == 1 and role in ("output", "grad_output"):
            if role == "grad_output":
                raise frameworks.UnknownLayoutError(
                    f"the gradient of the bias {self._describe(module)} returns is summed over "
                    f"the batch and the sequence on each rank, a split flex_surgery does not "
                    f"describe; hook the bias parameter's gradient instead")
            spec = self._dim_shard(info.bias, local, True, module, "returned bias")
            layout = Layout((spec,) if spec is not None else ())
            return self._checked(layout, local, module, role, expected_shape, batch=None)
        if expected_shape is None:
            raise frameworks.UnknownLayoutError(
                f"tensor {unpack_idx} of the {role} of {self._describe(module)}: its framework "
                f"describes only the first tensor (and a returned bias); "
                f"{frameworks.HOW_TO_DECLARE}")
        batch = self._batch_dim(module, role, local)
        return self._add_dp(self._from_hint(local, expected_shape, batch), local, module, role,
                            expected_shape)

    def _parameter_owner(self, local: torch.Tensor) -> nn.Module | None:
        """The module holding ``local`` when it *is* one of the model's parameters (Megatron's
        layers return their bias unadded), else ``None``."""
        entry = self._parameters.get(id(local))
        return entry[1] if entry is not None and entry[0]() is local else None

    def _batch_dim(self, module: nn.Module | None, role: str,
                   local: torch.Tensor) -> int | None:
        """The dim of ``local`` data parallelism splits; ``None`` when ``local`` has no such
        dim (then it cannot be split over dp, and is never concatenated along another dim)."""
        dims = self._batch_dims.get(module) if module is not None else None
        dim = self.batch_dim if dims is None else \
            dims[0 if role in ("input", "grad_input") else 1]
        return dim % local.ndim if -local.ndim <= dim < local.ndim else None

    def _add_dp(self, layout: Layout, local: torch.Tensor, module: nn.Module | None,
                role: str, expected_shape: Sequence[int | None] | None = None,
                unpack_idx: int = 0) -> Layout:
        if self.mesh.dp_size == 1 or layout.spec_for("dp") is not None:
            return layout
        if role not in ACTIVATION_ROLES:
            return layout
        if expected_shape is None and unpack_idx > 0 and role in ("input", "grad_input") and \
                module is not None and frameworks.first_input_only(module):
            raise frameworks.UnknownLayoutError(
                f"tensor {unpack_idx} of the {role} of {self._describe(module)}: its framework "
                f"gives the batch dim of the first input tensor only (a mask or rotary table "
                f"may have its batch elsewhere, or be broadcast), so how it is split over the "
                f"data-parallel ranks cannot be told; {frameworks.HOW_TO_DECLARE}")
        dim = self._batch_dim(module, role, local)
        self._check_batch_first(module, role, unpack_idx)
        if dim is None:
            if expected_shape is not None:
                return layout  # declared: every dp rank holds it whole (no batch dim)
            raise frameworks.UnknownLayoutError(
                f"the {role} of {self._describe(module)} has shape {tuple(local.shape)}, "
                f"without dim {self.batch_dim if module not in self._batch_dims else 'batch'} "
                f"that data parallelism splits: how it differs across the data-parallel ranks "
                f"cannot be told; {frameworks.HOW_TO_DECLARE} (its whole shape equals the "
                f"local one if every data-parallel rank holds it whole)")
        if expected_shape is None and dim == local.ndim - 1 and dim > 0 and \
                module not in self._batch_dims:
            # [seq, batch, ...] models (batch dim 1): in a 2-D tensor that dim is the last one,
            # the hidden dim of [tokens, hidden] (packed or routed tokens); splitting over dp
            # there would concatenate the replicas' hidden units.
            raise frameworks.UnknownLayoutError(
                f"the {role} of {self._describe(module)} has shape {tuple(local.shape)}: the "
                f"model's batch dim is {dim}, here its last dim (a [tokens, hidden] tensor "
                f"would be split along hidden), so how it differs across the data-parallel "
                f"ranks cannot be told; {frameworks.HOW_TO_DECLARE}")
        if expected_shape is not None and expected_shape[dim] == local.shape[dim]:
            return layout  # every dp rank holds it whole (no batch dim): replicated over dp
        scale = 1.0 / self.mesh.dp_size
        grad_role = role.startswith("grad")
        # In forward, the rows of this replica's input travel with the sizes (ShardSpec.rows);
        # a backward may follow several forwards of other sizes, so its tensors carry none.
        rows = None if grad_role or expected_shape is not None else self.input_rows
        return Layout(layout.shards + (ShardSpec("dp", dim, rows=rows),),
                      layout.partials,
                      grad_scale=scale if grad_role else 1.0,
                      backward_scale=1.0 if grad_role else scale)

    def _check_batch_first(self, module: nn.Module | None, role: str, unpack_idx: int) -> None:
        """Refuse a tensor whose batch dim torch itself puts elsewhere than the model's
        ``batch_dim``: a data-parallel join along ``batch_dim`` would glue the replicas'
        sequences. Torch's modules with a ``batch_first`` setting say where: their tensors,
        and those of what runs inside them, are ``[batch, seq, ...]`` or ``[seq, batch, ...]``
        by it; an RNN's hidden states ``h_0`` / ``h_n`` (tensor 1 and on) are
        ``[layers, batch, hidden]`` always; ``nn.MultiheadAttention``'s attention weights
        (output tensor 1) are ``[batch, ...]`` always."""
        entry = self._torch_seq.get(module) if module is not None else None
        if entry is None or module in self._batch_dims:
            return
        batch_first, owner = entry
        if isinstance(module, nn.RNNBase) and unpack_idx > 0:
            dim, why = 1, f"an RNN's hidden state (tensor {unpack_idx}) is [layers, batch, hidden]"
        elif isinstance(module, nn.MultiheadAttention) and unpack_idx == 1 and \
                role in ("output", "grad_output"):
            return  # the attention weights: [batch, ...] whatever batch_first says
        else:
            dim = 0 if batch_first else 1
            why = (f"it runs in {owner}, built with batch_first={batch_first}, whose tensors "
                   f"are {'[batch, seq, ...]' if batch_first else '[seq, batch, ...]'}")
        if dim == self.batch_dim:
            return
        raise frameworks.UnknownLayoutError(
            f"the {role} of {self._describe(module)}: {why}, while this model's batch dim is "
            f"{self.batch_dim}, so joining the data-parallel replicas' pieces along it would "
            f"join their sequences. Hook a module outside it whose batch dim is the model's, "
            f"or build it with the model's layout (batch_first, FlexModel's batch_dim)")

    def _from_hint(self, local: torch.Tensor, expected: Sequence[int | None],
                   batch: int | None) -> Layout:
        """tp shards read off an ``expected_shape`` hint (the dp batch dim ``batch`` is added
        later; ``None``: ``local`` has no batch dim)."""
        if len(expected) != local.ndim:
            raise LayoutError(f"expected_shape {tuple(expected)} has {len(expected)} dims, the "
                              f"tensor {local.ndim}")
        shards = []
        for d, (have, want) in enumerate(zip(local.shape, expected)):
            if want is None or have == want:
                continue
            if d == batch and self.mesh.dp_size > 1:
                continue
            sizes = chunk_sizes(want, self.mesh.tp_size)
            if self.mesh.tp_size == 1 or have != sizes[self.mesh.rank("tp")]:
                raise LayoutError(f"local shape {tuple(local.shape)} cannot be a shard of "
                                  f"expected_shape {tuple(expected)} (dim {d})")
            shards.append(ShardSpec("tp", d, sizes))
        if len(shards) > 1:
            raise LayoutError(f"expected_shape {tuple(expected)}: more than one dim would be "
                              f"sharded over tp")
        return Layout(tuple(shards))

    def _param_layout(self, module: nn.Module | None, parameter: torch.Tensor | None,
                      with_dp: bool = True) -> Layout:
        shards: tuple[ShardSpec, ...] = ()
        partials: tuple[PartialSpec, ...] = ()
        if module is not None and parameter is not None and self.mesh.tp_size > 1:
            if module in self._unknown:
                raise frameworks.UnknownLayoutError(
                    f"the gradient of a parameter of {self._describe(module)}: the module's "
                    f"parameters differ across the tensor-parallel ranks but no framework owns "
                    f"it; {frameworks.HOW_TO_DECLARE}")
            dim = frameworks.tp_partition_dim(module, parameter)
            if dim is not None:
                full = parameter.shape[dim] * self.mesh.tp_size
                shards = (ShardSpec("tp", dim, chunk_sizes(full, self.mesh.tp_size)),)
            elif with_dp and (op := frameworks.tp_grad_partial_op(
                    module, parameter, self._names.get(module, ""))) is not None:
                partials = (PartialSpec("tp", op),)
        if with_dp and self.mesh.dp_size > 1:
            partials = (*partials, PartialSpec("dp", "avg"))
        return Layout(shards, partials)


def _one_token(what: str, local: torch.Tensor, spec: ShardSpec) -> Doubt:
    """Why a tensor of a sequence piece's shape, one token per rank, cannot be told from a
    statistic over the sequence (see :meth:`LayoutInference._inherited`)."""
    return Doubt(UNSURE, what, (
        f"{what} has shape {tuple(local.shape)} after a tensor-parallel layer that split the "
        f"sequence (dim {spec.dim}) so that every rank holding tokens holds one: a statistic "
        f"over the sequence (a sum with keepdim, the first token) has the piece's shape, so "
        f"whether it is split cannot be told; {frameworks.HOW_TO_DECLARE}"))


def _permuted(t: torch.Tensor) -> bool:
    """Whether ``t``'s dims (those longer than one, not broadcast) are out of their order in
    memory: a transposed or permuted view, whose dim ``d`` need not be the dim ``d`` of the
    tensor it views."""
    strides = [st for size, st in zip(t.shape, t.stride()) if size > 1 and st != 0]
    return any(a < b for a, b in zip(strides, strides[1:]))
