"""``flex_surgery.export`` on sharded models: ``full_weights`` on layouts the
first tests do not reach (Megatron's strided gated ``linear_fc1`` and GQA / qk-layernorm
``linear_qkv``, HF TP MoE experts with ``_StridedShard``, HSDP, FSDP2 x TP, FSDP1 with flat
parameters), both gathering paths (every rank, ``rank0_only``), under surgery, injected into
a program exported from the one-process twin, and through weight files -- every value
compared with the same model in one process (``torch.equal``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed

from flex_surgery.export import (
    ExportedModel,
    WeightMismatchError,
    full_weights,
    live_weights,
    load_weight_file,
    save_weight_file,
)
from flex_surgery.models import tiny_hf_model
from flex_surgery.surgery import SurgicalTheater


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _assert_same(got: dict, want: dict, what: str = "") -> None:
    """Same names and bit-identical values; every mismatch listed."""
    want = _tensors(want)
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want)))
    bad = [f"{n}: shape {tuple(got[n].shape)} vs {tuple(want[n].shape)}"
           if got[n].shape != want[n].shape else
           f"{n}: differs by {(got[n].double() - want[n].double()).abs().max().item():.3g}"
           for n in want if got[n].shape != want[n].shape or not torch.equal(got[n], want[n])]
    assert not bad, (what, bad)
    for name, value in got.items():
        assert type(value) is torch.Tensor and value.device.type == "cpu", (what, name)


def _ramp(t: torch.Tensor) -> torch.Tensor:
    """A delta that depends on every element's place in the *whole* parameter: a piece put
    back in the wrong place, or an edit run on a piece, changes the result."""
    return torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)


def _both_paths(model) -> tuple[dict, dict]:
    """``full_weights`` on every rank and with ``rank0_only`` (collective, same order)."""
    everywhere = full_weights(model)
    on_rank0 = full_weights(model, rank0_only=True)
    if dist.get_rank() != 0:
        assert on_rank0 == {}
    return everywhere, on_rank0


# -- 1. Megatron-core GPTModel: strided gated fc1, GQA, qk layernorm ------------------------------
_MEGATRON_CONFIGS = {
    "gated": {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu},
    "gqa_qk_norm": {"qk_layernorm": True, "num_query_groups": 2},
    "gated_gqa_qk_norm": {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu,
                          "qk_layernorm": True, "num_query_groups": 2},
    "tied_embeddings": {"model_kwargs": {"share_embeddings_and_output_weights": True}},
}
_MEGATRON_EDITED = ["decoder.layers.0.mlp.linear_fc1.weight",
                    "decoder.layers.0.mlp.linear_fc1.bias",
                    "decoder.layers.0.self_attention.linear_qkv.weight",
                    "decoder.layers.1.self_attention.linear_qkv.bias",
                    "embedding.word_embeddings.weight"]


def _megatron_surgery(model) -> dict:
    with SurgicalTheater(model, layers=_MEGATRON_EDITED, modification_fn=_ramp,
                         full_parameter=True, params="all"):
        ramped = full_weights(model)
    with SurgicalTheater(model, layers=_MEGATRON_EDITED, modification_type="noise",
                         noise_scale=0.1, seed=5, params="all"):
        noised = full_weights(model)
    return {"ramped": ramped, "noised": noised}


@pytest.mark.parametrize("config,sequence_parallel",
                         [(c, False) for c in sorted(_MEGATRON_CONFIGS)]
                         + [("gated_gqa_qk_norm", True)])
@distributed(world_size=2)
def test_megatron_gpt_full_weights_equal_tp1(tmp_path, config, sequence_parallel):
    """Every whole weight of the TP=2 GPTModel (strided gated ``linear_fc1``, GQA
    ``linear_qkv``, per-head q/k layernorms, vocab-parallel embedding, tied output layer,
    sequence-parallel norms) equals the TP=1 twin's ``state_dict`` on both paths and through a
    safetensors file, and under a position-dependent full-parameter edit and under
    seeded noise equals the TP=1 model under the same surgery."""
    from megatron_gpt_cases import build_gpt, gpt_parallel

    extra = _MEGATRON_CONFIGS[config]
    with gpt_parallel(tp=1):
        ref = build_gpt(tp=1, **extra)
        want = _tensors(ref.state_dict())
        want_edited = {}
        with SurgicalTheater(ref, layers=_MEGATRON_EDITED, modification_fn=_ramp,
                             full_parameter=True, params="all"):
            want_edited["ramped"] = {k: v.clone() for k, v in live_weights(ref).items()}
        with SurgicalTheater(ref, layers=_MEGATRON_EDITED, modification_type="noise",
                             noise_scale=0.1, seed=5, params="all"):
            want_edited["noised"] = {k: v.clone() for k, v in live_weights(ref).items()}
    assert not torch.equal(want_edited["ramped"][_MEGATRON_EDITED[0]],
                           want[_MEGATRON_EDITED[0]])
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel, **extra)
        everywhere, on_rank0 = _both_paths(model)
        edited = _megatron_surgery(model)
        after = full_weights(model)
    _assert_same(everywhere, want, "every rank")
    _assert_same(after, want, "after the theaters")
    for kind in ("ramped", "noised"):
        _assert_same(edited[kind], want_edited[kind], kind)
    if dist.get_rank() == 0:
        _assert_same(on_rank0, want, "rank0_only")
        path = tmp_path / "megatron_tp2.safetensors"  # written by the sharded run, read alone
        save_weight_file(on_rank0, path)
        _assert_same(load_weight_file(path), want, "weight file")


@distributed(world_size=2)
def test_megatron_mlp_weights_into_exported_one_process_program():
    """Whole weights of Megatron-core TP layers under seeded noise, injected into the program
    exported from the unsharded twin, give exactly the twin's output under the same noise.
    The sharded module itself is no source: each rank's shards are refused by shape."""
    from megatron_cases import megatron_mlp, megatron_parallel, plain_mlp, token_ids

    ids = token_ids()
    ref = plain_mlp()
    exported = ExportedModel.export(plain_mlp(), example_args=(ids,), output=None)
    names = ["embed.weight", "up.weight", "up.bias", "down.weight"]
    noise = dict(layers=names, modification_type="noise", noise_scale=0.3, seed=11,
                 params="all")
    with torch.no_grad():
        plain_out = ref(ids)
        with SurgicalTheater(ref, **noise):
            want = ref(ids)
    assert not torch.equal(want, plain_out)
    with megatron_parallel(2):
        model = megatron_mlp(plain_mlp())
        with SurgicalTheater(model, **noise):
            weights = full_weights(model)
        with pytest.raises(WeightMismatchError, match="shape mismatch for 'up.weight'"):
            exported.inject(model)
    exported.inject(weights)
    assert torch.equal(exported(ids), want)


