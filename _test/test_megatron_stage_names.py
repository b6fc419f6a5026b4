"""Names of a Megatron-core pipeline stage read by other paths than the name
tables ``naming.StageBlockNames`` spells (float64, CPU, gloo), each against the same model in
one process.

Looked at: hook groups and theater patterns (``decoder.layers.*.mlp``) over an uneven split,
seeded noise and masks by whole-model parameter names, the stage's block container after
``ModelSurgery`` put a module without ``layer_number`` in it, layer surgery by block index on a
bare stage, the hook map, ``wrapped_module_names``, and interleaved (virtual) pipeline chunks
(one FlexModel per chunk; ``ModelSurgery`` on a chunk's line).

The stages run by hand as in ``test_megatron_pipeline_stages.py`` (Megatron's schedules need
CUDA); its helpers are reused.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import HEADS, HIDDEN, SEED, VOCAB, gpt_inputs, gpt_parallel, load_whole
from rank_pool import distributed
from test_megatron_pipeline_stages import (
    UNEVEN,
    _all_ranks,
    _one_process_step,
    _pp_mesh,
    _raw_hooks,
    _stage,
    _stage_step,
    _whole,
)
from torch import nn

TOL = dict(rtol=1e-9, atol=1e-11)


def _close(got, want) -> bool:
    return len(got) == len(want) and all(
        a.shape == b.shape and torch.allclose(a, b, **TOL) for a, b in zip(got, want))


class _Skip(nn.Module):
    """A parameter-free stand-in for a Megatron ``TransformerLayer``: returns what the block
    loop unpacks, ``(hidden_states, context)`` (flex_surgery's ``PassThrough`` returns the
    hidden states only, which Megatron's block cannot unpack). It has no ``layer_number``."""

    def forward(self, hidden_states, *args, context=None, **kwargs):
        return hidden_states, context


# -- 1. patterns over an uneven split ------------------------------------------------------------
@distributed(world_size=2)
def test_hook_group_patterns_on_an_uneven_split_equal_one_process():
    """create_hook_group with a glob over blocks (forward, editing) and over block parameters
    (gradients): each stage hooks its own global blocks; rank 0 collects every block's values
    under its whole-model name, equal to one process; logits equal one process with the edit
    on every matched module."""
    from megatron_gpt_cases import times_two_by_position

    from flex_surgery import FlexModel

    mlps = [f"decoder.layers.{i}.mlp" for i in range(4)]
    weights = [f"decoder.layers.{i}.mlp.linear_fc2.weight" for i in range(4)]
    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        want, handles = _raw_hooks(model, [(n, "forward") for n in mlps] +
                                   [(n, "tensor") for n in weights], times_two_by_position)
        want_logits = _one_process_step(model)
    for h in handles:
        h.remove()
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        stored: dict = {}
        flex = FlexModel(stage, stored, key_by_hook_kind=True)
        made = flex.create_hook_group("mlps", "decoder.layers.*.mlp",
                                      editing_function=times_two_by_position)
        grads = flex.create_hook_group("w", "decoder.layers.*.mlp.linear_fc2.weight",
                                       hook_type="tensor",
                                       editing_function=times_two_by_position)
        names = sorted(hf.module_name for hf in made + grads)
        logits, link = _stage_step(stage, flex.runtime.mesh)
        flex.sync_pipeline_outputs(link)
        flex.restore()
    mine = sorted(mlps[:1] + weights[:1]) if dist.get_rank() == 0 else \
        sorted(mlps[1:] + weights[1:])
    assert names == mine
    if dist.get_rank() == 1:
        assert _close(logits, want_logits)
        return
    assert sorted(stored) == sorted(want)
    for key in want:
        assert _close(stored[key], want[key]), key


@pytest.mark.parametrize("kind", ["noise", "mask"])
@distributed(world_size=2)
def test_theater_pattern_noise_and_masks_on_an_uneven_split_equal_one_process(kind):
    """Seeded noise on ``decoder.layers.*.mlp`` (seeded by each parameter's whole-model name)
    and MaskTheater masks keyed by whole-model parameter names: logits equal one process."""
    from flex_surgery import FlexModel
    from flex_surgery.surgery import MaskTheater, SurgicalTheater

    gen = torch.Generator().manual_seed(3)

    def theater(m, whole):
        if kind == "noise":
            return SurgicalTheater(m, layers="decoder.layers.*.mlp", modification_type="noise",
                                   noise_scale=0.05, seed=11)
        masks = {f"decoder.layers.{i}.mlp.linear_fc1.weight":
                 torch.rand(whole[f"decoder.layers.{i}.mlp.linear_fc1.weight"].shape,
                            generator=gen, dtype=torch.float64) > 0.3 for i in (1, 3)}
        return MaskTheater(m, masks)

    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        with theater(model, whole):
            want = _one_process_step(model)
    gen.manual_seed(3)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        flex = FlexModel(stage, {})
        with theater(flex, whole):
            got, _ = _stage_step(stage, flex.runtime.mesh)
        flex.restore()
    if dist.get_rank() == 1:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


# -- 2. a block without layer_number in the stage's container ------------------------------------
def _replaced_by_skip_then(stage_or_model, body):
    """Run ``body`` while ModelSurgery replaces global block 2 by a :class:`_Skip`."""
    from flex_surgery import ModelSurgery

    with ModelSurgery(stage_or_model).replace_layers([2], [_Skip()]):
        return body()


@distributed(world_size=2)
def test_theater_by_name_while_a_block_is_replaced_equals_one_process():
    from flex_surgery import FlexModel
    from flex_surgery.surgery import SurgicalTheater

    name = "decoder.layers.0.mlp"

    def scaled(m, step, layers=name):
        def body():
            with SurgicalTheater(m, layers=layers, modification_type="scale", factor=0.5):
                return step()
        return body

    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        want = _replaced_by_skip_then(model, scaled(model, lambda: _one_process_step(model)))
        alias = _replaced_by_skip_then(model, scaled(
            model, lambda: _one_process_step(model), [name, "decoder.layers.1.mlp"]))
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        flex = FlexModel(stage, {})
        try:
            got = _replaced_by_skip_then(
                flex, scaled(flex, lambda: _stage_step(stage, flex.runtime.mesh)[0]))
            outcome = "ran"
        except Exception as exc:  # noqa: BLE001 - an error on every rank is acceptable
            outcome = type(exc).__name__
        outcomes = _all_ranks(outcome)
        flex.restore()
    assert len(set(outcomes)) == 1, outcomes
    if outcome == "ran" and dist.get_rank() == 1:
        assert not _close(got, alias), \
            "the logits are one process's with the MLPs of blocks 0 and 1 scaled"
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@distributed(world_size=2)
def test_hook_registered_while_a_block_is_replaced_equals_one_process():
    from flex_surgery import FlexModel, HookFunction

    name = "decoder.layers.2"
    with gpt_parallel(tp=1):
        model, whole = _whole(4)

        def one():
            stored, handles = _raw_hooks(model, [(name, "forward"),
                                                 ("decoder.layers.3", "forward")])
            _one_process_step(model)
            for h in handles:
                h.remove()
            return stored
        want = _replaced_by_skip_then(model, one)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole, **UNEVEN)
        stored: dict = {}
        flex = FlexModel(stage, stored)

        def run():
            hf = HookFunction(name)
            try:
                flex.register_forward_hook(hf)
                outcome = "registered"
            except Exception as exc:  # noqa: BLE001 - an error on every rank is acceptable
                outcome = type(exc).__name__
            outcomes = _all_ranks(outcome)
            if len(set(outcomes)) == 1 and outcome == "registered":
                _, link = _stage_step(stage, flex.runtime.mesh)
                flex.sync_pipeline_outputs(link)
            return outcomes
        outcomes = _replaced_by_skip_then(flex, run)
        flex.restore()
    assert len(set(outcomes)) == 1, outcomes
    if outcomes[0] == "registered" and dist.get_rank() == 0:
        assert not _close(stored[name], want["decoder.layers.3"]), \
            f"{name!r} stored the output of global block 3 (one process's decoder.layers.3)"
        assert _close(stored[name], want[name])


