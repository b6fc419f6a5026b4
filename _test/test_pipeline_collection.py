"""Collection of pipeline stages' values (hand-split stages, 2 ranks): a stage stages its
values only when the collecting rank keeps them (an editing-only FlexModel keeps nothing,
anywhere, however many steps run), retrieval with a dict on rank 0 only and with a store on
rank 0 only still equals one process, the collecting rank cannot start keeping values later
without saying so at construction, and StageLink objects arrive intact (every dtype, 0-dim,
empty and non-contiguous tensors) with and without failure polling."""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import plain_net
from pipeline_cases import (
    TOL,
    assert_stored_equal,
    hand_split_step,
    inputs,
    reference,
    register_sites,
    two_stages,
)
from rank_pool import distributed

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.pipeline import StageLink, _BlockingLine
from flex_surgery.store.memory import MemoryStore

N_MICRO = 2


def _stage_flex(output_dict, **kwargs) -> FlexModel:
    stage = two_stages(plain_net(), dist.get_rank())
    return FlexModel(stage, output_dict, pipeline_parallel_size=2, key_by_hook_kind=True,
                     **kwargs)


@distributed(world_size=2)
def test_editing_only_flexmodel_keeps_nothing_on_any_rank():
    """output_dict=None everywhere: nobody collects, so no stage stages (no copy per edit, no
    dict that grows with every step), with or without sync_pipeline_outputs; the edits still
    equal one process."""
    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    _, ref_out, ref_grads = reference(x_mbs, t_mbs, edit=True)
    flex = _stage_flex(None)
    register_sites(flex, edit=True)
    link = StageLink(flex.runtime.mesh)
    for step in range(3):
        for p in flex.module.parameters():
            p.grad = None
        out = hand_split_step(flex, link, x_mbs, t_mbs)
        assert flex._shared.output_dict is None, step  # nowhere to put a copy
        if step == 1:
            flex.sync_pipeline_outputs(link)  # fine, and moves nothing
        if link.is_last:
            torch.testing.assert_close(out, ref_out, **TOL)
        for name, p in flex.module.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], **TOL,
                                       msg=lambda m, n=name: f"{n}: {m}")
    flex.restore()


@distributed(world_size=2)
def test_a_stage_keeps_its_own_dict_when_rank0_keeps_nothing():
    """Rank 0 keeps nothing (None), stage 1 was given a dict: collection has nowhere to take
    stage 1's values, so sync_pipeline_outputs (every rank skips it alike) leaves them there
    instead of dropping them on rank 0."""
    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=False)
    stored: dict | None = None if dist.get_rank() == 0 else {}
    flex = _stage_flex(stored)
    register_sites(flex, edit=False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 1:
        assert_stored_equal(stored, ref_stored, keys=sorted(stored), **TOL)
        assert stored and all(k.startswith(("blocks.1", "head")) for k in stored)
    else:
        assert flex._shared.output_dict is None
    flex.restore()


@distributed(world_size=2)
def test_a_dict_on_rank0_only_still_collects_everything():
    """The SPMD pattern: a dict on rank 0, None elsewhere. Stage 1 stages, rank 0 collects,
    equal to one process; stage 1 keeps nothing after each sync."""
    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=False)
    stored: dict | None = {} if dist.get_rank() == 0 else None
    flex = _stage_flex(stored)
    register_sites(flex, edit=False)
    link = StageLink(flex.runtime.mesh)
    for _ in range(2):
        if stored is not None:
            stored.clear()
        hand_split_step(flex, link, x_mbs, t_mbs)
        if dist.get_rank() == 1:
            assert flex._shared.output_dict  # staged for rank 0
        flex.sync_pipeline_outputs(link)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        else:
            assert flex.output_dict is None and flex._shared.output_dict == {}
    flex.restore()


@distributed(world_size=2)
def test_the_collecting_rank_must_keep_from_the_start():
    """Rank 0 built with None told the stages that nobody collects: giving it a dict later
    raises there (the stages' values would be lost without a word); other ranks may."""
    flex = _stage_flex(None)
    if dist.get_rank() == 0:
        with pytest.raises(ValueError, match="pass a dict .even an empty one. when building"):
            flex.output_dict = {}
        assert flex.output_dict is None
    else:
        flex.output_dict = {}  # stage 1 is not where values are collected to
    flex.output_dict = None
    flex.restore()
    # Built with a dict, rank 0 may replace it, or drop it (then it keeps nothing, as asked).
    flex = _stage_flex({})
    flex.output_dict = {}
    flex.output_dict = None
    flex.output_dict = {}
    flex.restore()


