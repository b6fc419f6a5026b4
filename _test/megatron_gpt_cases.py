"""A real Megatron-core ``GPTModel`` on CPU ranks, at any tensor-parallel size, with the same
full weights: the pieces the Megatron GPT equivalence tests share.

Megatron-core 0.16.1 runs its local (non-Transformer-Engine) GPT layers on CPU/gloo with four
workarounds, each applied here and undone afterwards (the forked test ranks live for the whole
session): ``torch.cuda.current_device`` answers ``"cpu"`` (Megatron allocates attention buffers,
TP mapping buffers and RoPE tables on ``current_device()``; :func:`megatron_cases.
megatron_parallel` does it); the inference RNG tracker (the training tracker calls
``torch.cuda.get_rng_state``); an explicit boolean causal mask
(``attention_mask=None`` builds one on CUDA); and, under sequence parallelism, a LayerNorm whose
parameters are tagged ``.sequence_parallel`` plus the all-reduce of their gradients over the TP
group that ``finalize_model_grads`` does in Megatron's training loop.

``use_cpu_initialization=True`` makes every layer build the *full* master weight from the CPU
RNG and keep this rank's slice, so the same ``torch.manual_seed`` gives the same full model at
every TP size: the TP=1 model built on one rank is the one-process twin of the TP=2 model.
The model runs in float64, so TP=2 and TP=1 differ by summation order only (~1e-14).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron_cases import megatron_parallel
from parallel_cases import local_group  # noqa: F401  (re-exported: one cached group per rank)
from torch import nn

SEED = 1234
LAYERS, HIDDEN, HEADS, SEQ, VOCAB, BATCH = 2, 64, 4, 16, 128, 2


class SequenceParallelLayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the constructor Megatron's layer specs call, whose
    parameters are tagged ``.sequence_parallel`` so their gradients are summed over TP (each TP
    rank sees only its slice of the sequence). Megatron's own fallback norm refuses sequence
    parallelism without apex / Transformer Engine."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in (self.weight, self.bias):
            p.sequence_parallel = config.sequence_parallel


@contextmanager
def gpt_parallel(tp: int, pp: int = 1, seed: int = SEED) -> Iterator[None]:
    """Megatron's ``parallel_state`` for ``tp`` x ``pp`` (dp takes the rest of the world; set
    up and destroyed by :func:`megatron_cases.megatron_parallel`) and its RNG tracker seeded as
    GPTModel needs it: the inference tracker without CUDA."""
    from megatron.core import tensor_parallel

    with megatron_parallel(tensor_parallel=tp, pipeline_parallel=pp):
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed, inference_rng_tracker=not torch.cuda.is_available(), force_reset_rng=True)
        yield


def build_gpt(tp: int, sequence_parallel: bool = False, seed: int = SEED,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
              model_kwargs: dict | None = None, **config) -> nn.Module:
    """The tiny GPTModel (local layer spec) for the initialised TP size; the same full weights
    for the same ``seed`` at every TP size. Extra ``config`` goes to ``TransformerConfig``,
    ``model_kwargs`` to ``GPTModel`` (``pre_process``/``post_process`` of a pipeline stage)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                            use_cpu_initialization=True, hidden_dropout=0.0,
                            attention_dropout=0.0, params_dtype=dtype, **config)
    spec = get_gpt_layer_local_spec()
    if sequence_parallel:
        spec.submodules.input_layernorm = SequenceParallelLayerNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
        spec = TransformerBlockSubmodules(layer_specs=[spec] * LAYERS,
                                          layer_norm=SequenceParallelLayerNorm)
    model = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     parallel_output=False, **(model_kwargs or {}))
    return model.to(device=device, dtype=dtype)  # the norms ignore params_dtype


def gpt_inputs(device: torch.device | str = "cpu", rows: slice = slice(None)
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [b, s], position_ids [b, s] (shifted per row), attention_mask
    [b, 1, s, s])``, the batch rows ``rows`` of them; the mask is boolean, True where attention
    is masked (causal)."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    # rows differ, so a batch row stored in the wrong place shows in the position embeddings
    pos = (torch.arange(SEQ) + torch.arange(BATCH)[:, None]) % SEQ
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).expand(BATCH, 1, SEQ, SEQ)
    return ids[rows].to(device), pos[rows].to(device), mask[rows].to(device)


