"""Circuit masks on sharded models equal the one-process circuit: fairscale TP=2, DTensor TP=2 and
FSDP2 over 2 ranks. Each rank holds and trains the mask of its own shard; after N training
steps every local mask is its slice of the one-process mask, and the L0 statistics, the hard
masks handed to MaskTheater, the sampled ablations and the ablated outputs are those of one
process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_cases import H, dtensor_plan, fairscale_net, fsdp2_net, local_group, plain_net
from rank_pool import destroy_fairscale_model_parallel, distributed

from flex_surgery.surgery import MaskTheater
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel, anneal_temperature

TARGETS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]
STEPS = 6
HPARAMS = [dict(mask_unit="weight", mask_bias=True), dict(mask_unit="neuron", mask_bias=True)]
# Hard concrete gates (drawn anew at every forward from the circuit's seed): logits 0.04.
HARD_CONCRETE = dict(mask_method="hard_concrete", mask_unit="weight", mask_bias=True)
# Magnitude pruning (not trained; the quantile is the whole parameter's): 60 % removed.
MAGNITUDE = dict(mask_method="magnitude_pruning", mask_bias=True)


def _config(hp: dict) -> CircuitConfig:
    hp = dict(hp)
    method = hp.pop("mask_method", "continuous_sparsification")
    init = {"continuous_sparsification": dict(mask_init_value=0.05),
            "hard_concrete": dict(mask_init_percentage=0.51),
            "magnitude_pruning": dict(prune_percentage=0.6)}[method]
    return CircuitConfig(mask_method=method, mask_hparams=dict(**init, **hp),
                         target_layers=TARGETS, l0_lambda=2e-2, seed=3)


def _data(rows: slice | None = None):
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, H, generator=gen), torch.randn(8, 6, generator=gen)
    return (x, y) if rows is None else (x[rows], y[rows])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(circuit: CircuitModel, x: torch.Tensor, y: torch.Tensor, full=_full) -> list[float]:
    opt = torch.optim.SGD(circuit.mask_logits.parameters(), lr=2.0)
    l0 = []
    for step in range(STEPS):
        loss = F.mse_loss(full(circuit(x)), y) + circuit.config.l0_lambda * circuit.l0_loss()
        if loss.requires_grad:  # magnitude pruning trains nothing
            loss.backward()
        opt.step()
        opt.zero_grad()
        if circuit.config.mask_method == "continuous_sparsification":
            anneal_temperature(circuit, step + 1, STEPS, final_temperature=20.0)
        l0.append(circuit.compute_l0_statistics()["total_l0"])
    return l0


def _compare(par_model, hp: dict, rows: slice | None = None, *, ref_model=None,
             targets: list[str] = TARGETS, data=_data, full=_full, group=None,
             ref_group=None) -> None:
    """Train the sharded circuit and a one-process twin (default ``plain_net(0)``) on the same
    data; compare everything. ``targets[0]`` must be split over 2 ranks; ``full`` turns the
    sharded model's output into the whole one (differentiably)."""
    flags = [(p.requires_grad, p.data_ptr()) for p in par_model.parameters()]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in par_model.modules()]
    config = _config(hp)
    config.target_layers = targets
    ref = CircuitModel(config, ref_model if ref_model is not None else plain_net(0),
                       process_group=ref_group)
    par = CircuitModel(config, par_model, process_group=group)
    shard = par._layers[targets[0]].params["weight"].logits
    assert 2 * shard.numel() == ref._layers[targets[0]].params["weight"].logits.numel()
    x, y = data()
    ref_l0 = _train(ref, x, y)
    px, py = data(rows)
    par_l0 = _train(par, px, py, full)
    assert par_l0 == ref_l0  # hard-mask L0 after every step: exact
    moved = 0
    for name, layer in par._layers.items():
        for pname, mp in layer.params.items():
            want = ref._layers[name].params[pname].logits.detach()
            torch.testing.assert_close(mp.logits.detach(), mp.region.take(want),
                                       rtol=1e-5, atol=1e-6)
            moved += int((want <= 0).sum())  # every mask starts open (logits > 0)
    assert moved > 0  # the L0 penalty removed weights: the comparison can fail
    with torch.no_grad():
        torch.testing.assert_close(par.l0_loss(), ref.l0_loss(), rtol=1e-5, atol=1e-4)
        par.eval(), ref.eval()
        assert par.compute_l0_statistics() == ref.compute_l0_statistics()
        for mode in ("none", "zero_ablate", "randomly_sampled", "complement_sampled",
                     "random_ablate"):
            par.set_ablate_mode(mode), ref.set_ablate_mode(mode)
            try:
                want_out = ref(px)
            except ValueError as exc:  # complement_sampled with more than half kept
                with pytest.raises(ValueError, match=str(exc).split(":")[1][:30]):
                    par(px)
                continue
            torch.testing.assert_close(full(par(px)), want_out, rtol=1e-5, atol=1e-5)
            if mode != "random_ablate":
                got, want = par.hard_masks(), ref.hard_masks()
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in want), mode
                stats = par.compute_l0_statistics()
                assert stats == ref.compute_l0_statistics(), mode
        # The trained circuit as a hard mask through MaskTheater, on the sharded model itself.
        par.set_ablate_mode("none"), ref.set_ablate_mode("none")
        masks, want = par.hard_masks(), full(par(px))
        par.use_masks(False)
        with MaskTheater(par.wrapped_model, masks):
            torch.testing.assert_close(full(par.wrapped_model(px)), want, rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in par.wrapped_model.named_parameters()}
    model = par.remove_masks()
    for n, p in model.named_parameters():
        assert torch.equal(_full(p), _full(before[n])), n
    assert [(p.requires_grad, p.data_ptr()) for p in model.parameters()] == flags
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks


