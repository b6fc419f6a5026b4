"""Second reader: the logit lens, circuit masks, MaskTheater and LoRA surgery on sharded layouts
at odd shapes, against the one-process run of the same weights and inputs.

Odd shapes: a vocabulary or an output dim that does not divide by the number of ranks, a
data-parallel replica with no rows, a single-row FSDP2 weight (one rank holds nothing), a LoRA
rank of 1 under FSDP2 (one rank holds no row of ``A``), masks that cut across the shard
boundary, the lens at the first / last block only, and theaters that raise part-way or nest.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_cases import Block, local_group, seeded_linear
from rank_pool import destroy_fairscale_model_parallel, distributed
from test_surgery_lora import _lora_model
from torch import nn

from flex_surgery.anatomy import Anatomy, register_anatomy
from flex_surgery.lens import LogitLens, logit_lens
from flex_surgery.models import example_inputs
from flex_surgery.parallel.frameworks.base import LayoutError
from flex_surgery.surgery import MaskTheater, SurgicalTheater
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel

H, FF = 8, 16
TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64 models: only the summation order differs


class OddLM(nn.Module):
    """Embedding -> blocks -> LayerNorm -> head; the vocabulary size is the caller's."""

    def __init__(self, vocab: int, seed: int = 0, n_blocks: int = 3, ff: int = FF,
                 head_bias: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, H)
        self.blocks = nn.ModuleList(
            [Block(seeded_linear(H, ff, g), seeded_linear(ff, H, g)) for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(H)
        self.head = seeded_linear(H, vocab, g)
        if not head_bias:
            self.head.bias = None
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, H, generator=g))
            self.norm.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
            self.norm.bias.copy_(0.1 * torch.randn(H, generator=g))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


register_anatomy("OddLM", Anatomy("blocks", "norm", "embed", "head"))


def _ids(vocab: int, batch: int, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_lens_equal(got, want) -> None:
    assert got.layers == want.layers
    assert got.tokens.shape == want.tokens.shape, (got.tokens.shape, want.tokens.shape)
    assert torch.equal(got.tokens, want.tokens), (got.tokens != want.tokens).nonzero()[:5]
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)


# -- the lens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", [None, [-1]])
@distributed(world_size=2, timeout_s=40)
def test_lens_data_parallel_with_a_replica_holding_no_rows(positions):
    """batch 1 over 2 replicas: rank 1 runs the model on an empty batch."""
    model = OddLM(11).double().eval()
    ids = _ids(11, batch=1)
    want = logit_lens(model, ids, top_k=3, positions=positions, process_group=local_group())
    mine = ids if dist.get_rank() == 0 else ids[:0]
    got = logit_lens(model, mine, top_k=3, positions=positions, data_parallel_size=2)
    _assert_lens_equal(got, want)


@distributed(world_size=2, timeout_s=40)
def test_lens_under_ddp_with_uneven_batches_at_first_and_last_block():
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = OddLM(13).double().eval()
    ids = _ids(13, batch=3)
    want = logit_lens(model, ids, layers=[0, -1], top_k=4, process_group=local_group())
    ddp = DDP(OddLM(13).double().eval())
    mine = ids[:2] if dist.get_rank() == 0 else ids[2:]
    got = logit_lens(ddp, mine, layers=[0, -1], top_k=4)
    _assert_lens_equal(got, want)


