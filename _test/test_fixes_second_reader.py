"""Second reading of four changes: circuits that read their weights through the layer (magnitude
pruning, ``random_ablate`` values, whole-circuit ``torch.save``), hard-concrete gates under
activation checkpointing (``LayerMask._gate_draw``), the refusal of hooked DDP forwards under
``Join`` (``DistributedRuntime.start_pass``, ``frameworks.ddp.JoinRefusal``) and anatomy parts
with alternative paths.

Strict xfails are bugs found (each says what is wrong, where, and what the right behaviour is);
the plain tests pin behaviour checked and found right.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_cases import (
    H,
    actual_names,
    dtensor_plan,
    fairscale_net,
    fsdp2_net,
    local_group,
    plain_net,
)
from rank_pool import destroy_fairscale_model_parallel, distributed
from test_circuits_distributed import HARD_CONCRETE, _compare
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from flex_surgery.anatomy import MissingPart, locate
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel

_X = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))


class _Net(nn.Module):
    """Two linears, with dropout between (``dropout``); ``twice`` calls ``up`` a second time
    per forward."""

    def __init__(self, twice: bool = False, dropout: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up, self.down, self.twice = nn.Linear(4, 6), nn.Linear(6, 3), twice
        self.p = 0.3 if dropout else 0.0
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        h = F.dropout(torch.tanh(self.up(x)), self.p, True)
        if self.twice:
            h = h + torch.tanh(self.up(x * 0.5))
        return self.down(h)


class _Checkpointed(nn.Module):
    def __init__(self, use_checkpoint: bool, twice: bool = False, **kw) -> None:
        super().__init__()
        self.net, self.use_checkpoint = _Net(twice), use_checkpoint
        self.kw = {"use_reentrant": False, **kw}

    def forward(self, x):
        if self.use_checkpoint:
            if self.kw["use_reentrant"]:
                x = x.detach().requires_grad_()
            return checkpoint(self.net, x, **self.kw)
        return self.net(x)


def _hc_circuit(use_checkpoint: bool, twice: bool = False, **kw) -> CircuitModel:
    """Hard concrete on both linears (weight and bias masks) of one checkpointed region."""
    return CircuitModel(CircuitConfig(mask_method="hard_concrete", seed=1,
                                      target_layers=["net.up", "net.down"],
                                      mask_hparams={"mask_init_percentage": 0.6,
                                                    "mask_bias": True}),
                        _Checkpointed(use_checkpoint, twice, **kw))


def _grads(circuit: CircuitModel) -> list[torch.Tensor]:
    return [p.grad.clone() for p in circuit.mask_logits.values()]


# -- findings ---------------------------------------------------------------------------------


def _train_with_fixed_seed_validation(use_checkpoint: bool) -> list[list[torch.Tensor]]:
    """Three steps, each followed by a validation that seeds torch (reproducible evaluation)."""
    circuit = _hc_circuit(use_checkpoint)
    opt = torch.optim.SGD(circuit.parameters(), lr=0.5)
    torch.manual_seed(7)
    seen = []
    for _ in range(3):
        circuit(_X).pow(2).sum().backward()
        seen.append(_grads(circuit))
        opt.step()
        opt.zero_grad()
        circuit.eval()  # validation, after the step's backward
        torch.manual_seed(0)
        with torch.no_grad():
            circuit(_X)
        circuit.train()
    return seen


def test_hard_concrete_checkpointing_with_a_fixed_seed_validation_between_steps():
    want = _train_with_fixed_seed_validation(False)
    got = _train_with_fixed_seed_validation(True)
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))


def _random_ablated(circuit: CircuitModel) -> CircuitModel:
    with torch.no_grad():
        circuit.mask_logits["up-weight"].copy_(
            torch.randn(6, 4, generator=torch.Generator().manual_seed(4)))
    circuit.eval()
    circuit.set_ablate_mode("random_ablate")
    return circuit


def _cs(**hp) -> CircuitConfig:
    return CircuitConfig(target_layers=["up"], seed=5,
                         mask_hparams={"mask_init_value": 0.5, "mask_bias": True, **hp})


def test_random_ablate_values_survive_a_round_trip_through_bf16():
    """Both circuits go to bf16 and back (their weights and logits rounded alike); only one
    ablates while in bf16: its random values must not stay rounded."""
    ref = _random_ablated(CircuitModel(_cs(), _Net(dropout=False)))
    circuit = _random_ablated(CircuitModel(_cs(), _Net(dropout=False)))
    assert torch.equal(circuit(_X), ref(_X))
    circuit.to(torch.bfloat16)
    circuit(_X.bfloat16())
    for c in (circuit, ref):
        c.to(torch.bfloat16)
        c.to(torch.float32)
    assert torch.equal(circuit(_X), ref(_X))


def test_a_weight_replaced_with_assign_is_not_kept_alive_by_the_circuit():
    model = _Net()
    circuit = CircuitModel(CircuitConfig(mask_method="magnitude_pruning", target_layers=["up"],
                                         mask_hparams={"prune_percentage": 0.5,
                                                       "mask_bias": True}), model)
    old = weakref.ref(model.up.weight)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    gc.collect()
    assert circuit.hard_masks()["up.weight"].shape == (6, 4)
    assert old() is None


def _join_model():
    torch.manual_seed(0)
    model = DDP(plain_net(0))
    stored: dict = {}
    flex = FlexModel(model, stored)
    flex.register_forward_hook(HookFunction(actual_names(model)["blocks.0.up"]))
    return model, flex


# -- checked and found right ------------------------------------------------------------------


def _one_backward(use_checkpoint: bool, between, twice: bool = False,
                  **kw) -> list[torch.Tensor]:
    """One forward, ``between(circuit)``, then its backward: the logits' gradients."""
    circuit = _hc_circuit(use_checkpoint, twice, **kw)
    torch.manual_seed(7)
    out = circuit(_X)
    between(circuit)
    out.pow(2).sum().backward()
    return _grads(circuit)