@pytest.mark.parametrize("hp", [*HPARAMS, HARD_CONCRETE, MAGNITUDE],
                         ids=["weight", "neuron", "hc", "magnitude"])
@distributed(world_size=2)
def test_fairscale_tp(hp):
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        _compare(fairscale_net(plain_net(0)), hp)
    finally:
        destroy_fairscale_model_parallel()


def _megatron_data(rows: slice | None = None):
    from megatron_cases import B, H, S, token_ids

    ids = token_ids(seed=4)
    y = torch.randn(S, B, H, generator=torch.Generator().manual_seed(5))
    return ids, y


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sequence-parallel"])
@pytest.mark.parametrize("hp", [*HPARAMS, HARD_CONCRETE, MAGNITUDE],
                         ids=["weight", "neuron", "hc", "magnitude"])
@distributed(world_size=2)
def test_megatron_core_tp(hp, sequence_parallel):
    """Megatron-core's ColumnParallelLinear / RowParallelLinear (TP=2, CPU; also with sequence
    parallelism): each rank trains the mask of its shard, equal to the one-process circuit on
    the same weights. Under sequence parallelism the row-parallel bias is replicated but sees
    only this rank's tokens: its mask gradient is summed over the group (without that, the
    bias masks drift from one process's and the L0 differs after the first step)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron_cases import megatron_mlp, megatron_parallel, plain_mlp

    def sequence_gathered(out: torch.Tensor) -> torch.Tensor:  # the loss is on every rank
        return gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)

    with megatron_parallel(tensor_parallel=2):
        model = megatron_mlp(plain_mlp(0), sequence_parallel=sequence_parallel)
        _compare(model, hp, ref_model=plain_mlp(0), targets=["up", "down"],
                 data=_megatron_data, full=sequence_gathered if sequence_parallel else _full)


@pytest.mark.parametrize("hp", [*HPARAMS, HARD_CONCRETE, MAGNITUDE],
                         ids=["weight", "neuron", "hc", "magnitude"])
@distributed(world_size=2)
def test_dtensor_tp(hp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    _compare(parallelize_module(plain_net(0), mesh, dtensor_plan(use_local_output=True)), hp)


@pytest.mark.parametrize("hp", [*HPARAMS, HARD_CONCRETE, MAGNITUDE],
                         ids=["weight", "neuron", "hc", "magnitude"])
@distributed(world_size=2)
def test_fsdp2(hp):
    """Data parallel: each rank trains on half of the batch; the mask gradients are averaged
    over the ranks as FSDP averages weight gradients, so the one-process twin sees the whole
    batch."""
    rank = dist.get_rank()
    _compare(fsdp2_net(plain_net(0)), hp, rows=slice(4 * rank, 4 * rank + 4))


def _checkpointed(model):
    """``model`` with each block under (non-reentrant) activation checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    blocks = set(model.blocks)
    apply_activation_checkpointing(model, check_fn=lambda m: m in blocks)
    return model