@distributed(world_size=2, timeout_s=40)
def test_lens_dtensor_vocab_parallel_head_with_an_odd_vocabulary():
    """V = 21 over TP=2: the head's Shard(0) rows are 11 and 10."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = OddLM(21).double().eval()
    ids = _ids(21, batch=2)
    want = logit_lens(model, ids, top_k=5, process_group=local_group())
    mesh = init_device_mesh("cpu", (2,))
    par = parallelize_module(OddLM(21).double().eval(), mesh,
                             {"head": ColwiseParallel(output_layouts=Replicate())})
    with LogitLens(par, top_k=5) as lens:
        assert lens._unembed.weight.shape[0] == (11 if dist.get_rank() == 0 else 10)
        got = lens(ids)
    _assert_lens_equal(got, want)


@distributed(world_size=2, timeout_s=40)
def test_lens_fairscale_replicated_head_with_an_odd_vocabulary_and_no_bias():
    """fairscale TP=2 blocks, a plain head of 21 rows (split 11 / 10 by the lens), no bias."""
    from fairscale.nn.model_parallel import initialize as fs
    from parallel_cases import column_like, row_like

    fs.initialize_model_parallel(2)
    try:
        plain = OddLM(21, head_bias=False).double().eval()
        ids = _ids(21, batch=2)
        want = logit_lens(plain, ids, top_k=4, process_group=local_group())
        par = OddLM(21, head_bias=False).double().eval()
        par.blocks = nn.ModuleList([Block(column_like(b.up), row_like(b.down))
                                    for b in par.blocks]).double()
        got = logit_lens(par, ids, top_k=4, tensor_parallel_size=2)
        _assert_lens_equal(got, want)
    finally:
        destroy_fairscale_model_parallel()


@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=4, timeout_s=60)
def test_megatron_gpt_lens_tp2_dp2_uneven_batch_equals_tp1(sequence_parallel):
    """Megatron GPTModel at TP=2 x DP=2 with 3 batch rows (2 on replica 0, 1 on replica 1):
    the lens of [s, b, h] residuals, joined on the batch dim (1), at the first and last block."""
    from megatron.core import parallel_state
    from megatron_gpt_cases import build_gpt, gpt_parallel

    gen = torch.Generator().manual_seed(3)
    seq = 8
    ids = torch.randint(0, 128, (3, seq), generator=gen)
    pos = torch.arange(seq).expand(3, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).expand(3, 1, seq, seq)
    with gpt_parallel(tp=1):
        ref = build_gpt(tp=1)
        want = logit_lens(ref, (ids, pos, mask), layers=[0, -1], top_k=3,
                          process_group=local_group())
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel)
        rows = slice(0, 2) if parallel_state.get_data_parallel_rank() == 0 else slice(2, 3)
        got = logit_lens(model, (ids[rows], pos[rows], mask[rows]), layers=[0, -1], top_k=3)
    assert got.tokens.shape == (2, seq, 3, 3)
    _assert_lens_equal(got, want)


# -- circuits ---------------------------------------------------------------------------------
class OddNet(nn.Module):
    """Two blocks of width ``ff`` and a head of ``out`` rows (odd shapes for the shards)."""

    def __init__(self, ff: int, out: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(
            [Block(seeded_linear(H, ff, g), seeded_linear(ff, H, g)) for _ in range(2)])
        self.head = seeded_linear(H, out, g)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


CIRCUIT_TARGETS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]


def _circuit_config(unit: str) -> CircuitConfig:
    return CircuitConfig(mask_hparams=dict(mask_unit=unit, mask_bias=True, mask_init_value=0.05),
                         target_layers=CIRCUIT_TARGETS, l0_lambda=2e-2, seed=3)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train_circuit(circuit: CircuitModel, x, y, steps: int = 4) -> list[float]:
    opt = torch.optim.SGD(circuit.mask_logits.parameters(), lr=2.0)
    l0 = []
    for step in range(steps):
        loss = F.mse_loss(_full(circuit(x)), y) + circuit.config.l0_lambda * circuit.l0_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        circuit.temperature = 1.0 + 3.0 * (step + 1)
        l0.append(circuit.compute_l0_statistics()["total_l0"])
    return l0


def _compare_circuits(par_model, ff: int, out: int, rows: slice | None = None,
                      unit: str = "weight") -> None:
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, H, generator=gen), torch.randn(8, out, generator=gen)
    ref = CircuitModel(_circuit_config(unit), OddNet(ff, out))
    par = CircuitModel(_circuit_config(unit), par_model)
    ref_l0 = _train_circuit(ref, x, y)
    px, py = (x, y) if rows is None else (x[rows], y[rows])
    par_l0 = _train_circuit(par, px, py)
    assert par_l0 == ref_l0
    moved = 0
    for name, layer in par._layers.items():
        for pname, mp in layer.params.items():
            want = ref._layers[name].params[pname].logits.detach()
            torch.testing.assert_close(mp.logits.detach(), mp.region.take(want),
                                       rtol=1e-5, atol=1e-6, msg=lambda m, k=(name, pname):
                                       f"{k}: {m}")
            moved += int((want <= 0).sum())
    assert moved > 0
    with torch.no_grad():
        par.eval(), ref.eval()
        assert par.compute_l0_statistics() == ref.compute_l0_statistics()
        for mode in ("none", "zero_ablate", "randomly_sampled", "random_ablate"):
            par.set_ablate_mode(mode), ref.set_ablate_mode(mode)
            torch.testing.assert_close(_full(par(px)), ref(px), rtol=1e-5, atol=1e-5)
            if mode != "random_ablate":
                got, want = par.hard_masks(), ref.hard_masks()
                assert all(torch.equal(got[k], want[k]) for k in want), mode
        # The circuit as a hard mask through MaskTheater on the sharded model itself.
        par.set_ablate_mode("none")
        masks, want_out = par.hard_masks(), _full(par(px))
        par.use_masks(False)
        with MaskTheater(par.wrapped_model, masks):
            torch.testing.assert_close(_full(par.wrapped_model(px)), want_out, rtol=0, atol=0)
        par.use_masks(True)
    before = {n: _full(p).detach().clone() for n, p in par.wrapped_model.named_parameters()}
    model = par.remove_masks()
    for n, p in model.named_parameters():
        assert torch.equal(_full(p), before[n]), n


@pytest.mark.parametrize("unit", ["weight", "neuron"])
@distributed(world_size=2, timeout_s=40)
def test_circuit_dtensor_tp_with_an_uneven_head_equals_one_process(unit):
    """A column-parallel head of 5 rows (split 3 / 2, output replicated) after even TP blocks.
    (Uneven column -> row pairs are not tried: DTensor's RowwiseParallel rebuilds its input
    assuming even shards, which fails in torch itself.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2,))
    plan = {"head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(2):
        plan[f"blocks.{i}.up"] = ColwiseParallel()
        plan[f"blocks.{i}.down"] = RowwiseParallel()
    _compare_circuits(parallelize_module(OddNet(FF, 5), mesh, plan), FF, 5, unit=unit)


@pytest.mark.parametrize("unit", ["weight", "neuron"])
@distributed(world_size=2, timeout_s=40)
def test_circuit_fsdp2_with_a_single_row_head_equals_one_process(unit):
    """FSDP2 over 2 ranks; FF = 15 (rows 8 / 7) and a head of one row: rank 1 holds none of
    it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = OddNet(15, 1)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rank = dist.get_rank()
    _compare_circuits(model, 15, 1, rows=slice(4 * rank, 4 * rank + 4), unit=unit)


def _fsdp2(model: nn.Module, blocks: bool = True) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    if blocks:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@pytest.mark.parametrize("units", ["blocks_and_root", "root", "own_head_unit"])
@distributed(world_size=2, timeout_s=40)
def test_lens_on_fsdp2_equals_one_process(units):
    """FSDP2 shards the head's and the final norm's parameters over the data-parallel mesh;
    each replica runs its own rows of the batch. The lens unshards the units that hold them
    while it decodes (the root keeps them whole after its forward; a head in its own unit with
    reshard_after_forward=True does not) and reshards what it unsharded: equal to one process,
    and the parameters are as they were afterwards (sharded DTensors stay sharded)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = OddLM(12).double().eval()
    ids = _ids(12, batch=4)
    want = logit_lens(model, ids, top_k=3, process_group=local_group())
    par = OddLM(12).double().eval()
    mesh = init_device_mesh("cpu", (2,))
    if units != "root":
        for block in par.blocks:
            fully_shard(block, mesh=mesh)
    if units == "own_head_unit":
        fully_shard(par.head, mesh=mesh, reshard_after_forward=True)
    fully_shard(par, mesh=mesh)
    rank = dist.get_rank()
    mine = ids[2 * rank:2 * rank + 2]
    hooks = [len(m._forward_hooks) for m in par.modules()]
    got = logit_lens(par, mine, top_k=3)
    _assert_lens_equal(got, want)
    assert [len(m._forward_hooks) for m in par.modules()] == hooks
    if units == "own_head_unit":
        assert type(par.head.weight).__name__ == "DTensor"  # resharded, as FSDP2 left it
    with torch.no_grad():  # the model goes on
        torch.testing.assert_close(par(mine), model(mine), rtol=1e-12, atol=1e-12)


@distributed(world_size=4, timeout_s=60)
def test_lens_on_fsdp2_x_tp_equals_one_process():
    """A 2-D mesh (dp 2 x tp 2): the head is column-parallel over tp (a vocabulary split the
    lens merges exactly) and FSDP2 shards every tp piece again over dp; the lens unshards the
    dp shards only and merges over tp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = OddLM(12).double().eval()
    ids = _ids(12, batch=4)
    want = logit_lens(model, ids, top_k=3, process_group=local_group())
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    par = parallelize_module(OddLM(12).double().eval(), mesh["tp"],
                             {"head": ColwiseParallel(output_layouts=Replicate())})
    for block in par.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(par, mesh=mesh["dp"])
    dp = mesh.get_local_rank("dp")
    got = logit_lens(par, ids[2 * dp:2 * dp + 2], top_k=3)
    _assert_lens_equal(got, want)


# -- theaters: masks, nesting, exceptions, LoRA -------------------------------------------------
def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def _assert_bit_exact(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(_full(p), before[n]), n


def _masks_across_the_boundary(model: nn.Module, vocab: int) -> dict[str, torch.Tensor]:
    """Masks whose kept region straddles the rank boundary of every sharded dim (a band of
    rows around the middle, a checkerboard elsewhere)."""
    g = torch.Generator().manual_seed(11)
    masks = {}
    for name in ("blocks.0.up.weight", "blocks.1.down.weight", "head.weight", "head.bias"):
        shape = dict(model.named_parameters())[name].shape
        masks[name] = torch.rand(shape, generator=g) > 0.4
    masks["head.weight"][vocab // 2 - 1: vocab // 2 + 1] = False  # rows across the cut
    return masks


@distributed(world_size=2, timeout_s=40)
def test_nested_theaters_on_fsdp2_with_odd_rows_equal_one_process_at_every_level():
    """SurgicalTheater(scale) around MaskTheater on FSDP2 (the root holds the embedding, the
    norm and an 11-row head, split 6 / 5; root params stay unsharded after a forward): the
    outputs inside the inner, after it, and after both equal one process, and the shards come
    back bit for bit on every rank."""
    plain = OddLM(11).double().eval()
    ids = _ids(11, batch=4)
    masks = _masks_across_the_boundary(plain, 11)
    want = []
    with torch.no_grad():
        want.append(plain(ids))
        with SurgicalTheater(plain, layers=["head", "blocks.0.up"], modification_type="scale",
                             factor=0.5):
            with MaskTheater(plain, masks):
                want.append(plain(ids))
            want.append(plain(ids))
        want.append(plain(ids))
    par = _fsdp2(OddLM(11).double().eval())
    before = _full_state(par)
    got = []
    with torch.no_grad():
        got.append(par(ids))
        with SurgicalTheater(par, layers=["head", "blocks.0.up"], modification_type="scale",
                             factor=0.5):
            with MaskTheater(par, masks):
                got.append(par(ids))
            got.append(par(ids))
        got.append(par(ids))
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, i=i: f"level {i}: {m}")
    _assert_bit_exact(par, before)


@pytest.mark.parametrize("kind", ["noise", "mask"])
@distributed(world_size=2, timeout_s=40)
def test_theater_body_raising_on_fairscale_tp_restores_every_rank(kind):
    """Both ranks raise inside the body after a forward: the weights (column shards, row shards,
    replicated biases, the plain head) come back bit for bit, and a later forward equals the
    untouched one-process model."""
    from fairscale.nn.model_parallel import initialize as fs
    from parallel_cases import column_like, row_like

    fs.initialize_model_parallel(2)
    try:
        plain = OddLM(10).double().eval()
        par = OddLM(10).double().eval()
        par.blocks = nn.ModuleList([Block(column_like(b.up), row_like(b.down))
                                    for b in par.blocks]).double()
        ids = _ids(10, batch=2)
        with torch.no_grad():
            want = plain(ids)
        before = {n: p.detach().clone() for n, p in par.named_parameters()}
        theater = (SurgicalTheater(par, modification_type="noise", noise_scale=0.5, seed=4,
                                   params="all") if kind == "noise"
                   else MaskTheater(par, _masks_across_the_boundary(plain, 10)))
        with pytest.raises(RuntimeError, match="mid-way"), torch.no_grad():
            with theater:
                changed = par(ids)
                raise RuntimeError("mid-way")
        assert not torch.allclose(changed, want)
        for n, p in par.named_parameters():
            assert torch.equal(p, before[n]), n
        with torch.no_grad():
            torch.testing.assert_close(par(ids), want, **TIGHT)
    finally:
        destroy_fairscale_model_parallel()


LORA_EDITS = {
    "scale": dict(modification_type="scale", factor=0.5),
    "noise": dict(modification_type="noise", noise_scale=0.05, seed=3),
    "custom": dict(modification_fn=lambda w: -0.3 * w + 0.01 * w.mean(), full_parameter=True),
    "elementwise": dict(modification_fn=lambda w: -0.3 * w),
}


@pytest.mark.parametrize("kind", sorted(LORA_EDITS))
@distributed(world_size=2, timeout_s=60)
def test_lora_rank_one_under_fsdp2_equals_the_merged_model(kind):
    """r = 1: FSDP2 gives rank 0 the one row of every A and rank 1 none; custom edits gather A
    and B. The sharded LoRA model equals the one-process merged model; every shard returns."""
    import copy

    pytest.importorskip("peft")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lora = _lora_model(r=1, targets=("q_proj", "up_proj", "down_proj"))
    merged = copy.deepcopy(lora).merge_and_unload()
    inner = lora.base_model.model
    mesh = init_device_mesh("cpu", (2,))
    for layer in inner.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(inner, mesh=mesh)
    a = inner.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.to_local().shape[0] == (1 if dist.get_rank() == 0 else 0)
    x = example_inputs("llama", seed=dist.get_rank())
    before = _full_state(lora)
    with torch.no_grad():
        base = merged(**x).logits
        with SurgicalTheater(lora, layers=[0], **LORA_EDITS[kind]):
            got = lora(**x).logits
        with SurgicalTheater(merged, layers=[0], **LORA_EDITS[kind]):
            want = merged(**x).logits
        after = lora(**x).logits
    assert not torch.allclose(want, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, base, rtol=1e-5, atol=1e-6)
    _assert_bit_exact(lora, before)


@distributed(world_size=2, timeout_s=40)
def test_one_lens_reused_over_changing_uneven_data_parallel_splits():
    """One LogitLens, called three times with the batch split 2/2, 3/1 and 1/0 (and another
    sequence length): each result equals the one-process lens of that batch."""
    model = OddLM(9).double().eval()
    rank = dist.get_rank()
    with LogitLens(OddLM(9).double().eval(), top_k=3, data_parallel_size=2) as lens:
        for split, batch, seq in ((2, 4, 5), (3, 4, 5), (1, 1, 7), (0, 2, 3)):
            ids = _ids(9, batch=batch, seq=seq, seed=split)
            want = logit_lens(model, ids, top_k=3, process_group=local_group())
            got = lens(ids[:split] if rank == 0 else ids[split:])
            _assert_lens_equal(got, want)


@distributed(world_size=2, timeout_s=20)
def test_lens_data_parallel_replicas_with_different_sequence_lengths_raise_on_every_rank():
    """Replicas padded differently (5 and 7 positions): no one-process batch has that shape,
    so the lens must raise on every rank -- not return a table built from mismatched rows."""
    model = OddLM(9).double().eval()
    seq = 5 if dist.get_rank() == 0 else 7
    with pytest.raises(LayoutError, match="different sequence lengths"):
        logit_lens(model, _ids(9, batch=2, seq=seq), top_k=3, data_parallel_size=2)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("mode", ["randomly_sampled", "complement_sampled"])
@distributed(world_size=2, timeout_s=40)
def test_sampled_ablation_of_a_float64_circuit_with_tiny_positive_logits(mode):
    """A float64 circuit whose kept logits are tiny but positive (1e-300; the hard mask keeps
    them: logits > 0). The sampled ablations remove as many weights as the circuit keeps:
    under DTensor TP=2 that count must be the one-process count. (The full mask was gathered
    in float32, where 1e-300 is 0: nothing was removed, L0 560 against 370.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    def set_logits(circuit):
        for layer in circuit._layers.values():
            for mp in layer.params.values():
                full = torch.full(mp.full_shape, -1.0, dtype=torch.float64)
                full.view(-1)[::3] = 1e-300  # a third kept, by a hair
                with torch.no_grad():
                    mp.logits.copy_(mp.region.take(full))

    config = CircuitConfig(mask_hparams=dict(mask_unit="weight", mask_bias=True),
                           target_layers=CIRCUIT_TARGETS[:4], seed=3)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # the one-process run: a one-rank group, nothing counted across ranks
    ref = CircuitModel(config, OddNet(FF, 4).double(), process_group=local_group())
    set_logits(ref)
    ref.eval()
    none_stats = ref.compute_l0_statistics()
    ref.set_ablate_mode(mode)
    with torch.no_grad():
        want_stats, want, want_out = ref.compute_l0_statistics(), ref.hard_masks(), ref(x)
    kept = {n: int(v) for n, v in none_stats["layer2l0"].items()}
    assert all(want_stats["layer2l0"][n] == none_stats["layer2maxl0"][n] - kept[n]
               for n in kept)  # one process: the sampled mask removes as many as are kept
    mesh = init_device_mesh("cpu", (2,))
    plan = {}
    for i in range(2):
        plan[f"blocks.{i}.up"] = ColwiseParallel()
        plan[f"blocks.{i}.down"] = RowwiseParallel()
    par = CircuitModel(config, parallelize_module(OddNet(FF, 4).double(), mesh, plan))
    set_logits(par)
    with torch.no_grad():
        par.eval()
        assert par.compute_l0_statistics() == none_stats  # mode "none": the hard mask agrees
        par.set_ablate_mode(mode)
        got_stats, got = par.compute_l0_statistics(), par.hard_masks()
        assert got_stats == want_stats, (got_stats["layer2l0"], want_stats["layer2l0"])
        assert all(torch.equal(got[k], want[k]) for k in want)
        torch.testing.assert_close(_full(par(x)), want_out, **TIGHT)
