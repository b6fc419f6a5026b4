"""HF transformers tensor parallelism (``tp_plan="auto"``) on mixture-of-experts
models (Mixtral, Qwen2-MoE), whose experts module runs under ``moe_tp_experts`` (described at
its boundary, opaque inside: ``flex_surgery/parallel/frameworks/dtensor.py:_hf_style``).

Every check is against the same model in one process (float64): stored values (shape and
numbers), logits, and the gradients of every parameter after a weighted loss; or an error on
every rank. Mixtral's router computes its softmax and routing weights in float32 (HF's
``MixtralTopKRouter``), so its parameter gradients agree with one process to float32 precision
only (~1e-7 relative, with or without FlexModel): they get a looser tolerance.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import local_group
from rank_pool import distributed
from test_hf_tp_models import _config, _ids, _one_process, _tensor_parallel, by_position

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.frameworks import UnknownLayoutError
from flex_surgery.parallel.layout import LayoutError

TOL = dict(rtol=1e-6, atol=1e-8)
GRAD_TOL = {"qwen2_moe": TOL, "mixtral": dict(rtol=1e-4, atol=1e-7)}
L0 = "model.layers.0."


def _plain(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def double(module, t, ctx, modules):
    return t * 2


def replicated_by_position(module, t, ctx, modules):
    return t * 2 + torch.linspace(0, 1, t.numel(), dtype=t.dtype).view(t.shape)


replicated_by_position.replicate_edit = True

_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook", "tensor": "register_hook"}


def _run(model, name, kind, edit=None, pg=None, ids=None, rows=None, **flex_kw):
    """One FlexModel forward with grad and one hook, then a weighted loss's backward:
    (stored values, logits, whole gradient of every parameter). ``ids``: the whole batch;
    ``rows``: the slice of it this rank runs (data parallelism), whose loss is the mean over
    its rows of the weights the whole batch's rows get (one process: the mean over all)."""
    stored = {}
    ids = _ids() if ids is None else ids
    rows = slice(0, ids.shape[0]) if rows is None else rows
    model.zero_grad(set_to_none=True)
    with FlexModel(model, stored, process_group=pg, **flex_kw) as flex:
        getattr(flex, _REGISTER[kind])(HookFunction(name, editing_function=edit))
        logits = _plain(flex(input_ids=ids[rows]).logits)
        whole = torch.Size((ids.shape[0], *logits.shape[1:]))
        w = torch.linspace(-1, 1, whole.numel(), dtype=logits.dtype).view(whole)[rows]
        (logits * w).mean().backward()
    grads = {n: None if p.grad is None else _plain(p.grad).detach().clone()
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return stored.get(name), logits.detach(), grads


def _errors_everywhere(err):
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    assert all(e is None for e in errs) or all(e is not None for e in errs), errs
    return errs[0] is not None


def _equal_or_refused(ref, model, name, kind, edit=None, grad_tol=TOL, **flex_kw):
    """The hook on the TP model stores the one-process values, gives the one-process logits and
    parameter gradients; or raises a layout error on every rank. Returns whether it raised."""
    want = _run(ref, name, kind, edit, pg=local_group(), **flex_kw)
    try:
        got, err = _run(model, name, kind, edit, **flex_kw), None
    except (UnknownLayoutError, LayoutError) as exc:
        got, err = None, str(exc)
    if _errors_everywhere(err):
        return True
    torch.testing.assert_close(got[1], want[1], **TOL)
    if dist.get_rank() == 0 or flex_kw.get("store_on") == "all":
        assert got[0] is not None and len(got[0]) == len(want[0]), (name, kind)
        for a, b in zip(got[0], want[0]):
            assert a.shape == b.shape, (name, kind, tuple(a.shape), tuple(b.shape))
            torch.testing.assert_close(a, b, **(TOL if kind.startswith("forward") else grad_tol))
    for pname, g in want[2].items():
        assert (g is None) == (got[2][pname] is None), pname
        if g is not None:
            torch.testing.assert_close(got[2][pname], g, **grad_tol, msg=lambda m, p=pname:
                                       f"{name} {kind} {edit}: grad of {p}: {m}")
    return False


# -- 1. backward hooks on the experts, the MoE block, the router, the layer; parameter hooks --

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@distributed(world_size=2, timeout_s=300)
def test_moe_backward_hooks_and_parameter_grads_equal_one_process(tmp_path, arch):
    """grad_input / grad_output of the experts module (its input goes through HF's
    _AllReduceBackward, its output through _AllReduceForward: both whole), of the sparse MoE
    block, the router and the decoder layer, read and edited, give the one-process values,
    logits and gradients of every parameter. Inside the experts (act_fn) backward hooks are
    refused on every rank, as forward hooks are."""
    ref, model = _one_process(arch), _tensor_parallel(arch, tmp_path)
    tol = GRAD_TOL[arch]
    for name in (L0 + "mlp.experts", L0 + "mlp", L0 + "mlp.gate", "model.layers.0"):
        for kind in ("full_backward", "full_backward_pre"):
            for edit in (None, by_position):
                assert not _equal_or_refused(ref, model, name, kind, edit, tol), (name, kind)
    for kind in ("full_backward", "full_backward_pre"):
        assert _equal_or_refused(ref, model, L0 + "mlp.experts.act_fn", kind, by_position, tol)

    # Parameter-gradient hooks: the rowwise 3-D down_proj and the (replicated) router weight
    # are whole; the strided gate_up_proj is refused on every rank (not a half as the whole).
    for pname in (L0 + "mlp.experts.down_proj", L0 + "mlp.gate.weight"):
        for edit in (None, double):
            assert not _equal_or_refused(ref, model, pname, "tensor", edit, tol), pname
    for edit in (None, double):
        assert _equal_or_refused(ref, model, L0 + "mlp.experts.gate_up_proj", "tensor", edit,
                                 tol)


# -- 2. edit modes and store options on the experts; Qwen2-MoE's shared expert ---------------

@distributed(world_size=2, timeout_s=300)
def test_qwen2_moe_edit_modes_and_shared_expert_equal_one_process(tmp_path):
    """replicate_edit, overlap_retrieval and store_on="all" on the experts module (every hook
    kind), and the shared expert (replicated: not in HF's plan) and its gate, which run before
    and after the experts inside the MoE block: one-process values, logits and gradients."""
    ref, model = _one_process("qwen2_moe"), _tensor_parallel("qwen2_moe", tmp_path)
    experts = L0 + "mlp.experts"
    for kind in ("forward", "forward_pre", "full_backward", "full_backward_pre"):
        assert not _equal_or_refused(ref, model, experts, kind, replicated_by_position)
        assert not _equal_or_refused(ref, model, experts, kind, by_position,
                                     overlap_retrieval=True)
        assert not _equal_or_refused(ref, model, experts, kind, None, store_on="all")
        assert not _equal_or_refused(ref, model, L0 + "mlp", kind, by_position,
                                     store_on="all", overlap_retrieval=True)
    for name in ("mlp.shared_expert", "mlp.shared_expert_gate", "mlp.shared_expert.act_fn",
                 "mlp.shared_expert.down_proj"):
        for kind in ("forward", "forward_pre", "full_backward", "full_backward_pre"):
            assert not _equal_or_refused(ref, model, L0 + name, kind, by_position), (name, kind)
    for pname in ("mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight"):
        assert not _equal_or_refused(ref, model, L0 + pname, "tensor", double), pname


# -- 3. logit lens, seeded surgery on expert / router weights, activation checkpointing -------

@distributed(world_size=2, timeout_s=300)
def test_qwen2_moe_lens_theater_and_checkpointing_equal_one_process(tmp_path):
    from flex_surgery import logit_lens
    from flex_surgery.surgery import SurgicalTheater

    ref, model = _one_process("qwen2_moe"), _tensor_parallel("qwen2_moe", tmp_path)
    want = logit_lens(ref, {"input_ids": _ids()}, top_k=4, process_group=local_group())
    got = logit_lens(model, {"input_ids": _ids()}, top_k=4)
    assert got.layers == want.layers
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)

    def logits(m):
        return _plain(m(input_ids=_ids()).logits).detach().clone()

    with torch.no_grad():
        base = logits(ref)
        for layers in ([L0 + "mlp.experts.gate_up_proj"], [L0 + "mlp.experts.down_proj"],
                       [L0 + "mlp.gate.weight"], [L0 + "mlp"], 0):
            for kw in (dict(modification_type="noise", noise_scale=0.5, seed=3),
                       dict(modification_type="scale", factor=0.3)):
                with SurgicalTheater(ref, layers=layers, params="all", **kw):
                    expected = logits(ref)
                with SurgicalTheater(model, layers=layers, params="all", **kw):
                    changed = logits(model)
                assert not torch.allclose(expected, base), (layers, kw)
                torch.testing.assert_close(changed, expected, **TOL)
                torch.testing.assert_close(logits(model), base, **TOL)

    # HF activation checkpointing recomputes the layers (and the experts' all-reduce) in
    # backward: hooks store and edit once, as in one process.
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    try:
        assert not _equal_or_refused(ref, model, L0 + "mlp.experts", "forward", by_position)
        assert not _equal_or_refused(ref, model, L0 + "mlp.experts", "full_backward",
                                     by_position)
        assert not _equal_or_refused(ref, model, L0 + "mlp", "full_backward_pre", by_position)
    finally:
        for m in (ref, model):
            m.gradient_checkpointing_disable()
            m.eval()