# -- 3. layer surgery by block index on a bare stage ---------------------------------------------
@pytest.mark.parametrize("op", ["delete", "replace"])
@distributed(world_size=2)
def test_layer_surgery_by_index_on_a_bare_stage_equals_one_process_or_is_refused(op):
    from flex_surgery.surgery import delete_blocks, replace_blocks

    def surgery(m, blocks=(1,)):
        return delete_blocks(m, list(blocks)) if op == "delete" else \
            replace_blocks(m, {b: _Skip() for b in blocks})

    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        with surgery(model):
            want = _one_process_step(model)
        with surgery(model, (1, 3)):
            alias = _one_process_step(model)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole)
        mesh = _pp_mesh()
        try:
            ctx = surgery(stage)
            ctx.__enter__()
            outcome = "ran"
        except Exception as exc:  # noqa: BLE001 - an error on every rank is acceptable
            outcome = type(exc).__name__
        outcomes = _all_ranks(outcome)
        if outcome == "ran":
            try:
                if len(set(outcomes)) == 1:
                    got, _ = _stage_step(stage, mesh)
            finally:
                ctx.__exit__(None, None, None)
    assert len(set(outcomes)) == 1, outcomes
    if outcome == "ran" and dist.get_rank() == 1:
        assert not _close(got, alias), "the logits are one process's without blocks 1 and 3"
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@distributed(world_size=2)
def test_bare_stage_theater_on_a_name_one_stage_holds():
    """No FlexModel: a stage cannot know the other stages' names. 'decoder.layers.1.mlp'
    (stage 1's block) is unknown on stage 0: today a ValueError there and a RemoteEditError on
    stage 1 (the theater agrees over Megatron's world), so no stage runs on alone into a
    schedule; running and equalling one process would be fine too."""
    from flex_surgery.surgery import SurgicalTheater

    name = "decoder.layers.1.mlp"
    with gpt_parallel(tp=1):
        model, whole = _whole(2)
        with SurgicalTheater(model, layers=name, modification_type="scale", factor=0.5):
            want = _one_process_step(model)
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(2, whole)
        mesh = _pp_mesh()
        theater = SurgicalTheater(stage, layers=name, modification_type="scale", factor=0.5)
        try:
            theater.__enter__()
            outcome = "ran"
        except Exception as exc:  # noqa: BLE001 - an error on every rank is acceptable
            outcome = type(exc).__name__
        outcomes = _all_ranks(outcome)
        if outcome == "ran":
            try:
                if len(set(outcomes)) == 1:
                    got, _ = _stage_step(stage, mesh)
            finally:
                theater.__exit__(None, None, None)
    assert outcomes == ["ran", "ran"] or "ran" not in outcomes, outcomes
    if outcome == "ran" and dist.get_rank() == 1:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


