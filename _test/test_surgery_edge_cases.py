"""Surgery where a guess would give wrong weights without a word: tied parameters given two
masks, FSDP1 ``NO_SHARD`` checkpoints, parameters no framework owns that differ across the
tensor-parallel ranks (seeded noise, ``full_parameter`` under DTensor TP), FSDP2 after a
forward that raised inside the theater, and Megatron expert parallelism. Each is refused on
every rank or handled exactly; each test fails on the code that guessed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from torch import nn

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.parallel.frameworks import LayoutError, UnknownLayoutError
from flex_surgery.surgery import MaskTheater, SurgicalTheater


# -- tied parameters ---------------------------------------------------------------------------
def test_two_different_masks_for_one_tied_tensor_are_refused_and_equal_ones_applied_once():
    """GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight`` (one tensor). Masks under both
    names (as a dict built from ``state_dict()`` keys would give) were applied as the first
    name's mask, the second ignored. Different masks are now a ValueError, with the weight
    untouched; the same mask under both names is applied once."""
    model = tiny_hf_model("gpt2")
    w = model.lm_head.weight
    assert w is model.transformer.wte.weight
    orig = w.detach().clone()
    m1 = torch.zeros(w.shape)
    m1[:, ::2] = 1
    m2 = torch.zeros(w.shape)
    m2[:, 1::2] = 1
    with pytest.raises(ValueError, match="tied"):
        with MaskTheater(model, {"transformer.wte.weight": m1, "lm_head.weight": m2}):
            pass
    assert torch.equal(w.detach(), orig)
    with MaskTheater(model, {"transformer.wte.weight": m1, "lm_head.weight": m1.clone()}):
        assert torch.equal(w.detach(), orig * m1)
    assert torch.equal(w.detach(), orig)


# -- FSDP1 NO_SHARD + use_orig_params: a submodule's state_dict() ----------------------------
@distributed(world_size=2)
def test_fsdp1_no_shard_submodule_state_dict_inside_a_theater_holds_the_originals():
    """docs/surgery.md, *The checkpoint guard*: ``state_dict()`` of the model *or of any
    submodule* inside a theater returns the original weights; FSDP1 with ``use_orig_params``
    is guarded "when a module inside a unit is asked directly". Under ``NO_SHARD`` (what FSDP1
    switches FULL_SHARD to on one rank) the original parameters are 2-D views of the flat
    parameter while the theater's local view is a 1-D slice of it, so ``_aliases`` (which
    required equal ``dim()``) never matched and the entry was returned modified."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    model = FSDP(tiny_hf_model("llama"), sharding_strategy=ShardingStrategy.NO_SHARD,
                 use_orig_params=True, device_id=torch.device("cpu"))
    with torch.no_grad():
        model(**example_inputs("llama"))
    inner = model.module.model.layers[0].mlp.up_proj
    original = inner.weight.detach().clone()
    with SurgicalTheater(model, layers=[0], modification_type="scale", factor=0.5) as theater:
        assert "model.layers.0.mlp.up_proj.weight" in theater.modified_names
        assert torch.equal(inner.weight.detach(), original * 0.5)  # the edit is live
        saved = inner.state_dict()["weight"]
        ok = torch.equal(saved, original)
    assert torch.equal(inner.weight.detach(), original)
    assert ok, "state_dict() of a submodule inside the theater returned the modified weight"


# -- a parameter no framework owns that differs across the TP ranks -------------------------
class _HandCut(nn.Module):
    """A framework TP layer next to a hand-cut column shard: ``hand`` is an ``nn.Linear``
    holding rank ``r``'s rows ``[8r, 8r + 8)`` of a (16, 8) weight, which no framework
    describes (FlexModel refuses its activations, ``full_parameter`` its whole value)."""

    def __init__(self, up: nn.Module, rank: int) -> None:
        super().__init__()
        self.up = up
        self.hand = nn.Linear(8, 8, bias=False)
        full = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            self.hand.weight.copy_(full[8 * rank: 8 * rank + 8])

    def forward(self, x):
        return self.up(x), self.hand(x)


