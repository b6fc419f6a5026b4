"""Data and tensor parallelism beyond the equivalence matrix, each compared with one process
running the same weights on the same inputs: a block called twice per forward (weight sharing)
under DP x TP with every hook kind; an edit that couples the batch rows; a replica with zero
rows; edits of gradients that are not homogeneous (``g + c``, clamps: the 1/dp scaling shows);
surgery on uneven FSDP2 shards while a hook edits. Pinned: a table with no batch dim under DP
(nanoGPT's positions), which nothing in its shape tells from a batch."""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, local_group, seeded_linear
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.frameworks.base import LayoutError

TOL = dict(rtol=1e-9, atol=1e-12)


def _zero_first_features(module, t, ctx, mods):
    out = t.clone()
    out[..., :4] = 0
    return out


# -- one block called twice per forward (weight sharing) under DP x TP ---------------------
SHARED_SITES = [
    ("blocks.0", "forward"),
    ("blocks.0.act", "forward"),
    ("blocks.0.down", "forward_pre"),
    ("blocks.0.down", "full_backward"),
    ("blocks.0.up", "full_backward_pre"),
]
SHARED_PARAMS = ["blocks.0.up.weight", "blocks.0.down.bias"]


def _shared(net):
    from parallel_cases import Net
    return Net([net.blocks[0], net.blocks[0]], net.head)


@distributed(world_size=4)
def test_weight_shared_block_under_dp_x_tp_equals_one_process():
    from fairscale.nn.model_parallel import initialize as fs
    from parallel_cases import (
        EDIT_MODES,
        assert_grads_equal,
        assert_stored_equal,
        fairscale_net,
        plain_grads,
        plain_net,
        run_flex,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.parallel.collectives import all_gather
    from flex_surgery.parallel.layout import fairscale_param_dim

    torch.set_default_dtype(torch.float64)
    fs.initialize_model_parallel(2)
    dp = fs.get_data_parallel_rank()
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1))
    for edit in EDIT_MODES:
        ref = _shared(plain_net())
        ref_stored, ref_out, _ = run_flex(ref, x, edit, sites=SHARED_SITES,
                                          param_sites=SHARED_PARAMS, process_group=local_group())
        ref_grads = plain_grads(ref)
        net = _shared(fairscale_net(plain_net()))
        model = DDP(net, process_group=fs.get_data_parallel_group())
        stored, out, _ = run_flex(model, x[2 * dp:2 * dp + 2], edit, sites=SHARED_SITES,
                                  param_sites=SHARED_PARAMS, tensor_parallel_size=2,
                                  data_parallel_size=2)
        torch.testing.assert_close(out, ref_out[2 * dp:2 * dp + 2].detach(), **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        grads = {}
        for mod_name, mod in net.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                d = fairscale_param_dim(mod, p)
                g = p.grad.detach()
                grads[f"{mod_name}.{p_name}"] = g if d is None else \
                    all_gather(g, d, fs.get_model_parallel_group())
        assert_grads_equal(grads, ref_grads, **TOL)


# -- an edit that couples the batch rows, gradients under DDP (leader and replicated) -------
def _center(module, t, ctx, mods):
    return (t - t.mean(dim=0, keepdim=True)) * torch.arange(1, t.shape[0] + 1).view(-1, 1, 1)


def _run_center(model, x, replicate, name_prefix="", **kw):
    stored = {}
    flex = FlexModel(model, stored, **kw)
    flex.register_forward_hook(HookFunction(name_prefix + "blocks.0.act",
                                            editing_function=_center, replicate_edit=replicate))
    flex.register_full_backward_hook(HookFunction(name_prefix + "blocks.1.down"))
    out = flex(x)
    out.pow(2).mean().backward()
    flex.close()
    return stored, out.detach()


@distributed(world_size=2)
def test_batch_coupling_edit_gradients_under_ddp():
    from parallel_cases import plain_grads, plain_net
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1))
    r = dist.get_rank()
    for replicate in (False, True):
        ref = plain_net()
        ref_stored, ref_out = _run_center(ref, x, replicate, process_group=local_group())
        model = DDP(plain_net())
        stored, out = _run_center(model, x[2 * r:2 * r + 2], replicate, "module.")
        torch.testing.assert_close(out, ref_out[2 * r:2 * r + 2], **TOL)
        if r == 0:
            for k in ref_stored:
                for a, b in zip(stored["module." + k], ref_stored[k]):
                    torch.testing.assert_close(a, b, **TOL)
        want = plain_grads(ref)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n.removeprefix("module.")], **TOL)