def test_hard_concrete_recompute_twice_with_retain_graph_and_autograd_grad():
    """A non-reentrant region recomputed in two backwards of one graph, then a backward by
    torch.autograd.grad: each recompute draws the forward's gates."""
    def run(use_checkpoint):
        circuit = _hc_circuit(use_checkpoint)
        torch.manual_seed(7)
        loss = circuit(_X).pow(2).sum()
        loss.backward(retain_graph=True)
        first = _grads(circuit)
        loss.backward()
        out = circuit(_X * 2).sum()
        return first + _grads(circuit) + list(torch.autograd.grad(
            out, list(circuit.mask_logits.values())))

    want, got = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _validate_in_eval(circuit):
    circuit.eval()
    circuit(_X)
    circuit.train()


def _train_a_copy(circuit):
    twin = copy.deepcopy(circuit)
    twin(_X * 2).sum().backward()


BETWEEN = {
    "nothing": lambda c: None,
    "no_grad_training_forward": lambda c: torch.no_grad()(c)(_X * 3),
    "eval_forward": _validate_in_eval,
    "deepcopy_trained": _train_a_copy,
    "another_forward_and_backward": lambda c: c(_X * 2).sum().backward(),
    "other_random_draws": lambda c: torch.rand(17),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("between", list(BETWEEN))
def test_hard_concrete_recompute_finds_its_forward_whatever_runs_in_between(between, reentrant):
    """Two masked layers in one region, weight and bias masks, dropout before the second:
    forwards, copies and random draws between a forward and its backward do not change the
    gates its recompute draws (bit-equal to no checkpointing)."""
    want = _one_backward(False, BETWEEN[between], use_reentrant=reentrant)
    got = _one_backward(True, BETWEEN[between], use_reentrant=reentrant)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hard_concrete_layer_called_twice_in_a_checkpointed_region(reentrant):
    """Each call of a layer called twice per forward gets its own gates in the recompute
    (summation order aside under reentrant checkpointing, as for any mask: equal to 1e-6),
    and its second call's gates are not its first's."""
    want = _one_backward(False, BETWEEN["nothing"], twice=True, use_reentrant=reentrant)
    got = _one_backward(True, BETWEEN["nothing"], twice=True, use_reentrant=reentrant)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    once = _one_backward(True, BETWEEN["nothing"], twice=False, use_reentrant=reentrant)
    assert not torch.equal(once[0], got[0])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hard_concrete_recompute_after_an_earlier_mask_is_switched_off_raises(reentrant):
    """use_masks(False) on the first masked layer between forward and backward: the recompute
    of the second sees another generator state, and raises rather than use other gates."""
    with pytest.raises(ValueError, match="net.down.*activation checkpointing"):
        _one_backward(True, lambda c: c.use_masks(False, ["net.up"]), use_reentrant=reentrant)


def test_hard_concrete_training_forward_takes_one_number_per_masked_parameter():
    """What docs/circuits.md says: each training draw takes one number from torch's
    generator; eval forwards take none."""
    circuit = _hc_circuit(False)
    circuit.wrapped_model.net.forward = lambda x: circuit.wrapped_model.net.down(
        torch.tanh(circuit.wrapped_model.net.up(x)))  # no dropout
    torch.manual_seed(3)
    circuit(_X)
    after_train = torch.get_rng_state()
    torch.manual_seed(3)
    for _ in range(4):  # up.weight, up.bias, down.weight, down.bias
        torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(after_train, torch.get_rng_state())
    circuit.eval()
    torch.manual_seed(3)
    circuit(_X)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(3).get_state())


