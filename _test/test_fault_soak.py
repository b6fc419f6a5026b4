"""Long runs leak nothing: resident memory, hooks and process groups stay where they started.

* 1,000 forwards of a tiny fairscale TP=2 model through FlexModels whose hooks are registered,
  removed and regrouped as they go, with the FlexModel itself replaced four times (closed, or
  dropped and collected): resident memory grows by less than a small bound, and afterwards the
  model has exactly the hooks it had before and the process holds the groups it held before.
* FlexModels that build their own mesh (dp=2) made and dropped in an evaluation loop, and made
  and closed: each creates a process group; the closed ones free it at once, the dropped ones
  at the next FlexModel every rank builds, so the count stays bounded (it used to grow by one
  group, ~125 KB on gloo, per FlexModel). ``StageLink`` frees its groups the same way (a closed
  link at the next collective point).
* A runtime or a FlexModel whose construction fails part-way leaves no group behind.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, fairscale_net, plain_net, times_two
from rank_pool import distributed

from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.group_lifetime import free_dropped, live_group_count
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.pipeline import StageLink

BOUND_S = 120
RSS_BOUND_MB = 16


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def _settled_group_count() -> int:
    """Live groups once what earlier bodies dropped is freed (collective over the world)."""
    gc.collect()
    free_dropped(None)
    return live_group_count()


def _hook_count(model: torch.nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(m._backward_pre_hooks) + len(m._state_dict_hooks)
    for p in model.parameters():
        n += len(p._backward_hooks or {})
    return n


@distributed(world_size=2, timeout_s=BOUND_S)
def test_a_thousand_forwards_under_tp2_leak_nothing():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    torch.set_default_dtype(torch.float64)
    net = fairscale_net(plain_net())
    x = torch.randn(2, 3, H)
    hooks_before, groups_before = _hook_count(net), _settled_group_count()
    stored: dict = {}
    flex, rss_start = None, None
    for i in range(1000):
        if i % 250 == 0:  # replace the FlexModel: closed every other time, dropped otherwise
            if flex is not None:
                if i % 500 == 0:
                    flex.close()
                del flex
                gc.collect()
            flex = FlexModel(net, stored if dist.get_rank() == 0 else None,
                             tensor_parallel_size=2)
            kept = HookFunction("blocks.1.up", editing_function=times_two if i == 0 else None)
            flex.register_forward_hook(kept)
            flex.update_hook_groups(kept, "kept")
        if i % 10 == 0:
            passing = HookFunction("blocks.0.act")
            flex.register_forward_hook(passing)
            flex.update_hook_groups(passing, "passing")
        elif i % 10 == 5:
            flex.remove_hook_groups(passing, "passing")
            flex.remove_hook_function(passing)
        groups = ("kept", "passing") if i % 10 < 5 else "kept"
        with torch.no_grad():
            flex(x, groups=groups)
        stored.clear()
        if i == 99:
            gc.collect()
            rss_start = _rss_mb()
    gc.collect()
    grown = _rss_mb() - rss_start
    flex.close()
    del flex
    gc.collect()
    assert _hook_count(net) == hooks_before
    assert live_group_count() == groups_before
    assert grown < RSS_BOUND_MB, f"resident memory grew by {grown:.1f} MB over 900 forwards"
    return grown


@distributed(world_size=2, timeout_s=BOUND_S)
def test_flexmodels_that_build_their_mesh_free_its_group():
    torch.set_default_dtype(torch.float64)
    model = plain_net()
    x = torch.randn(2, 3, H)
    start = _settled_group_count()
    for i in range(60):  # made and closed (close, restore, a with block): freed at once
        if i % 3 == 2:
            with FlexModel(model, {}, data_parallel_size=2) as flex:
                assert live_group_count() == start + 1
                flex(x)
        else:
            flex = FlexModel(model, {}, data_parallel_size=2)
            assert live_group_count() == start + 1
            flex(x)
            flex.close() if i % 3 == 0 else flex.restore()
        assert live_group_count() == start
    for _ in range(100):  # made and dropped in an evaluation loop
        flex = FlexModel(model, {}, data_parallel_size=2)
        flex.register_forward_hook(HookFunction("blocks.0"))
        flex(x)
        del flex
    assert live_group_count() <= start + 2
    gc.collect()
    FlexModel(model, {}, data_parallel_size=2).close()  # the next collective point frees all
    assert live_group_count() == start
    assert _hook_count(model) == 0


@distributed(world_size=4, timeout_s=BOUND_S)
def test_flexmodels_built_inside_a_sub_group_reuse_its_groups():
    """FlexModels made and closed again and again on a ``process_group`` of 2 of 4 ranks: the
    groups built inside it are made once and reused (destroying and re-creating them would give
    the new ones the old names, and gloo would meet the old groups' keys in the store), so the
    group count stays put and every FlexModel still retrieves the whole batch."""
    torch.set_default_dtype(torch.float64)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    sub = pairs[dist.get_rank() // 2]
    model = plain_net()
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(dist.get_rank() % 2))
    whole = torch.cat([torch.randn(2, 3, H, generator=torch.Generator().manual_seed(r))
                       for r in range(2)])
    counts = []
    for _ in range(6):
        stored: dict = {}
        with FlexModel(model, stored, process_group=sub, data_parallel_size=2) as flex:
            flex.register_forward_pre_hook(HookFunction("blocks.0"))
            flex(x)
        if dist.get_rank() % 2 == 0:
            assert torch.equal(stored["blocks.0"][0], whole)
        counts.append(live_group_count())
    assert counts == counts[:1] * len(counts), counts


@distributed(world_size=2, timeout_s=BOUND_S)
def test_stage_links_free_their_groups():
    mesh = ParallelMesh.build(pp=2)
    start = _settled_group_count()
    with StageLink(mesh) as link:
        link.send_object("ping", 1 - link.stage) if link.is_first else link.recv_object(0)
        assert live_group_count() == start + 1
    assert live_group_count() == start + 1  # closing queues (no collective) ...
    assert free_dropped(None) == 1  # ... the next collective point over the world frees
    assert live_group_count() == start
    for _ in range(5):
        StageLink(mesh)  # dropped at once
    gc.collect()
    StageLink(mesh).close()
    free_dropped(None)
    assert live_group_count() == start
    for group in mesh.created_groups():
        dist.destroy_process_group(group)


def _refuse(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected failure")


@distributed(world_size=2, timeout_s=BOUND_S)
def test_a_runtime_that_fails_while_being_built_leaves_no_group_behind():
    """The layout tracker fails after it registered its hooks (an unknown layout, a lost rank):
    the groups the runtime's mesh built are queued, the hooks removed. Before, the groups were
    owned only after that point and stayed for the life of the process."""
    from flex_surgery.parallel.layout import LayoutInference

    torch.set_default_dtype(torch.float64)
    model = plain_net()
    start = _settled_group_count()
    watch = LayoutInference.watch

    def watch_then_fail(self, module):
        watch(self, module)
        _refuse()

    LayoutInference.watch = watch_then_fail
    try:
        with pytest.raises(RuntimeError, match="injected"):
            FlexModel(model, {}, data_parallel_size=2)
    finally:
        LayoutInference.watch = watch
    gc.collect()
    FlexModel(model, {}, data_parallel_size=2).close()  # the next collective point frees
    assert live_group_count() == start
    assert _hook_count(model) == 0


@distributed(world_size=2, timeout_s=BOUND_S)
def test_a_flexmodel_that_fails_after_building_its_runtime_leaves_no_group_behind():
    """FlexModel's construction fails after its runtime was built while the traceback (which
    holds the half-built FlexModel, hence the runtime and its mesh) is kept: the runtime's
    groups are queued at once and freed at the next FlexModel, not kept as long as the
    traceback lives."""
    from flex_surgery.hooks import wrapper

    torch.set_default_dtype(torch.float64)
    model = plain_net()
    start = _settled_group_count()
    facts = wrapper.exchange_stage_facts
    wrapper.exchange_stage_facts = _refuse
    try:
        with pytest.raises(RuntimeError, match="injected") as kept:
            FlexModel(model, {}, data_parallel_size=2)
    finally:
        wrapper.exchange_stage_facts = facts
    gc.collect()
    FlexModel(model, {}, data_parallel_size=2).close()
    assert live_group_count() == start
    assert _hook_count(model) == 0
    assert kept.traceback  # the traceback (and the half-built FlexModel) lived until here