@distributed(world_size=2)
def test_a_store_on_rank0_only_receives_the_other_stages():
    """store= on rank 0 only: rank 0's own hooks write to it, the other stage's values reach
    it at sync_pipeline_outputs; together they equal one process."""
    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=False)
    store = MemoryStore() if dist.get_rank() == 0 else None
    flex = _stage_flex(None, store=store)
    register_sites(flex, edit=False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert any(k.startswith("blocks.1") for k in store.data)
        assert_stored_equal(store.to_dict(), ref_stored, **TOL)
    assert flex._shared.output_dict in (None, {})
    flex.restore()


@distributed(world_size=2)
def test_store_on_all_with_a_dict_on_one_rank():
    """store_on="all": rank 0 keeps every stage's entries; rank 1 (None) keeps nothing. With
    None on both, nobody stages."""
    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=True)
    stored: dict | None = {} if dist.get_rank() == 0 else None
    flex = _stage_flex(stored, store_on="all")
    register_sites(flex, edit=True)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    else:
        assert flex._shared.output_dict == {}
    flex.restore()
    flex = _stage_flex(None, store_on="all")
    register_sites(flex, edit=True)
    hand_split_step(flex, StageLink(flex.runtime.mesh), x_mbs, t_mbs)
    assert flex._shared.output_dict is None
    flex.restore()


def _objects():
    """The same nested object on both ranks: every dtype StageLink knows, 0-dim, empty and
    non-contiguous tensors, plain values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return {
        "f32": [torch.randn(3, 5, generator=g), torch.randn(2, generator=g)],
        "f64": base,
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(10),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "offset": base[1:3, 2:],
        "plain": ("text", 3, None),
    }


_LONG = {"text": "x" * 40000, "t": torch.arange(3)}


@distributed(world_size=2)
def test_objects_travel_intact_with_and_without_polling():
    flex = FlexModel(torch.nn.Linear(2, 2), {}, pipeline_parallel_size=2)
    for link in (StageLink(flex.runtime.mesh), _BlockingLine(flex.runtime.mesh)):
        sent = _objects()
        before = {k: v.clone() for k, v in sent.items() if isinstance(v, torch.Tensor)}
        if link.is_first:
            link.send_object(sent, 1)
            link.send_object({}, 1)
            link.send_object(_LONG, 1)  # a structure longer than the first message
            for key, value in before.items():  # the sender's tensors are untouched
                assert torch.equal(sent[key], value), key
        else:
            got = link.recv_object(0)
            assert link.recv_object(0) == {}
            long = link.recv_object(0)
            assert long["text"] == _LONG["text"] and torch.equal(long["t"], _LONG["t"])
            assert sorted(got) == sorted(sent) and got["plain"] == sent["plain"]
            storages = set()
            for key, want in sent.items():
                if not isinstance(want, torch.Tensor) and key != "f32":
                    continue
                for a, b in zip(got[key] if key == "f32" else [got[key]],
                                want if key == "f32" else [want]):
                    assert a.dtype == b.dtype and a.shape == b.shape, key
                    assert torch.equal(a, b), key
                    assert a.device.type == "cpu", key
                    if a.numel():
                        storages.add(a.untyped_storage().data_ptr())
            # each tensor has its own memory: none is a view of a shared buffer
            assert len(storages) == sum(
                1 for k, v in sent.items() if isinstance(v, torch.Tensor) and v.numel()) + 2
        _sizes_follow_the_objects(link)
    flex.restore()


def _sizes_follow_the_objects(link) -> None:
    """Both ends size each first message from the last object between them, in each direction:
    structures that shrink, grow past the first message and repeat arrive intact, both ways."""
    small = {"t": torch.arange(4)}
    sequence = [small, _LONG, _LONG, small, {}, _objects(), _LONG, small]
    for sender in (0, 1):
        for obj in sequence:
            if link.stage == sender:
                link.send_object(obj, 1 - sender)
                continue
            got = link.recv_object(sender)
            assert sorted(got) == sorted(obj)
            for key, value in obj.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got[key], value), key
                elif key == "text":
                    assert got[key] == value


@distributed(world_size=2)
def test_store_on_all_keeps_one_entry_per_call_over_several_steps():
    """store_on="all", a dict on every rank, a sync after every step: each key holds one tensor
    per hook call. Each collection sent the whole dict, so the second one sent back what the
    first had brought, and the lists grew 1, 3, ... with the other stage's values repeated."""
    _, _, x_mbs, t_mbs = inputs(2, 1)
    stored: dict = {}
    flex = FlexModel(two_stages(plain_net(), dist.get_rank()), stored,
                     pipeline_parallel_size=2, store_on="all")
    flex.register_forward_hook(HookFunction("blocks.0.up"))
    flex.register_forward_hook(HookFunction("blocks.1.up"))
    link = StageLink(flex.runtime.mesh)
    counts, firsts = [], []
    for _ in range(3):
        hand_split_step(flex, link, x_mbs, t_mbs)
        flex.sync_pipeline_outputs(link)
        counts.append({k: len(v) for k, v in stored.items()})
        firsts.append({k: v[-1].clone() for k, v in stored.items()})
    flex.restore()
    assert counts == [{"blocks.0.up": n, "blocks.1.up": n} for n in (1, 2, 3)], counts
    for key in stored:  # the same input each step: the same value, once per step
        assert all(torch.equal(t, firsts[0][key]) for t in stored[key]), key

