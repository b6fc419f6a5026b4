"""HF transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")``) on model
families other than Llama, at TP=2, against the same model in one process.

Families and the tp-plan styles they bring: Qwen3 (per-head q/k norms between the colwise
projections and attention), Mixtral / Qwen2-MoE (3-D expert weights: ``packed_colwise`` =
``_StridedShard``, ``rowwise`` on a 3-D tensor, ``moe_tp_experts``), Phi3 (fused ``qkv_proj`` and
``gate_up_proj`` under ``colwise_gather_output`` / ``rowwise_split_input``), Gemma2 (embedding
scaling, attention and final-logit soft-capping, sliding window, tied embeddings) and GPT-NeoX
(fused, head-interleaved ``query_key_value`` under plain ``colwise``).

Every check is: the stored value equals the one-process value (shape and numbers), or every rank
raises; editing hooks give the one-process logits; whole parameters (``get_module_parameter``,
``export.full_weights``) and full-parameter surgery equal the one-process ones.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import local_group
from rank_pool import distributed

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.frameworks import UnknownLayoutError
from flex_surgery.parallel.layout import LayoutError

TOL = dict(rtol=1e-6, atol=1e-8)
VOCAB = 128
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             use_cache=False)


def _config(arch: str):
    import transformers as tf

    if arch == "qwen3":  # 2 kv heads: one kv head per tp rank
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**_BASE, head_dim=16,
                                                   tie_word_embeddings=False)
    if arch == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(**_BASE, head_dim=16, num_local_experts=4,
                                                       num_experts_per_tok=2,
                                                       tie_word_embeddings=False)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
            **_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, tie_word_embeddings=False)
    if arch == "phi3":
        return tf.Phi3ForCausalLM, tf.Phi3Config(**_BASE, tie_word_embeddings=False,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma2":  # tied embeddings (Gemma's default), soft-capping, sliding window 4
        return tf.Gemma2ForCausalLM, tf.Gemma2Config(
            **_BASE, head_dim=16, sliding_window=4, final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0, query_pre_attn_scalar=16)
    if arch == "gpt_neox":
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, use_cache=False,
            rotary_pct=0.5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def _one_process(arch: str):
    cls, config = _config(arch)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    return model.to(torch.float64).eval()


def _tensor_parallel(arch: str, tmp_path):
    """The same weights as :func:`_one_process`, loaded with ``tp_plan="auto"`` over the world."""
    from torch.distributed.tensor import DTensor

    cls, _ = _config(arch)
    folder = tmp_path / f"tiny-{arch}"
    if dist.get_rank() == 0:
        _one_process(arch).save_pretrained(folder)
    dist.barrier()
    model = cls.from_pretrained(folder, tp_plan="auto", dtype=torch.float64,
                                attn_implementation="eager",
                                experts_implementation="eager").eval()
    assert any(isinstance(p, DTensor) for p in model.parameters())
    return model


def _ids():
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def double(module, t, ctx, modules):
    return t * 2


def by_position(module, t, ctx, modules):
    return t * 2 + torch.linspace(0, 1, t.numel(), dtype=t.dtype).view(t.shape)


def by_last_index(module, t, ctx, modules):
    """Depends on each element's index along the last dim: a tensor gathered along the wrong
    dim (same elements, other shape) gets other values added."""
    return t * 2 + torch.linspace(0, 1, t.shape[-1], dtype=t.dtype)


def _hook(model, name, kind="forward", edit=None, pg=None, grad=False, **kw):
    """One FlexModel forward with one hook: (stored values, logits)."""
    stored = {}
    with FlexModel(model, stored, process_group=pg) as flex:
        register = flex.register_forward_hook if kind == "forward" else \
            flex.register_forward_pre_hook
        register(HookFunction(name, editing_function=edit, **kw))
        with torch.set_grad_enabled(grad):
            out = flex(input_ids=_ids())
    return stored.get(name), out.logits.detach()


def _surgery_equals_one_process(ref, model, names, row_dim: int) -> None:
    """Zeroing row 5 (along ``row_dim``) of each whole parameter with a full-parameter
    SurgicalTheater gives the one-process logits, changes them (a weight's row; one bias
    element may not show), and is undone bit-exactly."""
    from flex_surgery.surgery import SurgicalTheater

    def zero_row_5(t):
        delta = torch.zeros_like(t)
        row = delta.narrow(row_dim, 5, 1)
        row.copy_(-t.narrow(row_dim, 5, 1))
        return delta

    with torch.no_grad():
        before = model(input_ids=_ids()).logits
        for name in names:
            with SurgicalTheater(ref, layers=name, modification_fn=zero_row_5,
                                 full_parameter=True):
                expected = ref(input_ids=_ids()).logits
            with SurgicalTheater(model, layers=name, modification_fn=zero_row_5,
                                 full_parameter=True):
                got = model(input_ids=_ids()).logits
            assert name.endswith("bias") or not torch.allclose(expected, before), name
            torch.testing.assert_close(got, expected, **TOL)
            assert torch.equal(model(input_ids=_ids()).logits, before), name


def _whole_or_error_everywhere(ref, model, name, kind="forward", edit=None, grad=False, **kw):
    """The hook on the TP model stores the one-process values and gives the one-process logits,
    or raises a layout error on every rank. Returns whether it raised."""
    want, want_logits = _hook(ref, name, kind, edit, pg=local_group(), grad=grad, **kw)
    try:
        got, logits = _hook(model, name, kind, edit, grad=grad, **kw)
        err = None
    except (UnknownLayoutError, LayoutError) as exc:
        err = str(exc)
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    assert all(e is None for e in errs) or all(e is not None for e in errs), errs
    if err is not None:
        assert name in err, err
        return True
    torch.testing.assert_close(logits, want_logits, **TOL)
    if dist.get_rank() == 0:
        assert len(got) == len(want), (name, len(got), len(want))
        for a, b in zip(got, want):
            assert a.shape == b.shape, (name, kind, tuple(a.shape), tuple(b.shape))
            torch.testing.assert_close(a, b, **TOL)
    return False


# -- Qwen3: per-head k norm, one kv head per rank ---------------------------------------------

@distributed(world_size=2, timeout_s=120)
def test_qwen3_k_norm_one_kv_head_per_rank_is_an_error_everywhere(tmp_path):
    """k_norm sees k_proj's local output viewed as ``[b, s, kv_heads / tp = 1, head_dim]``,
    whose last dim happens to equal k_proj's local width: read as "last dim split", rank 0
    stored the two ranks' heads joined along head_dim (``[2, 6, 1, 32]`` for ``[2, 6, 2, 16]``).
    A tensor with more dims than the layer's output is no proof of that split: an error on
    every rank."""
    ref, model = _one_process("qwen3"), _tensor_parallel("qwen3", tmp_path)
    for kind in ("forward", "forward_pre"):
        assert _whole_or_error_everywhere(ref, model, "model.layers.0.self_attn.k_norm", kind)


@distributed(world_size=2, timeout_s=120)
def test_qwen3_k_norm_edit_gives_one_process_logits(tmp_path):
    """The same misread layout made an edit that depends on the last-dim index change the
    logits (by ~0.025 / ~0.075) without an error."""
    ref, model = _one_process("qwen3"), _tensor_parallel("qwen3", tmp_path)
    name = "model.layers.0.self_attn.k_norm"
    for kind in ("forward", "forward_pre"):
        _, want = _hook(ref, name, kind, by_last_index, pg=local_group())
        try:
            _, got = _hook(model, name, kind, by_last_index)
        except (UnknownLayoutError, LayoutError):
            continue  # an error (on every rank, checked by the read test) is acceptable
        torch.testing.assert_close(got, want, **TOL)


@distributed(world_size=2, timeout_s=120)
def test_qwen3_q_norm_two_heads_per_rank_is_an_error_everywhere(tmp_path):
    """Pins the working case next to the k_norm bug: 2 query heads per rank, [b, s, 2, 16],
    whose last dim is not q_proj's local width (32): an error on every rank."""
    ref, model = _one_process("qwen3"), _tensor_parallel("qwen3", tmp_path)
    for kind in ("forward", "forward_pre"):
        for edit in (None, double):
            assert _whole_or_error_everywhere(ref, model, "model.layers.0.self_attn.q_norm",
                                              kind, edit)
    # and declaring the whole shape works
    want, _ = _hook(ref, "model.layers.0.self_attn.q_norm", pg=local_group())
    got, _ = _hook(model, "model.layers.0.self_attn.q_norm",
                   expected_shape=(None, None, 4, 16))
    if dist.get_rank() == 0:
        torch.testing.assert_close(got[0], want[0], **TOL)