# -- 4. listings: the hook map and wrapped_module_names ---------------------------------------
def _module_of(stage: nn.Module, node_name: str) -> nn.Module | None:
    """The module a hook-map node stands for, whether the map spells the stage's blocks by
    local position or by whole-model name (on stage 1 of 4 blocks, 2 + 2, the two sets of
    block names do not overlap)."""
    from flex_surgery.naming import modules_by_clean_name

    local = dict(stage.named_modules())
    return modules_by_clean_name(stage).get(node_name, local.get(node_name))


@distributed(world_size=2)
def test_hook_map_puts_hooks_on_the_hooked_modules():
    from flex_surgery import FlexModel, HookFunction
    from flex_surgery.viz import hook_map

    with gpt_parallel(tp=1):
        whole = _whole(4)[1]
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole)
        flex = FlexModel(stage, {})
        for i in range(4):
            flex.register_forward_hook(HookFunction(f"decoder.layers.{i}.mlp"))
        hmap = hook_map(flex)
        placed = {h.key: _module_of(stage, node.name) for node in hmap.root.walk()
                  for h in node.hooks}
        flex.restore()
    mine = (0, 1) if dist.get_rank() == 0 else (2, 3)
    local = {g: stage.decoder.layers[g - mine[0]].mlp for g in mine}
    for i in range(4):
        key = f"decoder.layers.{i}.mlp"
        if i in local:
            assert placed[key] is local[i], f"{key} drawn on another module"
        else:  # another stage's hook: on none of this stage's blocks
            assert all(placed.get(key) is not m for m in local.values()), \
                f"{key} (stage {1 - dist.get_rank()}) drawn on this stage's block"