@distributed(world_size=2)
def test_seeded_noise_on_a_hand_cut_parameter_under_fairscale_tp_is_refused():
    """``full_parameter`` on ``hand.weight`` raises UnknownLayoutError (its gather checks that
    the module is the same on every TP rank). Seeded noise never gathers: both ranks added rows
    0..7 of the noise to their different halves of the weight, without a word. Now it is
    checked on entry too, and refused on every rank with the weight untouched."""
    from fairscale.nn.model_parallel import initialize as fs_init
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear


    fs_init.initialize_model_parallel(2)
    model = _HandCut(ColumnParallelLinear(8, 16, gather_output=False), dist.get_rank())

    def center(p):
        return -p.mean(dim=-1, keepdim=True).expand_as(p).clone()

    # the control: the full parameter of hand.weight is refused, on every rank
    with pytest.raises(LayoutError, match="hand"):
        with SurgicalTheater(model, layers="hand", modification_fn=center, full_parameter=True):
            pass
    before = model.hand.weight.detach().clone()
    with pytest.raises(UnknownLayoutError, match="hand"):
        with SurgicalTheater(model, layers="hand", modification_type="noise", noise_scale=1.0,
                             seed=0):
            pass
    assert torch.equal(model.hand.weight.detach(), before)
    with pytest.raises(UnknownLayoutError, match="hand"):  # a mask is placed by position too
        with MaskTheater(model, {"hand.weight": torch.ones(8, 8)}):
            pass
    # the replicated parameters of the same model are noised as before (checked, equal)
    with SurgicalTheater(model, layers="up", modification_type="noise", seed=0) as theater:
        assert theater.modified_names