# -- 2. HF tensor parallelism, MoE experts (_StridedShard gate_up_proj) -------------------------
_MOE_EDITED = {
    "mixtral": ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
                "model.layers.1.self_attn.k_proj.weight"],
    "qwen2_moe": ["model.layers.0.mlp.experts.gate_up_proj",
                  "model.layers.0.mlp.experts.down_proj",
                  "model.layers.0.mlp.shared_expert.gate_proj.weight",
                  "model.layers.1.mlp.shared_expert.down_proj.weight"],
}


@pytest.mark.parametrize("arch", sorted(_MOE_EDITED))
@distributed(world_size=2, timeout_s=240)
def test_hf_tp_moe_full_weights_equal_one_process(tmp_path, arch):
    """Both gathering paths (the registry's views; torch's checkpoint for ``rank0_only``) give
    the one-process ``state_dict``, expert weights in one-process order; a position-dependent
    full-parameter edit of the strided experts gives the one-process model's edited weights."""
    from test_hf_tp_models import _one_process, _tensor_parallel

    ref, model = _one_process(arch), _tensor_parallel(arch, tmp_path)
    want = ref.state_dict()
    everywhere, on_rank0 = _both_paths(model)
    _assert_same(everywhere, want, "every rank")
    if dist.get_rank() == 0:
        _assert_same(on_rank0, want, "rank0_only")
    edit = dict(layers=_MOE_EDITED[arch], modification_fn=_ramp, full_parameter=True,
                params="all")
    with SurgicalTheater(ref, **edit):
        want_edited = {k: v.clone() for k, v in live_weights(ref).items()}
    with SurgicalTheater(model, **edit):
        edited = full_weights(model)
    assert all(not torch.equal(want_edited[n], want[n]) for n in _MOE_EDITED[arch])
    _assert_same(edited, want_edited, "edited")
    _assert_same(full_weights(model), want, "restored")