# -- MoE experts: modules inside the expert module see tp shards ------------------------------

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@distributed(world_size=2, timeout_s=120)
def test_moe_expert_activation_is_an_error_everywhere(tmp_path, arch):
    """``experts.act_fn`` runs inside the experts module on this rank's half of each expert's
    gate (``gate_up_proj`` is ``_StridedShard``); it inherited the last TP layer's layout
    (o_proj: replicated), and rank 0 stored its own half as the whole. A module running inside
    one whose split is unknown has an unknown split too: an error on every rank."""
    ref, model = _one_process(arch), _tensor_parallel(arch, tmp_path)
    for kind in ("forward", "forward_pre"):
        assert _whole_or_error_everywhere(ref, model, "model.layers.0.mlp.experts.act_fn",
                                          kind)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@distributed(world_size=2, timeout_s=120)
def test_moe_expert_activation_edit_gives_one_process_logits(tmp_path, arch):
    """An edit of it (even x2) handed rank 0's edited half to rank 1 too (logits off by
    ~0.1 / ~0.04, no error)."""
    ref, model = _one_process(arch), _tensor_parallel(arch, tmp_path)
    name = "model.layers.0.mlp.experts.act_fn"
    _, want = _hook(ref, name, "forward", double, pg=local_group())
    try:
        _, got = _hook(model, name, "forward", double)
    except (UnknownLayoutError, LayoutError):
        return
    torch.testing.assert_close(got, want, **TOL)