@distributed(world_size=2)
def test_full_parameter_of_a_hand_cut_parameter_under_dtensor_tp_is_refused():
    """The same hand-cut shard in a DTensor-TP model (``parallelize_module``): no global state
    names the tensor-parallel group, so ``hand.weight``'s view was unchecked and a
    ``full_parameter=True`` function was handed this rank's (8, 8) piece as the whole (16, 8)
    weight. The group is now read from the model's DTensor parameters: refused on every rank,
    the weight untouched."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module


    mesh = init_device_mesh("cpu", (2,))
    model = _HandCut(nn.Linear(8, 16), dist.get_rank())
    parallelize_module(model, mesh, {"up": ColwiseParallel()})
    seen = []

    def center(p):
        seen.append(tuple(p.shape))
        return -p.mean(dim=-1, keepdim=True).expand_as(p).clone()

    before = model.hand.weight.detach().clone()
    with pytest.raises(UnknownLayoutError, match="hand"):
        with torch.no_grad(), SurgicalTheater(model, layers="hand", modification_fn=center,
                                              full_parameter=True):
            pass
    assert seen == [] and torch.equal(model.hand.weight.detach(), before)


# -- FSDP2: a forward that raised inside the theater ---------------------------------------
@distributed(world_size=2)
def test_fsdp2_exception_mid_forward_inside_a_theater_leaves_the_original_forward():
    """The theater frees FSDP's gathered copies on exit so the next forward gathers the restored
    shards. A forward that raises inside a block leaves the FSDP2 root's group in FORWARD,
    where ``reshard()`` does nothing with ``reshard_after_forward=False`` (the root's default):
    the root kept its copies of the *scaled* embedding, norm and head, and the next forward
    after the theater used them. The theater now resets the root (torch's
    ``reset_iter_state``), so that forward equals the original; and a theater entered after
    such a forward (outside any theater) edits what the next forward computes with."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = tiny_hf_model("llama")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = example_inputs("llama")
    with torch.no_grad():
        base = model(**x).logits

    def boom(module, args, output):
        raise KeyError("raised inside block 1")

    with pytest.raises(KeyError, match="inside block 1"):
        with torch.no_grad(), SurgicalTheater(model, modification_type="scale", factor=0.5,
                                              params="all"):
            handle = model.model.layers[1].mlp.register_forward_hook(boom)
            try:
                model(**x)
            finally:
                handle.remove()
    with torch.no_grad():
        after = model(**x).logits
    diff = (after - base).abs().max().item()
    assert diff == 0, (f"the first forward after the theater differs from the original by "
                       f"{diff}: the root's unsharded copies of the modified weights were kept")
    handle = model.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(KeyError), torch.no_grad():
        model(**x)  # outside any theater: the root is left in FORWARD again
    handle.remove()
    with torch.no_grad(), SurgicalTheater(model, modification_type="disable",
                                          layers="lm_head"):
        assert model(**x).logits.abs().max().item() == 0  # the head's edit reaches the forward
    with torch.no_grad():
        assert torch.equal(model(**x).logits, base)


# -- Megatron expert parallelism -----------------------------------------------------------
@distributed(world_size=2)
def test_megatron_expert_parallel_experts_are_not_edited_under_local_names():
    """ep = 2, one local expert per rank: rank 0's ``local_experts.0`` is global expert 0,
    rank 1's is global expert 1. FlexModel refuses this layout when it adopts the groups; the
    theater named both experts ``local_experts.0.*`` and gave them the same seeded noise (a
    mask keyed by name would go on two experts). Megatron marks expert parameters under ep > 1
    (``allreduce=False``): they are now refused wherever a parameter's split is asked."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_cases import megatron_parallel


    with megatron_parallel(1, expert_parallel=2):
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                   num_moe_experts=2, ffn_hidden_size=16,
                                   moe_ffn_hidden_size=16, use_cpu_initialization=True,
                                   add_bias_linear=False, expert_model_parallel_size=2)
        experts = SequentialMLP(
            1, config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                     linear_fc2=RowParallelLinear),
            pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        weight = experts.local_experts[0].linear_fc1.weight
        before = weight.detach().clone()
        with pytest.raises(LayoutError, match="expert parallelism"):
            with torch.no_grad(), SurgicalTheater(experts, modification_type="noise",
                                                  noise_scale=1.0, seed=0):
                pass
        assert torch.equal(weight.detach(), before)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


@distributed(world_size=2)
def test_ddp_bucket_view_grads_survive_a_backward_inside_a_theater():
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_mlp(), gradient_as_bucket_view=True)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # a training loop: from the second step on, grads are bucket views
        opt.zero_grad()
        model(x).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in grads.items()}
    with SurgicalTheater(model, modification_type="scale", factor=0.5):
        model(x * 3).sum().backward()  # e.g. a gradient-based attribution during validation
    for n, p in model.named_parameters():
        assert p.grad is grads[n]
        assert torch.equal(p.grad, values[n]), f"{n}: training gradient overwritten"


def test_backward_after_the_block_through_a_graph_built_inside_raises():
    """The theater writes through ``.data``, invisible to autograd: a loss computed inside and
    backpropagated after exit silently mixed the disabled weight (forward) with the restored one
    (backward). Now torch's in-place check fires; a graph from before the block still works."""
    model = _mlp()
    x = torch.randn(3, 4)
    with SurgicalTheater(model, layers=["2"], modification_type="disable"):
        loss = model(x).sum()
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
    model.zero_grad()
    loss = model(x).sum()
    with pytest.raises(RuntimeError, match="inplace"):  # a graph from before, backward inside
        with SurgicalTheater(model, layers=["2"], modification_type="disable"):
            loss.backward(retain_graph=True)
    loss.backward()  # after the block the weights are the ones the graph saw
    want = _mlp()
    want(x).sum().backward()
    for p, q in zip(model.parameters(), want.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_a_quantized_linear_weight_is_refused_not_skipped():
    """An int8 weight in an ``nn.Linear`` (bitsandbytes' ``Linear8bitLt`` / QLoRA's base layers
    are Linear subclasses with integer weights) was silently left out: a whole-model ``scale``
    modified every other linear and reported success; naming it said it does not exist."""
    model = _mlp()
    model[0].weight = nn.Parameter(torch.randint(-127, 127, (8, 4), dtype=torch.int8),
                                   requires_grad=False)
    before = [p.detach().clone() for p in model.parameters()]
    for layers in (None, ["0"], "0.weight"):
        with pytest.raises(TypeError, match=r"not floating point: \['0.weight'\]"):
            with SurgicalTheater(model, layers=layers, modification_type="scale", factor=0.0):
                pass
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with SurgicalTheater(model, layers=["2"], modification_type="scale", factor=0.0) as t:
        assert t.modified_names == ["2.weight"]  # floating parameters are still edited