@distributed(world_size=2)
def test_wrapped_module_names_spell_blocks_as_hooks_do():
    from flex_surgery import FlexModel

    with gpt_parallel(tp=1):
        whole = _whole(4)[1]
    with gpt_parallel(tp=1, pp=2):
        stage = _stage(4, whole)
        flex = FlexModel(stage, {})
        listed = {n for n in flex.wrapped_module_names if n.startswith("decoder.layers.")
                  and n.count(".") == 2}
        flex.restore()
    want = {"decoder.layers.0", "decoder.layers.1"} if dist.get_rank() == 0 else \
        {"decoder.layers.2", "decoder.layers.3"}
    assert listed == want


# -- 5. interleaved (virtual) pipeline chunks -----------------------------------------------
VP = 2


def _chunks(num_layers: int, whole: dict[str, torch.Tensor]) -> list[nn.Module]:
    """This rank's VP chunks of the whole model (pp=2), with the whole model's weights: chunk
    c on stage p holds global blocks c * L / VP + p * L / (VP * 2) ..."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.float64
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    chunks = []
    for c in range(VP):
        torch.manual_seed(SEED)
        cfg = TransformerConfig(
            num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
            tensor_model_parallel_size=1, use_cpu_initialization=True, hidden_dropout=0.0,
            attention_dropout=0.0, params_dtype=dtype, pipeline_model_parallel_size=2,
            virtual_pipeline_model_parallel_size=VP, pipeline_dtype=dtype,
            batch_p2p_sync=False)
        chunk = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB,
                         max_sequence_length=16, parallel_output=False,
                         share_embeddings_and_output_weights=False,
                         pre_process=first and c == 0, post_process=last and c == VP - 1,
                         vp_stage=c).to(dtype=dtype)
        load_whole(chunk, whole)
        chunks.append(chunk)
    return chunks


def _interleaved_forward(chunks: list[nn.Module]) -> torch.Tensor | None:
    """One forward of the batch through the chunks in pipeline order (stage 0 chunk 0, stage 1
    chunk 0, stage 0 chunk 1, ...), activations sent by hand over the world (= the pp group):
    the logits on the last stage, None elsewhere."""
    ids, pos, mask = gpt_inputs()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = None
    for c, chunk in enumerate(chunks):
        if not (rank == 0 and c == 0):
            h = torch.empty(ids.shape[1], ids.shape[0], HIDDEN, dtype=torch.float64)
            dist.recv(h, src=(rank - 1) % world)
            chunk.set_input_tensor(h)
        out = chunk(ids, pos, mask)
        if not (rank == world - 1 and c == len(chunks) - 1):
            dist.send(out.detach().contiguous(), dst=(rank + 1) % world)
    return out.detach() if rank == world - 1 else None


@distributed(world_size=2)
def test_interleaved_chunks_hold_the_expected_blocks_and_run_as_one_process():
    """The set-up the next tests rely on: 4 blocks, pp=2, vp=2: stage 0 holds global blocks 0
    and 2 (one per chunk), stage 1 blocks 1 and 3; the hand-run forward equals one process."""
    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        with torch.no_grad():
            want = model(*gpt_inputs())
    with gpt_parallel(tp=1, pp=2):
        chunks = _chunks(4, whole)
        numbers = [[b.layer_number for b in c.decoder.layers] for c in chunks]
        with torch.no_grad():
            got = _interleaved_forward(chunks)
    assert numbers == ([[1], [3]] if dist.get_rank() == 0 else [[2], [4]])
    if got is not None:
        torch.testing.assert_close(got, want, **TOL)


@distributed(world_size=2)
def test_interleaved_chunk_hooks_by_global_name_equal_one_process():
    """One FlexModel per chunk: hooks by whole-model block names on the chunk line that holds
    them fire on the right rank and are collected on rank 0 equal to one process; a block of
    the other chunk line is an UnknownNameError on every rank."""
    from flex_surgery import FlexModel, HookFunction
    from flex_surgery.hooks.errors import UnknownNameError

    sites = [f"decoder.layers.{i}.mlp" for i in range(4)]
    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        want, handles = _raw_hooks(model, [(n, "forward") for n in sites])
        with torch.no_grad():
            want_logits = model(*gpt_inputs())
    for h in handles:
        h.remove()
    with gpt_parallel(tp=1, pp=2):
        chunks = _chunks(4, whole)
        stored = [{}, {}]
        flexes = [FlexModel(c, s) for c, s in zip(chunks, stored)]
        for i, name in enumerate(sites):
            line = i // 2  # chunk 0 line: blocks 0, 1; chunk 1 line: blocks 2, 3
            flexes[line].register_forward_hook(HookFunction(name))
            with pytest.raises(UnknownNameError):
                flexes[1 - line].register_forward_hook(HookFunction(name))
        with torch.no_grad():
            logits = _interleaved_forward(chunks)
        for flex in flexes:
            flex.sync_pipeline_outputs()
            flex.restore()
    if logits is not None:
        torch.testing.assert_close(logits, want_logits, **TOL)
    if dist.get_rank() == 0:
        got = {**stored[0], **stored[1]}
        assert sorted(got) == sorted(want)
        for key in want:
            assert _close(got[key], want[key]), key


@distributed(world_size=2)
def test_model_surgery_negative_index_on_an_interleaved_chunk_line():
    from megatron.core import parallel_state

    from flex_surgery import ModelSurgery
    from flex_surgery.surgery import delete_blocks

    with gpt_parallel(tp=1):
        model, whole = _whole(8)
        with delete_blocks(model, [-1]), torch.no_grad():
            want = model(*gpt_inputs())
        with delete_blocks(model, [3]), torch.no_grad():
            alias = model(*gpt_inputs())
    with gpt_parallel(tp=1, pp=2):
        chunks = _chunks(8, whole)
        group = parallel_state.get_pipeline_model_parallel_group()
        outcome, got = "ran", None
        try:
            surgery = ModelSurgery(chunks[0], pipeline_group=group)
            with surgery.delete_layers([-1]), torch.no_grad():
                got = _interleaved_forward(chunks)
        except Exception as exc:  # noqa: BLE001 - an error on every rank is acceptable
            outcome = type(exc).__name__
        outcomes = _all_ranks(outcome)
    assert len(set(outcomes)) == 1, outcomes
    if got is not None:
        assert not torch.allclose(got, alias, **TOL), "one process's logits without block 3"
        torch.testing.assert_close(got, want, **TOL)


@distributed(world_size=2)
def test_interleaved_chunk_full_weights_and_noise_by_global_name_equal_one_process():
    """full_weights of each chunk FlexModel spells its blocks by whole-model names with the
    one-process values; seeded noise on 'decoder.layers.*.mlp' over both chunk lines equals
    one process."""
    from flex_surgery import FlexModel
    from flex_surgery.export import full_weights
    from flex_surgery.surgery import SurgicalTheater

    def noisy(m):
        return SurgicalTheater(m, layers="decoder.layers.*.mlp", modification_type="noise",
                               noise_scale=0.05, seed=5)

    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        with noisy(model), torch.no_grad():
            want = model(*gpt_inputs())
    with gpt_parallel(tp=1, pp=2):
        chunks = _chunks(4, whole)
        flexes = [FlexModel(c, {}) for c in chunks]
        weights = [full_weights(f) for f in flexes]
        with noisy(flexes[0]), noisy(flexes[1]), torch.no_grad():
            got = _interleaved_forward(chunks)
        for f in flexes:
            f.restore()
    rank = dist.get_rank()
    for c, w in enumerate(weights):
        block = 2 * c + rank
        names = {n for n in w if n.startswith("decoder.layers.")}
        assert {n.split(".")[2] for n in names} == {str(block)}, (c, sorted(names)[:3])
        for n in names:
            torch.testing.assert_close(w[n], whole[n], rtol=0, atol=0, msg=n)
    if got is not None:
        torch.testing.assert_close(got, want, **TOL)
