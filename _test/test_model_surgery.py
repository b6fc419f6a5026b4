"""ModelSurgery: the Arrakis / tuned-lens names over LayerSurgery. Getters answer from the anatomy;
delete / permute / replace run the chosen blocks and reinstall the original container; bad input
is a clear error that changes nothing. Under pipeline parallelism indices are global and each
stage applies its part (equal to one process); under tensor parallelism replacements are checked
for their sharding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_cases import Block
from rank_pool import destroy_fairscale_model_parallel, distributed
from test_lens import N_BLOCKS, H, fairscale_lm, ids_for, plain_lm
from test_lens import _stage as pipeline_stage
from torch import nn

from flex_surgery import ModelSurgery
from flex_surgery.anatomy import MissingPart, UnknownArchitecture
from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import PassThrough, SurgeryError, delete_blocks, permute_blocks
from flex_surgery.surgery.model_surgery import ShardingMismatchError


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama", num_hidden_layers=3)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_getters_match_arrakis_and_tuned_lens(llama):
    surgery = ModelSurgery(llama)
    assert surgery.get_model() is llama
    path, layers = surgery.get_transformer_layers()
    assert (path, layers) == ("model.layers", llama.model.layers)
    assert surgery.get_final_norm() is llama.model.norm
    assert surgery.get_unembedding() is llama.lm_head
    assert surgery.num_layers == 3 and list(surgery.block_indices) == [0, 1, 2]
    with pytest.raises(MissingPart):
        ModelSurgery(tiny_hf_model("llama").model).get_unembedding()  # bare LlamaModel


@pytest.mark.parametrize("use,same_as", [
    (lambda s: s.delete_layers([1]), lambda m: delete_blocks(m, [1])),
    (lambda s: s.delete_layers([-1, 0]), lambda m: delete_blocks(m, [0, 2])),
    (lambda s: s.permute_layers([2, 0, 1]), lambda m: permute_blocks(m, [2, 0, 1])),
    (lambda s: s.replace_layers([1], [PassThrough()]), lambda m: delete_blocks(m, [1])),
])
def test_context_managers_run_the_chosen_blocks_and_restore(llama, use, same_as):
    ids = example_inputs("llama")["input_ids"]
    container, blocks = llama.model.layers, list(llama.model.layers)
    base = _logits(llama, ids)
    with same_as(llama):
        want = _logits(llama, ids)
    with use(ModelSurgery(llama)) as model:
        assert model is llama  # yields the model, as Arrakis does
        got = _logits(llama, ids)
    assert torch.equal(got, want) and not torch.equal(got, base)
    assert llama.model.layers is container and list(container) == blocks
    assert torch.equal(_logits(llama, ids), base)


def test_replacements_in_context_and_nesting(llama):
    ids = example_inputs("llama")["input_ids"]
    surgery = ModelSurgery(llama)
    container = llama.model.layers
    with surgery.replace_layers([0, 2], [PassThrough(), llama.model.layers[1]]):
        assert isinstance(llama.model.layers[0], PassThrough)
        assert llama.model.layers[2] is container[1]
        with surgery.delete_layers([0]):  # indices of the model as it stands now
            assert len(llama.model.layers) == 2 and llama.model.layers[0] is container[1]
        assert isinstance(llama.model.layers[0], PassThrough)
    assert llama.model.layers is container
    with pytest.raises(RuntimeError, match="inside"):
        with surgery.delete_layers([1]):
            raise RuntimeError("inside")
    assert llama.model.layers is container
    _logits(llama, ids)


@pytest.mark.parametrize("call,error,match", [
    (lambda s: s.permute_layers([1, 0]), ValueError, "permutation of all 3 block indices"),
    (lambda s: s.permute_layers([0, 1, 1]), ValueError, r"missing \[2\], repeated \[1\]"),
    (lambda s: s.permute_layers([0, 1, 3]), IndexError, r"3 blocks \(indices 0..2"),
    (lambda s: s.delete_layers([5]), IndexError, "got 5"),
    (lambda s: s.delete_layers([0, 1, 2]), SurgeryError, "without blocks"),
    (lambda s: s.replace_layers([0, 1], [PassThrough()]), ValueError, "one module per index"),
    (lambda s: s.replace_layers([0, -3], [PassThrough()] * 2), ValueError, "repeats"),
    (lambda s: s.replace_layers([0], ["not a module"]), TypeError, "nn.Module"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(llama, call, error, match):
    container, blocks = llama.model.layers, list(llama.model.layers)
    with pytest.raises(error, match=match):
        with call(ModelSurgery(llama)):
            pass
    assert llama.model.layers is container and list(container) == blocks


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(UnknownArchitecture, match="LlamaForCausalLM"):
        ModelSurgery(nn.Sequential(nn.Linear(2, 2)))
    seq = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
    assert len(ModelSurgery(seq, container="0").get_transformer_layers()[1]) == 2


# -- pipeline parallelism -----------------------------------------------------------------------
def _pipeline_forward(stage, link, ids):
    """Stage 0 -> stage 1 over ``link``; the output on the last stage, ``None`` elsewhere."""
    with torch.no_grad():
        if link.is_first:
            link.send_forward(stage(ids))
            return None
        return stage(link.recv_forward())


@distributed(world_size=2)
def test_pipeline_stages_apply_their_part_of_global_indices():
    from flex_surgery.parallel.mesh import ParallelMesh
    from flex_surgery.parallel.pipeline import StageLink

    rank = dist.get_rank()
    plain, ids = plain_lm(), ids_for()
    stage = pipeline_stage(plain_lm(), rank, split=2)  # blocks 0-1 | blocks 2-3 + head
    mesh = ParallelMesh.build(pp=2)
    surgery = ModelSurgery(stage, pipeline_group=mesh.group("pp"))
    assert surgery.stage_sizes == [2, 2] and surgery.num_layers == N_BLOCKS
    assert list(surgery.block_indices) == ([0, 1] if rank == 0 else [2, 3])
    whole = ModelSurgery(plain)
    cases = [
        lambda s: s.delete_layers([1, 2]),
        lambda s: s.delete_layers([-1]),
        lambda s: s.permute_layers([1, 0, 3, 2]),
        lambda s: s.replace_layers([3, 0], [PassThrough(), plain.blocks[1]]),
    ]
    link = StageLink(mesh)
    for case in cases:
        with case(whole), torch.no_grad():
            want = plain(ids)
        with case(surgery):
            got = _pipeline_forward(stage, link, ids)
        if rank == 1:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    blocks = list(stage.blocks)
    with pytest.raises(SurgeryError, match="moves block 2 from pipeline stage 1"):
        with surgery.permute_layers([2, 1, 0, 3]):
            pass
    with pytest.raises(SurgeryError, match="pipeline stage 0 .blocks 0..1. without blocks"):
        with surgery.delete_layers([0, 1, 3]):
            pass
    with pytest.raises(IndexError, match="4 blocks"):
        with surgery.replace_layers([4], [PassThrough()]):
            pass
    assert list(stage.blocks) == blocks
    assert surgery.stage_of(3) == 1 and surgery.stage_of(-4) == 0


# -- tensor parallelism ---------------------------------------------------------------------------
@distributed(world_size=2)
def test_tensor_parallel_replacements_are_checked_for_sharding():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        plain, ids = plain_lm(), ids_for()
        model = fairscale_lm(plain, "column")
        surgery = ModelSurgery(model)
        container = model.blocks
        whole = Block(nn.Linear(H, 32), nn.Linear(32, H))  # unsharded: not this rank's shard
        with pytest.raises(ShardingMismatchError, match=r"up.weight: plain, local shape \[32, "
                                                        r"16\]; expected ColumnParallelLinear"):
            with surgery.replace_layers([0], [whole]):
                pass
        assert model.blocks is container
        # A block sharded like the one it replaces, and a parameter-free one, are fine.
        with surgery.replace_layers([0, 2], [model.blocks[1], PassThrough()]), torch.no_grad():
            got = model(ids)
        with ModelSurgery(plain).replace_layers([0, 2], [plain.blocks[1], PassThrough()]):
            with torch.no_grad():
                want = plain(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        destroy_fairscale_model_parallel()


@distributed(world_size=4)
def test_a_mismatched_replacement_on_one_pipeline_stage_raises_on_every_rank():
    """fairscale TP=2 in each of 2 pipeline stages: block 3 lives on stage 1 only, yet every
    rank raises (the others would otherwise run the forward and wait for it)."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2, pipeline_length=2)
    try:
        stage_id = dist.get_rank(fs.get_pipeline_parallel_group())
        stage = pipeline_stage(fairscale_lm(plain_lm(), "column"), stage_id, split=2)
        surgery = ModelSurgery(stage, pipeline_group=fs.get_pipeline_parallel_group())
        container, blocks = stage.blocks, list(stage.blocks)
        whole = Block(nn.Linear(H, 32), nn.Linear(32, H))
        with pytest.raises(ShardingMismatchError, match=r"block 3 .*up.weight: plain"):
            with surgery.replace_layers([3], [whole]):
                pass
        assert stage.blocks is container and list(stage.blocks) == blocks
    finally:
        destroy_fairscale_model_parallel()


