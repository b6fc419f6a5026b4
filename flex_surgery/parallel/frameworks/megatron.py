"""Megatron-core's tensor-parallel layers (``megatron.core.tensor_parallel``) and its groups.

Activations are Megatron's ``[sequence, batch, hidden]`` (the data-parallel batch dim is 1).
Layers return ``(output, bias)``; the bias is not yet added with ``skip_bias_add``. What they do
to activations, read from the module's attributes:

- ``ColumnParallelLinear``: output last-dim sharded (``output_size / tp`` wide) unless gathered
  (``gather_output``, or ``runtime_gather_output`` at call time: the observed width decides
  between exactly those two); input replicated, or -- with ``sequence_parallel`` -- sharded on
  the sequence dim (the layer all-gathers it from dim 0).
  One whose weight has ``partition_stride`` k > 1 (a gated MLP's ``linear_fc1``: ``[gate_r,
  up_r]`` on each rank) splits its output in k interleaved blocks (``ActivationShard.blocks``):
  the whole output is block 0 of every rank, then block 1.
- ``RowParallelLinear``: input last-dim sharded if ``input_is_parallel``; output replicated
  (all-reduced), or with ``sequence_parallel`` reduce-scattered onto the sequence dim.
- ``VocabParallelEmbedding``: output replicated, or sequence-sharded with
  ``reduce_scatter_embeddings`` (it also turns ``[b, s, h]`` into ``[s, b, h]``).
- ``LanguageModelEmbedding`` (GPT's embedding): output sequence-sharded under sequence
  parallelism (it scatters or reduce-scatters), replicated otherwise. Its tables look tokens up
  batch-first (``[b, s, h]``: data parallelism splits dim 0 there), as GPT's inputs and logits.
  Its dropout runs after the sequence-parallel scatter: input and output split on the sequence.
- ``DotProductAttention`` (core attention): heads split over tp -- query input on dim 2,
  output ``[s, b, heads * d / tp]`` on the last dim.
- The bias a linear layer returns (element 1, not yet added with ``skip_bias_add``) is split
  like its bias parameter: column last dim over tp, row replicated; never over dp.

Parameters carry their own split: ``tensor_model_parallel`` (split at all), ``partition_dim``
and ``partition_stride``. A stride k above 1 (interleaved partitions: each rank holds its part
of k blocks) is mapped by parameter views (whole parameters, surgery, export) and refused by
``partition_dim``, which callers that join pieces end to end ask (gradient layouts, the lens).
A module whose parameters carry these attributes is Megatron's even when its class is none of
the above (Transformer-Engine linears, MoE ``GroupedMLP``, layers built with
``set_tensor_model_parallel_attributes``): its parameters' split is known, its activations'
is not (``tp_layer`` is ``None``), so hooks on it and after it are errors unless declared.

Groups: ``megatron.core.parallel_state`` once initialised -- tensor, data and pipeline parallel,
ranks ordered ``(pp, dp, tp)``; nothing needs to be passed to FlexModel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.parallel.frameworks.base import (
    HIDDEN,
    SEQUENCE,
    ActivationShard,
    Framework,
    LayoutError,
    TPLayer,
    loaded,
)
from flex_surgery.parallel.frameworks.views import LocalShard, block_shard, strided_shard

if TYPE_CHECKING:
    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["MegatronCore", "MegatronLayoutError"]

_LAYERS = "megatron.core.tensor_parallel.layers"
_EMBEDDING = "megatron.core.models.common.embeddings.language_model_embedding"
_STATE = "megatron.core.parallel_state"
_ATTENTION = "megatron.core.transformer.dot_product_attention"
_LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module"
_MODULE = "megatron.core.transformer.module"
_MOE_LAYER = "megatron.core.transformer.moe.moe_layer"
_EXPERTS = "megatron.core.transformer.moe.experts"


class MegatronLayoutError(LayoutError, NotImplementedError):
    """A Megatron parameter or group layout flex_surgery does not handle (it is not guessed).

    A :class:`~flex_surgery.parallel.frameworks.base.LayoutError`, so ``except LayoutError``
    sees it as it sees every other layout that cannot be told; also a ``NotImplementedError``
    (what it was first), so code written against that keeps working."""


def _layers():
    if not loaded(_LAYERS):
        return None
    from megatron.core.tensor_parallel import layers

    return layers


def _embedding_class():
    if not loaded(_EMBEDDING):
        return None
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding,
    )

    return LanguageModelEmbedding


def _attention_class():
    if not loaded(_ATTENTION):
        return None
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def _moe_layer_class():
    if not loaded(_MOE_LAYER):
        return None
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return MoELayer


def _is_grouped_mlp(module: nn.Module) -> bool:
    if not loaded(_EXPERTS):
        return False
    from megatron.core.transformer.moe.experts import GroupedMLP

    return isinstance(module, GroupedMLP)


def _language_module_class():
    if not loaded(_LANGUAGE_MODULE):
        return None
    from megatron.core.models.common.language_module.language_module import LanguageModule

    return LanguageModule


def _partition_stride(module: nn.Module) -> int:
    """How many interleaved blocks a column-parallel layer's pieces hold (its weight's
    ``partition_stride``; 2 for a gated MLP's ``linear_fc1``: ``[gate_r, up_r]``)."""
    return max((getattr(p, "partition_stride", 1) for p in module.parameters(recurse=False)
                if getattr(p, "tensor_model_parallel", False)), default=1)