def data_parallel_rows() -> slice:
    """The batch rows of this rank's data-parallel replica (Megatron's dp group)."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    assert BATCH % dp == 0, (BATCH, dp)
    return slice(rank * BATCH // dp, (rank + 1) * BATCH // dp)


def loss_of(logits: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """A loss that weighs every logit differently, so a wrong shard order shows in the grads;
    ``logits`` are the batch rows ``rows`` of the whole ``[b, s, V]`` logits."""
    weights = torch.linspace(-1.0, 1.0, BATCH * SEQ * VOCAB, dtype=logits.dtype,
                             device=logits.device).view(BATCH, SEQ, VOCAB)[rows]
    return (logits * weights).sum()


def finish_grads(model: nn.Module) -> None:
    """What Megatron's ``finalize_model_grads`` does for sequence parallelism: sum over TP the
    gradients of parameters tagged ``.sequence_parallel`` (each rank saw a slice of the
    sequence). A no-op without sequence parallelism."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def _tp_dim(p: torch.Tensor) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def full_tensors(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) of a Megatron TP model, whole: TP shards are gathered
    over Megatron's TP group along ``partition_dim``; a ``partition_stride`` of k (a gated MLP's
    ``linear_fc1``: rank r holds ``[gate_r, up_r]``) cuts each piece into k blocks and joins
    block j of every rank before block j + 1. Collective over the TP group."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        t = (p.grad if grads else p).detach()
        dim = _tp_dim(p)
        if dim is not None and tp > 1:
            stride = getattr(p, "partition_stride", 1)
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            blocks = [part.chunk(stride, dim) for part in parts]
            t = torch.cat([b[j] for j in range(stride) for b in blocks], dim)
        out[name] = t.clone().cpu()
    return out