@pytest.mark.parametrize("layout", ["fairscale", "fsdp2"])
@distributed(world_size=2)
def test_hard_concrete_with_checkpointed_blocks(layout):
    """Blocks recomputed in the backward draw the gates of the forward they recompute: the
    sharded, checkpointed run trains as the one-process run without checkpointing."""
    if layout == "fsdp2":
        rank = dist.get_rank()
        _compare(fsdp2_net(_checkpointed(plain_net(0))), HARD_CONCRETE,
                 rows=slice(4 * rank, 4 * rank + 4))
        return
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        _compare(_checkpointed(fairscale_net(plain_net(0))), HARD_CONCRETE)
    finally:
        destroy_fairscale_model_parallel()


@pytest.mark.parametrize("layout", ["fairscale", "fsdp2"])
@distributed(world_size=2, timeout_s=60)
def test_hard_concrete_recompute_ambiguous_on_one_rank_is_refused_on_every_rank(layout):
    """Two micro-batches, each forward seeded by its sample (as a data pipeline may): rank 0's
    two are seeded alike, so its generator cannot tell their recomputes apart, rank 1's can.
    Every rank raises (before, rank 0 raised alone and rank 1 waited in the layer's
    collectives); a step without the reseeding then trains."""
    rank = dist.get_rank()
    if layout == "fsdp2":
        model = fsdp2_net(_checkpointed(plain_net(0)))
    else:
        from fairscale.nn.model_parallel import initialize as fs

        fs.initialize_model_parallel(2)
        model = _checkpointed(fairscale_net(plain_net(0)))
    try:
        circuit = CircuitModel(_config(HARD_CONCRETE), model)
        x, y = _data(slice(0, 4))
        loss = 0
        for seed in ([7, 7] if rank == 0 else [7, 8]):
            torch.manual_seed(seed)
            loss = loss + F.mse_loss(_full(circuit(x)), y)
        with pytest.raises(ValueError, match="does not match a recent training forward") as err:
            loss.backward()
        assert ("this rank's" in str(err.value)) == (rank == 0)
        if layout == "fairscale":
            F.mse_loss(circuit(x), y).backward()
            assert all(mp.logits.grad is not None for layer in circuit._layers.values()
                       for mp in layer.params.values())
    finally:
        if layout == "fairscale":
            destroy_fairscale_model_parallel()


@distributed(world_size=2)
def test_unknown_layout_is_refused_and_nothing_is_modified():
    """A plain nn.Linear whose weight differs across the TP ranks: no framework says how it is
    split, so its mask cannot be placed."""
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    fs.initialize_model_parallel(2)
    try:
        model = fairscale_net(plain_net(0))
        torch.manual_seed(dist.get_rank())
        model.head = torch.nn.Linear(H, 6)  # a different head on each rank
        hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
        flags = [p.requires_grad for p in model.parameters()]
        with pytest.raises(UnknownLayoutError, match=r"\['head'\] differ across"):
            CircuitModel(_config(HPARAMS[0]), model)
        assert [(len(m._forward_pre_hooks), len(m._forward_hooks))
                for m in model.modules()] == hooks
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        destroy_fairscale_model_parallel()


@distributed(world_size=2)
def test_unknown_layout_under_dtensor_tp_is_refused():
    """The same under DTensor TP, where no global state names the tensor-parallel group (it is
    read from the parameters' mesh): before, the differing head was masked as whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    mesh = init_device_mesh("cpu", (2,))
    model = parallelize_module(plain_net(0), mesh, dtensor_plan(use_local_output=True))
    torch.manual_seed(dist.get_rank())
    model.head = torch.nn.Linear(H, 6)  # a different head on each rank
    with pytest.raises(UnknownLayoutError, match=r"\['head'\] differ across"):
        CircuitModel(_config(HPARAMS[0]), model)


@distributed(world_size=2)
def test_ddp_is_refused_and_nothing_is_modified():
    """Under DDP the mask gradients would not be averaged over the replicas: refused."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    model = DDP(plain_net(0))
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    with pytest.raises(UnknownLayoutError, match=r"do not support \['DDP'\]"):
        CircuitModel(CircuitConfig(target_layers=["module.head"]), model)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert all(p.requires_grad for p in model.parameters())