# -- a data-parallel rank with zero rows ------------------------------------------------------
def _run_rows(model, x, prefix="", **kw):
    stored = {}
    flex = FlexModel(model, stored, **kw)
    flex.register_forward_hook(HookFunction(prefix + "blocks.0.up", editing_function=_center))
    flex.register_forward_hook(HookFunction(prefix + "blocks.1"))
    with torch.no_grad():
        out = flex(x)
    flex.close()
    return stored, out


@distributed(world_size=2)
def test_a_rank_with_zero_rows_under_ddp():
    from parallel_cases import plain_net
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    x = torch.randn(3, 3, H, generator=torch.Generator().manual_seed(1))
    r = dist.get_rank()
    ref_stored, ref_out = _run_rows(plain_net(), x, process_group=local_group())
    mine = x if r == 0 else x[:0]
    stored, out = _run_rows(DDP(plain_net()), mine, "module.")
    torch.testing.assert_close(out, ref_out if r == 0 else ref_out[:0], **TOL)
    if r == 0:
        for k in ref_stored:
            for a, b in zip(stored["module." + k], ref_stored[k]):
                torch.testing.assert_close(a, b, **TOL)


# -- non-homogeneous edits of gradients (g + c, clamp) under DP x TP -------------------------
def _shift(module, g, ctx, mods):
    return g + 0.01


def _clip(module, g, ctx, mods):
    return g.clamp(-0.002, 0.002)


GRAD_SITES = [("blocks.1.up", "register_full_backward_pre_hook", _shift),
              ("blocks.1.down", "register_full_backward_hook", _clip),
              ("blocks.0.up.weight", "register_hook", _shift),
              ("blocks.1.down.bias", "register_hook", _clip)]


def _run_grad_edits(model, x, prefix, replicate, **kw):
    stored = {}
    flex = FlexModel(model, stored, **kw)
    for name, how, fn in GRAD_SITES:
        getattr(flex, how)(HookFunction(prefix + name, editing_function=fn,
                                        replicate_edit=replicate))
    out = flex(x)
    out.pow(2).mean().backward()
    flex.close()
    return {k.removeprefix(prefix): v for k, v in stored.items()}, out.detach()


@distributed(world_size=4)
def test_non_homogeneous_gradient_edits_under_dp_x_tp():
    from fairscale.nn.model_parallel import initialize as fs
    from parallel_cases import fairscale_net, plain_grads, plain_net
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.parallel.collectives import all_gather
    from flex_surgery.parallel.layout import fairscale_param_dim

    torch.set_default_dtype(torch.float64)
    fs.initialize_model_parallel(2)
    dp = fs.get_data_parallel_rank()
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1))
    for replicate in (False, True):
        ref = plain_net()
        ref_stored, _ = _run_grad_edits(ref, x, "", replicate, process_group=local_group())
        want = plain_grads(ref)
        net = fairscale_net(plain_net())
        stored, _ = _run_grad_edits(DDP(net, process_group=fs.get_data_parallel_group()),
                                    x[2 * dp:2 * dp + 2], "module.", replicate,
                                    tensor_parallel_size=2, data_parallel_size=2)
        if dist.get_rank() == 0:
            for k in ref_stored:
                for a, b in zip(stored[k], ref_stored[k]):
                    torch.testing.assert_close(a, b, **TOL)
        for mod_name, mod in net.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                d = fairscale_param_dim(mod, p)
                g = p.grad.detach() if d is None else \
                    all_gather(p.grad.detach(), d, fs.get_model_parallel_group())
                torch.testing.assert_close(g, want[f"{mod_name}.{p_name}"], **TOL,
                                           msg=lambda m, n=f"{mod_name}.{p_name} "
                                           f"replicate={replicate}": f"{n}: {m}")


# -- surgery on uneven FSDP2 shards (world 3) while a hook edits; exact restore ------------
def _centered_rows(p):
    return -p.mean(dim=-1, keepdim=True).expand_as(p).clone()


SURGERIES = [dict(modification_type="scale", factor=0.5),
             dict(modification_type="noise", noise_scale=0.05, seed=7, params="all"),
             dict(modification_fn=_centered_rows, full_parameter=True),
             dict(modification_type="disable", params="all")]


def _theater_out(model, x, kind, prefix="", **kw):
    from flex_surgery.surgery import SurgicalTheater

    flex = FlexModel(model, {}, **kw)
    flex.register_forward_hook(HookFunction(prefix + "blocks.0.act",
                                            editing_function=_zero_first_features))
    with SurgicalTheater(model, layers=["blocks.0.up", "blocks.1"], **SURGERIES[kind]), \
            torch.no_grad():
        out = flex(x)
    flex.close()
    return out