def forward_backward(model: nn.Module, wrapper: nn.Module | None = None,
                     device: torch.device | str = "cpu", data_parallel: bool = False,
                     **forward_kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (gathered over TP, ``[b, s, V]``) and whole parameter gradients of one
    forward/backward of ``model`` (called through ``wrapper``, e.g. a FlexModel, when given).

    ``data_parallel``: this rank runs its replica's rows of the batch only, as DDP does: its
    loss is ``dp`` times its rows' share of the whole loss (the whole loss is the dp *mean* of
    the local ones, DDP's convention, which FlexModel's gradient scaling follows) and the
    gradients are averaged over Megatron's dp group, so they are the whole batch's.
    """
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size() if data_parallel else 1
    rows = data_parallel_rows() if data_parallel else slice(None)
    model.zero_grad(set_to_none=True)
    logits = (wrapper or model)(*gpt_inputs(device, rows), **forward_kwargs)
    (loss_of(logits, rows) * dp).backward()
    finish_grads(model)
    if dp > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=parallel_state.get_data_parallel_group())
            p.grad /= dp
    return logits.detach().cpu(), full_tensors(model, grads=True)


# -- under FlexModel ---------------------------------------------------------------------------
# (module or parameter name, hook kind, unpack_idx[, whole shape]). Megatron's activations are
# [s, b, h]; with sequence parallelism those outside the TP regions are split on the sequence
# dim.
CORE_ATTENTION = (SEQ, BATCH, HIDDEN)  # its whole output shape (see below)
RETRIEVAL_SITES = [
    ("embedding", "forward", 0),                        # [s, b, h]; SP: [s/tp, b, h]
    ("embedding.position_embeddings", "forward", 0),    # plain nn.Embedding, [b, s, h]
    ("embedding.embedding_dropout", "forward", 0),      # SP: after the scatter, [s/tp, b, h]
    ("decoder.layers.0", "forward", 0),                 # TransformerLayer -> (hidden, context)
    ("decoder.layers.1", "forward_pre", 0),             # called with keyword arguments only
    ("decoder", "forward", 0),                          # TransformerBlock (keywords only)
    ("decoder.layers.0.input_layernorm", "forward", 0),  # SP: [s/tp, b, h]
    ("decoder.layers.0.self_attention", "forward", 0),  # (out, bias), keywords only
    ("decoder.layers.0.self_attention", "forward", 1),  # linear_proj's bias, replicated
    ("decoder.layers.0.self_attention.linear_qkv", "forward_pre", 0),  # SP: [s/tp, b, h]
    ("decoder.layers.0.self_attention.linear_qkv", "forward", 0),  # column: [s, b, 3h/tp]
    # Heads split over TP, [s, b, h/tp]: declared by Megatron's framework (the edit sites give
    # its whole shape as well, checked against that).
    ("decoder.layers.0.self_attention.core_attention", "forward", 0),
    ("decoder.layers.0.self_attention.core_attention", "forward_pre", 0),  # query, heads / tp
    ("decoder.layers.0.self_attention.linear_proj", "forward_pre", 0),  # row input [s, b, h/tp]
    ("decoder.layers.0.self_attention.linear_proj", "forward", 0),  # row: (out, bias)
    ("decoder.layers.0.self_attention.linear_proj", "forward", 1),  # its bias, replicated
    ("decoder.layers.0.pre_mlp_layernorm", "forward", 0),  # SP: [s/tp, b, h]
    ("decoder.layers.0.mlp", "forward", 0),             # (out, bias)
    ("decoder.layers.0.mlp", "forward", 1),             # linear_fc2's bias, replicated
    ("decoder.layers.0.mlp.linear_fc1", "forward", 0),  # column: (out [s, b, ff/tp], bias)
    ("decoder.layers.0.mlp.linear_fc1", "forward", 1),  # its bias, [ff/tp] per rank
    ("decoder.layers.0.mlp.linear_fc2", "forward", 0),  # row
    ("decoder.layers.0.mlp.linear_fc2", "forward", 1),  # its bias, replicated
    ("decoder.final_layernorm", "forward", 0),          # SP: [s/tp, b, h]
    ("output_layer", "forward_pre", 0),                 # SP: [s/tp, b, h]
    ("output_layer", "forward", 0),                     # gathered logits [s, b, V]
    # backward: gradients of inputs and outputs, and of parameters
    ("embedding", "full_backward_pre", 0),              # SP: [s/tp, b, h]
    ("embedding.position_embeddings", "full_backward_pre", 0),  # [b, s, h]
    ("decoder.layers.0.self_attention.core_attention", "full_backward_pre", 0),
    ("decoder.layers.1.self_attention.linear_qkv", "full_backward", 0),
    ("decoder.layers.1.self_attention.linear_proj", "full_backward", 0),  # [s, b, h/tp]
    ("decoder.layers.1.mlp", "full_backward_pre", 0),
    ("decoder.layers.1.mlp.linear_fc1", "full_backward", 0),      # SP: [s/tp, b, h]
    ("decoder.layers.1.mlp.linear_fc2", "full_backward_pre", 0),  # SP: [s/tp, b, h]
    ("decoder.layers.1.mlp.linear_fc2", "full_backward", 0),      # [s, b, ff/tp]
    ("decoder.layers.1.mlp.linear_fc1.weight", "tensor", 0),      # column weight
    ("decoder.layers.1.self_attention.linear_proj.weight", "tensor", 0),  # row weight
    ("decoder.layers.1.self_attention.linear_proj.bias", "tensor", 0),    # replicated
    ("decoder.layers.1.input_layernorm.weight", "tensor", 0),  # SP: partial on each rank
    ("embedding.word_embeddings.weight", "tensor", 0),          # vocab-parallel
    ("output_layer.weight", "tensor", 0),
]
# Megatron's vocab-parallel embedding outputs [b, s, h] (batch first; GPT's embedding then
# transposes); under data parallelism its (true) whole shape is declared too, and accepted.
WORD_EMBEDDINGS = ("embedding.word_embeddings", "forward", 0)
# Under data parallelism the batch is on dim 1 of Megatron's activations and on dim 0 of the
# embedding tables' (told by the framework); a bias returned by a layer is not split over dp.
DATA_PARALLEL_SITES = RETRIEVAL_SITES + [WORD_EMBEDDINGS + ((BATCH, SEQ, HIDDEN),)]

# Edits on every kind of site: embeddings, column and row outputs, the core attention, the
# keyword-only input of a block, a block output, a row input, the gradient of a column output,
# a parameter gradient, the logits.
EDIT_SITES = [
    ("embedding", "forward", 0),
    ("decoder.layers.0.self_attention.core_attention", "forward", 0, CORE_ATTENTION),
    ("decoder.layers.0.self_attention.linear_proj", "forward", 0),
    ("decoder.layers.0.mlp.linear_fc1", "forward", 0),
    ("decoder.layers.1", "forward_pre", 0),
    ("decoder.layers.1.mlp.linear_fc2", "forward_pre", 0),
    ("decoder.layers.1", "forward", 0),
    ("decoder.layers.1.mlp.linear_fc1", "full_backward_pre", 0),
    ("decoder.layers.1.mlp.linear_fc2.weight", "tensor", 0),
    ("output_layer", "forward", 0),
]

_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook", "tensor": "register_hook"}


def times_two(module, tensor, ctx, modules):
    return tensor * 2


def times_two_by_position(module, tensor, ctx, modules):
    """Doubling plus a term that depends on each element's place in the whole tensor: a
    layout that puts shards in the wrong place, or edits one shard only, changes the result
    (plain doubling survives a gather and scatter along the wrong dim)."""
    ramp = torch.linspace(0, 1, tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    return tensor * 2 + ramp.view(tensor.shape)


def run_flex(model: nn.Module, sites, edit: bool, process_group=None,
             device: torch.device | str = "cpu", data_parallel: bool = False):
    """FlexModel on ``model`` (sizes not given: adopted) with a hook at every site:
    ``(stored, logits, whole gradients, mesh)``; the model is given back afterwards. When
    ``edit``, the hooks alternate :func:`times_two` and :func:`times_two_by_position`.
    ``data_parallel``: see :func:`forward_backward`."""
    from flex_surgery import FlexModel, HookFunction

    stored: dict[str, list[torch.Tensor]] = {}
    flex = FlexModel(model, stored, process_group=process_group)
    edits = (times_two, times_two_by_position)
    for i, (name, kind, idx, *expected_shape) in enumerate(sites):
        getattr(flex, _REGISTER[kind])(HookFunction(
            name, editing_function=edits[i % 2] if edit else None, unpack_idx=idx,
            replicate_edit=edit == "replicated",
            expected_shape=expected_shape[0] if expected_shape else None))
    logits, grads = forward_backward(model, wrapper=flex, device=device,
                                     data_parallel=data_parallel)
    mesh = getattr(flex.runtime, "mesh", None)
    flex.restore()
    return stored, logits, grads, mesh


def stored_mismatches(got: dict, want: dict, **tol) -> list[str]:
    """Every stored entry that differs from the reference: key, shapes, largest difference
    (all of them, so one failure tells what every hook site sees)."""
    problems = [f"{k}: not stored (reference stored {tuple(want[k][0].shape)})"
                for k in want if k not in got]
    problems += [f"{k}: stored, but not by the reference" for k in got if k not in want]
    for key in want.keys() & got.keys():
        if len(got[key]) != len(want[key]):
            problems.append(f"{key}: {len(got[key])} calls stored, reference {len(want[key])}")
            continue
        for a, b in zip(got[key], want[key]):
            if a.shape != b.shape:
                problems.append(f"{key}: shape {tuple(a.shape)}, reference {tuple(b.shape)}")
            elif not torch.allclose(a, b, **tol):
                problems.append(f"{key}: values differ by up to {(a - b).abs().max().item():.3g}")
    return sorted(problems)


# -- pipeline parallelism with Megatron's schedules --------------------------------------------
MICROBATCHES = 3


def build_gpt_stage(pp: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float64) -> nn.Module:
    """This rank's pipeline stage of the GPTModel (TP=1): the embedding on the first stage,
    the output layer on the last; input and output embeddings untied (tied ones need the
    embedding group's gradient all-reduce of Megatron's training loop)."""
    from megatron.core import parallel_state

    return build_gpt(
        tp=1, device=device, dtype=dtype, pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype, batch_p2p_sync=torch.cuda.is_available(),  # no CUDA: no sync
        model_kwargs=dict(pre_process=parallel_state.is_pipeline_first_stage(),
                          post_process=parallel_state.is_pipeline_last_stage(),
                          share_embeddings_and_output_weights=False))


def global_names(model: nn.Module) -> dict[str, str]:
    """Parameter name in this stage -> name in the whole model (a stage numbers its layers
    from 0; ``layer_number`` is the 1-based global index)."""
    names = {}
    for name in dict(model.named_parameters()):
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            layer = model.decoder.layers[int(parts[2])]
            parts[2] = str(layer.layer_number - 1)
        names[name] = ".".join(parts)
    return names


def load_whole(model: nn.Module, whole: dict[str, torch.Tensor]) -> None:
    """Copy the whole model's weights ``whole`` (by global name) into this stage."""
    names = global_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(whole[names[name]])


def schedule_step(model: nn.Module, device: torch.device | str = "cpu"
                  ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One forward/backward of :data:`MICROBATCHES` micro-batches through Megatron's schedule
    for the initialised pipeline size (1F1B for PP > 1, no pipelining for PP = 1): the losses
    (last stage only; empty elsewhere) and this stage's gradients under global names."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids, pos, mask = gpt_inputs(device)
    batches = [(ids.roll(k, 1), pos, mask, ids.roll(k - 1, 1)) for k in range(MICROBATCHES)]

    def forward_step(data_iterator, stage):
        ids, pos, mask, labels = next(data_iterator)
        out = stage(ids, pos, mask, labels=labels)  # last stage: per-token loss [b, s]

        def loss_func(per_token):
            loss = (per_token * torch.linspace(0.5, 1.5, per_token.numel(), device=device,
                                               dtype=per_token.dtype).view_as(per_token)).sum()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    model.zero_grad(set_to_none=True)
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH,
        forward_only=False)
    names = global_names(model)
    grads = {names[n]: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
    return [r["loss"].cpu() for r in reduced], grads
