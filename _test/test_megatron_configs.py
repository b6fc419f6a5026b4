"""Megatron-core ``GPTModel`` configurations beyond the plain one, at TP=2 against the TP=1 twin
built with the same seed (``use_cpu_initialization``: the same full weights at every TP size).

Every hook site must store the TP=1 tensor or raise on every rank -- never a different value.
Configurations: grouped-query attention with ``kv_channels`` != hidden / heads, RoPE, a qkv bias,
untied embeddings, RMSNorm, no linear biases, ``qk_layernorm`` and MoE (``SequentialMLP``,
expert-parallel 1) under sequence parallelism.

Two of these gave silent wrong values, now refused or right (each test fails without the fix):

* MoE experts at TP=2: the expert ``ColumnParallelLinear`` / ``RowParallelLinear`` run with
  ``explicit_expert_comm`` (the token dispatcher gathers the tokens over TP before them and
  reduce-scatters the experts' partial sums after them), but were described as ordinary
  layers: under sequence parallelism the expert ``linear_fc1`` input was gathered again on
  dim 0 (every token twice) and the ``linear_fc2`` output (a partial sum) concatenated on
  dim 0; without sequence parallelism (eval only) each expert saw every token twice and the
  ``linear_fc2`` output, a partial sum, was read as replicated. Now refused on every rank;
  the MoE layer's own input and output (split like the sequence) equal TP=1.
* ``qk_layernorm``: the ``q_layernorm`` / ``k_layernorm`` parameters are replicated but each TP
  rank's gradient covers its own heads only (Megatron's ``finalize_model_grads`` sums them over
  TP, by name); a parameter-gradient hook stored rank 0's summand. Now summed as Megatron does.
"""

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import (
    LAYERS,
    SEQ,
    VOCAB,
    SequenceParallelLayerNorm,
    forward_backward,
    full_tensors,
    gpt_inputs,
    gpt_parallel,
    local_group,
    run_flex,
    stored_mismatches,
)
from rank_pool import distributed

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

TOL = dict(rtol=1e-9, atol=1e-11)  # float64; TP changes only the summation order
L0 = "decoder.layers.0"