def test_random_ablate_values_follow_the_circuit_to_float64():
    """random_ablate values follow circuit.to(float64): the output is float64 and equals the
    float32 circuit's up to float32 rounding."""
    ref = _random_ablated(CircuitModel(_cs(), _Net(dropout=False)))
    circuit = _random_ablated(CircuitModel(_cs(), _Net(dropout=False)))
    want = ref(_X)
    circuit(_X)  # values drawn (float32) before the move
    circuit.to(torch.float64)
    got = circuit(_X.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-6)
    rv = circuit._layers["up"].params["weight"].random_values
    assert rv.dtype == torch.float64


def test_magnitude_pruning_of_a_deep_copy_moved_to_float64_ranks_the_copy():
    model = _Net()
    circuit = CircuitModel(CircuitConfig(mask_method="magnitude_pruning", target_layers=["up"],
                                         mask_hparams={"prune_percentage": 0.5},
                                         freeze_base=False), model)
    twin = copy.deepcopy(circuit).to(torch.float64)
    scale = torch.linspace(3.0, 0.1, 24, dtype=torch.float64).view(6, 4)
    with torch.no_grad():
        twin.wrapped_model.up.weight.mul_(scale)
    w = twin.wrapped_model.up.weight.detach().abs()
    want = w >= torch.quantile(w.reshape(-1), 0.5)
    assert torch.equal(twin.hard_masks()["up.weight"], want)
    orig = model.up.weight.detach().abs()
    assert torch.equal(circuit.hard_masks()["up.weight"],
                       orig >= torch.quantile(orig.reshape(-1), 0.5))
    assert not torch.equal(want, circuit.hard_masks()["up.weight"])


# -- anatomy alternatives ---------------------------------------------------------------------


def _neox(head: str | None) -> nn.Module:
    """A transformers-4-like (``embed_out``) or -5-like (``lm_head``) GPT-NeoX skeleton."""
    model = type("GPTNeoXForCausalLM", (nn.Module,), {})()
    model.gpt_neox = nn.Module()
    model.gpt_neox.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    model.gpt_neox.final_layer_norm = nn.LayerNorm(4)
    model.gpt_neox.embed_in = nn.Embedding(5, 4)
    if head is not None:
        setattr(model, head, nn.Linear(4, 5, bias=False))
    return model


@pytest.mark.parametrize("head", ["embed_out", "lm_head"])
def test_gpt_neox_head_is_found_under_either_name_and_inside_a_parent(head):
    model = _neox(head)
    loc = locate(model)
    assert loc.module("unembed") is getattr(model, head)
    assert loc.name("unembed") == head
    parent = nn.Sequential(model)
    inner = locate(parent)
    assert inner.name("unembed") == f"0.{head}"
    assert inner.module("unembed") is getattr(model, head)
    assert inner.block_name(-1) == "0.gpt_neox.layers.1"


def test_a_stage_without_the_head_names_the_first_path_and_raises_missing_part():
    loc = locate(_neox(None))
    assert loc.name("unembed") == "lm_head"
    with pytest.raises(MissingPart, match=r"\['lm_head', 'embed_out'\]"):
        loc.module("unembed")
    assert loc.name("blocks") == "gpt_neox.layers"  # single-path parts unchanged


def test_real_gpt_neox_head_is_lm_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=16)
    model = transformers.GPTNeoXForCausalLM(config)
    loc = locate(model)
    assert loc.module("unembed") is model.get_output_embeddings()
    assert loc.name("blocks") == "gpt_neox.layers"


# -- distributed ------------------------------------------------------------------------------