@pytest.mark.parametrize("kind", range(len(SURGERIES)))
@distributed(world_size=3)
def test_surgery_on_uneven_fsdp2_shards_world3(kind):
    from parallel_cases import plain_net
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_default_dtype(torch.float64)
    x = torch.randn(3, 3, H, generator=torch.Generator().manual_seed(1))
    r = dist.get_rank()
    ref_out = _theater_out(plain_net(ff=14), x, kind, process_group=local_group())
    mesh = init_device_mesh("cpu", (3,))
    model = plain_net(ff=14)                     # 14 rows over 3 ranks: 5, 5, 4
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    ptrs = {n: p.to_local().data_ptr() for n, p in model.named_parameters()}
    out = _theater_out(model, x[r:r + 1], kind)
    torch.testing.assert_close(out, ref_out[r:r + 1], rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():
        assert torch.equal(p.to_local(), before[n]), n
        assert p.to_local().data_ptr() == ptrs[n], n

# -- nanoGPT's learned positions wpe(arange(t)) -> [t, H] under DDP -------------------------
class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wte, self.wpe = nn.Embedding(11, H), nn.Embedding(16, H)
        with torch.no_grad():
            self.wte.weight.copy_(torch.randn(11, H, generator=g))
            self.wpe.weight.copy_(torch.randn(16, H, generator=g))
        self.head = seeded_linear(H, 11, g)

    def forward(self, idx):                         # idx: [b, t]
        pos = torch.arange(idx.shape[1])            # [t], as nanoGPT does
        return self.head(self.wte(idx) + self.wpe(pos))


def _zero_position_0(module, t, ctx, mods):
    out = t.clone()
    out[0] = 0
    return out


def _run_gpt(model, ids, name, editing_function=None, expected_shape=None, **kw):
    stored = {}
    with FlexModel(model, stored, **kw) as flex:
        flex.register_forward_hook(HookFunction(name, editing_function=editing_function,
                                                expected_shape=expected_shape))
        with torch.no_grad():
            out = flex(ids)
    return stored.get(name), out


@pytest.mark.parametrize("edit", [True, False], ids=["edit", "retrieval"])
@distributed(world_size=2)
def test_position_table_without_batch_dim_under_ddp_is_refused_then_declared(edit):
    """nanoGPT's position table wpe(arange(t)) is [t, H], the same on every replica, and
    nothing in its shape says it has no batch dim. Its size along batch_dim (t) is not the
    input's rows, and its contents are the same on every replica (a digest in the header):
    refused on every rank, where the replicas' tables were joined ([2t, H]) and an edit of
    position 0 reached rank 0's copy only. Declared with expected_shape=(t, H) it equals one
    process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    r = dist.get_rank()
    kw = dict(editing_function=_zero_position_0) if edit else {}
    ref_stored, ref_out = _run_gpt(TinyGPT(), ids, "wpe", process_group=local_group(), **kw)
    with pytest.raises(LayoutError) as refused:  # rank 0 says why, the others point to it
        _run_gpt(DDP(TinyGPT()), ids[2 * r:2 * r + 2], "module.wpe", **kw)
    if r == 0:
        assert "same tensor" in str(refused.value) and "expected_shape" in str(refused.value)
    stored, out = _run_gpt(DDP(TinyGPT()), ids[2 * r:2 * r + 2], "module.wpe",
                           expected_shape=(5, H), **kw)
    if r == 0:
        assert len(stored) == 1
        torch.testing.assert_close(stored[0], ref_stored[0], **TOL)
    torch.testing.assert_close(out, ref_out[2 * r:2 * r + 2], **TOL)


class FlatTokens(nn.Module):
    """Tokens flattened to [b * t, H] before a linear (as MoE routing does): a piece of the
    batch whose size along batch_dim is not the input's rows, and differs across replicas."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wte = nn.Embedding(11, H)
        with torch.no_grad():
            self.wte.weight.copy_(torch.randn(11, H, generator=g))
        self.proj = seeded_linear(H, H, g)

    def forward(self, idx):
        b, t = idx.shape
        return self.proj(self.wte(idx).reshape(b * t, H)).reshape(b, t, H)


@distributed(world_size=2)
def test_flattened_tokens_under_dp_are_pieces_of_the_batch():
    """The digest refuses tables, not every tensor whose batch size is not the input's rows:
    flattened tokens differ across replicas and are joined, equal to one process."""
    torch.set_default_dtype(torch.float64)
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    r = dist.get_rank()
    ref_stored, ref_out = _run_gpt(FlatTokens(), ids, "proj", process_group=local_group(),
                                   editing_function=_zero_position_0)
    stored, out = _run_gpt(FlatTokens(), ids[2 * r:2 * r + 2], "proj", data_parallel_size=2,
                           editing_function=_zero_position_0)
    if r == 0:
        torch.testing.assert_close(stored[0], ref_stored[0], **TOL)
    # the edit zeroes the first token of the whole batch: rank 0's first row only
    torch.testing.assert_close(out, ref_out[2 * r:2 * r + 2], **TOL)