# -- 3. FSDP1 with flat parameters (use_orig_params=False) -----------------------------------------
def _fsdp1_llama(strategy: str, tied: bool, dtype=torch.float64):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FSDP(tiny_hf_model("llama", seed=0, dtype=dtype, tie_word_embeddings=tied),
                use_orig_params=False, sharding_strategy=ShardingStrategy[strategy],
                auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                device_id=torch.device("cpu"))


@pytest.mark.parametrize("strategy,tied", [("FULL_SHARD", True), ("FULL_SHARD", False),
                                           ("SHARD_GRAD_OP", False), ("NO_SHARD", True)])
@distributed(world_size=2)
def test_fsdp1_flat_parameters_full_weights_equal_one_process(strategy, tied):
    """Flat parameters (names from their ``_fqns``, tied embedding / head shared in the root
    unit): both paths give the one-process ``state_dict``, tied names one tensor; under seeded
    noise on block 0 and the head, the one-process model's noised weights."""
    ref = tiny_hf_model("llama", seed=0, dtype=torch.float64, tie_word_embeddings=tied)
    sharded = _fsdp1_llama(strategy, tied)
    from torch.distributed.fsdp._flat_param import FlatParameter

    assert all(isinstance(p, FlatParameter) for p in sharded.parameters())
    everywhere, on_rank0 = _both_paths(sharded)
    _assert_same(everywhere, ref.state_dict(), "every rank")
    if tied:
        assert everywhere["lm_head.weight"] is everywhere["model.embed_tokens.weight"]
    if dist.get_rank() == 0:
        _assert_same(on_rank0, ref.state_dict(), "rank0_only")
    noise = dict(layers=["model.layers.0.*", "lm_head.weight", "model.norm.weight"],
                 modification_type="noise", noise_scale=0.1, seed=3, params="all")
    with SurgicalTheater(ref, **noise):
        want = {k: v.clone() for k, v in live_weights(ref).items()}
    with SurgicalTheater(sharded, **noise):
        got = full_weights(sharded)
    assert not torch.equal(want["model.layers.0.mlp.up_proj.weight"],
                           ref.state_dict()["model.layers.0.mlp.up_proj.weight"])
    _assert_same(got, want, "noised")
    ramp = dict(layers=["model.layers.1.self_attn.o_proj.weight", "model.embed_tokens.weight",
                        "model.layers.0.mlp.down_proj.weight"],
                modification_fn=_ramp, full_parameter=True, params="all")
    with SurgicalTheater(ref, **ramp):
        want = {k: v.clone() for k, v in live_weights(ref).items()}
    with SurgicalTheater(sharded, **ramp):
        got = full_weights(sharded)
    _assert_same(got, want, "ramped")
    _assert_same(full_weights(sharded), ref.state_dict(), "restored")


@distributed(world_size=2)
def test_fsdp1_flat_parameters_into_exported_program():
    """The first tests' export round trip (seeded noise on block 0, program == one process,
    torch.equal) with flat parameters."""
    from test_export_sharded import _check_against_one_process

    _check_against_one_process(_fsdp1_llama("FULL_SHARD", False, dtype=torch.float32))


# -- 4. HSDP and FSDP2 x TP on 4 ranks (the cached meshes) -----------------------------------------
def _plain_program(x):
    from parallel_cases import plain_net

    return ExportedModel.export(plain_net(), example_args=(x,), output=None)


