"""Megatron-core's tensor-parallel layers through FlexModel and SurgicalTheater equal one
process, at TP=2 on the forked gloo pool, with and without sequence parallelism: what every
hook stores, the output and the whole gradients (with and without a x2 edit on forward and
backward hooks), the theater's scale / disable / seeded noise / custom (shard and full
parameter, row zeroing), ``get_module_parameter``, export's whole weights, and the groups
adopted from ``megatron.core.parallel_state`` without any size argument."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron_cases import FF, B, H, S, megatron_mlp, megatron_parallel, plain_mlp, token_ids
from parallel_cases import (
    EDIT_MODES,
    assert_grads_equal,
    assert_stored_equal,
    local_group,
    run_flex,
)
from rank_pool import distributed
from test_surgery_distributed import _check_equivalence
from torch import nn

from flex_surgery.export import full_weights
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.collectives import all_gather
from flex_surgery.parallel.layout import fairscale_param_dim
from flex_surgery.surgery import SurgicalTheater

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
DTYPE = torch.float64

# (module, hook kind): column output (sharded), after it (sharded), row output (replicated or
# sequence-sharded), row input (sharded), column input (replicated or sequence-sharded), the
# embedding's output, and gradients of each kind.
SITES = [
    ("embed", "forward"),
    ("up", "forward"),
    ("act", "forward"),
    ("down", "forward"),
    ("down", "forward_pre"),
    ("up", "forward_pre"),
    ("act", "full_backward"),
    ("down", "full_backward"),
    ("up", "full_backward_pre"),
    ("down", "full_backward_pre"),
]
PARAM_SITES = ["up.weight", "down.weight", "down.bias"]


def _sum_of_squares(y: torch.Tensor) -> torch.Tensor:
    # A sum, not a mean: with sequence parallelism each rank holds part of the output, and the
    # parts' sums add up to the one-process loss.
    return y.pow(2).sum()


class SequenceGathered(nn.Module):
    """The model with its output whole: under sequence parallelism the row layer leaves each
    rank a slice of the sequence, gathered here (autograd-aware) for comparisons."""

    def __init__(self, inner: nn.Module, sequence_parallel: bool) -> None:
        super().__init__()
        self.inner = inner
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(ids)
        if not self.sequence_parallel:
            return out
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)


def _whole_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients of the whole model: split ones gathered over TP, and -- under
    sequence parallelism -- those of parameters tagged ``sequence_parallel`` summed over TP
    (what Megatron's ``finalize_model_grads`` does)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            g = p.grad.detach().clone()
            dim = fairscale_param_dim(mod, p)
            if dim is not None:
                g = all_gather(g, dim, group)
            elif getattr(p, "sequence_parallel", False):
                dist.all_reduce(g, group=group)
            grads[f"{mod_name}.{p_name}".removeprefix("inner.")] = g
    return grads


def _reference(ids, edit, sites=SITES, param_sites=PARAM_SITES):
    model = plain_mlp().to(DTYPE)
    stored, out, _ = run_flex(model, ids, edit, sites=sites, param_sites=param_sites,
                              process_group=local_group(), loss_fn=_sum_of_squares)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return stored, out.detach(), grads


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_hooks_equal_one_process(sequence_parallel):
    from rank_pool import get_pool

    get_pool(2).run(_hooks_body, dict(sequence_parallel=sequence_parallel))


@distributed(world_size=2)
def _hooks_body(sequence_parallel: bool):
    ids = token_ids()
    with megatron_parallel(2):
        for edit in EDIT_MODES:
            ref_stored, ref_out, ref_grads = _reference(ids, edit)
            model = megatron_mlp(plain_mlp(), sequence_parallel, DTYPE)
            stored, out, flex = run_flex(model, ids, edit, sites=SITES, param_sites=PARAM_SITES,
                                         loss_fn=_sum_of_squares)
            assert flex.runtime.mesh.source == "megatron"
            assert flex.runtime.mesh.sizes == {"dp": 1, "tp": 2, "pp": 1}
            if sequence_parallel:
                assert out.shape == (S // 2, B, H)
                out = torch.cat(all_gather_list(out.detach()), dim=0)
            case = f"sequence_parallel={sequence_parallel} edit={edit}"
            torch.testing.assert_close(out, ref_out, **TOL, msg=lambda m, c=case: f"{c}: {m}")
            if dist.get_rank() == 0:
                assert_stored_equal(stored, ref_stored, **TOL)
                # the whole column output, not rank 0's half
                assert (S, B, FF) in [tuple(t.shape) for t in stored["up"]]
            else:
                assert stored == {}
            assert_grads_equal(_whole_grads(model), ref_grads, **TOL)
            flex.restore()


def all_gather_list(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _zero_neuron_5(w: torch.Tensor) -> torch.Tensor:
    """Row zeroing: needs to know which row of the *full* weight is neuron 5."""
    delta = torch.zeros_like(w)
    delta[5] = -w[5]
    return delta


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_surgery_equals_one_process(sequence_parallel):
    from rank_pool import get_pool

    get_pool(2).run(_surgery_body, dict(sequence_parallel=sequence_parallel))


@distributed(world_size=2)
def _surgery_body(sequence_parallel: bool):
    ids = token_ids()
    with megatron_parallel(2):
        model = SequenceGathered(megatron_mlp(plain_mlp(), sequence_parallel), sequence_parallel)

        def reference():
            return SequenceGathered(plain_mlp(), False)

        # scale, disable, seeded noise (the one-process full-shape noise), custom on the shard
        # and with full_parameter (row means), each restored bit-exactly
        _check_equivalence(model, reference, {"ids": ids}, exact=False,
                           check_state_dict=False, blocks=("inner.up", "inner.down"))
        ref = reference()
        for name in ("inner.up.weight", "inner.down.weight"):
            with torch.no_grad():
                with SurgicalTheater(ref, layers=name, modification_fn=_zero_neuron_5,
                                     full_parameter=True):
                    want, want_weight = ref(ids), ref.get_parameter(name).detach().clone()
                with SurgicalTheater(model, layers=name, modification_fn=_zero_neuron_5,
                                     full_parameter=True):
                    got = model(ids)
                    got_weight = full_weights(model)[name]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_weight, want_weight, rtol=0, atol=0)
            assert not got_weight[5].any() and got_weight[6].any()


@distributed(world_size=2)
def test_whole_parameters_and_export_equal_one_process():
    """``get_module_parameter`` and export's ``full_weights`` give the whole parameters."""
    with megatron_parallel(2):
        plain = plain_mlp()
        model = megatron_mlp(plain)
        want = dict(plain.named_parameters())
        flex = FlexModel(model, {})
        for name in ("embed.weight", "up.weight", "up.bias", "down.weight", "down.bias"):
            got = flex.get_module_parameter(name)
            assert torch.equal(got, want[name].detach()), name
        flex.restore()
        weights = full_weights(model)
        assert sorted(weights) == sorted(want)
        for name, value in weights.items():
            assert torch.equal(value, want[name].detach()), name