def build(tp: int, sequence_parallel: bool = False, spec: dict | None = None,
          model_kwargs: dict | None = None, seed: int = 1234, **config) -> torch.nn.Module:
    """``megatron_gpt_cases.build_gpt`` with layer-spec arguments (``qk_layernorm``,
    ``num_experts``) and Megatron's MoE router usable on CPU without Transformer Engine."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not hasattr(moe_utils, "te_general_gemm"):  # Megatron 0.16.1 names it only with TE
        moe_utils.te_general_gemm = None
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=64, num_attention_heads=4,
                            tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                            use_cpu_initialization=True, hidden_dropout=0.0,
                            attention_dropout=0.0, params_dtype=torch.float64, **config)
    layer = get_gpt_layer_local_spec(**(spec or {}))
    block = layer
    if sequence_parallel:
        layer.submodules.input_layernorm = SequenceParallelLayerNorm
        layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
        block = TransformerBlockSubmodules(layer_specs=[layer] * LAYERS,
                                           layer_norm=SequenceParallelLayerNorm)
    model = GPTModel(cfg, block, vocab_size=VOCAB, max_sequence_length=SEQ,
                     parallel_output=False, **(model_kwargs or {}))
    return model.to(dtype=torch.float64)


GQA_ROPE = dict(config=dict(num_query_groups=2, kv_channels=24, add_qkv_bias=True),
                model_kwargs=dict(position_embedding_type="rope",
                                  share_embeddings_and_output_weights=False))
RMS_NO_BIAS = dict(config=dict(normalization="RMSNorm", add_bias_linear=False,
                               num_query_groups=1))
QK_NORM = dict(spec=dict(qk_layernorm=True), config=dict(qk_layernorm=True))
MOE = dict(spec=dict(num_experts=2),
           config=dict(num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True,
                       add_bias_linear=False))
CONFIGS = {"gqa_rope": GQA_ROPE, "rms_no_bias": RMS_NO_BIAS, "qk_norm": QK_NORM, "moe": MOE}


def make(tp: int, name: str, sequence_parallel: bool = False) -> torch.nn.Module:
    c = CONFIGS[name]
    return build(tp, sequence_parallel and tp > 1, c.get("spec"), c.get("model_kwargs"),
                 **c.get("config", {}))


ATTENTION_SITES = [
    ("embedding", "forward", 0),
    ("rotary_pos_emb", "forward", 0),
    (L0, "forward", 0),
    (f"{L0}.input_layernorm", "forward", 0),
    (f"{L0}.self_attention", "forward", 0),
    (f"{L0}.self_attention.linear_qkv", "forward_pre", 0),
    (f"{L0}.self_attention.linear_qkv", "forward", 0),
    (f"{L0}.self_attention.linear_qkv", "forward", 1),
    (f"{L0}.self_attention.core_attention", "forward_pre", 0),
    (f"{L0}.self_attention.core_attention", "forward", 0),
    (f"{L0}.self_attention.linear_proj", "forward_pre", 0),
    (f"{L0}.self_attention.linear_proj", "forward", 0),
    (f"{L0}.self_attention.linear_proj", "forward", 1),
    (f"{L0}.pre_mlp_layernorm", "forward", 0),
    (f"{L0}.mlp", "forward", 0),
    (f"{L0}.mlp.linear_fc1", "forward", 0),
    (f"{L0}.mlp.linear_fc1", "forward", 1),
    (f"{L0}.mlp.linear_fc2", "forward_pre", 0),
    (f"{L0}.mlp.linear_fc2", "forward", 0),
    ("decoder.final_layernorm", "forward", 0),
    ("output_layer", "forward_pre", 0),
    ("output_layer", "forward", 0),
    ("decoder.layers.1.self_attention.core_attention", "full_backward_pre", 0),
    ("decoder.layers.1.self_attention.linear_qkv.weight", "tensor", 0),
    ("decoder.layers.1.self_attention.linear_qkv.bias", "tensor", 0),
    ("output_layer.weight", "tensor", 0),
    ("decoder.layers.1.input_layernorm.weight", "tensor", 0),
]
EXPERT = f"{L0}.mlp.experts.local_experts.0"
EXPERT_SITES = [
    (f"{EXPERT}.linear_fc1", "forward_pre", 0),  # SP: gathered on dim 0 again -> 2x tokens
    (f"{EXPERT}.linear_fc1", "forward", 0),
    (f"{EXPERT}.linear_fc2", "forward_pre", 0),
    (f"{EXPERT}.linear_fc2", "forward", 0),      # a partial sum over TP
    (EXPERT, "forward", 0),
]
MOE_SITES = [(f"{L0}.mlp", "forward_pre", 0), (f"{L0}.mlp.router", "forward_pre", 0),
             (f"{L0}.mlp.experts", "forward_pre", 0), (f"{L0}.mlp", "forward", 0),
             ("decoder.layers.1.mlp.router.weight", "tensor", 0),
             (f"{EXPERT}.linear_fc1.weight", "tensor", 0)]


def _each_site(name: str, sites, sequence_parallel: bool = False, eval_mode: bool = False
               ) -> tuple[list[str], list[str]]:
    """Each site hooked alone at TP=1 and TP=2: ``(wrong, refused)``; ``wrong`` lists what
    TP=2 stored that differs from TP=1 (rank 0) and refusals made on some ranks only.

    One model per TP size serves every site in turn (a FlexModel gives the model back
    unchanged, and nothing here updates the weights); after a refusal, which may leave a
    FlexModel half-built on it, the next site gets a fresh one."""
    wrong, refused, refs = [], [], {}
    with gpt_parallel(tp=1):
        model = None
        for site in sites:
            if model is None:
                model = make(1, name)
                model.train(not eval_mode)
            try:
                refs[site] = run_flex(model, [site], False, local_group())[0]
            except Exception as exc:  # noqa: BLE001 -- no such site in this configuration
                refused.append(f"{site}: at TP=1 too: {type(exc).__name__}")
                model = None
    with gpt_parallel(tp=2):
        model = None
        for site in sites:
            if site not in refs:
                continue
            if model is None:
                model = make(2, name, sequence_parallel)
                model.train(not eval_mode)
            try:
                got, err = run_flex(model, [site], False)[0], None
            except Exception as exc:  # noqa: BLE001 -- a refusal is a fine answer
                got, err = None, f"{type(exc).__name__}: {str(exc)[:120]}"
            errs = [None] * dist.get_world_size()
            dist.all_gather_object(errs, err)
            if any(e is not None for e in errs):
                (refused if all(errs) else wrong).append(f"{site}: {errs}")
                model = None  # on every rank: the errors were agreed
            elif dist.get_rank() == 0:
                wrong += stored_mismatches(got, refs[site], **TOL)
    return wrong, refused


# -- configurations that work (pinned) --------------------------------------------------------
@pytest.mark.parametrize("name", ["gqa_rope", "rms_no_bias"])
@distributed(world_size=2)
def test_retrieval_equals_tp1_or_is_refused(name):
    """GQA (4 heads / 2 groups) with kv_channels 24 != 64 / 4, a qkv bias, RoPE and untied
    embeddings; RMSNorm without linear biases and one query group (MQA): every site equals
    TP=1 or is refused on every rank, and most of them are not refused."""
    wrong, refused = _each_site(name, ATTENTION_SITES)
    assert not wrong, "\n".join(wrong)
    # only what the configuration lacks (a returned bias, the rotary table) fails, at TP=1 too
    assert all("at TP=1 too" in r for r in refused), "\n".join(refused)
    assert len(refused) == {"gqa_rope": 1, "rms_no_bias": 5}[name], "\n".join(refused)


@pytest.mark.parametrize("edit", [True, "replicated"], ids=["leader", "replicated"])
@distributed(world_size=2)
def test_gqa_rope_editing_equals_tp1(edit):
    sites = [("embedding", "forward", 0),
             (f"{L0}.self_attention.linear_qkv", "forward", 0),
             (f"{L0}.self_attention.core_attention", "forward", 0),
             (f"{L0}.self_attention.linear_proj", "forward_pre", 0),
             (f"{L0}.mlp.linear_fc1", "forward", 0),
             ("decoder.layers.1", "forward", 0),
             ("decoder.layers.1.self_attention.linear_qkv.weight", "tensor", 0),
             ("output_layer", "forward", 0)]
    with gpt_parallel(tp=1):
        _, ref_logits, ref_grads, _ = run_flex(make(1, "gqa_rope"), sites, True, local_group())
        plain, _ = forward_backward(make(1, "gqa_rope"))
    with gpt_parallel(tp=2):
        _, logits, grads, _ = run_flex(make(2, "gqa_rope"), sites, edit)
    assert not torch.allclose(plain, ref_logits)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], **TOL, msg=k)


def _zero_row_5(w: torch.Tensor) -> torch.Tensor:
    delta = torch.zeros_like(w)
    delta[5] = -w[5]
    return delta


@pytest.mark.parametrize("name,sequence_parallel", [("gqa_rope", False), ("moe", True)])
@distributed(world_size=2)
def test_parameters_export_and_surgery_equal_tp1(name, sequence_parallel):
    """``get_module_parameter``, ``full_weights`` and full-parameter / seeded-noise surgery on
    the GQA qkv weight (q, k, v of each group together), the untied output layer and the MoE
    experts' weights give TP=1's tensors and logits."""
    from flex_surgery import FlexModel
    from flex_surgery.export import full_weights
    from flex_surgery.surgery import SurgicalTheater

    if name == "moe":
        targets = [f"{EXPERT}.linear_fc1.weight", f"{EXPERT}.linear_fc2.weight",
                   f"{L0}.mlp.router.weight"]
    else:
        targets = [f"{L0}.self_attention.linear_qkv.weight",
                   f"{L0}.self_attention.linear_qkv.bias", "output_layer.weight"]

    def run(model):
        model.eval()
        with torch.no_grad():
            base = model(*gpt_inputs()).cpu()
            with SurgicalTheater(model, layers=targets[0], modification_fn=_zero_row_5,
                                 full_parameter=True):
                zeroed = model(*gpt_inputs()).cpu()
            with SurgicalTheater(model, layers=targets, modification_type="noise",
                                 noise_scale=0.1, seed=3, params="all"):
                noised = model(*gpt_inputs()).cpu()
        return base, zeroed, noised

    with gpt_parallel(tp=1):
        ref = make(1, name)
        want = full_tensors(ref)
        ref_out = run(ref)
    with gpt_parallel(tp=2):
        model = make(2, name, sequence_parallel)
        flex = FlexModel(model, None)
        whole = {n: flex.get_module_parameter(n) for n in targets}
        flex.restore()
        exported = full_weights(model)
        out = run(model)
    for n in targets:
        assert torch.equal(whole[n], want[n]), n
    assert exported.keys() == want.keys()
    bad = [k for k in want if not torch.equal(exported[k], want[k])]
    assert not bad, bad
    for got, ref_logits in zip(out, ref_out):
        torch.testing.assert_close(got, ref_logits, **TOL)
    assert not torch.allclose(out[1], out[0]) and not torch.allclose(out[2], out[0])


@distributed(world_size=2)
def test_moe_sites_outside_the_experts_equal_tp1_or_are_refused():
    """MoE under sequence parallelism: the MoE layer's input and output, the router's input,
    the router's and an expert's weight gradients equal TP=1 or are refused."""
    wrong, refused = _each_site("moe", MOE_SITES, sequence_parallel=True)
    assert not wrong, "\n".join(wrong)
    # the MoE layer's own input and output are described (split like the sequence): stored
    assert not [r for r in refused if r.startswith(f"('{L0}.mlp', ")], refused


# -- silent wrong values (bugs) ---------------------------------------------------------------
@distributed(world_size=2)
def test_moe_expert_sites_sequence_parallel_equal_tp1_or_are_refused():
    wrong, _ = _each_site("moe", EXPERT_SITES, sequence_parallel=True)
    assert not wrong, "\n".join(wrong)


@distributed(world_size=2)
def test_moe_expert_sites_eval_without_sp_equal_tp1_or_are_refused():
    """Without sequence parallelism (allowed by Megatron in eval only)."""
    wrong, _ = _each_site("moe", EXPERT_SITES, eval_mode=True)
    assert not wrong, "\n".join(wrong)


@distributed(world_size=2)
def test_qk_layernorm_parameter_gradient_equals_tp1_or_is_refused():
    sites = [("decoder.layers.1.self_attention.q_layernorm.weight", "tensor", 0),
             ("decoder.layers.1.self_attention.k_layernorm.weight", "tensor", 0)]
    wrong, refused = _each_site("qk_norm", sites)
    assert not wrong and not refused, (wrong, refused)  # summed over tp, as Megatron does


@distributed(world_size=2)
def test_qk_layernorm_activations_are_refused_and_the_rest_equals_tp1():
    """q/k layernorm activations (heads split, [s, b, heads / tp, d]) are refused on every
    rank; the attention around them equals TP=1."""
    sites = [(f"{L0}.self_attention.q_layernorm", "forward", 0),
             (f"{L0}.self_attention.k_layernorm", "forward_pre", 0)]
    wrong, refused = _each_site("qk_norm", sites)
    assert not wrong and len(refused) == 2, (wrong, refused)
    wrong, _ = _each_site("qk_norm", [(f"{L0}.self_attention.core_attention", "forward", 0),
                                      (f"{L0}.self_attention", "forward", 0)])
    assert not wrong, "\n".join(wrong)