@distributed(world_size=4)
def test_hsdp_full_weights_both_paths_surgery_and_program():
    """HSDP on the ("dp_replicate", "dp_shard") mesh (a persistent buffer alongside): both
    paths give the one-process ``state_dict``; under seeded noise, the weights injected into
    the one-process program give exactly the noised one-process output; the sharded module
    itself is refused."""
    from parallel_cases import H, plain_net
    from test_fsdp2_tp_mesh import BATCH, _fsdp2, _hsdp_mesh

    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))
    ref = plain_net()
    ref.register_buffer("scale", torch.linspace(0, 1, 5))
    model = plain_net()
    model.register_buffer("scale", torch.linspace(0, 1, 5))
    model = _fsdp2(model, _hsdp_mesh(), model.blocks)
    everywhere, on_rank0 = _both_paths(model)
    _assert_same(everywhere, ref.state_dict(), "every rank")
    if dist.get_rank() == 0:
        _assert_same(on_rank0, ref.state_dict(), "rank0_only")
    noise = dict(layers=["blocks.0.up.weight", "blocks.1.down.bias", "head.weight"],
                 modification_type="noise", noise_scale=0.5, seed=7, params="all")
    with torch.no_grad():
        plain_out = ref(x)
        with SurgicalTheater(ref, **noise):
            want = ref(x)
    with SurgicalTheater(model, **noise):
        weights = full_weights(model)
    exported = _plain_program(x)
    with pytest.raises(WeightMismatchError, match="DTensor"):
        exported.inject(model)
    exported.inject({k: v for k, v in weights.items() if k != "scale"})
    assert not torch.equal(want, plain_out)
    assert torch.equal(exported(x), want)


@pytest.mark.parametrize("tied", [False, True])
@distributed(world_size=4)
def test_fsdp2_x_tp_llama_full_weights_equal_one_process(tied):
    """The tiny Llama with its attention and MLP split over tp and FSDP2 over dp: both paths
    give the one-process ``state_dict`` (tied embedding / head one tensor); untied, the export
    round trip of the first tests (noise on block 0, program == one process)."""
    from parallel_cases import llama_tp_plan
    from test_export_sharded import _check_against_one_process
    from test_fsdp2_tp_mesh import _fsdp2, _mesh_2d
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = _mesh_2d()
    ref = tiny_hf_model("llama", seed=0, tie_word_embeddings=tied)
    model = parallelize_module(tiny_hf_model("llama", seed=0, tie_word_embeddings=tied),
                               mesh["tp"], llama_tp_plan())
    model = _fsdp2(model, mesh["dp"], model.model.layers)
    everywhere, on_rank0 = _both_paths(model)
    _assert_same(everywhere, ref.state_dict(), "every rank")
    if dist.get_rank() == 0:
        _assert_same(on_rank0, ref.state_dict(), "rank0_only")
        if tied:
            assert on_rank0["lm_head.weight"] is on_rank0["model.embed_tokens.weight"]
    if tied:
        assert everywhere["lm_head.weight"] is everywhere["model.embed_tokens.weight"]
    else:
        _check_against_one_process(model)


# -- 5. weight files written on a sharded run, read in one process ---------------------------------
_MESH_1D: dict[int, object] = {}