@distributed(world_size=2)
def test_uneven_dtensor_shards_mismatched_on_one_rank_raise_on_every_rank():
    """DTensor TP with uneven shards (3 rows over 2 ranks: 2 and 1): a replacement of 4 rows
    has rank 0's local shapes, not rank 1's; both ranks raise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2,))
    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}

    def block(ff: int) -> Block:
        torch.manual_seed(0)
        return parallelize_module(Block(nn.Linear(H, ff), nn.Linear(ff, H)), mesh, plan)

    from test_lens import LensTinyLM

    model = LensTinyLM(None, [block(3), block(3)], None, None)
    assert model.blocks[0].up.weight.to_local().shape[0] == (2 if dist.get_rank() == 0 else 1)
    surgery = ModelSurgery(model)
    container = model.blocks
    with pytest.raises(ShardingMismatchError, match=r"block 1 .*up.weight"):
        with surgery.replace_layers([1], [block(4)]):
            pass
    assert model.blocks is container
    alike = block(3)  # sharded like the block: accepted on every rank
    with surgery.replace_layers([1], [alike]):
        assert model.blocks[1] is alike
    assert model.blocks is container


@distributed(world_size=4)
def test_a_dtensor_split_over_another_mesh_axis_is_a_mismatch_on_every_rank():
    """A 2 x 2 (dp, tp) DeviceMesh: the block's weights are split along dim 0 over ``tp``, the
    replacement's along the same dim over ``dp``. Same framework, partition dim and shapes; only
    the elements held differ, and only on the ranks whose dp and tp coordinates differ -- every
    rank raises."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def block(placements) -> Block:
        torch.manual_seed(0)
        b = Block(nn.Linear(H, 8), nn.Linear(8, H))
        for m in (b.up, b.down):
            m.weight = nn.Parameter(distribute_tensor(m.weight.detach(), mesh, placements))
        return b

    from test_lens import LensTinyLM

    on_tp, on_dp = [Replicate(), Shard(0)], [Shard(0), Replicate()]
    model = LensTinyLM(None, [block(on_tp), block(on_tp)], None, None)
    surgery = ModelSurgery(model)
    with pytest.raises(ShardingMismatchError,
                       match=r"up.weight: .*starting at \[0, 0\]; expected .*starting at "
                             r"\[4, 0\].*\(rank 1\);.*up.weight: .*\(rank 2\)"):
        with surgery.replace_layers([0], [block(on_dp)]):
            pass
    alike = block(on_tp)
    with surgery.replace_layers([0], [alike]):
        assert model.blocks[0] is alike