@distributed(world_size=2)
def test_groups_adopted_without_sizes():
    """Megatron's groups are adopted with no size argument: TP=2, not dp=2."""
    from megatron.core import parallel_state

    with megatron_parallel(2):
        flex = FlexModel(megatron_mlp(), {})
        mesh = flex.runtime.mesh
        assert mesh.source == "megatron"
        assert mesh.sizes == {"dp": 1, "tp": 2, "pp": 1}
        assert mesh.rank("tp") == parallel_state.get_tensor_model_parallel_rank()
        assert dist.get_process_group_ranks(mesh.group("tp")) == [0, 1]
        flex.restore()


@distributed(world_size=4)
def test_data_parallel_batch_dim_is_one():
    """TP=2 x DP=2 (Megatron orders ranks (pp, dp, tp)): each dp rank holds a slice of the
    batch, which is dim 1 of Megatron's [s, b, h]; hooks store the whole batch."""
    from megatron.core import parallel_state

    with megatron_parallel(2):
        dp_rank = parallel_state.get_data_parallel_rank()
        ids = torch.randint(0, 16, (2 * B, S), generator=torch.Generator().manual_seed(3))
        local_ids = ids[dp_rank * B:(dp_rank + 1) * B]
        ref_stored, ref_out, _ = _reference(ids, True, sites=SITES[:6], param_sites=[])
        model = megatron_mlp(plain_mlp(), dtype=DTYPE)
        stored, out, flex = run_flex(model, local_ids, True, sites=SITES[:6], param_sites=[],
                                     loss_fn=_sum_of_squares)
        assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
        assert flex.runtime.layouts.batch_dim == 1
        torch.testing.assert_close(out.detach(), ref_out[:, dp_rank * B:(dp_rank + 1) * B],
                                   **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        flex.restore()


@distributed(world_size=2)
def test_hook_map_shows_megatron_sharding():
    """The hook map reads Megatron's partition dims through the registry."""
    from flex_surgery.viz.hook_map import hook_map

    with megatron_parallel(2):
        root = hook_map(megatron_mlp()).root
        params = {f"{node.name}.{p.name}": p for node in root.children for p in node.params}
        rank = dist.get_rank()
        up, down, bias = params["up.weight"], params["down.weight"], params["down.bias"]
        assert (up.scheme, up.shard_dim, up.num_shards, up.shard_index) == ("megatron", 0, 2, rank)
        assert up.full_shape == (FF, H) and up.local_shape == (FF // 2, H)
        assert (down.shard_dim, down.placement, down.shard_index) == (1, "tp:Shard(1)", rank)
        assert not bias.sharded
        assert params["embed.weight"].placement == "tp:Shard(0)"
        assert root.children[0].integer_input  # the vocab-parallel embedding takes token ids