# -- 4. an experts forward replaced after loading ----------------------------------------------

def _wrap_forward(experts):
    """A user's wrapper around HF's TP forward (a closure over ``orig``); returns the
    original."""
    orig = experts.forward

    def forward(*args, **kwargs):
        return orig(*args, **kwargs) * 1.5

    experts.forward = forward
    return orig


class _Tap:
    """A wrapper made in a method: a closure over a variable called ``self``, not HF's
    style."""

    def wrap(self, experts):
        orig = experts.forward

        def forward(*args, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return orig(*args, **kwargs)

        experts.forward = forward
        return orig


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@distributed(world_size=2, timeout_s=300)
def test_moe_wrapped_experts_forward_is_refused_everywhere(tmp_path, arch):
    """With its forward replaced (so the style is no longer the closure HF installed) nothing
    vouches for the boundary: hooks on the experts and the block after them raise on every
    rank; a later layer still equals one process; putting HF's forward back makes the
    experts whole again."""
    ref, model = _one_process(arch), _tensor_parallel(arch, tmp_path)
    tol = GRAD_TOL[arch]
    for wrap in (_wrap_forward, _Tap().wrap):
        origs = [wrap(m.model.layers[0].mlp.experts) for m in (ref, model)]
        try:
            for name, kind in ((L0 + "mlp.experts", "forward"),
                               (L0 + "mlp.experts", "forward_pre"),
                               (L0 + "mlp.experts", "full_backward"),
                               (L0 + "mlp", "forward")):
                assert _equal_or_refused(ref, model, name, kind, by_position, tol), (name, kind)
            assert not _equal_or_refused(ref, model, "model.layers.1", "forward", by_position,
                                         tol)
        finally:
            for m, orig in zip((ref, model), origs):
                m.model.layers[0].mlp.experts.forward = orig
    assert not _equal_or_refused(ref, model, L0 + "mlp.experts", "forward", by_position, tol)


# -- 5. data parallel x tensor parallel (world 4) ----------------------------------------------

@distributed(world_size=4, timeout_s=400)
def test_qwen2_moe_fsdp2_x_tp_equals_one_process_and_hsdp_is_refused(tmp_path):
    """HF's DistributedConfig(tp_size=2, fsdp_size=2): two FSDP2 replicas of a TP=2 MoE model,
    each with half the batch. The experts' and the block's values and gradients (mean loss:
    gathered activation gradients are 1/dp of the local ones, docs/parallel.md) and every
    parameter's gradient equal one process on the whole batch. With dp_replicate_size=2
    instead, HF's model mesh (``_device_mesh``) leaves out the replicate dim: refused on every
    rank (MeshSizeError), not run as if TP=2 were the world."""
    import transformers as tf

    from flex_surgery.parallel.mesh import MeshSizeError

    cls, _ = _config("qwen2_moe")
    folder = tmp_path / "tiny-qwen2_moe"
    if dist.get_rank() == 0:
        _one_process("qwen2_moe").save_pretrained(folder)
    dist.barrier()

    def load(**cfg):
        return cls.from_pretrained(folder, distributed_config=tf.DistributedConfig(**cfg),
                                   dtype=torch.float64, attn_implementation="eager",
                                   experts_implementation="eager").eval()

    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(1))
    d = dist.get_rank() // 2  # mesh (pp, dp_replicate, fsdp, tp): tp fastest
    mine = slice(2 * d, 2 * d + 2)
    ref, model = _one_process("qwen2_moe"), load(tp_size=2, fsdp_size=2)
    for name, kind in ((L0 + "mlp.experts", "forward"), (L0 + "mlp.experts", "full_backward"),
                       (L0 + "mlp.experts", "full_backward_pre"), (L0 + "mlp", "full_backward"),
                       ("model.layers.1", "forward")):
        for edit in (None, by_position):
            want = _run(ref, name, kind, edit, pg=local_group(), ids=ids)
            got = _run(model, name, kind, edit, ids=ids, rows=mine)
            torch.testing.assert_close(got[1], want[1][mine], **TOL)
            if dist.get_rank() == 0:
                assert len(got[0]) == len(want[0])
                for a, b in zip(got[0], want[0]):
                    assert a.shape == b.shape, (name, kind, tuple(a.shape), tuple(b.shape))
                    torch.testing.assert_close(a, b, **TOL)
            for pname, g in want[2].items():
                torch.testing.assert_close(got[2][pname], g, **TOL, msg=lambda m, p=pname,
                                           where=(name, kind, edit): f"{where}: {p}: {m}")

    hsdp = load(tp_size=2, dp_replicate_size=2, fsdp_size=1)
    with pytest.raises(MeshSizeError, match="covers 2 of 4 ranks"):
        _run(hsdp, L0 + "mlp.experts", "forward", ids=ids, rows=mine)