def test_docs_example_runs():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "model_surgery.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(page), "exec"), {"__name__": "docs_example"})


@distributed(world_size=2)
def test_a_stage_that_cannot_find_its_blocks_raises_on_every_rank():
    """Stage 1 is given a container name it does not have: it raised alone while stage 0
    waited in the exchange of block counts. Every stage raises now; a replacement whose check
    raises on the stage holding the block is likewise agreed."""
    from flex_surgery.parallel.mesh import ParallelMesh

    rank = dist.get_rank()
    stage = pipeline_stage(plain_lm(), rank, split=2)
    mesh = ParallelMesh.build(pp=2)
    container = ModelSurgery(stage, pipeline_group=mesh.group("pp")).container
    with pytest.raises((SurgeryError, ValueError)) as info:
        ModelSurgery(stage, pipeline_group=mesh.group("pp"),
                     container=container if rank == 0 else "no.such.blocks")
    if rank == 0:
        assert "pipeline stage(s) [1]" in str(info.value)
    surgery = ModelSurgery(stage, pipeline_group=mesh.group("pp"))
    import flex_surgery.surgery.model_surgery as model_surgery

    def raising(block, replacement, what):  # an unexpected error on the stage holding block 3
        raise RuntimeError(f"{what} could not be checked")

    original = model_surgery.sharding_problems
    model_surgery.sharding_problems = raising
    try:
        with pytest.raises(ShardingMismatchError, match="block 3: checking its replacement "
                                                        "raised RuntimeError"):
            with surgery.replace_layers([3], [PassThrough()]):
                pass
    finally:
        model_surgery.sharding_problems = original