def _mesh_1d():
    """A 1-D mesh over the whole world, once per pool rank (see ``test_fsdp2_tp_mesh._mesh_2d``)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = id(dist.distributed_c10d._get_default_group())
    if world not in _MESH_1D:
        _MESH_1D[world] = init_device_mesh("cpu", (dist.get_world_size(),))
    return _MESH_1D[world]


def _fsdp2_llama(tied: bool):
    from torch.distributed.fsdp import fully_shard

    model = tiny_hf_model("llama", seed=0, tie_word_embeddings=tied)
    for block in model.model.layers:
        fully_shard(block, mesh=_mesh_1d())
    return fully_shard(model, mesh=_mesh_1d())


_NOISE = dict(layers=[0], modification_type="noise", noise_scale=0.1, seed=3)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@distributed(world_size=2)
def test_weight_files_from_a_sharded_run(tmp_path, suffix):
    """FSDP2, tied Llama, seeded noise on block 0: the whole weights written by rank 0
    (directly, and through the program's ``save_weights``) read back in one process hold the
    one-process names and values; a weightless program loaded with the file computes exactly
    what the noised one-process model does. safetensors refuses the tied pair that
    ``full_weights`` hands out as one tensor: a clear error (the program's ``save_weights``
    writes one entry per tied group instead)."""
    from flex_surgery.models import example_inputs

    ref = tiny_hf_model("llama", seed=0, tie_word_embeddings=True)
    model = _fsdp2_llama(tied=True)
    with SurgicalTheater(model, **_NOISE):
        weights = full_weights(model)
    if dist.get_rank() != 0:
        return
    ids = example_inputs("llama")["input_ids"]
    exported = ExportedModel.export(ref, example_kwargs={"input_ids": ids})
    with torch.no_grad(), SurgicalTheater(ref, **_NOISE):
        want_weights = {k: v.clone() for k, v in live_weights(ref).items()}
        want = ref(input_ids=ids).logits
    direct = tmp_path / f"direct{suffix}"
    save_weight_file(weights, direct)  # tied names each written whole (safetensors too)
    _assert_same(load_weight_file(direct), want_weights, "direct file")
    exported.inject(weights)
    exported.save(tmp_path / "graph.pt2", weights=False)
    exported.save_weights(tmp_path / f"program{suffix}")
    loaded = load_weight_file(tmp_path / f"program{suffix}")
    assert len(loaded) == len(want_weights) - 1  # one entry for the tied pair
    for name, value in loaded.items():
        assert torch.equal(value, want_weights[name]), name
    served = ExportedModel.load(tmp_path / "graph.pt2", weights=tmp_path / f"program{suffix}")
    assert torch.equal(served(input_ids=ids), want)


# -- 6. rank0_only inside a theater ---------------------------------------------------------------
def _dtensor_tp_llama(tied: bool):
    from parallel_cases import llama_tp_plan
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(tiny_hf_model("llama", seed=0, tie_word_embeddings=tied),
                              _mesh_1d_tp(), llama_tp_plan())


_MESH_TP: dict[int, object] = {}


def _mesh_1d_tp():
    from torch.distributed.device_mesh import init_device_mesh

    world = id(dist.distributed_c10d._get_default_group())
    if world not in _MESH_TP:
        _MESH_TP[world] = init_device_mesh("cpu", (dist.get_world_size(),),
                                           mesh_dim_names=("tp",))
    return _MESH_TP[world]


@pytest.mark.parametrize("layout", ["fsdp2", "dtensor_tp", "ddp"])
@distributed(world_size=2)
def test_rank0_only_inside_a_theater_gathers_the_modified_weights(layout):
    from torch.nn.parallel import DistributedDataParallel as DDP

    if layout == "fsdp2":
        model = _fsdp2_llama(tied=False)
    elif layout == "dtensor_tp":
        model = _dtensor_tp_llama(tied=False)
    else:
        model = DDP(tiny_hf_model("llama", seed=0))
    ref = tiny_hf_model("llama", seed=0)
    with SurgicalTheater(ref, **_NOISE):
        want = {k: v.clone() for k, v in live_weights(ref).items()}
    with SurgicalTheater(model, **_NOISE):
        everywhere = full_weights(model)
        on_rank0 = full_weights(model, rank0_only=True)
    _assert_same(everywhere, want, "every rank under surgery")
    if dist.get_rank() == 0:
        _assert_same(on_rank0, want, "rank0_only under surgery")


@distributed(world_size=2)
def test_rank0_only_inside_a_theater_on_the_registry_path():
    """Pins the working neighbour: FSDP1 (flat parameters) and Megatron-core are gathered by
    the registry's views, which read the live (modified) weights on both paths."""
    from megatron_cases import megatron_mlp, megatron_parallel, plain_mlp

    ref = tiny_hf_model("llama", seed=0, dtype=torch.float64)
    with SurgicalTheater(ref, **_NOISE):
        want = {k: v.clone() for k, v in live_weights(ref).items()}
    sharded = _fsdp1_llama("FULL_SHARD", tied=False)
    with SurgicalTheater(sharded, **_NOISE):
        on_rank0 = full_weights(sharded, rank0_only=True)
    if dist.get_rank() == 0:
        _assert_same(on_rank0, want, "fsdp1")
    noise = dict(layers=["up.weight", "embed.weight"], modification_type="noise",
                 noise_scale=0.3, seed=11, params="all")
    plain = plain_mlp()
    with SurgicalTheater(plain, **noise):
        want = {k: v.clone() for k, v in live_weights(plain).items()}
    with megatron_parallel(2):
        model = megatron_mlp(plain_mlp())
        with SurgicalTheater(model, **noise):
            on_rank0 = full_weights(model, rank0_only=True)
    if dist.get_rank() == 0:
        _assert_same(on_rank0, want, "megatron")


@distributed(world_size=2)
def test_fsdp2_unsharded_after_forward_full_weights_equal_one_process():
    """``reshard_after_forward=False``: after a forward the blocks' parameters are registered
    as plain unsharded tensors, not DTensors. Both paths still give the one-process weights."""
    from torch.distributed.fsdp import fully_shard

    from flex_surgery.models import example_inputs

    ref = tiny_hf_model("llama", seed=0)
    model = tiny_hf_model("llama", seed=0)
    for block in model.model.layers:
        fully_shard(block, mesh=_mesh_1d(), reshard_after_forward=False)
    fully_shard(model, mesh=_mesh_1d(), reshard_after_forward=False)
    with torch.no_grad():
        model(**example_inputs("llama"))
    everywhere, on_rank0 = _both_paths(model)
    _assert_same(everywhere, ref.state_dict(), "every rank")
    if dist.get_rank() == 0:
        _assert_same(on_rank0, ref.state_dict(), "rank0_only")


@distributed(world_size=2)
def test_flexmodel_around_fsdp2_full_weights_and_inject():
    """A FlexModel around the FSDP2 model: its ``module.`` prefix is stripped on both paths
    (the torch-checkpoint path is handed the FSDP2 root); injecting the FlexModel itself into a
    one-process program is refused (its live weights are DTensor shards), not half-written."""
    from flex_surgery import FlexModel
    from flex_surgery.models import example_inputs

    ref = tiny_hf_model("llama", seed=0)
    flex = FlexModel(_fsdp2_llama(tied=False), {})
    try:
        everywhere, on_rank0 = _both_paths(flex)
    finally:
        flex.restore()
    _assert_same(everywhere, ref.state_dict(), "every rank")
    if dist.get_rank() == 0:
        _assert_same(on_rank0, ref.state_dict(), "rank0_only")
        ids = example_inputs("llama")["input_ids"]
        exported = ExportedModel.export(tiny_hf_model("llama", seed=1),
                                        example_kwargs={"input_ids": ids})
        before = exported(input_ids=ids)
        with pytest.raises(WeightMismatchError, match="DTensor"):
            exported.inject(flex)
        assert torch.equal(exported(input_ids=ids), before)
        exported.inject(everywhere)
        with torch.no_grad():
            assert torch.equal(exported(input_ids=ids), ref(input_ids=ids).logits)


@pytest.mark.parametrize("reshard", [True, False])
@distributed(world_size=2)
def test_fsdp2_mixed_precision_full_weights_are_the_master_weights(reshard):
    """FSDP2 with ``MixedPrecisionPolicy(param_dtype=float32)`` over float64 weights: the
    whole weights are the float64 master weights (what the one-process model holds), also
    after a forward that left the blocks unsharded in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from flex_surgery.models import example_inputs

    ref = tiny_hf_model("llama", seed=0, dtype=torch.float64)
    model = tiny_hf_model("llama", seed=0, dtype=torch.float64)
    policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=_mesh_1d(), reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=_mesh_1d(), reshard_after_forward=reshard, mp_policy=policy)
    with torch.no_grad():
        model(**example_inputs("llama"))
    everywhere, on_rank0 = _both_paths(model)
    _assert_same(everywhere, ref.state_dict(), "every rank")
    if dist.get_rank() == 0:
        _assert_same(on_rank0, ref.state_dict(), "rank0_only")


@distributed(world_size=2)
def test_fsdp2_unsharded_after_forward_under_surgery():
    """``reshard_after_forward=False`` and a forward before the theater: the whole weights
    gathered inside it are the one-process model's noised weights, the model's own output
    under it is the noised one-process output, and both come back afterwards."""
    from torch.distributed.fsdp import fully_shard

    from flex_surgery.models import example_inputs

    ids = example_inputs("llama")["input_ids"]
    ref = tiny_hf_model("llama", seed=0)
    model = tiny_hf_model("llama", seed=0)
    for block in model.model.layers:
        fully_shard(block, mesh=_mesh_1d(), reshard_after_forward=False)
    fully_shard(model, mesh=_mesh_1d(), reshard_after_forward=False)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with SurgicalTheater(ref, **_NOISE):
            want = {k: v.clone() for k, v in live_weights(ref).items()}
            want_out = ref(input_ids=ids).logits
        with SurgicalTheater(model, **_NOISE):
            got = full_weights(model)
            out = model(input_ids=ids).logits
        _assert_same(got, want, "noised")
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
        _assert_same(full_weights(model), ref.state_dict(), "restored")
        assert torch.equal(model(input_ids=ids).logits, base)