@distributed(world_size=2)
def test_tp_example_finds_the_circuit():
    """docs/examples/circuit_tp.py in reduced size on the 2-rank pool."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "examples" / "circuit_tp.py"
    spec = importlib.util.spec_from_file_location("circuit_tp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.example(steps=60, epochs=3, plot=None)
    assert out["l0"] < 0.2 * out["max_l0"]
    assert out["accuracy"] > 0.8
    inputs = out["first_layer_inputs"]
    assert inputs[0] + inputs[1] > sum(inputs[2:])


@distributed(world_size=4)
def test_fairscale_tp_with_data_parallel_replicas_is_refused():
    """fairscale TP=2 on 4 ranks: two data-parallel replicas would train their masks apart with
    nothing averaging them, so the masks are refused on every rank, nothing modified."""
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    fs.initialize_model_parallel(2)
    try:
        model = fairscale_net(plain_net(0))
        hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
        flags = [p.requires_grad for p in model.parameters()]
        with pytest.raises(UnknownLayoutError, match="2 data-parallel replicas"):
            CircuitModel(_config(HPARAMS[0]), model)
        assert [(len(m._forward_pre_hooks), len(m._forward_hooks))
                for m in model.modules()] == hooks
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        destroy_fairscale_model_parallel()


@distributed(world_size=4)
def test_megatron_core_tp_with_data_parallel_replicas_is_refused():
    """Megatron-core TP=2 on 4 ranks: as with fairscale, nothing averages the mask gradients of
    the two data-parallel replicas, so the masks are refused on every rank."""
    from megatron_cases import megatron_mlp, megatron_parallel

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    with megatron_parallel(tensor_parallel=2):
        model = megatron_mlp()
        flags = [p.requires_grad for p in model.parameters()]
        config = _config(HPARAMS[0])
        config.target_layers = ["up", "down"]
        with pytest.raises(UnknownLayoutError, match="2 data-parallel replicas"):
            CircuitModel(config, model)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert not any(m._forward_pre_hooks for m in model.modules())


@distributed(world_size=4)
def test_fairscale_tp_replicas_each_train_their_own_circuit_given_their_group():
    """fairscale TP=2 on 4 ranks, each replica's CircuitModel given its tensor-parallel group
    (what the refusal above suggests): each replica trains its own circuit, equal to the
    one-process circuit on the same data; no collective reaches the other replica."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        _compare(fairscale_net(plain_net(0)), HPARAMS[0], group=fs.get_model_parallel_group(),
                 ref_group=local_group())
    finally:
        destroy_fairscale_model_parallel()


@pytest.mark.parametrize("hp", [HPARAMS[0], HARD_CONCRETE, MAGNITUDE],
                         ids=["weight", "hc", "magnitude"])
@distributed(world_size=2)
def test_fsdp2_mixed_precision(hp):
    """FSDP2 computing in bf16 from float32 shards (MixedPrecisionPolicy): the masks (float32
    logits) multiply the bf16 weight the forward computes with, as in one process whose model
    computes in bf16 with float32 mask logits; magnitude pruning ranks those bf16 weights in a
    forward and in hard_masks() alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def net():
        model = plain_net(0)
        with torch.no_grad():  # magnitudes that bf16 rounds into ties: the ranking differs
            w = model.blocks[0].up.weight
            w.copy_(1 + torch.arange(w.numel(), dtype=w.dtype).view_as(w) / 4096)
        return model

    mesh = init_device_mesh("cpu", (2,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    config = _config(hp)
    par = CircuitModel(config, model)
    ref = CircuitModel(config, net(), process_group=local_group())
    ref.wrapped_model.to(torch.bfloat16)  # the logits stay float32, as the shards' are
    x, _ = _data()
    rank = dist.get_rank()
    rows = slice(4 * rank, 4 * rank + 4)
    got, want = par(x[rows]), ref(x.bfloat16())
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want[rows], rtol=2e-2, atol=2e-2)
    if hp.get("mask_method") != "magnitude_pruning":
        got.float().pow(2).mean().backward()
        want.float().pow(2).mean().backward()
        for name, mp in par._layers[TARGETS[0]].params.items():
            ref_grad = ref._layers[TARGETS[0]].params[name].logits.grad
            torch.testing.assert_close(mp.logits.grad, mp.region.take(ref_grad),
                                       rtol=5e-2, atol=5e-3)
    par.eval(), ref.eval()
    masks, ref_masks = par.hard_masks(), ref.hard_masks()
    assert all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks)
