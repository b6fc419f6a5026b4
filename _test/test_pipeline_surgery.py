"""Surgery and the logit lens on models split into pipeline stages.

Two hand-split stages of ``test_lens``'s tiny LM (4 blocks), in the two layouts the docs show:

* ``list``: each stage holds its run of blocks in a ``ModuleList`` of its own, numbered from 0
  (docs/model_surgery.md and docs/lens.md; what ``ModelSurgery`` and the lens take);
* ``keyed``: each stage keeps the whole model's names, its blocks in an ``nn.ModuleDict`` keyed
  by their index in the whole model (docs/pipeline.md's recommendation).

Every case is compared with one process holding the whole model with the same weights: which
parameters are modified, the output inside, and the weights after.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from test_lens import N_BLOCKS, ids_for, plain_lm
from test_lens import _stage as list_stage
from torch import nn

from flex_surgery import FlexModel, ModelSurgery
from flex_surgery.anatomy import Anatomy, register_anatomy
from flex_surgery.lens import LensError, LogitLens
from flex_surgery.parallel.failures import RemoteEditError
from flex_surgery.surgery import (
    MaskTheater,
    PassThrough,
    SurgeryError,
    SurgicalTheater,
    delete_blocks,
    permute_blocks,
    replace_blocks,
)


class KeyedStage(nn.Module):
    """A stage that keeps the whole model's names: blocks in a ModuleDict keyed by their global
    index (docs/pipeline.md), embedding on the first stage, norm and head on the last."""

    def __init__(self, plain, ids, first: bool, last: bool) -> None:
        super().__init__()
        self.embed = plain.embed if first else None
        self.blocks = nn.ModuleDict({str(i): plain.blocks[i] for i in ids})
        self.norm = plain.norm if last else None
        self.head = plain.head if last else None

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.norm(x)) if self.head is not None else x


register_anatomy("KeyedStage", Anatomy("blocks", "norm", "embed", "head"))


def keyed_stage(plain, rank: int, split: int) -> KeyedStage:
    ids = list(range(split)) if rank == 0 else list(range(split, N_BLOCKS))
    return KeyedStage(plain, ids, rank == 0, rank == 1)


def _stage(kind: str, plain, split: int = 2):
    return (list_stage if kind == "list" else keyed_stage)(plain, dist.get_rank(), split)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _everyones(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _forward(stage, link, ids):
    """Stage 0 -> stage 1; the output on the last stage, ``None`` elsewhere."""
    with torch.no_grad():
        if link.is_first:
            link.send_forward(stage(ids))
            return None
        return stage(link.recv_forward())


# -- SurgicalTheater: block indices ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["list", "keyed"])
@pytest.mark.parametrize("layers,split", [([1], 2), ([-1], 2), ([0], 2), ([2], 1), ([3], 3)])
@distributed(world_size=2, timeout_s=60)
def test_a_block_index_on_pipeline_stages_is_an_error_on_every_rank(kind, layers, split):
    """Before: on the ``list`` layout ``layers=[1]`` scaled block 1 on stage 0 *and* the stage-1
    block at position 1 (block 3) with no warning ([-1]: blocks 1 and 3; [0]: blocks 0 and 2);
    on the ``keyed`` layout the index was resolved against the stage's own count and raised a
    misleading error (``selects no parameter`` / ``has 1 blocks``). A stage cannot tell global
    from local numbering, so every rank refuses the index, naming the way out."""
    plain = plain_lm()
    before = _weights(plain)
    flex = FlexModel(_stage(kind, plain, split), {} if dist.get_rank() == 0 else None,
                     pipeline_parallel_size=2)
    try:
        with pytest.raises((ValueError, RemoteEditError), match="ambiguous on a pipeline stage"):
            with SurgicalTheater(flex, layers=layers, modification_type="scale", factor=0.5):
                pass
        assert not _changed(plain, before)
    finally:
        flex.restore()


# -- SurgicalTheater / MaskTheater: names held by one stage -------------------------------------
def _cases(plain):
    g = torch.Generator().manual_seed(7)
    masks = {"blocks.3.up.weight": torch.rand(plain.blocks[3].up.weight.shape, generator=g) > 0.5,
             "blocks.0.down.weight": torch.rand(plain.blocks[0].down.weight.shape, generator=g)}
    return [
        lambda m: SurgicalTheater(m, layers=["blocks.3"], modification_type="scale", factor=0.5),
        lambda m: SurgicalTheater(m, layers=["blocks.0.up", "blocks.2"], modification_type="noise",
                                  noise_scale=0.1, seed=3),
        lambda m: SurgicalTheater(m, layers="blocks.3.*", modification_type="disable",
                                  params="all"),
        lambda m: SurgicalTheater(m, layers=["head", "blocks.0.up.weight"],
                                  modification_type="scale", factor=-1.0),
        lambda m: MaskTheater(m, masks),
    ]


@pytest.mark.parametrize("case", range(5))
@distributed(world_size=2, timeout_s=60)
def test_names_held_by_one_stage_are_modified_there_as_in_one_process(case):
    """Keyed stages (docs/pipeline.md), the same theater on every rank. Before: a name (or a
    pattern) that only the other stage holds raised ``no module or parameter named`` on this
    stage, so every rank raised and no block of a single stage could be targeted with the same
    code on every rank (hooks accept such names as remote). Now it is modified where it lives:
    the same parameters, output and restored weights as one process."""
    from flex_surgery.parallel.pipeline import StageLink

    rank = dist.get_rank()
    ids = ids_for()
    whole = plain_lm()
    whole_before = _weights(whole)
    with _cases(whole)[case](whole):
        want_changed = _changed(whole, whole_before)
        want_weights = _weights(whole)
        with torch.no_grad():
            want = whole(ids)
    plain = plain_lm()
    before = _weights(plain)
    stage = keyed_stage(plain, rank, 2)
    flex = FlexModel(stage, {} if rank == 0 else None, pipeline_parallel_size=2)
    link = StageLink(flex.runtime.mesh)
    try:
        with _cases(plain)[case](flex):
            changed = _changed(plain, before)
            for name in changed:
                assert torch.equal(dict(plain.named_parameters())[name], want_weights[name]), name
            got = _forward(flex, link, ids)
        mine = {n for n, _ in stage.named_parameters()}
        assert changed <= mine, changed - mine  # a stage writes only what it holds
        assert set().union(*_everyones(sorted(changed))) == want_changed
        if rank == 1:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not _changed(plain, before)
        # A name no stage holds is still an error, on every rank.
        for layers in (["blocks.4"], "blocks.9.*", ["blocks.3.up.weight", "blocks.0.nope"]):
            with pytest.raises((ValueError, RemoteEditError), match="on any pipeline stage"):
                with SurgicalTheater(flex, layers=layers, modification_type="scale"):
                    pass
        assert not _changed(plain, before)
    finally:
        link.close()
        flex.restore()


# -- layer surgery by block index ---------------------------------------------------------------
@distributed(world_size=2, timeout_s=60)
def test_layer_surgery_by_index_on_a_pipeline_stage_is_refused_and_model_surgery_is_global():
    """Before: ``delete_blocks(flex, [1])`` on ``list`` stages ran without blocks 1 *and* 3 (each
    stage dropped its position 1), silently; and ``ModelSurgery(stage)`` of a stage wrapped by a
    FlexModel over pipeline stages (no ``pipeline_group``) took indices as local: its
    ``delete_layers([1])`` dropped blocks 1 and 3 as well. Now the index-based helpers raise on
    every rank, and ModelSurgery takes the pipeline group of the FlexModel wrapping the stage."""
    from flex_surgery.parallel.pipeline import StageLink

    rank = dist.get_rank()
    plain, ids = plain_lm(), ids_for()
    stage = list_stage(plain_lm(), rank, 2)
    flex = FlexModel(stage, {} if rank == 0 else None, pipeline_parallel_size=2)
    link = StageLink(flex.runtime.mesh)
    try:
        blocks = list(stage.blocks)
        for surgery in (lambda m: delete_blocks(m, [1]), lambda m: permute_blocks(m, [1, 0]),
                        lambda m: replace_blocks(m, {1: PassThrough()})):
            for model in (flex, stage):
                with pytest.raises(SurgeryError, match="ModelSurgery"):
                    with surgery(model):
                        pass
                assert list(stage.blocks) == blocks
        with delete_blocks(plain, [1]), torch.no_grad():
            want = plain(ids)
        surgery = ModelSurgery(stage)  # no pipeline_group: the FlexModel's
        assert list(surgery.block_indices) == ([0, 1] if rank == 0 else [2, 3])
        with surgery.delete_layers([1]):
            got = _forward(stage, link, ids)
        if rank == 1:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert list(stage.blocks) == blocks
    finally:
        link.close()
        flex.restore()


# -- the lens -----------------------------------------------------------------------------------
@distributed(world_size=2, timeout_s=60)
def test_a_lens_on_stages_built_without_pipeline_parallel_size_raises_on_every_rank():
    """Pipeline stages given to the lens without ``pipeline_parallel_size``: the ranks look like
    data-parallel replicas. Before: stage 0 (no head) raised ``LensError`` alone while stage 1
    built its lens, numbering its blocks from 0 (block 3 reported as block 1), and its next
    call would wait for rank 0 forever. Now every rank raises, naming the argument."""
    stage = list_stage(plain_lm(), dist.get_rank(), 2)
    with pytest.raises(LensError, match="pipeline_parallel_size"):
        LogitLens(stage, layers=[1], top_k=2)
    assert not any(b._forward_hooks for b in stage.blocks)
    dist.barrier()


@distributed(world_size=2, timeout_s=60)
def test_a_lens_on_a_flexmodel_over_pipeline_stages_takes_its_pipeline():
    """``LogitLens(flex)`` where ``flex`` is a FlexModel over pipeline stages (built with
    ``pipeline_parallel_size=2``), as ``ModelSurgery(flex)`` does. Before: the lens took the
    ranks for data-parallel replicas and stage 0 raised alone. Now it is the pipeline lens,
    equal to one process."""
    from test_lens import assert_same, reference_lens

    from flex_surgery.parallel.pipeline import StageLink

    ids = ids_for(batch=4)
    tokens, logprobs, _ = reference_lens(plain_lm(), ids, 3)
    stage = list_stage(plain_lm(), dist.get_rank(), 1)
    flex = FlexModel(stage, {} if dist.get_rank() == 0 else None, pipeline_parallel_size=2)
    try:
        with LogitLens(flex, layers=[3, 1], top_k=3) as lens:
            link = StageLink(lens.mesh)
            with link.step(), torch.no_grad():
                for micro in ids.chunk(2):
                    if link.is_first:
                        link.send_forward(flex(micro))
                    else:
                        flex(link.recv_forward())
            got = lens.result(link)
            link.close()
        assert_same(got, tokens[[3, 1]], logprobs[[3, 1]])
    finally:
        flex.restore()


@distributed(world_size=2, timeout_s=60)
def test_a_name_every_stage_holds_alike_is_refused_on_every_rank():
    """Stages that number their blocks from 0 each hold ``blocks.1``: the name meant block 1 on
    stage 0 and block 3 on stage 1 (both modified, no warning). An exact name held by several
    stages is refused on every rank; a pattern still selects on every stage that matches."""
    plain = plain_lm()
    before = _weights(plain)
    flex = FlexModel(_stage("list", plain), {} if dist.get_rank() == 0 else None,
                     pipeline_parallel_size=2)
    try:
        mask = torch.ones(plain.blocks[1].up.weight.shape, dtype=torch.bool)
        for make in (lambda: SurgicalTheater(flex, layers=["blocks.1"],
                                             modification_type="scale", factor=0.5),
                     lambda: MaskTheater(flex, {"blocks.1.up.weight": mask})):
            with pytest.raises((ValueError, RemoteEditError), match=r"held by pipeline stages"):
                with make():
                    pass
        assert not _changed(plain, before)
        with SurgicalTheater(flex, layers="blocks.*.up", modification_type="scale", factor=0.5):
            changed = set().union(*_everyones(_changed(plain, before)))  # each its own blocks
        assert changed == {f"blocks.{i}.up.weight" for i in range(N_BLOCKS)}, changed
        assert not _changed(plain, before)
    finally:
        flex.restore()


@distributed(world_size=2, timeout_s=60)
def test_a_hook_on_a_name_several_stages_hold_is_refused_on_every_rank():
    """Stages numbering their blocks from 0: a hook on ``blocks.1`` fired on block 1 (stage 0)
    and block 3 (stage 1), and rank 0 collected both under one key, without a word. Refused at
    registration on every rank; a name one stage holds still registers everywhere."""
    from flex_surgery import HookFunction
    from flex_surgery.hooks import HookRegistrationError

    flex = FlexModel(_stage("list", plain_lm()), {} if dist.get_rank() == 0 else None,
                     pipeline_parallel_size=2)
    try:
        for name in ("blocks.1", "blocks.0.up.weight", ""):
            with pytest.raises(HookRegistrationError, match="pipeline stages \\[0, 1\\]"):
                flex.register_forward_hook(HookFunction(name))
        assert flex.hook_functions == []
        flex.register_forward_hook(HookFunction("head"))  # the last stage's only
        assert len(flex.hook_functions) == 1
    finally:
        flex.restore()
