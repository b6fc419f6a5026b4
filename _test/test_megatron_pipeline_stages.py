"""flex_surgery on Megatron-core GPTModel *pipeline stages* (CPU, gloo, float64), each against
the same model (same full weights) in one process.

A Megatron stage numbers its blocks from 0 (``decoder.layers.<local>``); ``layer_number``
(1-based) tells the global index, and flex_surgery's name tables spell a stage's blocks with
it (``naming.StageBlockNames``), so users name blocks as in the whole model. Megatron's
schedules allocate on CUDA, so the stages run by hand over a
:class:`~flex_surgery.parallel.pipeline.StageLink`, micro-batch by micro-batch, forward and
backward, as ``test_megatron_lens_pipeline.py`` does.

What is checked:

* hooks on the modules each stage holds alone (embedding, final norm, output layer, their
  parameters' gradients), with and without edits: collected on rank 0 per micro-batch;
* hooks on blocks by the whole model's names, even and uneven splits
  (``num_layers_in_first_pipeline_stage``); a name no block has: an error on every rank;
* ``FlexModel.get_module_parameter`` and ``SurgicalTheater`` with block names; a block *index*
  on a bare stage (no FlexModel to tell the other stages' blocks): refused on every rank;
* ``ModelSurgery`` (delete / permute / replace with global indices) on even and uneven splits;
* TP=2 x PP=2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import (
    HEADS,
    HIDDEN,
    MICROBATCHES,
    SEED,
    SEQ,
    VOCAB,
    gpt_inputs,
    gpt_parallel,
    load_whole,
    loss_of,
    times_two_by_position,
)
from rank_pool import distributed
from torch import nn

TOL = dict(rtol=1e-9, atol=1e-11)


# -- building -------------------------------------------------------------------------------------
def _gpt(num_layers: int, pp: int = 1, tp: int = 1, **config) -> nn.Module:
    """The tiny local-spec GPTModel (untied embeddings, float64) with ``num_layers`` blocks;
    with ``pp > 1`` this rank's stage of it (Megatron's parallel_state must be set up)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.float64
    torch.manual_seed(SEED)
    kwargs = dict(share_embeddings_and_output_weights=False)
    if pp > 1:
        config.update(pipeline_model_parallel_size=pp, pipeline_dtype=dtype,
                      batch_p2p_sync=False)
        kwargs.update(pre_process=parallel_state.is_pipeline_first_stage(),
                      post_process=parallel_state.is_pipeline_last_stage())
    cfg = TransformerConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            tensor_model_parallel_size=tp, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
                            **config)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     parallel_output=False, **kwargs)
    return model.to(dtype=dtype)