def _grouped_refusal(pname: str) -> str:
    return (f"{pname} (GroupedMLP, moe_grouped_gemm): each tensor-parallel rank's weight holds "
            f"its part of every local expert, one after the other, which its attributes do "
            f"not say (partition_stride 1); it is not mapped. Use SequentialMLP "
            f"(moe_grouped_gemm=False) for surgery, export and parameter hooks under TP")


def _split_parameters(module: nn.Module) -> bool:
    return any(getattr(p, "tensor_model_parallel", False)
               for p in module.parameters(recurse=False))


class MegatronCore(Framework):
    name = "megatron"

    def owns(self, module: nn.Module) -> bool:
        layers = _layers()
        if layers is not None and isinstance(module, (
                layers.ColumnParallelLinear, layers.RowParallelLinear,
                layers.VocabParallelEmbedding)):
            return True
        emb = _embedding_class()
        if emb is not None and isinstance(module, emb):
            return True
        attention = _attention_class()
        if attention is not None and isinstance(module, attention):
            return True
        return _split_parameters(module)

    # -- activations -------------------------------------------------------------------------
    def tp_layer(self, module: nn.Module, mesh: ParallelMesh) -> TPLayer | None:
        layers = _layers()
        if layers is None:
            return None
        seq = ActivationShard(SEQUENCE)
        if getattr(module, "explicit_expert_comm", False):
            # An MoE expert's linear: the token dispatcher, not the layer, moves its tokens
            # (gathered over tp before it) and reduces its partial sums (after it), so its
            # activations are no column/row layer's: undescribed, hence refused.
            return None
        moe = _moe_layer_class()
        if moe is not None and isinstance(module, moe):  # what goes in comes out split alike
            split = seq if module.config.sequence_parallel else None
            return TPLayer(split, split, exact=True)
        if isinstance(module, layers.ColumnParallelLinear):
            blocks = _partition_stride(module)
            return TPLayer(seq if module.sequence_parallel else None,
                           ActivationShard(HIDDEN, module.output_size, sharded=None,
                                           blocks=blocks),
                           exact=True, returns_bias=True,
                           bias=ActivationShard(HIDDEN, module.output_size, blocks=blocks))
        if isinstance(module, layers.RowParallelLinear):
            inp = ActivationShard(HIDDEN, module.input_size) if module.input_is_parallel \
                else None
            return TPLayer(inp, seq if module.sequence_parallel else None, exact=True,
                           returns_bias=True)
        if isinstance(module, layers.VocabParallelEmbedding):
            return TPLayer(None, seq if module.reduce_scatter_embeddings else None, exact=True)
        emb = _embedding_class()
        if emb is not None and isinstance(module, emb):
            scatters = module.config.sequence_parallel and module.scatter_to_sequence_parallel
            return TPLayer(None, seq if scatters else None, exact=True)
        attention = _attention_class()
        if attention is not None and isinstance(module, attention):
            # heads split over tp: query [s, b, heads / tp, d] in, [s, b, heads * d / tp] out
            heads = module.config.num_attention_heads
            return TPLayer(ActivationShard(2, heads),
                           ActivationShard(HIDDEN, module.config.kv_channels * heads),
                           exact=True)
        return None

    def tp_layers_within(self, model: nn.Module) -> dict[nn.Module, TPLayer]:
        # LanguageModelEmbedding scatters (or reduce-scatters) onto the sequence dim before
        # its dropout under sequence parallelism: the dropout's input and output are split.
        emb = _embedding_class()
        found: dict[nn.Module, TPLayer] = {}
        if emb is None:
            return found
        seq = ActivationShard(SEQUENCE)
        for m in model.modules():
            if isinstance(m, emb) and m.config.sequence_parallel and \
                    m.scatter_to_sequence_parallel and \
                    isinstance(getattr(m, "embedding_dropout", None), nn.Module):
                found[m.embedding_dropout] = TPLayer(seq, seq, exact=True)
        return found

    def stage_input(self, module: nn.Module) -> tuple[torch.Tensor, ActivationShard] | None:
        # A stage after the first (pre_process=False) runs its TransformerBlock on the tensor
        # set_input_tensor left: under sequence parallelism, this rank's part of the sequence.
        if not type(module).__module__.startswith("megatron."):  # GPTModel, TransformerBlock
            return None
        for m in (module, getattr(module, "decoder", None)):
            if m is not None and getattr(m, "pre_process", True) is False and \
                    isinstance(getattr(m, "input_tensor", None), torch.Tensor):
                if getattr(getattr(m, "config", None), "sequence_parallel", False):
                    return m.input_tensor, ActivationShard(SEQUENCE)
                return None
        return None

    def sequence_parallel(self, module: nn.Module) -> bool:
        layers = _layers()
        if layers is not None:
            if isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear)):
                return bool(module.sequence_parallel)
            if isinstance(module, layers.VocabParallelEmbedding):
                return bool(module.reduce_scatter_embeddings)
        emb = _embedding_class()
        return emb is not None and isinstance(module, emb) and \
            bool(module.config.sequence_parallel)

    def batch_dim(self, module: nn.Module) -> int | None:
        return 1 if self.owns(module) else None

    def first_input_only(self, module: nn.Module) -> bool:
        # Megatron's modules take hidden states (or token ids) first, then masks, rotary
        # embeddings and packing parameters whose batch dim, if any, is not the activations'.
        if not loaded(_MODULE):
            return False
        from megatron.core.transformer.module import MegatronModule

        return isinstance(module, MegatronModule)

    def batch_dims(self, model: nn.Module) -> dict[nn.Module, tuple[int, int]]:
        # Token ids and GPT's logits are [b, s(, V)]; LanguageModelEmbedding looks its tables up
        # batch-first and transposes the sum to [s, b, h]; its dropout runs after the transpose.
        # A VocabParallelEmbedding that reduce-scatters transposes [b, s, h] itself; one that
        # does not keeps whatever order its caller's ids have (the model's rule, outside GPT).
        layers, emb, lm = _layers(), _embedding_class(), _language_module_class()
        found: dict[nn.Module, tuple[int, int]] = {}
        for m in model.modules():
            if lm is not None and isinstance(m, lm):
                found[m] = (0, 0)
            if emb is not None and isinstance(m, emb):
                found[m] = (0, 1)
                for table in ("word_embeddings", "position_embeddings", "tokentype_embeddings"):
                    child = getattr(m, table, None)
                    if isinstance(child, nn.Module):
                        for sub in child.modules():
                            found[sub] = (0, 0)
            if layers is not None and isinstance(m, layers.VocabParallelEmbedding) and \
                    m.reduce_scatter_embeddings:
                found[m] = (0, 1)
        return found

    # -- parameters --------------------------------------------------------------------------
    def splits_parameters(self, module: nn.Module, mesh: ParallelMesh | None = None) -> bool:
        return _split_parameters(module)

    def partition_dim(self, module: nn.Module, pname: str,
                      param: torch.Tensor) -> int | None:
        """The dim ``param`` is split along in one block per rank; raises
        :class:`MegatronLayoutError` for interleaved partitions (``partition_stride > 1``) or a
        missing dim, so that no caller that joins pieces end to end (gradient layouts, the
        lens) does so with interleaved blocks. Parameter views map interleaved blocks
        themselves (:meth:`parameter_shard`)."""
        dim, stride = self._split(module, pname, param)
        if dim is not None and _is_grouped_mlp(module):
            raise MegatronLayoutError(_grouped_refusal(pname))
        if stride != 1:
            raise MegatronLayoutError(
                f"{pname} ({type(module).__name__}): partition_stride={stride} (interleaved "
                f"partitions) is not supported here: its pieces are not one block per rank")
        return dim

    def _split(self, module: nn.Module, pname: str,
               param: torch.Tensor) -> tuple[int | None, int]:
        """``(partition dim, partition stride)`` of ``param`` (``(None, 1)``: not split)."""
        where = f"{pname} ({type(module).__name__})"
        if getattr(param, "allreduce", True) is False:
            # Megatron marks expert parameters under expert parallelism so: each rank holds
            # other experts under the same names (local_experts.N), as groups() refuses.
            raise MegatronLayoutError(
                f"{where}: an expert parameter under Megatron expert parallelism (ep > 1) is "
                "not supported: each rank holds other experts under the same names, which "
                "would be edited or gathered as one")
        if not getattr(param, "tensor_model_parallel", False) or param.dim() == 0:
            return None, 1
        dim = getattr(param, "partition_dim", None)
        if dim is None or not 0 <= dim < param.dim():
            raise MegatronLayoutError(f"{where}: tensor_model_parallel without a valid "
                                      f"partition_dim ({dim})")
        stride = getattr(param, "partition_stride", 1)
        if not isinstance(stride, int) or stride < 1:
            raise MegatronLayoutError(f"{where}: partition_stride={stride!r} is not a "
                                      f"positive integer")
        return dim, stride

    def grad_partial_op(self, module: nn.Module, pname: str, param: torch.Tensor,
                        name: str = "") -> str | None:
        # What finalize_model_grads reduces over TP after backward, by its own rules: tagged
        # sequence-parallel parameters, the q/k layernorms (by name: each rank normalised its
        # own heads) summed; parameters tagged average_gradients_across_tp_domain averaged.
        if getattr(param, "tensor_model_parallel", False):
            return None
        if getattr(param, "average_gradients_across_tp_domain", False):
            return "avg"
        if getattr(param, "sequence_parallel", False):
            return "sum"
        if loaded(_MODULE) and ("q_layernorm" in name or "k_layernorm" in name):
            return "sum"
        return None

    def parameter_shard(self, name: str, module: nn.Module, pname: str,
                        param: nn.Parameter) -> LocalShard | None:
        try:
            dim, stride = self._split(module, pname, param)
        except MegatronLayoutError as exc:
            raise MegatronLayoutError(f"{name}: {exc}") from None
        if dim is None:
            return None
        group = self._tp_group(module)
        if _is_grouped_mlp(module) and dist.get_world_size(group) > 1:
            raise MegatronLayoutError(f"{name}: {_grouped_refusal(pname)}")
        if stride != 1:
            return strided_shard(name, module, pname, param, dim, stride, group,
                                 kind=self.name)
        return block_shard(name, module, pname, param, dim, group, kind=self.name)

    @staticmethod
    def _tp_group(module: nn.Module):
        group = getattr(module, "tp_group", None)
        if group is not None:
            return group
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    # -- groups ------------------------------------------------------------------------------
    def tensor_parallel_group(self) -> dist.ProcessGroup | None:
        if not loaded(_STATE):
            return None
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized() or \
                ps.get_tensor_model_parallel_world_size() == 1:
            return None
        return ps.get_tensor_model_parallel_group()

    def groups(self, model: nn.Module | None) -> ParallelMesh | None:
        if not loaded(_STATE):
            return None
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return None
        import torch.distributed as dist

        from flex_surgery.parallel.mesh import ParallelMesh, _check_sizes, adopted_stage_group

        if ps.get_context_parallel_world_size() > 1:
            raise MegatronLayoutError("Megatron context parallelism (cp > 1) is not supported: "
                                      "activations split over cp are not described")
        if ps.get_expert_model_parallel_world_size() > 1:
            raise MegatronLayoutError("Megatron expert parallelism (ep > 1) is not supported: "
                                      "each rank holds other experts under the same names "
                                      "(local_experts.N), which would be gathered as one")
        groups = {"tp": ps.get_tensor_model_parallel_group(),
                  "dp": ps.get_data_parallel_group(),
                  "pp": ps.get_pipeline_model_parallel_group()}
        sizes = {a: dist.get_world_size(g) for a, g in groups.items()}
        coords = {a: dist.get_rank(g) for a, g in groups.items()}
        _check_sizes(sizes, dist.get_world_size())
        # Megatron has no group of one stage's ranks; its order is (pp, dp, tp).
        stage_group, device_mesh = adopted_stage_group(groups, sizes, ("pp", "dp", "tp"))
        return ParallelMesh({a: (g if sizes[a] > 1 else None) for a, g in groups.items()},
                            sizes, coords, stage_group, source="megatron",
                            device_mesh=device_mesh)