@distributed(world_size=2, timeout_s=180)
def test_mixtral_experts_weights_and_surgery_equal_one_process(tmp_path):
    """Pins what works for 3-D expert weights: the strided gate_up_proj (``packed_colwise``)
    and the rowwise down_proj gathered whole in one-process order, full-parameter surgery on
    them, and the hooks around the experts (an error on every rank where the layout is not
    known, the router's logits whole)."""
    from flex_surgery.export import full_weights

    ref, model = _one_process("mixtral"), _tensor_parallel("mixtral", tmp_path)
    names = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    whole = full_weights(model)
    want = dict(ref.named_parameters())
    assert whole.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(whole[name], want[name].detach(), rtol=0, atol=0)
    with FlexModel(model, {}) as flex:
        for name in names:
            assert torch.equal(flex.get_module_parameter(name), want[name].detach())

    _surgery_equals_one_process(ref, model, names, row_dim=-2)
    assert not _whole_or_error_everywhere(ref, model, "model.layers.0.mlp.gate", "forward",
                                          by_position)



@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@distributed(world_size=2, timeout_s=180)
def test_moe_experts_boundaries_equal_one_process(tmp_path, arch):
    """``moe_tp_experts`` sums each rank's part of every expert over tp on the way out: the
    experts module's output is whole, and so is everything after it (the MoE block, the
    decoder layer). Its input (the hidden states) is whole too. Retrieval and a
    position-dependent edit of each equal one process; what runs inside stays an error."""
    ref, model = _one_process(arch), _tensor_parallel(arch, tmp_path)
    for name, kind in [("model.layers.0.mlp.experts", "forward"),
                       ("model.layers.0.mlp.experts", "forward_pre"),
                       ("model.layers.0.mlp", "forward"),
                       ("model.layers.0", "forward"),
                       ("model.layers.1.input_layernorm", "forward")]:
        for edit in (None, by_position):
            assert not _whole_or_error_everywhere(ref, model, name, kind, edit), (name, kind)
    assert _whole_or_error_everywhere(ref, model, "model.layers.0.mlp.experts.act_fn")


# -- Dense families whose tp plans use other styles: pinned equal -----------------------------

_DENSE_SITES = {
    "phi3": [("model.layers.0.self_attn.qkv_proj", "forward"),
             ("model.layers.0.self_attn.o_proj", "forward_pre"),
             ("model.layers.0.mlp.gate_up_proj", "forward"),
             ("model.layers.0.mlp.activation_fn", "forward"),
             ("model.layers.0.mlp.down_proj", "forward_pre"),
             ("model.layers.0.mlp", "forward"),
             ("lm_head", "forward")],
    "gemma2": [("model.embed_tokens", "forward"),
               ("model.layers.0.self_attn.q_proj", "forward"),
               ("model.layers.0.self_attn.o_proj", "forward_pre"),
               ("model.layers.0.mlp.act_fn", "forward"),
               ("model.layers.0.post_attention_layernorm", "forward"),
               ("model.norm", "forward"),
               ("lm_head", "forward")],
    "gpt_neox": [("gpt_neox.layers.0.attention.query_key_value", "forward"),
                 ("gpt_neox.layers.0.attention.dense", "forward_pre"),
                 ("gpt_neox.layers.0.mlp.act", "forward"),
                 ("gpt_neox.layers.0", "forward"),
                 ("gpt_neox.final_layer_norm", "forward"),
                 ("lm_head", "forward")],
}
_FUSED = {"phi3": ["model.layers.0.self_attn.qkv_proj.weight",
                   "model.layers.0.mlp.gate_up_proj.weight"],
          "gemma2": ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"],
          "gpt_neox": ["gpt_neox.layers.0.attention.query_key_value.weight",
                       "gpt_neox.layers.0.attention.query_key_value.bias"]}


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gpt_neox"])
@distributed(world_size=2, timeout_s=240)
def test_dense_families_equal_one_process(tmp_path, arch):
    """Hooks (reads and position-dependent edits, with and without autograd), whole fused
    parameters in one-process order, and full-parameter surgery on the fused weights."""
    from flex_surgery.export import full_weights

    ref, model = _one_process(arch), _tensor_parallel(arch, tmp_path)
    for name, kind in _DENSE_SITES[arch]:
        for edit, grad in ((None, False), (by_position, False), (by_last_index, True)):
            assert not _whole_or_error_everywhere(ref, model, name, kind, edit, grad=grad), name
    want = dict(ref.named_parameters())
    whole = full_weights(model)
    for name in want:
        assert torch.equal(whole[name], want[name].detach()), name
    with FlexModel(model, {}) as flex:
        for name in _FUSED[arch]:
            assert torch.equal(flex.get_module_parameter(name), want[name].detach()), name

    _surgery_equals_one_process(ref, model, _FUSED[arch], row_dim=0)