def _whole(num_layers: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The whole model (Megatron state at TP=1, PP=1) and its weights; the model keeps the
    groups of the state it was built in, so run it inside that ``gpt_parallel(tp=1)``."""
    model = _gpt(num_layers)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def _weights(num_layers: int) -> dict[str, torch.Tensor]:
    with gpt_parallel(tp=1):
        return _whole(num_layers)[1]


def _stage(num_layers: int, whole: dict[str, torch.Tensor], **config) -> nn.Module:
    """This rank's PP=2 stage with the whole model's weights (call inside gpt_parallel)."""
    stage = _gpt(num_layers, pp=2, **config)
    load_whole(stage, whole)
    return stage


def _global(stage: nn.Module, local: int) -> int:
    return stage.decoder.layers[local].layer_number - 1


# -- running --------------------------------------------------------------------------------------
def _micro_batches():
    ids, pos, mask = gpt_inputs()
    return [(ids.roll(k, 1), pos, mask) for k in range(MICROBATCHES)]


def _one_process_step(model: nn.Module) -> list[torch.Tensor]:
    """Forward and backward of every micro-batch in turn (gradients accumulate): the logits.
    Call inside ``gpt_parallel(tp=1)`` (Megatron's buffers)."""
    model.zero_grad(set_to_none=True)
    logits = []
    for ids, pos, mask in _micro_batches():
        out = model(ids, pos, mask)
        loss_of(out).backward()
        logits.append(out.detach())
    return logits


def _stage_step(stage: nn.Module, mesh) -> tuple[list[torch.Tensor], object]:
    """The same on two stages by hand (forward then backward per micro-batch): the logits on
    the last stage ([] elsewhere), and the step's link."""
    from flex_surgery.parallel.pipeline import StageLink

    stage.zero_grad(set_to_none=True)
    link = StageLink(mesh, timeout_s=60)
    logits = []
    with link.step():
        for ids, pos, mask in _micro_batches():
            if link.is_first:
                y = stage(ids, pos, mask)
                link.send_forward(y.detach())
                y.backward(link.recv_backward())
            else:
                h = link.recv_forward(requires_grad=True)
                stage.set_input_tensor(h)
                out = stage(ids, pos, mask)
                loss_of(out).backward()
                link.send_backward(h.grad)
                logits.append(out.detach())
    return logits, link


def _global_grads(stage: nn.Module) -> dict[str, torch.Tensor]:
    from megatron_gpt_cases import global_names

    names = global_names(stage)
    return {names[n]: None if p.grad is None else p.grad.detach().clone()
            for n, p in stage.named_parameters()}


_TORCH_KIND = {"forward": "register_forward_hook",
               "full_backward_pre": "register_full_backward_pre_hook"}


def _raw_hooks(model: nn.Module, sites, edit=None) -> tuple[dict, list]:
    """Plain torch hooks at ``sites`` ((name, kind) pairs) of the one-process model: what they
    see, stored as FlexModel stores it (``key_by_hook_kind=True``), and ``edit`` applied."""
    stored: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, kind in sites:
        key = name + {"forward": "", "full_backward_pre": ":grad_output", "tensor": ":grad"}[kind]

        def keep(t, key=key):
            stored.setdefault(key, []).append(t.detach().clone())
            return t if edit is None else edit(None, t, None, None)

        if kind == "tensor":
            handles.append(model.get_parameter(name).register_hook(keep))
        elif kind == "forward":
            def hook(m, args, out, keep=keep):
                if isinstance(out, tuple):
                    return (keep(out[0]),) + out[1:]
                return keep(out)
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        else:
            def hook(m, grad_out, keep=keep):
                return (keep(grad_out[0]),) + tuple(grad_out[1:])
            handles.append(model.get_submodule(name).register_full_backward_pre_hook(hook))
    return stored, handles


def _flex_hooks(flex, sites, edit=None) -> None:
    from flex_surgery import HookFunction

    for name, kind in sites:
        method = {"forward": flex.register_forward_hook, "tensor": flex.register_hook,
                  "full_backward_pre": flex.register_full_backward_pre_hook}[kind]
        method(HookFunction(name, editing_function=edit))


def _all_ranks(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# -- 1. hooks on what one stage holds -------------------------------------------------------------
# Stage 0 holds the embedding, stage 1 the final norm and the output layer; every block is named
# decoder.layers.0 on its stage, so no block is among these.
STAGE_SITES = [("embedding", "forward"), ("embedding.word_embeddings.weight", "tensor"),
               ("embedding.position_embeddings.weight", "tensor"),
               ("decoder.final_layernorm", "forward"), ("output_layer", "forward"),
               ("output_layer", "full_backward_pre"), ("output_layer.weight", "tensor")]


@pytest.mark.parametrize("edit", [False, True])
@distributed(world_size=2)
def test_stage_hooks_collect_on_rank0_and_edits_equal_one_process(edit):
    """Every micro-batch's value of every site lands on rank 0 under its name, in micro-batch
    order, equal to one process; rank 1 keeps nothing; the logits and every parameter gradient
    (under global names) equal one process with the same edit."""
    from flex_surgery import FlexModel

    fn = times_two_by_position if edit else None
    with gpt_parallel(tp=1):
        model, whole = _whole(2)
        want, handles = _raw_hooks(model, STAGE_SITES, fn)
        want_logits = _one_process_step(model)
    for h in handles:
        h.remove()
    want_grads = {n: p.grad for n, p in model.named_parameters()}
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(2, whole)
        stored: dict = {}
        flex = FlexModel(stage, stored, key_by_hook_kind=True)
        assert flex.runtime.mesh.pp_size == 2
        _flex_hooks(flex, STAGE_SITES, fn)
        logits, link = _stage_step(stage, flex.runtime.mesh)
        flex.sync_pipeline_outputs(link)
        grads = _global_grads(stage)
        flex.restore()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **TOL, msg=name)
    if dist.get_rank() == 1:
        assert stored == {}
        for a, b in zip(logits, want_logits, strict=True):
            torch.testing.assert_close(a, b, **TOL)
        return
    assert sorted(stored) == sorted(want)
    for key in want:
        assert len(stored[key]) == MICROBATCHES, key
        for a, b in zip(stored[key], want[key]):
            torch.testing.assert_close(a, b, **TOL, msg=key)


@distributed(world_size=2)
def test_block_names_on_an_even_split_are_the_whole_models():
    """Each stage numbers its blocks from 0, but hooks take the whole model's names: stage 1's
    first block is decoder.layers.1 (layer_number 2). Its output and its weight's gradient
    equal one process; decoder.layers.2 (no such block) is UnknownNameError on every rank."""
    from flex_surgery import FlexModel, HookFunction
    from flex_surgery.hooks.errors import UnknownNameError

    sites = [("decoder.layers.0", "forward"), ("decoder.layers.1", "forward")]
    with gpt_parallel(tp=1):
        model, whole = _whole(2)
        want, handles = _raw_hooks(model, sites)
        _one_process_step(model)
    for h in handles:
        h.remove()
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(2, whole)
        stored: dict = {}
        flex = FlexModel(stage, stored)
        for name, _ in sites:
            flex.register_forward_hook(HookFunction(name))
        with pytest.raises(UnknownNameError):
            flex.register_forward_hook(HookFunction("decoder.layers.2"))
        _, link = _stage_step(stage, flex.runtime.mesh)
        flex.sync_pipeline_outputs(link)
        flex.restore()
        assert not any(m._forward_hooks for m in stage.modules())
    if dist.get_rank() == 0:
        for name, _ in sites:
            assert len(stored[name]) == MICROBATCHES, name
            for a, b in zip(stored[name], want[name]):
                torch.testing.assert_close(a, b, **TOL, msg=name)


# -- uneven split: a stage-local name held by one stage only ---------------------------------------
UNEVEN = dict(num_layers_in_first_pipeline_stage=1)  # 4 blocks: stage 0 holds 1, stage 1 holds 3


@distributed(world_size=2)
def test_uneven_split_stage_numbers_blocks_locally():
    """The set-up the next tests rely on: stage 0 holds global block 0 (decoder.layers.0),
    stage 1 holds global blocks 1, 2, 3 as decoder.layers.0, .1, .2."""
    whole = _weights(4)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        numbers = [layer.layer_number for layer in stage.decoder.layers]
    assert numbers == ([1] if dist.get_rank() == 0 else [2, 3, 4])


@distributed(world_size=2)
def test_uneven_split_block_hook_names_the_whole_models_block():
    """A hook on decoder.layers.1 must see what decoder.layers.1 of the whole model outputs,
    or be refused on every rank."""
    from flex_surgery import FlexModel, HookFunction
    from flex_surgery.hooks.errors import FlexModelError

    name = "decoder.layers.1"
    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        want, handles = _raw_hooks(model, [(name, "forward"), ("decoder.layers.2", "forward")])
        _one_process_step(model)
    for h in handles:
        h.remove()
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        stored: dict = {}
        flex = FlexModel(stage, stored)
        try:
            flex.register_forward_hook(HookFunction(name))
            outcome = "registered"
        except FlexModelError:
            outcome = "refused"
        outcomes = _all_ranks(outcome)
        if outcome == "registered":
            _, link = _stage_step(stage, flex.runtime.mesh)
            flex.sync_pipeline_outputs(link)
        flex.restore()
    assert len(set(outcomes)) == 1, outcomes
    if outcome == "registered" and dist.get_rank() == 0:
        assert len(stored[name]) == MICROBATCHES
        aliased = all(torch.allclose(a, b, **TOL)
                      for a, b in zip(stored[name], want["decoder.layers.2"]))
        assert not aliased, f"{name!r} holds the output of global block 2 (decoder.layers.2)"
        for a, b in zip(stored[name], want[name]):
            torch.testing.assert_close(a, b, **TOL)


# -- 3. whole parameters and SurgicalTheater under block names ------------------------------------
@distributed(world_size=2)
def test_get_module_parameter_takes_the_whole_models_block_names():
    """decoder.layers.0 is stage 0's block, decoder.layers.1 stage 1's (its local block 0):
    the stage holding it returns the one-process value; the other raises UnknownNameError
    (as for any parameter of another stage, below)."""
    from flex_surgery import FlexModel
    from flex_surgery.hooks.errors import UnknownNameError

    whole = _weights(2)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(2, whole)
        flex = FlexModel(stage, {})
        for owner in (0, 1):
            name = f"decoder.layers.{owner}.mlp.linear_fc1.weight"
            if dist.get_rank() == owner:
                assert torch.equal(flex.get_module_parameter(name), whole[name]), name
            else:
                with pytest.raises(UnknownNameError):
                    flex.get_module_parameter(name)
        flex.restore()


@distributed(world_size=2)
def test_get_module_parameter_of_another_stage():
    """What happens today for a parameter only the other stage holds: UnknownNameError on the
    ranks that do not hold it, the whole value (equal to one process) on the stage that does.
    Pinned so a change is seen: the call is documented as giving the parameter 'on every
    rank'."""
    from flex_surgery import FlexModel
    from flex_surgery.hooks.errors import UnknownNameError

    whole = _weights(2)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(2, whole)
        flex = FlexModel(stage, {})
        for name, owner in (("embedding.word_embeddings.weight", 0), ("output_layer.weight", 1)):
            if dist.get_rank() == owner:
                assert torch.equal(flex.get_module_parameter(name), whole[name])
            else:
                with pytest.raises(UnknownNameError):
                    flex.get_module_parameter(name)
        flex.restore()


@distributed(world_size=2)
def test_theater_with_a_name_one_stage_holds_equals_one_process():
    """Even split: 'output_layer' and 'embedding.word_embeddings' (one stage each) are scaled
    where they live; logits equal one process, weights restored bit for bit."""
    from flex_surgery import FlexModel
    from flex_surgery.surgery import SurgicalTheater

    layers = ["output_layer", "embedding.word_embeddings"]
    with gpt_parallel(tp=1):
        model, whole = _whole(2)
        with SurgicalTheater(model, layers=layers, modification_type="scale", factor=0.5,
                             params="weights"):
            want = _one_process_step(model)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(2, whole)
        before = {n: p.detach().clone() for n, p in stage.named_parameters()}
        flex = FlexModel(stage, {})
        with SurgicalTheater(flex, layers=layers, modification_type="scale", factor=0.5,
                             params="weights"):
            got, _ = _stage_step(stage, flex.runtime.mesh)
        flex.restore()
        for n, p in stage.named_parameters():
            assert torch.equal(p, before[n]), n
    if dist.get_rank() == 1:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@distributed(world_size=2)
def test_uneven_split_theater_on_a_block_name_equals_one_process():
    from flex_surgery import FlexModel
    from flex_surgery.surgery import SurgicalTheater

    name = "decoder.layers.1.mlp"
    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        with SurgicalTheater(model, layers=name, modification_type="scale", factor=0.5):
            want = _one_process_step(model)
        with SurgicalTheater(model, layers="decoder.layers.2.mlp", modification_type="scale",
                             factor=0.5):
            alias = _one_process_step(model)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        flex = FlexModel(stage, {})
        try:
            with SurgicalTheater(flex, layers=name, modification_type="scale", factor=0.5):
                got, _ = _stage_step(stage, flex.runtime.mesh)
            outcome = "ran"
        except ValueError:
            outcome = "refused"
        outcomes = _all_ranks(outcome)
        flex.restore()
    assert len(set(outcomes)) == 1, outcomes
    if outcome == "ran" and dist.get_rank() == 1:
        assert not all(torch.allclose(a, b, **TOL) for a, b in zip(got, alias)), \
            "the logits are those of one process with another block modified"
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@distributed(world_size=2)
def test_theater_block_index_on_a_bare_megatron_stage():
    from flex_surgery.surgery import SurgicalTheater

    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        with SurgicalTheater(model, layers=1, modification_type="scale", factor=0.5):
            want = _one_process_step(model)
        with SurgicalTheater(model, layers=[1, 3], modification_type="scale", factor=0.5):
            alias = _one_process_step(model)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole)
        mesh = _pp_mesh()
        assert mesh.pp_size == 2
        try:
            with SurgicalTheater(stage, layers=1, modification_type="scale", factor=0.5):
                got, _ = _stage_step(stage, mesh)
            outcome = "ran"
        except Exception as exc:  # noqa: BLE001 - any error on every rank is acceptable
            outcome = type(exc).__name__
        outcomes = _all_ranks(outcome)
    assert len(set(outcomes)) == 1, outcomes
    if outcome == "ran" and dist.get_rank() == 1:
        assert not all(torch.allclose(a, b, **TOL) for a, b in zip(got, alias)), \
            "the logits are those of one process with another block modified"
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def _pp_mesh():
    """The mesh a FlexModel adopts from Megatron's parallel_state (for a StageLink only)."""
    from flex_surgery.parallel.mesh import ParallelMesh

    return ParallelMesh.adopt()


# -- 2. ModelSurgery with global indices -----------------------------------------------------
def _run_surgery(model, op: str, arg):
    from flex_surgery import ModelSurgery

    s = ModelSurgery(model)
    if op == "delete":
        return s.delete_layers(arg)
    if op == "permute":
        return s.permute_layers(arg)
    return s.replace_layers(*arg)


def _by_hand(model: nn.Module, op: str, arg) -> list[torch.Tensor]:
    """The one-process reference done with torch alone: a new ModuleList in place."""
    layers = model.decoder.layers
    if op == "delete":
        new = [layer for i, layer in enumerate(layers) if i not in arg]
    elif op == "permute":
        new = [layers[i] for i in arg]
    else:
        idx, repl = arg
        new = [repl[idx.index(i)] if i in idx else layer for i, layer in enumerate(layers)]
    model.decoder.layers = nn.ModuleList(new)
    try:
        return _one_process_step(model)
    finally:
        model.decoder.layers = layers


SURGERIES = [
    # (num_layers, config, op, argument(s) by global index)
    (4, {}, "delete", [1]),
    (4, {}, "delete", [0, 3]),
    (4, {}, "permute", [1, 0, 3, 2]),
    (4, UNEVEN, "delete", [2]),
    (4, UNEVEN, "permute", [0, 3, 1, 2]),
    (4, UNEVEN, "replace", ([2], [3])),   # block 2 replaced by (a shared) block 3
    (4, {}, "replace", ([0, 3], [1, 2])),  # 0 <- 1 on stage 0, 3 <- 2 on stage 1
]


@pytest.mark.parametrize("layers, config, op, arg", SURGERIES)
@distributed(world_size=2)
def test_model_surgery_on_stages_equals_one_process(layers, config, op, arg):
    """ModelSurgery on the FlexModel over the stages, global indices: logits and gradients
    (under global names) equal one process with the same blocks; the containers come back."""
    from flex_surgery import FlexModel

    def resolve(m, arg, global_of=None):  # replacements given as global block indices
        if op != "replace":
            return arg
        idx, src = arg
        blocks = {global_of(m, j) if global_of else j: blk
                  for j, blk in enumerate(m.decoder.layers)}
        return idx, [blocks.get(i) for i in src]

    with gpt_parallel(tp=1):
        model, whole = _whole(layers)
        want = _by_hand(model, op, resolve(model, arg))
    want_grads = {n: p.grad for n, p in model.named_parameters()}
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(layers, whole, **config)
        container = stage.decoder.layers
        flex = FlexModel(stage, {})
        if op == "replace":  # a stage can only use its own blocks: others by a stand-in
            idx, src = resolve(stage, arg, _global)
            stand_in = stage.decoder.layers[0]
            use = (idx, [b if b is not None else stand_in for b in src])
        else:
            use = arg
        with _run_surgery(flex, op, use):
            got, _ = _stage_step(stage, flex.runtime.mesh)
        grads = _global_grads(stage)
        flex.restore()
        assert stage.decoder.layers is container
    for name, g in grads.items():
        if g is None or want_grads[name] is None:  # a deleted or replaced block's
            assert g is None and want_grads[name] is None, name
        else:
            torch.testing.assert_close(g, want_grads[name], **TOL, msg=name)
    if dist.get_rank() == 1:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@distributed(world_size=2)
def test_model_surgery_refuses_moving_a_block_across_stages_on_every_rank():
    from flex_surgery import FlexModel, ModelSurgery
    from flex_surgery.surgery import SurgeryError

    whole = _weights(4)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        flex = FlexModel(stage, {})
        s = ModelSurgery(flex)
        assert (s.num_layers, list(s.block_indices)) == \
            (4, [0] if dist.get_rank() == 0 else [1, 2, 3])
        with pytest.raises(SurgeryError, match="moves block"):
            with s.permute_layers([1, 0, 2, 3]):
                pass
        with pytest.raises(SurgeryError, match="without blocks"):
            with s.delete_layers([0]):
                pass
        flex.restore()


# -- 4. TP=2 x PP=2 -----------------------------------------------------------------------------
def _load_sharded(stage: nn.Module, whole: dict[str, torch.Tensor]) -> None:
    """Copy the whole model's weights into this TP rank's shards of this stage (local spec:
    every split is one contiguous block per rank, partition_stride 1)."""
    from megatron.core import parallel_state
    from megatron_gpt_cases import global_names

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    names = global_names(stage)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            full = whole[names[name]]
            if getattr(p, "tensor_model_parallel", False):
                assert getattr(p, "partition_stride", 1) == 1, name
                full = full.chunk(tp, p.partition_dim)[rank]
            p.copy_(full)


@pytest.mark.parametrize("edit", [False, True])
@distributed(world_size=4)
def test_tp2_pp2_stage_hooks_and_edits_equal_one_process(edit):
    """Megatron TP=2 inside each of 2 stages (ranks 0, 1: stage 0; 2, 3: stage 1): every
    site's micro-batches on rank 0 equal one process, nothing elsewhere; logits and whole
    gradients equal one process with the same edit."""
    from megatron_gpt_cases import full_tensors, global_names

    from flex_surgery import FlexModel

    fn = times_two_by_position if edit else None
    with gpt_parallel(tp=1):
        model, whole = _whole(2)
        want, handles = _raw_hooks(model, STAGE_SITES, fn)
        want_logits = _one_process_step(model)
    for h in handles:
        h.remove()
    want_grads = {n: p.grad for n, p in model.named_parameters()}
    with gpt_parallel(tp=2, pp=2):
        stage = _gpt(2, pp=2, tp=2)
        _load_sharded(stage, whole)
        stored: dict = {}
        flex = FlexModel(stage, stored, key_by_hook_kind=True)
        mesh = flex.runtime.mesh
        assert (mesh.tp_size, mesh.pp_size) == (2, 2)
        _flex_hooks(flex, STAGE_SITES, fn)
        logits, link = _stage_step(stage, mesh)
        flex.sync_pipeline_outputs(link)
        names = global_names(stage)
        grads = {names[n]: g for n, g in full_tensors(stage, grads=True).items()}
        flex.restore()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **TOL, msg=name)
    if dist.get_rank() >= 2:
        for a, b in zip(logits, want_logits, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    if dist.get_rank() != 0:
        assert stored == {}
        return
    assert sorted(stored) == sorted(want)
    for key in want:
        assert len(stored[key]) == MICROBATCHES, key
        for a, b in zip(stored[key], want[key]):
            torch.testing.assert_close(a, b, **TOL, msg=key)