def _checkpointed(model, reentrant: bool = False):
    """Each block of ``model`` under activation checkpointing (reentrant: block 1 only, as a
    reentrant checkpoint gives no gradient to a region whose input needs none)."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    blocks = set(model.blocks[1:] if reentrant else model.blocks)
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
        check_fn=lambda m: m in blocks)
    return model


@distributed(world_size=2)
def test_hard_concrete_with_checkpointed_blocks_under_dtensor_tp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    model = parallelize_module(plain_net(0), mesh, dtensor_plan(use_local_output=True))
    _compare(_checkpointed(model), HARD_CONCRETE)


@distributed(world_size=2)
def test_hard_concrete_with_reentrant_checkpointed_blocks_under_fairscale():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        _compare(_checkpointed(fairscale_net(plain_net(0)), reentrant=True), HARD_CONCRETE)
    finally:
        destroy_fairscale_model_parallel()


def _magnitude_moved(par_model, ref_model, rows=None):
    """Both circuits moved to float64, their weights then set from one seeded draw: the
    sharded circuit's hard masks and eval output equal one process's."""
    targets = ["blocks.0.up", "blocks.0.down", "blocks.1.up"]
    config = CircuitConfig(mask_method="magnitude_pruning", target_layers=targets,
                           mask_hparams={"prune_percentage": 0.6, "mask_bias": True},
                           freeze_base=False)
    ref = CircuitModel(config, ref_model, process_group=local_group()).to(torch.float64)
    par = CircuitModel(config, par_model).to(torch.float64)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in targets:
            for pname, mp in par._layers[name].params.items():
                full = torch.randn(mp.param_full_shape, generator=g, dtype=torch.float64)
                getattr(ref._layers[name].module, pname).copy_(full)
                p = getattr(par._layers[name].module, pname)
                local = p.to_local() if hasattr(p, "to_local") else p
                assert local.dtype == torch.float64
                local.copy_(mp.param_region.take(full))
    got, want = par.hard_masks(), ref.hard_masks()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    par.eval(), ref.eval()
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = par(x if rows is None else x[rows])
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    torch.testing.assert_close(out, ref(x)[rows] if rows is not None else ref(x))
    assert par.compute_l0_statistics() == ref.compute_l0_statistics()


@pytest.mark.parametrize("layout", ["fairscale", "dtensor", "fsdp2"])
@distributed(world_size=2)
def test_magnitude_pruning_after_to_float64_under_sharding_equals_one_process(layout):
    if layout == "fairscale":
        from fairscale.nn.model_parallel import initialize as fs

        fs.initialize_model_parallel(2)
        try:
            _magnitude_moved(fairscale_net(plain_net(0)), plain_net(0))
        finally:
            destroy_fairscale_model_parallel()
    elif layout == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh("cpu", (2,))
        _magnitude_moved(parallelize_module(plain_net(0), mesh,
                                            dtensor_plan(use_local_output=True)), plain_net(0))
    else:
        rank = dist.get_rank()
        _magnitude_moved(fsdp2_net(plain_net(0)), plain_net(0),
                         rows=slice(2 * rank, 2 * rank + 2))


@distributed(world_size=2)
def test_join_over_a_one_rank_ddp_or_disabled_is_not_refused():
    """The refusal is for DDP split over data-parallel ranks under an enabled Join: a DDP of
    one rank (its own group) under Join, and Join(enable=False), hook as before."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(2, H)
    model = DDP(plain_net(0), process_group=local_group())
    stored: dict = {}
    flex = FlexModel(model, stored, process_group=local_group())
    flex.register_forward_hook(HookFunction(actual_names(model)["blocks.0.up"]))
    with Join([model]):
        flex(x).sum().backward()
    torch.testing.assert_close(stored[actual_names(model)["blocks.0.up"]][0],
                               plain_net(0).blocks[0].up(x).detach())
    flex.close()
    model, flex = _join_model()
    with Join([model], enable=False):
        flex(x[rank:rank + 1]).sum().backward()
    with Join([model]):
        pass  # now enabled: refused from here on
    with pytest.raises(RuntimeError, match="never given to Join"):
        flex(x[rank:rank + 1])
    flex.close()


# -- Join with a rank out of batches (it hung before: short timeouts) ----------------------

@pytest.mark.parametrize("batches", [(1, 0), (2, 0), (0, 0), (2, 1)],
                         ids=["one_and_none", "two_and_none", "none_anywhere", "two_and_one"])
@distributed(world_size=2, timeout_s=20)
def test_join_with_a_rank_without_batches_raises_on_every_rank(batches):
    """A rank with no batch left waits in Join's exit: the refusing ranks tell it there, and it
    raises the same error (before, it waited until the process group's timeout). Nothing is
    left pending: the flex model closes and a collective then meets on every rank."""
    model, flex = _join_model()
    rank = dist.get_rank()
    mine = [torch.randn(2, H) for _ in range(batches[rank])]
    if batches == (0, 0):  # nothing refused: Join syncs and exits as without hooks
        with Join([model]):
            pass
    else:
        with pytest.raises(RuntimeError, match="under torch.distributed.algorithms.join.Join"):
            with Join([model]):
                for x in mine:
                    flex(x).sum().backward()
    flex.close()
    assert "join_hook" not in vars(model)  # the runtime's wrapper is gone with it
    met = torch.ones(1)
    dist.all_reduce(met)
    assert met.item() == 2


@distributed(world_size=2, timeout_s=20)
def test_join_without_hooked_forwards_trains_as_without_flex():
    """Uneven inputs under Join with the hooks disabled: DDP's shadowing and its final sync
    work through the wrapped join hook (its one extra all-reduce meets on every rank); the
    parameters equal a DDP run under Join without FlexModel."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, H, generator=gen) for _ in range(3)]
    mine = xs if rank == 0 else xs[:1]

    def train(flexed: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = DDP(plain_net(0))
        flex = FlexModel(model, {}) if flexed else None
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Join([model]):
            for x in mine:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        if flex is not None:
            flex.close()
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(train(True), train(False), strict=True):
        assert torch.equal(got, want)
